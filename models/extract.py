"""Feature extraction through a frozen backbone, and the cache that makes it happen once."""
import hashlib
import re
from pathlib import Path

import torch
from tqdm import tqdm

from data.datasets import digits_features, image_splits
from data.features import FeatureSet, cache_path, load_cached_features, safe_name, save_features
from models.backbones import backbone_tag, build_backbone, image_transform
from utils.cli import UserError
from utils.io import remove_stale_temporaries


@torch.no_grad()
def extract_features(model, dataset, device, batch_size: int, workers: int, desc: str):
    """(features float32 (N, d), labels int64 (N,)) of `dataset`, in dataset order, on the CPU."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    model = model.to(device).eval()
    feats, labels = [], []
    for images, targets in tqdm(loader, desc=desc, unit="batch", leave=False):
        feats.append(model(images.to(device, non_blocking=True)).float().cpu())
        labels.append(torch.as_tensor(targets).long())
    return torch.cat(feats), torch.cat(labels)


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


def load_or_extract_features(dataset: str, arch: str, pretrained: bool, data_root, cache_root,
                             device, batch_size: int, workers: int, log=print) -> FeatureSet:
    """Features of `dataset` through `arch`: from the cache if present, else extracted and cached."""
    if dataset == "digits":
        return digits_features()
    tag = backbone_tag(arch, pretrained)
    path = cache_path(cache_root, cache_name(dataset, data_root), tag)
    if path.is_file():
        return load_cached_features(path, dataset, tag)
    remove_stale_temporaries(path.parent)  # of an extraction killed while it wrote the cache
    train_set, test_set, num_classes = image_splits(dataset, Path(data_root), image_transform())
    model = build_backbone(arch, pretrained)
    log(f"extracting {tag} features of {dataset} ({len(train_set)} train, {len(test_set)} test) "
        f"on {device}; cached at {path}")
    try:
        train_x, train_y = extract_features(model, train_set, device, batch_size, workers, f"{dataset} train")
        test_x, test_y = extract_features(model, test_set, device, batch_size, workers, f"{dataset} test")
    except OSError as exc:  # unreadable or truncated image (PIL), also when raised in a loader worker
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise UserError(f"could not read an image of {dataset} ({(lines[-1] if lines else type(exc).__name__)[:200]}); "
                        "remove or replace that file and rerun") from None
    features = FeatureSet(dataset, tag, train_x, train_y, test_x, test_y, num_classes)
    save_features(path, features)
    return features
