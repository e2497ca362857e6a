"""What a feature space says about the paper's mechanism, computed from the features alone.

The paper's argument: a linear probe's self-distillation averages the given labels along the top
eigenvectors of the feature Gram matrix, so it helps when features are clustered by class. Three
views of that, for any features (no training, no files here):
- the class-wise correlation map: mean and std of the cosine of centred, unit features over all
  pairs of samples of two classes (data/class_correlation.py), with the classes clustered as `cc`
  corruption clusters them;
- the c / d / e table of the original's analysis: the mean correlation within a class (c), between
  classes of one cluster (d) and between clusters (e);
- the Gram spectrum and the share of the label matrix's energy that lies along its top
  eigenvectors, for the clean and for corrupted labels: the part of the labels that averaging
  keeps, and how much of the noise it can remove.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch

from data.class_correlation import class_pair_stats, unit_row_sums_by_label
from data.corruption import (SUPERCLASS_CUT, class_linkage, clusters_at, corrupt_labels, superclass_groups,
                             transition_matrix)
from utils.cli import UserError

# The original's cuts of the class dendrogram (fractions of its largest merge height): the
# heatmap's clusters (the same cut as `cc` corruption's superclasses) and the table's clusters.
ORDER_CUT = SUPERCLASS_CUT
TABLE_CUT = 0.9
# Eigenvalues kept in the spectrum summary: enough to see the gap after the K-th.
MAX_EIGENVALUES = 512
# Eigen-directions with an eigenvalue below this fraction of the largest carry no feature variance.
_NULL_EIGENVALUE = 1e-12


@dataclass
class SplitCorrelation:
    """One split's class-pair statistics."""
    mean: np.ndarray     # (K, K) mean correlation
    std: np.ndarray      # (K, K) sample std (ddof=1) over the ordered pairs of the cell
    rows: int
    stats: object        # the ClassPairStats they came from (class sums, scatter, centre)


def check_class_sizes(labels: torch.Tensor, num_classes: int, split: str) -> None:
    """A class with fewer than 2 samples has no pair of its own: refuse, naming the classes."""
    counts = torch.bincount(labels.long(), minlength=num_classes)
    small = torch.nonzero(counts < 2).flatten().tolist()
    if small:
        shown = ", ".join(f"{c} ({int(counts[c])} sample{'s' if counts[c] != 1 else ''})" for c in small[:8])
        more = f" and {len(small) - 8} more" if len(small) > 8 else ""
        raise UserError(f"the {split} split has classes with fewer than 2 samples: {shown}{more}; the "
                        "within-class correlation needs at least 2 per class (check the labels: class ids "
                        "0..K-1, num_classes = K)")


def split_correlation(features: torch.Tensor, labels: torch.Tensor, num_classes: int, split: str,
                      block_bytes=None) -> SplitCorrelation:
    check_class_sizes(labels, num_classes, split)
    extra = {} if block_bytes is None else {"block_bytes": block_bytes}
    stats = class_pair_stats(features, labels, num_classes, second_moments=True, **extra)
    return SplitCorrelation(stats.mean, stats.std, int(features.shape[0]), stats)


def _summary(values: np.ndarray, variances: np.ndarray):
    """{'mean', 'std', 'var', 'pairs'} over class-pair cells, or None without any. 'mean' is the
    mean of the cells' means, 'var' the mean of their variances (the number the original's table
    printed after its ±), 'std' its square root."""
    if values.size == 0:
        return None
    var = float(np.mean(variances))
    return {"mean": float(np.mean(values)), "std": math.sqrt(var), "var": var, "pairs": int(values.size)}


def correlation_table(mean: np.ndarray, std: np.ndarray, cluster_of: np.ndarray) -> dict:
    """The original's table row: the number of clusters, then c (the diagonal cells: within a class),
    d (cells of two classes of one cluster) and e (cells of two clusters), each a `_summary`; d and
    e count each unordered class pair once."""
    k = mean.shape[0]
    upper = np.triu(np.ones((k, k), dtype=bool), 1)
    same = cluster_of[:, None] == cluster_of[None, :]
    var = std ** 2
    diagonal = np.eye(k, dtype=bool)
    return {"clusters": int(len(np.unique(cluster_of))),
            "c": _summary(mean[diagonal], var[diagonal]),
            "d": _summary(mean[upper & same], var[upper & same]),
            "e": _summary(mean[upper & ~same], var[upper & ~same])}


@dataclass
class Spectrum:
    """Top eigenpairs of the Gram matrix U U^T of a split's centred unit rows, through the d x d
    scatter U^T U (same non-zero eigenvalues; a Gram eigenvector is U w / sqrt(eigenvalue))."""
    eigenvalues: np.ndarray   # (M,) descending, M <= MAX_EIGENVALUES, all > 0
    directions: torch.Tensor  # (d, M) float64 eigenvectors w of U^T U
    trace: float              # sum of all eigenvalues = the sum of |u|^2 (the rows, for unit rows)


def gram_spectrum(scatter: torch.Tensor, keep: int = MAX_EIGENVALUES) -> Spectrum:
    values, vectors = torch.linalg.eigh(scatter)
    values, vectors = values.flip(0), vectors.flip(1)
    trace = float(values.clamp_min(0).sum())
    alive = int((values > _NULL_EIGENVALUE * max(float(values[0]), _NULL_EIGENVALUE)).sum())
    m = min(keep, alive)
    return Spectrum(values[:m].numpy(), vectors[:, :m], trace)


def spectrum_summary(spectrum: Spectrum, num_classes: int) -> dict:
    """Eigenvalues (top ones), their share of the trace in the top K - 1 and K, and the gaps after
    the (K-1)-th and K-th (ratios of consecutive eigenvalues; None where there is no next one).
    Centring removes the all-ones direction, so K well-separated classes give K - 1 large ones."""
    values, k = spectrum.eigenvalues, num_classes

    def share(m):
        return float(values[:m].sum() / spectrum.trace) if spectrum.trace > 0 else None

    def gap(m):
        return float(values[m - 1] / values[m]) if 0 < m < len(values) else None

    return {"eigenvalues": values.tolist(), "trace": spectrum.trace,
            "share_top_k_minus_1": share(k - 1), "share_top_k": share(k),
            "gap_after_k_minus_1": gap(k - 1), "gap_after_k": gap(k)}


def label_energy_curve(label_sums: torch.Tensor, label_counts: torch.Tensor, column_sum: torch.Tensor,
                       spectrum: Spectrum) -> np.ndarray:
    """Share of the centred one-hot label matrix Y_c = Y - 1 p^T (p: label frequencies; the part no
    centred feature can carry is taken out) that lies in the span of the top m Gram eigenvectors,
    for m = 1..M. label_sums (K, d) = U^T Y transposed; column_sum (d,) = U^T 1.

    Along Gram eigenvector v = U w / sqrt(lam): v^T Y_c = w^T U^T Y_c / sqrt(lam), and
    |Y_c|_F^2 = N (1 - sum p^2)."""
    n = float(label_counts.sum())
    p = label_counts.double() / n
    centred = label_sums.T - column_sum[:, None] * p[None, :]                      # U^T Y_c (d, K)
    along = spectrum.directions.T @ centred                                        # (M, K)
    energy = (along * along).sum(1) / torch.from_numpy(spectrum.eigenvalues)
    total = n * (1.0 - float((p * p).sum()))
    return (torch.cumsum(energy, 0) / total).numpy() if total > 0 else np.zeros(len(energy))


def label_energy(features: torch.Tensor, labels: torch.Tensor, num_classes: int, split: SplitCorrelation,
                 spectrum: Spectrum) -> dict:
    """{'share_top_k_minus_1', 'share_top_k', 'curve'} of one label vector (see label_energy_curve)."""
    sums = unit_row_sums_by_label(features, labels, num_classes, split.stats.centre)
    counts = torch.bincount(labels.long(), minlength=num_classes)
    curve = label_energy_curve(sums, counts, split.stats.class_sums.sum(0), spectrum)

    def at(m):
        return float(curve[min(m, len(curve)) - 1]) if len(curve) and m > 0 else 0.0

    return {"share_top_k_minus_1": at(num_classes - 1), "share_top_k": at(num_classes),
            "curve": curve.tolist()}


def class_clustering(mean: np.ndarray) -> dict:
    """The tree `cc` corruption uses, its clusters at ORDER_CUT (the heatmap's; cc's superclasses)
    and TABLE_CUT (the table's), and the heatmap's class order (the tree's leaf order, which keeps
    every cluster together)."""
    from scipy.cluster.hierarchy import leaves_list

    tree = class_linkage(mean)
    return {"tree": tree, "order": leaves_list(tree), "superclass_of": clusters_at(tree, ORDER_CUT),
            "cluster_of": clusters_at(tree, TABLE_CUT)}


def corrupted_training_labels(features, settings, superclass_of) -> list:
    """[(setting dict with the realised rate, noisy training labels)] for each (ctype, eta, seed):
    the labels a run of that setting corrupts its whole training split to (before any validation
    hold-out), drawn as the runs draw them; `superclass_of`: cc's superclasses of these features."""
    out = []
    for ctype, eta, seed in settings:
        transition = transition_matrix(ctype, eta, features.num_classes, superclass_of)
        noisy = corrupt_labels(features.train_y, transition, seed)
        realised = float((noisy != features.train_y).double().mean()) * 100
        out.append(({"ctype": ctype, "eta": eta, "seed": seed, "realised_corruption": realised}, noisy))
    return out


def feature_evidence(features, corruptions=(), block_bytes=None) -> dict:
    """Everything above for a FeatureSet, as plain numbers and lists (evidence.json's content, plus
    the linkage tree under 'tree' for the dendrogram). `corruptions`: [(ctype, eta, seed)] whose
    corrupted training labels' energy is reported beside the clean labels'."""
    k = features.num_classes
    splits = {"train": split_correlation(features.train_x, features.train_y, k, "train", block_bytes),
              "test": split_correlation(features.test_x, features.test_y, k, "test", block_bytes)}
    clustering = class_clustering(splits["train"].mean)  # the same map, so the same tree, as cc's
    corrupted = corrupted_training_labels(features, corruptions, clustering["superclass_of"])
    spectra = {name: gram_spectrum(split.stats.scatter) for name, split in splits.items()}
    table = correlation_table(splits["train"].mean, splits["train"].std, clustering["cluster_of"])
    out = {"dataset": features.name, "backbone": features.backbone, "features_id": features.fingerprint(),
           "num_classes": k, "dim": features.dim, "class_names": features.class_names,
           "order_cut": ORDER_CUT, "table_cut": TABLE_CUT, **table,
           "order": clustering["order"].tolist(), "cluster_of": clustering["cluster_of"].tolist(),
           "superclasses": superclass_groups(clustering["superclass_of"]), "tree": clustering["tree"]}
    for name, split in splits.items():
        out[name] = {"rows": split.rows, "mean": split.mean.tolist(), "std": split.std.tolist(),
                     **correlation_table(split.mean, split.std, clustering["cluster_of"]),
                     "spectrum": spectrum_summary(spectra[name], k)}
    energies = [({"split": "train", "labels": "clean"}, features.train_x, features.train_y, "train"),
                ({"split": "test", "labels": "clean"}, features.test_x, features.test_y, "test")]
    energies += [({"split": "train", "labels": "corrupted", **setting}, features.train_x, noisy, "train")
                 for setting, noisy in corrupted]
    out["label_energy"] = [{**what, **label_energy(x, y, k, splits[split], spectra[split])}
                           for what, x, y, split in energies]
    return out
