"""Class-wise feature correlations, exactly over all pairs of samples, without an N x N matrix.

The paper's correlation of two samples a, b is the cosine of their centred features: centre the
features of a split by their mean, scale every row to unit length (u_a), corr(a, b) = <u_a, u_b>.
For every pair of classes (i, j) we want the mean and the sample std of corr over all pairs a in i,
b in j, leaving out a = b when i = j (ordered pairs, as the original's N x N matrix holds them).
Both come from per-class sums:
- sum over the pairs of <u_a, u_b> = <s_i, s_j>, with s_i the sum of the unit rows of class i;
- sum over the pairs of <u_a, u_b>^2 = <M_i, M_j> (Frobenius), with M_i = sum of u_a u_a^T (d x d);
and the self-pairs of a class are taken out of its diagonal cell exactly. Cost: O(N d) for the
means, O(N d^2 + K^2 d^2) for the stds; memory O(K d) plus the second moments of two blocks of
classes at a time (SECOND_MOMENT_BYTES), so K d^2 need not fit in memory. Rows are read class by
class in their stored precision and upcast to float64 there: no N x d copy is made.
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

# Room for the d x d second moments of two blocks of classes (float64). At d = 512 all of
# CIFAR-100's 100 classes fit in one block; at d = 2048 a block holds 16 classes.
SECOND_MOMENT_BYTES = 1 << 30
# Rows read at once where the rows' class does not matter (the column mean, label sums).
ROW_CHUNK = 65_536
# A row equal to the split's mean has no direction: it stays a zero vector (correlation 0 with all).
_TINY_NORM = 1e-12


@dataclass
class ClassPairStats:
    """Sums over the pairs of samples of each pair of classes, and what the spectrum needs."""
    counts: np.ndarray                 # (K, K) ordered pairs: n_i n_j, and n_i (n_i - 1) on the diagonal
    sums: np.ndarray                   # (K, K) sum of the correlations over those pairs
    square_sums: Optional[np.ndarray]  # (K, K) sum of their squares (None when not asked for)
    class_sums: torch.Tensor           # (K, d) float64: sum of the unit rows of each class
    scatter: Optional[torch.Tensor]    # (d, d) float64: U^T U over all rows (None when not asked for)
    centre: torch.Tensor               # (d,) float64: the split's mean feature

    @property
    def mean(self) -> np.ndarray:
        """Mean correlation per class pair (0 where a cell has no pair: a class of one sample)."""
        return self.sums / np.maximum(self.counts, 1)

    @property
    def std(self) -> np.ndarray:
        """Sample std (ddof=1) of the correlation per class pair; NaN where a cell has < 2 pairs."""
        if self.square_sums is None:
            raise ValueError("std needs the second moments: call class_pair_stats(..., second_moments=True)")
        n = self.counts.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            var = (self.square_sums - self.sums ** 2 / n) / (n - 1)
        return np.where(n > 1, np.sqrt(np.clip(var, 0.0, None)), np.nan)


def column_mean(features: torch.Tensor) -> torch.Tensor:
    """The mean row in float64, read ROW_CHUNK rows at a time."""
    total = torch.zeros(features.shape[1], dtype=torch.float64)
    for start in range(0, features.shape[0], ROW_CHUNK):
        total += features[start:start + ROW_CHUNK].double().sum(0)
    return total / features.shape[0]


def unit_rows(rows: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Rows centred by `centre` and scaled to unit length, in float64."""
    x = rows.double() - centre
    return x / x.norm(dim=1, keepdim=True).clamp_min(_TINY_NORM)


def _class_blocks(num_classes: int, dim: int, second_moments: bool, block_bytes: int) -> list:
    """Consecutive ranges of classes whose second moments are held at once (two blocks at a time)."""
    per_block = num_classes
    if second_moments:
        per_block = max(1, min(num_classes, block_bytes // (2 * dim * dim * 8)))
    return [range(start, min(start + per_block, num_classes)) for start in range(0, num_classes, per_block)]


class _ClassRows:
    """The unit rows of one class at a time."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int, centre: torch.Tensor):
        self.features, self.centre = features, centre
        self.order = torch.argsort(labels, stable=True)
        self.counts = torch.bincount(labels, minlength=num_classes)
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def __call__(self, cls: int) -> torch.Tensor:
        start = int(self.starts[cls])
        return unit_rows(self.features[self.order[start:start + int(self.counts[cls])]], self.centre)


def class_pair_stats(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     second_moments: bool = True, block_bytes: int = SECOND_MOMENT_BYTES) -> ClassPairStats:
    """Pair sums (and, with `second_moments`, pair sums of squares and the scatter U^T U) of the
    correlations of one split, exactly over all pairs; see the module's docstring."""
    labels = labels.long()
    centre = column_mean(features)
    rows_of = _ClassRows(features, labels, num_classes, centre)
    dim = features.shape[1]
    class_sums = torch.zeros(num_classes, dim, dtype=torch.float64)
    self_squares = torch.zeros(num_classes, dtype=torch.float64)   # sum over the class's rows of |u|^2
    self_fourths = torch.zeros(num_classes, dtype=torch.float64)   # ... of |u|^4
    scatter = torch.zeros(dim, dim, dtype=torch.float64) if second_moments else None
    square_sums = torch.zeros(num_classes, num_classes, dtype=torch.float64) if second_moments else None
    blocks = _class_blocks(num_classes, dim, second_moments, block_bytes)
    for index, block in enumerate(blocks):
        moments = []
        for cls in block:
            u = rows_of(cls)
            class_sums[cls] = u.sum(0)
            norms = (u * u).sum(1)
            self_squares[cls], self_fourths[cls] = norms.sum(), (norms * norms).sum()
            if second_moments:
                moments.append(_second_moment(u))
                scatter += moments[-1]
        if second_moments:
            _fill_square_sums(square_sums, blocks, index, torch.stack(moments).view(len(block), -1), rows_of)
    sums = class_sums @ class_sums.T
    sums.diagonal().sub_(self_squares)
    if second_moments:
        square_sums.diagonal().sub_(self_fourths)
    n = rows_of.counts.double()
    counts = n[:, None] * n[None, :]
    counts.diagonal().copy_(n * (n - 1))
    return ClassPairStats(counts.numpy(), sums.numpy(), None if square_sums is None else square_sums.numpy(),
                          class_sums, scatter, centre)


def _second_moment(u: torch.Tensor) -> torch.Tensor:
    """M = sum over the rows of u u^T (d x d)."""
    return u.T @ u


def _fill_square_sums(square_sums: torch.Tensor, blocks: list, index: int, block_moments: torch.Tensor,
                      rows_of: _ClassRows) -> None:
    """<M_i, M_j> for i in blocks[index] and j in it or a later block (later blocks' moments are
    recomputed: memory stays two blocks whatever K)."""
    own = blocks[index]
    for later in blocks[index:]:
        if later is own:
            other = block_moments
        else:
            other = torch.stack([_second_moment(rows_of(cls)) for cls in later]).view(len(later), -1)
        products = block_moments @ other.T
        square_sums[own.start:own.stop, later.start:later.stop] = products
        square_sums[later.start:later.stop, own.start:own.stop] = products.T


def unit_row_sums_by_label(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                           centre: torch.Tensor) -> torch.Tensor:
    """(K, d) float64: the sum of the unit rows carrying each label (U^T Y for one-hot labels Y)."""
    out = torch.zeros(num_classes, features.shape[1], dtype=torch.float64)
    labels = labels.long()
    for start in range(0, features.shape[0], ROW_CHUNK):
        stop = start + ROW_CHUNK
        out.index_add_(0, labels[start:stop], unit_rows(features[start:stop], centre))
    return out
