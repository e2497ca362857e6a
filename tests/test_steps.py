"""The Step type (utils/steps.py): codes, labels, teachers, order and seeds."""
import numpy as np
import pytest

from utils.steps import SeedPurpose, Step, chain_steps, step_of


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
