"""Recipe grids: a YAML file -> the runs it names -> batched training -> tables and figures.

Format (see recipe.MD and recipes/*.yaml):
    name: fig2                  # reports go to <results>/reports/<name>/
    title: "..."                # caption of tables and figures
    rounds: 4                   # teacher, rounds 1..rounds, then PLL (partial: false to skip PLL)
    grid:                       # train_linear.py flags (long names, '-' or '_'); a list sweeps
      dataset: [cifar100, flowers102]
      corruption: [0.0, 0.5]
      manualSeed: [0, 1, 2]
    per_dataset:                # optional overrides for one dataset (lists sweep too)
      cifar100: {lr: 0.05, wd: 5.0e-5}
    report: {kind: distillation, metric: test, gain_etas: [0.5, 0.9]}
"""
import itertools
from dataclasses import replace
from pathlib import Path

import yaml

from utils.cli import UserError
from utils.runs import RunConfig, step_fields, step_settings

# grid key -> RunConfig field (or FeatureSource field, marked by a leading '@')
GRID_KEYS = {
    "dataset": "@dataset", "arch": "@arch", "depth": "@depth", "pretrained": "@pretrained",
    "features": "@features_path", "ctype": "ctype", "corruption": "eta", "manualSeed": "seed",
    "lr": "lr", "wd": "wd", "weight_decay": "wd", "momentum": "momentum", "gamma": "gamma", "epochs": "epochs",
    "train_batch": "train_batch", "label_smoothing": "label_smoothing", "temperature": "temperature",
    "selection": "selection", "val_split": "val_split", "val_clean": "val_clean",
}
TOP_KEYS = {"name", "title", "rounds", "partial", "grid", "per_dataset", "report"}
REPORT_KEYS = {"kind", "metric", "gain_etas", "title"}
REPORT_KINDS = ("distillation", "ls_temperature")


def _fail(path, message):
    raise UserError(f"recipe {path}: {message}")


def load_grid(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}; see recipes/ for examples")
    try:
        grid = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        _fail(path, f"is not valid YAML{where} ({getattr(exc, 'problem', exc)}); fix the syntax")
    if not isinstance(grid, dict):
        _fail(path, "must be a mapping with at least a 'grid:' section")
    unknown = set(grid) - TOP_KEYS
    if unknown:
        _fail(path, f"unknown key(s) {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")
    if not isinstance(grid.get("grid"), dict):
        _fail(path, "needs a 'grid:' mapping of train_linear flags")
    for section, body in [("grid", grid["grid"])] + [(f"per_dataset.{k}", v) for k, v in (grid.get("per_dataset") or {}).items()]:
        if not isinstance(body, dict):
            _fail(path, f"'{section}' must be a mapping")
        bad = {k for k in body if str(k).replace("-", "_") not in GRID_KEYS}
        if bad:
            _fail(path, f"unknown key(s) {sorted(bad)} in '{section}'; allowed: {sorted(GRID_KEYS)}")
    report = grid.get("report") or {}
    if not isinstance(report, dict) or set(report) - REPORT_KEYS:
        _fail(path, f"'report' must be a mapping with keys from {sorted(REPORT_KEYS)}")
    if report.get("kind", "distillation") not in REPORT_KINDS:
        _fail(path, f"report kind must be one of {REPORT_KINDS}")
    if report.get("metric", "test") not in ("test", "val", "last"):
        _fail(path, "report metric must be test, val or last")
    rounds = grid.get("rounds", 4)
    if not isinstance(rounds, int) or rounds < 0:
        _fail(path, f"'rounds' must be an integer >= 0, got {rounds!r}")
    grid.setdefault("name", path.stem)
    return grid


def _axes(body: dict) -> list:
    """[(canonical key, [values])] with scalars as one-value lists."""
    out = []
    for key, value in body.items():
        values = value if isinstance(value, list) else [value]
        if not values:
            raise UserError(f"recipe key {key!r} has an empty list")
        out.append((str(key).replace("-", "_"), values))
    return out


def expand_grid(grid: dict, make_job) -> list:
    """All (FeatureSource, RunConfig) of a recipe, in a stable order, without duplicates.

    `make_job(settings: dict) -> (source, cfg)` turns flag-name settings into a job (validated)."""
    jobs, seen = [], set()
    base = _axes(grid["grid"])
    per_dataset = grid.get("per_dataset") or {}
    for combo in itertools.product(*[v for _, v in base]):
        settings = dict(zip([k for k, _ in base], combo))
        extra = _axes(per_dataset.get(settings.get("dataset"), {}))
        for more in itertools.product(*[v for _, v in extra]):
            full = {**settings, **dict(zip([k for k, _ in extra], more))}
            job = make_job(full)
            if job not in seen:
                seen.add(job)
                jobs.append(job)
    return jobs


def grid_steps(grid: dict) -> list:
    rounds = grid.get("rounds", 4)
    return [str(t) for t in range(rounds + 1)] + (["p"] if grid.get("partial", True) else [])


def shard_jobs(jobs: list, shard: str) -> list:
    """Deterministic shard I of N (0-based): whole chains, so a shard never waits on another."""
    try:
        index, count = (int(x) for x in shard.split("/"))
        assert 0 <= index < count
    except (ValueError, AssertionError):
        raise UserError(f"--shard {shard!r} must look like I/N with 0 <= I < N, e.g. 0/4") from None
    return jobs[index::count]


def matching_records(records: list, jobs: list, steps: list) -> list:
    """The store's records that belong to a grid, matched on every setting of each step except
    the features fingerprint (so reports need no features loaded); newest wins on a tie."""
    index = {}
    for rec in records:
        ident = tuple((name, rec.get(name)) for name in step_fields(rec["step"]) if name != "backbone") + (("step", rec["step"]),)
        if ident not in index or rec.get("created", "") > index[ident].get("created", ""):
            index[ident] = rec
    out, seen = [], set()
    for source, cfg in jobs:
        for step in steps:
            settings = step_settings(cfg, step, "")
            ident = tuple((name, settings[name]) for name in step_fields(step) if name != "backbone") + (("step", step),)
            rec = index.get(ident)
            if rec is not None and rec["key"] not in seen:
                seen.add(rec["key"])
                out.append(rec)
    return out


def run_grid_command(args, opts) -> int:
    """`train_linear.py --config YAML`: train what is missing, then write the reports."""
    import train_linear as cli
    from utils.engine import ChainRunner
    from utils.report import write_reports
    from utils.runs import ResultsStore

    grid = load_grid(args.config)

    def make_job(settings):
        ns = cli.build_parser().parse_args([])  # the CLI defaults, then the recipe's values
        for key, value in settings.items():
            target = GRID_KEYS[key].lstrip("@")
            setattr(ns, {"dataset": "dataset", "arch": "arch", "depth": "depth", "pretrained": "pretrained",
                         "features_path": "features", "eta": "corruption", "seed": "manualSeed"}.get(target, target),
                    value)
        source = cli.source_from_args(ns)
        return source, replace(cli.config_from_args(ns), dataset=source.dataset, backbone=source.tag())

    jobs = expand_grid(grid, make_job)
    steps = grid_steps(grid)
    if args.shard:
        jobs = shard_jobs(jobs, args.shard)
    if not args.report_only:
        print(f"recipe {grid['name']}: {len(jobs)} configurations x {len(steps)} steps "
              f"({len(jobs) * len(steps)} runs) on {opts.device}")
        ChainRunner(opts).run(jobs, steps)
    records = matching_records(ResultsStore(opts.results_root).records(), jobs, steps)
    if not records:
        raise UserError(f"no results yet for recipe {grid['name']} in {opts.results_root}; run it without --report-only")
    out_dir = Path(opts.results_root) / "reports" / grid["name"]
    written = write_reports(records, out_dir, grid)
    print(f"{len(records)} records -> " + ", ".join(str(p) for p in written))
    return 0
