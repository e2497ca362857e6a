#!/usr/bin/env python
"""Benchmark of the exact softmax solver of numerical_solving.py against the original's Adam.

Prints numbers (it is not a test), all measured in the same process on the option-table defaults
(K=4, n=500, lambda=1e-5, c=0.4, d=0.1, eta=0.5, epsilon=0.05, seed 0) unless flags say otherwise:
  (a) the unit of work: one product X G (X: K x N) in float64 and float32, and one dense LU of an
      N x N matrix (what a direct Newton step on a reduced system would cost at least);
  (b) the baseline: the original's solver (Adam on ||Y - F(Y)||^2, lr 1e-3, projection) for
      --adam-steps steps of round 1: seconds per step, the residual it reaches, and the time its
      default --max_iter 100000 would take;
  (c) the exact solver (utils/theory.run_rounds, softmax mode) for --rounds rounds: seconds,
      products with G (most in float32, inside GMRES) and the time per product with everything else
      included (so against (a): how much of a round is overhead), path steps and folds, residual;
      the total also in units of (a)'s float32 product, a number that other machines can compare.
      With `--reference FOLDER` (a copy of an older utils/ package, e.g. from before a change:
      `git archive COMMIT utils | tar -x -C FOLDER`), the older solver solves the same rounds in the
      same process, round by round in turns with the current one, and each round shows both, the
      ratio of their times and how far apart their fixed points are (max|Y - Y_ref|, and whether
      the accuracies and folds agree).
Load averages are printed at the start and the end: other jobs on the machine slow both solvers.

    python bench/bench_theory.py                  # 10 rounds on the original matrix (about a minute)
    python bench/bench_theory.py --gram features  # the Gram-matrix variant (Newton, seconds)
    python bench/bench_theory.py --rounds 3 --adam-steps 200
    git archive 30a5187 utils | tar -x -C /tmp/theory_before   # the solver before issue 25
    python bench/bench_theory.py --adam-steps 0 --reference /tmp/theory_before
"""
import argparse
import importlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_train import best_time, load_average  # noqa: E402
from utils import theory as th  # noqa: E402


def add_problem_options(p: argparse.ArgumentParser, gram: str, rounds: int) -> None:
    """The options of both theory benchmarks (this one and bench_theory_threads.py): the setting's
    matrix variant, K and n (the rest at the option table's defaults) and how many rounds to solve."""
    p.add_argument("--gram", choices=th.GRAMS, default=gram)
    p.add_argument("--k", type=int, default=4, help="classes")
    p.add_argument("--n", type=int, default=500, help="samples per class")
    p.add_argument("--rounds", type=int, default=rounds, help="rounds solved")


def problem_of(args, dtype, theory=th):
    """The benchmark's problem, built as numerical_solving.py builds it (on the CPU), by `theory`
    (utils.theory, or a reference copy of it)."""
    return theory.build_problem(theory.Setting(k=args.k, n=args.n, gram=args.gram), "cpu", dtype)


def product_seconds(G: torch.Tensor, K: int) -> tuple[float, float]:
    """Seconds of one product X G (X: K x N, the solvers' unit of work) in float64 and in float32,
    the best of 5."""
    N = G.shape[0]
    X64, X32, G64, G32 = torch.randn(K, N, dtype=torch.float64), torch.randn(K, N), G.double(), G.float()
    cpu = torch.device("cpu")
    return best_time(lambda: X64 @ G64, 5, cpu), best_time(lambda: X32 @ G32, 5, cpu)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_problem_options(p, gram="original", rounds=10)
    p.add_argument("--adam-steps", type=int, default=500,
                   help="steps of the original's Adam (round 1; 0: skip)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: as numerical_solving.py runs the exact solver; 0: torch's "
                        "default)")
    p.add_argument("--reference", metavar="FOLDER",
                   help="a copy of an older utils/ package whose solver solves the same rounds alongside")
    return p


def load_reference(folder: str):
    """utils/theory.py of FOLDER, a copy of an older utils/ package, with that package's own
    modules (its solver, its options): imported while `utils` names FOLDER's package, after which
    the current package is restored (the reference keeps references to its own modules)."""
    def ours():
        return {name: module for name, module in sys.modules.items() if name.split(".")[0] == "utils"}

    current = ours()
    for name in current:
        del sys.modules[name]
    sys.path.insert(0, os.path.abspath(folder))
    try:
        return importlib.import_module("utils.theory")
    finally:
        sys.path.remove(os.path.abspath(folder))
        for name in ours():
            del sys.modules[name]
        sys.modules.update(current)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    problem = problem_of(args, torch.float64)
    s, G, T0 = problem.setting, problem.kernel.G, problem.T0
    K, N = T0.shape
    print(f"K={K} N={N} gram={s.gram} threads={torch.get_num_threads()} load {load_average()} "
          f"torch {torch.__version__}")
    print("G is a Gram matrix" if problem.diagnostics["gram"] else "G is NOT a Gram matrix (smallest "
          f"eigenvalue of its symmetric part {problem.diagnostics['min_eig_sym']:.3g})")

    # (a) units of work
    t64, t32 = product_seconds(G, K)
    t_lu = best_time(lambda: torch.linalg.lu_factor(G), 2, torch.device("cpu"))
    print(f"(a) X G: {t64 * 1e3:.2f} ms float64, {t32 * 1e3:.2f} ms float32; LU of G (N x N): {t_lu:.3f} s")

    # (b) the baseline: the original's Adam, round 1
    per_step = None
    if args.adam_steps:
        t0 = time.perf_counter()
        adam = th.faithful_adam(problem.kernel, T0, s.lbd, approx=False, max_iter=args.adam_steps,
                                gen=th.generator(th.sub_seeds(s.seed)["adam"]))
        per_step = (time.perf_counter() - t0) / max(adam.iterations, 1)
        print(f"(b) original's Adam: {per_step * 1e3:.2f} ms/step; after {adam.iterations} steps residual "
              f"{adam.residual:.3g}; its default 100000 steps would take {per_step * 1e5:.0f} s per round")

    # (c) the exact solver, and the reference one beside it
    solvers = {"current": (th, problem)}
    if args.reference:
        ref = load_reference(args.reference)
        solvers["reference"] = (ref, problem_of(args, torch.float64, ref))
    print(f"(c) exact solver, {args.rounds} rounds" + (f" (reference: {args.reference}, solving in turns)"
                                                       if args.reference else "") + ":")
    totals = solve_in_turns(solvers, args.rounds, t32)
    if per_step is not None:
        print(f"    {per_step * 1e5 * args.rounds / max(totals['current'], 1e-9):.0f}x faster than the "
              "original's default Adam budget")
    print(f"load {load_average()} at the end")
    return 0


def round_line(name: str, r: dict, cpu: float) -> str:
    folds = "" if r["folds"] is None else f", {r['folds']} folds"
    kind = "Newton steps" if r["folds"] is None else "path steps"
    return (f"{name:>9} {r['seconds']:6.2f} s (CPU {cpu:6.2f} s), {r['work']:5d} G products "
            f"({r['seconds'] / max(r['work'], 1) * 1e3:.2f} ms each, all included), "
            f"{r['iterations']} {kind}{folds}, residual {r['residual']:.2e}"
            + ("" if r["converged"] else "  NOT converged"))


def agreement(r: dict, ref: dict) -> str:
    """How far the current round's fixed point is from the reference's."""
    gap = (r["Y"].double() - ref["Y"].double()).abs().max().item()
    same = r["acc"] == ref["acc"] and r["folds"] == ref["folds"] and r["cf_gap"] == ref["cf_gap"]
    return (f"max|Y - Y_ref| {gap:.1e}; accuracies, folds and closed-form gap "
            + ("agree" if same else f"DIFFER: {r['acc']} {r['folds']} {r['cf_gap']} vs reference's "
               f"{ref['acc']} {ref['folds']} {ref['cf_gap']}"))


def solve_in_turns(solvers: dict, rounds: int, t32: float) -> dict:
    """Each solver's rounds, round by round in turns (the order alternates, so that neither always
    runs first after the other); prints every round, wall and CPU seconds (the CPU time leaves out
    the time other jobs held the core), and the totals; returns {name: wall seconds}."""
    runs = {name: module.run_rounds(problem, solver="exact", approx=False, rounds=rounds)
            for name, (module, problem) in solvers.items()}
    for run in runs.values():
        next(run)                                       # round 0: the given labels
    totals, cpus, worst = dict.fromkeys(runs, 0.0), dict.fromkeys(runs, 0.0), dict.fromkeys(runs, 0.0)
    for t in range(1, rounds + 1):
        got, cpu = {}, {}
        for name in (list(runs) if t % 2 else list(runs)[::-1]):
            c0 = time.process_time()
            got[name] = next(runs[name])
            cpu[name] = time.process_time() - c0
        for i, name in enumerate(runs):
            totals[name] += got[name]["seconds"]
            cpus[name] += cpu[name]
            worst[name] = max(worst[name], got[name]["residual"])
            print(f"    {f'round {t:2d}:' if i == 0 else '':10}{round_line(name, got[name], cpu[name])}")
        if "reference" in got:
            print(f"{'':14}ratio {got['reference']['seconds'] / got['current']['seconds']:.2f} "
                  f"(CPU {cpu['reference'] / cpu['current']:.2f}); "
                  + agreement(got["current"], got["reference"]))
    for name in runs:
        print(f"    {name}: {totals[name]:.1f} s (CPU {cpus[name]:.1f} s) for {rounds} rounds (= "
              f"{totals[name] / t32:,.0f} float32 products' time), worst residual {worst[name]:.2e}")
    if "reference" in totals:
        print(f"    reference / current: {totals['reference'] / totals['current']:.2f}x "
              f"(CPU {cpus['reference'] / cpus['current']:.2f}x)")
    return totals


if __name__ == "__main__":
    sys.exit(main())
