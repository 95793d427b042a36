"""I-ViT integer Shiftmax, ShiftGELU and I-LayerNorm.

Paper: Z. Li, Q. Gu, "I-ViT: Integer-only Quantization for Efficient Vision Transformer
Inference", ICCV 2023, https://arxiv.org/abs/2207.01405.
Reference code: zkkli/I-ViT @ 380ba99144e7dedf428477826a6b3060bf9b85d2,
models/quantization_utils/quant_modules.py (`IntSoftmax`, `IntGELU`, `IntLayerNorm`).

The approximations are the reference's: log2 e ~ 1.0111b as d + floor(d/2) - floor(d/16),
2^frac ~ 1 + frac/2, shift constants n = 15 (Shiftmax) and n = 23 (ShiftGELU), and the
(2^31 - 1)/sum normalizer. Every step here is an exact int64 operation; each scheme's
docstring names where the result differs from the reference and why.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from onnx_ops import ivit as ivit_onnx

from ..intops import floor_div, isqrt_newton_steps
from .base import RowExpSoftmax, Scheme, SchemeConstants, SiteInput
from .ibert import (REDUCE_SUM_EXACT_LIMIT, _powers_input, _record, _scalar, layernorm_bounds,
                    layernorm_constants, layernorm_float, layernorm_statistics)
from .registry import register

PAPER = "I-ViT: Integer-only Quantization for Efficient Vision Transformer Inference (Li & Gu, ICCV 2023), arXiv:2207.01405"

INT32_MAX = 2**31 - 1


def shift_exp(t: torch.Tensor, x0_int: int, n: int, shift_cap: int) -> torch.Tensor:
    """I-ViT's shift exponential of codes t (any sign): floor((r/2 - x0) 2^(n-q)) at scale S/2^n.

    t log2(e) ~ t + floor(t/2) - floor(t/16) is clamped at n x0 and split as q x0 + r with
    r in (x0, 0]; since r - 2 x0 >= 1 - x0 >= 2, the result is at least 2^(n-q) > 0.
    The shift n - q is capped at `shift_cap` (see IViTShiftGELU for why that is exact).
    """
    t = t + (t >> 1) - (t >> 4)
    t = t.clamp(min=n * x0_int)
    q = floor_div(-t, -x0_int)
    r = t - q * x0_int
    shift = (n - q).clamp(max=shift_cap)
    return ((r - 2 * x0_int) << shift) >> 1


def exp_table_from_reference(scheme: Scheme, c: SchemeConstants, key: str) -> np.ndarray:
    """Intermediate `key` of `scheme.reference` on the row code_max, code_max - 1, ..., code_min.

    That row's maximum is code_max, so entry j is the value for d = x - rowmax = -j. A
    softmax scheme's exponential depends on d alone, so a lookup by -d reproduces it.
    """
    spec = c.site_input
    row = torch.arange(spec.code_max, spec.code_min - 1, -1, dtype=torch.int64)[None]
    intermediates: dict[str, torch.Tensor] = {}
    scheme.reference(row, c, intermediates)
    return intermediates[key][0].numpy().copy()


def _check_exp_sum(family: str, op_name: str, exp_bound: int, count: int) -> None:
    if exp_bound * count >= REDUCE_SUM_EXACT_LIMIT:
        raise ValueError(f"{op_name} '{family}': a row of {count} exponentials of up to {exp_bound} "
                         f"can sum past 2^53, which ReduceSum on int64 does not add exactly; use a coarser input scale")


@register
class IViTShiftmax(RowExpSoftmax):
    """I-ViT Shiftmax: e = shift_exp(x - rowmax) with n = 15, x0 = floor(-1/S),
    sum = min(sum(e), 2^31 - 1), out = floor(e floor((2^31-1)/sum) / 2^(32-k)), scale 2^-(k-1).

    Difference from the reference: the output is clamped to 2^(k-1) - 1. The reference
    stays below that whenever e <= 2^31 - 1, but e reaches |x0| 2^15, which exceeds
    2^31 - 1 for input scales below about 2^-16.
    """

    op = "softmax"
    family = "ivit"
    name = "ivit"
    paper = PAPER
    onnx_function = ivit_onnx.IViTShiftmax

    N = 15

    def constants(self, site_input: SiteInput, **options: Any) -> SchemeConstants:
        output_bits = int(options.pop("output_bits", 8))
        if options:
            raise ValueError(f"invalid options for softmax 'ivit': {sorted(options)}; the only option is output_bits")
        if output_bits not in (8, 16):
            raise ValueError(f"softmax output_bits must be 8 or 16, got {output_bits}")
        x0_int = math.floor(-1.0 / site_input.scale)
        _check_exp_sum(self.name, self.op, -x0_int << self.N, site_input.length)
        values = {"x0_int": x0_int, "output_bits": output_bits}
        return SchemeConstants(values, output_scale=2.0 ** -(output_bits - 1), output_min=0,
                               output_max=2 ** (output_bits - 1) - 1, site_input=site_input)

    def reference(self, q: torch.Tensor, c: SchemeConstants,
                  intermediates: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        d = q - q.amax(dim=-1, keepdim=True)
        e = shift_exp(d, c["x0_int"], self.N, self.N)
        _record(intermediates, row_diff=d, exp=e)
        return self.normalize(e, c, intermediates)

    def normalize(self, e: torch.Tensor, c: SchemeConstants,
                  intermediates: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Output codes from the row's exponentials: floor(e floor((2^31-1)/sum) / 2^(32-k))."""
        raw_sum = e.sum(dim=-1, keepdim=True)
        total = raw_sum.clamp(max=INT32_MAX)
        factor = floor_div(torch.full_like(total, INT32_MAX), total)
        product = e * factor
        out = (product >> (32 - c["output_bits"])).clamp(max=c.output_max)
        _record(intermediates, exp_sum=raw_sum, factor=factor, product=product, output=out)
        return out

    def exp_table(self, c: SchemeConstants) -> np.ndarray:
        """The exponentials e of d = 0, -1, ..., -(2^bits - 1), taken from `reference`."""
        return exp_table_from_reference(self, c, "exp")

    def bounds(self, c: SchemeConstants) -> dict[str, int]:
        exp_bound = -c["x0_int"] << self.N
        return {
            "row_diff": 2**c.site_input.bits - 1,
            "exp": exp_bound,
            "exp_sum": exp_bound * c.site_input.length,
            "factor": INT32_MAX,
            # Either e <= sum <= 2^31 - 1, or the sum was clamped and factor = 1.
            "product": max(INT32_MAX, exp_bound),
            "output": c.output_max,
        }

    def onnx_constant_inputs(self, c: SchemeConstants) -> list[np.ndarray]:
        x0_int = c["x0_int"]
        return [_scalar(-x0_int), _scalar(self.N * x0_int), _scalar(self.N), _scalar(INT32_MAX),
                _scalar(2 ** (32 - c["output_bits"])), _scalar(c.output_max), _powers_input()]

    @staticmethod
    def float_op(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=-1)


@register
class IViTShiftGELU(Scheme):
    """I-ViT ShiftGELU: x sigmoid(1.702 x) with 1.702 folded into the scale, as the reference does.

    With y = x at scale S_sig = 1.702 S and m the row maximum of y over the last axis:
    e1 = shift_exp(y - m), e2 = shift_exp(-m) (n = 23, x0 = floor(-1/S_sig)),
    sum = min(e1 + e2, 2^31 - 1), sigmoid = floor(e1 floor((2^31-1)/sum) / 2^24) at scale 2^-7,
    out = x sigmoid at scale S/2^7.

    Differences from the reference:
    - sigmoid is clamped to 2^7 - 1. The reference exceeds 1.0 when the sum is clamped
      and e1 > 2^31 - 1, which happens for S_sig below about 1/256.
    - For a negative row maximum, -m > 0 and the shift n - q of e2 grows without limit
      (past 63 bits for coarse scales). It is capped at 31: uncapped or capped,
      e2 >= 2^31 > 2^31 - 1, so the clamped sum and every output are unchanged.
    """

    op = "gelu"
    family = "ivit"
    name = "ivit"
    row_max_elementwise = True
    paper = PAPER
    onnx_function = ivit_onnx.IViTShiftGELU

    N = 23
    SIGMOID_COEFF = 1.702
    SIGMOID_BITS = 8
    SHIFT_CAP = 31

    def _sigmoid_scale_input(self, scale: float) -> float:
        return scale * self.SIGMOID_COEFF

    def _sigmoid_input(self, q: torch.Tensor) -> torch.Tensor:
        return q

    def _sigmoid_input_bound(self, c: SchemeConstants) -> int:
        return -c.site_input.code_min

    def constants(self, site_input: SiteInput, **options: Any) -> SchemeConstants:
        if options:
            raise ValueError(f"invalid options for gelu '{self.name}': {sorted(options)}; it takes none")
        x0_int = math.floor(-1.0 / self._sigmoid_scale_input(site_input.scale))
        sigmoid_max = 2 ** (self.SIGMOID_BITS - 1) - 1
        out_bound = -site_input.code_min * sigmoid_max
        values = {"x0_int": x0_int, "sigmoid_max": sigmoid_max}
        return SchemeConstants(values, output_scale=site_input.scale / 2 ** (self.SIGMOID_BITS - 1),
                               output_min=-out_bound, output_max=out_bound, site_input=site_input)

    def reference(self, q: torch.Tensor, c: SchemeConstants,
                  intermediates: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        x0_int = c["x0_int"]
        y = self._sigmoid_input(q)
        y_max = y.amax(dim=-1, keepdim=True)
        e_x = shift_exp(y - y_max, x0_int, self.N, self.SHIFT_CAP)
        e_neg_max = shift_exp(-y_max, x0_int, self.N, self.SHIFT_CAP)
        total = (e_x + e_neg_max).clamp(max=INT32_MAX)
        factor = floor_div(torch.full_like(total, INT32_MAX), total)
        product = e_x * factor
        sigmoid = (product >> (32 - self.SIGMOID_BITS)).clamp(max=c["sigmoid_max"])
        out = q * sigmoid
        _record(intermediates, sigmoid_input=y, exp=e_x, exp_neg_max=e_neg_max, factor=factor,
                product=product, sigmoid=sigmoid, output=out)
        return out

    def bounds(self, c: SchemeConstants) -> dict[str, int]:
        x0_abs = -c["x0_int"]
        exp_bound = x0_abs << self.N
        return {
            "sigmoid_input": self._sigmoid_input_bound(c),
            "exp": exp_bound,
            # (r - 2 x0) < 2 |x0| shifted by at most SHIFT_CAP - 1 after the halving.
            "exp_neg_max": x0_abs << self.SHIFT_CAP,
            "factor": INT32_MAX,
            "product": max(INT32_MAX, exp_bound),
            "sigmoid": c["sigmoid_max"],
            "output": c.output_max,
        }

    def onnx_constant_inputs(self, c: SchemeConstants) -> list[np.ndarray]:
        x0_int = c["x0_int"]
        return [_scalar(-x0_int), _scalar(self.N * x0_int), _scalar(self.N), _scalar(self.SHIFT_CAP),
                _scalar(INT32_MAX), _scalar(2 ** (32 - self.SIGMOID_BITS)), _scalar(c["sigmoid_max"]),
                _powers_input()]

    @staticmethod
    def float_op(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x)


@register
class IViTShiftGELUShiftChain(IViTShiftGELU):
    """I-ViT ShiftGELU with 1.702 as shifts on the codes, as the I-ViT paper describes.

    y = x + floor(x/2) + floor(x/8) + floor(x/16) ~ 1.6875 x, at the input scale S
    (x0 = floor(-1/S)); everything else, including the two differences from the
    reference code, is as in the "ivit" ShiftGELU. The reference code folds 1.702 into a
    float scale instead, so there are no reference vectors for this variant.
    """

    name = "ivit-shift"
    onnx_function = ivit_onnx.IViTShiftGELUShiftChain

    def _sigmoid_scale_input(self, scale: float) -> float:
        return scale

    def _sigmoid_input(self, q: torch.Tensor) -> torch.Tensor:
        return q + (q >> 1) + (q >> 3) + (q >> 4)

    def _sigmoid_input_bound(self, c: SchemeConstants) -> int:
        # Each floor adds at most -1 beyond 1.6875 |x|.
        return 27 * -c.site_input.code_min // 16 + 3


@register
class IViTLayerNorm(Scheme):
    """I-ViT I-LayerNorm without affine: n = floor(y floor((2^31-1)/std) / 2), scale sqrt(C)/2^30.

    y = x - round(mean), std = floor(sqrt(sum y^2)) by Newton's method from 2^16, as in the
    reference. The caller applies gamma and beta.

    Differences from the reference:
    - The reference stops after exactly 10 Newton steps, which is too few from 2^16 for
      small variances (var = 1000 gives 68 instead of 31) and can end on isqrt(var) + 1
      when var + 1 is a square. Here the steps run to convergence (proven count below), so
      std = floor(sqrt(var)) for every var < 2^62.
    - A row with zero variance has y = 0 everywhere and returns n = 0 (the caller then
      outputs beta); the reference divides by std = 0 or 1 depending on the step count.
      The square root runs on max(var, 1).
    - int64 throughout: sum(y^2) of 16-bit inputs exceeds the reference's 32 bits.
    """

    op = "layernorm"
    family = "ivit"
    name = "ivit"
    paper = PAPER
    onnx_function = ivit_onnx.IViTLayerNorm

    NUMERATOR = INT32_MAX
    SQRT_START = 2**16
    # Proof of the step count, with R = x/sqrt(var) and one step mapping R to at most
    # (R + 1/R)/2 (the floor only lowers x, never below isqrt(var)). The first step is a
    # plain Newton step because 2^16 may lie below sqrt(var), where the min would stick.
    # From any positive start, that step lands at or above isqrt(var). For 1 <= var < 2^62:
    # if sqrt(var) <= 2^16, R starts <= 2^16; otherwise the first step gives
    # R <= sqrt(var)/2^17 + 1/2 < 2^14 + 1. Iterating the bound on a fine grid of sqrt(var)
    # in [1, 2^31), at most 19 steps bring x below sqrt(var) + 1 and one more ends at
    # isqrt(var): 20 in all, the plain step included.
    SQRT_STEPS_AFTER_FIRST = 19

    def constants(self, site_input: SiteInput, **options: Any) -> SchemeConstants:
        if options:
            raise ValueError(f"invalid options for layernorm 'ivit': {sorted(options)}; it takes none")
        return layernorm_constants(self.name, site_input, self.NUMERATOR)

    def reference(self, q: torch.Tensor, c: SchemeConstants,
                  intermediates: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        total, _, y, var = layernorm_statistics(q)
        first, std = self.integer_sqrt(var.clamp(min=1))
        factor = floor_div(torch.full_like(std, c["numerator"]), std)
        product = y * factor
        out = product >> 1
        _record(intermediates, row_sum=total, centered=y, variance=var, sqrt_start=first, std=std,
                factor=factor, product=product, output=out)
        return out

    def integer_sqrt(self, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (first Newton iterate, floor(sqrt(var))) for 1 <= var < 2^62."""
        first = floor_div(self.SQRT_START + floor_div(var, self.SQRT_START), 2)
        return first, isqrt_newton_steps(var, first, self.SQRT_STEPS_AFTER_FIRST)

    def bounds(self, c: SchemeConstants) -> dict[str, int]:
        first_bound = (self.SQRT_START + c["variance_bound"] // self.SQRT_START) // 2
        return layernorm_bounds(c, first_bound)

    def onnx_constant_inputs(self, c: SchemeConstants) -> list[np.ndarray]:
        return [_scalar(c["length"]), _scalar(c["numerator"]), _scalar(self.SQRT_START)]

    @staticmethod
    def float_op(x: torch.Tensor) -> torch.Tensor:
        return layernorm_float(x)

