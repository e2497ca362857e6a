"""What a run is, where its files live, and the results store.

One place names files: a run (one step of one configuration) is identified by a key hashed from
exactly the settings that change its numbers, so seeds, corruption types and every other setting
get their own checkpoints and records, and a finished run is recognised by its record.
"""
import hashlib
import json
import math
import os
import re
import subprocess
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path

from utils.cli import UserError, one_line
from utils.io import atomic_write_json
from utils.names import CORRUPTION_TYPES, DATASETS, FEATURE_NORMS
from utils.options import Interval, check_option_values, option, options_of
from utils.selection import DEFAULT, RULE, RULES
from utils.steps import step_of

# Record fields that say how and when a run was computed (which process, how batched, how long),
# not what it computed: the only fields in which two records of one run may differ.
VOLATILE_FIELDS = ("wall_time_s", "batch_runs", "created", "trained_by", "resumed_from_epoch",
                   "completed_from_checkpoints")


STUDENTS = frozenset({"student", "pll"})    # the steps that learn from a teacher's checkpoint
ALL_STEPS = frozenset({"teacher", "student", "pll"})
MAX_SEED = 2**32 - 1  # numpy's RandomState (the validation split) takes seeds in [0, 2**32 - 1]; torch too
# Most epochs per step and most distillation rounds a command accepts: far beyond any study (the paper:
# 200 epochs, 4 rounds), close enough that a typo (--epochs 1000000000000) is refused at once
# instead of training silently for days.
MAX_EPOCHS = 100_000
MAX_ROUNDS = 1_000


@dataclass(frozen=True)
class RunConfig:
    """The settings of one configuration (a teacher -> students -> PLL chain), each declared once:
    its flag, default, constraint and help, whether a recipe may sweep it, which steps' run keys it
    enters (`steps`: every setting that changes a step's numbers), and its place among the leading
    columns of records.csv. The field order is the order of a checkpoint's settings: keep it."""
    dataset: str = option(MISSING, "-d", "--dataset", cli_default=None, sweep=True, steps=ALL_STEPS, column=1,
                          help=f"dataset: {', '.join(DATASETS)} "
                               "(with --features: any plain name for the results)")
    backbone: str = option(MISSING, steps=ALL_STEPS, column=2,
                           help="tag of what produced the features (resnet34, pixels, file, ...): "
                                "from --arch, --depth, --pretrained or --features")
    ctype: str = option("cc", "--ctype", choices=CORRUPTION_TYPES, sweep=True, steps=ALL_STEPS, column=3,
                        help="corruption type: sym (symmetric), asym (asymmetric), cc (within superclasses)")
    eta: float = option(0.5, "--corruption", type=float, valid=Interval(float, 0, 1), sweep=True,
                        steps=ALL_STEPS, column=4, help="label corruption ratio eta in [0, 1]")
    seed: int = option(0, "--manualSeed", type=int,
                       valid=Interval(int, 0, MAX_SEED, note="0 <= seed < 2**32"), sweep=True,
                       steps=ALL_STEPS, column=5, help="seed of corruption, initialisation and shuffling")
    lr: float = option(5e-4, "--lr", "--learning-rate", type=float,
                       valid=Interval(float, 0, closed="neither"), sweep=True, steps=ALL_STEPS, column=7,
                       help="initial learning rate")
    wd: float = option(1e-4, "--weight-decay", "--wd", type=float, valid=Interval(float, 0), sweep=True,
                       steps=ALL_STEPS, column=8, help="weight decay")
    momentum: float = option(0.9, "--momentum", type=float, valid=Interval(float, 0, 1, closed="left"),
                             sweep=True, steps=ALL_STEPS, help="SGD momentum")
    gamma: float = option(0.98, "--gamma", type=float, valid=Interval(float, 0, 1, closed="right"),
                          sweep=True, steps=ALL_STEPS, help="lr is multiplied by gamma after every epoch")
    epochs: int = option(200, "--epochs", type=int, valid=Interval(int, 1, MAX_EPOCHS), sweep=True,
                         steps=ALL_STEPS,
                         column=9, help="epochs per step")
    train_batch: int = option(128, "--train-batch", type=int, valid=Interval(int, 1), sweep=True,
                              steps=ALL_STEPS, help="training batch size")
    label_smoothing: float = option(0.0, "--label-smoothing", type=float,
                                    valid=Interval(float, 0, 1, closed="left"), new=True, sweep=True,
                                    steps=ALL_STEPS, column=10, metavar="A",
                                    help="teacher label smoothing alpha in [0, 1)")
    val_split: float = option(0.0, "--val-split", type=float,
                              valid=Interval(float, 0, 0.5, closed="right", also=(0,)), new=True, sweep=True,
                              steps=ALL_STEPS, column=13, metavar="F",
                              help="fraction of train held out for validation, in (0, 0.5]; 0: none")
    val_clean: bool = option(False, "--val-clean", type=bool, new=True, sweep=True, steps=ALL_STEPS,
                             help="oracle study: validation labels are NOT corrupted")
    # added after stores existed: at "none" it stays out of run keys, so those stores keep their keys
    feature_norm: str = option("none", "--feature-norm", choices=FEATURE_NORMS, new=True, sweep=True,
                               steps=ALL_STEPS, neutral="none",
                               help="transform of the features before the probe: none (paper), "
                                    "l2 (unit rows), "
                                    "standardize (train mean/std per dimension)")
    # the PLL student's top-2 candidate sets do not depend on the temperature
    temperature: float = option(1.0, "--temperature", type=float, valid=Interval(float, 0, closed="neither"),
                                new=True, sweep=True, steps=frozenset({"student"}), column=11, metavar="T",
                                help="distillation temperature T > 0 (students)")
    selection: str = option(DEFAULT.name, "--selection", cli_default=None, choices=tuple(RULE), new=True,
                            sweep=True, steps=STUDENTS, column=12,
                            help="checkpoint that is the result and the next teacher: test (paper), "
                                 "val, last (default: test; last with --last 1)")


SETTINGS = options_of(RunConfig)
_DEFAULT = {f.name: f.default for f in fields(RunConfig)}


@dataclass(frozen=True)
class Hyper:
    """One run's hyper-parameters: named, and by default valued, as the settings that declare them
    (RunConfig), so they travel by name from the command line to the SGD step."""
    lr: float = _DEFAULT["lr"]
    wd: float = _DEFAULT["wd"]
    momentum: float = _DEFAULT["momentum"]
    gamma: float = _DEFAULT["gamma"]
    epochs: int = _DEFAULT["epochs"]
    train_batch: int = _DEFAULT["train_batch"]
    label_smoothing: float = _DEFAULT["label_smoothing"]
    temperature: float = _DEFAULT["temperature"]

    @classmethod
    def of(cls, cfg) -> "Hyper":
        """The hyper-parameters of a configuration (a RunConfig, or anything with those attributes)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})
# records.csv's leading columns: the key, then the settings in their declared column order, the step
# sixth (after the chain's identity: dataset, backbone, ctype, eta, seed)
_STEP_COLUMN = 6
SETTING_COLUMNS = tuple(name for _, name in sorted(
    [(opt.column, name) for name, opt in SETTINGS.items() if opt.column] + [(_STEP_COLUMN, "step")]))


def step_fields(step) -> tuple:
    """The settings that enter a step's run key: those that change its numbers (its own training
    and, for students, its teacher chain's)."""
    kind = step_of(step).kind
    return tuple(name for name, opt in SETTINGS.items() if kind in opt.steps)


def with_key_neutral_settings(record: dict) -> dict:
    """A record with the settings that runs at their key-neutral value do not store, filled in."""
    return {**{name: opt.neutral for name, opt in SETTINGS.items() if opt.is_neutral(opt.neutral)}, **record}


def step_settings(cfg: RunConfig, step, features_id: str) -> dict:
    settings = {name: getattr(cfg, name) for name in step_fields(step)
                if not SETTINGS[name].is_neutral(getattr(cfg, name))}
    settings.update(step=str(step), features_id=features_id)
    return settings


def check_settings(cfg: RunConfig) -> None:
    """One-line errors for values the maths cannot take: each setting's own constraint, then the
    rules that tie two settings together."""
    check_option_values(SETTINGS.values(), cfg)
    if cfg.selection == "val" and cfg.val_split == 0:
        raise UserError("--selection val needs a validation split: add --val-split 0.1 (for example)")
    if cfg.val_clean and cfg.val_split == 0:
        raise UserError("--val-clean needs a validation split: add --val-split 0.1 (for example)")


# <dataset>-<step code>-<hash>: what `run_key` makes (dataset names are plain names, data/features.py)
RUN_KEY_PATTERN = re.compile(r"[A-Za-z0-9_+.-]+-(0|[1-9][0-9]*|p)-[0-9a-f]{12}")


def run_key(cfg: RunConfig, step, features_id: str) -> str:
    blob = json.dumps(step_settings(cfg, step, features_id), sort_keys=True).encode()
    return f"{cfg.dataset}-{step}-{hashlib.blake2b(blob, digest_size=6).hexdigest()}"


def run_dir(checkpoint_root, cfg: RunConfig, step: str, features_id: str) -> Path:
    """The original's checkpoint/dataset/lr/wd/ctype/int(100*eta)/step, plus backbone, seed and the
    key's hash (so no two settings share a directory)."""
    key = run_key(cfg, step, features_id)
    return (Path(checkpoint_root) / cfg.dataset / cfg.backbone / f"{cfg.lr:g}" / f"{cfg.wd:g}" / cfg.ctype /
            str(int(round(100 * cfg.eta))) / f"seed{cfg.seed}" / f"{step}-{key.rsplit('-', 1)[1]}")


def config_from_settings(settings: dict) -> RunConfig:
    names = {f.name for f in fields(RunConfig)}
    return replace(RunConfig(settings["dataset"], settings["backbone"]),
                   **{k: v for k, v in settings.items() if k in names})


def record_payload(cfg: RunConfig, step, features_id: str, history: list, chosen: dict, facts: dict,
                   superclasses=None) -> dict:
    """A finished run's numbers and provenance: everything in its record that does not depend on
    which process trained it, or when. `history`: one row per epoch; `chosen`: the epoch each
    selection rule chose ({rule name: epoch, or None where the rule has no epoch}); `facts`: the
    run's teacher key, realised corruption, teacher top-2 coverage, device, threads and package
    versions; `superclasses`: those labels moved within (cc corruption)."""
    record = {"key": run_key(cfg, step, features_id), **step_settings(cfg, step, features_id),
              **{name: facts[name]
                 for name in ("teacher_key", "realised_corruption", "teacher_top2_coverage")},
              "best_train_acc": max(h["train_acc"] for h in history),
              "best_train_acc_true": max(h["train_acc_true"] for h in history),
              **{name: facts[name]
                 for name in ("device", "threads", "fused_batches", "torch_version", "python")},
              "code_version": code_version()}
    for rule in RULES:
        epoch = chosen[rule.name]
        row = history[epoch - 1] if epoch else {}
        record[rule.field("epoch")] = epoch
        for name in ("test_acc", "test_top2", "test_confidence", "test_entropy"):
            record[rule.field(name)] = row.get(name)
    by_val, epoch = RULE["val"], chosen["val"]
    record[by_val.field("val_acc")] = history[epoch - 1]["val_acc"] if epoch else None
    if superclasses is not None:
        record["superclasses"] = superclasses
    return record


class ResultsStore:
    """A directory with one JSON record per finished run, each written atomically.

    Any number of processes can add records at once (distinct files, atomic renames); a reader
    sees only complete records; a run is finished exactly when its record exists. A record that
    cannot be read (truncated, empty, not a record) is an error naming the file, never skipped."""

    def __init__(self, root):
        self.root = Path(root)
        self.records_dir = self.root / "records"

    def path(self, key: str) -> Path:
        return self.records_dir / f"{key}.json"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str) -> dict:
        return read_record(self.path(key))

    def put(self, record: dict) -> None:
        atomic_write_json(self.path(record["key"]), record)

    def records(self) -> list:
        if not self.records_dir.is_dir():
            return []
        return [read_record(path) for path in sorted(self.records_dir.glob("*.json"))]

    def check_names(self) -> None:
        """UserError for a .json file in the store whose name is not a run key (not a record of this
        tool: it would be taken for one, or hide a mistake), naming it."""
        if not self.records_dir.is_dir():
            return
        for path in sorted(self.records_dir.glob("*.json")):
            if not RUN_KEY_PATTERN.fullmatch(path.stem):
                raise UserError(f"{path} is not a result record of this tool (a record's file name is its "
                                "run key, <dataset>-<step>-<12 hex digits>); move it out of "
                                f"{self.records_dir}")


def read_record(path: Path) -> dict:
    """A record file's content; UserError naming the file and the fix when it is damaged or does not
    follow the record schema (`record_problem`)."""
    try:
        record = json.loads(path.read_text())
        problem = record_problem(record, path.stem)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problem = one_line(exc, 80)
    if problem:
        raise UserError(f"damaged result record {path} ({problem}): delete it and run the same command again "
                        "to retrain that run")
    return record


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _kind_problem(name: str, value, kind: str, optional: bool = False):
    """None when `value` is of `kind` ('number': finite; 'int' >= 0; 'str'; 'bool'; 'dict'; 'list'),
    or None and `optional`; else what is wrong, in words."""
    if value is None and optional:
        return None
    ok = {"number": _is_finite_number(value), "int": type(value) is int and value >= 0,
          "str": isinstance(value, str), "bool": isinstance(value, bool), "dict": isinstance(value, dict),
          "list": isinstance(value, list)}[kind]
    words = {"number": "a finite number", "int": "an integer >= 0", "str": "text", "bool": "true or false",
             "dict": "a mapping", "list": "a list"}[kind]
    return None if ok else f"{name} must be {words}{' or null' if optional else ''}, got {value!r:.40}"


# The record fields other than the settings and the per-rule numbers: their kind and whether null is
# allowed. A field not listed here is not read by this tool.
_RECORD_FIELDS = {"features_id": ("str", False), "teacher_key": ("str", True),
                  "realised_corruption": ("number", False), "teacher_top2_coverage": ("number", True),
                  "best_train_acc": ("number", False), "best_train_acc_true": ("number", False),
                  "val_acc_byval": ("number", True), "checkpoints": ("dict", True),
                  "final_checkpoints": ("dict", True), "superclasses": ("list", True),
                  "device": ("str", True), "threads": ("int", True), "fused_batches": ("bool", True),
                  "wall_time_s": ("number", True), "batch_runs": ("int", True),
                  "resumed_from_epoch": ("int", True), "completed_from_checkpoints": ("bool", True),
                  "created": ("str", True), "trained_by": ("str", True), "torch_version": ("str", True),
                  "python": ("str", True), "code_version": ("str", True), "not_trained": ("str", True)}
_REQUIRED = ("features_id", "realised_corruption", "best_train_acc")


def _setting_problem(name: str, value):
    """What is wrong with a stored setting: its type, then its option's own rule."""
    opt = SETTINGS[name]
    kinds = {str: str, bool: bool, int: int, float: (int, float)}
    if isinstance(value, bool) and opt.type is not bool or not isinstance(value, kinds[opt.type]):
        return f"{name} must be a {opt.type.__name__}, got {value!r:.40}"
    return opt.problem(value)


def _numbers_problem(record: dict):
    """The numbers of each selection rule: an epoch >= 1 and finite numbers; only a rule that chose
    no epoch (best-by-validation without a validation split) may have nulls."""
    for rule in RULES:
        epoch = record.get(rule.field("epoch"))
        optional = rule.name == "val" and epoch is None
        if not optional and not (type(epoch) is int and epoch >= 1):
            return f"{rule.field('epoch')} must be an epoch >= 1, got {epoch!r:.40}"
        for quantity in ("test_acc", "test_top2", "test_confidence", "test_entropy"):
            name = rule.field(quantity)
            problem = _kind_problem(name, record.get(name), "number", optional)
            if problem:
                return problem
    return None


def record_problem(record, stem: str):
    """None for a record this tool wrote for the run named `stem`, else what is wrong with it (the
    first problem): its key, step, settings (types and rules), numbers, provenance fields, and
    whether its key is the one its settings give (a record copied under another run's name is not)."""
    if not isinstance(record, dict) or record.get("key") != stem:
        return "not a run record" if not isinstance(record, dict) else f"its key is not {stem!r}"
    try:
        step = step_of(record.get("step"))
    except (ValueError, TypeError):
        return f"step must be a round number or 'p', got {record.get('step')!r:.40}"
    for name in step_fields(step):
        if name not in record and not SETTINGS[name].is_neutral(SETTINGS[name].neutral):
            return f"it lacks the setting {name}"
        problem = _setting_problem(name, record[name]) if name in record else None
        if problem:
            return problem
    for name, (kind, optional) in _RECORD_FIELDS.items():
        if name in record or name in _REQUIRED:
            problem = _kind_problem(name, record.get(name), kind, optional)
            if problem:
                return problem
    problem = _numbers_problem(record)
    if problem:
        return problem
    if run_key(config_from_settings(record), step, record["features_id"]) != stem:
        return "its settings give another run key (a record copied or edited under another run's name)"
    return None


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_CODE_VERSION = None


def code_version() -> str:
    """git commit of this checkout (with '+dirty' for local changes), for provenance."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        here = os.path.dirname(os.path.abspath(__file__))
        try:
            sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                 text=True, timeout=5).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            _CODE_VERSION = (sha + ("+dirty" if dirty else "")) if sha else "unknown"
        except (OSError, subprocess.SubprocessError):
            _CODE_VERSION = "unknown"
    return _CODE_VERSION
