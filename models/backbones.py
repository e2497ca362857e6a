"""Frozen feature extractors by name: constructor, ImageNet weights, feature dimension, transform."""
import torch
from torch import nn

from models.timm_backbones import build_timm_backbone, timm_preprocessing, timm_tag
from utils.names import BACKBONES, is_timm_arch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_BACKBONE_SEED = 0   # initialisation of `--pretrained False` backbones


def backbone_tag(arch: str, pretrained: bool) -> str:
    """Name under which features are cached and reported ('-random' marks untrained weights)."""
    if is_timm_arch(arch):
        return timm_tag(arch, pretrained)
    return arch if pretrained else f"{arch}-random"


def backbone_preprocessing(arch: str):
    """(transform of one PIL image, its description): the model's own for timm, else the
    original's 224x224 resize with ImageNet normalisation."""
    if is_timm_arch(arch):
        transform, description = timm_preprocessing(arch)
        from torchvision import transforms as T

        return T.Compose([T.Lambda(to_rgb), transform]), description
    return image_transform(), {"input_size": [3, 224, 224], "resize": "224x224 (no crop)",
                               "interpolation": "bilinear", "mean": list(IMAGENET_MEAN),
                               "std": list(IMAGENET_STD)}


def load_backbone(arch: str, pretrained: bool = True) -> nn.Module:
    """The frozen feature extractor of `arch` in eval mode (its output: one feature row per image)."""
    if is_timm_arch(arch):
        return build_timm_backbone(arch, pretrained, RANDOM_BACKBONE_SEED)[0]
    return build_backbone(arch, pretrained)


def weights_file(arch: str):
    """(file name, URL) of the ImageNet weights torchvision loads for `arch` (into
    torch.hub.get_dir()/checkpoints/), or None for an unknown architecture."""
    import torchvision.models as tvm

    spec = BACKBONES.get(arch)
    if spec is None:
        return None
    url = getattr(tvm, spec.weights_enum).DEFAULT.url
    return url.rsplit("/", 1)[-1], url


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
        raise UserError(f"could not get ImageNet weights for {arch} ({type(exc).__name__}); with no "
                        f"internet, copy {name} into {torch.hub.get_dir()}/checkpoints/ (replacing any "
                        "partial file of that name) and rerun") from None
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
