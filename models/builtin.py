"""Built-in small models and the float wrapper shared by every model family.

`hnq_vit_fmnist` is a timm VisionTransformer sized for 28x28 grey-scale images: patch 4
(49 patches plus the class token), width 64, depth 4, 4 heads. It is registered in timm's
model registry beside the real ones, so `timm.create_model("hnq_vit_fmnist")` builds it.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn as nn
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

# Fashion-MNIST training-set pixel statistics on the [0, 1] scale.
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

BUILTIN_VIT_KWARGS: dict[str, Any] = {
    "img_size": 28,
    "patch_size": 4,
    "in_chans": 1,
    "num_classes": 10,
    "embed_dim": 64,
    "depth": 4,
    "num_heads": 4,
    "mlp_ratio": 2.0,
}


_TIMM_FACTORY_KEYS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only")


@register_model
def hnq_vit_fmnist(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Small ViT for 28x28 single-channel images (Fashion-MNIST)."""
    if pretrained:
        raise ValueError("hnq_vit_fmnist has no pretrained weights: train it with `hnq demo` or `hnq train`")
    for key in _TIMM_FACTORY_KEYS:  # create_model passes these to every entry point
        kwargs.pop(key, None)
    model = VisionTransformer(**{**BUILTIN_VIT_KWARGS, **kwargs})
    # What timm's builder would attach; create_float_model reads mean, std and the head name.
    model.pretrained_cfg = {
        "architecture": "hnq_vit_fmnist",
        "input_size": (model.patch_embed.proj.in_channels, *model.patch_embed.img_size),
        "mean": FASHION_MNIST_MEAN,
        "std": FASHION_MNIST_STD,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "num_classes": model.num_classes,
        "classifier": "head",
        "first_conv": "patch_embed.proj",
    }
    return model


class PixelClassifier(nn.Module):
    """A timm classifier that takes pixel values 0..255 and normalizes them itself.

    HNQ models consume raw pixels, so the float model does too; this keeps the float and
    the integer model on exactly the same input.
    """

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model((pixels.float() / 255.0 - self.mean) / self.std)


def build_float_model(arch: dict[str, Any]) -> PixelClassifier:
    """Build the float model described by a checkpoint's `arch` entry."""
    model = timm.create_model(arch["timm_name"], pretrained=False, **arch.get("timm_kwargs", {}))
    return PixelClassifier(model, arch["mean"], arch["std"])


def builtin_arch() -> dict[str, Any]:
    return {
        "family": "vit",
        "timm_name": "hnq_vit_fmnist",
        "timm_kwargs": {},
        "mean": list(FASHION_MNIST_MEAN),
        "std": list(FASHION_MNIST_STD),
    }
