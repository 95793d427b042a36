"""Model adapters (one file per family) and the built-in small models."""

from .builtin import BUILTIN_MODELS, PixelClassifier, build_float_model, builtin_arch, hnq_swin_fmnist, hnq_vit_fmnist
from .swin import UNSUPPORTED_SWIN_OPTIONS, QuantSwin, WindowSizeError
from .vit import UNSUPPORTED_VIT_OPTIONS, QuantConfig, QuantViT, disable_fused_attention

__all__ = [
    "BUILTIN_MODELS", "PixelClassifier", "QuantConfig", "QuantSwin", "QuantViT", "SUPPORTED_CLASSES", "UNSUPPORTED_SWIN_OPTIONS",
    "UNSUPPORTED_VIT_OPTIONS", "WindowSizeError", "build_float_model", "builtin_arch", "disable_fused_attention",
    "hnq_swin_fmnist", "hnq_vit_fmnist", "quantize_model",
]

# timm classes with an integer adapter, matched exactly (a subclass may change the forward).
SUPPORTED_CLASSES = ("VisionTransformer", "VisionTransformerDistilled", "SwinTransformer")


def quantize_model(float_model: PixelClassifier, cfg: QuantConfig) -> QuantViT | QuantSwin:
    """Wrap a float model in its integer-only counterpart (shares the parameters)."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    model = float_model.model
    mean = float_model.mean.flatten().tolist()
    std = float_model.std.flatten().tolist()
    if type(model) in (VisionTransformer, VisionTransformerDistilled):
        return QuantViT(model, mean, std, cfg)
    if type(model) is SwinTransformer:
        return QuantSwin(model, mean, std, cfg)
    raise NotImplementedError(f"no integer adapter for the timm class {type(model).__name__}; "
                              f"supported classes: {', '.join(SUPPORTED_CLASSES)}")
