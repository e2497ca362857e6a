"""Shared helpers: the repository on sys.path, one CPU thread, and the CLI run in-process.

Every end-to-end test calls `train_linear.main` exactly as a user runs the command, on the
built-in digits features (1,797 real 8x8 images, shipped with scikit-learn) or on tiny synthetic
files, with every output directory under pytest's tmp_path.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Set before utils.threads is imported: it remembers the thread count it found at import.
torch.set_num_threads(1)

import train_linear  # noqa: E402
from utils.cli import run_main  # noqa: E402

# The digits settings of the brief: fast, and far from chance after a few epochs.
DIGITS = ["-d", "digits", "--lr", "0.05", "--wd", "5e-3"]


class Cli:
    """`cli(*argv, where="a")` runs train_linear.py in-process with its own output directories
    under tmp_path/<where>; returns the exit code as the shell would see it."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path

    def dirs(self, where="a") -> dict:
        base = self.tmp / where
        return {"ckpt": base / "ckpt", "results": base / "results", "cache": base / "cache",
                "data": base / "data"}

    def dir_args(self, where="a") -> list:
        d = self.dirs(where)
        return ["--checkpoint", str(d["ckpt"]), "--results", str(d["results"]),
                "--cache-dir", str(d["cache"]),
                "--data-root", str(d["data"])]

    def __call__(self, *argv, where="a") -> int:
        return run_main(train_linear.main, [str(a) for a in argv] + self.dir_args(where))

    def records(self, where="a") -> list:
        folder = self.dirs(where)["results"] / "records"
        return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []

    def by_step(self, where="a") -> dict:
        recs = self.records(where)
        out = {r["step"]: r for r in recs}
        assert len(out) == len(recs), "more than one record per step: pass a single configuration"
        return out

    def run_folder(self, record: dict, where="a") -> Path:
        """The checkpoint folder of a record's run (named <step>-<hash of its key>)."""
        name = f"{record['step']}-{record['key'].rsplit('-', 1)[1]}"
        found = list(self.dirs(where)["ckpt"].rglob(name))
        assert len(found) == 1, f"expected one folder {name}, found {found}"
        return found[0]

    def checkpoint(self, record: dict, kind: str, where="a") -> dict:
        return torch.load(self.run_folder(record, where) / f"{kind}.pt",
                          map_location="cpu", weights_only=True)

    def log(self, record: dict, where="a") -> list:
        text = (self.run_folder(record, where) / "log.jsonl").read_text()
        return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def cli(tmp_path):
    return Cli(tmp_path)


class TrainSpy:
    """Wraps utils.engine.train_heads and keeps what each batched computation was given."""

    def __init__(self, real):
        self.real = real
        self.calls = []
        self.hook = None   # optional f(state) run after the engine's own on_epoch

    def __call__(self, data, targets, init_weight, hypers, shuffle_seeds, resume=None, on_epoch=None,
                 **options):
        call = {"data": data, "targets": targets, "init": init_weight.detach().clone(),
                "resume_epoch": None if resume is None else resume.epoch,
                "epochs": hypers[0].epochs, "options": options}
        self.calls.append(call)

        def hook(state):
            if on_epoch is not None:
                on_epoch(state)
            if self.hook is not None:
                self.hook(state)

        state = self.real(data, targets, init_weight, hypers, shuffle_seeds, resume, hook, **options)
        call["final_weight"] = state.weight.detach().clone()
        return state


@pytest.fixture
def spy(monkeypatch):
    import utils.engine
    s = TrainSpy(utils.engine.train_heads)
    monkeypatch.setattr(utils.engine, "train_heads", s)
    return s


@pytest.fixture
def no_training(monkeypatch):
    """Any training from here on fails the test: for 'finished runs are skipped' checks."""
    import utils.engine

    def fail(*args, **kwargs):
        raise AssertionError("train_heads was called, but every run should have been skipped")
    monkeypatch.setattr(utils.engine, "train_heads", fail)


def digits_test_set():
    from data.datasets import digits_features
    f = digits_features()
    return f.test_x, f.test_y


def head_accuracy(weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy (percent) of a checkpoint's weight loaded into nn.Linear(d, K, bias=False)."""
    k, d = weight.shape
    head = torch.nn.Linear(d, k, bias=False)
    head.load_state_dict({"weight": weight})
    with torch.no_grad():
        return float((head(x).argmax(1) == y).double().mean() * 100)


def blob_features(num_train=150, num_test=60, dim=6, num_classes=3, seed=0):
    """Gaussian blobs, one per class: a features file a linear probe can learn in a few epochs."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(num_classes, dim))

    def split(n):
        y = np.arange(n) % num_classes
        return (centres[y] + rng.normal(size=(n, dim))).astype(np.float32), y.astype(np.int64)

    tx, ty = split(num_train)
    vx, vy = split(num_test)
    return {"train_features": tx, "train_labels": ty, "test_features": vx, "test_labels": vy}


def stderr_error_lines(err: str) -> list:
    return [line for line in err.splitlines() if line.startswith("error:")]
