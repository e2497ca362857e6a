"""Feature extraction through a frozen backbone, and the cache that makes it happen once."""
from pathlib import Path

import torch
from tqdm import tqdm

from data.datasets import digits_features, image_splits
from data.features import FeatureSet, cache_path, load_cached_features, save_features
from models.backbones import backbone_tag, build_backbone, image_transform


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


def load_or_extract_features(dataset: str, arch: str, pretrained: bool, data_root, cache_root,
                             device, batch_size: int, workers: int, log=print) -> FeatureSet:
    """Features of `dataset` through `arch`: from the cache if present, else extracted and cached."""
    if dataset == "digits":
        return digits_features()
    tag = backbone_tag(arch, pretrained)
    path = cache_path(cache_root, dataset, tag)
    if path.is_file():
        return load_cached_features(path, dataset, tag)
    train_set, test_set, num_classes = image_splits(dataset, Path(data_root), image_transform())
    model = build_backbone(arch, pretrained)
    log(f"extracting {tag} features of {dataset} ({len(train_set)} train, {len(test_set)} test) "
        f"on {device}; cached at {path}")
    train_x, train_y = extract_features(model, train_set, device, batch_size, workers, f"{dataset} train")
    test_x, test_y = extract_features(model, test_set, device, batch_size, workers, f"{dataset} test")
    features = FeatureSet(dataset, tag, train_x, train_y, test_x, test_y, num_classes)
    save_features(path, features)
    return features
