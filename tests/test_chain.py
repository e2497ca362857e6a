"""The science layer (utils/chain.py): what each step learns from, and a whole chain in memory
giving the command line's numbers bit for bit."""
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import DIGITS, ROOT
from data.corruption import corrupt_labels, corruption_matrix_for
from data.datasets import digits_features
from data.splits import stratified_val_split
from utils.chain import Hyper, StepFit, fit_chain, lesson_for
from utils.selection import RULE
from utils.steps import Step
from utils.train import TrainData


def _data(runs=2, n=12, d=3, k=4):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n + 2, d, generator=gen)
    rows = torch.stack([torch.arange(n) for _ in range(runs)])
    true = torch.arange(n).remainder(k).expand(runs, n)
    noisy = torch.randint(0, k, (runs, n), generator=gen)
    return TrainData(x, rows, noisy, true, x[:2], torch.tensor([0, 1]), num_classes=k)


def test_each_step_learns_what_the_paper_says():
    data, dim, k = _data(), 3, 4
    hypers = [Hyper(label_smoothing=0.0, temperature=1.0), Hyper(label_smoothing=0.1, temperature=4.0)]
    smoothing, temperature = torch.tensor([0.0, 0.1]), torch.tensor([1.0, 4.0])
    teacher = lesson_for(Step.teacher(), data, hypers, [0, 1])
    assert teacher.targets.kind == "hard" and torch.equal(teacher.targets.values, data.noisy_labels)
    assert torch.equal(teacher.targets.smoothing, smoothing) and teacher.coverage is None
    assert teacher.init.shape == (2, k, dim) and not torch.equal(teacher.init[0], teacher.init[1])

    weights = torch.randn(2, k, dim, generator=torch.Generator().manual_seed(1))
    logits = torch.einsum("nd,rkd->rnk", data.features[:12], weights)
    student = lesson_for(Step.student(1), data, hypers, [0, 1], weights)
    assert student.targets.kind == "soft"
    torch.testing.assert_close(student.targets.values, torch.softmax(logits / temperature[:, None, None], -1))
    assert not torch.equal(student.init, weights)  # a fresh start, not the teacher's weights
    top2 = logits.topk(2, dim=-1).indices
    coverage = (top2 == data.true_labels.unsqueeze(-1)).any(-1).double().mean(-1) * 100
    assert student.coverage == pytest.approx(coverage.tolist())

    pll = lesson_for(Step.pll(), data, hypers, [0, 1], weights)
    assert pll.targets.kind == "partial" and torch.equal(pll.init, weights)
    assert torch.equal(pll.targets.values.sort(-1).values, top2.sort(-1).values)


def _record_numbers(fit: StepFit, r: int) -> dict:
    """What a record says of run r of a step, from the chain in memory."""
    history = fit.state.history[r]
    out = {}
    for rule, suffix in (("test", "bytest"), ("last", "last"), ("val", "byval")):
        if rule == "val" and "val" not in fit.state.best:
            continue
        epoch = fit.state.chosen(RULE[rule])[0][r]
        out[f"epoch_{suffix}"] = epoch
        out[f"test_acc_{suffix}"] = fit.test_acc(rule)[r]
        out[f"test_entropy_{suffix}"] = history[epoch - 1]["test_entropy"]
    out["best_train_acc"] = max(h["train_acc"] for h in history)
    out["teacher_top2_coverage"] = None if fit.coverage is None else fit.coverage[r]
    return out


@pytest.mark.parametrize("val_split", [0.0, 0.1])
def test_a_chain_in_memory_gives_the_command_lines_numbers(cli, val_split):
    """fit_chain on a features file's tensors, with labels corrupted by hand, is the command line's
    chain: the same records' numbers, per-epoch logs and checkpoints, bit for bit."""
    argv = [*DIGITS, "--rounds", 2, "--epochs", 4, "--ctype", "cc", "--corruption", 0.5, "--manualSeed", 3,
            "--selection", "val" if val_split else "test", "--val-split", val_split]
    assert cli(*argv) == 0
    by_step = cli.by_step()

    f = digits_features()
    transition = corruption_matrix_for("cc", 0.5, f.train_x, f.train_y, f.num_classes)
    noisy = corrupt_labels(f.train_y, transition, 3)
    val_rows = None
    if val_split:
        val_rows = torch.from_numpy(stratified_val_split(f.train_y.numpy(), val_split, 3)[1])
    chain = fit_chain(f, noisy, rounds=2, hyper=Hyper(lr=0.05, wd=5e-3, epochs=4), seeds=[3],
                      selection="val" if val_split else "test", val_rows=val_rows)
    assert [str(step) for step in chain] == ["0", "1", "2", "p"]
    for step, fit in chain.items():
        record = by_step[str(step)]
        expected = _record_numbers(fit, 0)
        assert {k: record[k] for k in expected} == expected, step
        assert cli.log(record) == fit.state.history[0], step
        assert torch.equal(cli.checkpoint(record, "last")["model"]["weight"], fit.weights("last")[0])
        assert torch.equal(cli.checkpoint(record, "best")["model"]["weight"], fit.weights("test")[0])


def test_the_readme_notebook_example_runs_and_prints_what_the_readme_says(tmp_path, monkeypatch, capsys):
    """The README's Python example (from a clean clone, no results folder), and its printed output."""
    text = (ROOT / "README.md").read_text()
    code, printed = re.search(r"```python\n(from data\.corruption.*?)```\n\nprints\n\n```\n(.*?)```", text,
                              re.S).groups()
    assert len([line for line in code.splitlines() if line.strip()]) < 10
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out == printed
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["digits.pt"]  # no results folder


def test_every_run_of_a_batched_chain_is_the_chain_alone():
    f = digits_features()
    transition = corruption_matrix_for("sym", 0.4, f.train_x, f.train_y, f.num_classes)
    noisy = torch.stack([corrupt_labels(f.train_y, transition, seed) for seed in (0, 1)])
    hypers = [Hyper(lr=0.05, wd=5e-3, epochs=3), Hyper(lr=0.1, wd=1e-3, epochs=3, temperature=2.0)]
    together = fit_chain(f, noisy, rounds=1, hyper=hypers, seeds=[0, 1])
    for r in range(2):
        alone = fit_chain(f, noisy[r], rounds=1, hyper=hypers[r], seeds=[r])
        for step in together:
            assert together[step].state.history[r] == alone[step].state.history[0]
            assert torch.equal(together[step].weights("test")[r], alone[step].weights("test")[0])
    assert json.dumps(together[Step.pll()].coverage)  # plain floats
