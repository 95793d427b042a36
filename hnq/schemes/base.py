"""The contract every integer non-linear scheme meets: one object with three faces.

A scheme (for example I-ViT's Shiftmax) is
1. an integer reference: `reference(codes, constants)` on int64 torch tensors;
2. a QAT forward: `qat_forward(...)`, whose value is the integer reference and whose
   gradient is that of the float op (straight-through estimator);
3. an ONNX lowering: `onnx_function`, an onnxscript function in domain `hnq`, called as
   `onnx_function(x, *onnx_constant_inputs(constants))` on int64 codes.

All three read the same `constants(...)`, which turn the float input scale into Python
integers once, so the torch reference and the ONNX graph compute with the same numbers.
Every op works on the last axis: the softmax row, or the channels of GELU and LayerNorm.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch

OPS = ("softmax", "gelu", "layernorm")


@dataclass(frozen=True)
class SiteInput:
    """What a site feeds its scheme: signed integer codes of `bits` at `scale`, rows of `length`."""

    scale: float
    bits: int
    length: int

    def __post_init__(self) -> None:
        if not (self.scale > 0 and np.isfinite(self.scale)):
            raise ValueError(f"input scale must be a positive finite number, got {self.scale!r}")
        if not 2 <= self.bits <= 24:
            raise ValueError(f"input bits must be between 2 and 24, got {self.bits}")
        if self.length < 1:
            raise ValueError(f"row length must be at least 1, got {self.length}")

    @property
    def code_min(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def code_max(self) -> int:
        return 2 ** (self.bits - 1) - 1


@dataclass(frozen=True)
class SchemeConstants:
    """Integer constants of one scheme at one site, plus the scale of its output codes."""

    values: dict[str, int]
    output_scale: float
    output_min: int
    output_max: int
    site_input: SiteInput

    def __getitem__(self, key: str) -> int:
        return self.values[key]


class Scheme(ABC):
    """One integer approximation of one non-linear op (see the module docstring)."""

    op: ClassVar[str]
    family: ClassVar[str]
    # The name a plan uses: the family, or family-variant for a second variant of one family.
    name: ClassVar[str]
    paper: ClassVar[str]
    # Input code width the scheme wants when the site is free to choose; None takes the
    # model's activation bits.
    preferred_input_bits: ClassVar[int | None] = None
    # Calibration statistics the scheme needs from its site, passed to constants() as
    # options of the same name. Sites know "channel_absmax": the EMA of max |x| per channel
    # (last axis) of the site's real-valued input.
    calibration: ClassVar[tuple[str, ...]] = ()
    # True when each output code is a function of the same position's input code alone
    # (no row statistic), so the ONNX lowering may replace the scheme by a lookup table.
    elementwise: ClassVar[bool] = False

    @abstractmethod
    def constants(self, site_input: SiteInput, **options: Any) -> SchemeConstants:
        """Compute the integer constants for one site from its input scale and bits."""

    @abstractmethod
    def reference(self, q: torch.Tensor, c: SchemeConstants) -> torch.Tensor:
        """Run the integer reference on int64 codes; return int64 output codes."""

    @abstractmethod
    def bounds(self, c: SchemeConstants) -> dict[str, int]:
        """Worst-case |value| of every named intermediate, for inputs in the site's code range."""

    onnx_function: ClassVar[Any]

    @abstractmethod
    def onnx_constant_inputs(self, c: SchemeConstants) -> list[np.ndarray]:
        """Constant tensors passed after `x` to `onnx_function`, in its parameter order."""

    @staticmethod
    @abstractmethod
    def float_op(x: torch.Tensor) -> torch.Tensor:
        """The float op the scheme approximates, on real values (for gradients and error)."""

    def qat_forward(self, x: torch.Tensor, c: SchemeConstants,
                    float_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Return the integer result as floats, with the float op's gradient.

        `x` holds real values on the site's input grid (already fake-quantized), so
        round(x / scale) recovers the codes exactly.
        """
        spec = c.site_input
        with torch.no_grad():
            q = torch.round(x.detach().double() / spec.scale).to(torch.int64).clamp(spec.code_min, spec.code_max)
            y_int = (self.reference(q, c).double() * c.output_scale).to(x.dtype)
        y_float = (float_fn or self.float_op)(x)
        return y_float + (y_int - y_float).detach()

    def dequantize(self, codes: torch.Tensor, c: SchemeConstants) -> torch.Tensor:
        return codes.double() * c.output_scale

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.op}:{self.name}>"
