"""What a run is, where its files live, and the results store.

One place names files: a run (one step of one configuration) is identified by a key hashed from
exactly the settings that change its numbers, so seeds, corruption types and every other setting
get their own checkpoints and records, and a finished run is recognised by its record.
"""
import hashlib
import json
import os
import subprocess
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from utils.cli import UserError, one_line
from utils.io import atomic_write_json

SCHEMA = 1
SELECTIONS = ("test", "val", "last")
CHECKPOINT_OF_SELECTION = {"test": "best", "val": "best_val", "last": "last"}
# Record fields hold every number under each selection rule: test_acc_bytest, test_acc_last, ...
SUFFIX_OF_SELECTION = {"test": "bytest", "val": "byval", "last": "last"}
# Record fields that say how and when a run was computed (which process, how batched, how long),
# not what it computed: the only fields in which two records of one run may differ.
VOLATILE_FIELDS = ("wall_time_s", "batch_runs", "created", "trained_by", "resumed_from_epoch",
                   "completed_from_checkpoints")


@dataclass(frozen=True)
class RunConfig:
    """The settings of one configuration (a teacher -> students -> PLL chain)."""
    dataset: str
    backbone: str           # tag of what produced the features (resnet34, pixels, custom, ...)
    ctype: str = "cc"
    eta: float = 0.5
    seed: int = 0
    lr: float = 5e-4
    wd: float = 1e-4
    momentum: float = 0.9
    gamma: float = 0.98
    epochs: int = 200
    train_batch: int = 128
    label_smoothing: float = 0.0
    temperature: float = 1.0
    selection: str = "test"
    val_split: float = 0.0
    val_clean: bool = False
    feature_norm: str = "none"


# Settings each kind of step depends on (its own training plus, for students, its teacher chain).
_TEACHER_FIELDS = ("dataset", "backbone", "ctype", "eta", "seed", "lr", "wd", "momentum", "gamma", "epochs",
                   "train_batch", "label_smoothing", "val_split", "val_clean", "feature_norm")
# Settings added after stores existed: at this value they stay out of run keys and records, so the
# runs of those stores keep their keys (a record without the field has this value).
_KEY_NEUTRAL = {"feature_norm": "none"}
_STUDENT_FIELDS = _TEACHER_FIELDS + ("temperature", "selection")
_PLL_FIELDS = _TEACHER_FIELDS + ("selection",)  # top-2 indices do not depend on the temperature


def step_fields(step: str):
    return _TEACHER_FIELDS if step == "0" else _PLL_FIELDS if step == "p" else _STUDENT_FIELDS


def with_key_neutral_settings(record: dict) -> dict:
    """A record with the settings that runs at their key-neutral value do not store, filled in."""
    return {**_KEY_NEUTRAL, **record}


def step_settings(cfg: RunConfig, step: str, features_id: str) -> dict:
    settings = {name: getattr(cfg, name) for name in step_fields(step)
                if _KEY_NEUTRAL.get(name, object()) != getattr(cfg, name)}
    settings.update(step=step, features_id=features_id)
    return settings


def run_key(cfg: RunConfig, step: str, features_id: str) -> str:
    blob = json.dumps(step_settings(cfg, step, features_id), sort_keys=True).encode()
    return f"{cfg.dataset}-{step}-{hashlib.blake2b(blob, digest_size=6).hexdigest()}"


def teacher_step(step: str) -> str:
    """The step whose selected checkpoint teaches `step` ('p' learns from the round-0 teacher)."""
    return "0" if step == "p" else str(int(step) - 1)


def step_label(step: str) -> str:
    """Paper's naming: round 0 is '1 (Teacher)', round t is t+1, 'p' is PLL."""
    return "1 (Teacher)" if step == "0" else "PLL" if step == "p" else str(int(step) + 1)


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


def config_as_dict(cfg: RunConfig) -> dict:
    return asdict(cfg)


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


def read_record(path: Path) -> dict:
    """A record file's content; UserError naming the file and the fix when it is damaged."""
    try:
        record = json.loads(path.read_text())
        problem = None if isinstance(record, dict) and record.get("key") == path.stem else "not a run record"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problem = one_line(exc, 80)
    if problem:
        raise UserError(f"damaged result record {path} ({problem}): delete it and run the same command again "
                        "to retrain that run")
    return record


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
