#!/usr/bin/env python
"""Linear probing with label noise: teacher, multi-round self-distillation students, PLL student.

Flags follow the option table of the paper's code (see README); new flags are marked [new].
One step:       python train_linear.py -d cifar100 --ctype cc --corruption 0.5 --dist 0
A whole chain:  python train_linear.py -d digits --rounds 4          (teacher, rounds 1..4, PLL)
A grid:         python train_linear.py --config recipes/fig2.yaml    (batched, resumable, reports)
Evidence:       python train_linear.py -d digits --evidence          (feature correlations, no training)
"""
import argparse
import sys

# Only what parsing and checking the command line needs is imported here (no torch): `--help` and a
# mistyped value answer at once. Each command imports its own machinery once its line is checked.
from utils.cli import UserError, check_recipe_file, run_main, str2bool
from utils.selection import RULES
from utils.settings import (build_parser, check_engine_options, config_from_args, engine_options,
                            finished_note, settings_text, source_from_args, steps_from_args)
from utils.steps import step_of


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


def summary_table(records) -> str:
    """Step x test accuracy under each selection rule (best-by-val only with a validation split),
    as the demo prints it."""
    rules = [rule for rule in RULES if any(r.get(rule.field()) is not None for r in records)]
    head = f"{'step':<11}" + "".join(f" {rule.column:>{len(rule.column) + 1}}" for rule in rules)
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(f"{step_of(r['step']).label:<11}"
                     + "".join(f" {r[rule.field()]:>{len(rule.column) + 1}.2f}" for rule in rules))
    cover = [r for r in records if step_of(r["step"]).is_pll]
    if cover:
        lines.append(f"PLL candidate sets (teacher top-2) contain the true class for "
                     f"{cover[0]['teacher_top2_coverage']:.1f}% of training samples")
    return "\n".join(lines)


def extract_only(source, opts) -> int:
    """`--extract-only`: the features file of a dataset through a backbone, extracted once."""
    from models.extract import features_cache_path
    from utils.engine import load_source

    features = load_source(source, opts, print)
    path = features_cache_path(source.dataset, source.arch, source.pretrained,
                               opts.data_root, opts.cache_root)
    print(f"features of {source.dataset} through {features.backbone}: {features.train_x.shape[0]} train and "
          f"{features.test_x.shape[0]} test rows of dimension {features.dim}, "
          f"{features.num_classes} classes, in "
          f"{path}; probe them with --features {path} -d {source.dataset}")
    return 0


def evidence(source, cfg, opts) -> int:
    """`--evidence`: what the features of one source say about the paper's mechanism; no training."""
    from utils.engine import load_source
    from utils.evidence import feature_evidence
    from utils.evidence_report import check_folder_free, evidence_folder, summary_lines, write_source_evidence

    features = load_source(source, opts, print)
    folder = evidence_folder(opts.results_root, features.name, features.backbone)
    check_folder_free(folder, features.fingerprint(), opts.overwrite)
    ev = feature_evidence(features, [(cfg.ctype, cfg.eta, cfg.seed)])
    written = write_source_evidence(ev, folder)
    print("\n".join(summary_lines(ev)))
    print(f"-> {folder}/: " + ", ".join(path.name for path in written))
    return 0


def run_chain(source, cfg, steps, opts) -> int:
    """One configuration's steps (--dist, --partial or --rounds): train what is missing, print the table."""
    from utils.engine import ChainRunner

    runner = ChainRunner(opts)
    records = runner.run([(source, cfg)], steps)
    by_step = {r["step"]: r for r in records}
    ordered = [by_step[str(s)] for s in steps]
    note = finished_note(runner.counts, opts.results_root)
    if note:
        print(note)
    print(f"{ordered[0]['dataset']} / {ordered[0]['backbone']}: {settings_text(cfg)} on {opts.device}; "
          f"realised corruption {ordered[0]['realised_corruption']:.2f}%")
    print(summary_table(ordered))
    print(f"records: {opts.results_root}/records/   checkpoints: {opts.checkpoint_root}/")
    return 0


def check_command_line(args) -> tuple:
    """Every check of a parsed command line that needs no file and no torch, in the order a user
    fixes them. Returns (source, run settings, steps) of a chain, extraction or evidence command
    (None where the command has none; all None for a recipe)."""
    if args.config and args.extract_only:
        raise UserError("--extract-only extracts the features of one -d/--arch; drop --config")
    if args.evidence and args.extract_only:
        raise UserError("--evidence and --extract-only are two commands; give one")
    if not args.config and (args.shard is not None or args.report_only or args.allow_large_grid):
        raise UserError("--shard, --report-only and --allow-large-grid work with a recipe: add --config YAML")
    check_engine_options(args)
    if args.config:
        check_recipe_file(args.config, "recipe file")
        return None, None, None
    if args.evidence and (args.rounds is not None or args.partial or args.dist):
        raise UserError("--evidence trains nothing: drop --dist, --partial and --rounds")
    source = source_from_args(args)
    if args.extract_only:
        if source.features_path or source.dataset == "digits":
            raise UserError("--extract-only extracts image features through --arch: give an image dataset "
                            "with -d (digits and --features files are features already)")
        return source, None, None
    return source, config_from_args(args), None if args.evidence else steps_from_args(args)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    source, cfg, steps = check_command_line(args)
    from utils.checkpoints import TeacherUnavailable  # torch from here on

    opts = engine_options(args)
    try:
        if args.config:
            from utils.grid import run_grid_command

            return run_grid_command(args, opts)
        if args.extract_only:
            return extract_only(source, opts)
        if args.evidence:
            return evidence(source, cfg, opts)
        return run_chain(source, cfg, steps, opts)
    except TeacherUnavailable as exc:  # name the exact command that trains (or retrains) the teacher
        command = "python train_linear.py " + " ".join(argv_without_step_flags(argv)
                                                       + ["--dist", str(exc.step)])
        raise UserError(exc.with_command(command)) from None


if __name__ == "__main__":
    sys.exit(run_main(main))
