"""Quantized values, observers and fake quantization shared by every quantized module.

A `QTensor` is a value together with its quantization (scale, bits, signedness). The same
modules run in two modes: in QAT mode `QTensor.value` holds real numbers that lie on the
quantization grid (codes * scale), in integer mode it holds the int64 codes themselves.
Scales are float64 Python numbers read from buffers; every integer constant derived from
them (dyadic multipliers, scheme constants) is computed by the same functions for the torch
reference and for the ONNX exporter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .intops import FLOAT64_EXACT_LIMIT, Dyadic, code_range, dyadic

# EMA momentum of the activation observers (I-ViT's and I-BERT's QuantAct use 0.95).
OBSERVER_MOMENTUM = 0.95


@dataclass
class QTensor:
    """A tensor and its quantization: codes (integer mode) or codes * scale (QAT mode)."""

    value: torch.Tensor
    scale: float
    bits: int
    signed: bool = True

    @property
    def code_min(self) -> int:
        return code_range(self.bits, self.signed)[0]

    @property
    def code_max(self) -> int:
        return code_range(self.bits, self.signed)[1]


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad


def fake_quantize(x: torch.Tensor, scale: float | torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Round x to the grid `scale` and clamp to [lo, hi] codes, with straight-through gradients."""
    # torch.fake_quantize_per_tensor_affine was measured slower here: its forward takes
    # about twice as long on CPU, and QAT steps went from 2.98x to 3.3x the float step.
    return torch.clamp(_RoundSTE.apply(x / scale), lo, hi) * scale


def quantize_codes(x: torch.Tensor, scale: float, lo: int, hi: int) -> torch.Tensor:
    """Codes round(x / scale) clamped to [lo, hi], as int64 (float64 division, half to even)."""
    return torch.round(x.double() / scale).clamp(lo, hi).to(torch.int64)


class ActQuantizer(nn.Module):
    """Per-tensor symmetric activation quantizer with an EMA max-abs observer.

    The observer runs in training mode until `freeze()`; the scale is
    max|x| / (2^(bits-1) - 1) and lives in the float64 buffer `scale`, so a checkpoint
    holds every quantization constant. Bits can change after construction (a plan may give
    a scheme a wider input), which rescales from the same observed range.
    """

    def __init__(self, bits: int, signed: bool = True):
        super().__init__()
        self.bits = bits
        self.signed = signed
        self.register_buffer("running_absmax", torch.zeros((), dtype=torch.float64))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        # False in float mode: values pass through unquantized, and are observed only when
        # `observe_in_float_mode` is set (calibration on float activations).
        self.quant_enabled = True
        self.observe_in_float_mode = False

    @property
    def scale(self) -> float:
        absmax = float(self.running_absmax)
        if absmax <= 0:
            absmax = 1e-8  # an all-zero input: any positive scale represents it exactly
        return absmax / code_range(self.bits, self.signed)[1]

    @property
    def code_min(self) -> int:
        return code_range(self.bits, self.signed)[0]

    @property
    def code_max(self) -> int:
        return code_range(self.bits, self.signed)[1]

    def observe(self, x: torch.Tensor) -> None:
        low, high = torch.aminmax(x.detach())
        absmax = torch.maximum(-low, high).double()
        if not bool(self.observed):
            self.running_absmax.copy_(absmax)
            self.observed.fill_(True)
        else:
            self.running_absmax.mul_(OBSERVER_MOMENTUM).add_(absmax * (1 - OBSERVER_MOMENTUM))

    def freeze(self, frozen: bool = True) -> None:
        self.frozen.fill_(frozen)

    def forward(self, x: torch.Tensor) -> QTensor:
        """QAT mode: observe (while training and not frozen), then fake-quantize."""
        if not self.quant_enabled:
            if self.observe_in_float_mode and not bool(self.frozen):
                self.observe(x)
            return QTensor(x, self.scale if bool(self.observed) else 1.0, self.bits, self.signed)
        if self.training and not bool(self.frozen):
            self.observe(x)
        if not bool(self.observed):
            raise RuntimeError("activation quantizer used before calibration: run calibrate() first")
        scale = self.scale
        return QTensor(fake_quantize(x, scale, self.code_min, self.code_max), scale, self.bits, self.signed)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"


def weight_scales(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric scales max|w_c| / (2^(bits-1) - 1), as float64."""
    absmax = w.detach().double().flatten(1).abs().amax(dim=1).clamp(min=1e-12)
    return absmax / (2 ** (bits - 1) - 1)


def fake_quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel fake quantization on the narrow range +-(2^(bits-1) - 1)."""
    scales = weight_scales(w, bits).to(w.dtype).view(-1, *([1] * (w.dim() - 1)))
    qmax = 2 ** (bits - 1) - 1
    return fake_quantize(w, scales, -qmax, qmax)


def quantize_weight(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer weight codes (int64) and their per-channel float64 scales."""
    scales = weight_scales(w, bits)
    qmax = 2 ** (bits - 1) - 1
    codes = torch.round(w.detach().double() / scales.view(-1, *([1] * (w.dim() - 1)))).clamp(-qmax, qmax)
    return codes.to(torch.int64), scales


# A requantization whose products stay below 2^53 is lowered to float64 on CPU, which is
# exact there and about half the time of the int64 lowering in onnxruntime (see
# GraphBuilder.requantize_sum). safe_dyadic gives up multiplier bits for that while the
# output code moves by at most 2^-FLOAT64_STEP_ERROR_BITS of a step. A multiplier of b bits
# has a relative error of at most 2^-b, so it moves a code below 2^k by at most 2^(k-b) steps.
FLOAT64_STEP_ERROR_BITS = 11
# Minimum multiplier bits for the float64 range when the output range is not given.
FLOAT64_MIN_MULTIPLIER_BITS = 24


def safe_dyadic(ratio: float, input_bound: int, offset_bound: int = 0, output_bound: int = 0) -> Dyadic:
    """Dyadic for `ratio` whose product with any |input| <= input_bound stays below 2^53 where
    enough multiplier bits remain, else below 2^62.

    Uses up to 31 multiplier bits and fewer when the input is wide; `offset_bound` reserves
    room for an offset of that many output units, pre-scaled by 2^shift and added before
    the shift. Fewer multiplier bits also mean a smaller shift, so a tight case retries
    with fewer bits before giving up. `output_bound`, the largest |output code| (0 when
    unknown), also reserves room for the output offset that the float64 lowering adds, and
    sets the fewest multiplier bits it may use (FLOAT64_STEP_ERROR_BITS).
    """
    input_bits = max(1, int(input_bound).bit_length())
    if output_bound:
        float64_min_bits = int(output_bound).bit_length() + FLOAT64_STEP_ERROR_BITS
    else:
        float64_min_bits = FLOAT64_MIN_MULTIPLIER_BITS
    passes = ((FLOAT64_EXACT_LIMIT, float64_min_bits, int(output_bound) + 1), (2**62, 8, 0))
    for limit, min_bits, output_room in passes:
        headroom = limit.bit_length() - 1 - input_bits
        for bits in range(max(min_bits, min(31, headroom)), min_bits - 1, -1):
            d = dyadic(abs(ratio), multiplier_bits=bits)
            if input_bound * d.multiplier + ((offset_bound + output_room) << d.shift) < limit:
                return d
    raise OverflowError(
        f"requantization by {ratio!r} of inputs up to {input_bound} (offset up to {offset_bound}) "
        "overflows int64; the input range is too wide for this scale ratio"
    )
