"""Datasets by name: torchvision image datasets with the original's splits, the built-in digits
features, and a user's image folder.

Split conventions of the original code, kept on purpose:
- flowers102 trains on the official *test* split (6,149 images) and tests on *train* (1,020);
- caltech101 / caltech256 have no official split: 80/20 with seed 42 after dropping the
  `BACKGROUND_Google` folder (torchvision already does) / the `257.clutter` class.
"""
from pathlib import Path

import numpy as np
import torch

from data.features import FeatureSet
from data.splits import fixed_train_test_split
from utils.cli import UserError, one_line

IMAGE_DATASETS = ("cifar10", "cifar100", "food101", "stanfordcars", "flowers102", "caltech101",
                  "caltech256", "imagefolder")
FEATURE_DATASETS = ("digits",)
DATASETS = FEATURE_DATASETS + IMAGE_DATASETS


def digits_features() -> FeatureSet:
    """scikit-learn's handwritten digits (1,797 real 8x8 images, shipped inside the package):
    the 64 pixel intensities scaled to [0, 1] are the features; 80/20 split with seed 42."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.data / 16.0).float()
    y = torch.from_numpy(digits.target).long()
    train, test = fixed_train_test_split(len(y))
    return FeatureSet("digits", "pixels", x[train], y[train], x[test], y[test], 10)


def _subset(dataset, indices):
    from torch.utils.data import Subset
    return Subset(dataset, [int(i) for i in indices])


def _image_folder_splits(root: Path, transform):
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise UserError(f"image folder {root} not found; pass --data-root DIR with class folders, or "
                        "DIR/train and DIR/test each with class folders")

    def folder(path):
        try:
            found = ImageFolder(path, transform)
        except (FileNotFoundError, OSError) as exc:  # no class folders, or a class folder without images
            raise UserError(f"image folder {path}: {one_line(exc, 120)}; put each class's images (.png, .jpg, ...) "
                            "in its own sub-folder") from None
        if len(found.classes) < 2:
            raise UserError(f"image folder {path} has {len(found.classes)} class folder(s); a classifier needs "
                            "at least 2 (one sub-folder of images per class)")
        return found

    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = folder(root / "train"), folder(root / "test")
        if train.classes != test.classes:
            raise UserError(f"{root}/train and {root}/test have different class folders; make them match")
        return train, test, len(train.classes)
    full = folder(root)
    if len(full) < 5:
        raise UserError(f"image folder {root} has {len(full)} images, too few for its 80/20 train/test split; "
                        "add images, or give DIR/train and DIR/test")
    tr, te = fixed_train_test_split(len(full))
    return _subset(full, tr), _subset(full, te), len(full.classes)


def image_splits(name: str, root, transform, download: bool = True):
    """(train dataset, test dataset, number of classes) with the original's split conventions."""
    import torchvision.datasets as tvd

    root = Path(root)
    if name == "imagefolder":
        return _image_folder_splits(root, transform)
    try:
        if name in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            train = cls(root, train=True, transform=transform, download=download)
            test = cls(root, train=False, transform=transform, download=download)
            return train, test, len(train.classes)
        if name in ("food101", "stanfordcars"):
            cls = tvd.Food101 if name == "food101" else tvd.StanfordCars
            train = cls(root, split="train", transform=transform, download=download)
            test = cls(root, split="test", transform=transform, download=download)
            return train, test, len(train.classes)
        if name == "flowers102":
            # Swapped on purpose, as in the original: the larger official test split trains.
            train = tvd.Flowers102(root, split="test", transform=transform, download=download)
            test = tvd.Flowers102(root, split="train", transform=transform, download=download)
            return train, test, 102
        if name == "caltech101":
            full = tvd.Caltech101(root, target_type="category", transform=transform, download=download)
            keep = np.arange(len(full))
            num_classes = len(full.categories)
        elif name == "caltech256":
            full = tvd.Caltech256(root, transform=transform, download=download)
            clutter = full.categories.index("257.clutter")
            keep = np.flatnonzero(np.asarray(full.y) != clutter)
            num_classes = len(full.categories) - 1
        else:
            raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    except UserError:
        raise
    except Exception as exc:  # no network, corrupt archive, moved URL...
        raise UserError(f"could not load {name} under {root} ({type(exc).__name__}: {one_line(exc, 120)}); with no "
                        f"internet, place the torchvision-format files of {name} under {root} (or pass "
                        "--data-root) and rerun") from None
    tr, te = fixed_train_test_split(len(keep))
    return _subset(full, keep[tr]), _subset(full, keep[te]), num_classes
