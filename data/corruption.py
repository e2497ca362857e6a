"""Label corruption: transition matrices, superclasses from features, and sampling noisy labels.

Every sample of class i is relabelled by a draw from row i of a K x K transition matrix P
(P[i, j] = probability that a true i is labelled j), seeded by the run seed.
"""
import warnings

import numpy as np
import torch
from scipy.cluster.hierarchy import ClusterWarning, fcluster, linkage

from data.class_correlation import class_pair_stats
from utils.names import CORRUPTION_TYPES

# The original cuts the superclass dendrogram at this fraction of its largest merge height.
SUPERCLASS_CUT = 0.8


def symmetric_matrix(num_classes: int, eta: float) -> np.ndarray:
    """Keep with 1-eta, else move uniformly to one of the K-1 other classes."""
    k = num_classes
    p = np.full((k, k), eta / (k - 1))
    np.fill_diagonal(p, 1.0 - eta)
    return p


def asymmetric_matrix(num_classes: int, eta: float) -> np.ndarray:
    """Keep with 1-eta; eta/K to every other class and an extra eta/K to class (i+1) mod K."""
    k = num_classes
    p = np.full((k, k), eta / k)
    np.fill_diagonal(p, 1.0 - eta)
    p[np.arange(k), (np.arange(k) + 1) % k] += eta / k
    return p


def superclass_matrix(superclass_of: np.ndarray, eta: float) -> np.ndarray:
    """Keep with 1-eta, else move uniformly inside the class's superclass.

    A class alone in its superclass has nowhere to move: its labels stay (row = e_i). The original
    produced a row summing to 1-eta there and its sampler failed; we document this choice."""
    superclass_of = np.asarray(superclass_of)
    k = len(superclass_of)
    p = np.zeros((k, k))
    for i in range(k):
        mates = np.flatnonzero((superclass_of == superclass_of[i]) & (np.arange(k) != i))
        if len(mates) == 0:
            p[i, i] = 1.0
        else:
            p[i, i] = 1.0 - eta
            p[i, mates] = eta / len(mates)
    return p


def class_correlation_map(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """Mean cosine similarity between the centred features of every pair of classes: the average of
    all pairwise cosines per class pair (self-pairs left out on the diagonal), computed from per-class
    sums of unit rows in O(N d) (data/class_correlation.py)."""
    return class_pair_stats(features, labels, num_classes, second_moments=False).mean


def class_linkage(correlation: np.ndarray) -> np.ndarray:
    """scipy's complete-linkage tree of the classes, from the correlation map.

    Faithful quirk: like the original we hand the square matrix 1 - M to scipy's `linkage`, which
    treats its K rows as observation vectors (Euclidean distances between rows), not as a
    precomputed distance matrix."""
    distance_rows = 1.0 - np.asarray(correlation, dtype=np.float64)
    with warnings.catch_warnings():  # scipy warns that the matrix looks like distances: here it is on purpose
        warnings.simplefilter("ignore", ClusterWarning)
        return linkage(distance_rows, method="complete")


def clusters_at(tree: np.ndarray, cut: float) -> np.ndarray:
    """Cluster id (0-based) of every class: the tree cut at `cut` x its largest merge height."""
    return fcluster(tree, t=cut * tree[:, 2].max(), criterion="distance") - 1


def superclasses_from_correlation(correlation: np.ndarray, cut: float = SUPERCLASS_CUT) -> np.ndarray:
    """Superclass id (0-based) of every class: complete-linkage clustering (`class_linkage`) cut at
    `cut` x the largest merge height."""
    return clusters_at(class_linkage(correlation), cut)


def transition_matrix(ctype: str, eta: float, num_classes: int, superclass_of=None) -> np.ndarray:
    if ctype == "sym":
        return symmetric_matrix(num_classes, eta)
    if ctype == "asym":
        return asymmetric_matrix(num_classes, eta)
    if ctype == "cc":
        assert superclass_of is not None, "cc corruption needs the superclass of every class"
        return superclass_matrix(superclass_of, eta)
    raise ValueError(f"unknown corruption type {ctype!r}; choose from {CORRUPTION_TYPES}")


def corrupt_labels(labels: torch.Tensor, transition: np.ndarray, seed: int) -> torch.Tensor:
    """Relabel each sample of class i by a draw from transition[i]; deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    true = labels.cpu().numpy()
    noisy = true.copy()
    for cls in range(transition.shape[0]):
        where = np.flatnonzero(true == cls)
        if len(where):
            noisy[where] = rng.choice(transition.shape[0], size=len(where), p=transition[cls])
    return torch.from_numpy(noisy).to(labels.dtype)


def superclasses_from_features(features, labels, num_classes) -> np.ndarray:
    """Superclass id of every class, from the training features (what `cc` corruption uses)."""
    return superclasses_from_correlation(class_correlation_map(features, labels, num_classes))


def superclass_groups(superclass_of) -> list:
    """The superclasses as sorted lists of class indices, ordered by their smallest class
    (singletons included: such a class keeps its labels)."""
    superclass_of = np.asarray(superclass_of)
    groups = [np.flatnonzero(superclass_of == s).tolist() for s in np.unique(superclass_of)]
    return sorted(groups, key=lambda g: g[0])


def format_superclasses(groups, class_names=None) -> str:
    """'{0, 6}, {1, 7}, {2}, ...' (class names instead of indices when given)."""
    name = (lambda c: str(class_names[c])) if class_names is not None else str
    return ", ".join("{" + ", ".join(name(c) for c in group) + "}" for group in groups)


def corruption_matrix_for(ctype, eta, features, labels, num_classes, superclass_of=None):
    """The transition matrix a run uses; `cc` derives superclasses from the train features (unless
    `superclass_of`, computed from them already, is given)."""
    if ctype == "cc" and superclass_of is None:
        superclass_of = superclasses_from_features(features, labels, num_classes)
    return transition_matrix(ctype, eta, num_classes, superclass_of if ctype == "cc" else None)
