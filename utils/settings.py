"""The options of train_linear.py, and what a parsed command line means.

Each option is declared once: a run setting on `utils.runs.RunConfig`, a storage/engine option on
`utils.engine.EngineOptions`, and the options that say where features come from or which steps
to run below. The parser, `--help`, the validation and the recipe keys (`GRID_KEYS`) are derived
from these declarations, so the command line, recipes and run keys cannot disagree.
"""
from pathlib import Path

from data.datasets import DATASETS
from data.features import check_plain_name, safe_name
from models.backbones import BACKBONES, check_arch
from utils.cli import ArgumentParser, DefaultsHelpFormatter, UserError, resolve_device
from utils.engine import EngineOptions, FeatureSource
from utils.options import Interval, Option, add_options, check_option_values, options_of
from utils.runs import MAX_ROUNDS, SETTINGS, RunConfig, check_settings
from utils.selection import DEFAULT, LAST
from utils.steps import Step, chain_steps

DEPTHS = {18: "resnet18", 34: "resnet34", 50: "resnet50"}

# where a configuration's features come from (a recipe may sweep these)
SOURCE_OPTIONS = (
    Option(("--depth",), type=int, default=34, sweep=True, help="ResNet depth: 18, 34 or 50"),
    Option(("--arch",), new=True, sweep=True,
           help=f"backbone: {', '.join(BACKBONES)}, or timm:<model name> for any timm model (e.g. "
                "timm:vit_base_patch14_dinov2.lvd142m; its own preprocessing) (default: resnet<depth>)"),
    Option(("--pretrained",), type=bool, default=True, new=True, sweep=True,
           help="ImageNet weights (False: random init, for tests)"),
    Option(("--features",), new=True, sweep=True, metavar="PATH",
           help="probe features from a .pt/.npz file (see README)"),
)
# which steps run (with --config the recipe says it)
STEP_OPTIONS = (
    Option(("--dist",), type=int, default=0, valid=Interval(int, 0, MAX_ROUNDS),
           help="distillation round (0: teacher)"),
    Option(("--last",), type=int, default=0, choices=(0, 1),
           help="teacher checkpoint: 0 best, 1 last"),
    Option(("--partial",), type=bool, default=False,
           help="train the PLL student (bare flag or True/False)"),
    Option(("--rounds",), type=int, new=True, metavar="R", valid=Interval(int, 0, MAX_ROUNDS),
           help="run the whole chain: teacher, rounds 1..R, PLL"),
)
COMMAND_OPTIONS = (
    Option(("--gpu-id",), default="0",
           help="CUDA device index (the first of a list such as 0,1); 'cpu' or -1 (or no GPU present) trains "
                "on the CPU; also auto, cuda, cuda:i"),
    Option(("--config",), new=True, metavar="YAML",
           help="run a grid from a recipe file (see recipe.MD)"),
    Option(("--shard",), new=True, metavar="I/N",
           help="with --config: run only shard I of N (0-based)"),
    Option(("--allow-large-grid",), type=bool, new=True,
           help="with --config: expand a grid of more than 100,000 chains"),
    Option(("--report-only",), type=bool, new=True,
           help="with --config: only write tables and figures"),
    Option(("--extract-only",), type=bool, new=True,
           help="only extract (or find cached) the features of -d through --arch and print the features "
                "file's path, to probe later with --features"),
    Option(("--evidence",), type=bool, new=True,
           help="train nothing: write the feature evidence of -d/--arch or --features to "
                "<results>/evidence/<dataset>/<backbone>/ (evidence.json; heatmaps of the class-wise "
                "correlation mean and std; the class dendrogram; the Gram spectrum and the share of the "
                "clean and the --ctype/--corruption/--manualSeed labels along its top eigenvectors; the "
                "clusters / c / d / e table); with --config, of every feature source of the recipe, into its "
                "report folder"),
    Option(("--quiet",), type=bool, new=True,
           help="no progress output (bars, per-step lines); errors, warnings and the final tables are "
                "still printed"),
)
ENGINE_OPTIONS = options_of(EngineOptions)
OPTIONS = (*SETTINGS.values(), *SOURCE_OPTIONS, *ENGINE_OPTIONS.values(), *STEP_OPTIONS, *COMMAND_OPTIONS)

# recipe key -> the option it sets (its dest): every long flag of a sweepable option, without the
# dashes and with '-' read as '_' (`weight-decay`, `weight_decay` and `wd` are one key)
GRID_KEYS = {name: opt.dest for opt in OPTIONS if opt.sweep for name in opt.grid_names}
# option dest -> the flag that names it in messages (eta -> --corruption, wd -> --wd)
FLAG = {opt.dest: opt.flag for opt in OPTIONS if opt.flags}
# option dest -> the recipe key that names it in messages (eta -> corruption, seed -> manualSeed)
RECIPE_KEY = {opt.dest: opt.flag[2:].replace("-", "_") for opt in OPTIONS if opt.sweep}
# Options that choose runs or steps: with --config the recipe says them, so the command line must not.
RUN_OPTIONS = sorted({opt.dest for opt in OPTIONS if opt.sweep} | {opt.dest for opt in STEP_OPTIONS})


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="train_linear.py", formatter_class=DefaultsHelpFormatter,
                       description="Linear probing with label noise: teacher, multi-round self-distillation "
                                   "students, PLL student.")
    add_options(p, OPTIONS)
    return p


def source_from_args(args) -> FeatureSource:
    if args.features:
        # the name becomes a path component (checkpoints, records): -d must be a plain name, the
        # file's stem is mapped to one
        if args.dataset is not None:
            name = check_plain_name(args.dataset, "-d")
        else:
            name = safe_name(Path(args.features).stem, "features")
        return FeatureSource(name, features_path=args.features)
    if args.dataset is None:
        raise UserError("choose a dataset with -d (one of: " + ", ".join(DATASETS)
                        + ") or pass --features PATH")
    if args.dataset not in DATASETS:
        raise UserError(f"unknown dataset {args.dataset!r}; choose from {', '.join(DATASETS)} "
                        "or pass --features PATH")
    arch = args.arch
    if arch is None:
        if args.depth not in DEPTHS:
            raise UserError(f"--depth {args.depth} is not available; choose 18, 34 or 50 "
                            "(or --arch vit_b_16)")
        arch = DEPTHS[args.depth]
    return FeatureSource(args.dataset, check_arch(arch), args.pretrained)


def selection_from_args(args) -> str:
    if args.last == 1 and args.selection not in (None, LAST.name):
        raise UserError(f"--last 1 means --selection last, but --selection {args.selection} "
                        "was given; drop one")
    return args.selection or (LAST.name if args.last == 1 else DEFAULT.name)


def config_from_args(args) -> RunConfig:
    """The run settings of a command line (dataset and backbone are filled in from the features)."""
    values = {name: getattr(args, name) for name in SETTINGS if name != "backbone"}
    cfg = RunConfig(**{**values, "dataset": args.dataset or "", "backbone": "",
                       "selection": selection_from_args(args)})
    check_settings(cfg)
    return cfg


def steps_from_args(args) -> list:
    check_option_values(STEP_OPTIONS, args)
    if args.rounds is not None:
        if args.dist or args.partial:
            given = " and ".join(flag for flag, on in (("--dist", args.dist), ("--partial", args.partial))
                                 if on)
            raise UserError(f"--rounds runs the whole chain (teacher, rounds 1..R, PLL): drop {given}, or "
                            "drop --rounds to run one step")
        return chain_steps(args.rounds)
    if args.partial:
        return [Step.pll()]
    return [Step.student(args.dist)]


def engine_options(args) -> EngineOptions:
    check_option_values(ENGINE_OPTIONS.values(), args)
    given = {name: getattr(args, name) for name in ENGINE_OPTIONS}
    return EngineOptions(**given, device=resolve_device(args.gpu_id, "--gpu-id"),
                         poll_seconds=min(5.0, args.lease_timeout / 20),
                         progress="none" if args.quiet else "auto")


def finished_note(counts, results_root) -> str:
    """'' or a line saying how many runs were not trained because they were already finished."""
    found = counts["found"] + counts["completed"]
    if not found:
        return ""
    note = (f"{found} run{'s' if found != 1 else ''} already finished (records in {results_root}/records/); "
            "--overwrite retrains")
    if counts["completed"]:
        note += f" ({counts['completed']} completed from final checkpoints that had no record yet)"
    return note

