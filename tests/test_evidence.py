"""Feature evidence: the class-pair correlation statistics against brute force over the N x N
matrix (one block of classes and many), the Gram spectrum against a dense eigendecomposition, the
label energy against a dense projection and on cases where it is known, the c / d / e table on a
constructed map, and `--evidence` end to end (contract of evidence.json, other features under the
same name refused, bad input in one line)."""
import json

import numpy as np
import pytest
import torch

from conftest import blob_features, stderr_error_lines
from data.class_correlation import class_pair_stats, unit_row_sums_by_label
from data.corruption import corrupt_labels, corruption_matrix_for, superclasses_from_features
from data.datasets import digits_features
from data.features import FeatureSet
from utils.evidence import (correlation_table, feature_evidence, gram_spectrum, label_energy_curve,
                            spectrum_summary)


def uneven_classes(seed=0, dim=7, sizes=(2, 5, 9, 4)):
    """Clustered features of classes of uneven size (a class of 2: a diagonal cell of 2 pairs)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(sizes), dim, generator=gen) * 2
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    x = centres[labels] + torch.randn(len(labels), dim, generator=gen)
    perm = torch.randperm(len(labels), generator=gen)  # classes interleaved, as in real files
    return x[perm].half().float(), labels[perm]


def brute_force(x, labels, k):
    """(mean, std) per class pair from the full N x N cosine matrix, self-pairs left out."""
    c = x.double() - x.double().mean(0)
    u = c / c.norm(dim=1, keepdim=True)
    cos, y = (u @ u.T).numpy(), labels.numpy()
    mean, std = np.zeros((k, k)), np.zeros((k, k))
    for i in range(k):
        for j in range(k):
            cell = cos[np.ix_(y == i, y == j)]
            if i == j:
                cell = cell[~np.eye(len(cell), dtype=bool)]
            mean[i, j], std[i, j] = cell.mean(), cell.std(ddof=1)
    return mean, std, u


@pytest.mark.parametrize("block_bytes", [1 << 30, 2 * 7 * 7 * 8, 3 * 2 * 7 * 7 * 8],
                         ids=["one block", "a class per block", "uneven blocks"])
def test_pair_statistics_equal_brute_force(block_bytes):
    x, labels = uneven_classes()
    mean, std, u = brute_force(x, labels, 4)
    stats = class_pair_stats(x, labels, 4, block_bytes=block_bytes)
    np.testing.assert_allclose(stats.mean, mean, atol=1e-12)
    # the variance from pair sums of squares loses ~1e-16 absolute to cancellation, so a std of 0 (a
    # class of 2 samples has 2 equal ordered pairs) comes out near 1e-8: compare variances
    np.testing.assert_allclose(stats.std ** 2, std ** 2, atol=1e-12)
    np.testing.assert_allclose(stats.std[std > 1e-3], std[std > 1e-3], rtol=1e-10)
    np.testing.assert_allclose(stats.scatter.numpy(), (u.T @ u).numpy(), atol=1e-12)
    n = torch.bincount(labels).double().numpy()
    np.testing.assert_array_equal(stats.counts.diagonal(), n * (n - 1))


def test_features_stored_in_float16_give_the_same_statistics():
    x, labels = uneven_classes()
    a = class_pair_stats(x.half(), labels, 4)
    b = class_pair_stats(x, labels, 4)  # x holds float16 values already: the upcast is exact
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.std, b.std)


def test_spectrum_equals_the_dense_gram_eigendecomposition():
    x, labels = uneven_classes(seed=1, dim=5)
    _, _, u = brute_force(x, labels, 4)
    dense = np.sort(np.linalg.eigvalsh((u @ u.T).numpy()))[::-1]
    spectrum = gram_spectrum(class_pair_stats(x, labels, 4).scatter)
    assert len(spectrum.eigenvalues) == 5  # rank d: the other N - d eigenvalues are 0
    np.testing.assert_allclose(spectrum.eigenvalues, dense[:5], atol=1e-10)
    assert spectrum.trace == pytest.approx(len(labels))  # unit rows
    summary = spectrum_summary(spectrum, 4)
    assert summary["share_top_k_minus_1"] == pytest.approx(dense[:3].sum() / len(labels))
    assert summary["gap_after_k"] == pytest.approx(dense[3] / dense[4])


def dense_label_share(u, labels, k, m):
    """Share of the centred one-hot labels' energy in the span of the top m eigenvectors of U U^T."""
    y = np.eye(k)[labels.numpy()]
    yc = y - y.mean(0)
    values, vectors = np.linalg.eigh((u @ u.T).numpy())
    top = vectors[:, np.argsort(values)[::-1][:m]]
    return float(np.sum((top.T @ yc) ** 2) / np.sum(yc ** 2))


def energy_curve(x, labels, k, given=None):
    stats = class_pair_stats(x, labels, k)
    sums = unit_row_sums_by_label(x, labels if given is None else given, k, stats.centre)
    counts = torch.bincount(labels if given is None else given, minlength=k)
    return label_energy_curve(sums, counts, stats.class_sums.sum(0), gram_spectrum(stats.scatter))


def test_label_energy_equals_the_dense_projection():
    x, labels = uneven_classes(seed=2)
    _, _, u = brute_force(x, labels, 4)
    noisy = labels.clone()
    noisy[:5] = (noisy[:5] + 1) % 4
    for given in (labels, noisy):
        curve = energy_curve(x, labels, 4, given)
        for m in (1, 3, 4, 7):
            assert curve[m - 1] == pytest.approx(dense_label_share(u, given, 4, m), abs=1e-10)


def test_label_energy_is_all_in_the_class_directions_of_perfectly_clustered_features():
    """Features = one-hot class indicators: the centred features span exactly the centred labels,
    so their top K - 1 eigenvectors carry all of it, for the labels and for any relabelling of
    whole classes; labels independent of the features carry little."""
    k = 4
    labels = torch.arange(40) % k
    x = torch.eye(k)[labels]
    assert energy_curve(x, labels, k)[k - 2] == pytest.approx(1.0, abs=1e-12)
    assert energy_curve(x, labels, k, (labels + 1) % k)[k - 2] == pytest.approx(1.0, abs=1e-12)
    scrambled = torch.tensor([0, 1, 2, 3] * 2 + [1, 2, 3, 0] * 2 + [2, 3, 0, 1] * 2 + [3, 0, 1, 2] * 2
                             + [0, 2, 1, 3] * 2)
    assert energy_curve(x, labels, k, scrambled)[k - 2] < 0.1


def test_table_means_and_spreads_of_a_constructed_map():
    mean = np.array([[0.9, 0.5, 0.1], [0.5, 0.7, 0.2], [0.1, 0.2, 0.8]])
    std = np.array([[0.1, 0.2, 0.3], [0.2, 0.3, 0.4], [0.3, 0.4, 0.5]])
    table = correlation_table(mean, std, np.array([0, 0, 1]))
    assert table["clusters"] == 2
    assert table["c"]["mean"] == pytest.approx(0.8)
    assert table["c"]["var"] == pytest.approx((0.01 + 0.09 + 0.25) / 3)
    assert table["c"]["std"] == pytest.approx(np.sqrt((0.01 + 0.09 + 0.25) / 3))
    assert table["d"] == {"mean": pytest.approx(0.5), "std": pytest.approx(0.2), "var": pytest.approx(0.04),
                          "pairs": 1}
    assert table["e"]["mean"] == pytest.approx(0.15) and table["e"]["var"] == pytest.approx((0.09 + 0.16) / 2)
    assert correlation_table(mean, std, np.array([0, 1, 2]))["d"] is None  # no two classes share a cluster


def test_evidence_of_digits_clusters_as_cc_corruption_does():
    f = digits_features()
    ev = feature_evidence(f)
    groups = [sorted(np.flatnonzero(superclasses_from_features(f.train_x, f.train_y, 10) == s).tolist())
              for s in range(2)]
    assert sorted(ev["superclasses"]) == sorted(groups)
    # the heatmap order keeps every superclass together
    position = {c: i for i, c in enumerate(ev["order"])}
    for group in ev["superclasses"]:
        spots = sorted(position[c] for c in group)
        assert spots == list(range(spots[0], spots[0] + len(group)))


def test_evidence_command_writes_the_contract(cli, capsys):
    assert cli("-d", "digits", "--evidence") == 0
    folder = cli.dirs()["results"] / "evidence" / "digits" / "pixels"
    ev = json.loads((folder / "evidence.json").read_text())
    for split in ("train", "test"):
        assert np.asarray(ev[split]["mean"]).shape == np.asarray(ev[split]["std"]).shape == (10, 10)
    assert ev["clusters"] == 2 and set(ev["c"]) == {"mean", "std", "var", "pairs"} and ev["d"] and ev["e"]
    assert ev["class_names"] == [str(d) for d in range(10)]
    corrupted = [e for e in ev["label_energy"] if e["labels"] == "corrupted"]
    assert [(e["ctype"], e["eta"], e["seed"]) for e in corrupted] == [("cc", 0.5, 0)]
    assert 0 <= corrupted[0]["share_top_k"] < ev["label_energy"][0]["share_top_k"] <= 1
    for name in ("correlation", "dendrogram", "spectrum"):
        assert (folder / f"{name}.png").stat().st_size > 0
    assert "| digits | pixels | 10 | 2 |" in (folder / "evidence.md").read_text()
    assert not (cli.dirs()["results"] / "records").exists()  # nothing trained
    assert "c = 0.42 ± 0.25" in capsys.readouterr().out


def test_a_features_file_of_ones_own_in_one_command(cli, tmp_path):
    path = tmp_path / "mine.npz"
    np.savez(path, **blob_features(num_classes=3), class_names=np.array(["cat", "dog", "eel"]),
             backbone="dino")
    assert cli("--features", path, "--evidence", "--ctype", "sym", "--corruption", 0.3) == 0
    ev = json.loads((cli.dirs()["results"] / "evidence" / "mine" / "dino" / "evidence.json").read_text())
    assert ev["class_names"] == ["cat", "dog", "eel"] and ev["c"]["mean"] > 0.5 > ev["e"]["mean"]
    # other features under the same names are not overwritten unless asked
    np.savez(path, **blob_features(num_classes=3, seed=1), backbone="dino")
    assert cli("--features", path, "--evidence") == 2
    assert cli("--features", path, "--evidence", "--overwrite") == 0


def features_file(tmp_path, **change):
    arrays = {**blob_features(num_classes=3), **change}
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case", ["one sample", "empty class", "one class", "nan", "with rounds"])
def test_bad_input_is_one_line(cli, tmp_path, capsys, case):
    blobs = blob_features(num_classes=3)
    labels = blobs["test_labels"].copy()
    if case == "one sample":
        labels[labels == 2] = 0
        labels[0] = 2
        path = features_file(tmp_path, test_labels=labels)
    elif case == "empty class":
        path = features_file(tmp_path, num_classes=4)
    elif case == "one class":
        path = features_file(tmp_path, train_labels=np.zeros(150, dtype=np.int64),
                             test_labels=np.zeros(60, dtype=np.int64))
    elif case == "nan":
        x = blobs["train_features"].copy()
        x[3, 1] = np.nan
        path = features_file(tmp_path, train_features=x)
    else:
        path = features_file(tmp_path)
    extra = ["--rounds", "1"] if case == "with rounds" else []
    assert cli("--features", path, "--evidence", *extra) == 2
    lines = stderr_error_lines(capsys.readouterr().err)
    assert len(lines) == 1
    expected = {"one sample": "fewer than 2 samples: 2 (1 sample)", "empty class": "3 (0 samples)",
                "one class": "at least 2 classes", "nan": "NaN", "with rounds": "trains nothing"}[case]
    assert expected in lines[0]


def test_feature_set_class_names_must_be_one_string_per_class(tmp_path, cli, capsys):
    path = features_file(tmp_path, class_names=np.array(["a", "b"]))
    assert cli("--features", path, "--evidence") == 2
    assert "class_names must be a list of 3 strings" in capsys.readouterr().err


def test_a_recipe_of_several_sources_gives_one_table_and_one_colour_scale(cli, tmp_path, no_training):
    """`--config R --evidence`: the evidence of every feature source of the recipe (here two features
    files; the paper's six datasets in recipes/fig2.yaml), one table row each, training nothing."""
    paths = []
    for name, seed in (("alpha", 0), ("beta", 1)):
        paths.append(tmp_path / f"{name}.npz")
        np.savez(paths[-1], **blob_features(num_classes=4, seed=seed), backbone="dino")
    recipe = tmp_path / "two.yaml"
    recipe.write_text(f"name: two\ngrid:\n  features: [{paths[0]}, {paths[1]}]\n  corruption: [0.2, 0.4]\n"
                      "  manualSeed: [3, 1]\n")
    assert cli("--config", recipe, "--evidence") == 0
    out = cli.dirs()["results"] / "reports" / "two"
    table = (out / "evidence.md").read_text()
    assert "| alpha | dino | 4 |" in table and "| beta | dino | 4 |" in table
    assert (out / "correlation.png").stat().st_size > 0 and (out / "correlation.pdf").stat().st_size > 0
    ev = json.loads((out / "evidence" / "beta" / "dino" / "evidence.json").read_text())
    corrupted = [(e["eta"], e["seed"]) for e in ev["label_energy"] if e["labels"] == "corrupted"]
    assert corrupted == [(0.2, 1), (0.4, 1)]
    assert not (cli.dirs()["results"] / "records").exists()


def test_corrupted_labels_are_those_a_run_draws():
    """Seed 3 of these blobs: the table's clusters (0.9 cut) differ from cc's superclasses (0.8 cut);
    the evidence corrupts with the superclasses, exactly as a run does."""
    blobs = blob_features(num_classes=6, seed=3, dim=6)
    f = FeatureSet("blobs", "b", *(torch.from_numpy(blobs[k]) for k in
                                   ("train_features", "train_labels", "test_features", "test_labels")), 6)
    ev = feature_evidence(f, [("cc", 0.6, 4), ("sym", 0.6, 4)])
    assert len(ev["superclasses"]) == 3 and ev["clusters"] == 2
    for (ctype, entry) in zip(("cc", "sym"), [e for e in ev["label_energy"] if e["labels"] == "corrupted"]):
        noisy = corrupt_labels(f.train_y, corruption_matrix_for(ctype, 0.6, f.train_x, f.train_y, 6), 4)
        assert entry["realised_corruption"] == float((noisy != f.train_y).double().mean()) * 100
