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
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

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
        return Snapshot(torch.full((r,), -1.0, device=weight.device), torch.zeros(r, dtype=torch.long, device=weight.device),
                        weight.clone(), torch.zeros_like(weight))

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
    return torch.stack([torch.randperm(num_rows, generator=gen.manual_seed(epoch_seed(s, epoch))) for s in seeds])


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


def topk_hits(logits: torch.Tensor, labels: torch.Tensor):
    """(top-1 hits, top-2 hits) per run, summed over samples. logits (R, B, K), labels (R, B), or
    (S, R, B) for S label sets scored against the same logits (results then (S, R)).

    A sample's label ranks below every class whose logit is not strictly smaller, so ties and NaNs
    count against it (a constant predictor scores 0, not 100%). One compare and one count: topk is
    several times slower on CPU and this runs every step."""
    label_logit = logits.expand(*labels.shape, -1).gather(-1, labels.unsqueeze(-1))
    below = (logits < label_logit).sum(-1, dtype=torch.int32)
    num_classes = logits.shape[-1]
    return (below == num_classes - 1).sum(-1), (below >= num_classes - 2).sum(-1)


def _batch_loss(targets: Targets, options, logits, positions, arange_r):
    smoothing, temperature = options
    if targets.kind == "hard":
        return hard_label_cross_entropy(logits, targets.values.gather(1, positions), smoothing)
    if targets.kind == "soft":
        return soft_cross_entropy(logits, targets.values[arange_r, positions], temperature)
    if targets.kind == "partial":
        return generalized_cross_entropy(logits, targets.values[arange_r, positions])
    raise ValueError(f"unknown target kind {targets.kind!r}")


@torch.no_grad()
def head_logits(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(R, N, K) logits of features (N, d) shared by R heads, or (R, N, d) features of each run.

    One (N x d)(d x K) product per run, never one (N x d)(d x R*K) product: a BLAS may round the
    columns of a wider product differently, which would make a run's numbers depend on its batch."""
    if features.ndim == 2:
        return torch.stack([features @ w.T for w in weight])
    return torch.stack([x @ w.T for x, w in zip(features, weight)])


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
    """Per run: test loss, top-1/top-2 accuracy (percent), confidence and entropy; val accuracy when a
    val split exists."""
    logits = head_logits(data.test_features, weight)
    labels = data.test_labels.unsqueeze(0)
    runs = [_test_metrics(logits[r:r + 1], labels) for r in range(logits.shape[0])]
    out = {name: torch.cat([run[name] for run in runs]) for name in runs[0]}
    if data.val_rows is not None:
        if val_features is None:
            val_features = data.features[data.val_rows]
        val_logits = head_logits(val_features, weight)
        hits = [topk_hits(val_logits[r:r + 1], data.val_labels[r:r + 1])[0] for r in range(val_logits.shape[0])]
        out["val_acc"] = torch.cat(hits) * (100.0 / data.val_rows.shape[1])
    return out


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
    device = data.features.device
    num_runs, num_train = data.train_rows.shape
    arange_r = torch.arange(num_runs, device=device)[:, None]
    view = lambda v: v.view(-1, 1, 1)  # noqa: E731 - (R,) -> broadcast over (R, K, d)
    wd, mom = view(hyper.weight_decay), view(hyper.momentum)
    if resume is None:
        weight = init_weight.to(device=device, dtype=torch.float32).clone()
        state = TrainState(0, weight, torch.zeros_like(weight), Snapshot.empty(weight),
                           Snapshot.empty(weight) if data.val_rows is not None else None,
                           [[] for _ in range(num_runs)])
    else:
        state = resume
    weight, momentum = state.weight, state.momentum
    val_features = data.features[data.val_rows] if data.val_rows is not None else None  # gathered once
    # runs in blocks of `shared` see the same mini-batches: gathered once per block; their products
    # are one wide matmul when fused, else one (B x d)(d x K) product per run on the shared rows
    shared = shared_order_group_size(list(shuffle_seeds), data.train_rows)
    group = shared if fuse_shared_order else 1
    num_orders = num_runs // shared
    group_rows = data.train_rows[::shared]                                         # (U, N_train)
    noisy_and_true = torch.stack([data.noisy_labels, data.true_labels])            # (2, R, N_train)
    loss_options = targets.loss_options()
    # preallocated step buffers: fresh MB-sized temporaries each step cost page faults on CPU
    decayed, update = torch.empty_like(weight), torch.empty_like(weight)
    fused_weight = weight.view(num_runs // group, group * data.num_classes, -1)
    for epoch in range(state.epoch, epochs):
        lr = view(hyper.lr * hyper.gamma ** epoch)
        positions_all = shuffled_positions(num_train, list(shuffle_seeds)[::shared], epoch).to(device)
        rows_all = group_rows.gather(1, positions_all)
        loss_sum = torch.zeros(num_runs, device=device, dtype=torch.float64)
        hits = torch.zeros(4, num_runs, device=device, dtype=torch.long)
        for step, start in enumerate(range(0, num_train, batch_size)):
            if tuner is not None:
                tuner.before_step(step)
            batch_rows = rows_all[:, start:start + batch_size]
            b = batch_rows.shape[1]
            # index_select on flat indices is ~4x faster than advanced indexing for this gather
            xb = data.features.index_select(0, batch_rows.reshape(-1)).view(num_orders, b, -1)  # (U, B, d)
            positions = positions_all[:, start:start + batch_size]
            if shared > 1:
                positions = positions.repeat_interleave(shared, 0)                       # (R, B)
            # grad = wd * W + dL/dlogits^T @ x, accumulated in place into the decay buffer
            torch.mul(weight, wd, out=decayed)
            if group > 1:  # fused: U matmuls of (B x d) @ (d x G*K)
                logits = torch.bmm(xb, fused_weight.transpose(1, 2))
                logits = logits.view(num_orders, b, group, -1).transpose(1, 2).reshape(num_runs, b, -1)
                loss, grad_logits = _batch_loss(targets, loss_options, logits, positions, arange_r)
                grad_logits = grad_logits.view(num_orders, group, b, -1).transpose(1, 2).reshape(num_orders, b, -1)
                decayed.view_as(fused_weight).baddbmm_(grad_logits.transpose(1, 2), xb)
            elif shared == 1:
                logits = torch.bmm(xb, weight.transpose(1, 2))
                loss, grad_logits = _batch_loss(targets, loss_options, logits, positions, arange_r)
                decayed.baddbmm_(grad_logits.transpose(1, 2), xb)
            else:  # each block's gathered rows, expanded (not copied) to its runs
                blocks = [slice(u * shared, (u + 1) * shared) for u in range(num_orders)]
                runs_x = [xb[u].expand(shared, b, -1) for u in range(num_orders)]
                logits = torch.cat([torch.bmm(x, weight[blk].transpose(1, 2)) for x, blk in zip(runs_x, blocks)])
                loss, grad_logits = _batch_loss(targets, loss_options, logits, positions, arange_r)
                for x, blk in zip(runs_x, blocks):
                    decayed[blk].baddbmm_(grad_logits[blk].transpose(1, 2), x)
            momentum.mul_(mom).add_(decayed)
            weight.sub_(torch.mul(lr, momentum, out=update))
            loss_sum += loss.double() * b
            top1, top2 = topk_hits(logits, noisy_and_true.gather(2, positions.expand(2, -1, -1)))
            hits += torch.stack([top1, top2], 1).view(4, -1)  # noisy top-1, top-2, true top-1, top-2
        train_loss = loss_sum / num_train
        bad = ~torch.isfinite(train_loss)
        if bad.any():
            raise NonFiniteLoss(epoch + 1, int(bad.nonzero()[0]))
        if tuner is not None:
            tuner.end_epoch()  # the thread count of evaluation (fixed, unless it cannot change a number)
        metrics = evaluate(data, weight, val_features)
        state.best_test.update(metrics["test_acc"], epoch + 1, weight, momentum)
        if state.best_val is not None:
            state.best_val.update(metrics["val_acc"], epoch + 1, weight, momentum)
        train_pct = hits.double() * (100.0 / num_train)
        table = {"train_loss": train_loss, "train_acc": train_pct[0], "train_top2": train_pct[1],
                 "train_acc_true": train_pct[2], "train_top2_true": train_pct[3],
                 "lr": lr.view(-1), **metrics}
        cpu = {k: v.double().cpu().tolist() for k, v in table.items()}
        for r in range(num_runs):
            state.history[r].append({"epoch": epoch + 1, **{k: cpu[k][r] for k in cpu}})
        state.epoch = epoch + 1
        if on_epoch is not None:
            on_epoch(state)
    return state


@torch.no_grad()
def batched_products_match_lone(batch_sizes, dim: int, num_classes: int, runs=(2, 3, 5, 8, 16, 64)) -> bool:
    """Whether this BLAS, at the current thread count, computes each item of the trainer's batched
    products (forward (B x d)(d x K), weight gradient (K x B)(B x d)) bit for bit as it computes
    the same product alone. MKL's AVX-512 code does at any thread count; its AVX2 code splits a lone
    product across threads but a batch item not, so the bits differ above one thread."""
    gen = torch.Generator().manual_seed(0)
    for b in sorted(set(batch_sizes)):
        for r in runs:
            x = torch.randn(r, b, dim, generator=gen)
            w = torch.randn(r, num_classes, dim, generator=gen)
            g = torch.randn(r, b, num_classes, generator=gen)
            base = torch.randn(r, num_classes, dim, generator=gen)
            forward = torch.bmm(x, w.transpose(1, 2))
            backward = base.clone().baddbmm_(g.transpose(1, 2), x)
            shared = x[:1].expand(r, b, dim)  # runs sharing their mini-batch: one gathered copy, expanded
            forward_shared = torch.bmm(shared, w.transpose(1, 2))
            backward_shared = base.clone().baddbmm_(g.transpose(1, 2), shared)
            for i in range(r):
                one = slice(i, i + 1)
                if not (torch.equal(forward[one], torch.bmm(x[one], w[one].transpose(1, 2))) and
                        torch.equal(backward[one], base[one].clone().baddbmm_(g[one].transpose(1, 2), x[one])) and
                        torch.equal(forward_shared[one], torch.bmm(x[:1], w[one].transpose(1, 2))) and
                        torch.equal(backward_shared[one], base[one].clone().baddbmm_(g[one].transpose(1, 2), x[:1]))):
                    return False
    return True


class ThreadTuner:
    """The faster of one thread and `threads` for the training steps of a chunk of runs.

    On a quiet machine more threads are faster; when another process holds a core they can be
    several times slower (a step waits for its slowest thread). So an epoch now and then times its
    first steps with each count (after one warm-up step each) and keeps the faster; the other
    epochs use the kept count, and time themselves: an epoch 1.5 times slower than the last one
    (the load changed) makes the next epoch try both counts again. Trials cost little: a few steps
    every `retune_every` epochs. Evaluation uses the kept count when `tune_evaluation` (its numbers
    do not depend on the thread count either), else `threads`. Only valid where the thread count
    changes no result (`products_thread_invariant`): the choice changes speed, never numbers."""

    def __init__(self, threads: int, trial_steps: int = 3, retune_every: int = 10, clock=time.perf_counter,
                 tune_evaluation=False):
        self.counts = (threads, 1)
        self.trial, self.retune_every, self.clock = trial_steps, retune_every, clock
        self.tune_evaluation = tune_evaluation
        self.chosen = []  # per epoch: the thread count kept after its trials (or carried over)
        self._epoch, self._kept, self._last_epoch_time, self._retune = 0, None, None, True
        self._times, self._started, self._epoch_started = {}, None, None

    def before_step(self, step: int) -> None:
        now = self.clock()
        if step == 0:
            self._epoch_started = now
        if not self._retune:
            if step == 0:
                torch.set_num_threads(self._kept)
            return
        if self._started is not None:
            self._times.setdefault(self._current, []).append(now - self._started)
            self._started = None
        block = step // (self.trial + 1)
        if block < len(self.counts):
            self._current = self.counts[block]
            torch.set_num_threads(self._current)
            if step % (self.trial + 1):  # the first step of a block warms up the new count
                self._started = now
        elif block == len(self.counts) and step % (self.trial + 1) == 0:
            self._kept = min(self.counts, key=lambda c: sum(self._times.get(c, [float("inf")])))
            torch.set_num_threads(self._kept)

    def end_epoch(self) -> None:
        now = self.clock()
        if self._retune:
            if self._kept is None or len(self._times) < len(self.counts):  # an epoch shorter than its trials
                self._kept = self.counts[0]
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
def products_thread_invariant(batch_sizes, dim: int, num_classes: int, threads: int, runs=(1, 2, 8, 64)) -> bool:
    """Whether the trainer's products (one item alone or in a batch) give the same bits at
    `threads` CPU threads as at one: then the thread count is free to change between steps and
    processes without changing any number. True for MKL's AVX-512 code here; its AVX2 code splits a
    lone product across threads and rounds it differently."""
    gen = torch.Generator().manual_seed(1)
    before = torch.get_num_threads()
    try:
        for b in sorted(set(batch_sizes)):
            for r in runs:
                x, w = torch.randn(r, b, dim, generator=gen), torch.randn(r, num_classes, dim, generator=gen)
                g, base = torch.randn(r, b, num_classes, generator=gen), torch.randn(r, num_classes, dim, generator=gen)
                results = []
                for count in (1, threads):
                    torch.set_num_threads(count)
                    results.append((torch.bmm(x, w.transpose(1, 2)), base.clone().baddbmm_(g.transpose(1, 2), x)))
                if not all(torch.equal(a, b) for a, b in zip(*results)):
                    return False
        return True
    finally:
        torch.set_num_threads(before)
