#!/usr/bin/env python
"""Thread counts of the theory solver (numerical_solving.py) with and without a competing process.

Prints numbers (it is not a test). One process builds the problem once (default: the option table's
K=4, n=500, lambda=1e-5, c=0.4, d=0.1, eta=0.5, epsilon=0.05, seed 0, `--gram features`), then
solves the same rounds at 1 thread and at each other count of --threads (torch's threads and, as
numerical_solving.py sets them, the BLAS threads of scipy/numpy, which compute G's diagnostics),
first alone and then while another process spins on one core (`python -c 'while ...: pass'`, the
situation of a 2-core machine that also runs something else). Per case: seconds per round (best and worst over
--repeats), seconds of one product X G in float64 and float32 (the solver's unit of work), and the
load average. The competitor is started fresh for each contended case, killed right after it, and
also ends by itself after --competitor-limit seconds, so none is left behind if this script dies.
The accuracies are compared across thread counts: a NOTE says when they differ (the exact solver's
do not; the faithful solver's float32 Adam trajectory does depend on the rounding).

    python bench/bench_theory_threads.py                           # features Gram matrix, 2 rounds
    python bench/bench_theory_threads.py --gram original --rounds 1   # the path solver (slower)
    python bench/bench_theory_threads.py --threads 1,2 --busy 2       # two competing processes
    python bench/bench_theory_threads.py --solver faithful --rounds 1 --max-iter 300   # the original's Adam
"""
import argparse
import contextlib
import math
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_theory import add_problem_options, problem_of, product_seconds  # noqa: E402
from bench.bench_train import load_average  # noqa: E402
from utils import theory as th  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_problem_options(p, gram="features", rounds=2)
    p.add_argument("--solver", choices=th.SOLVERS, default="exact",
                   help="faithful: the original's Adam (float32)")
    p.add_argument("--max-iter", type=int, default=300, help="Adam steps per round of the faithful solver")
    p.add_argument("--repeats", type=int, default=2, help="repeats of each case (best and worst printed)")
    p.add_argument("--threads", default=None,
                   help="comma-separated thread counts (default: 1 and torch's default)")
    p.add_argument("--build", type=int, default=1,
                   help="1: also time building G and its diagnostics per case")
    p.add_argument("--busy", type=int, default=1, help="competing busy processes in the contended cases")
    p.add_argument("--competitor-limit", type=float, default=300.0,
                   help="a competitor ends by itself after this many seconds (it is killed earlier)")
    return p


def start_competitors(count: int, limit: float) -> list[subprocess.Popen]:
    code = f"import time\nend = time.time() + {limit}\nwhile time.time() < end:\n    pass\n"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(count)]
    time.sleep(1.0)               # let them reach the spin loop
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:            # only the processes this script started, by their handle
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        proc.wait(timeout=10)


def threads_set(count: int):
    """torch's threads now, and the BLAS pools (scipy's OpenBLAS) for the `with` block."""
    torch.set_num_threads(count)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:                     # scikit-learn's dependency; without it only torch's count
        return contextlib.nullcontext()
    return threadpool_limits(count, user_api="blas")


def solve(problem, rounds: int, solver: str, max_iter: int) -> tuple[list[float], list[tuple]]:
    seconds, numbers = [], []
    for r in th.run_rounds(problem, solver=solver, approx=False, rounds=rounds, max_iter=max_iter):
        if r["round"] > 0:
            seconds.append(r["seconds"])
            numbers.append((r["acc"]["clean"], r["acc"]["noisy"], r["acc"]["overall"], r["converged"]))
    return seconds, numbers


def measure(args, problem, dtype, reference: list) -> tuple:
    """One case, at the thread count already set: seconds to build the problem (nan without
    --build), of one product X G in float64 and float32, and per round over --repeats (best, worst).
    The first case's accuracies become `reference`; a NOTE says when a later case's differ."""
    build = math.nan
    if args.build:
        t0 = time.perf_counter()
        problem_of(args, dtype)
        build = time.perf_counter() - t0
    t64, t32 = product_seconds(problem.kernel.G, problem.T0.shape[0])
    per_round = []
    for _ in range(args.repeats):
        secs, numbers = solve(problem, args.rounds, args.solver, args.max_iter)
        per_round.append(sum(secs) / len(secs))
        if not reference:
            reference.extend(numbers)
        if numbers != reference:
            print(f"    NOTE: accuracies differ from the first case: {numbers} vs {reference}")
    return build, t64, t32, min(per_round), max(per_round)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    default_threads = torch.get_num_threads()
    counts = [int(x) for x in args.threads.split(",")] if args.threads else sorted({1, default_threads})
    dtype = th.resolve_dtype("auto", args.solver)
    problem = problem_of(args, dtype)
    K, N = problem.T0.shape
    print(f"K={K} N={N} gram={args.gram} solver={args.solver} rounds={args.rounds} cores={os.cpu_count()} "
          f"torch default threads {default_threads}, torch {torch.__version__}; load average before: "
          f"{load_average()}")
    reference = []
    print(f"{'competitors':>11} | {'threads':>7} | {'build s':>7} | {'s/round best':>12} | "
          f"{'s/round worst':>13} | {'X G f64 ms':>10} | {'X G f32 ms':>10} | load average (1, 5, 15 min)")
    for busy in (0, args.busy):
        for threads in counts:
            procs = start_competitors(busy, args.competitor_limit) if busy else []
            try:
                with threads_set(threads):
                    build, t64, t32, best, worst = measure(args, problem, dtype, reference)
                    load = load_average()
            finally:
                stop(procs)
                torch.set_num_threads(default_threads)
            print(f"{busy:>11} | {threads:>7} | {build:7.2f} | {best:12.2f} | {worst:13.2f} | "
                  f"{t64 * 1e3:10.2f} | {t32 * 1e3:10.2f} | {load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
