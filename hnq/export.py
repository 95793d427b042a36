"""Export a quantized model to an integer-only ONNX file.

The graph is built directly from the module tree (no tracing), with the `hnq` functions
attached as model-local functions, default opset 18 and IR version 10. The input is the
uint8 pixel tensor `pixels` [N, C, H, W]; the output `logits_codes` is int32, and
`logits_code * hnq.logits_scale` gives the logits. Metadata (all values are strings,
JSON where structured) records what a consumer needs to feed the model and to check it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from .io import atomic_output, check_output_path, sha256_file
from .onnx_builder import GraphBuilder
from .plan import Plan
from .schemes.registry import onnx_functions

_logger = logging.getLogger(__name__)

METADATA_FORMAT = "hnq-onnx/1"


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
    c, h, w = qmodel.image_shape
    props = {
        "hnq.format": METADATA_FORMAT,
        "hnq.plan": plan.to_dict(),
        "hnq.logits_scale": repr(float(logits_scale)),
        "hnq.input": {"name": "pixels", "dtype": "uint8", "layout": "NCHW", "shape": [c, h, w],
                      "range": [0, 255]},
        "hnq.sites": {name: site.scheme_name for name, site in qmodel.sites().items()},
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
    _logger.info("wrote %s (%d nodes, %.1f KiB)", path, len(model.graph.node), size / 1024)
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
