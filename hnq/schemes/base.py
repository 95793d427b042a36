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

# Widest input whose every code fits one lookup table in `Scheme.fast_reference` (64 Ki entries).
TABLE_MAX_INPUT_BITS = 16


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
    # True when each output code is a function of the same position's input code and its
    # row's maximum alone (I-ViT's ShiftGELU), so a table indexed by both reproduces it.
    row_max_elementwise: ClassVar[bool] = False

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

    def code_table(self, c: SchemeConstants) -> torch.Tensor | None:
        """Compute the reference's output for every input code, or None where no table reproduces it.

        An elementwise scheme gives one row over the codes code_min..code_max. A
        row-max-elementwise scheme gives a row per row maximum m: entry [m - code_min,
        x - code_min] is the output for x on a row whose maximum is m, computed on the row
        min(code, m) over every code (entries with x > m are never read). Tables stop at
        16 input bits for the first kind (64 Ki entries) and 8 bits for the second.
        """
        spec = c.site_input
        codes = torch.arange(spec.code_min, spec.code_max + 1, dtype=torch.int64)
        if self.elementwise and spec.bits <= TABLE_MAX_INPUT_BITS:
            return self.reference(codes[None], c)
        if self.row_max_elementwise and spec.bits <= 8:
            return self.reference(torch.minimum(codes[None, :], codes[:, None]), c)
        return None

    def fast_reference(self, q: torch.Tensor, c: SchemeConstants) -> torch.Tensor:
        """Return exactly `reference(q, c)`, through a lookup table where the scheme allows one.

        Elementwise and row-max-elementwise schemes gather from `code_table`; a softmax
        scheme with an exponential table overrides this. Training and evaluation use this
        path; tests hold it equal to `reference` on random and extreme inputs.
        """
        table = self.code_table(c)
        if table is None:
            return self.reference(q, c)
        code_min = c.site_input.code_min
        row = 0 if self.elementwise else q.amax(dim=-1, keepdim=True) - code_min
        return table[row, q - code_min]

    def qat_forward(self, x: torch.Tensor, c: SchemeConstants,
                    float_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Return the integer result as floats, with the float op's gradient.

        `x` holds real values on the site's input grid (already fake-quantized: the float32
        product code * scale), so round(x / scale) recovers the codes exactly. In float32
        that quotient is within 2 ulp of the code, below 1/2 for |code| < 2^21; wider
        inputs go through float64.
        """
        spec = c.site_input
        with torch.no_grad():
            real = x.detach() if spec.bits <= 21 and x.dtype == torch.float32 else x.detach().double()
            q = torch.round(real / spec.scale).to(torch.int64).clamp_(spec.code_min, spec.code_max)
            y_int = (self.fast_reference(q, c).double() * c.output_scale).to(x.dtype)
        y_float = (float_fn or self.float_op)(x)
        return y_float + (y_int - y_float).detach()

    def dequantize(self, codes: torch.Tensor, c: SchemeConstants) -> torch.Tensor:
        return codes.double() * c.output_scale

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.op}:{self.name}>"


class RowExpSoftmax(Scheme):
    """A softmax scheme whose exponential depends on d = x - rowmax alone, then `normalize`.

    Its exponentials for every d form one table (`exp_table`), which the CPU ONNX lowering
    and `fast_reference` both read instead of recomputing the exponential per element.
    """

    @abstractmethod
    def exp_table(self, c: SchemeConstants) -> np.ndarray:
        """Compute the exponential of d = 0, -1, ..., -(2^bits - 1) as the reference does."""

    @abstractmethod
    def normalize(self, e: torch.Tensor, c: SchemeConstants,
                  intermediates: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Compute output codes from a row's exponentials (the reference's steps after the exponential)."""

    def fast_reference(self, q: torch.Tensor, c: SchemeConstants) -> torch.Tensor:
        if c.site_input.bits > TABLE_MAX_INPUT_BITS:
            return self.reference(q, c)
        table = torch.from_numpy(self.exp_table(c).astype(np.int64))
        return self.normalize(table[q.amax(dim=-1, keepdim=True) - q], c)
