"""The options of train_linear.py, and what a parsed command line means.

Each option is declared once: a run setting on `utils.runs.RunConfig`, a storage/engine option on
`EngineOptions` below, and the options that say where features come from or which steps to run
below. The parser, `--help`, the validation and the recipe keys (`GRID_KEYS`) are derived from
these declarations, so the command line, recipes and run keys cannot disagree. Nothing here
imports torch: a command line is parsed and checked before torch is imported (`--help` and a
mistyped value answer at once).
"""
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from utils.cli import ArgumentParser, DefaultsHelpFormatter, UserError, plural, resolve_device
from utils.names import BACKBONES, DATASETS, check_arch, check_plain_name, safe_name
from utils.options import Interval, Option, add_options, check_option_values, option, options_of
from utils.runs import MAX_ROUNDS, SETTINGS, RunConfig, check_settings
from utils.selection import DEFAULT, LAST
from utils.steps import Step, chain_steps


def _cpu():
    import torch

    return torch.device("cpu")


@dataclass(frozen=True)
class FeatureSource:
    """Where a configuration's features come from: a dataset through a backbone, or a file."""
    dataset: str
    arch: str = "resnet34"
    pretrained: bool = True
    features_path: Optional[str] = None

    def tag(self) -> str:
        if self.features_path:
            return "file"
        from models.backbones import backbone_tag

        return "pixels" if self.dataset == "digits" else backbone_tag(self.arch, self.pretrained)


@dataclass
class EngineOptions:
    """How runs are trained and stored (none of it changes a run's numbers), each option declared
    once with its command-line flag."""
    checkpoint_root: str = option("checkpoint", "-c", "--checkpoint", help="root directory of checkpoints")
    results_root: str = option("results", "--results", new=True, help="results store directory")
    data_root: str = option("data_root", "--data-root", new=True,
                            help="where torchvision datasets are read or downloaded; with -d imagefolder, "
                                 "the image folder itself (DIR/<class>/<images>, or DIR/train/<class>/... "
                                 "and DIR/test/<class>/...)")
    cache_root: str = option("cache", "--cache-dir", new=True, help="feature cache directory")
    device: Any = field(default_factory=_cpu)   # a torch.device (engine_options resolves --gpu-id)
    workers: int = option(4, "-j", "--workers", type=int, valid=Interval(int, 0),
                          help="data loading workers of feature extraction (at most the CPU cores available; "
                               "0: images are read in the main process)")
    test_batch: int = option(100, "--test-batch", type=int, valid=Interval(int, 1),
                             help="batch size of feature extraction")
    max_batch_runs: int = option(64, "--max-batch-runs", type=int, valid=Interval(int, 1), new=True,
                                 metavar="N", help="most runs trained together in one batch")
    save_every: int = option(25, "--save-every", type=int, valid=Interval(int, 0), new=True, metavar="N",
                             help="epochs between resumable checkpoints (0: end only)")
    overwrite: bool = option(False, "--overwrite", type=bool, new=True,
                             help="retrain runs that already have a result record")
    # "auto": progress bars when stderr is a terminal, else one line per finished chunk of runs;
    # "bars", "lines", or "none" (no progress output; warnings and errors still appear)
    progress: str = "auto"
    lease_timeout: float = option(600.0, "--lease-timeout", type=float,
                                  valid=Interval(float, 0, closed="neither", note="seconds"), new=True,
                                  metavar="S",
                                  help="seconds without a heartbeat after which another process takes over "
                                       "a run being trained")
    poll_seconds: float = 5.0     # between looks at runs that other processes hold
    fuse_shared_seeds: bool = option(False, "--fuse-shared-seeds", type=bool, new=True,
                                     help="runs sharing mini-batches multiply them as one wider matmul: "
                                          "faster, but not bit-identical to the same run alone on every BLAS "
                                          "(recorded)")


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
           help="distillation round t: trains step t + 1 (0: the teacher, step 1)"),
    Option(("--last",), type=int, default=0, choices=(0, 1),
           help="teacher checkpoint: 0 best, 1 last"),
    Option(("--partial",), type=bool, default=False,
           help="train the PLL student (bare flag or True/False)"),
    Option(("--rounds",), type=int, new=True, metavar="R", valid=Interval(int, 0, MAX_ROUNDS),
           help="run the whole chain: the teacher (step 1), rounds 1..R (steps 2..R + 1), PLL"),
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


def check_engine_options(args) -> None:
    """One-line errors for storage and engine option values (before torch is imported)."""
    check_option_values(ENGINE_OPTIONS.values(), args)


def engine_options(args) -> EngineOptions:
    """The checked options (`check_engine_options`), with --gpu-id resolved to a torch device."""
    given = {name: getattr(args, name) for name in ENGINE_OPTIONS}
    return EngineOptions(**given, device=resolve_device(args.gpu_id, "--gpu-id"),
                         poll_seconds=min(5.0, args.lease_timeout / 20),
                         progress="none" if args.quiet else "auto")


# Always in a chain's header: the chain's identity and the paper's hyper-parameters.
HEADER_SETTINGS = ("ctype", "eta", "seed", "lr", "wd")


def settings_text(cfg: RunConfig) -> str:
    """A chain's settings as its header prints them: 'ctype=cc eta=0.5 seed=0 lr=0.05 wd=0.005',
    then every other setting that differs from its default ('epochs=50 feature_norm=l2'), so two
    headers differ whenever the runs' numbers can."""
    def text(name):
        value = getattr(cfg, name)
        return f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"

    others = [f.name for f in fields(RunConfig) if f.name not in HEADER_SETTINGS + ("dataset", "backbone")
              and getattr(cfg, f.name) != f.default]
    return " ".join(text(name) for name in HEADER_SETTINGS + tuple(others))


def finished_note(counts, results_root) -> str:
    """'' or a line saying how many runs were not trained because they were already finished."""
    found = counts["found"] + counts["completed"]
    if not found:
        return ""
    note = (f"{plural(found, 'run')} already finished (records in {results_root}/records/); "
            "--overwrite retrains")
    if counts["completed"]:
        note += f" ({counts['completed']} completed from final checkpoints that had no record yet)"
    return note

