"""The paper's algorithm on tensors: a chain of linear heads on fixed features, batched over runs.

    teacher      fits the corrupted labels (label-smoothed by --label-smoothing), fresh start
    round t      fits softmax(round t-1's logits / T), fresh start
    PLL student  fits the teacher's top-2 classes as candidate sets (generalised cross-entropy,
                 q = 0.7), starting from the teacher's weights

Each step's teacher is the previous step's head at the epoch its selection rule picks
(utils/selection.py). `lesson_for` says what a step learns from and starts from; `fit_chain` runs
a whole chain in memory (what a notebook calls); the training loop is utils/train.py, the losses
utils/losses.py. No files or leases here, and the thread policy is utils/threads.py's: the command
line (utils/engine.py) trains the same steps one at a time, reading each teacher back from its
checkpoint, and gets the same bits.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from models.head import init_head_weights
from utils.losses import distillation_targets, pll_candidates
from utils.runs import Hyper
from utils.selection import DEFAULT, RULE
from utils.steps import SeedPurpose, Step, chain_steps
from utils.threads import cpu_thread_plan
from utils.train import (Targets, TrainData, TrainState, block_logits, eval_rows, per_run, row_blocks,
                         train_heads)

__all__ = ["Hyper", "Lesson", "StepFit", "chain_data", "fit_chain", "lesson_for"]


@dataclass
class Lesson:
    """What the runs of one step learn from and start from."""
    targets: Targets
    init: torch.Tensor          # (R, K, d) initial weights
    coverage: Optional[list]    # students: % of training rows whose true class is in the teacher's top-2


# A student keeps its teacher's soft targets for every training row (one gather a step) while they
# take at most this many floats per run (64 MB); beyond, it computes them from the teacher's
# weights for every mini-batch, as the original does (one more product a step, no N x K array).
# Either way the same bits here: a row of a product is rounded alike in any block of rows.
KEPT_SOFT_TARGETS = 1 << 24


def lesson_for(step: Step, data: TrainData, hypers, seeds,
               teacher_weights: Optional[torch.Tensor] = None) -> Lesson:
    """The teacher fits the corrupted labels (label-smoothed) from a fresh start; a round-t student
    fits its teacher's softmax at its temperature from a fresh start; the PLL student fits the
    teacher's top-2 classes as candidate sets, starting from the teacher's weights.
    `hypers`: each run's Hyper; `seeds`: each run's configuration seed; `teacher_weights`:
    (R, K, d) for students."""
    k, dim, device = data.num_classes, data.features.shape[1], data.features.device

    def fresh_start():
        return torch.stack([init_head_weights(k, dim,
                                              torch.Generator().manual_seed(step.seed(s, SeedPurpose.INIT)))
                            for s in seeds])

    if step.is_teacher:
        smoothing = per_run(hypers, "label_smoothing", device)
        return Lesson(Targets("hard", data.noisy_labels, smoothing=smoothing), fresh_start(), None)
    temperature = per_run(hypers, "temperature", device)
    keep = not step.is_pll and data.train_rows.shape[1] * k <= KEPT_SOFT_TARGETS
    top2, soft = teacher_outputs(data, teacher_weights, temperature, keep)
    coverage = ((top2 == data.true_labels.unsqueeze(-1)).any(-1).double().mean(-1) * 100).tolist()
    if step.is_pll:
        return Lesson(Targets("partial", top2), teacher_weights, coverage)
    teacher = None if keep else teacher_weights
    return Lesson(Targets("soft", soft, temperature=temperature, teacher=teacher), fresh_start(), coverage)


def teacher_outputs(data: TrainData, teacher_weights: torch.Tensor, temperature: torch.Tensor,
                    keep_soft: bool):
    """(top-2 classes (R, N_train, 2) of each run's teacher on its training rows, and with
    `keep_soft` its softmax at the run's temperature (R, N_train, K), else None), from the teacher's
    weights a block of rows at a time."""
    runs, num_rows = data.train_rows.shape
    k = data.num_classes
    top2 = torch.empty(runs, num_rows, 2, dtype=torch.long, device=data.features.device)
    soft = torch.empty(runs, num_rows, k, device=data.features.device) if keep_soft else None
    for r in range(runs):
        for rows in row_blocks(num_rows, k):
            logits = block_logits(data.features, data.train_rows[r, rows], teacher_weights[r])
            top2[r, rows] = pll_candidates(logits)
            if keep_soft:
                soft[r, rows] = distillation_targets(logits.unsqueeze(0), temperature[r:r + 1])[0]
    return top2, soft


def chain_data(features, noisy_labels: torch.Tensor, val_rows: Optional[torch.Tensor] = None,
               val_labels: Optional[torch.Tensor] = None, device=None) -> TrainData:
    """The tensors R runs train on. `features`: a FeatureSet (data/features.py); `noisy_labels`:
    (R, N) or (N,) corrupted labels of all N training samples; `val_rows`: (R, N_val) or (N_val,)
    sorted rows held out for validation (their labels `val_labels`, by default the corrupted ones),
    the other rows are trained on."""
    noisy = noisy_labels.view(-1, noisy_labels.shape[-1])
    runs, num_rows = noisy.shape
    rows = torch.arange(num_rows).expand(runs, -1)
    if val_rows is not None:
        val_rows = val_rows.view(-1, val_rows.shape[-1]).expand(runs, -1)
        kept = torch.ones(runs, num_rows, dtype=torch.bool).scatter_(1, val_rows, False)
        rows = rows[kept].view(runs, -1)
        val_labels = noisy.gather(1, val_rows) if val_labels is None else val_labels.view(runs, -1)
    device = device or features.train_x.device
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    # without a validation split every run trains on all rows: one copy of the rows and clean labels
    true = features.train_y[rows[0]].expand(runs, -1) if val_rows is None else features.train_y[rows]
    return TrainData(on(features.train_x), on(rows), on(noisy.gather(1, rows)), on(true), on(features.test_x),
                     on(features.test_y), on(val_rows), on(val_labels), features.num_classes)


@dataclass
class StepFit:
    """One step of a chain for R runs: its training state (final heads, each selection rule's
    best epoch, per-epoch history) and, for students, the teacher top-2 coverage."""
    state: TrainState
    coverage: Optional[list] = None

    def test_acc(self, rule: str = DEFAULT.name) -> list:
        """Each run's test accuracy (percent) at the epoch `rule` picks ('test', 'val' or 'last')."""
        epochs, _ = self.state.chosen(RULE[rule])
        return [history[e - 1]["test_acc"] for history, e in zip(self.state.history, epochs)]

    def weights(self, rule: str = DEFAULT.name) -> torch.Tensor:
        """(R, K, d): each run's head at the epoch `rule` picks."""
        return self.state.chosen(RULE[rule])[1]


def fit_chain(features, noisy_labels, rounds: int, hyper, seeds=(0,), partial: bool = True,
              selection: str = DEFAULT.name, val_rows=None, on_epoch=None) -> dict:
    """{Step: StepFit} of the chain teacher, rounds 1..`rounds`, then (with `partial`) the PLL
    student, for R runs at once. `features`: a FeatureSet; `noisy_labels`: (R, N) or (N,) corrupted
    training labels (data/corruption.py); `hyper`: a Hyper, or one per run; `seeds`: one per run
    (each run's initial weights and batch orders, as --manualSeed); `selection`: which epoch of a
    step teaches the next; `val_rows`: held-out training rows (see chain_data); `on_epoch(step,
    state)`: called after every epoch. CPU threads as the command line uses them (utils/threads.py:
    they change speed, never a number), torch's thread count restored at the end."""
    data = chain_data(features, torch.as_tensor(noisy_labels), val_rows)
    hypers = list(hyper) if isinstance(hyper, (list, tuple)) else [hyper] * data.train_rows.shape[0]
    fits, threads = {}, torch.get_num_threads()
    try:
        for step in chain_steps(rounds, partial):
            teacher = None if step.is_teacher else fits[step.learns_from].weights(selection)
            lesson = lesson_for(step, data, hypers, seeds, teacher)
            _, tuner = cpu_thread_plan(data.features.device, data.train_rows.shape[1], hypers[0].train_batch,
                                       data.features.shape[1], data.num_classes, print, eval_rows(data))
            callback = None if on_epoch is None else (lambda state, step=step: on_epoch(step, state))
            order = [step.seed(s, SeedPurpose.ORDER) for s in seeds]
            state = train_heads(data, lesson.targets, lesson.init, hypers, order, on_epoch=callback,
                                tuner=tuner)
            fits[step] = StepFit(state, lesson.coverage)
    finally:
        torch.set_num_threads(threads)
    return fits
