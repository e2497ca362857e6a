"""The one training loop: R linear heads trained at once on one in-memory feature matrix.

A single run is R = 1. Runs in a batch share the features, the epoch count and the batch size;
everything else is per run: training rows, targets, learning rate, weight decay, momentum, lr
decay and the shuffling order (drawn from the run's own seed). SGD with momentum and L2 weight
decay, as torch.optim.SGD: buf = m * buf + (grad + wd * W);  W -= lr * buf;  lr = lr0 * gamma^epoch.

A run gives the same bits alone or in any batch: every matrix product of a run has a shape that
does not depend on the batch (one (B x d)(d x K) product per run and step in a batched product,
one (N x d)(d x K) product per run for evaluation), and every other operation is elementwise or
row-wise with the same per-element code whatever the batch. The one exception is opt-in
(`fuse_shared_order`): runs that share their mini-batches multiply them as one wider product,
faster but rounded differently from the same run alone on some BLAS builds.
"""
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import numpy as np
import torch

from utils.losses import generalized_cross_entropy, hard_label_cross_entropy, soft_cross_entropy


@dataclass
class TrainData:
    """Tensors on the training device. Rows index into `features`."""
    features: torch.Tensor        # (N, d) float32
    train_rows: torch.Tensor      # (R, N_train) long: the rows each run trains on
    noisy_labels: torch.Tensor    # (R, N_train) the (corrupted) labels of those rows
    true_labels: torch.Tensor     # (R, N_train) their clean labels (metrics only)
    test_features: torch.Tensor   # (N_test, d)
    test_labels: torch.Tensor     # (N_test,)
    val_rows: Optional[torch.Tensor] = None    # (R, N_val) held-out rows, or None
    val_labels: Optional[torch.Tensor] = None  # (R, N_val) labels used to select on val
    num_classes: int = 0


@dataclass
class Targets:
    """What the runs fit. kind 'hard': values (R, N_train) labels, smoothed by `smoothing` (R,);
    'soft': values (R, N_train, K) probabilities, `temperature` (R,) applied to the student;
    'partial': values (R, N_train, 2) candidate classes, fitted with generalised CE."""
    kind: str
    values: torch.Tensor
    smoothing: Optional[torch.Tensor] = None
    temperature: Optional[torch.Tensor] = None

    def loss_options(self):
        """smoothing / temperature as the losses take them: None when every run uses the plain
        value (0 / 1), so the step skips passes whose result is known; checked once, not per step."""
        plain = lambda v, value: v is None or bool((v == value).all())  # noqa: E731
        return (None if plain(self.smoothing, 0.0) else self.smoothing,
                None if plain(self.temperature, 1.0) else self.temperature)


@dataclass
class Hyper:
    """Per-run optimiser settings, each (R,) float32 on the device."""
    lr: torch.Tensor
    weight_decay: torch.Tensor
    momentum: torch.Tensor
    gamma: torch.Tensor


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
    best_test: Snapshot
    best_val: Optional[Snapshot]
    history: list = field(default_factory=list)  # per run: list of per-epoch metric dicts


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


def _batch_loss(kind: str, options, logits: torch.Tensor, batch_targets: torch.Tensor):
    """(loss (R,), gradient (R, B, K)) of a mini-batch against its targets: labels (R, B), soft
    targets (R, B, K) or candidate sets (R, B, 2)."""
    smoothing, temperature = options
    if kind == "hard":
        return hard_label_cross_entropy(logits, batch_targets, smoothing)
    if kind == "soft":
        return soft_cross_entropy(logits, batch_targets, temperature)
    if kind == "partial":
        return generalized_cross_entropy(logits, batch_targets)
    raise ValueError(f"unknown target kind {kind!r}")


def _logits_by_run(features: torch.Tensor, weight: torch.Tensor):
    """Each run's (N, K) logits in turn, one (N x d)(d x K) product per run; features (N, d) or
    (R, N, d)."""
    per_run = features.expand(weight.shape[0], -1, -1) if features.ndim == 2 else features
    return (x @ w.T for x, w in zip(per_run, weight))


@torch.no_grad()
def head_logits(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(R, N, K) logits of features (N, d) shared by R heads, or (R, N, d) features of each run.

    One (N x d)(d x K) product per run, never one (N x d)(d x R*K) product: a BLAS may round the
    columns of a wider product differently, which would make a run's numbers depend on its batch."""
    return torch.stack(list(_logits_by_run(features, weight)))


def _test_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """The test metrics of ONE run: logits (1, N, K), labels (1, N). Evaluated run by run so that
    every sum over the N rows has the same shape (and so the same bits) whatever the batch."""
    top1, top2 = topk_hits(logits, labels)
    n = labels.shape[1]
    log_p = torch.log_softmax(logits, dim=-1)
    probs = log_p.exp()
    return {"test_loss": -log_p.gather(-1, labels.unsqueeze(-1)).mean((1, 2)),
            "test_acc": top1 * (100.0 / n), "test_top2": top2 * (100.0 / n),
            # calibration view of the "diffusion" effect: mean max-probability (%) and entropy (nats)
            "test_confidence": probs.amax(-1).mean(-1) * 100,
            "test_entropy": -(probs * log_p).sum(-1).mean(-1)}


@torch.no_grad()
def evaluate(data: TrainData, weight: torch.Tensor, val_features: Optional[torch.Tensor] = None) -> dict:
    """Per run: test loss, top-1/top-2 accuracy (percent), confidence and entropy; val accuracy
    when a val split exists. Each run's logits are scored as they come (never stacked)."""
    labels = data.test_labels.unsqueeze(0)
    runs = [_test_metrics(run_logits.unsqueeze(0), labels)
            for run_logits in _logits_by_run(data.test_features, weight)]
    out = {name: torch.cat([run[name] for run in runs]) for name in runs[0]}
    if data.val_rows is not None:
        if val_features is None:
            val_features = data.features[data.val_rows]
        val_logits = _logits_by_run(val_features, weight)
        hits = [topk_hits(run_logits.unsqueeze(0), val_labels.unsqueeze(0))[0]
                for run_logits, val_labels in zip(val_logits, data.val_labels)]
        out["val_acc"] = torch.cat(hits) * (100.0 / data.val_rows.shape[1])
    return out


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
    """What stays fixed through a train_heads call (how its runs share mini-batches, the runs
    updated together, preallocated step buffers) and its epochs of SGD steps.

    Runs in blocks of `shared` see the same mini-batches (shared_order_group_size): gathered once
    per block; their products are one wide matmul when fused, else one (B x d)(d x K) product per
    run on the shared rows. Fresh MB-sized temporaries each step would cost page faults on CPU,
    hence the buffers."""

    def __init__(self, data: TrainData, targets: Targets, hyper: Hyper, batch_size: int, shuffle_seeds,
                 fuse: bool, weight: torch.Tensor, momentum: torch.Tensor):
        self.data, self.targets, self.hyper, self.batch_size = data, targets, hyper, batch_size
        self.weight, self.momentum = weight, momentum
        self.seeds = list(shuffle_seeds)
        self.num_runs, self.num_train = data.train_rows.shape
        self.shared = shared_order_group_size(self.seeds, data.train_rows)
        self.group = self.shared if fuse else 1
        self.num_orders = self.num_runs // self.shared
        self.group_rows = data.train_rows[::self.shared]                                # (U, N_train)
        self.noisy_and_true = torch.stack([data.noisy_labels, data.true_labels])        # (2, R, N_train)
        self.loss_options = targets.loss_options()
        # soft targets / candidate sets as rows of one matrix: a step gathers its own with
        # index_select, several times faster than advanced indexing (R, N, K)[arange, positions]
        num_targets = self.num_runs * self.num_train
        self.target_rows = None if targets.kind == "hard" else targets.values.reshape(num_targets, -1)
        self.arange_r = torch.arange(self.num_runs, device=weight.device)[:, None]
        self.num_classes, self.dim = weight.shape[1:]
        self.fused_weight = weight.view(self.num_runs // self.group, self.group * self.num_classes, -1)
        self.decayed = torch.empty_like(weight)
        self.fused_decayed = self.decayed.view_as(self.fused_weight)
        self.lr = torch.empty_like(hyper.lr).view(-1, 1, 1)  # this epoch's, per run
        per_unit = max(1, UPDATE_CHUNK_BYTES // (self.num_classes * self.dim * weight.element_size()))
        if weight.device.type != "cpu":
            per_unit = self.num_runs
        # keyed by "on one thread": see UPDATE_CHUNK_BYTES
        self.units = {True: self._update_units(per_unit), False: self._update_units(self.num_runs)}
        self.buffers = {}
        self._step_buffers(min(batch_size, self.num_train))  # a full batch's: the others use their start

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
        wd, mom = self.hyper.weight_decay.view(-1, 1, 1), self.hyper.momentum.view(-1, 1, 1)
        return [_Unit(orders, runs, self.weight[runs], self.momentum[runs], self.decayed[runs], wd[runs],
                      mom[runs], self.lr[runs]) for orders, runs in spans]

    def _step_buffers(self, b: int):
        """(gathered rows (U * b, d), logits (R, b, K), comparisons (2, R, b, K)) for batches of b
        rows, as views of buffers allocated once."""
        if b not in self.buffers:
            shapes = [(self.num_orders * b, self.dim), (self.num_runs, b, self.num_classes),
                      (2, self.num_runs, b, self.num_classes)]
            if not self.buffers:
                self.flat_buffers = [torch.empty(math.prod(s), device=self.weight.device) for s in shapes]
            self.buffers[b] = [flat[:math.prod(s)].view(s) for flat, s in zip(self.flat_buffers, shapes)]
        return self.buffers[b]

    def train_epoch(self, epoch: int, tuner: Optional["ThreadTuner"]):
        """One epoch of SGD steps of every run: (train loss (R,) float64, hits (4, R): noisy top-1,
        top-2, true top-1, top-2)."""
        device = self.weight.device
        self.lr.copy_((self.hyper.lr * self.hyper.gamma ** epoch).view(-1, 1, 1))
        positions = shuffled_positions(self.num_train, self.seeds[::self.shared], epoch).to(device)  # (U, N)
        rows = self.group_rows.gather(1, positions)
        if self.shared > 1:
            positions = positions.repeat_interleave(self.shared, 0)                                 # (R, N)
        labels = self.noisy_and_true.gather(2, positions.expand(2, -1, -1))                       # (2, R, N)
        # hard labels in this epoch's order, else where each (run, position) is in target_rows
        targets = (self.targets.values.gather(1, positions) if self.target_rows is None
                   else positions + self.arange_r * self.num_train)
        loss_sum = torch.zeros(self.num_runs, device=device, dtype=torch.float64)
        below = torch.empty(2, self.num_runs, self.num_train, device=device)
        for step, start in enumerate(range(0, self.num_train, self.batch_size)):
            if tuner is not None:
                tuner.before_step(step)
            batch = slice(start, start + self.batch_size)
            loss, logits, compared = self._step(rows[:, batch], targets[:, batch])
            # the product of a float32 loss and a batch size under 2^29 is exact in float64, so
            # this rounds as `loss_sum += loss.double() * b` does, in one pass instead of three
            loss_sum.add_(loss, alpha=logits.shape[1])
            _classes_below(logits, labels[:, :, batch], compared, out=below[:, :, batch])
        top1, top2 = _hits(below, self.num_classes)
        return loss_sum / self.num_train, torch.stack([top1, top2], 1).view(4, -1)

    def _step(self, batch_rows: torch.Tensor, batch_targets: torch.Tensor):
        """One SGD step of every run on its mini-batch: (loss (R,), logits (R, b, K), the buffer
        for the train metrics' comparisons)."""
        num_orders, b = batch_rows.shape
        rows_buffer, logits, compared = self._step_buffers(b)
        # index_select on flat indices is ~4x faster than advanced indexing for this gather
        xb = torch.index_select(self.data.features, 0, batch_rows.reshape(-1), out=rows_buffer)
        xb = xb.view(num_orders, b, -1)                                                     # (U, b, d)
        self._forward(xb, logits)
        if self.target_rows is not None:
            batch_targets = self.target_rows.index_select(0, batch_targets.reshape(-1))
            batch_targets = batch_targets.view(self.num_runs, b, -1)
        loss, grad_logits = _batch_loss(self.targets.kind, self.loss_options, logits, batch_targets)
        if self.group > 1:  # to the fused products' layout: (U, b, G*K)
            grad_logits = grad_logits.view(num_orders, self.group, b, -1).transpose(1, 2)
            grad_logits = grad_logits.reshape(num_orders, b, -1)
        grad_t = grad_logits.transpose(1, 2)
        # grad = wd * W + dL/dlogits^T @ x, accumulated in place into the decay buffer; then SGD
        for unit in self.units[torch.get_num_threads() == 1]:
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

    def _forward(self, xb: torch.Tensor, logits: torch.Tensor) -> None:
        """The (R, b, K) logits of the step's gathered batches xb (U, b, d), into `logits`."""
        num_orders, b, _ = xb.shape
        if self.group > 1:  # fused: U matmuls of (b x d) @ (d x G*K)
            wide = torch.bmm(xb, self.fused_weight.transpose(1, 2)).view(num_orders, b, self.group, -1)
            logits.view(num_orders, self.group, b, -1).copy_(wide.transpose(1, 2))
        elif self.shared > 1:
            for u in range(num_orders):
                block = slice(u * self.shared, (u + 1) * self.shared)
                x = xb[u].expand(self.shared, b, -1)
                torch.bmm(x, self.weight[block].transpose(1, 2), out=logits[block])
        else:
            torch.bmm(xb, self.weight.transpose(1, 2), out=logits)


def _initial_state(data: TrainData, init_weight: torch.Tensor) -> TrainState:
    weight = init_weight.to(device=data.features.device, dtype=torch.float32).clone()
    return TrainState(0, weight, torch.zeros_like(weight), Snapshot.empty(weight),
                      Snapshot.empty(weight) if data.val_rows is not None else None,
                      [[] for _ in range(weight.shape[0])])


def _record_epoch(state: TrainState, train_loss, hits, lr, metrics: dict, num_train: int) -> None:
    """Close epoch `state.epoch + 1`: best-epoch snapshots, one history entry per run."""
    epoch = state.epoch + 1
    state.best_test.update(metrics["test_acc"], epoch, state.weight, state.momentum)
    if state.best_val is not None:
        state.best_val.update(metrics["val_acc"], epoch, state.weight, state.momentum)
    train_pct = hits.double() * (100.0 / num_train)
    table = {"train_loss": train_loss, "train_acc": train_pct[0], "train_top2": train_pct[1],
             "train_acc_true": train_pct[2], "train_top2_true": train_pct[3], "lr": lr, **metrics}
    cpu = {k: v.double().cpu().tolist() for k, v in table.items()}
    for r, history in enumerate(state.history):
        history.append({"epoch": epoch, **{k: cpu[k][r] for k in cpu}})
    state.epoch = epoch


@torch.no_grad()
def train_heads(data: TrainData, targets: Targets, init_weight: torch.Tensor, hyper: Hyper, epochs: int,
                batch_size: int, shuffle_seeds, resume: Optional[TrainState] = None,
                on_epoch: Optional[Callable[[TrainState], None]] = None, fuse_shared_order: bool = False,
                tuner: Optional["ThreadTuner"] = None) -> TrainState:
    """Train R heads for `epochs` epochs (from `resume.epoch` if given) and return the final state.

    `on_epoch(state)` runs after every epoch (progress bars, periodic checkpoints).
    `fuse_shared_order`: runs that see the same mini-batches share one wider matmul (see
    `shared_order_group_size`); faster, but a run's rounding may then depend on its batch.
    `tuner`: chooses the CPU thread count of the training steps epoch by epoch (ThreadTuner); only
    for a BLAS whose products do not depend on the thread count (`products_thread_invariant`)."""
    state = _initial_state(data, init_weight) if resume is None else resume
    sgd = _BatchedSGD(data, targets, hyper, batch_size, shuffle_seeds, fuse_shared_order, state.weight,
                      state.momentum)
    val_features = data.features[data.val_rows] if data.val_rows is not None else None  # gathered once
    for epoch in range(state.epoch, epochs):
        train_loss, hits = sgd.train_epoch(epoch, tuner)
        bad = ~torch.isfinite(train_loss)
        if bad.any():
            raise NonFiniteLoss(epoch + 1, int(bad.nonzero()[0]))
        if tuner is not None:
            tuner.end_epoch()  # the thread count of evaluation (fixed, unless it cannot change a number)
        metrics = evaluate(data, state.weight, val_features)
        _record_epoch(state, train_loss, hits, sgd.lr.view(-1), metrics, data.train_rows.shape[1])
        if on_epoch is not None:
            on_epoch(state)
    return state


def _random_products(gen: torch.Generator, runs: int, batch: int, dim: int, num_classes: int):
    """Random inputs of the trainer's products: x (R, B, d), w (R, K, d), g (R, B, K), base (R, K, d)."""
    shapes = [(runs, batch, dim), (runs, num_classes, dim), (runs, batch, num_classes),
              (runs, num_classes, dim)]
    return [torch.randn(shape, generator=gen) for shape in shapes]


def _products(x, w, g, base):
    """The trainer's products: the forward (B x d)(d x K) and the weight gradient (K x B)(B x d)
    accumulated into a copy of `base`."""
    return torch.bmm(x, w.transpose(1, 2)), base.clone().baddbmm_(g.transpose(1, 2), x)


@torch.no_grad()
def batched_products_match_lone(batch_sizes, dim: int, num_classes: int, runs=(2, 3, 5, 8, 16, 64)) -> bool:
    """Whether this BLAS, at the current thread count, computes each item of the trainer's batched
    products (forward (B x d)(d x K), weight gradient (K x B)(B x d)) bit for bit as it computes
    the same product alone. MKL's AVX-512 code does at any thread count; its AVX2 code splits a lone
    product across threads but a batch item not, so the bits differ above one thread."""
    gen = torch.Generator().manual_seed(0)
    for b in sorted(set(batch_sizes)):
        for r in runs:
            x, w, g, base = _random_products(gen, r, b, dim, num_classes)
            together = _products(x, w, g, base)
            # runs sharing their mini-batch: one gathered copy, expanded
            shared = _products(x[:1].expand(r, b, dim), w, g, base)
            for i in range(r):
                one = slice(i, i + 1)
                alone = _products(x[one], w[one], g[one], base[one])
                alone += _products(x[:1], w[one], g[one], base[one])
                if not all(torch.equal(t[one], a) for t, a in zip(together + shared, alone)):
                    return False
    return True


class ThreadTuner:
    """The faster of one thread and `threads` for the training steps of a chunk of runs.

    On a quiet machine more threads are faster; when another process holds a core they can be
    several times slower (a step waits for its slowest thread). So an epoch now and then times its
    first steps with each count (after one warm-up step each) and keeps the faster; the other
    epochs use the kept count, and time themselves: an epoch 1.5 times slower than the last one
    (the load changed) makes the next epoch try both counts again. A trial lasts `trial_steps`
    steps and `trial_seconds` at least: a few short steps measure whether the scheduler happened
    to run the process just then, several of its time slices what the load costs. Trials cost
    little: a fraction of an epoch every `retune_every` epochs. Evaluation uses the kept count when
    `tune_evaluation` (its numbers do not depend on the thread count either), else `threads`. Only
    valid where the thread count changes no result (`products_thread_invariant`): the choice
    changes speed, never numbers."""

    def __init__(self, threads: int, trial_steps: int = 3, retune_every: int = 10, clock=time.perf_counter,
                 tune_evaluation=False, trial_seconds: float = 0.03):
        self.counts = (threads, 1)
        self.trial, self.trial_seconds = trial_steps, trial_seconds
        self.retune_every, self.clock = retune_every, clock
        self.tune_evaluation = tune_evaluation
        self.chosen = []  # per epoch: the thread count kept after its trials (or carried over)
        self._epoch, self._kept, self._last_epoch_time, self._retune = 0, None, None, True
        self._times, self._started, self._epoch_started = {}, None, None
        self._trying = None  # while trials run: the index in `counts` of the count on trial

    def before_step(self, step: int) -> None:
        now = self.clock()
        if step == 0:
            self._epoch_started, self._started = now, None
            self._trying = 0 if self._retune else None
            torch.set_num_threads(self.counts[0] if self._retune else self._kept)
            return  # the first step of a trial warms its count up: not timed
        if self._trying is None:
            return
        times = self._times.setdefault(self.counts[self._trying], [])
        if self._started is not None:
            times.append(now - self._started)
        if len(times) < self.trial or sum(times) < self.trial_seconds:
            self._started = now
            return
        self._trying, self._started = self._trying + 1, None
        if self._trying < len(self.counts):
            torch.set_num_threads(self.counts[self._trying])
        else:
            self._kept, self._trying = self._fastest(), None
            torch.set_num_threads(self._kept)

    def _fastest(self) -> int:
        """The count of the fastest mean step, or `threads` until every count has a timed step."""
        if not all(self._times.get(count) for count in self.counts):
            return self.counts[0]
        return min(self.counts, key=lambda count: sum(self._times[count]) / len(self._times[count]))

    def end_epoch(self) -> None:
        now = self.clock()
        if self._retune:
            if self._trying is not None:  # an epoch shorter than its trials
                self._kept, self._trying = self._fastest(), None
            self.chosen.append(self._kept)
            self._retune = False
        else:
            self.chosen.append(self._kept)
            elapsed = now - self._epoch_started
            self._retune = self._last_epoch_time is not None and elapsed > 1.5 * self._last_epoch_time
            self._last_epoch_time = elapsed
        self._epoch += 1
        if self._epoch % self.retune_every == 0:
            self._retune = True
        if self._retune:
            self._last_epoch_time = None
        self._times, self._started = {}, None
        torch.set_num_threads(self._kept if self.tune_evaluation else self.counts[0])


# Up to this many test (or validation) rows, torch reduces a run's evaluation sums on one thread
# whatever the thread count (its grain size); beyond, the split of a sum could follow the count.
SERIAL_REDUCTION_ROWS = 32_768


@torch.no_grad()
def evaluation_thread_invariant(rows, dim: int, num_classes: int, threads: int) -> bool:
    """Whether evaluating `rows` samples (one (rows x d)(d x K) product per run, then per-run sums)
    gives the same bits at `threads` CPU threads as at one."""
    if not rows or max(rows) > SERIAL_REDUCTION_ROWS:
        return False
    gen = torch.Generator().manual_seed(2)
    before = torch.get_num_threads()
    try:
        for n in sorted(set(rows)):
            x, w = torch.randn(n, dim, generator=gen), torch.randn(num_classes, dim, generator=gen)
            results = []
            for count in (1, threads):
                torch.set_num_threads(count)
                results.append(x @ w.T)
            if not torch.equal(*results):
                return False
        return True
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def products_thread_invariant(batch_sizes, dim: int, num_classes: int, threads: int,
                              runs=(1, 2, 8, 64)) -> bool:
    """Whether the trainer's products (one item alone or in a batch) give the same bits at
    `threads` CPU threads as at one: then the thread count is free to change between steps and
    processes without changing any number. True for MKL's AVX-512 code here; its AVX2 code splits a
    lone product across threads and rounds it differently."""
    gen = torch.Generator().manual_seed(1)
    before = torch.get_num_threads()
    try:
        for b in sorted(set(batch_sizes)):
            for r in runs:
                inputs = _random_products(gen, r, b, dim, num_classes)
                results = []
                for count in (1, threads):
                    torch.set_num_threads(count)
                    results.append(_products(*inputs))
                if not all(torch.equal(a, b) for a, b in zip(*results)):
                    return False
        return True
    finally:
        torch.set_num_threads(before)
