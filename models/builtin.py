"""Built-in small models and the float wrapper shared by every model family.

Both are sized for 28x28 grey-scale images (Fashion-MNIST) and registered in timm's model
registry beside the real ones, so `timm.create_model("hnq_vit_fmnist")` builds one:
- `hnq_vit_fmnist`, a VisionTransformer: patch 4 (49 patches plus the class token),
  width 64, depth 4, 4 heads;
- `hnq_swin_fmnist`, a SwinTransformer: patch 2 (a 14x14 grid), 7x7 windows, two stages
  of two blocks (width 32 then 64, 2 then 4 heads). The first stage's second block
  shifts its windows, so the attention mask is exercised; patch merging brings the second
  stage to one 7x7 window.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn as nn
from timm.models import register_model
from timm.models.swin_transformer import SwinTransformer
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


BUILTIN_SWIN_KWARGS: dict[str, Any] = {
    "img_size": 28,
    "patch_size": 2,
    "in_chans": 1,
    "num_classes": 10,
    "embed_dim": 32,
    "depths": (2, 2),
    "num_heads": (2, 4),
    "window_size": 7,
    "mlp_ratio": 2.0,
}

_TIMM_FACTORY_KEYS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only")


def _fashion_mnist_cfg(model: nn.Module, name: str, classifier: str, first_conv: str) -> dict[str, Any]:
    """Build the pretrained_cfg that timm's builder would attach (create_float_model reads mean, std and the head name)."""
    return {
        "architecture": name,
        "input_size": (1, 28, 28),
        "mean": FASHION_MNIST_MEAN,
        "std": FASHION_MNIST_STD,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "num_classes": model.num_classes,
        "classifier": classifier,
        "first_conv": first_conv,
    }


def _factory_kwargs(name: str, pretrained: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights: train it with `hnq demo` or `hnq train`")
    return {key: value for key, value in kwargs.items() if key not in _TIMM_FACTORY_KEYS}


@register_model
def hnq_vit_fmnist(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Small ViT for 28x28 single-channel images (Fashion-MNIST)."""
    model = VisionTransformer(**{**BUILTIN_VIT_KWARGS, **_factory_kwargs("hnq_vit_fmnist", pretrained, kwargs)})
    model.pretrained_cfg = _fashion_mnist_cfg(model, "hnq_vit_fmnist", "head", "patch_embed.proj")
    return model


@register_model
def hnq_swin_fmnist(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """Small Swin for 28x28 single-channel images (Fashion-MNIST)."""
    model = SwinTransformer(**{**BUILTIN_SWIN_KWARGS, **_factory_kwargs("hnq_swin_fmnist", pretrained, kwargs)})
    model.pretrained_cfg = _fashion_mnist_cfg(model, "hnq_swin_fmnist", "head.fc", "patch_embed.proj")
    return model


BUILTIN_MODELS = ("hnq_vit_fmnist", "hnq_swin_fmnist")


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


def builtin_arch(name: str = "hnq_vit_fmnist") -> dict[str, Any]:
    """Return the checkpoint `arch` entry of a built-in model (see BUILTIN_MODELS)."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"{name!r} is not a built-in model; choose one of {', '.join(BUILTIN_MODELS)}")
    return {
        "family": "vit" if name == "hnq_vit_fmnist" else "swin",
        "timm_name": name,
        "timm_kwargs": {},
        "mean": list(FASHION_MNIST_MEAN),
        "std": list(FASHION_MNIST_STD),
    }
