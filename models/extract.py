"""Feature extraction through a frozen backbone, and the cache that makes it happen once."""
import hashlib
import json
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm

from data.datasets import class_names_of, digits_features, image_splits
from data.features import FeatureSet, cache_path, load_cached_features, save_features
from models.backbones import backbone_preprocessing, backbone_tag, load_backbone, weights_file
from utils.cli import UserError
from utils.io import remove_stale_temporaries
from utils.names import safe_name
from utils.threads import available_cores


_CAPPED_SAID = set()  # (asked, cores) already reported, so the notice is printed once


def worker_count(asked: int, log=print) -> int:
    """`asked` data loading workers, capped at the cores available (more only add processes that
    compete for the same cores, and make the DataLoader warn); the cap is reported once."""
    cores = available_cores()
    if asked <= cores:
        return asked
    if (asked, cores) not in _CAPPED_SAID:
        _CAPPED_SAID.add((asked, cores))
        log(f"-j {asked}: only {cores} CPU core{'s' if cores > 1 else ''} available here, "
            f"using {cores} data loading worker{'s' if cores > 1 else ''}")
    return cores


@torch.no_grad()
def extract_features(model, dataset, device, batch_size: int, workers: int, desc: str, show_bar: bool = True):
    """(features float32 (N, d), labels int64 (N,)) of `dataset`, in dataset order, on the CPU."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    model = model.to(device).eval()
    feats, labels = [], []
    for images, targets in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not show_bar):
        feats.append(model(images.to(device, non_blocking=True)).float().cpu())
        labels.append(torch.as_tensor(targets).long())
    return torch.cat(feats), torch.cat(labels)


def package_versions() -> dict:
    """Versions of the packages that made a features file (recorded inside it)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "torchvision", "timm"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def cache_name(dataset: str, data_root) -> str:
    """The dataset part of the cache file name. Every `imagefolder` is a different dataset, so its
    cache is named after the folder and a hash of its resolved path (else two folders would share
    `imagefolder_<backbone>.pt` and the second would silently get the first one's features)."""
    if dataset != "imagefolder":
        return dataset
    root = Path(data_root).resolve()
    digest = hashlib.blake2b(str(root).encode(), digest_size=4).hexdigest()
    # the folder's characters are mapped as they always were (so existing caches keep their names);
    # safe_name then guarantees a plain file name (it leaves this one unchanged)
    return safe_name(f"imagefolder-{re.sub(r'[^A-Za-z0-9_.-]', '_', root.name)[:40]}-{digest}")


def weights_note(arch: str, pretrained: bool) -> str:
    """What a user without internet must provide after the dataset: the backbone's weights file
    ('' when not needed or already in torch's cache)."""
    found = weights_file(arch) if pretrained else None
    if found is None:
        return ""
    name, url = found
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    if (folder / name).is_file():
        return ""
    return f"; next, the {arch} ImageNet weights are needed: {name} in {folder}/ (from {url})"


def features_cache_path(dataset: str, arch: str, pretrained: bool, data_root, cache_root) -> Path:
    """The cache file (a features file, README format) of `dataset` through `arch`."""
    return cache_path(cache_root, cache_name(dataset, data_root), backbone_tag(arch, pretrained))


def load_or_extract_features(dataset: str, arch: str, pretrained: bool, data_root, cache_root, device,
                             batch_size: int, workers: int, log=print, progress: str = "bars") -> FeatureSet:
    """Features of `dataset` through `arch`: from the cache if present, else extracted and cached.
    progress: 'bars' (progress bars), 'lines' (a line per split) or 'none'."""
    if dataset == "digits":
        return digits_features()
    tag = backbone_tag(arch, pretrained)
    path = features_cache_path(dataset, arch, pretrained, data_root, cache_root)
    if path.is_file():
        return load_cached_features(path, dataset, tag)
    remove_stale_temporaries(path.parent)  # of an extraction killed while it wrote the cache
    try:
        transform, preprocessing = backbone_preprocessing(arch)
        train_set, test_set, num_classes = image_splits(dataset, Path(data_root), transform)
    except UserError as exc:
        if dataset == "imagefolder":
            raise
        raise UserError(f"{exc}{weights_note(arch, pretrained)}") from None
    model = load_backbone(arch, pretrained)
    workers = worker_count(workers, log)
    if progress != "none":
        log(f"extracting {tag} features of {dataset} ({len(train_set)} train, {len(test_set)} test) "
            f"on {device}; cached at {path}")

    def extract(split, data):
        started = time.time()
        out = extract_features(model, data, device, batch_size, workers, f"{dataset} {split}",
                               show_bar=progress == "bars")
        if progress == "lines":
            log(f"extracted {tag} features of {dataset} {split} ({len(data)} images) in "
                f"{time.time() - started:.1f} s")
        return out

    try:
        train_x, train_y = extract("train", train_set)
        test_x, test_y = extract("test", test_set)
    except OSError as exc:  # unreadable or truncated image (PIL), also when raised in a loader worker
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        last = (lines[-1] if lines else type(exc).__name__)[:200]
        raise UserError(f"could not read an image of {dataset} ({last}); remove or replace that file and "
                        "rerun") from None
    features = FeatureSet(dataset, tag, train_x, train_y, test_x, test_y, num_classes,
                          provenance={"arch": arch, "pretrained": pretrained,
                                      "preprocessing": json.dumps(preprocessing),
                                      "versions": json.dumps(package_versions())},
                          class_names=class_names_of(train_set, num_classes))
    save_features(path, features)
    return features
