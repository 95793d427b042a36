"""Model adapters (one file per family) and the built-in small models."""

from .builtin import PixelClassifier, build_float_model, builtin_arch, hnq_vit_fmnist
from .vit import QuantConfig, QuantViT, disable_fused_attention

__all__ = [
    "PixelClassifier", "QuantConfig", "QuantViT", "build_float_model", "builtin_arch",
    "disable_fused_attention", "hnq_vit_fmnist", "quantize_model",
]


def quantize_model(float_model: PixelClassifier, cfg: QuantConfig) -> QuantViT:
    """Wrap a float model in its integer-only counterpart (shares the parameters)."""
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(float_model.model, VisionTransformer):
        return QuantViT(float_model.model, float_model.mean.flatten().tolist(),
                        float_model.std.flatten().tolist(), cfg)
    raise NotImplementedError(f"no integer adapter for {type(float_model.model).__name__}; supported: VisionTransformer")
