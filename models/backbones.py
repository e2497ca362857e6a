"""Frozen feature extractors by name: constructor, ImageNet weights, feature dimension, transform."""
from dataclasses import dataclass

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_BACKBONE_SEED = 0   # initialisation of `--pretrained False` backbones


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


def backbone_tag(arch: str, pretrained: bool) -> str:
    """Name under which features are cached and reported ('-random' marks untrained weights)."""
    return arch if pretrained else f"{arch}-random"


def build_backbone(arch: str, pretrained: bool = True) -> nn.Module:
    """The torchvision model with its classifier replaced by identity, in eval mode.

    ResNets then output the pooled 512/2048-d feature, ViT-B/16 its 768-d class token."""
    import torchvision.models as tvm

    from utils.cli import UserError

    spec = BACKBONES[arch]
    weights = getattr(tvm, spec.weights_enum).DEFAULT if pretrained else None
    try:
        # A random backbone is drawn from a fixed seed, without touching the global RNG: the same
        # command gives the same features (and records) on every run, as a pretrained one does.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_BACKBONE_SEED)
            model = getattr(tvm, spec.builder)(weights=weights)
    except Exception as exc:  # offline: urllib error while fetching the weights; or a partial file
        if weights is None:
            raise
        name = weights.url.rsplit("/", 1)[-1]
        raise UserError(f"could not get ImageNet weights for {arch} ({type(exc).__name__}); with no internet, "
                        f"copy {name} into {torch.hub.get_dir()}/checkpoints/ (replacing any partial file of "
                        "that name) and rerun") from None
    if arch.startswith("resnet"):
        model.fc = nn.Identity()
    else:
        model.heads = nn.Identity()
    return model.eval()


def to_rgb(image):
    """Some Caltech images are greyscale or CMYK; the backbones expect 3 channels."""
    return image.convert("RGB")


def image_transform():
    """Resize to 224x224, to tensor, ImageNet normalisation; no augmentation (as the original)."""
    from torchvision import transforms as T

    return T.Compose([T.Lambda(to_rgb), T.Resize((224, 224)), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
