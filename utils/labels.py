"""What the configurations of one group train on: their corrupted labels, validation rows and
features, as the tensors of one batched computation.

A configuration's labels depend only on (ctype, eta, seed, val split, val clean); configurations
that share features, epochs, batch size, validation fraction and feature normalisation are a
group and train together (utils/engine.py).
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from data.corruption import (corrupt_labels, corruption_matrix_for, superclass_groups,
                             superclasses_from_features)
from data.features import FeatureSet, normalize_features
from data.splits import stratified_val_split
from utils.chain import chain_data
from utils.cli import UserError
from utils.runs import RunConfig
from utils.train import TrainData


@dataclass
class LabelSetup:
    """A configuration's labels: every training sample's corrupted label, the rows held out for
    validation (and their labels), the realised corruption of the trained rows."""
    noisy: torch.Tensor                 # (N,) corrupted labels of all training samples
    val_rows: Optional[torch.Tensor]    # (N_val,) sorted held-out rows, or None
    val_labels: Optional[torch.Tensor]  # their labels (corrupted, or clean with --val-clean)
    realised: float                     # % of the trained rows whose label was changed
    superclasses: Optional[list] = None  # cc corruption: the superclasses (lists of class indices)


def make_label_setup(features: FeatureSet, transition, cfg: RunConfig, superclasses=None) -> LabelSetup:
    noisy = corrupt_labels(features.train_y, transition, cfg.seed)
    trained = np.arange(len(features.train_y))
    val_rows = val_labels = None
    if cfg.val_split > 0:
        trained, val = stratified_val_split(features.train_y.numpy(), cfg.val_split, cfg.seed)
        val_rows = torch.from_numpy(val)
        val_labels = (features.train_y if cfg.val_clean else noisy)[val_rows]
    trained = torch.from_numpy(trained)
    realised = float((noisy[trained] != features.train_y[trained]).double().mean()) * 100
    return LabelSetup(noisy, val_rows, val_labels, realised, superclasses if cfg.ctype == "cc" else None)


def label_key(cfg: RunConfig) -> tuple:
    return (cfg.ctype, cfg.eta, cfg.seed, cfg.val_split, cfg.val_clean)


@dataclass
class Group:
    """Features, as stored and as the probe sees them (on the training device), and the labels of
    the configurations trained together."""
    features: FeatureSet
    fid: str              # the stored features' fingerprint (run keys)
    probed: FeatureSet    # after --feature-norm, on the device
    setups: dict          # label_key(cfg) -> LabelSetup

    def setup(self, cfg: RunConfig) -> LabelSetup:
        return self.setups[label_key(cfg)]

    def train_data(self, cfgs) -> TrainData:
        """The tensors the runs of `cfgs` (one each) train on, as one batch."""
        setups = [self.setup(c) for c in cfgs]
        has_val = setups[0].val_rows is not None
        stack = lambda name: (torch.stack([getattr(s, name) for s in setups])  # noqa: E731
                              if has_val else None)
        return chain_data(self.probed, torch.stack([s.noisy for s in setups]), stack("val_rows"),
                          stack("val_labels"), self.probed.train_x.device)


def prepare_group(features: FeatureSet, fid: str, configs, device, superclass_of=None) -> Group:
    """Every configuration's labels, and the features on the device. `fid`: the features'
    fingerprint; `superclass_of`: the superclass of every class (cc corruption; from
    `superclasses_of`)."""
    for cfg in configs:
        if cfg.val_split > 0 and round(cfg.val_split * len(features.train_y)) < features.num_classes:
            raise UserError(f"--val-split {cfg.val_split} leaves fewer validation samples than the "
                            f"{features.num_classes} classes of {features.name}; use a larger fraction")
    # the probe sees the --feature-norm transform; run keys (fid) and the corruption (cc
    # superclasses) depend on the stored features only
    probed = normalize_features(features, configs[0].feature_norm)
    probed = FeatureSet(probed.name, probed.backbone, probed.train_x.to(device), probed.train_y,
                        probed.test_x.to(device), probed.test_y.to(device), probed.num_classes)
    group = Group(features, fid, probed, {})
    superclasses = superclass_groups(superclass_of) if superclass_of is not None else None
    transitions = {}
    for cfg in configs:
        if (cfg.ctype, cfg.eta) not in transitions:
            transitions[cfg.ctype, cfg.eta] = corruption_matrix_for(cfg.ctype, cfg.eta, features.train_x,
                                                                   features.train_y, features.num_classes,
                                                                   superclass_of)
        if label_key(cfg) not in group.setups:
            group.setups[label_key(cfg)] = make_label_setup(features, transitions[cfg.ctype, cfg.eta], cfg,
                                                            superclasses)
    return group


def superclasses_of(features: FeatureSet, configs):
    """The superclass of every class (what cc corruption moves labels within), or None without cc
    configurations."""
    if not any(cfg.ctype == "cc" for cfg in configs):
        return None
    return superclasses_from_features(features.train_x, features.train_y, features.num_classes)
