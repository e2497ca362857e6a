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

Values are read as the command line reads them (`corruption: 0` is the float of `--corruption 0`,
`wd: 5e-5` the float of `--wd 5e-5`), so a grid run and the same run started by hand share one
record. Options that choose runs may not also be given beside --config. A key given twice is
refused, and so is a grid of more than MAX_CHAINS chains unless --allow-large-grid is passed.
`--shard I/N` trains chains I, I+N, ...; every shard then reports the whole grid from the store (what
is finished so far).
"""
import itertools
import json
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

from utils.cli import UserError, load_yaml_file, plural
from utils.claims_report import write_claims
from utils.engine import ChainRunner, load_source
from utils.evidence_report import grid_evidence
from utils.io import remove_stale_temporaries
from utils.options import read_as_flag
from utils.report import METRIC_DESCRIPTION, report_options, write_reports
from utils.runs import MAX_ROUNDS, ResultsStore, step_fields, step_settings, with_key_neutral_settings
from utils.selection import DEFAULT
from utils.settings import (FLAG, GRID_KEYS, RECIPE_KEY, RUN_OPTIONS, build_parser, config_from_args,
                            finished_note, source_from_args)
from utils.steps import Step, chain_steps, step_of

TOP_KEYS = {"name", "title", "rounds", "partial", "grid", "per_dataset", "report"}
REPORT_KEYS = {"kind", "metric", "gain_etas", "title", "claims_margin"}
REPORT_KINDS = ("distillation", "ls_temperature")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # reports go to <results>/reports/<name>/
# Most chains a recipe may expand to without --allow-large-grid (100,000 expand in ~3 s; checked by
# counting before any value is parsed, so a grid of billions is refused at once).
MAX_CHAINS = 100_000


def _fail(path, message):
    raise UserError(f"recipe {path}: {message}")


def _section(path, parser, name: str, body) -> dict:
    """A grid-like mapping -> {option dest: [values of that option's type]}."""
    if not isinstance(body, dict):
        _fail(path, f"'{name}' must be a mapping of train_linear.py options to a value or a list of values")
    out = {}
    for key, value in body.items():
        canon = str(key).replace("-", "_")
        if canon not in GRID_KEYS:
            _fail(path, f"unknown key {key!r} in '{name}'; allowed: {', '.join(sorted(GRID_KEYS))}")
        dest = GRID_KEYS[canon]
        if dest in out:
            _fail(path, f"'{name}' sets {FLAG[dest]} twice (as {key!r} and another name); keep one")
        values = value if isinstance(value, list) else [value]
        if not values:
            _fail(path, f"'{name}.{key}' is an empty list; give at least one value")
        # read as train_linear.py reads --key=value: YAML's integer 0 and its text '5e-3' (no dot)
        # become the floats the command line gives, so a grid run and the same run by hand share a key
        out[dest] = [read_as_flag(parser, dest, v, f"recipe {path}: '{name}.{key}'") for v in values]
        if len(set(out[dest])) < len(out[dest]):
            _fail(path, f"'{name}.{key}' lists a value twice: {values}")
    return out


def count_chains(grid: dict) -> int:
    """How many chains `expand_grid` iterates over (before removing duplicates): the product of the
    grid's list lengths, with each dataset's share multiplied by its per_dataset lists' lengths.
    Works on a raw recipe too (a single value counts 1), so it can run before any value is parsed."""
    def product(section) -> int:
        n = 1
        if isinstance(section, dict):
            for value in section.values():
                n *= len(value) if isinstance(value, list) else 1
        return n

    body = grid.get("grid") if isinstance(grid.get("grid"), dict) else {}
    per_dataset = grid.get("per_dataset") if isinstance(grid.get("per_dataset"), dict) else {}
    datasets = body.get("dataset", [None])
    datasets = datasets if isinstance(datasets, list) else [datasets]
    rest = product({k: v for k, v in body.items() if k != "dataset"})
    names = {str(k): v for k, v in per_dataset.items()}
    return rest * sum(product(names.get(str(d))) if d is not None else 1 for d in datasets)


def load_grid(path, max_chains=MAX_CHAINS) -> dict:
    """Read and check a recipe; grid values come back as lists of the CLI's types (keys = option dests).
    A grid of more than `max_chains` chains is refused before its values are parsed (None: no limit)."""
    path = Path(path)
    grid = load_yaml_file(path, "recipe file")  # strict: a key given twice (`lr:` twice) is refused
    if not isinstance(grid, dict):
        _fail(path, "must be a mapping with at least a 'grid:' section")
    unknown = set(grid) - TOP_KEYS
    if unknown:
        _fail(path, f"unknown key{'s' if len(unknown) > 1 else ''} {sorted(map(str, unknown))}; "
                    f"allowed: {sorted(TOP_KEYS)}")
    if "grid" not in grid:
        _fail(path, "needs a 'grid:' mapping of train_linear.py options")
    chains = count_chains(grid)
    if max_chains is not None and chains > max_chains:
        _fail(path, f"its grid has {chains:,} chains (the product of its list lengths, "
                    "per_dataset included), more "
                    f"than {max_chains:,}; shrink the lists, split the recipe, or pass --allow-large-grid")
    parser = build_parser()
    grid["grid"] = _section(path, parser, "grid", grid["grid"])
    if "dataset" not in grid["grid"] and "features" not in grid["grid"]:
        _fail(path, "'grid' needs a 'dataset:' (or 'features:' with a features file)")
    per_dataset = grid.get("per_dataset") or {}
    if not isinstance(per_dataset, dict):
        _fail(path, "'per_dataset' must map dataset names to mappings of options")
    datasets = grid["grid"].get("dataset", [])
    for name, body in per_dataset.items():
        if name not in datasets:
            _fail(path, f"'per_dataset' names {name!r}, which is not in grid.dataset {datasets}")
        per_dataset[name] = _section(path, parser, f"per_dataset.{name}", body)
        if "dataset" in per_dataset[name]:
            _fail(path, f"'per_dataset.{name}' cannot set the dataset")
    grid["per_dataset"] = per_dataset
    report = grid.get("report") or {}
    if not isinstance(report, dict) or set(report) - REPORT_KEYS:
        _fail(path, f"'report' must be a mapping with keys from {sorted(REPORT_KEYS)}")
    if report.get("kind", "distillation") not in REPORT_KINDS:
        _fail(path, f"report kind must be one of {REPORT_KINDS}")
    if report.get("metric", DEFAULT.name) not in METRIC_DESCRIPTION:
        _fail(path, f"report metric must be one of {', '.join(METRIC_DESCRIPTION)}")
    etas = report.get("gain_etas", [])
    etas = etas if isinstance(etas, list) else [etas]
    if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in etas):
        _fail(path, f"report gain_etas must be a list of numbers, got {report['gain_etas']!r}")
    margin = report.get("claims_margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < float("inf"):
        _fail(path, f"report claims_margin must be a number of accuracy points >= 0, got {margin!r}")
    rounds = grid.get("rounds", 4)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 0 <= rounds <= MAX_ROUNDS:
        _fail(path, f"'rounds' must be an integer in [0, {MAX_ROUNDS}], got {rounds!r}")
    if not isinstance(grid.get("partial", True), bool):
        _fail(path, f"'partial' must be true or false, got {grid['partial']!r}")
    if not isinstance(grid.get("title", ""), str) or not isinstance(report.get("title", ""), str):
        _fail(path, "'title' must be text (quote it)")
    grid.setdefault("name", path.stem)
    if not isinstance(grid["name"], str) or not NAME_PATTERN.fullmatch(grid["name"]):
        _fail(path, f"'name' {grid['name']!r} must be a plain file name (letters, digits, '_', '-', '.')")
    return grid


def expand_grid(grid: dict, make_job) -> list:
    """All jobs of a checked recipe (see load_grid), in a stable order, without duplicates.

    `make_job(settings: dict) -> (source, cfg)` turns {option dest: value} into a job (validated)."""
    jobs, seen = [], set()
    base = list(grid["grid"].items())
    per_dataset = grid.get("per_dataset") or {}
    for combo in itertools.product(*[v for _, v in base]):
        settings = dict(zip([k for k, _ in base], combo))
        extra = list(per_dataset.get(settings.get("dataset"), {}).items())
        for more in itertools.product(*[v for _, v in extra]):
            job = make_job({**settings, **dict(zip([k for k, _ in extra], more))})
            if job not in seen:
                seen.add(job)
                jobs.append(job)
    return jobs


def grid_steps(grid: dict) -> list:
    return chain_steps(grid.get("rounds", 4), grid.get("partial", True))


def parse_shard(shard: str):
    """'I/N' -> (I, N) with 0 <= I < N."""
    try:
        index, count = (int(x) for x in str(shard).split("/"))
    except ValueError:
        index = count = -1
    if not 0 <= index < count:
        raise UserError(f"--shard {shard!r} must look like I/N with 0 <= I < N, e.g. 0/4")
    return index, count


def shard_jobs(jobs: list, shard: str) -> list:
    """Deterministic shard I of N (0-based). Chains that share their teacher (e.g. the same run
    under several selection rules or temperatures) go to one shard, so each teacher is trained
    once and a shard never waits on another; the teacher groups are dealt out round robin."""
    index, count = parse_shard(shard)
    groups = {}
    for source, cfg in jobs:
        teacher = json.dumps(step_settings(cfg, Step.teacher(), ""), sort_keys=True)
        groups.setdefault((source, teacher), []).append((source, cfg))
    return [job for group in list(groups.values())[index::count] for job in group]


def _ident(settings: dict, step: str, with_backbone: bool) -> tuple:
    return tuple((name, settings.get(name)) for name in step_fields(step)
                 if with_backbone or name != "backbone") + (("step", str(step)),)


def matching_records(records: list, jobs: list, steps: list) -> list:
    """The store's records that belong to a grid, matched on every setting of each step except the
    features fingerprint (so reports need no features loaded); newest wins on a tie. The backbone
    is matched too, except for features files (their backbone is known only inside the file)."""
    index = {}
    for rec in records:
        if not isinstance(rec, dict) or not {"key", "step"} <= set(rec):
            continue  # not a record of this tool
        for ident in (_ident(rec, rec["step"], True), _ident(rec, rec["step"], False)):
            if ident not in index or rec.get("created", "") > index[ident].get("created", ""):
                index[ident] = rec
    out, seen = [], set()
    for source, cfg in jobs:
        for step in steps:
            rec = index.get(_ident(step_settings(cfg, step, ""), step, not source.features_path))
            if rec is not None and rec["key"] not in seen:
                seen.add(rec["key"])
                out.append(rec)
    return out


def _run_uses(jobs: list, steps: list) -> Counter:
    """{a distinct run's identity: how many of the jobs' chains use it}: a teacher is one run however
    many chains (temperatures, selection rules) learn from it. Runs are told apart as
    `matching_records` tells records apart."""
    return Counter(_ident(step_settings(cfg, step, ""), step, not source.features_path)
                   for source, cfg in jobs for step in steps)


def distinct_runs(jobs: list, steps: list) -> tuple:
    """(how many distinct runs the jobs' chains need, which of them serve several chains and at which
    step)."""
    uses = _run_uses(jobs, steps)
    return len(uses), [step_of(ident[-1][1]) for ident, n in uses.items() if n > 1]


def runs_phrase(count: int, shared: list) -> str:
    """'240 runs (30 teachers shared by several chains)'; `shared`: the step of each shared run."""
    text = plural(count, "run")
    kinds = Counter(step.kind for step in shared)
    if kinds:
        names = {"teacher": "teacher", "student": "student", "pll": "PLL student"}
        parts = [plural(kinds[kind], names[kind]) for kind in names if kinds[kind]]
        text += f" ({' and '.join(parts)} shared by several chains)"
    return text


def plan_phrase(jobs: list, steps: list) -> str:
    """How much a grid trains, as its first line says it: '15 per step, 200 epochs each' (or each
    step's count, 'per step: 1 (Teacher) 15, 2 45, ...; 200 epochs each', when they differ)."""
    per_step = Counter(ident[-1][1] for ident in _run_uses(jobs, steps))
    counts = [per_step[str(step)] for step in steps]
    runs = (f"{counts[0]:,} per step," if len(set(counts)) == 1 else
            "per step: " + ", ".join(f"{step.label} {n:,}" for step, n in zip(steps, counts)) + ";")
    epochs = sorted({cfg.epochs for _, cfg in jobs})
    return f"{runs} {epochs[0]}{f'-{epochs[-1]}' if len(epochs) > 1 else ''} epochs each"


def evidence_sources(jobs: list) -> dict:
    """{feature source: [(ctype, eta, seed)]}: each source's corruption settings at its smallest seed,
    whose corrupted labels the evidence's label energy reports."""
    seeds, settings = {}, {}
    for source, cfg in jobs:
        seeds[source] = min(seeds.get(source, cfg.seed), cfg.seed)
        settings.setdefault(source, {})[(cfg.ctype, cfg.eta)] = None
    return {source: [(ctype, eta, seeds[source]) for ctype, eta in pairs]
            for source, pairs in settings.items()}


def _write_evidence(jobs: list, opts, out_dir: Path, title: str) -> list:
    return grid_evidence(evidence_sources(jobs), lambda source: load_source(source, opts, print), out_dir,
                         title)


def _train_grid(args, opts, grid: dict, all_jobs: list, jobs: list, steps: list) -> None:
    part = (plural(len(jobs), "configuration") if args.shard is None
            else f"shard {args.shard}: {len(jobs)} of {plural(len(all_jobs), 'configuration')}")
    plan = f" ({plan_phrase(jobs, steps)})" if jobs else ""
    print(f"recipe {grid['name']}: {part} x {plural(len(steps), 'step')}: "
          f"{runs_phrase(*distinct_runs(jobs, steps))} on {opts.device}{plan}")
    if jobs:
        runner = ChainRunner(opts)
        runner.run(jobs, steps)
        trained = runner.counts["trained"]
        print(f"this process trained {plural(trained, 'run')}"
              + "".join(f"; {note}" for note in [finished_note(runner.counts, opts.results_root)] if note))


def _check_features_file(path, settings: dict) -> None:
    """Before any training: a run's features file exists, said in the recipe's words (its key)."""
    features = settings.get("features")
    if features is not None and not Path(features).is_file():
        _fail(path, f"features: {features} is not a file (a relative path is read from {Path.cwd()}); point "
                    "the recipe's features: key at a .pt/.npz features file (README, 'Features-file format')")


def run_grid_command(args, opts) -> int:
    """`train_linear.py --config YAML`: train what is missing, then write the reports (tables,
    figures, claims and the feature evidence); with --evidence only the evidence, training nothing."""
    parser = build_parser()
    defaults = parser.parse_args([])
    given = [FLAG[d] for d in RUN_OPTIONS if getattr(args, d) != getattr(defaults, d)]
    if given:
        raise UserError(f"{', '.join(given)} cannot be combined with --config: the recipe chooses the runs "
                        "(set them in its grid:, rounds: or partial:)")
    if args.shard is not None:
        parse_shard(args.shard)
    grid = load_grid(args.config, max_chains=None if args.allow_large_grid else MAX_CHAINS)

    def make_job(settings):
        _check_features_file(args.config, settings)
        ns = parser.parse_args([])  # the CLI defaults, then the recipe's values
        for dest, value in settings.items():
            setattr(ns, dest, value)
        try:
            source = source_from_args(ns)
            return source, replace(config_from_args(ns), dataset=source.dataset, backbone=source.tag())
        except UserError as exc:
            run = ", ".join(f"{RECIPE_KEY[k]}={v}" for k, v in settings.items())
            _fail(args.config, f"run ({run}): {exc}")

    all_jobs = expand_grid(grid, make_job)
    steps = grid_steps(grid)
    jobs = shard_jobs(all_jobs, args.shard) if args.shard is not None else all_jobs
    out_dir = Path(opts.results_root) / "reports" / grid["name"]
    options = report_options(grid)
    if args.evidence:
        written = _write_evidence(all_jobs, opts, out_dir, options["title"])
        print(f"feature evidence of {plural(len(evidence_sources(all_jobs)), 'source')} -> "
              + ", ".join(str(p) for p in written))
        return 0
    if not args.report_only:
        _train_grid(args, opts, grid, all_jobs, jobs, steps)
    # the whole grid's records, not only this shard's: the last shard to finish reports everything
    records = matching_records(ResultsStore(opts.results_root).records(), all_jobs, steps)
    if not records:
        if not args.report_only:
            print("no records of this recipe yet: no report written")
            return 0
        raise UserError(f"no results yet for recipe {grid['name']} in {opts.results_root}; "
                        "run it without --report-only")
    remove_stale_temporaries(out_dir)  # of a report writer that was killed
    # a cell with fewer seeds than the grid's says so ("(n=1)"), even where no cell has them all
    grid["seeds"] = len({cfg.seed for _, cfg in all_jobs})
    written = write_reports(records, out_dir, grid, checkpoint_root=opts.checkpoint_root)
    if options["kind"] == "distillation":
        written += write_claims([with_key_neutral_settings(r) for r in records], out_dir, options["title"],
                                float(options["claims_margin"]))
        if not args.report_only:  # reports alone never load features (a store copied without them works)
            written += _write_evidence(all_jobs, opts, out_dir, options["title"])
    needed, shared = distinct_runs(all_jobs, steps)
    missing = max(needed - len(records), 0)
    state = "all finished" if not missing else f"of which {missing} not finished yet"
    print(f"{runs_phrase(needed, shared)}, {state} -> " + ", ".join(str(p) for p in written))
    return 0
