"""Label corruption: transition matrices (named edge cases), sampling, superclasses from features."""
import math

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist

from data.corruption import (class_correlation_map, corrupt_labels, corruption_matrix_for, superclass_matrix,
                             superclasses_from_correlation, transition_matrix)

# (row name, ctype, eta, K, superclass_of, expected matrix written out by hand)
MATRIX_ROWS = [
    ("sym_eta0", "sym", 0.0, 3, None, [[1, 0, 0], [0, 1, 0], [0, 0, 1]]),
    ("sym_eta1", "sym", 1.0, 3, None, [[0, .5, .5], [.5, 0, .5], [.5, .5, 0]]),
    ("sym_K2", "sym", 0.3, 2, None, [[.7, .3], [.3, .7]]),
    ("sym_K4", "sym", 0.6, 4, None, [[.4, .2, .2, .2], [.2, .4, .2, .2], [.2, .2, .4, .2], [.2, .2, .2, .4]]),
    ("asym_K4", "asym", 0.4, 4, None,
     [[.6, .2, .1, .1], [.1, .6, .2, .1], [.1, .1, .6, .2], [.2, .1, .1, .6]]),
    ("asym_K2", "asym", 0.5, 2, None, [[.5, .5], [.5, .5]]),
    ("asym_eta0", "asym", 0.0, 3, None, [[1, 0, 0], [0, 1, 0], [0, 0, 1]]),
    ("asym_eta1_K3", "asym", 1.0, 3, None, [[0, 2 / 3, 1 / 3], [1 / 3, 0, 2 / 3], [2 / 3, 1 / 3, 0]]),
    ("cc_two_blocks", "cc", 0.6, 5, [0, 0, 1, 1, 1],
     [[.4, .6, 0, 0, 0], [.6, .4, 0, 0, 0], [0, 0, .4, .3, .3], [0, 0, .3, .4, .3], [0, 0, .3, .3, .4]]),
    ("cc_singleton", "cc", 0.5, 3, [0, 0, 1], [[.5, .5, 0], [.5, .5, 0], [0, 0, 1]]),
    ("cc_all_singletons", "cc", 0.9, 3, [0, 1, 2], [[1, 0, 0], [0, 1, 0], [0, 0, 1]]),
    ("cc_eta1_pair", "cc", 1.0, 3, [1, 0, 1], [[0, 0, 1], [0, 1, 0], [1, 0, 0]]),
    ("cc_eta0", "cc", 0.0, 3, [0, 0, 0], [[1, 0, 0], [0, 1, 0], [0, 0, 1]]),
]


@pytest.mark.parametrize("name,ctype,eta,k,sup,expected", MATRIX_ROWS, ids=[r[0] for r in MATRIX_ROWS])
def test_transition_matrix_entries(name, ctype, eta, k, sup, expected):
    p = transition_matrix(ctype, eta, k, None if sup is None else np.array(sup))
    assert p.shape == (k, k)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(p, np.array(expected, dtype=float), atol=1e-12)
    assert (p >= 0).all()


def test_unknown_ctype_raises():
    with pytest.raises(ValueError, match="unknown corruption type"):
        transition_matrix("pairflip", 0.3, 4)


def _balanced_labels(n, k):
    return torch.arange(n) % k


# (row name, ctype, eta, K, superclass_of)
SAMPLING_ROWS = [
    ("sym", "sym", 0.3, 10, None),
    ("asym", "asym", 0.5, 5, None),
    ("sym_K2", "sym", 0.2, 2, None),
    ("cc_with_singleton", "cc", 0.6, 4, [0, 0, 0, 1]),
]


@pytest.mark.parametrize("name,ctype,eta,k,sup", SAMPLING_ROWS, ids=[r[0] for r in SAMPLING_ROWS])
def test_sampled_transitions_match_matrix(name, ctype, eta, k, sup):
    """Each class's empirical relabelling frequencies match its row (4 binomial sigmas), and the
    realised corruption rate matches the matrix's off-diagonal mass."""
    n = 20000
    labels = _balanced_labels(n, k)
    p = transition_matrix(ctype, eta, k, None if sup is None else np.array(sup))
    noisy = corrupt_labels(labels, p, seed=7)
    assert noisy.dtype == labels.dtype and noisy.shape == labels.shape
    for i in range(k):
        got = torch.bincount(noisy[labels == i], minlength=k).numpy()
        m = got.sum()
        sigma = np.sqrt(p[i] * (1 - p[i]) / m)
        assert (np.abs(got / m - p[i]) <= 4 * sigma + 1e-12).all(), (i, got / m, p[i])
    rate = float((noisy != labels).double().mean())
    expected = float(np.mean(1 - np.diag(p)))
    assert abs(rate - expected) <= 4 * math.sqrt(expected * (1 - expected) / n) + 1e-12


def test_eta0_keeps_all_and_sym_eta1_moves_all():
    labels = _balanced_labels(3000, 6)
    assert torch.equal(corrupt_labels(labels, transition_matrix("sym", 0.0, 6), 3), labels)
    moved = corrupt_labels(labels, transition_matrix("sym", 1.0, 6), 3)
    assert (moved != labels).all()


def test_corruption_deterministic_per_seed_and_differs_across_seeds():
    labels = _balanced_labels(5000, 10)
    original = labels.clone()
    p = transition_matrix("sym", 0.4, 10)
    a, b, c = corrupt_labels(labels, p, 1), corrupt_labels(labels, p, 1), corrupt_labels(labels, p, 2)
    assert torch.equal(a, b)
    assert (a != c).double().mean() > 0.2
    assert torch.equal(labels, original), "corrupt_labels must not modify its input"


def test_singleton_superclass_keeps_its_labels_and_lowers_the_realised_rate():
    n, eta = 30000, 0.5
    labels = _balanced_labels(n, 3)
    with_singleton = corrupt_labels(labels, superclass_matrix(np.array([0, 0, 1]), eta), 5)
    no_singleton = corrupt_labels(labels, superclass_matrix(np.array([0, 0, 0]), eta), 5)
    lone = labels == 2
    assert torch.equal(with_singleton[lone], labels[lone])
    assert set(with_singleton[~lone].unique().tolist()) == {0, 1}  # stays inside its superclass
    rate_s = float((with_singleton != labels).double().mean())
    rate_n = float((no_singleton != labels).double().mean())
    tol = 4 * math.sqrt(0.25 / n)
    assert abs(rate_s - eta * 2 / 3) < tol and abs(rate_n - eta) < tol
    assert rate_s < rate_n


def _same_partition(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return all(((a == a[i]) == (b == b[i])).all() for i in range(len(a)))


def test_superclasses_of_two_obvious_blocks():
    m = np.full((6, 6), 0.05)
    m[:3, :3] = 0.9
    m[3:, 3:] = 0.85
    np.fill_diagonal(m, 1.0)
    ids = superclasses_from_correlation(m)
    assert _same_partition(ids, [0, 0, 0, 1, 1, 1])
    assert sorted(set(ids.tolist())) == [0, 1]  # 0-based ids


def test_superclasses_isolate_an_outlier_class():
    m = np.full((5, 5), 0.0)
    m[:4, :4] = 0.9
    np.fill_diagonal(m, 1.0)
    m[4, :4] = m[:4, 4] = -0.8
    ids = superclasses_from_correlation(m)
    assert _same_partition(ids, [0, 0, 0, 0, 1])
    p = superclass_matrix(ids, 0.4)
    assert p[4, 4] == 1.0 and np.allclose(p.sum(1), 1)


def test_superclasses_cluster_rows_of_one_minus_m_as_vectors():
    """The faithful quirk: rows of 1 - M are observation vectors (Euclidean), complete linkage,
    cut at 0.8 x the largest merge height."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.normal(size=(8, 8))
        m = np.corrcoef(a)
        tree = linkage(pdist(1 - m, metric="euclidean"), method="complete")
        expected = fcluster(tree, t=0.8 * tree[:, 2].max(), criterion="distance") - 1
        np.testing.assert_array_equal(superclasses_from_correlation(m), expected)


def test_class_correlation_map_equals_brute_force():
    rng = np.random.default_rng(1)
    k = 4
    labels = torch.from_numpy(rng.permutation(np.arange(37) % k))
    x = torch.from_numpy(rng.normal(size=(37, 5)) + 2.0).float()
    got = class_correlation_map(x, labels, k)
    xc = x.double() - x.double().mean(0)
    u = xc / xc.norm(dim=1, keepdim=True)
    cos = (u @ u.T).numpy()
    y = labels.numpy()
    expected = np.zeros((k, k))
    for i in range(k):
        for j in range(k):
            vals = [cos[a, b] for a in np.flatnonzero(y == i) for b in np.flatnonzero(y == j) if a != b]
            expected[i, j] = np.mean(vals)
    np.testing.assert_allclose(got, expected, atol=1e-10)
    np.testing.assert_allclose(got, got.T, atol=1e-12)


def test_cc_from_features_moves_labels_only_within_feature_clusters():
    """End to end: classes 0-2 share one feature direction and 3-5 another; cc noise stays inside."""
    rng = np.random.default_rng(2)
    k, per = 6, 40
    y = np.repeat(np.arange(k), per)
    directions = np.zeros((k, 8))
    directions[:3, 0] = 5.0
    directions[3:, 1] = 5.0
    directions[np.arange(k), 2 + np.arange(k)] = 1.0  # classes differ a little inside a block
    x = torch.from_numpy(directions[y] + 0.3 * rng.normal(size=(len(y), 8))).float()
    labels = torch.from_numpy(y)
    p = corruption_matrix_for("cc", 0.5, x, labels, k)
    block = np.array([0, 0, 0, 1, 1, 1])
    expected = superclass_matrix(block, 0.5)
    np.testing.assert_allclose(p, expected, atol=1e-12)
    noisy = corrupt_labels(labels, p, 0).numpy()
    assert (block[noisy] == block[y]).all()
    assert (noisy != y).mean() > 0.3
