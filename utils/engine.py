"""The persistence layer: which runs this process trains, and everything about their files.

Many teacher -> student -> ... -> PLL chains advance at once, with any number of processes.
Configurations that share features, epochs, batch size and validation fraction are trained
together, step by step: all teachers (as batched computations), then all round-1 students, ...,
then all PLL students. A run's life (see DESIGN in the docs):
  - claimed: this process holds its lease (utils/leases.py); runs leased by a live process are
    left to it, and a student whose teacher is being trained elsewhere waits for it;
  - training: the science layer (utils/chain.py `lesson_for`, utils/train.py `train_heads`) is
    handed tensors and calls back once an epoch: heartbeat, progress, periodic resumable state
    (utils/checkpoints.py), never read as a teacher;
  - final checkpoints, the last of which carries the record;
  - finished: the record in the results store, written last. A process that finds final
    checkpoints without a record completes the record from them instead of retraining.
A teacher is handed over through its record and checkpoint (utils/checkpoints.py); the CPU thread
plan comes from utils/threads.py; a record's content is `utils.runs.record_payload`.
"""
import os
import platform
import time
from pathlib import Path
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Optional

import torch

from data.corruption import format_superclasses, superclass_groups
from data.features import FeatureSet, load_features_file
from models.extract import load_or_extract_features
from utils.chain import KEPT_SOFT_TARGETS, lesson_for
from utils.checkpoints import (RESUME_FILE, Run, read_resume_state, record_from_final_checkpoints,
                               save_resume_state, stack_resume_states, teacher_weights,
                               write_final_checkpoints)
from utils.cli import UserError, plural
from utils.io import HOST, remove_stale_temporaries
from utils.labels import Group, prepare_group, superclasses_of
from utils.leases import LEASE_NAME, Heartbeat, LeaseLost, read_holder, try_claim
from utils.memory import (BLOCK_BYTES, check_fits, machine_memory, resident_bytes, return_freed_blocks,
                          run_bytes, size_text)
from utils.progress import Progress, progress_mode
from utils.runs import Hyper, ResultsStore, record_payload
from utils.sanity import label_warnings, untrained_reason, untrained_warning
from utils.selection import RULES
from utils.settings import EngineOptions, FeatureSource
from utils.steps import SeedPurpose, step_of
from utils.threads import cpu_thread_plan
from utils.train import NonFiniteLoss, TrainData, TrainState, eval_rows, train_heads


def load_source(source: FeatureSource, opts: EngineOptions, log) -> FeatureSet:
    if source.features_path:
        _check_loadable(Path(source.features_path))
        return load_features_file(source.features_path, name=source.dataset)
    return load_or_extract_features(source.dataset, source.arch, source.pretrained, opts.data_root,
                                    opts.cache_root, opts.device, opts.test_batch, opts.workers, log,
                                    progress=progress_mode(opts.progress))




@dataclass
class _Job:
    """One batched computation: the claimed runs of one step that resume from one epoch, and the
    tensors the science layer is handed."""
    runs: list
    leases: list
    resumes: list                 # per run: (epoch, checkpoint) of its resumable state, or None
    data: TrainData
    hypers: list                  # per run: Hyper
    order_seeds: list             # per run: the seed of its mini-batch orders
    lesson: object                # utils.chain.Lesson
    resume: Optional[TrainState]
    teacher_keys: list
    threads: int
    tuner: object
    desc: str
    started: float


class _Watch:
    """While a batched computation trains: a heartbeat on its leases, an epoch bar, the runs'
    periodic resumable state (`on_epoch`, called back by the trainer). On leaving: a loss that is not
    finite is a one-line error naming the fix; a lease another process took over ends the
    computation without finishing its runs (`lost`)."""

    def __init__(self, runner: "ChainRunner", job: _Job):
        self.runner, self.job, self.lost = runner, job, False
        self.epochs = job.hypers[0].epochs
        start = job.resume.epoch if job.resume else 0
        self.bar = runner.progress.bar(self.epochs, job.desc, "ep", initial=start, leave=False)
        self.heartbeat = Heartbeat(job.leases, every=min(30.0, runner.opts.lease_timeout / 4))

    def on_epoch(self, state: TrainState) -> None:
        self.heartbeat.check()  # before a save: a run taken over by another process is theirs now
        last = state.history[0][-1]
        self.bar.set_postfix(loss=f"{last['train_loss']:.3f}", test=f"{last['test_acc']:.2f}")
        self.bar.update(1)
        save_every = self.runner.opts.save_every
        if save_every and state.epoch % save_every == 0 and state.epoch < self.epochs:
            for r, run in enumerate(self.job.runs):
                save_resume_state(run, state, r)

    def __enter__(self) -> "_Watch":
        self.heartbeat.__enter__()
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        self.heartbeat.__exit__(kind, exc, tb)
        self.bar.close()
        try:
            if kind is None:
                self.heartbeat.check()
        except LeaseLost as lost:
            kind, exc = LeaseLost, lost
        if kind is LeaseLost:
            self.runner.log(f"another process took over {exc} (its heartbeat looked stale); "
                            "leaving it that run")
            self.lost = True
            return True
        if kind is NonFiniteLoss:
            cfg, step = self.job.runs[exc.run].cfg, self.job.runs[0].step
            raise UserError(f"loss became NaN/inf at epoch {exc.epoch} of {step.title} ({cfg.dataset}, "
                            f"lr={cfg.lr:g}, wd={cfg.wd:g}, eta={cfg.eta:g}, seed={cfg.seed}); "
                            "use a smaller --lr") from None
        return False


def _check_loadable(path: Path) -> None:
    """Stop with one line when a features file cannot fit in this machine's memory once loaded."""
    try:
        size = path.stat().st_size
    except OSError:
        return  # loading it says what is wrong
    have = machine_memory(torch.device("cpu"))
    if have and resident_bytes() + size > have:
        raise UserError(f"features file {path} needs about {size_text(size)} of memory once loaded, more "
                        f"than the {size_text(have)} of this machine can hold beside this process: use fewer "
                        "rows (a smaller features file, e.g. float16 features) or a machine with more memory")


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class ChainRunner:
    def __init__(self, opts: EngineOptions, log=None):
        # log: messages always shown (warnings, superclasses); progress notes are dropped with progress "none"
        self.opts = opts
        self.progress = Progress(opts.progress, log)
        self.log = self.progress.log
        self.superclasses_shown = set()  # features fingerprints whose superclasses were printed
        self.labels_checked = set()  # features fingerprints whose labels were checked (label_warnings)
        self.store = ResultsStore(opts.results_root)
        self.done_here = set()  # keys trained by this process (so --overwrite retrains each once)
        # runs this process trained, found finished, and completed from final checkpoints
        self.counts = {"trained": 0, "found": 0, "completed": 0}
        return_freed_blocks()

    # ---- planning -------------------------------------------------------------------------
    def run(self, jobs, steps) -> list:
        """jobs: [(FeatureSource, RunConfig)]; steps: the chain's steps in order (Step or codes).
        Returns the records of every (job, step), trained now or found in the store."""
        steps = [step_of(s) for s in steps]
        groups = defaultdict(list)
        for source, cfg in jobs:
            groups[(source, cfg.epochs, cfg.train_batch, cfg.val_split, cfg.feature_norm)].append(cfg)
        remove_stale_temporaries(self.store.records_dir)
        self.store.check_names()
        records = []
        bar = None
        try:
            for (source, *_), configs in groups.items():
                features = load_source(source, self.opts, self.log)
                if bar is None:  # after the first load, so a bad features file prints only its error
                    mean_epochs = sum(cfg.epochs for _, cfg in jobs) / len(jobs)
                    bar = self.progress.runs(len(jobs) * len(steps), mean_epochs)
                configs = [replace(c, backbone=features.backbone, dataset=features.name) for c in configs]
                self._check_memory(features, configs, steps)
                fid = features.fingerprint()
                self._check_labels(features, fid)
                group = prepare_group(features, fid, configs, self.opts.device,
                                      self._superclasses(features, fid, configs))
                for step in steps:
                    records += self._finish_step(group, self._distinct_runs(group, configs, step, bar), bar)
        finally:
            if bar is not None:
                bar.close()
        return records

    def _check_memory(self, features: FeatureSet, configs, steps) -> None:
        """Stop with one line, before anything of the group's training is allocated, when its
        largest batched computation would not fit in this machine's (or GPU's) memory."""
        n, d, k = len(features.train_y), features.dim, features.num_classes
        soft = n * k if n * k <= KEPT_SOFT_TARGETS else 0  # floats a student keeps per run
        kept = max(0 if step.is_teacher else 4 * n if step.is_pll else soft for step in steps)
        per_run = run_bytes(n, d, k, max(c.train_batch for c in configs), kept)
        # --feature-norm: a float32 copy of the features and float64 temporaries
        normalized = 0 if configs[0].feature_norm == "none" else 12 * n * d
        on_gpu = self.opts.device.type == "cuda"
        loaded = features.train_x.nbytes + features.test_x.nbytes if on_gpu else resident_bytes()
        check_fits(self.opts.device, loaded + normalized + BLOCK_BYTES, per_run,
                   min(self.opts.max_batch_runs, len(configs)),
                   "the features" + (" on the GPU" if on_gpu else ", libraries and what is loaded"))

    def _check_labels(self, features: FeatureSet, fid: str) -> None:
        """Warnings about labels that are probably wrong, once per features."""
        if fid not in self.labels_checked:
            self.labels_checked.add(fid)
            lines = label_warnings(features.train_y, features.test_y, features.num_classes, features.name)
            for line in lines:
                self.log(line)

    def _superclasses(self, features: FeatureSet, fid: str, configs):
        """The superclass of every class (cc corruption; None without it), printed once per features."""
        superclass_of = superclasses_of(features, configs)
        if superclass_of is not None and fid not in self.superclasses_shown:
            self.superclasses_shown.add(fid)
            self.log(f"superclasses of {features.name} (cc): "
                     f"{format_superclasses(superclass_groups(superclass_of))}")
        return superclass_of

    def _distinct_runs(self, group: Group, configs, step, bar) -> list:
        """The runs of one step of the configurations: a teacher shared by several chains is one run."""
        runs, seen = [], set()
        for cfg in configs:
            run = Run.of(self.opts.checkpoint_root, cfg, step, group.fid)
            if run.key in seen:
                bar.update(1)
                continue
            seen.add(run.key)
            runs.append(run)
        return runs

    # ---- the runs of one step: found, claimed and trained, or waited for --------------------
    def _finish_step(self, group: Group, runs, bar) -> list:
        """Every run of one step finished: found finished, trained here (leased, at most
        max_batch_runs at a time, by the science layer), or trained by another process while this
        one waits."""
        done = {}
        chunks = self._claimed_chunks(runs, done, bar)
        try:
            for chunk in chunks:
                job = self._job(group, chunk)
                with _Watch(self, job) as watch:
                    state = train_heads(job.data, job.lesson.targets, job.lesson.init, job.hypers,
                                        job.order_seeds, job.resume, watch.on_epoch,
                                        fuse_shared_order=self.opts.fuse_shared_seeds, tuner=job.tuner)
                if not watch.lost:
                    done.update(self._finish_job(group, job, state, bar))
        finally:
            chunks.close()  # releases the leases, also when training was interrupted
        return [done[run.key] for run in runs]

    def _claimed_chunks(self, runs, done: dict, bar):
        """The chunks of `runs` to train here, each a list of (run, resume, lease) resuming from one
        epoch, leased by this process; the records of runs found finished go into `done`. Waits
        while other processes hold the unfinished runs; releases the leases once their chunks are
        trained (or this generator is closed)."""
        said = None
        while True:
            todo = [run for run in runs if run.key not in done and not self._found_finished(run, done, bar)]
            if not todo:
                return
            claimed, held = self._claim(todo)
            if not claimed:
                message = (f"{todo[0].step.title}: waiting for {plural(len(held), 'run')} that other "
                           f"processes are training ({', '.join(sorted(set(held))[:3])}"
                           f"{', ...' if len(set(held)) > 3 else ''})")
                if message != said:
                    self.progress.note(message)
                    said = message
                time.sleep(self.opts.poll_seconds)
                continue
            said = None
            try:
                by_resume = defaultdict(list)
                for run, lease in claimed:
                    if not self._found_finished(run, done, bar):  # finished while we claimed it
                        resume = None if self.opts.overwrite else read_resume_state(run, self.log)
                        by_resume[resume[0] if resume else 0].append((run, resume, lease))
                for _, items in sorted(by_resume.items()):
                    yield sorted(items, key=lambda item: item[0].cfg.seed)  # one seed's runs side by side
            finally:
                for _, lease in claimed:
                    lease.release()

    def _found_finished(self, run: Run, done: dict, bar) -> bool:
        """Whether the run is finished; if so its record goes into `done`."""
        record = self._finished_record(run)
        if record is not None:
            done[run.key] = record
            bar.update(1)
        return record is not None

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

    def _teacher_in_training(self, run: Run):
        """The holder of the lease on this run's teacher while another process trains it, else None."""
        if run.step.is_teacher:
            return None
        teacher = run.teacher(self.opts.checkpoint_root)
        if self.store.has(teacher.key):
            self._tidy_finished(teacher.folder)  # what a killed or damaged holder left beside it
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

    # ---- one batched computation: its tensors in, its runs' files out ------------------------
    def _job(self, group: Group, chunk) -> _Job:
        """The science layer's inputs for a chunk of claimed runs of one step: the tensors they
        train on, what they learn (each student's teacher read through its record), their
        hyper-parameters and seeds, the state they resume from, and the CPU thread plan."""
        runs = [run for run, _, _ in chunk]
        cfgs, step, features = [run.cfg for run in runs], runs[0].step, group.features
        data = group.train_data(cfgs)
        teachers, teacher_keys = None, [None] * len(runs)
        if not step.is_teacher:
            loaded = [teacher_weights(self.store, run.teacher(self.opts.checkpoint_root), run.cfg.selection)
                      for run in runs]
            teacher_keys = [key for _, key in loaded]
            teachers = torch.stack([w for w, _ in loaded]).to(self.opts.device).float()
        hypers = [Hyper.of(c) for c in cfgs]
        lesson = lesson_for(step, data, hypers, [c.seed for c in cfgs], teachers)
        resumes = [resume for _, resume, _ in chunk]
        resume = stack_resume_states([ck for _, ck in resumes], self.opts.device) if resumes[0] else None
        threads, tuner = cpu_thread_plan(self.opts.device, data.train_rows.shape[1], cfgs[0].train_batch,
                                         features.dim, features.num_classes, self.log, eval_rows(data))
        return _Job(runs, [lease for _, _, lease in chunk], resumes, data, hypers,
                    [step.seed(c.seed, SeedPurpose.ORDER) for c in cfgs],
                    lesson, resume, teacher_keys,
                    threads, tuner, f"{step.title}: {plural(len(runs), 'run')} of {features.name}",
                    time.time())

    def _finish_job(self, group: Group, job: _Job, state: TrainState, bar) -> dict:
        """{key: record} of the trained runs: final checkpoints, then each record."""
        facts = {"device": str(self.opts.device), "threads": job.threads,
                 "fused_batches": self.opts.fuse_shared_seeds, "num_classes": group.features.num_classes,
                 "wall_time_s": time.time() - job.started, "batch_runs": len(job.runs)}
        records = {}
        for r, run in enumerate(job.runs):
            facts.update(teacher_key=job.teacher_keys[r],
                         teacher_top2_coverage=(job.lesson.coverage or [None] * len(job.runs))[r],
                         resumed_from_epoch=job.resumes[r][0] if job.resumes[r] else 0)
            records[run.key] = self._finish_run(run, state, r, group.setup(run.cfg).realised,
                                                group.setup(run.cfg).superclasses, facts)
            bar.update(1)
        self.progress.chunk_done(job.desc, len(job.runs), time.time() - job.started, state.epoch,
                                 job.hypers[0].epochs, job.resume.epoch if job.resume else 0)
        trained = [records[run.key] for run in job.runs]
        warning = untrained_warning(trained, [r.get("not_trained") for r in trained], job.runs[0].step.title)
        if warning:
            self.log(warning)
        return records

    def _finish_run(self, run: Run, state: TrainState, r: int, realised: float, superclasses,
                    facts: dict) -> dict:
        """Final checkpoints, then the record: the run is finished once the record exists."""
        if self.store.has(run.key) and not self.opts.overwrite:
            self.log(f"run {run.key} was finished by another process meanwhile; its record is kept")
            return self.store.get(run.key)
        chosen = {rule.name: state.chosen(rule)[0][r] if rule.metric is None or rule.name in state.best
                  else None for rule in RULES}
        payload = record_payload(run.cfg, run.step, run.fid, state.history[r], chosen, {
            "teacher_key": facts["teacher_key"], "realised_corruption": realised,
            "teacher_top2_coverage": facts["teacher_top2_coverage"], "device": facts["device"],
            "threads": facts["threads"], "fused_batches": facts["fused_batches"],
            "torch_version": str(torch.__version__), "python": platform.python_version()},
            superclasses)
        teacher = self.store.get(facts["teacher_key"]) if facts["teacher_key"] else None
        reason = untrained_reason(payload, facts["num_classes"], teacher)
        if reason:  # the record says so too (and the copy in the last checkpoint)
            payload["not_trained"] = reason
        record = {**payload, **write_final_checkpoints(run, state, r, payload),
                  "trained_by": f"{HOST}:{os.getpid()}",
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  **{name: facts[name] for name in ("wall_time_s", "batch_runs", "resumed_from_epoch")}}
        self.counts["trained"] += 1
        return self._publish(run.folder, record)
