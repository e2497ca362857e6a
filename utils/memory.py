"""What a command will need in memory, estimated before it is allocated, against what the machine has.

A run's memory does not grow with N x K: features stay at their stored precision (one copy for all
runs), a teacher's outputs come from its weights, evaluation scores a block of rows at a time. What
remains per run is O(N) (its rows, labels, shuffled order and metrics), O(d K) (its heads) and its
kept soft targets (at most utils.chain.KEPT_SOFT_TARGETS floats). The constants below are measured
upper bounds (bench/bench_memory.py); the check stops a command with one line before the operating
system would kill it.
"""
import ctypes
import os
from typing import Optional

import torch

from utils.cli import UserError

# Bytes per training row of one run: its rows, corrupted and clean labels (int64), and per epoch its
# shuffled order, gathered rows, labels, targets and metric counts.
ROW_BYTES = 112
# float32 K x d matrices per run: weights, momentum, update buffer, best-epoch snapshots of weight
# and momentum (test and validation rules), the teacher, and the temporaries of updating a snapshot
# and of writing a checkpoint.
HEAD_COPIES = 14
# Evaluation and a teacher's outputs: a block of logits, its softmax, log-softmax and products.
BLOCK_BYTES = 4 * (1 << 22) * 6
GIB = 2 ** 30


# glibc keeps freed blocks below its mmap threshold in the heap, and raises that threshold to the
# size of any mapped block freed (up to 32 MB): the 16 MB blocks of evaluation then come from the heap
# and, fragmented, raise a process's resident memory by hundreds of MB over a run. A fixed threshold
# maps and unmaps every block of this size or more.
MAPPED_BLOCK_BYTES = 4 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_freed_blocks() -> None:
    """Make large freed blocks go back to the system at once (glibc; elsewhere nothing changes)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MAPPED_BLOCK_BYTES)
    except (OSError, AttributeError):
        pass


def run_bytes(num_train: int, dim: int, num_classes: int, batch: int, kept_targets: int) -> int:
    """Bytes one run of a batched computation adds: per-row state, heads, a step's buffers, and
    `kept_targets` floats of targets kept for every training row (soft targets, candidate sets)."""
    step = 4 * batch * (4 * num_classes + 2 * dim)
    return ROW_BYTES * num_train + HEAD_COPIES * 4 * dim * num_classes + step + 4 * kept_targets


def machine_memory(device: torch.device) -> int:
    """Bytes of memory a process can use: the GPU's, or the physical memory (within a cgroup's
    limit, if lower); 0 when the system does not say."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def resident_bytes() -> int:
    """This process's resident memory now (what is already allocated: libraries, loaded features)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def size_text(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.1f} GiB" if num_bytes >= GIB / 10 else f"{num_bytes / 2 ** 20:.1f} MiB"


def check_fits(device: torch.device, fixed: int, per_run: int, runs: int, what: str,
               available: Optional[int] = None) -> None:
    """UserError naming the estimate and what to change when `fixed` bytes plus `per_run` bytes for
    each of `runs` runs trained together exceed the machine's memory (`available`, by default
    `machine_memory(device)`). `what` says what the fixed part is."""
    have = machine_memory(device) if available is None else available
    need = fixed + per_run * runs
    if not have or need <= have:
        return
    where = "GPU" if device.type == "cuda" else "machine"
    head = (f"this needs about {size_text(need)} of memory ({what} {size_text(fixed)}, "
            f"{size_text(per_run)} per run x {runs} runs trained together), more than the "
            f"{size_text(have)} of this {where}")
    fit = (have - fixed) // per_run if per_run else 0
    if fit >= 1:
        raise UserError(f"{head}: train fewer runs at once with --max-batch-runs {fit} (or fewer training "
                        "rows, or a device with more memory)")
    raise UserError(f"{head}, even for one run: use fewer training rows (a smaller features file) or a "
                    "device with more memory")
