#!/usr/bin/env python
"""Numerical fixed points of multi-round self-distillation in the class-wise correlation model.

Flags follow the option table of the paper's code (see docs/numerical_solving.md); new flags are
marked [new]. The maths lives in utils/theory.py, the output files in utils/theory_outputs.py;
this file parses, validates, prints and calls them.
One setting:  python numerical_solving.py                      (exact solver, 10 rounds)
The original: python numerical_solving.py --solver faithful     (Adam, as the paper's script)
A sweep:      python numerical_solving.py --gram features --sweep eta=0.1,0.3,0.5,0.7
"""
import argparse
import contextlib
import errno
import hashlib
import itertools
import math
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from utils import theory as th
from utils import theory_outputs as tho
from utils.cli import (ArgumentParser, DefaultsHelpFormatter, UserError, load_yaml_file, os_error_line,
                       plural, resolve_device, run_main)
from utils.options import Interval, Option, add_options, check_option_values, read_as_flag
from utils.runs import MAX_ROUNDS
from utils.threads import available_cores

MAX_N = 30000   # G is N x N in float64: 7 GB at this size
MAX_SETTINGS = 10_000  # settings of one sweep (about a day at a few seconds each)
MAX_ADAM_STEPS = 10**8  # the faithful solver's steps (its default: 100,000)
PLAIN_NAME = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9_.+-]*$")   # a folder name that stays under --out
RECORD_FILES = ("records.csv", "records.jsonl", "figure.png", "figure.pdf")   # a run's files in its folder
MAX_NAME = 200          # characters of a derived folder name (file systems allow 255 bytes)
NEW_GROUP = "[new] options not in the original"


# ---------------------------------------------------------------------------------------------
# Options: the model's settings are declared on theory.Setting, the run's here
# ---------------------------------------------------------------------------------------------

# the options of the run (not of the model), each parsed under its first flag's name, '-' read as '_'
RUN_OPTIONS = {opt.dest: opt for opt in (
    Option(("--max_dist",), type=int, default=10,
           valid=Interval(int, 1, MAX_ROUNDS, note="distillation rounds"),
           help="distillation rounds (>= 1)"),
    Option(("--max_iter",), type=int, default=100000,
           valid=Interval(int, 1, MAX_ADAM_STEPS, note="Adam steps"),
           help="Adam steps per round of the faithful solver"),
    Option(("--approx",), type=bool, default=False,
           help="linear approximation of the softmax (bare flag or True/False)"),
    Option(("--solver",), choices=th.SOLVERS, default="exact", new=True,
           help="exact: closed form (linear) / Newton-Krylov (softmax) to --tol; "
                "faithful: the original's Adam"),
    Option(("--device",), default="auto", new=True, help="auto (GPU when present), cpu, cuda or cuda:i"),
    Option(("--threads",), type=int, default=0, valid=Interval(int, 0, note="0: one thread on the CPU"),
           new=True,
           help="CPU threads (torch's and the BLAS's). 0: one for the exact solver on the CPU (two "
                "collapse when another process holds a core), torch's default otherwise. "
                "See docs/numerical_solving.md"),
    Option(("--dtype",), choices=("auto", "float32", "float64"), default="auto", new=True,
           help="auto: float64 for the exact solver, float32 (the original's) for the faithful one"),
    Option(("--tol",), type=float, default=1e-10,
           valid=Interval(float, 0, closed="neither", note="e.g. --tol 1e-10"), new=True,
           help="exact solver: target of max|Y - F(Y)| (linear mode: times max(1, max|Y|), "
                "relative to the outputs)"),
    Option(("--max-newton",), type=int, default=60, valid=Interval(int, 1), new=True,
           help="exact softmax solver: most Newton steps of one solve (warm start, path start, landing)"),
    Option(("--out",), default="outputs", new=True, help="root of the arrays, records and figures"),
    Option(("--name",), default=None, new=True,
           help="folder under --out for records.csv/jsonl and figure.png/pdf (default: derived from "
                "every setting that changes the numbers)"),
    Option(("--save",), type=bool, default=True, new=True,
           help="save Y of every round as .npz (False: records only)"),
    Option(("--overwrite",), type=bool, default=False, new=True,
           help="replace the records, figure and arrays of an earlier run with the same output names "
                "(default: refuse and say what exists)"),
    Option(("--config",), default=None, metavar="YAML", new=True,
           help="options and sweep from a file (see recipes/theory/eta.yaml)"),
    Option(("--verbose",), type=bool, default=False, new=True, help="print the Newton iterations"),
)}
SWEEPABLE = tuple(name for name, opt in th.SETTING_OPTIONS.items() if opt.sweep)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="numerical_solving.py", description=__doc__.splitlines()[0],
                       formatter_class=DefaultsHelpFormatter)
    new = add_options(p, [*th.SETTING_OPTIONS.values(), *RUN_OPTIONS.values()], NEW_GROUP)
    new.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                     help=f"solve a grid (repeatable: the product); KEY in {', '.join(SWEEPABLE)} "
                          "(default: none)")
    return p


# ---------------------------------------------------------------------------------------------
# Validation: one line naming the fix
# ---------------------------------------------------------------------------------------------

def check_setting(s: th.Setting) -> None:
    """Each setting's declared constraint, then the rules that tie settings together."""
    check_option_values(th.SETTING_OPTIONS.values(), s)
    if s.k * s.n > MAX_N:
        raise UserError(f"--k {s.k} --n {s.n}: N = {s.k * s.n} samples makes G too large (N x N); "
                        f"keep k*n <= {MAX_N}")
    if s.gram == "features" and (s.c < s.d or s.c + (s.k - 1) * s.d < 0):
        raise UserError(f"--gram features needs c >= d and c + (K-1) d >= 0 (class means must be features); "
                        f"got c={s.c:g}, d={s.d:g}: change --c/--d or use --gram original")


def check_run(args) -> None:
    check_option_values(RUN_OPTIONS.values(), args)
    cores = available_cores()
    if args.threads > cores:  # thousands of threads crash the process (no thread can start), never help
        raise UserError(f"--threads {args.threads}: this process may use {cores} CPU core"
                        f"{'s' if cores != 1 else ''}; give at most {cores} (0: the default policy)")


def check_sweep_size(grid: dict) -> None:
    """Refuse a sweep of more than MAX_SETTINGS settings before any is built (each one solves
    every round: seconds to minutes)."""
    count = math.prod(len(values) for values in grid.values())
    if count > MAX_SETTINGS:
        sizes = " x ".join(f"{len(values)} {key}" for key, values in grid.items())
        raise UserError(f"the sweep has {count:,} settings ({sizes}), more than {MAX_SETTINGS:,}; sweep "
                        "fewer values, or split it into several commands (--name for each)")


def check_name(name: str, what: str) -> None:
    """A folder name under --out: one plain path component, so nothing is written outside --out."""
    if not PLAIN_NAME.match(name) or name in (".", ".."):
        raise UserError(f"{what} {name!r} is not a plain folder name: use letters, digits, '_', '-', '.', "
                        "'+' (no '/', not starting with '.'), e.g. --name my_sweep")


def check_writable(root: str, folders: list[Path]) -> None:
    """Before any solving: every output folder is, or can be made, a directory we may write to.
    (A failure later still ends in one line: run_main turns an OSError into one.)"""
    for folder in folders:
        probe = folder
        while not os.path.lexists(probe) and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            code = errno.ENOTDIR
        elif not os.access(probe, os.W_OK | os.X_OK):
            code = errno.EACCES
        else:
            continue
        raise UserError(f"--out {root}: {os_error_line(OSError(code, os.strerror(code), str(probe)))}")


# ---------------------------------------------------------------------------------------------
# Output names, and no silent overwriting
# ---------------------------------------------------------------------------------------------


def options_tag(args, dtype, approx: bool) -> str:
    """The run options that change the numbers, as a name suffix when not at their defaults
    (the faithful solver's --max_iter always: its numbers depend on it)."""
    parts = []
    if args.solver == "faithful":
        parts.append(f"iter{args.max_iter}")
    else:
        if args.tol != RUN_OPTIONS["tol"].default:
            parts.append(f"tol{args.tol:g}")
        if not approx and args.max_newton != RUN_OPTIONS["max_newton"].default:
            parts.append(f"newton{args.max_newton}")
    if dtype != th.resolve_dtype("auto", args.solver):
        parts.append(str(dtype).replace("torch.", ""))
    return "".join("_" + part for part in parts)


def sweep_name(settings: list[th.Setting], grid: dict, solver: str, mode: str, options: str) -> str:
    """`sweep_{keys}_{tag}`: the tag of the grid's settings with every swept key's values in its place
    (joined by '+'), so mode, matrix variant and every fixed parameter are in the name. A grid too
    long for a file name writes a swept key as `{count}values-{hash of the values}` instead."""
    prefix = "sweep_" + "_".join(grid) + "_"
    name = prefix + tho.run_tag(settings[0], solver, mode, options, grid)
    if len(name) > MAX_NAME:
        short = {key: [f"{len(values)}values-{hashlib.sha1(repr(values).encode()).hexdigest()[:8]}"]
                 for key, values in grid.items()}
        name = prefix + tho.run_tag(settings[0], solver, mode, options, short)
    return name


def refuse_to_overwrite(folder: Path, arrays: list[Path]) -> None:
    """One line saying what an earlier run left at these names and how to proceed (exit code 2)."""
    records = [folder / f for f in RECORD_FILES if (folder / f).exists()]
    found = [p for p in arrays if p.exists()]
    if not records and not found:
        return
    parts = []
    if records:
        parts.append(f"{folder} already holds an earlier run's {', '.join(p.name for p in records)}")
    if found:
        parts.append(f"{plural(len(found), 'array')} of the same settings already "
                     f"{'exists' if len(found) == 1 else 'exist'} in {found[0].parent} "
                     f"(e.g. {found[0].name})")
    ways = ["pass --overwrite to replace them"]
    if records:
        ways.append("--name NAME" + (" --save False" if found else "") + " to write the new run elsewhere")
    else:
        ways.append("--save False to write only the records")
    raise UserError("; ".join(parts) + ": " + ", or ".join(ways))


def remove_stale_arrays(folder: Path, tags: list[str], rounds: int) -> None:
    """--overwrite: an earlier run of the same setting with more rounds left arrays this run does
    not rewrite; remove them, so the folder holds one run's arrays."""
    if not folder.is_dir():
        return
    pattern = re.compile("^(" + "|".join(re.escape(tag) for tag in tags) + r")_(\d+)\.npz$")
    for path in folder.iterdir():
        match = pattern.match(path.name)
        if match and int(match.group(2)) > rounds:
            path.unlink()


# ---------------------------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------------------------

def parse_sweep(items, parser) -> dict:
    grid = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--sweep {item!r}: write KEY=V1,V2,... (e.g. --sweep eta=0.1,0.3,0.5)")
        key, _, values = item.partition("=")
        key = key.strip().lstrip("-")
        if key not in SWEEPABLE:
            raise UserError(f"--sweep {key}: cannot sweep this; choose from {', '.join(SWEEPABLE)}")
        if key in grid:
            raise UserError(f"--sweep {key} is given twice; list all its values in one: "
                            f"--sweep {key}=V1,V2,...")
        grid[key] = [read_as_flag(parser, key, v.strip(), f"--sweep {item!r}") for v in values.split(",")
                     if v.strip()]
        if not grid[key]:
            raise UserError(f"--sweep {item!r}: no values given")
    return grid


def config_text(cfg: dict, key: str, where: str) -> str | None:
    """`name:` and `title:` of a config: one scalar (or nothing)."""
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, (list, dict)):
        raise UserError(f"{where}: {key} must be one value, got a {type(value).__name__} {value!r}")
    return str(value)


def load_config(path: str, parser: ArgumentParser) -> tuple[dict, dict, dict]:
    where = f"--config {path}"
    cfg = load_yaml_file(path, "--config")
    cfg = {} if cfg is None else cfg
    if not isinstance(cfg, dict):
        raise UserError(f"{where}: expected a mapping with 'options' and/or 'sweep'")
    unknown = set(cfg) - {"name", "options", "sweep", "title"}
    if unknown:
        raise UserError(f"{where}: unknown keys {sorted(map(str, unknown))}; use name, title, options, sweep")
    named = {"name": config_text(cfg, "name", where), "title": config_text(cfg, "title", where)}
    if named["name"]:
        check_name(named["name"], f"{where}: name")

    raw = cfg.get("options") or {}
    if not isinstance(raw, dict):
        raise UserError(f"{where}: options must be a mapping of option names to values "
                        f"(e.g. options: {{k: 4, gram: features}}), got {raw!r}")
    if "config" in raw or "sweep" in raw:
        raise UserError(f"{where}: put the grid under 'sweep:', not under 'options:'")
    dests = {a.dest for a in parser._actions if a.option_strings} - {"help"}
    bad = sorted(map(str, set(raw) - dests))
    if bad:
        raise UserError(f"{where}: unknown options {bad}; use the flags' names, e.g. max_dist, gram")
    options = {key: read_as_flag(parser, key, value, f"{where}: options.{key}") for key, value in raw.items()}
    if options.get("name"):
        check_name(options["name"], f"{where}: options.name")

    raw = cfg.get("sweep") or {}
    if not isinstance(raw, dict):
        raise UserError(f"{where}: sweep must be a mapping KEY: [V1, V2, ...] "
                        f"(e.g. sweep: {{eta: [0.1, 0.3]}}), got {raw!r}")
    sweep = {}
    for key, values in raw.items():
        if key not in SWEEPABLE:
            raise UserError(f"{where}: cannot sweep {key!r}; choose from {', '.join(SWEEPABLE)}")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise UserError(f"{where}: sweep.{key}: no values given")
        sweep[key] = [read_as_flag(parser, key, v, f"{where}: sweep.{key}") for v in values]
    return options, sweep, named


def settings_from(args, grid: dict) -> list[th.Setting]:
    base = {f: getattr(args, f) for f in th.SETTING_OPTIONS}
    keys = list(grid)
    out = []
    for values in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
        s = th.Setting(**{**base, **dict(zip(keys, values))})
        check_setting(s)
        out.append(s)
    return out


# ---------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------

def fmt_acc(acc: dict) -> str:
    return " ".join(f"{'-':>7}" if math.isnan(acc[p]) else f"{acc[p]:7.2f}"
                    for p in ("clean", "noisy", "overall"))


def theory_lines(s: th.Setting, max_dist: int) -> tuple[list[str], dict]:
    spec = th.block_spectrum(s.k, s.n, s.c, s.d)
    info = th.theory_rounds_to_perfect(s.k, s.n, s.c, s.d, s.lbd, s.eta)
    mu = info["mu"]
    lines = ["theory (linear approximation, block matrix without noise): eigenvalues "
             + ", ".join(f"{g:.6g} (x{m})" for g, m in spec.values())
             + f"; shrink per round mu_small={mu['small']:.6g} mu_big={mu['big']:.6g} mu_all={mu['all']:.6g}"]
    if info["t_star"] is None:
        lines.append(f"theory: no round reaches 100% population accuracy: {info['reason']}")
    elif info["threshold"] is None:
        lines.append(f"theory: 100% population accuracy from step {info['t_star']} ({info['reason']})")
    else:
        where = "within" if info["t_star"] <= max_dist else f"beyond --max_dist {max_dist};"
        lines.append(f"theory: 100% population accuracy from step t* = {info['t_star']} ({where} "
                     f"first t with (mu_big/mu_small)^t > (1+Delta)/Delta = {info['threshold']:.4g}, "
                     f"Delta = (1-eta) - eta/(K-1) = {info['delta']:.4g})"
                     + (f"; {info['reason']}" if info["reason"] else ""))
    return lines, info


ACC_HEAD = f"{'clean':>7} {'noisy':>7} {'overall':>7}"
FORMULA = "noise-free formula"   # the closed form of the block model without noise (epsilon = 0), linearised
HEADER = (f"{'step':>5} | {'solved':<6} {ACC_HEAD} | {FORMULA} {ACC_HEAD} | {'max|Y-Ycf|':>10} | "
          f"{'residual':>9} | {'work':>22} | {'time':>8}")


def expectation_lines(info: dict, max_dist: int, gram: bool) -> list[str]:
    """What the table below will show, in words, before its numbers: when the noise-free formula
    corrects the noisy samples (`info`: `th.theory_rounds_to_perfect`), and, for a G that is not a
    Gram matrix, that the solved steps need not show the paper's effect and which setting does."""
    t = info["t_star"]
    if t is None:
        when = f"no step corrects every sample ({info['reason']})"
    elif t == 0:
        when = "nothing to correct (no corrupted labels)"
    elif t <= max_dist:
        when = f"every noisy sample is corrected from step t* = {t}, within these {max_dist} steps"
    else:
        when = (f"the noisy samples are corrected only from step t* = {t}, beyond --max_dist {max_dist}: "
                "until then its columns stay near the given labels' clean 100%, noisy 0%")
    lines = [f"expect: {FORMULA} columns (the paper's closed form: the block matrix without noise, linear "
             f"approximation): {when}"]
    if not gram:
        lines.append("expect: this G is not a Gram matrix (no features have it), so the solved steps need "
                     "not average the labels as the paper describes; --gram features (a Gram matrix of "
                     "features with the same block means) shows the paper's effect: noisy samples corrected "
                     "step by step")
    return lines


def round_line(r: dict, solver: str, approx: bool) -> str:
    if r["round"] == 0:
        work = "given labels"
    elif solver == "faithful":
        work = f"{r['iterations']} Adam steps"
    elif approx:
        work = "1 LU solve"
    elif r["folds"] is None:
        work = f"{r['iterations']} Newton ({r['work']} G)"
    else:
        work = f"{r['iterations']} path steps ({r['work']} G)"
    flag = "" if r["converged"] else "  <-- NOT converged"
    return (f"{r['round']:>5} | {'':<6} {fmt_acc(r['acc'])} | {'':<{len(FORMULA)}} {fmt_acc(r['cf_acc'])} | "
            f"{r['cf_gap']:10.3g} | {r['residual']:9.2e} | {work:>22} | {r['seconds']:7.2f}s{flag}")


def tolerance_text(solver: str, approx: bool, tol: float, largest: float) -> str:
    """What "reached its tolerance" means for this solver, in words (the linear one is relative)."""
    if solver == "faithful":
        return f"Adam's stopping rule ||Y - F(Y)||^2 < {th.ADAM_STOP_LOSS:g}"
    if approx:
        return (f"max|Y - F(Y)| <= {tol:g} x max(1, max|Y|), relative to the largest output, "
                f"max|Y| <= {largest:.3g} here")
    return f"max|Y - F(Y)| <= {tol:g}, absolute (the outputs are probabilities)"


def divergence_headline(s: th.Setting, growth: float, sizes: list[float]) -> str:
    return (f"DIVERGED: the rounds' outputs grow without bound: max|Y| = {sizes[0]:.3g} after round 1, "
            f"{sizes[-1]:.3g} after round {len(sizes)}, x{growth:.3g} a round in the limit (the rounds "
            "continued on these numbers). G has eigenvalues with real part below -K N lambda / 2 = "
            f"{-s.k * s.N * s.lbd / 2:.3g}, along which a round multiplies by |s/(1+s)| > 1 "
            "(s = eigenvalue / (K N lambda)) instead of averaging: these outputs are not probabilities and "
            "their accuracies mean nothing. A Gram matrix (--gram features or --gram psd) has every "
            "|s/(1+s)| < 1.")




# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    grid, named = {}, {"name": None, "title": None}
    if args.config:
        options, grid, named = load_config(args.config, parser)
        parser.set_defaults(**options)
        args = parser.parse_args(argv)      # flags given on the command line win over the file
    grid.update(parse_sweep(args.sweep, parser))
    if args.name:
        check_name(args.name, "--name")
    check_run(args)
    check_sweep_size(grid)
    settings = settings_from(args, grid)
    device = resolve_device(args.device, "--device")
    run = Run(args, device, th.resolve_dtype(args.dtype, args.solver), "linear" if args.approx else "softmax")
    tags, folder = plan_outputs(run, settings, grid, named)
    with cpu_threads(args.threads or (1 if device.type == "cpu" and args.solver == "exact" else 0)):
        return solve_all(run, settings, tags, grid, named, folder)


@dataclass(frozen=True)
class Run:
    """What every setting of one command shares: its options, where and how it solves, and how it
    prints (print, or tqdm.write while a sweep's progress bar is shown)."""
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    mode: str                       # "softmax", or "linear" (--approx)
    say: Callable = print

    @property
    def arrays(self) -> Path:
        """The folder of the rounds' arrays."""
        return Path(self.args.out) / self.mode

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def plan_outputs(run: Run, settings: list[th.Setting], grid: dict, named: dict) -> tuple[list[str], Path]:
    """Each setting's tag and the records folder, checked before any solving: --out can be written,
    and nothing an earlier run wrote is replaced without --overwrite (which removes that run's
    arrays beyond this run's last round)."""
    args, out = run.args, Path(run.args.out)
    options = options_tag(args, run.dtype, args.approx)
    tags = [tho.run_tag(s, args.solver, run.mode, options) for s in settings]
    name = args.name or named["name"] or (
        sweep_name(settings, grid, args.solver, run.mode, options) if grid else tags[0])
    folder = out / name
    check_writable(args.out, [folder] + ([run.arrays] if args.save else []))
    rounds = range(args.max_dist + 1)
    arrays = [run.arrays / f"{tag}_{r}.npz" for tag in tags for r in rounds] if args.save else []
    if not args.overwrite:
        refuse_to_overwrite(folder, arrays)
    elif args.save:
        remove_stale_arrays(run.arrays, tags, args.max_dist)
    return tags, folder


@contextlib.contextmanager
def cpu_threads(count: int):
    """CPU threads for the block (0: leave them), restored after (main() may run inside another
    program, e.g. the tests): torch's, and the BLAS pools of scipy/numpy, which compute G's
    diagnostics. The policy (`--threads 0`): one thread for the exact solver on the CPU. Its work is
    many small operations on K-row matrices, each of which waits for every thread; when another
    process holds a core, the thread it preempts stalls every operation (on 2 cores with one busy
    process, 2 threads were 2-7x slower than 1, which loses at most its idle 1.9x). The faithful
    solver keeps torch's default: a few large products per Adam step, 2.9x faster on 2 threads
    idle and no collapse measured, and its float32 trajectory (its printed numbers) depends on the
    thread count. Measured: docs/numerical_solving.md, bench/bench_theory_threads.py."""
    if not count:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        from threadpoolctl import threadpool_limits       # installed with scikit-learn
        blas = threadpool_limits(count, user_api="blas")
    except ImportError:
        blas = contextlib.nullcontext()
    try:
        with blas:
            yield
    finally:
        torch.set_num_threads(before)



def solve_all(run: Run, settings: list[th.Setting], tags: list[str], grid: dict, named: dict,
              folder: Path) -> int:
    """Every setting in turn (a progress bar for a sweep); the records after each setting, so a
    killed sweep keeps what it solved; the figure and one summary line at the end."""
    from tqdm import tqdm

    args, sweep = run.args, len(settings) > 1
    bar = tqdm(total=len(settings) * args.max_dist, desc="rounds", disable=not sweep, dynamic_ncols=True)
    run = replace(run, say=tqdm.write if sweep else print)      # tqdm.write keeps the bar below the lines
    records, started, diverged = [], time.perf_counter(), 0
    for s, tag in zip(settings, tags):
        diverged += solve_setting(run, s, tag, records, bar)
        tho.write_records(folder, records)
    bar.close()
    varying = [k for k in grid if len(grid[k]) > 1]
    paths = tho.draw_figure(folder, records, varying, figure_title(run, settings, varying, named["title"]))
    print(f"\n{plural(len(settings), 'setting')} in {time.perf_counter() - started:.2f}s"
          + (f", {diverged} of them DIVERGED (see above)" if diverged else "")
          + f"; records: {folder}/records.csv (.jsonl); figure: {paths[0]} (.pdf)"
          + (f"; arrays: {run.arrays}/" if args.save else ""))
    return 0


def solve_setting(run: Run, s: th.Setting, tag: str, records: list, bar) -> bool:
    """One setting, round by round: each round printed, its array saved and its record added to
    `records`; then the verdict. True when the rounds diverged."""
    args, say = run.args, run.say
    problem = th.build_problem(s, run.device, run.dtype)
    info = print_introduction(run, s, problem)
    extra = {"t_star": info["t_star"], "min_eig_sym": problem.diagnostics["min_eig_sym"],
             "symmetric": problem.diagnostics["symmetric"], "device": str(run.device),
             "dtype": run.dtype_name, "torch": torch.__version__}
    log = say if args.verbose else None
    setting_started = time.perf_counter()
    done, noted, sizes, growth = [], False, [], None
    for r in th.run_rounds(problem, solver=args.solver, approx=args.approx, rounds=args.max_dist,
                           max_iter=args.max_iter, tol=args.tol, max_newton=args.max_newton, log=log):
        say(round_line(r, args.solver, args.approx))
        if r["round"] > 0 and r["note"] and (not r["converged"] or r["folds"] or not noted):
            say(f"      step {r['round']}: {r['note']}")     # failures and folds always, other notes once
            noted = True
        if args.save:
            tho.save_round_array(run.arrays / f"{tag}_{r['round']}.npz", r["Y"], problem.true, problem.given,
                                 r["round"], r)
        records.append(tho.make_record(s, args.solver, args.approx, r, extra))
        if r["round"] > 0:
            done.append(r["converged"])
            sizes.append(r["Y"].abs().max().item())
            growth = r["growth"] if r["growth"] is not None else growth
            bar.update(1)
    total = time.perf_counter() - setting_started
    return print_verdict(run, s, problem, total, done.count(False), sizes, growth)


def print_introduction(run: Run, s: th.Setting, problem: th.Problem) -> dict:
    """The setting, its matrix G and the theory's prediction, then the table's header. Returns the
    theory's numbers (`th.theory_rounds_to_perfect`)."""
    args, say = run.args, run.say
    threads = f", {plural(torch.get_num_threads(), 'thread')}" if run.device.type == "cpu" else ""
    where = f"{run.device}{threads}"
    say("")
    say(f"setting: K={s.k} n={s.n} lambda={s.lbd:g} c={s.c:g} d={s.d:g} eta={s.eta:g} epsilon={s.epsilon:g} "
        f"seed={s.seed} gram={s.gram} labels={s.labels} | solver {args.solver} ({run.mode}), "
        f"{run.dtype_name} on {where}")
    lines, info = theory_lines(s, args.max_dist)
    for line in expectation_lines(info, args.max_dist, problem.diagnostics["gram"]):
        say(line)
    say(f"G: {problem.kernel.description}")
    for line in th.describe_diagnostics(problem.diagnostics):
        say(line)
    for line in lines:
        say(line)
    horizon = max(args.max_dist, (info["t_star"] or 0) + 10, 50)
    first = th.closed_form_first_perfect(problem, horizon)
    corrupted = int((problem.given != problem.true).sum())
    say(f"{FORMULA} with the realised labels ({corrupted} of {s.N} corrupted, "
        f"{100 * corrupted / s.N:.2f}%): "
        + (f"100% accuracy first at step {first}" if first else f"not 100% within {horizon} steps"))
    say(HEADER)
    return info


def print_verdict(run: Run, s: th.Setting, problem: th.Problem, seconds: float, bad: int, sizes: list[float],
                  growth: float | None) -> bool:
    """Whether every round reached its tolerance (`bad`: how many did not) and, first, whether the
    rounds diverged (`growth` > 1, measured on the rounds' numbers by the exact linear solver)."""
    args = run.args
    tolerance = tolerance_text(args.solver, args.approx, args.tol, max(sizes))
    diverged = growth is not None and growth > 1
    if diverged:
        run.say(divergence_headline(s, growth, sizes))
        status = (f"each round's linear solve is accurate ({tolerance}), but the rounds DIVERGE (above)"
                  if not bad else
                  f"{plural(bad, 'round')} did NOT reach the tolerance ({tolerance}), and the rounds DIVERGE "
                  "(above)")
    else:
        status = (f"every round reached its tolerance ({tolerance})" if not bad
                  else f"{plural(bad, 'round')} did NOT reach the tolerance ({tolerance})")
    run.say(f"solved {args.max_dist} rounds in {seconds:.2f}s (+{problem.seconds:.2f}s building G and "
            "diagnostics); " + status)
    return diverged


# The model settings a figure's title names, as the paper writes them, and their Setting fields.
TITLE_SETTINGS = {"K": "k", "n": "n", "c": "c", "d": "d", "eta": "eta", "lambda": "lbd", "epsilon": "epsilon"}


def figure_title(run: Run, settings: list[th.Setting], varying: list[str], title: str | None) -> str:
    """The recipe's title (if any) with the solver, mode and matrix below it; else those, and below
    them every model setting not swept (K, n, c, d, eta, lambda, epsilon), so a figure says what it
    shows."""
    what = (f"{run.args.solver} solver, {run.mode} mode"
            + ("" if "gram" in varying else f", gram={settings[0].gram}"))
    if title:
        return f"{title}\n({what})"
    fixed = [f"{name}={getattr(settings[0], field):g}" for name, field in TITLE_SETTINGS.items()
             if field not in varying]
    return what + ("\n" + ", ".join(fixed) if fixed else "")


if __name__ == "__main__":
    sys.exit(run_main(main))
