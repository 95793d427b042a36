"""Build a timm float model and load its pretrained weights from a local file, never the network.

Supported files: `.pth`, `.pt` and `.bin` (read with `torch.load(weights_only=True)`, which
rejects pickles that would run code) and `.safetensors`. A checkpoint may be the state
dict itself or wrap it under `state_dict`, `model` or `model_ema` (tried in that order),
and keys may carry the `module.` prefix of DataParallel. The returned `arch` dict rebuilds
the same float model through `models.builtin.build_float_model`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn

from .builtin import PixelClassifier

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)
# Keys under which training scripts (timm's train.py, DeiT, Swin) store the weights.
WRAPPER_KEYS = ("state_dict", "model", "model_ema")
# How many keys of each kind a mismatch message lists.
SHOWN_KEYS = 5


class UnknownModelError(ValueError):
    """A model name that timm does not know."""


class PretrainedWeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model built for it."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the tensors of a local checkpoint file, unwrapping the common wrapper keys."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"pretrained weights file not found: {path}; pass the path of a local timm "
                                     "checkpoint (.pth, .pt, .bin or .safetensors)")
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        # torch.load fails on a file that is not a checkpoint with many exception types
        # (UnpicklingError, IndexError, RuntimeError, EOFError, ... in torch 2.x).
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001
            raise PretrainedWeightsError(f"cannot read {path} as a PyTorch checkpoint: {error}") from None
    elif suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            payload = load_file(str(path), device="cpu")
        except SafetensorError as error:
            raise PretrainedWeightsError(f"cannot read {path} as a safetensors file: {error}") from None
    else:
        known = ", ".join(TORCH_SUFFIXES + SAFETENSORS_SUFFIXES)
        raise PretrainedWeightsError(f"unsupported weights file suffix {path.suffix!r} ({path}); use one of {known}")
    return unwrap_state_dict(payload, str(path))


def unwrap_state_dict(payload: Any, source: str) -> dict[str, torch.Tensor]:
    """Extract the state dict from a loaded checkpoint: the payload itself or one of WRAPPER_KEYS."""
    if not isinstance(payload, Mapping):
        raise PretrainedWeightsError(f"{source} contains a {type(payload).__name__}, not a state dict of tensors")
    for key in WRAPPER_KEYS:
        inner = payload.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            payload = inner
            break
    tensors = {k: v for k, v in payload.items() if isinstance(v, torch.Tensor)}
    if not tensors or not all(isinstance(k, str) for k in tensors):
        found = ", ".join(map(repr, list(payload)[:SHOWN_KEYS]))
        raise PretrainedWeightsError(f"{source} is not a model checkpoint: no tensors under string keys at the top "
                                     f"level or under {', '.join(WRAPPER_KEYS)} (top-level keys: {found})")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def classifier_keys(model: nn.Module) -> list[str]:
    """Return the state-dict keys of the classifier head(s), from timm's pretrained_cfg `classifier` entry."""
    names = model.pretrained_cfg.get("classifier") or ()
    if isinstance(names, str):
        names = (names,)
    own = model.state_dict()
    return [key for name in names for key in (f"{name}.weight", f"{name}.bias") if key in own]


def load_pretrained(model: nn.Module, path: str | Path, reset_head: bool = False) -> None:
    """Load a local checkpoint into a timm model, strictly.

    With `reset_head`, the checkpoint's classifier weights are dropped and the model keeps
    its freshly initialized head (for a different class count). Keys of buffers that the
    model does not save (Swin's relative_position_index and attn_mask) are ignored.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    non_persistent = {name for name, _ in model.named_buffers()} - set(own)
    state = {k: v for k, v in state.items() if k not in non_persistent}
    head_keys = classifier_keys(model)
    if reset_head:
        state = {k: v for k, v in state.items() if k not in head_keys}
    else:
        for key in head_keys:
            if key in state and state[key].shape[0] != own[key].shape[0]:
                raise PretrainedWeightsError(
                    f"{path} has a {state[key].shape[0]}-class head ({key} {tuple(state[key].shape)}) but the model "
                    f"was built with {own[key].shape[0]} classes; pass reset_head=True to drop the checkpoint's head "
                    f"and keep a freshly initialized one, or num_classes={state[key].shape[0]} to keep it")
    expected = set(own) - (set(head_keys) if reset_head else set())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mis_shaped:
        raise PretrainedWeightsError(mismatch_message(path, missing, unexpected, mis_shaped, state, own))
    model.load_state_dict(state, strict=not reset_head)


def mismatch_message(path, missing: list[str], unexpected: list[str], mis_shaped: list[str],
                     state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> str:
    def listing(keys: list[str]) -> str:
        more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
        return ", ".join(keys[:SHOWN_KEYS]) + more

    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {listing(unexpected)}")
    if mis_shaped:
        shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})" for k in mis_shaped]
        parts.append(f"mis-shaped keys ({len(mis_shaped)}): {listing(shapes)}")
    return (f"weights in {path} do not match the model: " + "; ".join(parts)
            + "; check that the file was saved from the same timm model name and options")


def create_float_model(name: str, pretrained: str | Path | None = None, num_classes: int | None = None,
                       reset_head: bool = False, img_size: int | tuple[int, int] | None = None,
                       mean=None, std=None) -> tuple[PixelClassifier, dict[str, Any]]:
    """Build timm model `name` (never downloading), load local weights, wrap it for uint8 pixels.

    `mean` and `std` default to the model's timm pretrained_cfg. Returns the float model in
    eval mode and the `arch` dict that `build_float_model` rebuilds it from.
    """
    if not timm.is_model(name):
        raise UnknownModelError(f"unknown timm model {name!r}; list the names with "
                                "python -c 'import timm; print(timm.list_models())'")
    if reset_head and pretrained is None:
        raise ValueError("reset_head=True drops the head of a pretrained checkpoint; give pretrained=PATH too")
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    if img_size is not None:
        kwargs["img_size"] = img_size if isinstance(img_size, int) else list(img_size)
    model = timm.create_model(name, pretrained=False, **kwargs)
    cfg = model.pretrained_cfg
    channels = model.patch_embed.proj.in_channels if hasattr(model, "patch_embed") else cfg["input_size"][0]
    mean = [float(v) for v in (mean if mean is not None else cfg["mean"])]
    std = [float(v) for v in (std if std is not None else cfg["std"])]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need one value per input channel ({channels}), got {mean} and {std}")
    if any(v <= 0 for v in std):
        raise ValueError(f"std values must be positive, got {std}")
    if pretrained is not None:
        load_pretrained(model, pretrained, reset_head=reset_head)
    height, width = model.patch_embed.img_size if hasattr(model, "patch_embed") else cfg["input_size"][1:]
    arch = {
        "family": model_family(model),
        "timm_name": name,
        "timm_kwargs": kwargs,
        "mean": mean,
        "std": std,
        "input_size": [channels, int(height), int(width)],
    }
    # Evaluation preprocessing of the pretrained weights, recorded only where timm states it.
    for key in ("crop_pct", "interpolation"):
        if cfg.get(key) is not None:
            arch[key] = cfg[key]
    return PixelClassifier(model, mean, std).eval(), arch


def model_family(model: nn.Module) -> str:
    """Return 'vit' for VisionTransformer (distilled or not), 'swin' for SwinTransformer, else the class name."""
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, SwinTransformer):
        return "swin"
    if isinstance(model, VisionTransformer):
        return "vit"
    return type(model).__name__
