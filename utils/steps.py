"""The steps of a chain: the teacher (round 0), the student of round t >= 1, the PLL student.

A step is stored (records, run keys, folder names) as its code: "0" for the teacher, "t" for round
t, "p" for the PLL student (the original's `--dist t` and `--partial`). People read it by its
`label`, the paper's numbering: step 1 is the teacher, step t + 1 the student of round t, then PLL.
Everything else about a step (its label, its teacher, its kind, its seeds) is derived here, so no
other module compares codes.
"""
from dataclasses import dataclass
from enum import IntEnum

_PLL_CODE = "p"
# The PLL student's number in seed derivations (round numbers stay far below it).
_PLL_SEED_NUMBER = 1000


class SeedPurpose(IntEnum):
    """What a derived seed drives, so the two streams of one run never coincide."""
    INIT = 0    # the head's initial weights
    ORDER = 1   # the mini-batch order of every epoch


@dataclass(frozen=True)
class Step:
    code: str

    def __post_init__(self):
        if self.code != _PLL_CODE and not (self.code.isdigit() and str(int(self.code)) == self.code):
            raise ValueError(f"not a step code: {self.code!r} (a round number or 'p')")

    @classmethod
    def teacher(cls) -> "Step":
        return cls("0")

    @classmethod
    def student(cls, round_: int) -> "Step":
        return cls(str(round_))

    @classmethod
    def pll(cls) -> "Step":
        return cls(_PLL_CODE)

    @property
    def is_pll(self) -> bool:
        return self.code == _PLL_CODE

    @property
    def is_teacher(self) -> bool:
        return self.code == "0"

    @property
    def kind(self) -> str:
        """'teacher', 'student' (a distillation round) or 'pll'."""
        return "pll" if self.is_pll else "teacher" if self.is_teacher else "student"

    @property
    def round(self) -> int:
        """Distillation round: 0 for the teacher, t for round t. The PLL student has none (it
        learns from the round-0 teacher and is ordered after every round)."""
        if self.is_pll:
            raise ValueError("the PLL student is not a distillation round")
        return int(self.code)

    @property
    def learns_from(self) -> "Step":
        """The step whose selected checkpoint teaches this one (the PLL student learns from the
        round-0 teacher). Undefined for the teacher."""
        if self.is_teacher:
            raise ValueError("the teacher learns from the corrupted labels, not from a step")
        return Step.teacher() if self.is_pll else Step.student(self.round - 1)

    @property
    def label(self) -> str:
        """The step's name everywhere a person reads it, the paper's numbering (its tables, and the
        theory's rounds: round 1 fits the given labels): '1 (Teacher)', then '2', '3', ... for the
        students of distillation rounds 1, 2, ... (`--dist t` trains step t + 1), and 'PLL'."""
        return "1 (Teacher)" if self.is_teacher else "PLL" if self.is_pll else str(self.round + 1)

    @property
    def title(self) -> str:
        """The step as a sentence names it: 'step 1 (Teacher)', 'step 3', 'step PLL'."""
        return f"step {self.label}"

    def sort_key(self) -> tuple:
        """Teacher, rounds in order, then PLL."""
        return (1, 0) if self.is_pll else (0, self.round)

    def seed(self, seed: int, purpose: SeedPurpose) -> int:
        """The seed of one random stream of this step of the configuration with `seed`."""
        import numpy as np  # here: train_linear.py checks its command line (with Step) before heavy imports

        number = _PLL_SEED_NUMBER if self.is_pll else self.round
        return int(np.random.SeedSequence([seed, number, int(purpose)]).generate_state(1)[0])

    def __str__(self) -> str:
        return self.code


def chain_steps(rounds: int, partial: bool = True) -> list:
    """Teacher, rounds 1..rounds, then (with `partial`) the PLL student."""
    return [Step.student(t) for t in range(rounds + 1)] + ([Step.pll()] if partial else [])


def step_of(code) -> Step:
    """A step from its code as records store it ('0', '3', 'p'), or a Step unchanged."""
    return code if isinstance(code, Step) else Step(str(code))
