"""Datasets by name: torchvision image datasets with the original's splits, the built-in digits
features, and a user's image folder.

Split conventions of the original code, kept on purpose:
- flowers102 trains on the official *test* split (6,149 images) and tests on *train* (1,020);
- caltech101 / caltech256 have no official split: 80/20 with seed 42 after dropping the
  `BACKGROUND_Google` folder (torchvision already does) / the `257.clutter` class.
"""
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

import numpy as np
import torch

from data.features import FeatureSet
from data.splits import fixed_train_test_split
from utils.cli import UserError, one_line, plural
from utils.names import DATASETS


IMAGEFOLDER_LAYOUTS = ("-d imagefolder reads the images in --data-root DIR, laid out as DIR/<class>/<images> "
                       "(split 80/20 with seed 42) or as DIR/train/<class>/<images> and "
                       "DIR/test/<class>/<images>")


@dataclass(frozen=True)
class TorchvisionFiles:
    """What torchvision's class for a dataset reads under the data root (names from its source)."""
    folder: str                   # the extracted dataset, relative to the data root
    folder_holds: tuple           # paths (relative to the root) that must exist for the folder to count
    archive: Optional[str]        # the downloaded archive, relative to the root (torchvision extracts it)
    archive_holds: tuple          # paths that must exist for the archive route (archive included)
    url: Optional[str]            # official download URL, as torchvision has it (None: not downloadable)
    holds: str = ""               # what the folder holds, when more than torchvision's archive gives
    also: str = ""                # what else is needed


TORCHVISION_FILES = {
    "cifar10": TorchvisionFiles("cifar-10-batches-py", ("cifar-10-batches-py",), "cifar-10-python.tar.gz",
                                ("cifar-10-python.tar.gz",),
                                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": TorchvisionFiles("cifar-100-python", ("cifar-100-python",), "cifar-100-python.tar.gz",
                                 ("cifar-100-python.tar.gz",),
                                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
    "food101": TorchvisionFiles("food-101", ("food-101/meta", "food-101/images"), "food-101.tar.gz",
                                ("food-101.tar.gz",), "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",
                                holds="meta/ and images/"),
    "stanfordcars": TorchvisionFiles(
        "stanford_cars", ("stanford_cars/devkit", "stanford_cars/cars_train", "stanford_cars/cars_test",
                          "stanford_cars/cars_test_annos_withlabels.mat"), None, (), None,
        holds="devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/, cars_test/ and "
              "cars_test_annos_withlabels.mat",
        also="torchvision cannot download it (its original URL is gone)"),
    "flowers102": TorchvisionFiles(
        "flowers-102", ("flowers-102/jpg", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"),
        "flowers-102/102flowers.tgz", ("flowers-102/102flowers.tgz", "flowers-102/imagelabels.mat",
                                       "flowers-102/setid.mat"),
        "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz", holds="jpg/",
        also="flowers-102/ also needs imagelabels.mat and setid.mat from "
             "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"),
    "caltech101": TorchvisionFiles(
        "caltech101/101_ObjectCategories", ("caltech101/101_ObjectCategories",),
        "caltech101/caltech-101.zip", ("caltech101/caltech-101.zip",),
        "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip"),
    "caltech256": TorchvisionFiles(
        "caltech256/256_ObjectCategories", ("caltech256/256_ObjectCategories",),
        "caltech256/256_ObjectCategories.tar", ("caltech256/256_ObjectCategories.tar",),
        "https://data.caltech.edu/records/nyy15-4j048/files/256_ObjectCategories.tar"),
}
# Seconds a missing dataset's download host may take to accept a connection before we call the
# machine offline (instead of waiting for the system's network timeouts, a minute or more).
REACHABLE_WITHIN_S = 2.0


def digits_features() -> FeatureSet:
    """scikit-learn's handwritten digits (1,797 real 8x8 images, shipped inside the package):
    the 64 pixel intensities scaled to [0, 1] are the features; 80/20 split with seed 42."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.data / 16.0).float()
    y = torch.from_numpy(digits.target).long()
    train, test = fixed_train_test_split(len(y))
    return FeatureSet("digits", "pixels", x[train], y[train], x[test], y[test], 10,
                      class_names=[str(d) for d in range(10)])


def class_names_of(split, num_classes: int):
    """The class names of a split made by `image_splits` (torchvision's `classes`, or Caltech's
    `categories` without the dropped clutter class), or None when the dataset does not name them."""
    full = getattr(split, "dataset", split)  # a Subset's underlying dataset
    names = getattr(full, "classes", None) or getattr(full, "categories", None)
    if names is None or len(names) < num_classes:
        return None
    return [str(name) for name in names[:num_classes]]


def _subset(dataset, indices):
    from torch.utils.data import Subset
    return Subset(dataset, [int(i) for i in indices])


def _image_folder_splits(root: Path, transform):
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise UserError(f"image folder {root} not found: {IMAGEFOLDER_LAYOUTS}")

    def folder(path):
        try:
            found = ImageFolder(path, transform)
        except (FileNotFoundError, OSError) as exc:  # no class folders, or a class folder without images
            raise UserError(f"image folder {path}: {one_line(exc, 120)}; put each class's images "
                            f"(.png, .jpg, ...) in its own sub-folder ({IMAGEFOLDER_LAYOUTS})") from None
        if len(found.classes) < 2:
            raise UserError(f"image folder {path} has {plural(len(found.classes), 'class folder')}; a "
                            "classifier needs at least 2, one sub-folder of images per class "
                            f"({IMAGEFOLDER_LAYOUTS})")
        return found

    split_dirs = [name for name in ("train", "test") if (root / name).is_dir()]
    if len(split_dirs) == 1:
        other = "test" if split_dirs == ["train"] else "train"
        raise UserError(f"image folder {root} has {split_dirs[0]}/ but no {other}/: give both {root}/train "
                        f"and {root}/test (each with class folders), or put the class folders directly in "
                        f"{root}")
    if split_dirs:
        train, test = folder(root / "train"), folder(root / "test")
        if train.classes != test.classes:
            raise UserError(f"{root}/train and {root}/test have different class folders; make them match")
        return train, test, len(train.classes)
    full = folder(root)
    if len(full) < 5:
        raise UserError(f"image folder {root} has {len(full)} images, too few for its 80/20 train/test "
                        "split; add images, or give DIR/train and DIR/test")
    tr, te = fixed_train_test_split(len(full))
    return _subset(full, tr), _subset(full, te), len(full.classes)


def dataset_files(name: str, root) -> str:
    """What torchvision reads for dataset `name` under `root`, and its official download URL."""
    spec, root = TORCHVISION_FILES[name], Path(root)
    text = f"it needs the folder {root / spec.folder}/" + (f" (holding {spec.holds})" if spec.holds else "")
    if spec.archive:
        text += f" or the archive {root / spec.archive} (extracted on first use) from {spec.url}"
    return text + (f"; {spec.also}" if spec.also else "")


def local_copy(name: str, root) -> Optional[str]:
    """'folder' (extracted), 'archive' (to extract, no download needed) or None (nothing there)."""
    spec, root = TORCHVISION_FILES[name], Path(root)
    if all((root / path).exists() for path in spec.folder_holds):
        return "folder"
    if spec.archive_holds and all((root / path).exists() for path in spec.archive_holds):
        return "archive"
    return None


def host_unreachable(url: str, within: float = REACHABLE_WITHIN_S) -> Optional[str]:
    """None when the host serving `url` (or the proxy for it) accepts a TCP connection within
    `within` seconds, else the reason. Name lookup and connection run in a thread that is left
    behind on a timeout, so this never takes much longer than `within`, whatever the system's own
    network timeouts (a minute or more on a machine without network)."""
    import urllib.request

    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_parts.hostname, proxy_parts.port or 80
    outcome = {}

    def connect():
        try:
            socket.create_connection((host, port), timeout=within).close()
            outcome["ok"] = True
        except Exception as exc:  # no route, name unknown, refused, a host name socket cannot take...
            outcome["error"] = one_line(exc, 80)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(within)
    if outcome.get("ok"):
        return None
    return outcome.get("error") or f"no answer within {within:g} s"


def _new_folders(root: Path, name: str) -> list:
    """The folders a failed load may leave behind (the data root, the dataset's top folder) that do
    not exist yet: they are removed again, if empty, when the load fails."""
    spec = TORCHVISION_FILES[name]
    tops = {root / Path(path).parts[0] for path in (spec.folder, spec.archive) if path}
    return [path for path in sorted(tops) + [root] if not path.exists()]


def _remove_empty_folders(folders) -> None:
    for top in folders:
        if not top.is_dir():
            continue
        for here, _, _ in sorted(os.walk(top), key=lambda entry: -len(Path(entry[0]).parts)):
            try:
                os.rmdir(here)  # only empty folders: a partial download is kept
            except OSError:
                pass


def image_splits(name: str, root, transform, download: bool = True):
    """(train dataset, test dataset, number of classes) with the original's split conventions.

    A torchvision dataset is read from its files under `root` when they are there (the extracted
    folder, or the archive, which torchvision extracts); only when neither is there is it
    downloaded, after a quick check that the download host answers at all."""
    import torchvision.datasets as tvd

    root = Path(root)
    if name == "imagefolder":
        return _image_folder_splits(root, transform)
    if name not in TORCHVISION_FILES:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    spec = TORCHVISION_FILES[name]
    have = local_copy(name, root)
    elsewhere = "download it on another machine and copy it there (or pass --data-root DIR), then rerun"
    if have is None and download:
        if spec.url is None:
            raise UserError(f"{name} is not under {root}; {dataset_files(name, root)}: copy it there "
                            "(or pass --data-root DIR), then rerun")
        reason = host_unreachable(spec.url)
        if reason is not None:
            raise UserError(f"{name} is not under {root} and its download host {urlsplit(spec.url).hostname} "
                            f"cannot be reached ({reason}); {dataset_files(name, root)}: {elsewhere}")
    download = download and have != "folder"
    new_folders = _new_folders(root, name)
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
        else:  # caltech256
            full = tvd.Caltech256(root, transform=transform, download=download)
            clutter = full.categories.index("257.clutter")
            keep = np.flatnonzero(np.asarray(full.y) != clutter)
            num_classes = len(full.categories) - 1
    except Exception as exc:  # no network, corrupt archive, moved URL...
        _remove_empty_folders(new_folders)
        raise UserError(f"could not load {name} under {root} ({type(exc).__name__}: {one_line(exc, 120)}); "
                        f"{dataset_files(name, root)}: without internet, {elsewhere}") from None
    tr, te = fixed_train_test_split(len(keep))
    return _subset(full, keep[tr]), _subset(full, keep[te]), num_classes
