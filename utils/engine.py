"""Advance many teacher -> student -> ... -> PLL chains at once.

Configurations that share features, epochs, batch size and validation fraction are trained
together, step by step: all teachers (as one batched computation), then all round-1 students,
..., then all PLL students. A run whose record exists is skipped; a run interrupted mid-way
resumes from its periodic `last` checkpoint. Steps run strictly in order, each student from the
exact checkpoint of its own teacher run.
"""
import json
import platform
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from data.corruption import corrupt_labels, corruption_matrix_for
from data.features import FeatureSet, load_features_file
from data.splits import stratified_val_split
from models.backbones import backbone_tag
from models.extract import load_or_extract_features
from models.head import head_state_dict, init_head_weights
from utils.cli import UserError
from utils.io import atomic_torch_save, atomic_write_text, load_torch_file
from utils.losses import distillation_targets, pll_candidates
from utils.runs import (CHECKPOINT_OF_SELECTION, SCHEMA, ResultsStore, RunConfig, code_version, run_dir,
                        run_key, step_settings, teacher_step)
from utils.train import Hyper, NonFiniteLoss, Snapshot, TrainData, Targets, TrainState, head_logits, train_heads

STEP_CODE_PLL = 1000


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
    show_progress: bool = True
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


# Below this many multiply-adds per step, extra CPU threads cost more in synchronisation than they
# save (and collapse when another process holds the cores): one thread is faster.
SMALL_STEP_MACS = 4_000_000
_DEFAULT_THREADS = torch.get_num_threads()


def set_cpu_threads(device: torch.device, macs_per_step: int) -> None:
    if device.type == "cpu":
        torch.set_num_threads(1 if macs_per_step < SMALL_STEP_MACS else _DEFAULT_THREADS)


def load_source(source: FeatureSource, opts: EngineOptions, log) -> FeatureSet:
    if source.features_path:
        return load_features_file(source.features_path, name=source.dataset)
    return load_or_extract_features(source.dataset, source.arch, source.pretrained, opts.data_root,
                                    opts.cache_root, opts.device, opts.test_batch, opts.workers, log)


def make_label_setup(features: FeatureSet, transition, cfg: RunConfig) -> LabelSetup:
    noisy_all = corrupt_labels(features.train_y, transition, cfg.seed)
    rows = np.arange(len(features.train_y))
    val_rows = val_labels = None
    if cfg.val_split > 0:
        rows, val = stratified_val_split(features.train_y.numpy(), cfg.val_split, cfg.seed)
        val_rows = torch.from_numpy(val)
        val_labels = (features.train_y if cfg.val_clean else noisy_all)[val_rows]
    rows = torch.from_numpy(rows)
    true, noisy = features.train_y[rows], noisy_all[rows]
    return LabelSetup(rows, noisy, true, val_rows, val_labels, float((noisy != true).double().mean()) * 100)


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


class ChainRunner:
    def __init__(self, opts: EngineOptions, log=print):
        self.opts, self.log = opts, log
        self.store = ResultsStore(opts.results_root)
        self.done_here = set()  # keys trained by this process (so --overwrite retrains each once)

    # ---- planning -------------------------------------------------------------------------
    def run(self, jobs, steps) -> list:
        """jobs: [(FeatureSource, RunConfig)]; steps: ['0', '1', ..., 'p'] in order.
        Returns the records of every (job, step), trained now or found in the store."""
        groups = defaultdict(list)
        for source, cfg in jobs:
            groups[(source, cfg.epochs, cfg.train_batch, cfg.val_split)].append(cfg)
        records = []
        bar = None
        try:
            for (source, *_), configs in groups.items():
                features = load_source(source, self.opts, self.log)
                if bar is None:  # after the first load, so a bad features file prints only its error
                    bar = tqdm(total=len(jobs) * len(steps), desc="runs", unit="run",
                               disable=not self.opts.show_progress, dynamic_ncols=True)
                records += self._run_group(features, configs, steps, bar)
        finally:
            if bar is not None:
                bar.close()
        return records

    def _run_group(self, features, configs, steps, bar):
        fid = features.fingerprint()
        configs = [replace(c, backbone=features.backbone, dataset=features.name) for c in configs]
        for cfg in configs:
            if cfg.val_split > 0 and round(cfg.val_split * len(features.train_y)) < features.num_classes:
                raise UserError(f"--val-split {cfg.val_split} leaves fewer validation samples than the "
                                f"{features.num_classes} classes of {features.name}; use a larger fraction")
        device = self.opts.device
        feats_dev = features.train_x.to(device)
        test_dev = (features.test_x.to(device), features.test_y.to(device))
        transitions, setups = {}, {}
        for cfg in configs:
            if (cfg.ctype, cfg.eta) not in transitions:
                transitions[cfg.ctype, cfg.eta] = corruption_matrix_for(cfg.ctype, cfg.eta, features.train_x,
                                                                       features.train_y, features.num_classes)
            label_key = (cfg.ctype, cfg.eta, cfg.seed, cfg.val_split, cfg.val_clean)
            if label_key not in setups:
                setups[label_key] = make_label_setup(features, transitions[cfg.ctype, cfg.eta], cfg)
        setup_of = lambda c: setups[(c.ctype, c.eta, c.seed, c.val_split, c.val_clean)]  # noqa: E731
        records = []
        for step in steps:
            todo, seen = [], set()
            for cfg in configs:
                key = run_key(cfg, step, fid)
                if key in seen:
                    bar.update(1)
                    continue
                seen.add(key)
                if self.store.has(key) and (not self.opts.overwrite or key in self.done_here):
                    records.append(self.store.get(key))
                    bar.update(1)
                else:
                    todo.append(cfg)
            by_resume = defaultdict(list)
            for cfg in todo:
                resume = self._resume_point(cfg, step, fid)
                by_resume[resume[0] if resume else 0].append((cfg, resume))
            for _, items in sorted(by_resume.items()):
                # runs of one seed share their shuffling order: contiguous, they train as one matmul
                items.sort(key=lambda item: item[0].seed)
                for start in range(0, len(items), self.opts.max_batch_runs):
                    chunk = items[start:start + self.opts.max_batch_runs]
                    records += self._train_chunk(features, fid, feats_dev, test_dev, chunk, step, setup_of, bar)
        return records

    def _resume_point(self, cfg, step, fid):
        """(epoch, checkpoint) of an interrupted run's periodic `last` checkpoint, if any."""
        if self.opts.overwrite:
            return None
        path = run_dir(self.opts.checkpoint_root, cfg, step, fid) / "last.pt"
        if not path.is_file():
            return None
        try:
            ckpt = load_checkpoint(path, run_key(cfg, step, fid), "")
        except UserError:
            self.log(f"ignoring unreadable partial checkpoint {path}; the run restarts")
            return None
        if "resume" not in ckpt or not 0 < ckpt["epoch"] < cfg.epochs:
            return None
        return ckpt["epoch"], ckpt

    # ---- one batched computation ----------------------------------------------------------
    def _teacher_weights(self, cfg, step, fid):
        t_step = teacher_step(step)
        kind = CHECKPOINT_OF_SELECTION[cfg.selection]
        path = run_dir(self.opts.checkpoint_root, cfg, t_step, fid) / f"{kind}.pt"
        what = "the teacher (round 0)" if t_step == "0" else f"round {t_step}"
        if not path.is_file():
            fix = f"Train {what} of this configuration and seed first: {self.opts.command_hint(t_step)}"
            raise UserError(f"no {kind} checkpoint of {what} at {path}. {fix}")
        # its record exists, so only --overwrite makes the same command train it again
        fix = f"Retrain {what}: {self.opts.command_hint(t_step)} --overwrite"
        return load_checkpoint(path, run_key(cfg, t_step, fid), fix)["model"]["weight"], run_key(cfg, t_step, fid)

    def _train_chunk(self, features, fid, feats_dev, test_dev, chunk, step, setup_of, bar):
        device, k = self.opts.device, features.num_classes
        cfgs = [cfg for cfg, _ in chunk]
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
            # all rows in one matmul, then each run's rows: no (R, N, d) copy of the features
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
        resume = self._stack_resume([ck for _, (_, ck) in chunk], device) if chunk[0][1] else None
        epochs = cfgs[0].epochs
        set_cpu_threads(device, len(cfgs) * cfgs[0].train_batch * features.dim * k)
        desc = f"step {step}: {len(cfgs)} run{'s' if len(cfgs) > 1 else ''} of {features.name}"
        ebar = tqdm(total=epochs, initial=resume.epoch if resume else 0, desc=desc, unit="ep", leave=False,
                    disable=not self.opts.show_progress, dynamic_ncols=True)
        started = time.time()

        def on_epoch(state: TrainState):
            last = state.history[0][-1]
            ebar.set_postfix(loss=f"{last['train_loss']:.3f}", test=f"{last['test_acc']:.2f}")
            ebar.update(1)
            if self.opts.save_every and state.epoch % self.opts.save_every == 0 and state.epoch < epochs:
                self._save_partial(cfgs, step, fid, keys, state)

        try:
            state = train_heads(data, targets, init, hyper, epochs, cfgs[0].train_batch, seeds, resume, on_epoch)
        except NonFiniteLoss as exc:
            cfg = cfgs[exc.run]
            raise UserError(f"loss became NaN/inf at epoch {exc.epoch} of step {step} ({cfg.dataset}, lr={cfg.lr:g}, "
                            f"wd={cfg.wd:g}, eta={cfg.eta:g}, seed={cfg.seed}); use a smaller --lr") from None
        finally:
            ebar.close()
        wall = time.time() - started
        records = []
        for r, cfg in enumerate(cfgs):
            records.append(self._finish_run(cfg, step, fid, keys[r], r, state, setups[r], teacher_keys[r],
                                            coverage[r], wall, len(cfgs)))
            bar.update(1)
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
            ckpt = _checkpoint("last", cfg, step, fid, keys[r], state.epoch, state.weight[r], state.momentum[r],
                               hist[-1]["lr"], hist[-1]["test_acc"], float(state.best_test.acc[r]),
                               {"resume": {"best_test": snap(state.best_test), "best_val": snap(state.best_val),
                                           "history": hist}})
            atomic_torch_save(run_dir(self.opts.checkpoint_root, cfg, step, fid) / "last.pt", ckpt)

    def _finish_run(self, cfg, step, fid, key, r, state, setup, teacher_key, coverage, wall, batch_runs):
        folder = run_dir(self.opts.checkpoint_root, cfg, step, fid)
        hist = state.history[r]
        best_test_acc = float(state.best_test.acc[r])
        snaps = {"best": state.best_test, "best_val": state.best_val}
        for kind, snap in snaps.items():
            if snap is None:
                continue
            e = int(snap.epoch[r])
            atomic_torch_save(folder / f"{kind}.pt", _checkpoint(
                kind, cfg, step, fid, key, e, snap.weight[r], snap.momentum[r], hist[e - 1]["lr"],
                hist[e - 1]["test_acc"], best_test_acc))
        atomic_torch_save(folder / "last.pt", _checkpoint(
            "last", cfg, step, fid, key, state.epoch, state.weight[r], state.momentum[r], hist[-1]["lr"],
            hist[-1]["test_acc"], best_test_acc))
        atomic_write_text(folder / "log.jsonl", "".join(json.dumps(h) + "\n" for h in hist))
        record = {
            "key": key, **step_settings(cfg, step, fid), "teacher_key": teacher_key,
            "realised_corruption": setup.realised, "teacher_top2_coverage": coverage,
            "best_train_acc": max(h["train_acc"] for h in hist),
            "best_train_acc_true": max(h["train_acc_true"] for h in hist),
            "wall_time_s": wall, "batch_runs": batch_runs, "device": str(self.opts.device),
            "torch_version": torch.__version__, "python": platform.python_version(),
            "code_version": code_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        chosen = {"bytest": int(state.best_test.epoch[r]), "last": state.epoch,
                  "byval": int(state.best_val.epoch[r]) if state.best_val is not None else None}
        for suffix, epoch in chosen.items():
            row = hist[epoch - 1] if epoch else {}
            record[f"epoch_{suffix}"] = epoch
            for name in ("test_acc", "test_top2", "test_confidence", "test_entropy"):
                record[f"{name}_{suffix}"] = row.get(name)
        record["val_acc_byval"] = hist[chosen["byval"] - 1]["val_acc"] if chosen["byval"] else None
        self.store.put(record)
        self.done_here.add(key)
        return record
