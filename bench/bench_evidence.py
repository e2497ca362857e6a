#!/usr/bin/env python
"""Benchmark of the feature evidence (`train_linear.py --evidence`) on CIFAR-100-sized features.

Prints numbers (it is not a test), each case in a fresh subprocess so its peak memory (VmHWM) is
its own, on random clustered features of --rows x --dim with --classes classes (default 50,000 x
512, K = 100: CIFAR-100's training split through a ResNet-18/34), stored as float32 and as float16:
  (a) the baseline, the original's route: the full N x N cosine matrix, then the mean and std of
      every class pair's block, measured on --baseline-rows rows and extrapolated as N^2 to --rows
      (its matrix alone is 4 N^2 bytes: 10 GB at 50,000 rows);
  (b) ours: the class-pair mean and std maps of the training split (data/class_correlation.py);
  (c) ours: everything `--evidence` computes (both splits, clustering, spectra, label energy)
      without the figures;
  (d) the whole command, figures included, on a features file of the same size (train and a
      test split of --rows / 5).

    python bench/bench_evidence.py
    python bench/bench_evidence.py --rows 100000 --dim 768 --classes 1000
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.bench_train import load_average  # noqa: E402

CASE = r"""
import json, sys, time
import torch
sys.path.insert(0, ROOT)
def features(rows, dim, classes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(rows) % classes
    centres = torch.randn(classes, dim, generator=gen)
    return (centres[labels] + 2 * torch.randn(rows, dim, generator=gen)).to(dtype), labels
def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
x, y = features(ROWS, DIM, CLASSES, getattr(torch, DTYPE), 0)
start_mb, started = peak_mb(), time.perf_counter()
if CASE == "baseline":
    xd = x.float()
    u = xd - xd.mean(0)
    u = u / u.norm(dim=1, keepdim=True)
    cos = u @ u.T
    masks = [y == c for c in range(CLASSES)]
    for i in range(CLASSES):
        rows = cos[masks[i]]
        for j in range(CLASSES):
            block = rows[:, masks[j]]
            if i == j:
                block = block[~torch.eye(len(block), dtype=torch.bool)]
            block.mean(), block.std()
elif CASE == "maps":
    from data.class_correlation import class_pair_stats
    s = class_pair_stats(x, y, CLASSES)
    s.mean, s.std
else:
    from data.features import FeatureSet
    from utils.evidence import feature_evidence
    tx, ty = features(ROWS // 5, DIM, CLASSES, getattr(torch, DTYPE), 1)
    f = FeatureSet("bench", "random", x, y, tx, ty, CLASSES)
    feature_evidence(f, [("cc", 0.5, 0)])
print(json.dumps({"seconds": time.perf_counter() - started, "peak_mb": peak_mb(), "start_mb": start_mb}))
"""


def run_case(case: str, rows: int, dim: int, classes: int, dtype: str) -> dict:
    code = (CASE.replace("ROOT", repr(ROOT)).replace("ROWS", str(rows)).replace("DIM", str(dim))
            .replace("CLASSES", str(classes)).replace("DTYPE", repr(dtype)).replace("CASE", repr(case)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_command(rows: int, dim: int, classes: int, folder: str) -> float:
    """Seconds of `train_linear.py --features FILE --evidence` (figures included) on random features."""
    import numpy as np

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)

    def split(n):
        y = np.arange(n) % classes
        return (centres[y] + 2 * rng.normal(size=(n, dim)).astype(np.float32)), y

    (tx, ty), (vx, vy) = split(rows), split(rows // 5)
    path = os.path.join(folder, "bench.npz")
    np.savez(path, train_features=tx, train_labels=ty, test_features=vx, test_labels=vy)
    started = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(ROOT, "train_linear.py"), "--features", path, "--evidence",
                    "--results", os.path.join(folder, "results"), "--quiet"],
                   check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--baseline-rows", type=int, default=5_000)
    args = p.parse_args()
    print(f"features {args.rows:,} x {args.dim}, K = {args.classes}; load average {load_average()}")
    base = run_case("baseline", args.baseline_rows, args.dim, args.classes, "float32")
    scale = (args.rows / args.baseline_rows) ** 2
    print(f"(a) original's N x N route at {args.baseline_rows:,} rows: {base['seconds']:.2f} s, peak "
          f"{base['peak_mb']:.0f} MB; extrapolated to {args.rows:,} rows: ~{base['seconds'] * scale:.0f} s "
          f"and {4 * args.rows ** 2 / 1e9:.1f} GB for the matrix alone")
    for dtype in ("float32", "float16"):
        stored_mb = args.rows * args.dim * (4 if dtype == "float32" else 2) / 2**20
        for case, what in (("maps", "(b) mean + std maps, train"), ("evidence", "(c) all of --evidence")):
            r = run_case(case, args.rows, args.dim, args.classes, dtype)
            print(f"{what}, {dtype} ({stored_mb:.0f} MB stored): {r['seconds']:.2f} s, "
                  f"peak {r['peak_mb']:.0f} MB ({r['peak_mb'] - r['start_mb']:+.0f} MB over the features "
                  "and torch)")
    with tempfile.TemporaryDirectory() as folder:
        print(f"(d) train_linear.py --features FILE --evidence, figures included (float32 file): "
              f"{run_command(args.rows, args.dim, args.classes, folder):.1f} s")
    print(f"load average at the end {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
