"""Advance many teacher -> student -> ... -> PLL chains at once, with any number of processes.

Configurations that share features, epochs, batch size and validation fraction are trained
together, step by step: all teachers (as batched computations), then all round-1 students, ...,
then all PLL students. A run's life (see DESIGN in the docs):
  - claimed: this process holds its lease (utils/leases.py); runs leased by a live process are
    left to it, and a student whose teacher is being trained elsewhere waits for it;
  - training: periodic resumable state (utils/checkpoints.py), never read as a teacher;
  - final checkpoints, the last of which carries the record;
  - finished: the record in the results store, written last. A process that finds final
    checkpoints without a record completes the record from them instead of retraining.
What each step learns from is `utils.steps.lesson_for`; a record's content is
`utils.runs.record_payload`; files are named and written by utils/runs.py and utils/checkpoints.py.
"""
import os
import platform
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch

from data.corruption import corrupt_labels, corruption_matrix_for, format_superclasses, superclass_groups, \
    superclasses_from_features
from data.features import FeatureSet, load_features_file, normalize_features
from data.splits import stratified_val_split
from models.backbones import backbone_tag
from models.extract import load_or_extract_features
from utils.checkpoints import (RESUME_FILE, Run, read_resume_state, record_from_final_checkpoints,
                               save_resume_state, stack_resume_states, teacher_weights,
                               write_final_checkpoints)
from utils.cli import UserError
from utils.io import HOST, remove_stale_temporaries
from utils.leases import LEASE_NAME, Heartbeat, LeaseLost, read_holder, try_claim
from utils.options import option, positive_finite
from utils.progress import Progress, progress_mode
from utils.runs import ResultsStore, RunConfig, record_payload
from utils.steps import SeedPurpose, lesson_for, step_of
from utils.train import (Hyper, NonFiniteLoss, TrainData, TrainState, ThreadTuner,
                         batched_products_match_lone,
                         evaluation_thread_invariant, products_thread_invariant, train_heads)


@dataclass(frozen=True)
class FeatureSource:
    """Where a configuration's features come from: a dataset through a backbone, or a file."""
    dataset: str
    arch: str = "resnet34"
    pretrained: bool = True
    features_path: Optional[str] = None

    def tag(self) -> str:
        if self.features_path:
            return "file"
        return "pixels" if self.dataset == "digits" else backbone_tag(self.arch, self.pretrained)


@dataclass
class EngineOptions:
    """How runs are trained and stored (none of it changes a run's numbers), each option declared
    once with its command-line flag."""
    checkpoint_root: str = option("checkpoint", "-c", "--checkpoint", help="root directory of checkpoints")
    results_root: str = option("results", "--results", new=True, help="results store directory")
    data_root: str = option("data_root", "--data-root", new=True,
                            help="where torchvision datasets are read or downloaded; with -d imagefolder, "
                                 "the image folder itself (DIR/<class>/<images>, or DIR/train/<class>/... "
                                 "and DIR/test/<class>/...)")
    cache_root: str = option("cache", "--cache-dir", new=True, help="feature cache directory")
    device: torch.device = torch.device("cpu")
    workers: int = option(4, "-j", "--workers", type=int,
                          help="data loading workers of feature extraction (at most the CPU cores available)")
    test_batch: int = option(100, "--test-batch", type=int, valid=positive_finite, must="be positive",
                             help="batch size of feature extraction")
    max_batch_runs: int = option(64, "--max-batch-runs", type=int, valid=positive_finite, must="be positive",
                                 new=True, metavar="N", help="most runs trained together in one batch")
    save_every: int = option(25, "--save-every", type=int, new=True, metavar="N",
                             help="epochs between resumable checkpoints (0: end only)")
    overwrite: bool = option(False, "--overwrite", type=bool, new=True,
                             help="retrain runs that already have a result record")
    # "auto": progress bars when stderr is a terminal, else one line per finished chunk of runs;
    # "bars", "lines", or "none" (no progress output; warnings and errors still appear)
    progress: str = "auto"
    lease_timeout: float = option(600.0, "--lease-timeout", type=float, valid=positive_finite,
                                  must="be a positive number of seconds", new=True, metavar="S",
                                  help="seconds without a heartbeat after which another process takes over "
                                       "a run being trained")
    poll_seconds: float = 5.0     # between looks at runs that other processes hold
    fuse_shared_seeds: bool = option(False, "--fuse-shared-seeds", type=bool, new=True,
                                     help="runs sharing mini-batches multiply them as one wider matmul: "
                                          "faster, but not bit-identical to the same run alone on every BLAS "
                                          "(recorded)")


@dataclass
class LabelSetup:
    """A configuration's training rows and labels; depends on (ctype, eta, seed, val split)."""
    train_rows: torch.Tensor
    noisy: torch.Tensor
    true: torch.Tensor
    val_rows: Optional[torch.Tensor]
    val_labels: Optional[torch.Tensor]
    realised: float
    superclasses: Optional[list] = None  # cc corruption: the superclasses (lists of class indices)


@dataclass
class _Group:
    """Features on the training device and the labels of the configurations trained together."""
    features: FeatureSet
    fid: str
    train_x: torch.Tensor
    test: tuple          # (test features, test labels) on the device
    setups: dict         # (ctype, eta, seed, val_split, val_clean) -> LabelSetup

    def setup(self, cfg: RunConfig) -> LabelSetup:
        return self.setups[(cfg.ctype, cfg.eta, cfg.seed, cfg.val_split, cfg.val_clean)]


# Below this many multiply-adds per run and step, extra CPU threads cost more in synchronisation
# than they save: one thread is faster. Above it, more threads are faster on a quiet machine and
# several times slower when another process holds a core, so a ThreadTuner picks, every epoch, the
# faster of one thread and the default count. That is allowed only where the BLAS gives the same bits
# at any thread count and for a run alone or batched (probed once per shape); elsewhere training
# stays on one thread, which keeps every run's numbers independent of its batch and of the load.
SMALL_STEP_MACS = 4_000_000
_DEFAULT_THREADS = torch.get_num_threads()
_FREE_THREADS = {}  # (batch sizes, d, K) -> whether the thread count may change (see above)
_FREE_EVAL_THREADS = {}  # (evaluation rows, d, K) -> the same for evaluation


def cpu_thread_plan(device: torch.device, batch_sizes, dim: int, num_classes: int, log=print, eval_rows=()):
    """(largest thread count, ThreadTuner for the training steps (and evaluation of `eval_rows`
    test/validation rows, where that is free too) or None) for runs of this shape; sets torch's
    thread count. (0, None) on a GPU."""
    if device.type != "cpu":
        return 0, None
    if max(batch_sizes) * dim * num_classes < SMALL_STEP_MACS or _DEFAULT_THREADS == 1:
        torch.set_num_threads(1)
        return 1, None
    shape = (tuple(sorted(set(batch_sizes))), dim, num_classes)
    if shape not in _FREE_THREADS:
        torch.set_num_threads(_DEFAULT_THREADS)
        _FREE_THREADS[shape] = (batched_products_match_lone(shape[0], dim, num_classes)
                                and products_thread_invariant(shape[0], dim, num_classes, _DEFAULT_THREADS))
        if not _FREE_THREADS[shape]:
            log(f"this BLAS rounds products differently with {_DEFAULT_THREADS} threads (or batched): "
                "training on 1 thread, so every run gives the same numbers alone, batched or resumed")
    if not _FREE_THREADS[shape]:
        torch.set_num_threads(1)
        return 1, None
    eval_shape = (tuple(sorted(set(eval_rows))), dim, num_classes)
    if eval_shape not in _FREE_EVAL_THREADS:
        _FREE_EVAL_THREADS[eval_shape] = evaluation_thread_invariant(eval_shape[0], dim, num_classes,
                                                                     _DEFAULT_THREADS)
    torch.set_num_threads(_DEFAULT_THREADS)
    return _DEFAULT_THREADS, ThreadTuner(_DEFAULT_THREADS, tune_evaluation=_FREE_EVAL_THREADS[eval_shape])


def load_source(source: FeatureSource, opts: EngineOptions, log) -> FeatureSet:
    if source.features_path:
        return load_features_file(source.features_path, name=source.dataset)
    return load_or_extract_features(source.dataset, source.arch, source.pretrained, opts.data_root,
                                    opts.cache_root, opts.device, opts.test_batch, opts.workers, log,
                                    progress=progress_mode(opts.progress))


def make_label_setup(features: FeatureSet, transition, cfg: RunConfig, superclasses=None) -> LabelSetup:
    noisy_all = corrupt_labels(features.train_y, transition, cfg.seed)
    rows = np.arange(len(features.train_y))
    val_rows = val_labels = None
    if cfg.val_split > 0:
        rows, val = stratified_val_split(features.train_y.numpy(), cfg.val_split, cfg.seed)
        val_rows = torch.from_numpy(val)
        val_labels = (features.train_y if cfg.val_clean else noisy_all)[val_rows]
    rows = torch.from_numpy(rows)
    true, noisy = features.train_y[rows], noisy_all[rows]
    return LabelSetup(rows, noisy, true, val_rows, val_labels, float((noisy != true).double().mean()) * 100,
                      superclasses if cfg.ctype == "cc" else None)




def _unlink(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _per_run(cfgs, name: str) -> torch.Tensor:
    return torch.tensor([float(getattr(c, name)) for c in cfgs], dtype=torch.float32)


class ChainRunner:
    def __init__(self, opts: EngineOptions, log=None):
        # log: messages always shown (warnings, superclasses); progress notes are dropped with progress "none"
        self.opts = opts
        self.progress = Progress(opts.progress, log)
        self.log = self.progress.log
        self.superclasses_shown = set()  # features fingerprints whose superclasses were printed
        self.store = ResultsStore(opts.results_root)
        self.done_here = set()  # keys trained by this process (so --overwrite retrains each once)
        # runs this process trained, found finished, and completed from final checkpoints
        self.counts = {"trained": 0, "found": 0, "completed": 0}

    # ---- planning -------------------------------------------------------------------------
    def run(self, jobs, steps) -> list:
        """jobs: [(FeatureSource, RunConfig)]; steps: the chain's steps in order (Step or codes).
        Returns the records of every (job, step), trained now or found in the store."""
        steps = [step_of(s) for s in steps]
        groups = defaultdict(list)
        for source, cfg in jobs:
            groups[(source, cfg.epochs, cfg.train_batch, cfg.val_split, cfg.feature_norm)].append(cfg)
        remove_stale_temporaries(self.store.records_dir)
        records = []
        bar = None
        try:
            for (source, *_), configs in groups.items():
                features = load_source(source, self.opts, self.log)
                if bar is None:  # after the first load, so a bad features file prints only its error
                    bar = self.progress.bar(len(jobs) * len(steps), "runs", "run")
                records += self._run_group(features, configs, steps, bar)
        finally:
            if bar is not None:
                bar.close()
        return records

    def _superclasses(self, features, fid, configs):
        """The superclasses of cc corruption (None without cc configurations), printed once per dataset."""
        if not any(cfg.ctype == "cc" for cfg in configs):
            return None, None
        superclass_of = superclasses_from_features(features.train_x, features.train_y, features.num_classes)
        groups = superclass_groups(superclass_of)
        if fid not in self.superclasses_shown:
            self.superclasses_shown.add(fid)
            self.log(f"superclasses of {features.name} (cc): {format_superclasses(groups)}")
        return superclass_of, groups

    def _prepare_group(self, features, configs) -> _Group:
        """The group's features on the device and every configuration's labels."""
        fid = features.fingerprint()
        for cfg in configs:
            if cfg.val_split > 0 and round(cfg.val_split * len(features.train_y)) < features.num_classes:
                raise UserError(f"--val-split {cfg.val_split} leaves fewer validation samples than the "
                                f"{features.num_classes} classes of {features.name}; use a larger fraction")
        device = self.opts.device
        # the probe sees the --feature-norm transform; run keys (fid) and the corruption (cc
        # superclasses) depend on the stored features only
        probed = normalize_features(features, configs[0].feature_norm)
        group = _Group(features, fid, probed.train_x.to(device),
                       (probed.test_x.to(device), probed.test_y.to(device)),
                       {})
        transitions = {}
        superclass_of, superclasses = self._superclasses(features, fid, configs)
        for cfg in configs:
            if (cfg.ctype, cfg.eta) not in transitions:
                transitions[cfg.ctype, cfg.eta] = corruption_matrix_for(cfg.ctype, cfg.eta, features.train_x,
                                                                       features.train_y, features.num_classes,
                                                                       superclass_of)
            label_key = (cfg.ctype, cfg.eta, cfg.seed, cfg.val_split, cfg.val_clean)
            if label_key not in group.setups:
                group.setups[label_key] = make_label_setup(features, transitions[cfg.ctype, cfg.eta], cfg,
                                                           superclasses)
        return group

    def _run_group(self, features, configs, steps, bar):
        configs = [replace(c, backbone=features.backbone, dataset=features.name) for c in configs]
        group = self._prepare_group(features, configs)
        records = []
        for step in steps:
            runs, seen = [], set()
            for cfg in configs:
                run = Run.of(self.opts.checkpoint_root, cfg, step, group.fid)
                if run.key in seen:
                    bar.update(1)  # a teacher shared by several chains is one run
                    continue
                seen.add(run.key)
                runs.append(run)
            records += self._run_step(runs, lambda chunk: self._train_chunk(group, chunk, bar), bar)
        return records

    def _run_step(self, runs, train, bar) -> list:
        """Every run of one step finished: found finished, trained here (a lease and at most
        max_batch_runs runs at a time), or trained by another process while this one waits."""
        done, said = {}, None
        while True:
            todo = []
            for run in runs:
                if run.key not in done:
                    record = self._finished_record(run)
                    if record is None:
                        todo.append(run)
                        continue
                    done[run.key] = record
                    bar.update(1)
            if not todo:
                return [done[run.key] for run in runs]
            claimed, held = self._claim(todo)
            if claimed:
                self._train_claimed(claimed, train, done, bar)
                said = None
                continue
            message = (f"step {todo[0].step}: waiting for {len(held)} run(s) "
                       "that other processes are training "
                       f"({', '.join(sorted(set(held))[:3])}{', ...' if len(set(held)) > 3 else ''})")
            if message != said:
                self.progress.note(message)
                said = message
            time.sleep(self.opts.poll_seconds)

    def _claim(self, todo):
        """([(run, lease)] this process now holds (at most max_batch_runs), [holders of the others])."""
        claimed, held = [], []
        for run in todo:
            if len(claimed) == self.opts.max_batch_runs:
                break
            holder = self._teacher_in_training(run)
            if holder is None:
                remove_stale_temporaries(run.folder)
                lease, holder = try_claim(run.folder, self.opts.lease_timeout)
                if lease is not None:
                    claimed.append((run, lease))
                    continue
            held.append(holder.describe())
        return claimed, held

    def _train_claimed(self, claimed, train, done, bar) -> None:
        """Train the runs whose leases this process holds, grouped by the epoch they resume from."""
        try:
            by_resume = defaultdict(list)
            for run, lease in claimed:
                record = self._finished_record(run)  # finished while we claimed it
                if record is not None:
                    done[run.key] = record
                    bar.update(1)
                    continue
                resume = None if self.opts.overwrite else read_resume_state(run, self.log)
                by_resume[resume[0] if resume else 0].append((run, resume, lease))
            for _, items in sorted(by_resume.items()):
                # runs of one seed side by side (--fuse-shared-seeds)
                items.sort(key=lambda item: item[0].cfg.seed)
                try:
                    for record in train(items):
                        done[record["key"]] = record
                except LeaseLost as exc:
                    self.log(f"another process took over {exc} (its heartbeat looked stale); "
                             "leaving it that run")
        finally:
            for _, lease in claimed:
                lease.release()

    def _teacher_in_training(self, run: Run):
        """The holder of the lease on this run's teacher while another process trains it, else None."""
        if run.step.is_teacher:
            return None
        teacher = run.teacher(self.opts.checkpoint_root)
        if self.store.has(teacher.key):
            return None
        holder = read_holder(teacher.folder / LEASE_NAME)
        if holder is None or holder.is_dead(self.opts.lease_timeout, time.time()):
            return None  # nobody trains it: loading it fails with a message naming the fix
        return holder

    # ---- finished runs ----------------------------------------------------------------------
    def _finished_record(self, run: Run):
        """The run's record if it is finished (completing it from its final checkpoints if
        needed), else None."""
        if self.opts.overwrite and run.key not in self.done_here:
            return None
        if self.store.has(run.key):
            self.counts["found"] += 1
            record = self.store.get(run.key)
            self._tidy_finished(run.folder)
            return record
        record = record_from_final_checkpoints(run.folder, run.key)
        if record is None:
            return None
        self.counts["completed"] += 1
        return self._publish(run.folder, {**record, "completed_from_checkpoints": True,
                                          "created": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def _tidy_finished(self, folder) -> None:
        """Remove what a process killed after a run's record, before its last clean-up, left behind:
        the periodic state and its lease (unless a live process still holds it)."""
        lease = folder / LEASE_NAME
        if lease.exists():
            holder = read_holder(lease)
            if holder is not None and not holder.is_dead(self.opts.lease_timeout, time.time()):
                return
            _unlink(lease)
        _unlink(folder / RESUME_FILE)
        remove_stale_temporaries(folder)

    def _publish(self, folder, record) -> dict:
        """Write the record (the run is finished from now on) and drop the resumable state."""
        self.store.put(record)
        _unlink(folder / RESUME_FILE)
        self.done_here.add(record["key"])
        return record

    # ---- one batched computation ----------------------------------------------------------
    def _train_data(self, group: _Group, setups) -> TrainData:
        stack = lambda xs: torch.stack(xs).to(self.opts.device)  # noqa: E731
        has_val = setups[0].val_rows is not None
        return TrainData(group.train_x, stack([s.train_rows for s in setups]),
                         stack([s.noisy for s in setups]),
                         stack([s.true for s in setups]), *group.test,
                         stack([s.val_rows for s in setups]) if has_val else None,
                         stack([s.val_labels for s in setups]) if has_val else None,
                         group.features.num_classes)

    def _lesson(self, runs, data: TrainData, dim: int):
        """(what the runs learn from, each run's teacher key or None)."""
        cfgs, step = [run.cfg for run in runs], runs[0].step
        teachers, teacher_keys = None, [None] * len(runs)
        if not step.is_teacher:
            loaded = [teacher_weights(self.store, run.teacher(self.opts.checkpoint_root), run.cfg.selection)
                      for run in runs]
            teacher_keys = [key for _, key in loaded]
            teachers = torch.stack([w for w, _ in loaded]).to(self.opts.device).float()
        lesson = lesson_for(step, data, [c.seed for c in cfgs], dim, _per_run(cfgs, "label_smoothing"),
                            _per_run(cfgs, "temperature"), teachers)
        return lesson, teacher_keys

    def _train_chunk(self, group: _Group, chunk, bar) -> list:
        """Train a chunk of claimed runs of one step as one batched computation; their records."""
        runs = [run for run, _, _ in chunk]
        cfgs, step, features = [run.cfg for run in runs], runs[0].step, group.features
        setups = [group.setup(c) for c in cfgs]
        data = self._train_data(group, setups)
        lesson, teacher_keys = self._lesson(runs, data, features.dim)
        resumes = [resume for _, resume, _ in chunk]
        resume = stack_resume_states([ck for _, ck in resumes], self.opts.device) if resumes[0] else None
        epochs, batch = cfgs[0].epochs, cfgs[0].train_batch
        num_train = data.train_rows.shape[1]
        eval_rows = [len(features.test_y)] + ([data.val_rows.shape[1]] if data.val_rows is not None else [])
        threads, tuner = cpu_thread_plan(self.opts.device,
                                         [min(batch, num_train), num_train % batch or batch],
                                         features.dim, features.num_classes, self.log, eval_rows)
        desc = f"step {step}: {len(runs)} run{'s' if len(runs) > 1 else ''} of {features.name}"
        started = time.time()
        state = self._fit(runs, [lease for _, _, lease in chunk], data, lesson, resume, tuner, desc)
        facts = {"device": str(self.opts.device), "threads": threads,
                 "fused_batches": self.opts.fuse_shared_seeds,
                 "wall_time_s": time.time() - started, "batch_runs": len(runs)}
        records = []
        for r, run in enumerate(runs):
            facts.update(teacher_key=teacher_keys[r],
                         teacher_top2_coverage=(lesson.coverage or [None] * len(runs))[r],
                         resumed_from_epoch=resumes[r][0] if resumes[r] else 0)
            records.append(self._finish_run(run, state, r, setups[r], facts))
            bar.update(1)
        self.progress.chunk_done(desc, time.time() - started, state.epoch, epochs,
                                 resume.epoch if resume else 0)
        return records

    def _fit(self, runs, leases, data, lesson, resume, tuner, desc) -> TrainState:
        """train_heads with a heartbeat on the runs' leases, an epoch bar and periodic resumable state."""
        cfgs, step = [run.cfg for run in runs], runs[0].step
        epochs = cfgs[0].epochs
        hyper = Hyper(*(_per_run(cfgs, name) for name in ("lr", "wd", "momentum", "gamma")))
        seeds = [step.seed(c.seed, SeedPurpose.ORDER) for c in cfgs]
        ebar = self.progress.bar(epochs, desc, "ep", initial=resume.epoch if resume else 0, leave=False)
        heartbeat = Heartbeat(leases, every=min(30.0, self.opts.lease_timeout / 4))

        def on_epoch(state: TrainState):
            heartbeat.check()  # before a save: a run taken over by another process is theirs now
            last = state.history[0][-1]
            ebar.set_postfix(loss=f"{last['train_loss']:.3f}", test=f"{last['test_acc']:.2f}")
            ebar.update(1)
            if self.opts.save_every and state.epoch % self.opts.save_every == 0 and state.epoch < epochs:
                for r, run in enumerate(runs):
                    save_resume_state(run, state, r)

        try:
            with heartbeat:
                state = train_heads(data, lesson.targets, lesson.init, hyper, epochs, cfgs[0].train_batch,
                                    seeds, resume, on_epoch, fuse_shared_order=self.opts.fuse_shared_seeds,
                                    tuner=tuner)
            heartbeat.check()
        except NonFiniteLoss as exc:
            cfg = cfgs[exc.run]
            raise UserError(f"loss became NaN/inf at epoch {exc.epoch} of step {step} ({cfg.dataset}, "
                            f"lr={cfg.lr:g}, wd={cfg.wd:g}, eta={cfg.eta:g}, seed={cfg.seed}); "
                            "use a smaller --lr") from None
        finally:
            ebar.close()
        return state

    def _finish_run(self, run: Run, state: TrainState, r: int, setup: LabelSetup, facts: dict) -> dict:
        """Final checkpoints, then the record: the run is finished once the record exists."""
        if self.store.has(run.key) and not self.opts.overwrite:
            self.log(f"run {run.key} was finished by another process meanwhile; its record is kept")
            return self.store.get(run.key)
        hist = state.history[r]
        chosen = {"bytest": int(state.best_test.epoch[r]), "last": state.epoch,
                  "byval": int(state.best_val.epoch[r]) if state.best_val is not None else None}
        payload = record_payload(run.cfg, run.step, run.fid, hist, chosen, {
            "teacher_key": facts["teacher_key"], "realised_corruption": setup.realised,
            "teacher_top2_coverage": facts["teacher_top2_coverage"], "device": facts["device"],
            "threads": facts["threads"], "fused_batches": facts["fused_batches"],
            "torch_version": str(torch.__version__), "python": platform.python_version()},
            setup.superclasses)
        record = {**payload, **write_final_checkpoints(run, state, r, payload),
                  "trained_by": f"{HOST}:{os.getpid()}",
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  **{name: facts[name] for name in ("wall_time_s", "batch_runs", "resumed_from_epoch")}}
        self.counts["trained"] += 1
        return self._publish(run.folder, record)
