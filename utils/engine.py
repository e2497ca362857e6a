"""Advance many teacher -> student -> ... -> PLL chains at once, with any number of processes.

Configurations that share features, epochs, batch size and validation fraction are trained
together, step by step: all teachers (as batched computations), then all round-1 students, ...,
then all PLL students. A run's life (see DESIGN in the docs):
  - claimed: this process holds its lease (utils/leases.py); runs leased by a live process are
    left to it, and a student whose teacher is being trained elsewhere waits for it;
  - training: periodic resumable state in `resume.pt` (never read as a teacher);
  - final checkpoints `best.pt`, `best_val.pt`, then `last.pt`, which carries the record;
  - finished: the record in the results store, written last. A process that finds a `last.pt`
    without a record completes the record from it instead of retraining.
A student loads its teacher only through the teacher's record, which names each final
checkpoint's content hash.
"""
import json
import os
import platform
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from data.corruption import corrupt_labels, corruption_matrix_for, format_superclasses, superclass_groups, \
    superclasses_from_features
from data.features import FeatureSet, load_features_file, normalize_features
from data.splits import stratified_val_split
from models.backbones import backbone_tag
from models.extract import load_or_extract_features
from models.head import head_state_dict, init_head_weights
from utils.cli import UserError
from utils.io import (HOST, atomic_torch_save, atomic_write_bytes, atomic_write_text, load_torch_bytes, load_torch_file,
                      remove_stale_temporaries, torch_bytes)
from utils.leases import LEASE_NAME, Heartbeat, LeaseLost, read_holder, try_claim
from utils.losses import distillation_targets, pll_candidates
from utils.runs import (CHECKPOINT_OF_SELECTION, SCHEMA, ResultsStore, RunConfig, code_version, run_dir,
                        run_key, sha256_of, step_settings, teacher_step)
from utils.train import (Hyper, NonFiniteLoss, Snapshot, TrainData, Targets, TrainState, ThreadTuner,
                         batched_products_match_lone, evaluation_thread_invariant, head_logits,
                         products_thread_invariant, train_heads)

STEP_CODE_PLL = 1000
RESUME_FILE = "resume.pt"      # periodic state of a run in training; never a teacher
FINAL_FILES = {"best": "best.pt", "best_val": "best_val.pt", "last": "last.pt"}  # last.pt is written last


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
    checkpoint_root: str = "checkpoint"
    results_root: str = "results"
    data_root: str = "data_root"
    cache_root: str = "cache"
    device: torch.device = torch.device("cpu")
    workers: int = 4
    test_batch: int = 100
    max_batch_runs: int = 64     # most runs trained in one batched computation
    save_every: int = 25         # epochs between resumable `last` checkpoints (0: only at the end)
    overwrite: bool = False      # retrain runs whose record exists
    show_progress: bool = True   # False: as progress="none"
    # "auto": progress bars when stderr is a terminal, else one line per finished chunk of runs;
    # "bars", "lines", or "none" (no progress output; warnings and errors still appear)
    progress: str = "auto"
    lease_timeout: float = 600.0  # s without a heartbeat after which another process takes a run over
    poll_seconds: float = 5.0     # between looks at runs that other processes hold
    fuse_shared_seeds: bool = False  # opt-in wider matmuls for runs sharing batches (not bit-exact everywhere)
    command_hint: Callable[[str], str] = lambda step: f"the same command with --dist {step}"


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


def say(message) -> None:
    """print() that leaves progress bars intact: tqdm.write clears the bars, prints, redraws them."""
    tqdm.write(str(message))


def progress_mode(opts: EngineOptions) -> str:
    """'bars', 'lines' or 'none' (see EngineOptions.progress)."""
    if not opts.show_progress or opts.progress == "none":
        return "none"
    if opts.progress in ("bars", "lines"):
        return opts.progress
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):  # no stderr, or a closed one
        tty = False
    return "bars" if tty else "lines"


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
            log(f"this BLAS rounds products differently with {_DEFAULT_THREADS} threads (or batched): training "
                "on 1 thread, so every run gives the same numbers alone, batched or resumed")
    if not _FREE_THREADS[shape]:
        torch.set_num_threads(1)
        return 1, None
    eval_shape = (tuple(sorted(set(eval_rows))), dim, num_classes)
    if eval_shape not in _FREE_EVAL_THREADS:
        _FREE_EVAL_THREADS[eval_shape] = evaluation_thread_invariant(eval_shape[0], dim, num_classes, _DEFAULT_THREADS)
    torch.set_num_threads(_DEFAULT_THREADS)
    return _DEFAULT_THREADS, ThreadTuner(_DEFAULT_THREADS, tune_evaluation=_FREE_EVAL_THREADS[eval_shape])


def load_source(source: FeatureSource, opts: EngineOptions, log) -> FeatureSet:
    if source.features_path:
        return load_features_file(source.features_path, name=source.dataset)
    return load_or_extract_features(source.dataset, source.arch, source.pretrained, opts.data_root,
                                    opts.cache_root, opts.device, opts.test_batch, opts.workers, log,
                                    progress=progress_mode(opts))


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


def _seed_for(seed: int, step: str, purpose: int) -> int:
    code = STEP_CODE_PLL if step == "p" else int(step)
    return int(np.random.SeedSequence([seed, code, purpose]).generate_state(1)[0])


def _checkpoint(kind, cfg, step, fid, key, epoch, weight, momentum, lr, acc, best_acc, extra=None):
    out = {"schema": SCHEMA, "kind": kind, "key": key, "step": step, "seed": cfg.seed, "features": fid,
           "settings": step_settings(cfg, step, fid), "epoch": int(epoch),
           "model": head_state_dict(weight), "optimizer": {"momentum_buffer": momentum.detach().cpu().clone(),
                                                           "lr": float(lr)},
           "acc": float(acc), "best_acc": float(best_acc)}
    out.update(extra or {})
    return out


def load_checkpoint(path, key: str, fix: str) -> dict:
    ckpt = load_torch_file(path, "checkpoint", fix)
    if not isinstance(ckpt, dict) or ckpt.get("schema") != SCHEMA or ckpt.get("key") != key:
        raise UserError(f"checkpoint {path} does not belong to this run (different settings or an older format). {fix}")
    return ckpt


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class ChainRunner:
    def __init__(self, opts: EngineOptions, log=None):
        # log: messages always shown (warnings, superclasses); progress: dropped with progress "none"
        self.opts, self.log = opts, log or say
        self.mode = progress_mode(opts)
        self.superclasses_shown = set()  # features fingerprints whose superclasses were printed
        self.store = ResultsStore(opts.results_root)
        self.done_here = set()  # keys trained by this process (so --overwrite retrains each once)
        # runs this process trained, found finished, and completed from final checkpoints
        self.counts = {"trained": 0, "found": 0, "completed": 0}

    # ---- planning -------------------------------------------------------------------------
    def run(self, jobs, steps) -> list:
        """jobs: [(FeatureSource, RunConfig)]; steps: ['0', '1', ..., 'p'] in order.
        Returns the records of every (job, step), trained now or found in the store."""
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
                    bar = tqdm(total=len(jobs) * len(steps), desc="runs", unit="run",
                               disable=self.mode != "bars", dynamic_ncols=True)
                records += self._run_group(features, configs, steps, bar)
        finally:
            if bar is not None:
                bar.close()
        return records

    def progress(self, message) -> None:
        """A progress message (e.g. waiting for other processes): not shown with progress 'none'."""
        if self.mode != "none":
            self.log(message)

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

    def _run_group(self, features, configs, steps, bar):
        fid = features.fingerprint()
        configs = [replace(c, backbone=features.backbone, dataset=features.name) for c in configs]
        for cfg in configs:
            if cfg.val_split > 0 and round(cfg.val_split * len(features.train_y)) < features.num_classes:
                raise UserError(f"--val-split {cfg.val_split} leaves fewer validation samples than the "
                                f"{features.num_classes} classes of {features.name}; use a larger fraction")
        device = self.opts.device
        # the probe sees the --feature-norm transform; run keys (fid) and the corruption (cc
        # superclasses) depend on the stored features only
        probed = normalize_features(features, configs[0].feature_norm)
        feats_dev = probed.train_x.to(device)
        test_dev = (probed.test_x.to(device), probed.test_y.to(device))
        transitions, setups = {}, {}
        superclass_of, groups = self._superclasses(features, fid, configs)
        for cfg in configs:
            if (cfg.ctype, cfg.eta) not in transitions:
                transitions[cfg.ctype, cfg.eta] = corruption_matrix_for(cfg.ctype, cfg.eta, features.train_x,
                                                                       features.train_y, features.num_classes,
                                                                       superclass_of)
            label_key = (cfg.ctype, cfg.eta, cfg.seed, cfg.val_split, cfg.val_clean)
            if label_key not in setups:
                setups[label_key] = make_label_setup(features, transitions[cfg.ctype, cfg.eta], cfg, groups)
        setup_of = lambda c: setups[(c.ctype, c.eta, c.seed, c.val_split, c.val_clean)]  # noqa: E731
        records = []
        for step in steps:
            runs, seen = [], set()
            for cfg in configs:
                key = run_key(cfg, step, fid)
                if key in seen:
                    bar.update(1)  # a teacher shared by several chains is one run
                    continue
                seen.add(key)
                runs.append((cfg, key))
            train = lambda chunk: self._train_chunk(features, fid, feats_dev, test_dev, chunk, step,  # noqa: E731
                                                    setup_of, bar)
            records += self._run_step(runs, step, fid, train, bar)
        return records

    def _run_step(self, runs, step, fid, train, bar) -> list:
        """Every run of one step finished: found finished, trained here (a lease and at most
        max_batch_runs runs at a time), or trained by another process while this one waits."""
        done, said = {}, None
        while True:
            todo = []
            for cfg, key in runs:
                if key in done:
                    continue
                record = self._finished_record(cfg, step, fid, key)
                if record is not None:
                    done[key] = record
                    bar.update(1)
                else:
                    todo.append((cfg, key))
            if not todo:
                return [done[key] for _, key in runs]
            claimed, held = [], []
            for cfg, key in todo:
                if len(claimed) == self.opts.max_batch_runs:
                    break
                holder = self._teacher_in_training(cfg, step, fid)
                if holder is None:
                    folder = run_dir(self.opts.checkpoint_root, cfg, step, fid)
                    remove_stale_temporaries(folder)
                    lease, holder = try_claim(folder, self.opts.lease_timeout)
                    if lease is not None:
                        claimed.append((cfg, key, lease))
                        continue
                held.append(holder.describe())
            if claimed:
                self._train_claimed(claimed, step, fid, train, done, bar)
                said = None
                continue
            message = (f"step {step}: waiting for {len(held)} run(s) that other processes are training "
                       f"({', '.join(sorted(set(held))[:3])}{', ...' if len(set(held)) > 3 else ''})")
            if message != said:
                self.progress(message)
                said = message
            time.sleep(self.opts.poll_seconds)

    def _train_claimed(self, claimed, step, fid, train, done, bar) -> None:
        """Train the runs whose leases this process holds, grouped by the epoch they resume from."""
        try:
            by_resume = defaultdict(list)
            for cfg, key, lease in claimed:
                record = self._finished_record(cfg, step, fid, key)  # finished while we claimed it
                if record is not None:
                    done[key] = record
                    bar.update(1)
                    continue
                resume = self._resume_point(cfg, step, fid)
                by_resume[resume[0] if resume else 0].append((cfg, resume, lease))
            for _, items in sorted(by_resume.items()):
                items.sort(key=lambda item: item[0].seed)  # runs of one seed side by side (--fuse-shared-seeds)
                try:
                    for record in train(items):
                        done[record["key"]] = record
                except LeaseLost as exc:
                    self.log(f"another process took over {exc} (its heartbeat looked stale); leaving it that run")
        finally:
            for _, _, lease in claimed:
                lease.release()

    def _teacher_in_training(self, cfg, step, fid):
        """The holder of the lease on this run's teacher while another process trains it, else None."""
        if step == "0":
            return None
        t_step = teacher_step(step)
        if self.store.has(run_key(cfg, t_step, fid)):
            return None
        holder = read_holder(run_dir(self.opts.checkpoint_root, cfg, t_step, fid) / LEASE_NAME)
        if holder is None or holder.is_dead(self.opts.lease_timeout, time.time()):
            return None  # nobody trains it: loading it fails with a message naming the fix
        return holder

    # ---- finished runs ----------------------------------------------------------------------
    def _finished_record(self, cfg, step, fid, key):
        """The run's record if it is finished (completing it from `last.pt` if needed), else None."""
        if self.opts.overwrite and key not in self.done_here:
            return None
        if self.store.has(key):
            self.counts["found"] += 1
            record = self.store.get(key)
            self._tidy_finished(run_dir(self.opts.checkpoint_root, cfg, step, fid))
            return record
        record = self._complete_from_final(run_dir(self.opts.checkpoint_root, cfg, step, fid), key)
        if record is not None:
            self.counts["completed"] += 1
        return record

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

    def _complete_from_final(self, folder, key):
        """Write the record of a run whose final checkpoints exist (a process was stopped between
        them and the record); None when they are absent or do not match each other."""
        try:
            data = (folder / FINAL_FILES["last"]).read_bytes()
            last = load_torch_bytes(data)
        except Exception:  # absent, torn by a foreign writer or not ours: the run is not finished
            return None
        payload = last.get("record") if isinstance(last, dict) and last.get("key") == key else None
        if not isinstance(payload, dict):
            return None
        files = dict(payload.get("final_checkpoints") or {})
        for entry in files.values():
            try:
                if sha256_of((folder / entry["file"]).read_bytes()) != entry["sha256"]:
                    return None
            except OSError:
                return None
        files["last"] = {"file": FINAL_FILES["last"], "sha256": sha256_of(data)}
        record = {**payload, "checkpoints": files, "completed_from_checkpoints": True,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        return self._publish(folder, record)

    def _publish(self, folder, record) -> dict:
        """Write the record (the run is finished from now on) and drop the resumable state."""
        self.store.put(record)
        _unlink(folder / RESUME_FILE)
        self.done_here.add(record["key"])
        return record

    def _resume_point(self, cfg, step, fid):
        """(epoch, checkpoint) of an interrupted run's periodic state, if any."""
        path = run_dir(self.opts.checkpoint_root, cfg, step, fid) / RESUME_FILE
        if self.opts.overwrite or not path.is_file():
            return None
        try:
            ckpt = load_checkpoint(path, run_key(cfg, step, fid), "")
        except UserError:
            self.log(f"ignoring unreadable resumable state {path}; the run restarts")
            return None
        if "resume" not in ckpt or not 0 < ckpt["epoch"] < cfg.epochs:
            return None
        return ckpt["epoch"], ckpt

    # ---- one batched computation ----------------------------------------------------------
    def _teacher_weights(self, cfg, step, fid):
        """The teacher's selected checkpoint, read through the teacher's record and checked
        against the content hash the record names."""
        t_step = teacher_step(step)
        t_key = run_key(cfg, t_step, fid)
        kind = CHECKPOINT_OF_SELECTION[cfg.selection]
        what = "the teacher (round 0)" if t_step == "0" else f"round {t_step}"
        retrain = f"Retrain {what}: {self.opts.command_hint(t_step)} --overwrite"
        if not self.store.has(t_key):
            raise UserError(f"{what} of this configuration and seed has no result record "
                            f"({self.store.path(t_key)}). Train it first: {self.opts.command_hint(t_step)}")
        record = self.store.get(t_key)
        entry = (record.get("checkpoints") or {}).get(kind)
        path = run_dir(self.opts.checkpoint_root, cfg, t_step, fid) / FINAL_FILES[kind]
        if entry is None:
            raise UserError(f"the record {self.store.path(t_key)} of {what} names no {kind} checkpoint "
                            f"(written by an older version of this tool). {retrain}")
        try:
            data = path.read_bytes()
        except OSError:
            raise UserError(f"{kind} checkpoint of {what} not found: {path}. {retrain}") from None
        if sha256_of(data) != entry["sha256"]:
            raise UserError(f"checkpoint {path} is not the one the record {self.store.path(t_key)} of {what} "
                            f"names (content hash differs: it changed after the run finished). {retrain}")
        ckpt = load_torch_bytes(data)
        return ckpt["model"]["weight"], t_key

    def _train_chunk(self, features, fid, feats_dev, test_dev, chunk, step, setup_of, bar):
        device, k = self.opts.device, features.num_classes
        cfgs = [cfg for cfg, _, _ in chunk]
        leases = [lease for _, _, lease in chunk]
        setups = [setup_of(c) for c in cfgs]
        stack = lambda xs: torch.stack(xs).to(device)  # noqa: E731
        has_val = setups[0].val_rows is not None
        data = TrainData(feats_dev, stack([s.train_rows for s in setups]), stack([s.noisy for s in setups]),
                         stack([s.true for s in setups]), *test_dev,
                         stack([s.val_rows for s in setups]) if has_val else None,
                         stack([s.val_labels for s in setups]) if has_val else None, k)
        teacher_keys = [None] * len(cfgs)
        coverage = [None] * len(cfgs)
        if step == "0":
            targets = Targets("hard", data.noisy_labels, smoothing=self._vec(cfgs, "label_smoothing"))
            init = torch.stack([init_head_weights(k, features.dim, torch.Generator().manual_seed(_seed_for(c.seed, step, 0)))
                                for c in cfgs])
        else:
            loaded = [self._teacher_weights(c, step, fid) for c in cfgs]
            teacher_keys = [key for _, key in loaded]
            teacher_w = stack([w for w, _ in loaded]).float()
            # each run's logits on all rows, then its training rows: no (R, N, d) copy of the features
            teacher_logits = head_logits(feats_dev, teacher_w)
            teacher_logits = teacher_logits.gather(1, data.train_rows.unsqueeze(-1).expand(-1, -1, k))
            top2 = pll_candidates(teacher_logits)
            coverage = ((top2 == data.true_labels.unsqueeze(-1)).any(-1).double().mean(-1) * 100).tolist()
            if step == "p":
                targets, init = Targets("partial", top2), teacher_w
            else:
                temperature = self._vec(cfgs, "temperature")
                targets = Targets("soft", distillation_targets(teacher_logits, temperature), temperature=temperature)
                init = torch.stack([init_head_weights(k, features.dim, torch.Generator().manual_seed(_seed_for(c.seed, step, 0)))
                                    for c in cfgs])
            del teacher_logits
        hyper = Hyper(*(self._vec(cfgs, name) for name in ("lr", "wd", "momentum", "gamma")))
        seeds = [_seed_for(c.seed, step, 1) for c in cfgs]
        keys = [run_key(c, step, fid) for c in cfgs]
        resumes = [resume for _, resume, _ in chunk]
        resume = self._stack_resume([ck for _, ck in resumes], device) if resumes[0] else None
        epochs, batch = cfgs[0].epochs, cfgs[0].train_batch
        num_train = data.train_rows.shape[1]
        eval_rows = [len(features.test_y)] + ([data.val_rows.shape[1]] if has_val else [])
        threads, tuner = cpu_thread_plan(device, [min(batch, num_train), num_train % batch or batch], features.dim, k,
                                         self.log, eval_rows)
        desc = f"step {step}: {len(cfgs)} run{'s' if len(cfgs) > 1 else ''} of {features.name}"
        ebar = tqdm(total=epochs, initial=resume.epoch if resume else 0, desc=desc, unit="ep", leave=False,
                    disable=self.mode != "bars", dynamic_ncols=True)
        started = time.time()
        heartbeat = Heartbeat(leases, every=min(30.0, self.opts.lease_timeout / 4))

        def on_epoch(state: TrainState):
            heartbeat.check()  # before a save: a run taken over by another process is theirs now
            last = state.history[0][-1]
            ebar.set_postfix(loss=f"{last['train_loss']:.3f}", test=f"{last['test_acc']:.2f}")
            ebar.update(1)
            if self.opts.save_every and state.epoch % self.opts.save_every == 0 and state.epoch < epochs:
                self._save_partial(cfgs, step, fid, keys, state)

        try:
            with heartbeat:
                state = train_heads(data, targets, init, hyper, epochs, batch, seeds, resume, on_epoch,
                                    fuse_shared_order=self.opts.fuse_shared_seeds, tuner=tuner)
            heartbeat.check()
        except NonFiniteLoss as exc:
            cfg = cfgs[exc.run]
            raise UserError(f"loss became NaN/inf at epoch {exc.epoch} of step {step} ({cfg.dataset}, lr={cfg.lr:g}, "
                            f"wd={cfg.wd:g}, eta={cfg.eta:g}, seed={cfg.seed}); use a smaller --lr") from None
        finally:
            ebar.close()
        run_facts = {"wall_time_s": time.time() - started, "batch_runs": len(cfgs), "threads": threads,
                     "fused_batches": self.opts.fuse_shared_seeds}
        records = []
        for r, cfg in enumerate(cfgs):
            run_facts["resumed_from_epoch"] = resumes[r][0] if resumes[r] else 0
            records.append(self._finish_run(cfg, step, fid, keys[r], r, state, setups[r], teacher_keys[r],
                                            coverage[r], run_facts))
            bar.update(1)
        if self.mode == "lines":  # off a terminal: one line per finished chunk instead of bars
            resumed = f", resumed from epoch {resume.epoch}" if resume else ""
            self.log(f"{desc} trained in {time.time() - started:.1f} s (epoch {state.epoch}/{epochs}{resumed})")
        return records

    @staticmethod
    def _vec(cfgs, name):
        return torch.tensor([float(getattr(c, name)) for c in cfgs], dtype=torch.float32)

    def _stack_resume(self, ckpts, device) -> TrainState:
        def snap(name):
            parts = [c["resume"][name] for c in ckpts]
            if parts[0] is None:
                return None
            return Snapshot(torch.tensor([p["acc"] for p in parts], device=device),
                            torch.tensor([p["epoch"] for p in parts], device=device),
                            torch.stack([p["weight"] for p in parts]).to(device),
                            torch.stack([p["momentum"] for p in parts]).to(device))
        return TrainState(ckpts[0]["epoch"], torch.stack([c["model"]["weight"] for c in ckpts]).to(device),
                          torch.stack([c["optimizer"]["momentum_buffer"] for c in ckpts]).to(device),
                          snap("best_test"), snap("best_val"), [list(c["resume"]["history"]) for c in ckpts])

    def _save_partial(self, cfgs, step, fid, keys, state):
        for r, cfg in enumerate(cfgs):
            snap = lambda s: None if s is None else {  # noqa: E731
                "acc": float(s.acc[r]), "epoch": int(s.epoch[r]), "weight": s.weight[r].cpu().clone(),
                "momentum": s.momentum[r].cpu().clone()}
            hist = state.history[r]
            ckpt = _checkpoint("resume", cfg, step, fid, keys[r], state.epoch, state.weight[r], state.momentum[r],
                               hist[-1]["lr"], hist[-1]["test_acc"], float(state.best_test.acc[r]),
                               {"resume": {"best_test": snap(state.best_test), "best_val": snap(state.best_val),
                                           "history": hist}})
            atomic_torch_save(run_dir(self.opts.checkpoint_root, cfg, step, fid) / RESUME_FILE, ckpt)

    def _finish_run(self, cfg, step, fid, key, r, state, setup, teacher_key, coverage, run_facts):
        """Final checkpoints, then the record: the run is finished once the record exists."""
        folder = run_dir(self.opts.checkpoint_root, cfg, step, fid)
        if self.store.has(key) and not self.opts.overwrite:
            self.log(f"run {key} was finished by another process meanwhile; its record is kept")
            return self.store.get(key)
        hist = state.history[r]
        best_test_acc = float(state.best_test.acc[r])
        atomic_write_text(folder / "log.jsonl", "".join(json.dumps(h) + "\n" for h in hist))
        written = {}
        for kind, snap in {"best": state.best_test, "best_val": state.best_val}.items():
            if snap is None:
                continue
            e = int(snap.epoch[r])
            data = torch_bytes(_checkpoint(kind, cfg, step, fid, key, e, snap.weight[r], snap.momentum[r],
                                            hist[e - 1]["lr"], hist[e - 1]["test_acc"], best_test_acc))
            atomic_write_bytes(folder / FINAL_FILES[kind], data)
            written[kind] = {"file": FINAL_FILES[kind], "sha256": sha256_of(data)}
        payload = self._record_payload(cfg, step, fid, key, hist, state, r, setup, teacher_key, coverage,
                                       run_facts["threads"], run_facts["fused_batches"])
        payload["final_checkpoints"] = written
        data = torch_bytes(_checkpoint("last", cfg, step, fid, key, state.epoch, state.weight[r], state.momentum[r],
                                        hist[-1]["lr"], hist[-1]["test_acc"], best_test_acc, {"record": payload}))
        atomic_write_bytes(folder / FINAL_FILES["last"], data)
        checkpoints = {**written, "last": {"file": FINAL_FILES["last"], "sha256": sha256_of(data)}}
        record = {**payload, "checkpoints": checkpoints, "trained_by": f"{HOST}:{os.getpid()}",
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  **{name: run_facts[name] for name in ("wall_time_s", "batch_runs", "resumed_from_epoch")}}
        self.counts["trained"] += 1
        return self._publish(folder, record)

    def _record_payload(self, cfg, step, fid, key, hist, state, r, setup, teacher_key, coverage, threads, fused):
        """A finished run's numbers and provenance: everything in its record that does not depend on
        which process trained it, or when."""
        record = {
            "key": key, **step_settings(cfg, step, fid), "teacher_key": teacher_key,
            "realised_corruption": setup.realised, "teacher_top2_coverage": coverage,
            "best_train_acc": max(h["train_acc"] for h in hist),
            "best_train_acc_true": max(h["train_acc_true"] for h in hist),
            "device": str(self.opts.device), "threads": threads, "fused_batches": fused,
            "torch_version": str(torch.__version__), "python": platform.python_version(), "code_version": code_version(),
        }
        chosen = {"bytest": int(state.best_test.epoch[r]), "last": state.epoch,
                  "byval": int(state.best_val.epoch[r]) if state.best_val is not None else None}
        for suffix, epoch in chosen.items():
            row = hist[epoch - 1] if epoch else {}
            record[f"epoch_{suffix}"] = epoch
            for name in ("test_acc", "test_top2", "test_confidence", "test_entropy"):
                record[f"{name}_{suffix}"] = row.get(name)
        record["val_acc_byval"] = hist[chosen["byval"] - 1]["val_acc"] if chosen["byval"] else None
        if setup.superclasses is not None:  # cc corruption: the superclasses labels moved within
            record["superclasses"] = setup.superclasses
        return record
