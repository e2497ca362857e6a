"""CPU threads of the trainer: the plan for one batched computation, the BLAS probes that decide
whether the thread count may change at all, and the tuner that picks it while training.

None of it changes a number. The plan is made once per batched computation (`cpu_thread_plan`);
the tuner is consulted between chunks of SGD steps (`ThreadTuner.chunks`), never inside a step.
The thread count is left free to change only where the probes found that this BLAS gives the same
bits at any count and for a run alone or batched; elsewhere training stays on one thread, which
keeps every run's numbers independent of its batch and of the machine's load.
"""
import os
import time

import torch

# Below this many multiply-adds per run and step, extra CPU threads cost more in synchronisation
# than they save: one thread is faster. Above it, more threads are faster on a quiet machine and
# several times slower when another process holds a core, so a ThreadTuner picks, every few epochs,
# the faster of one thread and the default count.
SMALL_STEP_MACS = 4_000_000
_DEFAULT_THREADS = torch.get_num_threads()
_FREE_THREADS = {}  # (batch sizes, d, K) -> whether the thread count may change (see above)
_FREE_EVAL_THREADS = {}  # (evaluation rows, d, K) -> the same for evaluation
# Up to this many test (or validation) rows, torch reduces a run's evaluation sums on one thread
# whatever the thread count (its grain size); beyond, the split of a sum could follow the count.
SERIAL_REDUCTION_ROWS = 32_768
# The probes' random inputs stay below this many bytes (a batch of R items of K x d weights, their
# products and copies): batches of as many runs as fit, up to the tuple's largest.
PROBE_BYTES = 1 << 25


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def cpu_thread_plan(device: torch.device, num_train: int, batch: int, dim: int, num_classes: int, log=print,
                    eval_rows=()):
    """(largest thread count, ThreadTuner for the training steps (and evaluation of `eval_rows`
    test/validation rows, where that is free too) or None) for runs of `num_train` training rows in
    mini-batches of `batch`; sets torch's thread count. (0, None) on a GPU."""
    if device.type != "cpu":
        return 0, None
    batch_sizes = [min(batch, num_train), num_train % batch or batch]
    if max(batch_sizes) * dim * num_classes < SMALL_STEP_MACS or _DEFAULT_THREADS == 1:
        torch.set_num_threads(1)
        return 1, None
    shape = (tuple(sorted(set(batch_sizes))), dim, num_classes)
    if shape not in _FREE_THREADS:
        torch.set_num_threads(_DEFAULT_THREADS)
        _FREE_THREADS[shape] = (batched_products_match_lone(shape[0], dim, num_classes)
                                and products_thread_invariant(shape[0], dim, num_classes, _DEFAULT_THREADS))
        if not _FREE_THREADS[shape]:
            log(f"this BLAS rounds products differently with {_DEFAULT_THREADS} threads (or batched): "
                "training on 1 thread, so every run gives the same numbers alone, batched or resumed")
    if not _FREE_THREADS[shape]:
        torch.set_num_threads(1)
        return 1, None
    eval_shape = (tuple(sorted(set(eval_rows))), dim, num_classes)
    if eval_shape not in _FREE_EVAL_THREADS:
        _FREE_EVAL_THREADS[eval_shape] = evaluation_thread_invariant(eval_shape[0], dim, num_classes,
                                                                     _DEFAULT_THREADS)
    torch.set_num_threads(_DEFAULT_THREADS)
    return _DEFAULT_THREADS, ThreadTuner(_DEFAULT_THREADS, tune_evaluation=_FREE_EVAL_THREADS[eval_shape])


class ThreadTuner:
    """The faster of one thread and `threads` for the training steps of a batched computation.

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
        self._epoch, self._kept, self._last_epoch_time, self._retune = 0, threads, None, True
        self._epoch_started = None

    def chunks(self, num_steps: int):
        """An epoch's step indices as ranges, each to run at the thread count set before it is
        handed out: during trials one step at a time (each timed but a count's first), then the
        rest of the epoch at the kept count."""
        self._epoch_started = self.clock()
        step = 0
        if self._retune:
            times = {}
            for count in self.counts:
                torch.set_num_threads(count)
                times[count] = []
                if step < num_steps:  # the warm-up step: not timed
                    yield range(step, step + 1)
                    step += 1
                while step < num_steps and (len(times[count]) < self.trial
                                            or sum(times[count]) < self.trial_seconds):
                    started = self.clock()
                    yield range(step, step + 1)
                    times[count].append(self.clock() - started)
                    step += 1
            timed = all(times.values())  # else the epoch was shorter than its trials
            self._kept = (min(self.counts, key=lambda c: sum(times[c]) / len(times[c])) if timed
                          else self.counts[0])
        torch.set_num_threads(self._kept)
        if step < num_steps:
            yield range(step, num_steps)

    def end_epoch(self) -> None:
        """After an epoch's steps: note the kept count, decide whether the next epoch tries both
        counts again, and set the thread count of evaluation."""
        elapsed = self.clock() - self._epoch_started
        self.chosen.append(self._kept)
        if self._retune:
            self._retune = False
        else:
            self._retune = self._last_epoch_time is not None and elapsed > 1.5 * self._last_epoch_time
            self._last_epoch_time = elapsed
        self._epoch += 1
        if self._epoch % self.retune_every == 0:
            self._retune = True
        if self._retune:
            self._last_epoch_time = None
        torch.set_num_threads(self._kept if self.tune_evaluation else self.counts[0])


def step_chunks(tuner, num_steps: int):
    """An epoch's step indices in the chunks `tuner` hands out, or all at once without one."""
    return tuner.chunks(num_steps) if tuner is not None else [range(num_steps)]


# ---- the BLAS probes ---------------------------------------------------------------------------

def _random_products(gen: torch.Generator, runs: int, batch: int, dim: int, num_classes: int):
    """Random inputs of the trainer's products: x (R, B, d), w (R, K, d), g (R, B, K), base (R, K, d)."""
    shapes = [(runs, batch, dim), (runs, num_classes, dim), (runs, batch, num_classes),
              (runs, num_classes, dim)]
    return [torch.randn(shape, generator=gen) for shape in shapes]


def _affordable(runs, batch: int, dim: int, num_classes: int) -> list:
    """The batch sizes of `runs` whose probe inputs and results stay within PROBE_BYTES (the
    smallest always)."""
    per_run = 4 * (2 * batch * (dim + num_classes) + 4 * num_classes * dim)
    return [r for r in runs if r == min(runs) or r * per_run <= PROBE_BYTES]


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
        for r in _affordable(runs, b, dim, num_classes):
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
            for r in _affordable(runs, b, dim, num_classes):
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
