"""A run's files: the checkpoint format, the periodic resumable state, the final checkpoints, and a
teacher read through its record.

A run's folder holds `resume.pt` while it trains (never read as a teacher), then the final
checkpoints `best.pt`, `best_val.pt` and `last.pt` (written last, it carries the run's record), then
the record in the results store names each final checkpoint's content hash.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from models.head import head_state_dict
from utils.cli import UserError
from utils.io import atomic_torch_save, atomic_write_bytes, atomic_write_text, load_torch_bytes, \
    load_torch_file, \
    torch_bytes
from utils.runs import ResultsStore, RunConfig, run_dir, run_key, sha256_of, step_settings
from utils.selection import LAST, RULE, TRACKED
from utils.steps import Step
from utils.train import Snapshot, TrainState

SCHEMA = 1
RESUME_FILE = "resume.pt"      # periodic state of a run in training; never a teacher


def final_file(rule) -> str:
    """The final checkpoint of a selection rule: best.pt, best_val.pt, last.pt (written last)."""
    return f"{rule.checkpoint}.pt"


def _resume_name(rule) -> str:
    """A tracked rule's snapshot in the resumable state: best_test, best_val."""
    return f"best_{rule.name}"


@dataclass(frozen=True)
class Run:
    """One run: a step of a configuration on one set of features, with its key and folder."""
    cfg: RunConfig
    step: Step
    fid: str          # the features' fingerprint
    key: str
    folder: Path

    @classmethod
    def of(cls, checkpoint_root, cfg: RunConfig, step: Step, fid: str) -> "Run":
        return cls(cfg, step, fid, run_key(cfg, step, fid), run_dir(checkpoint_root, cfg, step, fid))

    def teacher(self, checkpoint_root) -> "Run":
        """The run whose selected checkpoint teaches this one."""
        return Run.of(checkpoint_root, self.cfg, self.step.learns_from, self.fid)


@dataclass
class HeadAt:
    """A head's weights and optimiser state at the end of one epoch, with that epoch's numbers."""
    epoch: int
    weight: torch.Tensor
    momentum: torch.Tensor
    lr: float
    acc: float        # test accuracy at that epoch


def checkpoint_dict(kind: str, run: Run, head: HeadAt, best_acc: float, extra: Optional[dict] = None) -> dict:
    out = {"schema": SCHEMA, "kind": kind, "key": run.key, "step": str(run.step), "seed": run.cfg.seed,
           "features": run.fid, "settings": step_settings(run.cfg, run.step, run.fid),
           "epoch": int(head.epoch),
           "model": head_state_dict(head.weight),
           "optimizer": {"momentum_buffer": head.momentum.detach().cpu().clone(), "lr": float(head.lr)},
           "acc": float(head.acc), "best_acc": float(best_acc)}
    out.update(extra or {})
    return out


def load_checkpoint(path, key: str, fix: str) -> dict:
    ckpt = load_torch_file(path, "checkpoint", fix)
    if not isinstance(ckpt, dict) or ckpt.get("schema") != SCHEMA or ckpt.get("key") != key:
        raise UserError(f"checkpoint {path} does not belong to this run "
                        f"(different settings or an older format). {fix}")
    return ckpt


# ---- the periodic resumable state -----------------------------------------------------------

def _snapshot_dict(snap: Optional[Snapshot], r: int) -> Optional[dict]:
    if snap is None:
        return None
    return {"acc": float(snap.acc[r]), "epoch": int(snap.epoch[r]), "weight": snap.weight[r].cpu().clone(),
            "momentum": snap.momentum[r].cpu().clone()}


def save_resume_state(run: Run, state: TrainState, r: int) -> None:
    """Run r of a batched computation's state, to resume from after an interruption."""
    hist = state.history[r]
    head = HeadAt(state.epoch, state.weight[r], state.momentum[r], hist[-1]["lr"], hist[-1]["test_acc"])
    resume = {**{_resume_name(rule): _snapshot_dict(state.best.get(rule.name), r) for rule in TRACKED},
              "history": hist}
    best_acc = float(state.best[TRACKED[0].name].acc[r])
    atomic_torch_save(run.folder / RESUME_FILE,
                      checkpoint_dict("resume", run, head, best_acc, {"resume": resume}))


def read_resume_state(run: Run, log):
    """(epoch, checkpoint) of an interrupted run's periodic state, or None (absent, finished, or
    unreadable: then the run restarts, and `log` says so)."""
    path = run.folder / RESUME_FILE
    if not path.is_file():
        return None
    try:
        ckpt = load_checkpoint(path, run.key, "")
    except UserError:
        log(f"ignoring unreadable resumable state {path}; the run restarts")
        return None
    if "resume" not in ckpt or not 0 < ckpt["epoch"] < run.cfg.epochs:
        return None
    return ckpt["epoch"], ckpt


def stack_resume_states(ckpts, device) -> TrainState:
    """One batched TrainState from the resumable states of runs that stopped at the same epoch."""
    def snap(parts):
        return Snapshot(torch.tensor([p["acc"] for p in parts], device=device),
                        torch.tensor([p["epoch"] for p in parts], device=device),
                        torch.stack([p["weight"] for p in parts]).to(device),
                        torch.stack([p["momentum"] for p in parts]).to(device))
    best = {rule.name: snap([c["resume"][_resume_name(rule)] for c in ckpts]) for rule in TRACKED
            if ckpts[0]["resume"][_resume_name(rule)] is not None}
    return TrainState(ckpts[0]["epoch"], torch.stack([c["model"]["weight"] for c in ckpts]).to(device),
                      torch.stack([c["optimizer"]["momentum_buffer"] for c in ckpts]).to(device),
                      best, [list(c["resume"]["history"]) for c in ckpts])


# ---- the final checkpoints ------------------------------------------------------------------

def write_final_checkpoints(run: Run, state: TrainState, r: int, payload: dict) -> dict:
    """log.jsonl, best.pt, best_val.pt, then last.pt carrying `payload` (the record without its
    checkpoints) plus the hashes of the others. Returns the record's fields that name the files:
    `final_checkpoints` (those before last.pt) and `checkpoints` (all of them), each
    {kind: {file, sha256}}."""
    hist = state.history[r]
    best_acc = float(state.best[TRACKED[0].name].acc[r])
    atomic_write_text(run.folder / "log.jsonl", "".join(json.dumps(h) + "\n" for h in hist))
    written = {}
    for rule in TRACKED:
        snap = state.best.get(rule.name)
        if snap is None:
            continue
        e = int(snap.epoch[r])
        head = HeadAt(e, snap.weight[r], snap.momentum[r], hist[e - 1]["lr"], hist[e - 1]["test_acc"])
        ckpt = checkpoint_dict(rule.checkpoint, run, head, best_acc)
        written[rule.checkpoint] = _write_final(run, rule, ckpt)
    payload = {**payload, "final_checkpoints": written}
    head = HeadAt(state.epoch, state.weight[r], state.momentum[r], hist[-1]["lr"], hist[-1]["test_acc"])
    last = _write_final(run, LAST, checkpoint_dict(LAST.checkpoint, run, head, best_acc, {"record": payload}))
    return {"final_checkpoints": written, "checkpoints": {**written, LAST.checkpoint: last}}


def _write_final(run: Run, rule, ckpt: dict) -> dict:
    data = torch_bytes(ckpt)
    atomic_write_bytes(run.folder / final_file(rule), data)
    return {"file": final_file(rule), "sha256": sha256_of(data)}


def record_from_final_checkpoints(folder: Path, key: str) -> Optional[dict]:
    """The record carried by a run's `last.pt` with every final checkpoint's hash, when they exist and
    match each other (a process stopped between them and its record); else None."""
    try:
        data = (folder / final_file(LAST)).read_bytes()
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
    files[LAST.checkpoint] = {"file": final_file(LAST), "sha256": sha256_of(data)}
    return {**payload, "checkpoints": files}


# ---- a teacher, through its record ----------------------------------------------------------

class TeacherUnavailable(UserError):
    """A student's teacher cannot be read: not trained yet (`retrain` False) or its files no longer
    match its record (`retrain` True). The message ends with the fix; the command line puts the
    exact command to run in it (`with_command`)."""

    def __init__(self, problem: str, step: Step, retrain: bool):
        self.problem, self.step, self.retrain = problem, step, retrain
        super().__init__(self.with_command(f"the same command with --dist {step}"))

    def with_command(self, command: str) -> str:
        if self.retrain:
            return f"{self.problem} Retrain {self.step.title}: {command} --overwrite"
        return f"{self.problem} Train it first: {command}"


def teacher_weights(store: ResultsStore, teacher: Run, selection: str):
    """(weights, key) of the teacher's checkpoint chosen by `selection`, read through the teacher's
    record and checked against the content hash the record names."""
    rule = RULE[selection]
    kind = rule.checkpoint
    what = teacher.step.title
    if not store.has(teacher.key):
        raise TeacherUnavailable(f"{what} of this configuration and seed has no result record "
                                 f"({store.path(teacher.key)}).", teacher.step, retrain=False)
    record = store.get(teacher.key)
    entry = (record.get("checkpoints") or {}).get(kind)
    path = teacher.folder / final_file(rule)
    if entry is None:
        raise TeacherUnavailable(f"the record {store.path(teacher.key)} of {what} names no {kind} checkpoint "
                                 "(written by an older version of this tool).", teacher.step, retrain=True)
    try:
        data = path.read_bytes()
    except OSError:
        raise TeacherUnavailable(f"{kind} checkpoint of {what} not found: {path}.", teacher.step,
                                 retrain=True) from None
    if sha256_of(data) != entry["sha256"]:
        raise TeacherUnavailable(f"checkpoint {path} is not the one the record {store.path(teacher.key)} "
                                 f"of {what} names (content hash differs: it changed after the run "
                                 "finished).", teacher.step, retrain=True)
    try:
        return load_torch_bytes(data)["model"]["weight"], teacher.key
    except Exception as exc:  # a foreign pickle (blocked by weights_only), or not a checkpoint of ours
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise TeacherUnavailable(f"checkpoint {path} of {what} cannot be read as a checkpoint of this tool "
                                 f"({first}).", teacher.step, retrain=True) from None
