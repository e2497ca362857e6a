"""The one training loop: R linear heads trained at once on one in-memory feature matrix.

A single run is R = 1. Runs in a batch share the features, the epoch count and the batch size;
everything else is per run (`utils.runs.Hyper`, by name): training rows, targets, learning rate,
weight decay, momentum, lr decay and the shuffling order (drawn from the run's own seed).

`PlainSGD` is the definition of an epoch, written plainly: shuffled mini-batches, the loss's
gradient, and SGD with momentum and L2 weight decay as torch.optim.SGD:
    buf = m * buf + (grad + wd * W);   W -= lr * buf;   lr = lr0 * gamma^epoch.
`_BatchedSGD` is the same epoch made fast (shared gathers, step buffers, cache-sized updates); it
gives the same bits (tests/test_train.py compares them), and `train_heads` uses it.

A run gives the same bits alone or in any batch: every matrix product of a run has a shape that
does not depend on the batch (one (B x d)(d x K) product per run and step in a batched product,
one (N x d)(d x K) product per run for evaluation), and every other operation is elementwise or
row-wise with the same per-element code whatever the batch. The one exception is opt-in
(`fuse_shared_order`): runs that share their mini-batches multiply them as one wider product,
faster but rounded differently from the same run alone on some BLAS builds.
"""
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional, Union

import numpy as np
import torch

from utils.losses import distillation_targets, generalized_cross_entropy, hard_label_cross_entropy, \
    soft_cross_entropy
from utils.selection import TRACKED
from utils.threads import step_chunks


@dataclass
class TrainData:
    """Tensors on the training device. Rows index into `features`."""
    features: torch.Tensor        # (N, d) as stored (float32, float16, bfloat16): upcast rows as used
    train_rows: torch.Tensor      # (R, N_train) long: the rows each run trains on
    noisy_labels: torch.Tensor    # (R, N_train) the (corrupted) labels of those rows
    true_labels: torch.Tensor     # (R, N_train) their clean labels (metrics only)
    test_features: torch.Tensor   # (N_test, d), as stored
    test_labels: torch.Tensor     # (N_test,)
    val_rows: Optional[torch.Tensor] = None    # (R, N_val) held-out rows, or None
    val_labels: Optional[torch.Tensor] = None  # (R, N_val) labels used to select on val
    num_classes: int = 0


@dataclass
class Targets:
    """What the runs fit. kind 'hard': values (R, N_train) labels, smoothed by `smoothing` (R,);
    'soft': the teacher's softmax at `temperature` (R,) (applied to the student too), either kept
    as values (R, N_train, K) or, with `teacher` (R, K, d) weights and values None, computed from
    each mini-batch's rows as the original does; 'partial': values (R, N_train, 2) candidate
    classes, fitted with generalised CE."""
    kind: str
    values: Optional[torch.Tensor]
    smoothing: Optional[torch.Tensor] = None
    temperature: Optional[torch.Tensor] = None
    teacher: Optional[torch.Tensor] = None

    def loss(self) -> Callable:
        """f(logits (R, B, K), batch targets) -> (loss (R,), gradient (R, B, K)). Smoothing and
        temperature are left out when every run uses the plain value (0 / 1), so a step skips passes
        whose result is known (checked once, not per step)."""
        plain = lambda v, value: v is None or bool((v == value).all())  # noqa: E731
        if self.kind == "hard":
            smoothing = None if plain(self.smoothing, 0.0) else self.smoothing
            return partial(hard_label_cross_entropy, alpha=smoothing)
        if self.kind == "soft":
            temperature = None if plain(self.temperature, 1.0) else self.temperature
            return partial(soft_cross_entropy, temperature=temperature)
        if self.kind == "partial":
            return generalized_cross_entropy
        raise ValueError(f"unknown target kind {self.kind!r}")

    def at(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The targets of each run's training rows at `positions` (R, B), whose features are x (R, B, d)."""
        if self.kind == "hard":
            return self.values.gather(1, positions)
        if self.values is None:
            return distillation_targets(torch.bmm(x, self.teacher.transpose(1, 2)), self.temperature)
        return self.values[torch.arange(len(positions), device=positions.device)[:, None], positions]


def per_run(hypers, name: str, device=None) -> torch.Tensor:
    """One hyper-parameter of every run, (R,) float32."""
    return torch.tensor([float(getattr(h, name)) for h in hypers], dtype=torch.float32, device=device)


def shared_setting(hypers, name: str):
    """A hyper-parameter that the runs of one batch share (epochs, batch size)."""
    values = {getattr(h, name) for h in hypers}
    assert len(values) == 1, f"runs trained together must share {name}, got {sorted(values)}"
    return values.pop()


@dataclass
class Snapshot:
    """The heads at each run's best epoch by some accuracy (percent), first maximum wins."""
    acc: torch.Tensor       # (R,)
    epoch: torch.Tensor     # (R,) long, 1-based; 0 = none yet
    weight: torch.Tensor    # (R, K, d)
    momentum: torch.Tensor  # (R, K, d)

    @staticmethod
    def empty(weight):
        r = weight.shape[0]
        acc = torch.full((r,), -1.0, device=weight.device)
        epoch = torch.zeros(r, dtype=torch.long, device=weight.device)
        return Snapshot(acc, epoch, weight.clone(), torch.zeros_like(weight))

    def update(self, acc, epoch, weight, momentum):
        better = acc > self.acc
        self.acc = torch.where(better, acc, self.acc)
        self.epoch = torch.where(better, torch.full_like(self.epoch, epoch), self.epoch)
        mask = better.view(-1, 1, 1)
        self.weight = torch.where(mask, weight, self.weight)
        self.momentum = torch.where(mask, momentum, self.momentum)


@dataclass
class TrainState:
    """Everything needed to report a batch of runs or to resume it after `epoch` epochs."""
    epoch: int
    weight: torch.Tensor
    momentum: torch.Tensor
    best: dict   # rule name -> Snapshot of its best epoch (utils.selection.TRACKED; "val" with a val split)
    history: list = field(default_factory=list)  # per run: list of per-epoch metric dicts

    def chosen(self, rule) -> tuple:
        """(each run's epoch, weights (R, K, d)) that a selection rule picks."""
        if rule.metric is None:
            return [self.epoch] * self.weight.shape[0], self.weight
        snap = self.best[rule.name]
        return [int(e) for e in snap.epoch], snap.weight


class NonFiniteLoss(Exception):
    def __init__(self, epoch: int, run: int):
        super().__init__(f"epoch {epoch}, run {run}")
        self.epoch, self.run = epoch, run


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for one run's shuffling order in one epoch."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def shuffled_positions(num_rows: int, seeds, epoch: int) -> torch.Tensor:
    """(R, num_rows) permutations, each from its run's own seed (independent of the batch)."""
    gen = torch.Generator()
    return torch.stack([torch.randperm(num_rows, generator=gen.manual_seed(epoch_seed(seed, epoch)))
                        for seed in seeds])


def shared_order_group_size(shuffle_seeds, train_rows: torch.Tensor) -> int:
    """G when the runs form contiguous blocks of G runs with one shuffle seed and the same training
    rows (e.g. the corruption rates of one seed in a grid), else 1.

    Runs of a block see the same mini-batches, so their G heads multiply the batch as ONE wider
    matmul (B x d times d x G*K): far better use of the matmul units than G thin ones."""
    r = len(shuffle_seeds)
    for g in range(r, 1, -1):
        if r % g:
            continue
        blocks = [shuffle_seeds[i:i + g] for i in range(0, r, g)]
        if all(len(set(b)) == 1 for b in blocks) and len({b[0] for b in blocks}) == len(blocks):
            rows = train_rows.view(r // g, g, -1)
            if bool((rows == rows[:, :1]).all()):
                return g
            return 1
    return 1


def _classes_below(logits: torch.Tensor, labels: torch.Tensor, compared: Optional[torch.Tensor] = None,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """How many classes have a logit strictly below the label's, per sample, as float32 (exact:
    a sum of zeros and ones). logits (R, B, K), labels (R, B) or (S, R, B) for S label sets.

    The comparison writes floats, not bools: torch vectorises a comparison whose result has the
    inputs' dtype, not one that makes bools (5x slower). `compared`: a float buffer of shape
    (*labels.shape, K) for the comparison; `out`: where the counts go."""
    label_logit = logits.expand(*labels.shape, -1).gather(-1, labels.unsqueeze(-1))
    if compared is None:
        compared = logits.new_empty((*labels.shape, logits.shape[-1]))
    return torch.sum(torch.lt(logits, label_logit, out=compared), -1, out=out)


def topk_hits(logits: torch.Tensor, labels: torch.Tensor):
    """(top-1 hits, top-2 hits) per run, summed over samples. logits (R, B, K), labels (R, B), or
    (S, R, B) for S label sets scored against the same logits (results then (S, R)).

    A sample's label ranks below every class whose logit is not strictly smaller, so ties and NaNs
    count against it (a constant predictor scores 0, not 100%). One compare and one count: topk is
    several times slower on CPU."""
    return _hits(_classes_below(logits, labels), logits.shape[-1])


def _hits(below: torch.Tensor, num_classes: int):
    return (below == num_classes - 1).sum(-1), (below >= num_classes - 2).sum(-1)


# Rows scored at once (evaluation, a teacher's outputs): about this many logits (16 MB), so that
# nothing of size N x K is held for a run. This BLAS rounds each row of an (n x d)(d x K) product as
# the same row of any other n-row product (a one-row product takes another path: never one row).
BLOCK_LOGITS = 1 << 22


def row_blocks(num_rows: int, num_classes: int) -> list:
    """Consecutive slices of about BLOCK_LOGITS logits each, none of one row (unless there is one row)."""
    size = max(2, BLOCK_LOGITS // num_classes)
    starts = list(range(0, num_rows, size))
    if len(starts) > 1 and num_rows - starts[-1] == 1:
        starts.pop()  # the last block takes the single row left
    return [slice(start, stop) for start, stop in zip(starts, starts[1:] + [num_rows])]


def block_logits(features: torch.Tensor, rows, weight: torch.Tensor) -> torch.Tensor:
    """The float32 logits (n, K) of features[rows] (upcast from their stored precision) under one head."""
    return features[rows].float() @ weight.T


def _test_metrics(logits: torch.Tensor, labels: torch.Tensor) -> tuple:
    """(top-1 hits, top-2 hits, {mean test loss, confidence (%), entropy (nats)}) of ONE run on a
    block of rows: logits (1, n, K), labels (1, n). Evaluated run by run so that every sum over rows
    has the same shape (and so the same bits) whatever the batch."""
    top1, top2 = topk_hits(logits, labels)
    log_p = torch.log_softmax(logits, dim=-1)
    probs = log_p.exp()
    return top1, top2, {"test_loss": -log_p.gather(-1, labels.unsqueeze(-1)).mean((1, 2)),
                        # calibration view of the "diffusion" effect: mean max-probability and entropy
                        "test_confidence": probs.amax(-1).mean(-1) * 100,
                        "test_entropy": -(probs * log_p).sum(-1).mean(-1)}


def _run_test_metrics(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> dict:
    """One run's test metrics, a block of rows at a time: accuracies from the hits of all blocks,
    the means weighted by the blocks' rows (one block: its own means)."""
    blocks = row_blocks(len(labels), weight.shape[0])
    parts = [_test_metrics(block_logits(features, rows, weight).unsqueeze(0), labels[rows].unsqueeze(0))
             for rows in blocks]
    n = len(labels)
    means = parts[0][2] if len(parts) == 1 else {
        name: sum(part[2][name].double() * (rows.stop - rows.start) for part, rows in zip(parts, blocks)) / n
        for name in parts[0][2]}
    top1, top2 = (sum(part[i] for part in parts) for i in (0, 1))
    return {"test_loss": means["test_loss"], "test_acc": top1 * (100.0 / n), "test_top2": top2 * (100.0 / n),
            "test_confidence": means["test_confidence"], "test_entropy": means["test_entropy"]}


def eval_rows(data: TrainData) -> list:
    """The sizes of the blocks of rows an evaluation scores at once (test, then validation rows)."""
    counts = [len(data.test_labels)] + ([data.val_rows.shape[1]] if data.val_rows is not None else [])
    return sorted({rows.stop - rows.start for n in counts for rows in row_blocks(n, data.num_classes)})


@torch.no_grad()
def evaluate(data: TrainData, weight: torch.Tensor) -> dict:
    """Per run: test loss, top-1/top-2 accuracy (percent), confidence and entropy; val accuracy
    when a val split exists. Run by run, a block of rows at a time (nothing N x K is held)."""
    runs = [_run_test_metrics(data.test_features, data.test_labels, w) for w in weight]
    out = {name: torch.cat([run[name] for run in runs]) for name in runs[0]}
    if data.val_rows is not None:
        hits = [sum(topk_hits(block_logits(data.features, rows[block], w).unsqueeze(0),
                              labels[block].unsqueeze(0))[0]
                    for block in row_blocks(len(rows), w.shape[0]))
                for rows, labels, w in zip(data.val_rows, data.val_labels, weight)]
        out["val_acc"] = torch.cat(hits) * (100.0 / data.val_rows.shape[1])
    return out


class PlainSGD:
    """The definition of an epoch of every run, as torch.optim.SGD with momentum and L2 weight
    decay would take it, on each run's own shuffled mini-batches; also the train loss and hits."""

    def __init__(self, data: TrainData, targets: Targets, hypers, shuffle_seeds, weight, momentum):
        self.data, self.targets, self.seeds = data, targets, list(shuffle_seeds)
        self.weight, self.momentum, self.loss = weight, momentum, targets.loss()
        self.batch_size = shared_setting(hypers, "train_batch")
        self.lr0, self.gamma, self.wd, self.m = (per_run(hypers, name, weight.device).view(-1, 1, 1)
                                                 for name in ("lr", "gamma", "wd", "momentum"))

    def epoch(self, epoch: int, tuner=None):
        """(train loss (R,) float64, hits (4, R): noisy top-1, top-2, true top-1, top-2)."""
        data, (num_runs, num_train) = self.data, self.data.train_rows.shape
        self.lr = self.lr0 * self.gamma ** epoch
        positions = shuffled_positions(num_train, self.seeds, epoch).to(self.weight.device)
        loss_sum = torch.zeros(num_runs, dtype=torch.float64, device=self.weight.device)
        hits = torch.zeros(4, num_runs, dtype=torch.long, device=self.weight.device)
        for start in range(0, num_train, self.batch_size):
            at = positions[:, start:start + self.batch_size]
            x = data.features[data.train_rows.gather(1, at)].float()                   # (R, b, d)
            logits = torch.bmm(x, self.weight.transpose(1, 2))
            loss, grad_logits = self.loss(logits, self.targets.at(at, x))
            grad = torch.baddbmm(self.wd * self.weight, grad_logits.transpose(1, 2), x)
            self.momentum.mul_(self.m).add_(grad)
            self.weight.sub_(self.lr * self.momentum)
            loss_sum.add_(loss, alpha=x.shape[1])
            labels = torch.stack([data.noisy_labels.gather(1, at), data.true_labels.gather(1, at)])
            hits += torch.stack(topk_hits(logits, labels), 1).view(4, -1)
        return loss_sum / num_train, hits


# On one CPU thread a step updates the heads of a few runs at a time, about this many bytes of
# weights each: their weights, momenta and decay buffers then stay in the core's L2 cache through
# the update's passes instead of streaming from memory once per pass (~7% of an epoch at R = 8,
# d = 512, K = 100). Threads, or a GPU, have more cache and pay more per call: all runs at once.
# Every pass is elementwise per run and a slice of a batched product is the same product per run,
# so this changes speed, never a number.
UPDATE_CHUNK_BYTES = 1 << 19


@dataclass
class _Unit:
    """Runs whose heads are updated together, as views of the whole batch's tensors."""
    orders: Union[slice, int]  # the gathered batches they multiply (for runs sharing one: its index)
    runs: slice
    weight: torch.Tensor
    momentum: torch.Tensor
    decayed: torch.Tensor  # wd * W + gradient, then lr * momentum
    weight_decay: torch.Tensor
    momentum_factor: torch.Tensor
    lr: torch.Tensor


class _BatchedSGD:
    """The epoch of `PlainSGD`, fast, with the same bits: what stays fixed through a train_heads
    call (how its runs share mini-batches, the runs updated together, preallocated step buffers).

    Runs in blocks of `shared` see the same mini-batches (shared_order_group_size): gathered once
    per block; their products are one wide matmul when fused, else one (B x d)(d x K) product per
    run on the shared rows. Fresh MB-sized temporaries each step would cost page faults on CPU,
    hence the buffers."""

    def __init__(self, data: TrainData, targets: Targets, hypers, shuffle_seeds, weight: torch.Tensor,
                 momentum: torch.Tensor, fuse: bool = False):
        self.data, self.targets, self.batch_size = data, targets, shared_setting(hypers, "train_batch")
        self.weight, self.momentum = weight, momentum
        self.lr0, self.gamma, self.wd, self.momentum_factor = (
            per_run(hypers, name, weight.device).view(-1, 1, 1) for name in ("lr", "gamma", "wd", "momentum"))
        self.seeds = list(shuffle_seeds)
        self.num_runs, self.num_train = data.train_rows.shape
        self.shared = shared_order_group_size(self.seeds, data.train_rows)
        self.group = self.shared if fuse else 1
        self.num_orders = self.num_runs // self.shared
        self.group_rows = data.train_rows[::self.shared]                                # (U, N_train)
        self.loss = targets.loss()
        # soft targets / candidate sets as rows of one matrix: a step gathers its own with
        # index_select, several times faster than advanced indexing (R, N, K)[arange, positions]
        num_targets = self.num_runs * self.num_train
        self.target_rows = None if targets.values is None or targets.kind == "hard" else \
            targets.values.reshape(num_targets, -1)
        self.arange_r = torch.arange(self.num_runs, device=weight.device)[:, None]
        self.num_classes, self.dim = weight.shape[1:]
        self.decayed = torch.empty_like(weight)
        self.fused_decayed = self.decayed.view(self.num_runs // self.group, self.group * self.num_classes, -1)
        self.lr = torch.empty_like(self.lr0)  # this epoch's, per run
        per_unit = max(1, UPDATE_CHUNK_BYTES // (self.num_classes * self.dim * weight.element_size()))
        if weight.device.type != "cpu":
            per_unit = self.num_runs
        # keyed by "on one thread": see UPDATE_CHUNK_BYTES
        self.units = {True: self._update_units(per_unit), False: self._update_units(self.num_runs)}
        self.buffers = {}
        self._step_buffers(min(self.batch_size, self.num_train))  # a full batch's: the others use their start

    def _update_units(self, per_unit: int) -> list:
        """The runs updated together, `per_unit` at most. Runs sharing a block's batch (not fused)
        are updated block by block, fused runs in whole blocks."""
        num_runs, num_orders, shared = self.num_runs, self.num_orders, self.shared
        if shared == 1:
            spans = [(slice(r, min(r + per_unit, num_runs)),) * 2 for r in range(0, num_runs, per_unit)]
        elif self.group == 1:
            spans = [(u, slice(r, min(r + per_unit, (u + 1) * shared)))
                     for u in range(num_orders) for r in range(u * shared, (u + 1) * shared, per_unit)]
        else:
            blocks, spans = max(1, per_unit // shared), []
            for u in range(0, num_orders, blocks):
                end = min(u + blocks, num_orders)
                spans.append((slice(u, end), slice(u * shared, end * shared)))
        return [_Unit(orders, runs, self.weight[runs], self.momentum[runs], self.decayed[runs], self.wd[runs],
                      self.momentum_factor[runs], self.lr[runs]) for orders, runs in spans]

    def _step_buffers(self, b: int):
        """(gathered rows (U * b, d) as stored, the same in float32, logits (R, b, K), comparisons
        (2, R, b, K), the teacher's logits (R, b, K)) for batches of b rows, as views of buffers
        allocated once (the stored rows are the float32 ones when the features are float32)."""
        if b not in self.buffers:
            rows, logits = (self.num_orders * b, self.dim), (self.num_runs, b, self.num_classes)
            shapes = [(rows, self.data.features.dtype), (rows, torch.float32), (logits, torch.float32),
                      ((2, *logits), torch.float32), (logits, torch.float32)]
            if not self.buffers:
                self.flat_buffers = [torch.empty(math.prod(shape), dtype=dtype, device=self.weight.device)
                                     for shape, dtype in shapes]
            views = [flat[:math.prod(shape)].view(shape)
                     for flat, (shape, _) in zip(self.flat_buffers, shapes)]
            if self.data.features.dtype == torch.float32:
                views[0] = views[1]
            self.buffers[b] = views
        return self.buffers[b]

    def epoch(self, epoch: int, tuner=None):
        """One epoch of SGD steps of every run, in the chunks of steps `tuner` hands out (it sets the
        thread count between them): (train loss (R,) float64, hits (4, R): noisy top-1, top-2, true
        top-1, top-2)."""
        device = self.weight.device
        self.lr.copy_(self.lr0 * self.gamma ** epoch)
        positions = shuffled_positions(self.num_train, self.seeds[::self.shared], epoch).to(device)  # (U, N)
        rows = self.group_rows.gather(1, positions)
        if self.shared > 1:
            positions = positions.repeat_interleave(self.shared, 0)                                 # (R, N)
        labels = torch.empty(2, *positions.shape, dtype=torch.long, device=device)                # (2, R, N)
        torch.gather(self.data.noisy_labels, 1, positions, out=labels[0])
        torch.gather(self.data.true_labels, 1, positions, out=labels[1])
        # hard labels in this epoch's order, else where each (run, position) is in target_rows (or,
        # for soft targets from the teacher's weights, unused)
        if self.targets.kind == "hard":
            targets = self.targets.values.gather(1, positions)
        else:
            targets = positions + self.arange_r * self.num_train
        loss_sum = torch.zeros(self.num_runs, device=device, dtype=torch.float64)
        below = torch.empty(2, self.num_runs, self.num_train, device=device)
        for chunk in step_chunks(tuner, math.ceil(self.num_train / self.batch_size)):
            units = self.units[torch.get_num_threads() == 1]
            for step in chunk:
                batch = slice(step * self.batch_size, (step + 1) * self.batch_size)
                loss, logits, compared = self._step(rows[:, batch], targets[:, batch], units)
                # the product of a float32 loss and a batch size under 2^29 is exact in float64, so
                # this rounds as `loss_sum += loss.double() * b` does, in one pass instead of three
                loss_sum.add_(loss, alpha=logits.shape[1])
                _classes_below(logits, labels[:, :, batch], compared, out=below[:, :, batch])
        top1, top2 = _hits(below, self.num_classes)
        return loss_sum / self.num_train, torch.stack([top1, top2], 1).view(4, -1)

    def _step(self, batch_rows: torch.Tensor, batch_targets: torch.Tensor, units: list):
        """One SGD step of every run on its mini-batch, its heads updated unit by unit: (loss (R,),
        logits (R, b, K), the buffer for the train metrics' comparisons)."""
        num_orders, b = batch_rows.shape
        stored, rows_buffer, logits, compared, teacher_logits = self._step_buffers(b)
        # index_select on flat indices is ~4x faster than advanced indexing for this gather
        xb = torch.index_select(self.data.features, 0, batch_rows.reshape(-1), out=stored)
        if xb is not rows_buffer:
            xb = rows_buffer.copy_(xb)  # upcast: exact
        xb = xb.view(num_orders, b, -1)                                                     # (U, b, d)
        self._forward(xb, logits, self.weight, self.group)
        if self.target_rows is not None:
            batch_targets = self.target_rows.index_select(0, batch_targets.reshape(-1))
            batch_targets = batch_targets.view(self.num_runs, b, -1)
        elif self.targets.teacher is not None:  # the teacher's softmax of these rows, as the original
            self._forward(xb, teacher_logits, self.targets.teacher, 1)
            batch_targets = distillation_targets(teacher_logits, self.targets.temperature)
        loss, grad_logits = self.loss(logits, batch_targets)
        if self.group > 1:  # to the fused products' layout: (U, b, G*K)
            grad_logits = grad_logits.view(num_orders, self.group, b, -1).transpose(1, 2)
            grad_logits = grad_logits.reshape(num_orders, b, -1)
        grad_t = grad_logits.transpose(1, 2)
        # grad = wd * W + dL/dlogits^T @ x, accumulated in place into the decay buffer; then SGD
        for unit in units:
            torch.mul(unit.weight, unit.weight_decay, out=unit.decayed)
            if self.group > 1:
                self.fused_decayed[unit.orders].baddbmm_(grad_t[unit.orders], xb[unit.orders])
            elif self.shared > 1:  # the block's gathered rows, expanded (not copied) to its runs
                x = xb[unit.orders].expand(unit.decayed.shape[0], -1, -1)
                unit.decayed.baddbmm_(grad_t[unit.runs], x)
            else:
                unit.decayed.baddbmm_(grad_t[unit.runs], xb[unit.orders])
            unit.momentum.mul_(unit.momentum_factor).add_(unit.decayed)
            unit.weight.sub_(torch.mul(unit.lr, unit.momentum, out=unit.decayed))
        return loss, logits, compared

    def _forward(self, xb: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor, group: int) -> None:
        """The (R, b, K) logits under `weight` (R, K, d) of the step's gathered batches xb (U, b, d),
        into `logits`; `group` > 1: fused, as one wider product per block of runs."""
        num_orders, b, _ = xb.shape
        if group > 1:  # fused: U matmuls of (b x d) @ (d x G*K)
            fused = weight.view(num_orders, group * self.num_classes, -1)
            wide = torch.bmm(xb, fused.transpose(1, 2)).view(num_orders, b, group, -1)
            logits.view(num_orders, group, b, -1).copy_(wide.transpose(1, 2))
        elif self.shared > 1:
            for u in range(num_orders):
                block = slice(u * self.shared, (u + 1) * self.shared)
                x = xb[u].expand(self.shared, b, -1)
                torch.bmm(x, weight[block].transpose(1, 2), out=logits[block])
        else:
            torch.bmm(xb, weight.transpose(1, 2), out=logits)


def _initial_state(data: TrainData, init_weight: torch.Tensor) -> TrainState:
    weight = init_weight.to(device=data.features.device, dtype=torch.float32).clone()
    best = {rule.name: Snapshot.empty(weight) for rule in TRACKED
            if rule.metric != "val_acc" or data.val_rows is not None}
    return TrainState(0, weight, torch.zeros_like(weight), best, [[] for _ in range(weight.shape[0])])


def _record_epoch(state: TrainState, train_loss, hits, lr, metrics: dict, num_train: int) -> None:
    """Close epoch `state.epoch + 1`: best-epoch snapshots, one history entry per run."""
    epoch = state.epoch + 1
    for rule in TRACKED:
        if rule.name in state.best:
            state.best[rule.name].update(metrics[rule.metric], epoch, state.weight, state.momentum)
    train_pct = hits.double() * (100.0 / num_train)
    table = {"train_loss": train_loss, "train_acc": train_pct[0], "train_top2": train_pct[1],
             "train_acc_true": train_pct[2], "train_top2_true": train_pct[3], "lr": lr, **metrics}
    cpu = {k: v.double().cpu().tolist() for k, v in table.items()}
    for r, history in enumerate(state.history):
        history.append({"epoch": epoch, **{k: cpu[k][r] for k in cpu}})
    state.epoch = epoch


def train_heads(data: TrainData, targets: Targets, init_weight: Optional[torch.Tensor], hypers, shuffle_seeds,
                resume: Optional[TrainState] = None, on_epoch: Optional[Callable[[TrainState], None]] = None,
                fuse_shared_order: bool = False, tuner=None, plain: bool = False) -> TrainState:
    """Train R heads, one per run of `hypers` (utils.runs.Hyper), for their epochs (from
    `resume.epoch` if given) and return the final state.

    `on_epoch(state)` runs after every epoch (progress bars, periodic checkpoints).
    `fuse_shared_order`: runs that see the same mini-batches share one wider matmul (see
    `shared_order_group_size`); faster, but a run's rounding may then depend on its batch.
    `tuner`: chooses the CPU thread count between chunks of steps (utils.threads.ThreadTuner); only
    for a BLAS whose products do not depend on the thread count. `plain`: train with `PlainSGD`,
    the definition (the same bits, slower)."""
    epochs = shared_setting(hypers, "epochs")
    state = _initial_state(data, init_weight) if resume is None else resume
    sgd = (PlainSGD(data, targets, hypers, shuffle_seeds, state.weight, state.momentum) if plain else
           _BatchedSGD(data, targets, hypers, shuffle_seeds, state.weight, state.momentum, fuse_shared_order))
    with torch.no_grad():  # gradients by hand (utils/losses.py): no autograd graph
        for epoch in range(state.epoch, epochs):
            train_loss, hits = sgd.epoch(epoch, tuner)
            bad = ~torch.isfinite(train_loss)
            if bad.any():
                raise NonFiniteLoss(epoch + 1, int(bad.nonzero()[0]))
            if tuner is not None:
                tuner.end_epoch()  # the thread count of evaluation (fixed, unless it cannot change a number)
            metrics = evaluate(data, state.weight)
            _record_epoch(state, train_loss, hits, sgd.lr.view(-1), metrics, data.train_rows.shape[1])
            if on_epoch is not None:
                on_epoch(state)
    return state
