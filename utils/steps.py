"""The steps of a chain: the teacher (round 0), the student of round t >= 1, the PLL student.

A step is stored (records, run keys, folder names) as its code: "0" for the teacher, "t" for round
t, "p" for the PLL student. Everything else about a step (its paper label, its teacher, its kind,
its seeds) is derived here, so no other module compares codes.
"""
from dataclasses import dataclass
from enum import IntEnum
from typing import Optional

import numpy as np
import torch

from models.head import init_head_weights
from utils.losses import distillation_targets, pll_candidates
from utils.train import Targets, TrainData, head_logits

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
        """The paper's naming: round 0 is '1 (Teacher)', round t is t+1, the PLL student 'PLL'."""
        return "1 (Teacher)" if self.is_teacher else "PLL" if self.is_pll else str(self.round + 1)

    def sort_key(self) -> tuple:
        """Teacher, rounds in order, then PLL."""
        return (1, 0) if self.is_pll else (0, self.round)

    def seed(self, seed: int, purpose: SeedPurpose) -> int:
        """The seed of one random stream of this step of the configuration with `seed`."""
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


@dataclass
class Lesson:
    """What the runs of one step learn from and start from."""
    targets: Targets
    init: torch.Tensor          # (R, K, d) initial weights
    coverage: Optional[list]    # students: % of training rows whose true class is in the teacher's top-2


def lesson_for(step: Step, data: TrainData, seeds, dim: int, smoothing: torch.Tensor,
               temperature: torch.Tensor,
               teacher_weights: Optional[torch.Tensor] = None) -> Lesson:
    """The teacher fits the corrupted labels (label-smoothed by `smoothing`) from a fresh start; a
    round-t student fits its teacher's softmax at `temperature` from a fresh start; the PLL student
    fits the teacher's top-2 classes as candidate sets, starting from the teacher's weights.
    `seeds`: each run's configuration seed; `teacher_weights`: (R, K, d) for students."""
    k = data.num_classes

    def fresh_start():
        return torch.stack([init_head_weights(k, dim,
                                              torch.Generator().manual_seed(step.seed(s, SeedPurpose.INIT)))
                            for s in seeds])

    if step.is_teacher:
        return Lesson(Targets("hard", data.noisy_labels, smoothing=smoothing), fresh_start(), None)
    # each run's logits on all rows, then its training rows: no (R, N, d) copy of the features
    logits = head_logits(data.features, teacher_weights)
    logits = logits.gather(1, data.train_rows.unsqueeze(-1).expand(-1, -1, k))
    top2 = pll_candidates(logits)
    coverage = ((top2 == data.true_labels.unsqueeze(-1)).any(-1).double().mean(-1) * 100).tolist()
    if step.is_pll:
        return Lesson(Targets("partial", top2), teacher_weights, coverage)
    soft = distillation_targets(logits, temperature)
    return Lesson(Targets("soft", soft, temperature=temperature), fresh_start(), coverage)
