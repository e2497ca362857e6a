#!/usr/bin/env python
"""Peak memory of a grid of R chains on ImageNet-sized features, at R = 1, 4, 8 runs per process.

Writes (once) a features file of random float16 features, 300,000 x 768 with K = 1000 classes and
20,000 test rows (about 494 MB), then for each R trains, in a fresh process, a grid of R chains
(seeds 0..R-1; teacher, one distillation round, PLL student; one epoch each), as the engine trains
`train_linear.py --config`'s grid (the report written after it is not measured), and reads that
process's peak resident memory (VmHWM). Prints the peaks, the per-run slope fitted to them, and
the target: peak <= 1.5 x the features' stored size + 1 GB.

    python bench/bench_memory.py                        # the issue's shape (~30 minutes on 2 cores)
    python bench/bench_memory.py --n 30000 --runs 1,2   # quicker
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_train import load_average  # noqa: E402

GB = 1e9


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300_000, help="training rows")
    p.add_argument("--n-test", type=int, default=20_000, help="test rows")
    p.add_argument("--dim", type=int, default=768, help="feature dimension d")
    p.add_argument("--classes", type=int, default=1000, help="number of classes K")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored precision")
    p.add_argument("--runs", default="1,4,8", help="comma-separated R values (chains per process)")
    p.add_argument("--epochs", type=int, default=1, help="epochs of every step")
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "bench_memory"),
                   help="where the features file is kept (written once) and the runs write")
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)  # R, inside the measured process
    return p


def features_file(args) -> Path:
    """The random features file of the asked shape, written once."""
    path = Path(args.dir) / f"random_{args.n}x{args.dim}_k{args.classes}_{args.dtype}.npz"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)

        def rows(n):
            return rng.standard_normal((n, args.dim), dtype=np.float32).astype(args.dtype)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, train_features=rows(args.n), train_labels=rng.integers(0, args.classes, args.n),
                 test_features=rows(args.n_test), test_labels=rng.integers(0, args.classes, args.n_test),
                 num_classes=np.array(args.classes))
        tmp.rename(path)
    return path


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(args) -> int:
    """Inside the measured process: the grid's training as `train_linear.py --config` runs it (the
    engine, no report), then its peak memory on the last line."""
    from utils.engine import ChainRunner, EngineOptions, FeatureSource
    from utils.runs import RunConfig
    from utils.steps import chain_steps

    work = Path(args.dir) / f"store_r{args.child}"
    source = FeatureSource("random", features_path=str(features_file(args)))
    jobs = [(source, RunConfig("random", "file", ctype="sym", eta=0.5, seed=seed, lr=0.05, wd=1e-4,
                               epochs=args.epochs)) for seed in range(args.child)]
    opts = EngineOptions(checkpoint_root=str(work / "ckpt"), results_root=str(work / "results"),
                         progress="none", overwrite=True)
    ChainRunner(opts).run(jobs, chain_steps(1))
    print(f"peak {peak_rss()}")
    return 0


def measure(args, runs: int) -> tuple:
    """(peak bytes, seconds) of a fresh process training the grid of `runs` chains."""
    started = time.time()
    done = subprocess.run([sys.executable, __file__, "--child", str(runs), "--n", str(args.n),
                           "--n-test", str(args.n_test), "--dim", str(args.dim),
                           "--classes", str(args.classes),
                           "--dtype", args.dtype, "--epochs", str(args.epochs), "--dir", args.dir],
                          capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not lines[-1].startswith("peak "):
        raise SystemExit(f"R = {runs} failed:\n{done.stdout}\n{done.stderr}")
    return int(lines[-1].split()[1]), time.time() - started


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        return child(args)
    path = features_file(args)
    stored = path.stat().st_size
    in_memory = (args.n + args.n_test) * args.dim * np.dtype(args.dtype).itemsize
    bound = 1.5 * stored + GB
    print(f"features {path.name}: {stored / GB:.3f} GB stored ({in_memory / GB:.3f} GB of {args.dtype} "
          f"features in memory, {in_memory * 4 / np.dtype(args.dtype).itemsize / GB:.3f} GB as float32); "
          f"K = {args.classes}; load average {load_average()}")
    print(f"grid per process: R chains x (teacher, round 1, PLL), {args.epochs} epoch(s) each; "
          f"target: peak RSS <= 1.5 x {stored / GB:.3f} + 1 = {bound / GB:.3f} GB")
    points = []
    for runs in [int(r) for r in args.runs.split(",") if r.strip()]:
        peak, seconds = measure(args, runs)
        points.append((runs, peak))
        print(f"  R = {runs}: peak RSS {peak / GB:.3f} GB ({peak / bound:.0%} of the bound) "
              f"in {seconds:.0f} s")
    if len(points) > 1:
        r, peaks = np.array(points, dtype=float).T
        slope, intercept = np.polyfit(r, peaks, 1)
        head = 4 * args.dim * args.classes
        print(f"  per-run slope {slope / 2 ** 20:.1f} MiB (fit: {intercept / GB:.3f} GB + R x slope); one "
              f"float32 d x K head is {head / 2 ** 20:.1f} MiB, one int64 per training row "
              f"{8 * args.n / 2 ** 20:.1f} MiB")
    worst = max(peak for _, peak in points)
    print(f"  largest peak {worst / GB:.3f} GB vs bound {bound / GB:.3f} GB -> "
          f"{'met' if worst <= bound else 'NOT met'} (load average {load_average()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
