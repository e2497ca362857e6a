#!/usr/bin/env python
"""Linear probing with label noise: teacher, multi-round self-distillation students, PLL student.

Flags follow the option table of the paper's code (see README); new flags are marked [new].
One step:       python train_linear.py -d cifar100 --ctype cc --corruption 0.5 --dist 0
A whole chain:  python train_linear.py -d digits --rounds 4          (teacher, rounds 1..4, PLL)
A grid:         python train_linear.py --config recipes/fig2.yaml    (batched, resumable, reports)
"""
import argparse
import math
import sys

import torch

from data.corruption import CORRUPTION_TYPES
from data.datasets import DATASETS
from data.features import FEATURE_NORMS, check_plain_name, safe_name
from models.backbones import BACKBONES, check_arch
from models.extract import features_cache_path
from utils.cli import ArgumentParser, DefaultsHelpFormatter, UserError, add_bool_flag, run_main, str2bool
from utils.engine import ChainRunner, EngineOptions, FeatureSource, load_source
from utils.runs import SELECTIONS, RunConfig, step_label

DEPTHS = {18: "resnet18", 34: "resnet34", 50: "resnet50"}
# numpy's RandomState (scikit-learn's random_state, used by the validation split) takes seeds in
# [0, 2**32 - 1]; SeedSequence and torch take those too.
MAX_SEED = 2**32 - 1


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="train_linear.py", description=__doc__.splitlines()[0],
                       formatter_class=DefaultsHelpFormatter)
    a = p.add_argument
    a("-d", "--dataset", default=None,
      help=f"dataset: {', '.join(DATASETS)} (with --features: any plain name for the results)")
    a("-j", "--workers", type=int, default=4,
      help="data loading workers of feature extraction (at most the CPU cores available)")
    a("--epochs", type=int, default=200, help="epochs per step")
    a("--train-batch", type=int, default=128, help="training batch size")
    a("--test-batch", type=int, default=100, help="batch size of feature extraction")
    a("--lr", "--learning-rate", dest="lr", type=float, default=5e-4, help="initial learning rate")
    a("--gamma", type=float, default=0.98, help="lr is multiplied by gamma after every epoch")
    a("--momentum", type=float, default=0.9, help="SGD momentum")
    a("--weight-decay", "--wd", dest="wd", type=float, default=1e-4, help="weight decay")
    a("-c", "--checkpoint", default="checkpoint", help="root directory of checkpoints")
    a("--depth", type=int, default=34, help="ResNet depth: 18, 34 or 50")
    a("--manualSeed", type=int, default=0, help="seed of corruption, initialisation and shuffling")
    a("--gpu-id", default="0", help="CUDA device index; 'cpu' (or no GPU present) trains on the CPU")
    a("--dist", type=int, default=0, help="distillation round (0: teacher)")
    a("--last", type=int, default=0, choices=(0, 1), help="teacher checkpoint: 0 best, 1 last")
    a("--ctype", default="cc", choices=CORRUPTION_TYPES,
      help="corruption type: sym (symmetric), asym (asymmetric), cc (within superclasses)")
    a("--corruption", type=float, default=0.5, help="label corruption ratio eta in [0, 1]")
    add_bool_flag(p, "--partial", help="train the PLL student (bare flag or True/False)")
    new = p.add_argument_group("[new] options not in the original")
    n = new.add_argument
    n("--arch", default=None, help=f"backbone: {', '.join(BACKBONES)}, or timm:<model name> for any timm model "
      "(e.g. timm:vit_base_patch14_dinov2.lvd142m; its own preprocessing) (default: resnet<depth>)")
    add_bool_flag(new, "--pretrained", default=True, help="ImageNet weights (False: random init, for tests)")
    n("--features", default=None, metavar="PATH", help="probe features from a .pt/.npz file (see README)")
    n("--data-root", default="data_root",
      help="where torchvision datasets are read or downloaded; with -d imagefolder, the image folder itself "
           "(DIR/<class>/<images>, or DIR/train/<class>/... and DIR/test/<class>/...)")
    n("--cache-dir", default="cache", help="feature cache directory")
    n("--results", default="results", help="results store directory")
    n("--rounds", type=int, default=None, metavar="R", help="run the whole chain: teacher, rounds 1..R, PLL")
    n("--config", default=None, metavar="YAML", help="run a grid from a recipe file (see recipe.MD)")
    n("--shard", default=None, metavar="I/N", help="with --config: run only shard I of N (0-based)")
    add_bool_flag(new, "--allow-large-grid", help="with --config: expand a grid of more than 100,000 chains")
    add_bool_flag(new, "--report-only", help="with --config: only write tables and figures")
    n("--selection", default=None, choices=SELECTIONS,
      help="checkpoint that is the result and the next teacher: test (paper), val, last "
           "(default: test; last with --last 1)")
    n("--val-split", type=float, default=0.0, metavar="F",
      help="fraction of train held out for validation, in (0, 0.5]; 0: none")
    add_bool_flag(new, "--val-clean", help="oracle study: validation labels are NOT corrupted")
    n("--label-smoothing", type=float, default=0.0, metavar="A", help="teacher label smoothing alpha in [0, 1)")
    n("--temperature", type=float, default=1.0, metavar="T", help="distillation temperature T > 0 (students)")
    add_bool_flag(new, "--overwrite", help="retrain runs that already have a result record")
    n("--save-every", type=int, default=25, metavar="N", help="epochs between resumable checkpoints (0: end only)")
    n("--max-batch-runs", type=int, default=64, metavar="N", help="most runs trained together in one batch")
    n("--lease-timeout", type=float, default=600.0, metavar="S",
      help="seconds without a heartbeat after which another process takes over a run being trained")
    add_bool_flag(new, "--fuse-shared-seeds", help="runs sharing mini-batches multiply them as one wider matmul: "
                  "faster, but not bit-identical to the same run alone on every BLAS (recorded)")
    add_bool_flag(new, "--extract-only", help="only extract (or find cached) the features of -d through --arch "
                  "and print the features file's path, to probe later with --features")
    n("--feature-norm", default="none", choices=FEATURE_NORMS,
      help="transform of the features before the probe: none (paper), l2 (unit rows), standardize (train "
           "mean/std per dimension)")
    add_bool_flag(new, "--quiet", help="no progress output (bars, per-step lines); errors, warnings and the "
                  "final tables are still printed")
    return p


def resolve_device(gpu_id: str) -> torch.device:
    """First id of --gpu-id when CUDA is there; never touches CUDA_VISIBLE_DEVICES."""
    first = str(gpu_id).split(",")[0].strip().lower()
    if first in ("", "cpu", "-1") or not torch.cuda.is_available():
        return torch.device("cpu")
    if not first.isdigit() or int(first) >= torch.cuda.device_count():
        raise UserError(f"--gpu-id {gpu_id}: no such CUDA device (found {torch.cuda.device_count()}); "
                        "pass an index below that, or 'cpu'")
    return torch.device(f"cuda:{first}")


def check_settings(cfg: RunConfig) -> None:
    """One-line errors for values the maths cannot take."""
    if cfg.ctype not in CORRUPTION_TYPES:
        raise UserError(f"unknown --ctype {cfg.ctype!r}; choose from {', '.join(CORRUPTION_TYPES)}")
    if cfg.feature_norm not in FEATURE_NORMS:
        raise UserError(f"unknown --feature-norm {cfg.feature_norm!r}; choose from {', '.join(FEATURE_NORMS)}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed <= MAX_SEED:
        raise UserError(f"--manualSeed must be an integer in [0, {MAX_SEED}] (0 <= seed < 2**32), got {cfg.seed}")
    if not 0.0 <= cfg.eta <= 1.0:
        raise UserError(f"--corruption {cfg.eta} is outside [0, 1]")
    for name, flag in (("lr", "--lr"), ("epochs", "--epochs"), ("train_batch", "--train-batch")):
        if not 0 < getattr(cfg, name) < math.inf:
            raise UserError(f"{flag} must be positive and finite, got {getattr(cfg, name)}")
    if not 0 <= cfg.wd < math.inf:  # also catches NaN, which would surface as a NaN loss
        raise UserError(f"--wd must be >= 0 and finite, got {cfg.wd}")
    if not 0.0 <= cfg.momentum < 1.0:
        raise UserError(f"--momentum must lie in [0, 1), got {cfg.momentum}")
    if not 0.0 < cfg.gamma <= 1.0:
        raise UserError(f"--gamma must lie in (0, 1], got {cfg.gamma}")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise UserError(f"--label-smoothing must lie in [0, 1), got {cfg.label_smoothing}")
    if not 0 < cfg.temperature < math.inf:
        raise UserError(f"--temperature must be > 0 and finite, got {cfg.temperature}")
    if cfg.val_split != 0 and not 0.0 < cfg.val_split <= 0.5:
        raise UserError(f"--val-split must lie in (0, 0.5] (or 0 for none), got {cfg.val_split}")
    if cfg.selection not in SELECTIONS:
        raise UserError(f"unknown selection {cfg.selection!r}; choose from {', '.join(SELECTIONS)}")
    if cfg.selection == "val" and cfg.val_split == 0:
        raise UserError("--selection val needs a validation split: add --val-split 0.1 (for example)")
    if cfg.val_clean and cfg.val_split == 0:
        raise UserError("--val-clean needs a validation split: add --val-split 0.1 (for example)")


def source_from_args(args) -> FeatureSource:
    if args.features:
        from pathlib import Path
        # the name becomes a path component (checkpoints, records): -d must be a plain name, the
        # file's stem is mapped to one
        if args.dataset is not None:
            name = check_plain_name(args.dataset, "-d")
        else:
            name = safe_name(Path(args.features).stem, "features")
        return FeatureSource(name, features_path=args.features)
    if args.dataset is None:
        raise UserError("choose a dataset with -d (one of: " + ", ".join(DATASETS) + ") or pass --features PATH")
    if args.dataset not in DATASETS:
        raise UserError(f"unknown dataset {args.dataset!r}; choose from {', '.join(DATASETS)} or pass --features PATH")
    arch = args.arch
    if arch is None:
        if args.depth not in DEPTHS:
            raise UserError(f"--depth {args.depth} is not available; choose 18, 34 or 50 (or --arch vit_b_16)")
        arch = DEPTHS[args.depth]
    return FeatureSource(args.dataset, check_arch(arch), args.pretrained)


def selection_from_args(args) -> str:
    if args.last == 1 and args.selection not in (None, "last"):
        raise UserError(f"--last 1 means --selection last, but --selection {args.selection} was given; drop one")
    return args.selection or ("last" if args.last == 1 else "test")


def config_from_args(args) -> RunConfig:
    cfg = RunConfig(dataset=args.dataset or "", backbone="", ctype=args.ctype, eta=args.corruption,
                    seed=args.manualSeed, lr=args.lr, wd=args.wd, momentum=args.momentum, gamma=args.gamma,
                    epochs=args.epochs, train_batch=args.train_batch, label_smoothing=args.label_smoothing,
                    temperature=args.temperature, selection=selection_from_args(args), val_split=args.val_split,
                    val_clean=args.val_clean, feature_norm=args.feature_norm)
    check_settings(cfg)
    return cfg


def steps_from_args(args) -> list:
    if args.rounds is not None:
        if args.rounds < 0:
            raise UserError(f"--rounds must be >= 0, got {args.rounds}")
        return [str(t) for t in range(args.rounds + 1)] + ["p"]
    if args.partial:
        return ["p"]
    if args.dist < 0:
        raise UserError(f"--dist must be >= 0, got {args.dist}")
    return [str(args.dist)]


def argv_without_step_flags(argv) -> list:
    """The command line minus the flags that choose which steps run (--dist, --rounds, --partial)."""
    kept, i = [], 0
    while i < len(argv):
        word = str(argv[i])
        name = word.split("=", 1)[0]
        if name in ("--dist", "--rounds", "--partial") and "=" not in word:
            takes_value = name != "--partial" or (i + 1 < len(argv) and _is_bool_word(argv[i + 1]))
            i += 2 if takes_value else 1
            continue
        if name not in ("--dist", "--rounds", "--partial"):
            kept.append(word)
        i += 1
    return kept


def _is_bool_word(word) -> bool:
    try:
        str2bool(word)
        return True
    except argparse.ArgumentTypeError:
        return False


def engine_options(args, argv) -> EngineOptions:
    if args.test_batch <= 0:
        raise UserError(f"--test-batch must be positive, got {args.test_batch}")
    if args.max_batch_runs <= 0:
        raise UserError(f"--max-batch-runs must be positive, got {args.max_batch_runs}")
    if not 0 < args.lease_timeout < math.inf:
        raise UserError(f"--lease-timeout must be a positive number of seconds, got {args.lease_timeout}")

    def hint(step: str) -> str:
        return "python train_linear.py " + " ".join(argv_without_step_flags(argv) + ["--dist", step])

    return EngineOptions(checkpoint_root=args.checkpoint, results_root=args.results, data_root=args.data_root,
                         cache_root=args.cache_dir, device=resolve_device(args.gpu_id), workers=args.workers,
                         test_batch=args.test_batch, max_batch_runs=args.max_batch_runs,
                         save_every=max(args.save_every, 0), overwrite=args.overwrite, command_hint=hint,
                         lease_timeout=args.lease_timeout, poll_seconds=min(5.0, args.lease_timeout / 20),
                         fuse_shared_seeds=args.fuse_shared_seeds, progress="none" if args.quiet else "auto")


def summary_table(records) -> str:
    """Step x test accuracy under each selection rule, as the demo prints it."""
    has_val = any(r.get("test_acc_byval") is not None for r in records)
    head = f"{'step':<12} {'best-by-test':>12} {'last epoch':>11}" + (f" {'best-by-val':>12}" if has_val else "")
    lines = [head, "-" * len(head)]
    for r in records:
        line = f"{step_label(r['step']):<12} {r['test_acc_bytest']:>12.2f} {r['test_acc_last']:>11.2f}"
        if has_val:
            line += f" {r['test_acc_byval']:>12.2f}"
        lines.append(line)
    cover = [r for r in records if r["step"] == "p"]
    if cover:
        lines.append(f"PLL candidate sets (teacher top-2) contain the true class for "
                     f"{cover[0]['teacher_top2_coverage']:.1f}% of training samples")
    return "\n".join(lines)


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


def extract_only(source: FeatureSource, opts) -> int:
    """`--extract-only`: the features file of a dataset through a backbone, extracted once."""
    if source.features_path or source.dataset == "digits":
        raise UserError("--extract-only extracts image features through --arch: give an image dataset with -d "
                        "(digits and --features files are features already)")
    features = load_source(source, opts, print)
    path = features_cache_path(source.dataset, source.arch, source.pretrained, opts.data_root, opts.cache_root)
    print(f"features of {source.dataset} through {features.backbone}: {features.train_x.shape[0]} train and "
          f"{features.test_x.shape[0]} test rows of dimension {features.dim}, {features.num_classes} classes, in "
          f"{path}; probe them with --features {path} -d {source.dataset}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.config and args.extract_only:
        raise UserError("--extract-only extracts the features of one -d/--arch; drop --config")
    if args.config:
        from utils.grid import run_grid_command
        return run_grid_command(args, engine_options(args, argv))
    if args.shard is not None or args.report_only or args.allow_large_grid:
        raise UserError("--shard, --report-only and --allow-large-grid work with a recipe: add --config YAML")
    source = source_from_args(args)
    if args.extract_only:
        return extract_only(source, engine_options(args, argv))
    cfg = config_from_args(args)
    steps = steps_from_args(args)
    opts = engine_options(args, argv)
    runner = ChainRunner(opts)
    records = runner.run([(source, cfg)], steps)
    by_step = {r["step"]: r for r in records}
    ordered = [by_step[s] for s in steps]
    note = finished_note(runner.counts, opts.results_root)
    if note:
        print(note)
    print(f"{ordered[0]['dataset']} / {ordered[0]['backbone']}: ctype={cfg.ctype} eta={cfg.eta:g} seed={cfg.seed} "
          f"lr={cfg.lr:g} wd={cfg.wd:g} on {opts.device}; realised corruption "
          f"{ordered[0]['realised_corruption']:.2f}%")
    print(summary_table(ordered))
    print(f"records: {opts.results_root}/records/   checkpoints: {opts.checkpoint_root}/")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
