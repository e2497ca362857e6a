"""Memory that does not grow with N x K: features kept at their stored precision, a teacher's outputs
from its weights, evaluation in blocks, and the up-front estimate that stops a command too large."""
import json

import numpy as np
import pytest
import torch

from conftest import DIGITS, blob_features, stderr_error_lines
import utils.chain
import utils.memory
import utils.train
from utils.runs import VOLATILE_FIELDS
from utils.train import TrainData, evaluate


def _numbers(cli, where) -> dict:
    """{key: record without the fields that say when and where} and {key: last weights}."""
    drop = VOLATILE_FIELDS + ("code_version", "checkpoints")
    records = {r["key"]: {k: v for k, v in r.items() if k not in drop} for r in cli.records(where)}
    weights = {r["key"]: cli.checkpoint(r, "last", where)["model"]["weight"] for r in cli.records(where)}
    return records, weights


def _same(a, b) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_features_kept_in_half_precision_give_the_records_of_the_same_features_upcast_once(cli, tmp_path,
                                                                                          precision):
    """The trainer upcasts rows as it uses them (exact), so a float16 or bfloat16 features file
    and the same values upcast once to float32 give one run key and the same records, bit for bit."""
    arrays = {k: torch.as_tensor(v) for k, v in blob_features(num_train=240, num_test=60, dim=6,
                                                             num_classes=4).items()}
    features = ("train_features", "test_features")
    half = {**arrays, **{k: arrays[k].to(getattr(torch, precision)) for k in features}}
    upcast = {**half, **{k: half[k].float() for k in features}}
    argv = ["--rounds", 1, "--epochs", 3, "--lr", 0.1, "--val-split", 0.2, "--ctype", "cc", "-d", "blobs"]
    for where, content in (("half", half), ("upcast", upcast)):
        torch.save(content, tmp_path / f"{where}.pt")
        assert cli("--features", tmp_path / f"{where}.pt", *argv, where=where) == 0
    assert _same(_numbers(cli, "half"), _numbers(cli, "upcast"))
    assert len(cli.records("half")) == 3


def _rows_round_alike() -> bool:
    """Whether this BLAS rounds a row of an (n x d)(d x K) product as the same row of another
    n-row product (MKL does, except for a single row): then a teacher's outputs are the same bits
    kept for every row or computed per mini-batch."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(1437, 64, generator=gen), torch.randn(10, 64, generator=gen)
    rows = torch.randperm(1437, generator=gen)[:128]
    return torch.equal((x @ w.T)[rows], x[rows] @ w.T)


def test_soft_targets_from_the_teachers_weights_per_mini_batch_give_the_kept_targets_records(cli,
                                                                                            monkeypatch):
    """Above KEPT_SOFT_TARGETS floats a student computes its teacher's softmax per mini-batch (as the
    original), with no N x K array: the same records here, where rows of a product round alike."""
    if not _rows_round_alike():
        pytest.skip("this BLAS rounds a row by the product's size: the two ways differ in the last bits")
    argv = [*DIGITS, "--rounds", 2, "--epochs", 3, "--temperature", 2, "--val-split", 0.1]
    assert cli(*argv, where="kept") == 0
    monkeypatch.setattr(utils.chain, "KEPT_SOFT_TARGETS", 0)
    assert cli(*argv, where="per_batch") == 0
    assert _same(_numbers(cli, "kept"), _numbers(cli, "per_batch"))


def test_evaluation_in_blocks_counts_the_same_and_averages_alike(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(300, 8, generator=gen), torch.randint(0, 5, (300,), generator=gen)
    rows = torch.stack([torch.randperm(300, generator=gen)[:97] for _ in range(2)])
    data = TrainData(x, rows, y[rows], y[rows], x.half(), y, rows, y[rows], num_classes=5)
    weight = torch.randn(2, 5, 8, generator=gen)
    whole = evaluate(data, weight)
    monkeypatch.setattr(utils.train, "BLOCK_LOGITS", 5 * 7)  # 42 blocks of 7 rows and one of 6
    assert [b.stop - b.start for b in utils.train.row_blocks(300, 5)] == [7] * 42 + [6]
    blocks = evaluate(data, weight)
    for name in ("test_acc", "test_top2", "val_acc"):
        assert torch.equal(blocks[name].double(), whole[name].double()), name
    for name in ("test_loss", "test_confidence", "test_entropy"):
        torch.testing.assert_close(blocks[name].double(), whole[name].double(), rtol=1e-6, atol=1e-6)


def test_blocks_cover_the_rows_and_none_is_a_single_row(monkeypatch):
    """A one-row product takes another BLAS path (other rounding): no block is a single row."""
    monkeypatch.setattr(utils.train, "BLOCK_LOGITS", 12)
    for rows in range(1, 50):
        for k in (1, 3, 5):
            blocks = utils.train.row_blocks(rows, k)
            assert [b.start for b in blocks] == [0] + [b.stop for b in blocks[:-1]]
            assert blocks[-1].stop == rows
            assert rows == 1 or min(b.stop - b.start for b in blocks) >= 2, (rows, k)


def test_a_grid_beyond_the_machines_memory_stops_at_once_naming_the_fix(cli, tmp_path, capsys, monkeypatch,
                                                                        no_training):
    """Four chains trained together need more than this (pretended) machine has: one line with the
    estimate and the --max-batch-runs that fits, before anything is trained."""
    import utils.engine
    per_run = utils.memory.run_bytes(1437, 64, 10, 128, 1437 * 10)
    monkeypatch.setattr(utils.engine, "resident_bytes", lambda: 10**8)
    have = 10**8 + utils.memory.BLOCK_BYTES + int(2.5 * per_run)
    monkeypatch.setattr(utils.memory, "machine_memory", lambda device: have)
    recipe = tmp_path / "four.yaml"
    recipe.write_text("name: four\nrounds: 1\ngrid:\n  dataset: digits\n  manualSeed: [0, 1, 2, 3]\n"
                      "  epochs: 2\n")
    assert cli("--config", recipe) == 2
    (line,) = stderr_error_lines(capsys.readouterr().err)
    assert "per run x 4 runs trained together" in line and "--max-batch-runs 2" in line
    assert cli.records() == []


def test_a_features_file_beyond_the_machines_memory_is_one_line(cli, tmp_path, capsys, monkeypatch):
    path = tmp_path / "big.npz"
    np.savez(path, **blob_features())
    import utils.engine
    monkeypatch.setattr(utils.engine, "machine_memory", lambda device: utils.memory.resident_bytes() + 100)
    assert cli("--features", path, "--epochs", 1) == 2
    (line,) = stderr_error_lines(capsys.readouterr().err)
    assert f"features file {path} needs about" in line and "fewer rows" in line
    assert json.dumps(line)
