"""Export a quantized model to an integer-only ONNX file, or a float model to a float one.

The integer graph is built directly from the module tree (no tracing), with the `hnq`
functions attached as model-local functions, default opset 18 and IR version 10. The input
is the uint8 pixel tensor `pixels` [N, C, H, W]; the output `logits_codes` is int32, and
`logits_code * hnq.logits_scale` gives the logits. Metadata (all values are strings,
JSON where structured) records what a consumer needs to feed the model and to check it.

The float graph comes from torch.onnx.export of the float model (PixelClassifier) on the
same uint8 input, with the same metadata and `hnq.kind` = "float", so `hnq-eval` measures
float and integer models with the same code.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from .io import CheckpointError, atomic_output, check_output_path, sha256_file
from .onnx_builder import GraphBuilder
from .plan import Plan
from .schemes.registry import onnx_functions

_logger = logging.getLogger(__name__)

METADATA_FORMAT = "hnq-onnx/1"
FLOAT_OPSET = 18


@dataclass
class ExportResult:
    path: Path
    nodes: int
    initializers: int
    bytes: int
    logits_scale: float


def build_onnx_model(qmodel, plan: Plan, metadata: dict[str, Any]) -> tuple[onnx.ModelProto, float]:
    """Build and check the ONNX model; `metadata` values are JSON-encoded unless strings."""
    if qmodel.training:
        raise RuntimeError("export the model in eval mode: call qmodel.eval() first")
    builder = GraphBuilder()
    _, logits_scale = qmodel.to_onnx(builder)
    props = {
        "hnq.format": METADATA_FORMAT,
        "hnq.kind": "integer",
        "hnq.plan": plan.to_dict(),
        "hnq.logits_scale": repr(float(logits_scale)),
        "hnq.input": input_metadata(qmodel.image_shape),
        "hnq.sites": {name: site.scheme_name for name, site in qmodel.sites().items()},
        "hnq.site_tensors": builder.site_tensors,
        **metadata,
    }
    encoded = {k: v if isinstance(v, str) else json.dumps(v) for k, v in props.items()}
    model = builder.make_model(onnx_functions(), graph_name="hnq_integer_model", metadata=encoded)
    onnx.checker.check_model(model, full_check=True)
    return model, logits_scale


def export_onnx(qmodel, plan: Plan, path: str | Path, metadata: dict[str, Any]) -> ExportResult:
    """Write the integer-only ONNX model to `path` atomically."""
    path = check_output_path(path)
    model, logits_scale = build_onnx_model(qmodel, plan, metadata)
    with atomic_output(path, suffix=".onnx") as tmp:
        onnx.save(model, str(tmp))
    size = os.path.getsize(path)
    _logger.debug("wrote %s (%d nodes, %.1f KiB)", path, len(model.graph.node), size / 1024)
    return ExportResult(path, len(model.graph.node), len(model.graph.initializer), size, logits_scale)


def checkpoint_reference(checkpoint: str | Path, onnx_path: str | Path) -> dict[str, str]:
    """Metadata that lets `hnq-eval` find and verify the checkpoint behind an export."""
    checkpoint = Path(checkpoint).resolve()
    onnx_dir = Path(onnx_path).resolve().parent
    try:
        stored = os.path.relpath(checkpoint, onnx_dir)
    except ValueError:  # another drive on Windows
        stored = str(checkpoint)
    return {"hnq.checkpoint": stored, "hnq.checkpoint_sha256": sha256_file(checkpoint)}


def input_metadata(image_shape) -> dict[str, Any]:
    """Return the `hnq.input` entry: uint8 pixels [N, C, H, W] named `pixels`."""
    c, h, w = image_shape
    return {"name": "pixels", "dtype": "uint8", "layout": "NCHW", "shape": [c, h, w], "range": [0, 255]}


def model_metadata(payload: dict[str, Any], image_shape, num_classes: int, checkpoint: str | Path,
                   output: str | Path) -> dict[str, Any]:
    """Return the model, class-name, preprocessing and checkpoint metadata of an export.

    Resize, crop and interpolation come from the checkpoint's arch, as
    hnq.imagenet.preprocessing_from_arch computes them. A checkpoint without `crop_pct` in
    its arch falls back to its top-level `resize`, `crop` and `interpolation` entries.
    Without those, images are not resized.
    """
    from .imagenet import preprocessing_from_arch

    arch = payload["arch"]
    resizing = preprocessing_from_arch(arch, image_shape)
    if resizing["resize"] is None and payload.get("resize") is not None:
        resizing = {"resize": payload["resize"], "crop": payload.get("crop"),
                    "interpolation": payload.get("interpolation", resizing["interpolation"])}
    return {
        "hnq.model": arch.get("timm_name", "unknown"),
        "hnq.class_names": list(payload.get("class_names", [str(i) for i in range(num_classes)])),
        "hnq.preprocessing": {
            **resizing,
            # Mean and std are folded into the model: it takes raw pixels.
            "mean": arch["mean"],
            "std": arch["std"],
            "normalization_in_model": True,
            "color": "L" if image_shape[0] == 1 else "RGB",
        },
        **checkpoint_reference(checkpoint, output),
    }


def float_input_shape(float_model, arch: dict[str, Any]) -> tuple[int, int, int]:
    """Return the (channels, height, width) input of a float model (PixelClassifier).

    Read from the timm model's patch embedding (img_size and the projection's input
    channels), else from `arch["input_size"]`.
    """
    patch_embed = getattr(float_model.model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    proj = getattr(patch_embed, "proj", None)
    if img_size is not None and hasattr(proj, "in_channels"):
        return (int(proj.in_channels), int(img_size[0]), int(img_size[1]))
    if arch.get("input_size") is not None:
        c, h, w = arch["input_size"]
        return (int(c), int(h), int(w))
    raise CheckpointError(f"cannot tell the input size of {type(float_model.model).__name__}: it has no "
                          "patch_embed.img_size and the checkpoint's arch has no input_size; add "
                          "input_size [C, H, W] to the arch")


def export_float_onnx(float_model, path: str | Path, metadata: dict[str, Any]) -> ExportResult:
    """Write the float model as ONNX to `path` atomically, with `hnq.kind` = "float".

    The graph takes uint8 `pixels` [N, C, H, W] (N dynamic) and returns float32 `logits`
    [N, classes]. It is exported with torch.onnx.export (the torch.export-based exporter,
    opset 18). `metadata` contains the `hnq.*` entries. This function sets `hnq.format`,
    `hnq.kind` and `hnq.input`, replacing entries of the same name.
    """
    import torch

    path = check_output_path(path)
    if float_model.training:
        raise RuntimeError("export the model in eval mode: call float_model.eval() first")
    image_shape = float_input_shape(float_model, {})
    example = torch.zeros((2, *image_shape), dtype=torch.uint8)
    batch = torch.export.Dim("N", min=1)
    program = torch.onnx.export(float_model, (example,), input_names=["pixels"], output_names=["logits"],
                                opset_version=FLOAT_OPSET, dynamo=True, dynamic_shapes=({0: batch},),
                                verbose=False)
    # NOTE: onnx.save writes one protobuf, which cannot exceed 2 GiB, so models with more
    # than about 500M float32 parameters fail here.
    model = program.model_proto
    props = {
        "hnq.format": METADATA_FORMAT,
        "hnq.kind": "float",
        "hnq.input": input_metadata(image_shape),
        **{key: value for key, value in metadata.items() if key not in ("hnq.format", "hnq.kind", "hnq.input")},
    }
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(model, full_check=True)
    with atomic_output(path, suffix=".onnx") as tmp:
        onnx.save(model, str(tmp))
    size = os.path.getsize(path)
    _logger.debug("wrote %s (float, %d nodes, %.1f KiB)", path, len(model.graph.node), size / 1024)
    return ExportResult(path, len(model.graph.node), len(model.graph.initializer), size, 1.0)


def export_float_from_checkpoint(checkpoint: str | Path, output: str | Path) -> ExportResult:
    """Export the float model of a float checkpoint, or the float parent saved in a quantized
    one, as float ONNX (what `hnq-export --float` does)."""
    from .api import load_float_parent, load_float_model
    from .io import load_checkpoint

    payload = load_checkpoint(checkpoint)
    if payload["kind"] == "float":
        float_model, payload = load_float_model(checkpoint)
    else:
        float_model = load_float_parent(payload, str(checkpoint))
        if float_model is None:
            raise CheckpointError(f"quantized checkpoint {checkpoint} has no float parent (it was saved "
                                  "without float_model); export the float checkpoint it came from instead")
    image_shape = float_input_shape(float_model, payload["arch"])
    num_classes = int(getattr(float_model.model, "num_classes", 0))
    metadata = model_metadata(payload, image_shape, num_classes, checkpoint, output)
    return export_float_onnx(float_model, output, metadata)
