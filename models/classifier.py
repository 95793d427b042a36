"""Base class of the integer model families: uint8 pixels in, integer logits codes out.

A family (models/vit.py, models/swin.py) subclasses `QuantClassifier`, builds its layers,
lists its sites in model order and writes `forward_codes` and `to_onnx`. The pixel check,
the float and integer forwards and the graph's input and output come from this class.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
from onnx import TensorProto

from hnq.onnx_builder import GraphBuilder
from hnq.quant import QTensor


class QuantClassifier(nn.Module):
    """Base of the integer models: set `image_shape` and `num_classes`, then call `name_sites()`."""

    image_shape: tuple[int, int, int]
    num_classes: int

    def sites(self) -> "OrderedDict[str, nn.Module]":
        """List every non-linear site in model order, named as in the timm model."""
        raise NotImplementedError

    def forward_codes(self, images: torch.Tensor) -> QTensor:
        """Logits as a QTensor: QAT values in training mode, integer codes in eval mode."""
        raise NotImplementedError

    def name_sites(self) -> None:
        """Give each site its timm name, which plans, reports and the ONNX metadata use."""
        for name, site in self.sites().items():
            site.site_name = name

    def pixels(self, images: torch.Tensor) -> QTensor:
        """Wrap uint8 pixel tensors [N, C, H, W] as codes of scale 1."""
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"expected images of shape [N, {', '.join(map(str, self.image_shape))}], "
                             f"got {list(images.shape)}")
        value = images.float() if self.training else images.to(torch.int64)
        return QTensor(value, 1.0, 8, signed=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits as floats: QAT values in training mode, dequantized integer codes in eval mode."""
        logits = self.forward_codes(images)
        if self.training:
            return logits.value
        return logits.value.double() * logits.scale

    def logits_codes(self, images: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Integer reference: int64 logits codes and their scale (eval mode only)."""
        if self.training:
            raise RuntimeError("logits_codes runs the integer reference: call model.eval() first")
        with torch.no_grad():
            logits = self.forward_codes(images)
        return logits.value, logits.scale

    def onnx_pixels(self, b: GraphBuilder) -> QTensor:
        """Add the graph input `pixels` (uint8 [N, C, H, W]) and return it as codes of scale 1."""
        c, h, w = self.image_shape
        return QTensor(b.add_input("pixels", TensorProto.UINT8, ["N", c, h, w]), 1.0, 8, signed=False)

    def onnx_logits(self, b: GraphBuilder, logits: QTensor) -> tuple[str, float]:
        """Add the graph output `logits_codes` (int32 [N, classes]); return its name and scale."""
        out = b.node("Cast", [b.codes(logits.value)], to=TensorProto.INT32, name="logits_codes")
        b.add_output(out, TensorProto.INT32, ["N", self.num_classes])
        return out, logits.scale
