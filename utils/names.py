"""Names: what the command line chooses from (datasets, corruption types, feature norms, backbones),
and the rule for names that become parts of paths (plain names).

This module imports nothing heavy (no torch, numpy or scipy): train_linear.py parses and checks a
command line with these names before it imports torch, so `--help` and a mistyped value answer at
once. The modules that implement each name (data/datasets.py, data/corruption.py, data/features.py,
models/backbones.py) import their names from here.
"""
import re
from dataclasses import dataclass

from utils.cli import UserError

IMAGE_DATASETS = ("cifar10", "cifar100", "food101", "stanfordcars", "flowers102", "caltech101",
                  "caltech256", "imagefolder")
FEATURE_DATASETS = ("digits",)
DATASETS = FEATURE_DATASETS + IMAGE_DATASETS

CORRUPTION_TYPES = ("sym", "asym", "cc")

FEATURE_NORMS = ("none", "l2", "standardize")

# Names that become parts of paths (under -c/--checkpoint, --results, --cache-dir): a plain file
# name, never '..', '/x' or 'a/b'.
NAME_CHARS = "letters, digits, '_', '-', '.', '+'"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]*")
_NAME_BAD_CHAR = re.compile(r"[^A-Za-z0-9_.+-]")
MAX_NAME_LENGTH = 100


@dataclass(frozen=True)
class BackboneSpec:
    builder: str        # torchvision.models function name
    weights_enum: str   # torchvision.models weights class name
    feature_dim: int


BACKBONES = {
    "resnet18": BackboneSpec("resnet18", "ResNet18_Weights", 512),
    "resnet34": BackboneSpec("resnet34", "ResNet34_Weights", 512),
    "resnet50": BackboneSpec("resnet50", "ResNet50_Weights", 2048),
    "vit_b_16": BackboneSpec("vit_b_16", "ViT_B_16_Weights", 768),
}
TIMM_PREFIX = "timm:"   # --arch timm:<model name>: any timm model


def is_timm_arch(arch: str) -> bool:
    return str(arch).startswith(TIMM_PREFIX)


def timm_model_name(arch: str) -> str:
    """'timm:vit_small_patch14_dinov2.lvd142m' -> the timm name, checked against timm's registry."""
    import timm

    name = arch[len(TIMM_PREFIX):]
    if not name or not timm.is_model(name):
        raise UserError(f"--arch {arch}: timm has no model {name!r}; list candidates with "
                        f"python -c \"import timm; print(timm.list_models('*dinov2*', pretrained=True))\"")
    return name


def check_arch(arch: str) -> str:
    """`arch` if it names a backbone (torchvision's, or any timm model as 'timm:<name>'), else a
    one-line error. Only a timm name imports timm (to look the model up in its registry)."""
    if is_timm_arch(arch):
        timm_model_name(arch)
    elif arch not in BACKBONES:
        raise UserError(f"unknown --arch {arch!r}; choose from {', '.join(BACKBONES)}, or timm:<model name> "
                        "for any timm model (e.g. timm:vit_base_patch14_dinov2.lvd142m)")
    return arch


def is_plain_name(name) -> bool:
    """True for a name that is safe as one path component (see NAME_PATTERN)."""
    return isinstance(name, str) and len(name) <= MAX_NAME_LENGTH and bool(NAME_PATTERN.fullmatch(name))


def safe_name(text, default: str = "custom") -> str:
    """`text` as one safe path component: every character other than letters, digits, '_', '-',
    '.', '+' becomes '_', leading dots are dropped, at most MAX_NAME_LENGTH characters (`default`
    if nothing is left). Plain names come back unchanged: 'ViT-B/16' -> 'ViT-B_16',
    '../../evil' -> '_.._evil'."""
    name = _NAME_BAD_CHAR.sub("_", str(text)).lstrip(".")[:MAX_NAME_LENGTH]
    return name or default


def check_plain_name(name: str, what: str) -> str:
    """`name` if it is a plain name, else a one-line UserError naming `what` (e.g. '-d')."""
    if not is_plain_name(name):
        suggestion = safe_name(name, "")
        hint = f" (e.g. {suggestion!r})" if suggestion else ""
        raise UserError(f"{what} {name!r} is not a plain name: it names files under the checkpoint, results "
                        f"and cache directories, so use only {NAME_CHARS}, not starting with '.', at most "
                        f"{MAX_NAME_LENGTH} characters{hint}")
    return name
