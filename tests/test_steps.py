"""The Step type and what each step learns from (utils/steps.py)."""
import numpy as np
import pytest
import torch

from utils.steps import SeedPurpose, Step, chain_steps, lesson_for, step_of
from utils.train import TrainData


def test_codes_labels_teachers_and_order():
    steps = chain_steps(3)
    assert [str(s) for s in steps] == ["0", "1", "2", "3", "p"]
    assert [s.label for s in steps] == ["1 (Teacher)", "2", "3", "4", "PLL"]
    assert [s.kind for s in steps] == ["teacher", "student", "student", "student", "pll"]
    assert [str(s.learns_from) for s in steps[1:]] == ["0", "1", "2", "0"]
    assert sorted(reversed(steps), key=Step.sort_key) == steps
    assert [str(s) for s in chain_steps(0, partial=False)] == ["0"]
    assert step_of("p") == Step.pll() and step_of(Step.teacher()) == Step("0")
    with pytest.raises(ValueError):
        Step.teacher().learns_from
    for bad in ("", "01", "-1", "q", "1.0"):
        with pytest.raises(ValueError):
            Step(bad)


def test_seeds_are_the_stored_runs_streams():
    """The seeds of existing stores: SeedSequence([seed, round (PLL: 1000), purpose]); the two
    purposes and the steps give distinct streams."""
    def expected(seed, number, purpose):
        return int(np.random.SeedSequence([seed, number, purpose]).generate_state(1)[0])
    assert Step("3").seed(7, SeedPurpose.ORDER) == expected(7, 3, 1)
    assert Step.pll().seed(0, SeedPurpose.INIT) == expected(0, 1000, 0)
    seeds = {s.seed(0, p) for s in chain_steps(4) for p in SeedPurpose}
    assert len(seeds) == 2 * 6


def _data(runs=2, n=12, d=3, k=4):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n + 2, d, generator=gen)
    rows = torch.stack([torch.arange(n) for _ in range(runs)])
    true = torch.arange(n).remainder(k).expand(runs, n)
    noisy = torch.randint(0, k, (runs, n), generator=gen)
    return TrainData(x, rows, noisy, true, x[:2], torch.tensor([0, 1]), num_classes=k)


def test_each_step_learns_what_the_paper_says():
    data, dim, k = _data(), 3, 4
    smoothing, temperature = torch.tensor([0.0, 0.1]), torch.tensor([1.0, 4.0])
    teacher = lesson_for(Step.teacher(), data, [0, 1], dim, smoothing, temperature)
    assert teacher.targets.kind == "hard" and torch.equal(teacher.targets.values, data.noisy_labels)
    assert torch.equal(teacher.targets.smoothing, smoothing) and teacher.coverage is None
    assert teacher.init.shape == (2, k, dim) and not torch.equal(teacher.init[0], teacher.init[1])

    weights = torch.randn(2, k, dim, generator=torch.Generator().manual_seed(1))
    logits = torch.einsum("nd,rkd->rnk", data.features[:12], weights)
    student = lesson_for(Step.student(1), data, [0, 1], dim, smoothing, temperature, weights)
    assert student.targets.kind == "soft"
    torch.testing.assert_close(student.targets.values, torch.softmax(logits / temperature[:, None, None], -1))
    assert not torch.equal(student.init, weights)  # a fresh start, not the teacher's weights
    top2 = logits.topk(2, dim=-1).indices
    coverage = (top2 == data.true_labels.unsqueeze(-1)).any(-1).double().mean(-1) * 100
    assert student.coverage == pytest.approx(coverage.tolist())

    pll = lesson_for(Step.pll(), data, [0, 1], dim, smoothing, temperature, weights)
    assert pll.targets.kind == "partial" and torch.equal(pll.init, weights)
    assert torch.equal(pll.targets.values.sort(-1).values, top2.sort(-1).values)
