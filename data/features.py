"""Feature sets: the in-memory form, the features-file format, and the per-backbone cache.

Features-file format (`--features PATH`, and the cache this tool writes): a `.pt` file readable
by `torch.load(weights_only=True)` or a `.npz` file, with
  train_features  float (N_train, d)      train_labels  int (N_train,)  in [0, K)
  test_features   float (N_test, d)       test_labels   int (N_test,)   in [0, K)
and optionally `num_classes` (int; default max label + 1), `name` and `backbone` (strings; mapped
by `safe_name`, since they become parts of file paths) and `class_names` (K strings, shown on the
axes of the evidence figures).
"""
import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from utils.cli import UserError, one_line
from utils.io import atomic_torch_save, load_torch_file
from utils.names import FEATURE_NORMS, check_plain_name, safe_name

REQUIRED_KEYS = ("train_features", "train_labels", "test_features", "test_labels")
# Features are kept in these precisions as stored (the trainer upcasts a few rows at a time, exactly);
# any other type is converted to float32 on loading.
STORED_PRECISIONS = (torch.float32, torch.float16, torch.bfloat16)
CHUNK_VALUES = 1 << 22  # values hashed or checked at once (16 MB as float32): no full-size temporary

# Most classes a features file may have: a run builds K x K matrices (corruption, class correlations)
# and K x d weights, and loops over the classes, so K is bounded before anything of size K exists.
MAX_CLASSES = 100_000
# Rough bytes per K^2 (float64 transition and correlation matrices, their clustering) and per K*d
# (float32 weight, momentum, best snapshots, teacher) of one run, for the memory check.
BYTES_PER_CLASS_PAIR = 48
BYTES_PER_WEIGHT = 32


@dataclass
class FeatureSet:
    name: str            # dataset name as reported in results
    backbone: str        # what produced the features
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    # how the features were made (backbone weights, preprocessing, package versions), as text:
    # written into the features file so that a shared file says what it holds
    provenance: dict = field(default_factory=dict)
    class_names: Optional[list] = None  # K strings (figures only), when the source names its classes

    @property
    def dim(self) -> int:
        return self.train_x.shape[1]

    def fingerprint(self) -> str:
        """Content hash: checkpoints and records say exactly which features they came from. Features
        are hashed as their float32 values (a block of rows at a time), so a file stored in float16
        and the same values stored in float32 are one set of features."""
        h = hashlib.blake2b(digest_size=8)
        for t in (self.train_x, self.train_y, self.test_x, self.test_y):
            h.update(str(tuple(t.shape)).encode())
            for block in _row_chunks(t):
                h.update((block.float() if t.is_floating_point() else block).contiguous().numpy())
        return h.hexdigest()

    def to_file_dict(self) -> dict:
        return {"train_features": self.train_x, "train_labels": self.train_y,
                "test_features": self.test_x, "test_labels": self.test_y,
                "num_classes": self.num_classes, "backbone": self.backbone, "name": self.name,
                **({"class_names": list(self.class_names)} if self.class_names is not None else {}),
                **{key: str(value) for key, value in self.provenance.items()}}


def _numeric_tensor(value, key: str, source: str) -> torch.Tensor:
    """A stored array as a CPU tensor without autograd; bfloat16 and grad-carrying tensors are fine."""
    try:
        t = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UserError(f"features file {source}: {key} is not a numeric array ({one_line(exc, 120)}); store "
                        "float features and integer labels") from None
    if t.layout != torch.strided:  # sparse (COO, CSR, ...): its values cannot be read as rows
        raise UserError(f"features file {source}: {key} is a {str(t.layout).removeprefix('torch.')} tensor; "
                        "store dense arrays (e.g. tensor.to_dense()) of float features and integer labels")
    if t.is_complex() or (t.dtype == torch.bool and key.endswith("features")):  # bool labels are class ids
        raise UserError(f"features file {source}: {key} holds {str(t.dtype).removeprefix('torch.')} values; "
                        "store real-valued (float) features and integer labels")
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


def _physical_memory() -> int:
    """Bytes of memory of this machine (0 if the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def check_num_classes(k: int, what: str, num_train: int, dim: int, source: str) -> None:
    """Refuse a class count no run could use, before anything of size K is allocated: more than
    MAX_CLASSES, more than the training samples, or K x K matrices / K x d weights beyond memory."""
    fix = "store class ids 0..K-1 (and num_classes = K, or leave num_classes out)"
    head = f"features file {source}: {what}, i.e. {k:,} classes"
    if k > MAX_CLASSES:
        raise UserError(f"{head}; at most {MAX_CLASSES:,} classes are supported; {fix}")
    if k > num_train:
        raise UserError(f"{head}, more than its {num_train:,} training samples; {fix}")
    need = BYTES_PER_CLASS_PAIR * k * k + BYTES_PER_WEIGHT * k * dim
    have = _physical_memory()
    if have and need > have:
        raise UserError(f"{head}: a run's K x K matrices and K x {dim} weights need about "
                        f"{_size(need)}, more than the {_size(have)} of memory here; use fewer classes (or a "
                        "machine with more memory)")


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} bytes"


def _label_range(t: torch.Tensor, key: str, source: str):
    """(smallest, largest) label as Python ints, checked to be integer class ids (no cast that could wrap)."""
    if t.is_floating_point():
        bad = ~torch.isfinite(t) | (t != t.round())
        if bad.any():
            raise UserError(f"features file {source}: labels must be integer class ids, but {key} holds "
                            f"{float(t[bad][0])!r}; store integer labels 0..K-1")
        return int(t.min().item()), int(t.max().item())
    a = t.numpy()  # numpy: min/max of every integer type (torch has none for uint16/32/64), exact as int
    return int(a.min()), int(a.max())


def validate_feature_arrays(arrays: dict, source: str, name: str, backbone: str) -> FeatureSet:
    """Check shapes and label ranges of a features dict and build a FeatureSet (one-line errors)."""
    missing = [k for k in REQUIRED_KEYS if k not in arrays]
    if missing:
        has = sorted(map(str, arrays))
        shown = ", ".join(has[:20]) + (f", ... ({len(has) - 20} more)" if len(has) > 20 else "")
        lacks = "" if len(missing) == len(REQUIRED_KEYS) else f", without {', '.join(missing)}"
        raise UserError(f"features file {source} must hold {', '.join(REQUIRED_KEYS)} (optional: "
                        f"num_classes, name, backbone, class_names) but has [{shown}]{lacks} "
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
                        f"{tuple(ty.shape)} for {tx.shape[0]} rows, test {tuple(vy.shape)} for {vx.shape[0]} "
                        "rows")
    (tlo, thi), (vlo, vhi) = _label_range(ty, "train_labels", source), _label_range(vy, "test_labels", source)
    lo, hi = min(tlo, vlo), max(thi, vhi)
    if "num_classes" in arrays:
        k = _num_classes(arrays["num_classes"], source)
        what = f"num_classes is {k}"
    else:
        k, what = hi + 1, f"labels go up to {hi}"
    if lo < 0:
        raise UserError(f"features file {source}: labels must lie in [0, K) (class ids from 0); found "
                        f"[{lo}, {hi}]")
    check_num_classes(k, what, tx.shape[0], tx.shape[1], source)
    if hi >= k:
        raise UserError(f"features file {source}: labels must lie in [0, {k}); found [{lo}, {hi}]")
    if k < 2:
        raise UserError(f"features file {source}: need at least 2 classes, found {k}")
    ty, vy = ty.long(), vy.long()
    tx, vx = (x if x.dtype in STORED_PRECISIONS else x.float() for x in (tx, vx))
    if not all(bool(torch.isfinite(block).all()) for x in (tx, vx) for block in _row_chunks(x)):
        raise UserError(f"features file {source} contains NaN or inf features; recompute them")
    names = _class_names(arrays["class_names"], k, source) if "class_names" in arrays else None
    return FeatureSet(name, backbone, tx.contiguous(), ty, vx.contiguous(), vy, k, class_names=names)


def _row_chunks(t: torch.Tensor):
    """`t` a block of rows of about CHUNK_VALUES values at a time (views, no copy)."""
    rows = max(1, CHUNK_VALUES // max(1, t[0].numel() if len(t) else 1))
    return (t[start:start + rows] for start in range(0, max(len(t), 1), rows))


def _class_names(value, k: int, source: str) -> list:
    """The optional `class_names` entry as K strings (a list, or a numpy array of strings)."""
    names = value.tolist() if isinstance(value, np.ndarray) else value
    if not isinstance(names, (list, tuple)) or len(names) != k or not all(isinstance(n, str) for n in names):
        raise UserError(f"features file {source}: class_names must be a list of {k} strings (one per class), "
                        f"got {str(value)[:60]!r}; fix it or leave class_names out")
    return list(names)


def load_features_file(path, name=None) -> FeatureSet:
    path = Path(path)
    fix = ("Point --features at a .pt/.npz file in the format of README 'Features-file format' (in a "
           "recipe: its features: key).")
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
    # both become parts of paths (checkpoints, records): mapped to plain names, 'ViT-B/16' -> 'ViT-B_16'
    backbone = safe_name(arrays.get("backbone", "custom"))
    if name is None:
        name = safe_name(arrays.get("name", path.stem), "features")
    return validate_feature_arrays(arrays, str(path), check_plain_name(name, "dataset name"), backbone)


def cache_path(cache_root, dataset: str, backbone: str) -> Path:
    return Path(cache_root) / (check_plain_name(f"{dataset}_{backbone}", "feature cache name") + ".pt")


def load_cached_features(path, dataset: str, backbone: str) -> FeatureSet:
    fix = f"Delete {path} to re-extract the features."
    arrays = load_torch_file(path, "feature cache", fix)
    if not isinstance(arrays, dict) or arrays.get("name") != dataset or arrays.get("backbone") != backbone:
        raise UserError(f"feature cache {path} was not written for {dataset}/{backbone}. {fix}")
    return validate_feature_arrays(arrays, str(path), dataset, backbone)


def save_features(path, features: FeatureSet) -> None:
    atomic_torch_save(path, features.to_file_dict())


def normalize_features(features: FeatureSet, mode: str) -> FeatureSet:
    """The features a probe sees under `--feature-norm` (labels, names and classes unchanged):
    'none' as stored (the paper's); 'l2' every row divided by its Euclidean norm (zero rows stay
    zero); 'standardize' every dimension centred and scaled by the mean and std of the TRAINING
    rows only (a constant dimension is only centred), the same map applied to the test rows."""
    if mode == "none":
        return features
    train, test = features.train_x.double(), features.test_x.double()
    if mode == "l2":
        unit = lambda x: x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)  # noqa: E731
        train, test = unit(train), unit(test)
    elif mode == "standardize":
        mean, std = train.mean(0), train.std(0, unbiased=False)
        std = torch.where(std > 0, std, torch.ones_like(std))
        train, test = (train - mean) / std, (test - mean) / std
    else:
        raise UserError(f"unknown --feature-norm {mode!r}; choose from {', '.join(FEATURE_NORMS)}")
    return replace(features, train_x=train.float(), test_x=test.float(), provenance={})
