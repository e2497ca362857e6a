"""Feature sets: the in-memory form, the features-file format, and the per-backbone cache.

Features-file format (`--features PATH`, and the cache this tool writes): a `.pt` file readable
by `torch.load(weights_only=True)` or a `.npz` file, with
  train_features  float (N_train, d)      train_labels  int (N_train,)  in [0, K)
  test_features   float (N_test, d)       test_labels   int (N_test,)   in [0, K)
and optionally `num_classes` (int; default max label + 1).
"""
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.cli import UserError, one_line
from utils.io import atomic_torch_save, load_torch_file

REQUIRED_KEYS = ("train_features", "train_labels", "test_features", "test_labels")


@dataclass
class FeatureSet:
    name: str            # dataset name as reported in results
    backbone: str        # what produced the features
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def dim(self) -> int:
        return self.train_x.shape[1]

    def fingerprint(self) -> str:
        """Content hash: checkpoints and records say exactly which features they came from."""
        h = hashlib.blake2b(digest_size=8)
        for t in (self.train_x, self.train_y, self.test_x, self.test_y):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()

    def to_file_dict(self) -> dict:
        return {"train_features": self.train_x, "train_labels": self.train_y,
                "test_features": self.test_x, "test_labels": self.test_y,
                "num_classes": self.num_classes, "backbone": self.backbone, "name": self.name}


def _numeric_tensor(value, key: str, source: str) -> torch.Tensor:
    """A stored array as a CPU tensor without autograd; bfloat16 and grad-carrying tensors are fine."""
    try:
        t = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UserError(f"features file {source}: {key} is not a numeric array ({one_line(exc, 120)}); store "
                        "float features and integer labels") from None
    if t.is_complex():
        raise UserError(f"features file {source}: {key} is complex; store real-valued features and integer labels")
    return t


def _num_classes(value, source: str) -> int:
    try:
        v = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
        k = v.item() if v.size == 1 else None
        ok = k is not None and not isinstance(k, (str, bytes)) and float(k) == int(k)
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise UserError(f"features file {source}: num_classes must be one integer, got {str(value)[:40]!r}")
    return int(k)


def validate_feature_arrays(arrays: dict, source: str, name: str, backbone: str) -> FeatureSet:
    """Check shapes and label ranges of a features dict and build a FeatureSet (one-line errors)."""
    missing = [k for k in REQUIRED_KEYS if k not in arrays]
    if missing:
        raise UserError(f"features file {source} lacks {missing}; it must hold {list(REQUIRED_KEYS)} "
                        "(see README, 'Features-file format')")
    tx, ty, vx, vy = (_numeric_tensor(arrays[k], k, source) for k in REQUIRED_KEYS)
    if tx.ndim != 2 or vx.ndim != 2:
        raise UserError(f"features file {source}: features must be 2-D (N, d), got train {tuple(tx.shape)}, "
                        f"test {tuple(vx.shape)}")
    if tx.shape[1] != vx.shape[1]:
        raise UserError(f"features file {source}: train features have d={tx.shape[1]} but test features "
                        f"d={vx.shape[1]}; both splits must come from the same backbone")
    if tx.shape[0] == 0 or vx.shape[0] == 0 or tx.shape[1] == 0:
        raise UserError(f"features file {source} is empty (train {tuple(tx.shape)}, test {tuple(vx.shape)}); "
                        "both splits need at least one row and one feature")
    if ty.shape != (tx.shape[0],) or vy.shape != (vx.shape[0],):
        raise UserError(f"features file {source}: labels must be 1-D with one entry per row, got train "
                        f"{tuple(ty.shape)} for {tx.shape[0]} rows, test {tuple(vy.shape)} for {vx.shape[0]} rows")
    if ty.is_floating_point() or vy.is_floating_point():
        if not (torch.equal(ty, ty.round()) and torch.equal(vy, vy.round())):
            raise UserError(f"features file {source}: labels must be integer class ids")
    ty, vy = ty.long(), vy.long()
    k = _num_classes(arrays["num_classes"], source) if "num_classes" in arrays else int(max(ty.max(), vy.max())) + 1
    if ty.min() < 0 or vy.min() < 0 or ty.max() >= k or vy.max() >= k:
        raise UserError(f"features file {source}: labels must lie in [0, {k}); found "
                        f"[{int(min(ty.min(), vy.min()))}, {int(max(ty.max(), vy.max()))}]")
    if k < 2:
        raise UserError(f"features file {source}: need at least 2 classes, found {k}")
    tx, vx = tx.float(), vx.float()
    if not (torch.isfinite(tx).all() and torch.isfinite(vx).all()):
        raise UserError(f"features file {source} contains NaN or inf features; recompute them")
    return FeatureSet(name, backbone, tx.contiguous(), ty, vx.contiguous(), vy, k)


def load_features_file(path, name=None) -> FeatureSet:
    path = Path(path)
    fix = "Point --features at a .pt/.npz file in the format of README 'Features-file format'."
    if path.suffix == ".npz":
        if not path.is_file():
            raise UserError(f"features file not found: {path}. {fix}")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as exc:
            raise UserError(f"features file {path} is unreadable ({one_line(exc, 120)}). {fix}") from None
    else:
        arrays = load_torch_file(path, "features file", fix)
        if not isinstance(arrays, dict):
            raise UserError(f"features file {path} holds a {type(arrays).__name__}, not a dict. {fix}")
    backbone = str(arrays.get("backbone", "custom"))
    return validate_feature_arrays(arrays, str(path), name or str(arrays.get("name", path.stem)), backbone)


def cache_path(cache_root, dataset: str, backbone: str) -> Path:
    return Path(cache_root) / f"{dataset}_{backbone}.pt"


def load_cached_features(path, dataset: str, backbone: str) -> FeatureSet:
    fix = f"Delete {path} to re-extract the features."
    arrays = load_torch_file(path, "feature cache", fix)
    if not isinstance(arrays, dict) or arrays.get("name") != dataset or arrays.get("backbone") != backbone:
        raise UserError(f"feature cache {path} was not written for {dataset}/{backbone}. {fix}")
    return validate_feature_arrays(arrays, str(path), dataset, backbone)


def save_features(path, features: FeatureSet) -> None:
    atomic_torch_save(path, features.to_file_dict())
