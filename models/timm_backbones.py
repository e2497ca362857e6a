"""Backbones from timm (`--arch timm:<model name>`): DINOv2, CLIP image towers, ConvNeXt, EVA, ...

Features are the pooled pre-logits output (`num_classes=0`) in eval mode, and images get the
model's own preprocessing: input size, interpolation, crop and mean/std from timm's resolved data
config, not the 224-pixel ImageNet transform of the torchvision backbones.
"""
import socket

import torch
from torch import nn

from utils.cli import UserError
from utils.names import TIMM_PREFIX, safe_name, timm_model_name

HUB_HOST = "huggingface.co"  # where timm's pretrained weights come from
WEIGHT_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin",
                "open_clip_pytorch_model.bin")


def timm_tag(arch: str, pretrained: bool) -> str:
    """Cache and record name: 'timm-<model name>' ('-random' for untrained weights)."""
    tag = safe_name("timm-" + arch[len(TIMM_PREFIX):])
    return tag if pretrained else f"{tag}-random"


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in WEIGHT_FILES)


def _hub_reachable(timeout: float = 2.0) -> bool:
    """A bounded look for the network, so an offline machine gets its answer in seconds, not after
    the hub client's minute of retries."""
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _weights_hint(name: str, repo_id: str) -> str:
    from huggingface_hub import constants

    return (f"timm model {name} needs its pretrained weights from the Hugging Face hub ({repo_id}), which "
            f"cannot be reached from here and are not in the hub cache {constants.HF_HUB_CACHE}; on a "
            "machine with internet run python -c "
            f"\"import timm; timm.create_model('{name}', pretrained=True)\" and copy that cache folder here "
            "(or set HF_HOME to a copy), or use --pretrained False")


def timm_preprocessing(arch: str):
    """(transform of one RGB PIL image, its description) from the model's pretrained data config:
    known before the model (and its weights) is built."""
    import timm
    from timm.data import create_transform, resolve_data_config

    pretrained_cfg = timm.models.get_pretrained_cfg(timm_model_name(arch)).to_dict()
    config = resolve_data_config(pretrained_cfg=pretrained_cfg)
    description = {key: (list(value) if isinstance(value, tuple) else value) for key, value in config.items()}
    return create_transform(**config, is_training=False), description


def build_timm_backbone(arch: str, pretrained: bool, random_seed: int):
    """(model in eval mode, transform of one PIL image, preprocessing dict) for a timm backbone."""
    import timm

    name = timm_model_name(arch)
    if pretrained:
        repo_id = timm.models.get_pretrained_cfg(name).hf_hub_id or name
        if not _hub_cached(repo_id) and not _hub_reachable():
            raise UserError(_weights_hint(name, repo_id))
    try:
        with torch.random.fork_rng(devices=[]):  # a random backbone is the same every time
            torch.manual_seed(random_seed)
            model = timm.create_model(name, pretrained=pretrained, num_classes=0)
    except (OSError, RuntimeError) as exc:  # hub errors are OSErrors; a partial download a RuntimeError
        if not pretrained:
            raise
        raise UserError(f"could not load the weights of timm model {name} ({type(exc).__name__}); "
                        "delete a partial download from the hub cache and rerun, or use --pretrained "
                        "False") from None
    transform, preprocessing = timm_preprocessing(arch)
    return _PooledFeatures(model).eval(), transform, preprocessing


class _PooledFeatures(nn.Module):
    """The model's pooled pre-logits output as float32 (N, d)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.feature_dim = model.num_features

    def forward(self, images):
        return self.model(images).flatten(1)
