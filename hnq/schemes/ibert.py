"""I-BERT integer Softmax, GELU and LayerNorm.

Paper: S. Kim, A. Gholami, Z. Yao, M. W. Mahoney, K. Keutzer, "I-BERT: Integer-only BERT
Quantization", ICML 2021, https://arxiv.org/abs/2101.01321.
Reference code: huggingface/transformers @ 0159620269dec5524b126697473c0bdc71159052,
src/transformers/models/ibert/quant_modules.py (`IntSoftmax`, `IntGELU`, `IntLayerNorm`),
a port of kssteven418/I-BERT.

The approximations (exp polynomial with n = 30, erf polynomial with a 2^14 pre-shift,
Newton integer square root) and their floors are the reference's. The reference simulates
integers in float tensors, but here every step is an exact int64 operation. Each scheme's
docstring names where its result differs from the reference and why.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from onnx_ops import ibert as ibert_onnx

from ..intops import POWERS_OF_TWO, bit_length, dyadic, floor_div, isqrt_newton_steps, round_shift
from .base import RowExpSoftmax, Scheme, SchemeConstants, SiteInput
from .registry import register

PAPER = "I-BERT: Integer-only BERT Quantization (Kim et al., ICML 2021), arXiv:2101.01321"

# Largest |value| an int64 sum may reach in ORT's ReduceSum, which accumulates in double.
REDUCE_SUM_EXACT_LIMIT = 2**53


def _powers_input() -> np.ndarray:
    return np.array(POWERS_OF_TWO, dtype=np.int64)


def _scalar(value: int) -> np.ndarray:
    return np.array(value, dtype=np.int64)


def _record(intermediates: dict[str, torch.Tensor] | None, **values: torch.Tensor) -> None:
    if intermediates is not None:
        intermediates.update(values)


@register
class IBertSoftmax(RowExpSoftmax):
    """I-BERT softmax: exp(p) ~ 0.3585 (p + 1.353)^2 + 0.344 after x = -z ln 2 + p.

    Steps on d = x - rowmax: clamp d >= 30 x0 with x0 = floor(-0.6931/S), split
    d = q x0 + r, z = (r + b) r + c, exp_int = z * 2^(30 - q), then a 16-bit requantization
    (the reference's QuantAct(16), whose range is max(exp_int) = c * 2^30, reached at the
    row maximum), factor = floor(2^32 / sum(exp16)) and out = floor(exp16 * factor / 2^(32-k)).

    Differences from the reference:
    - The 16-bit requantization rounds half up; the reference rounds half to even in
      float64. Its multiplier is built as in the reference, so only exact ties could
      differ (none occur in the reference vectors).
    - The output is clamped to 2^k - 1. floor(2^32/sum) gives out = 2^k, which needs a
      (k+1)-th bit, when one element is the whole row sum and that sum divides 2^32.
      The requantizer maps the row maximum to 32767, so this clamp is a guard that the
      reference vectors never trigger (their codes reach 255 at most).
    - exp_int (up to c * 2^30, beyond int32) is never formed: exp16 is computed from z and q
      directly in int64, which is exact.
    """

    op = "softmax"
    family = "ibert"
    name = "ibert"
    paper = PAPER
    onnx_function = ibert_onnx.IBertSoftmax

    X0 = -0.6931
    N = 30
    COEF = (0.35815147, 0.96963238 / 0.35815147, 1.0 / 0.35815147)
    EXP16_MAX = 2**15 - 1
    MAX_BIT = 32

    def constants(self, site_input: SiteInput, **options: Any) -> SchemeConstants:
        output_bits = int(options.pop("output_bits", 8))
        if options:
            raise ValueError(f"invalid options for softmax 'ibert': {sorted(options)}; the only option is output_bits")
        if output_bits not in (8, 16):
            raise ValueError(f"softmax output_bits must be 8 or 16, got {output_bits}")

        s = site_input.scale
        x0_int = math.floor(self.X0 / s)
        b_int = math.floor(self.COEF[1] / s)
        c_int = math.floor(self.COEF[2] / s**2)
        if c_int < 1:
            raise ValueError(f"input scale {s} is too coarse for the I-BERT exp polynomial (c_int = {c_int}); use a scale below 1.6")
        # The reference's QuantAct(16) takes its range from max(exp_int) = c * 2^30 (the row maximum) and
        # builds its multiplier from a float32 copy of the scale (c * 2^30 + 1e-5) / 32767.
        # Multiplying by 2^30 folds exp_int = z * 2^(30-q) into the shift.
        range_scale = float(np.float32((c_int * 2.0**self.N + 1e-5) / self.EXP16_MAX))
        ratio = dyadic(2.0**self.N / range_scale)

        # For q >= 16 the value z*m/2^(shift+q) is below 1/2 and rounds to 0, so q is capped
        # at 16 to keep the rounding shift below 63.
        q_cap = 16
        if ratio.shift + q_cap > 62 or ratio.shift < 1:
            raise ValueError(f"input scale {s} is too fine for the I-BERT softmax requantizer "
                             f"(rounding shift {ratio.shift} + {q_cap} exceeds 62); use a scale above 4e-5")

        values = {
            "x0_int": x0_int,
            "d_min": self.N * x0_int,
            "b_int": b_int,
            "c_int": c_int,
            "exp16_multiplier": ratio.multiplier,
            "exp16_shift": ratio.shift,
            "q_cap": q_cap,
            "output_bits": output_bits,
        }
        return SchemeConstants(values, output_scale=2.0**-output_bits, output_min=0,
                               output_max=2**output_bits - 1, site_input=site_input)

    def reference(self, q: torch.Tensor, c: SchemeConstants,
                  intermediates: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        d = q - q.amax(dim=-1, keepdim=True)
        d = d.clamp(min=c["d_min"])
        quotient = floor_div(-d, -c["x0_int"])
        r = d - quotient * c["x0_int"]
        z = (r + c["b_int"]) * r + c["c_int"]
        z_scaled = z * c["exp16_multiplier"]
        exp16 = round_shift(z_scaled, c["exp16_shift"] + quotient.clamp(max=c["q_cap"]))
        exp16 = exp16.clamp(0, self.EXP16_MAX)
        _record(intermediates, row_diff=d, z=z, z_scaled=z_scaled, exp16=exp16)
        return self.normalize(exp16, c, intermediates)

    def normalize(self, exp16: torch.Tensor, c: SchemeConstants,
                  intermediates: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Output codes from the row's 16-bit exponentials: floor(exp16 floor(2^32/sum) / 2^(32-k))."""
        total = exp16.sum(dim=-1, keepdim=True)
        factor = floor_div(torch.full_like(total, 2**self.MAX_BIT), total)
        product = exp16 * factor
        out = (product >> (self.MAX_BIT - c["output_bits"])).clamp(max=c.output_max)
        _record(intermediates, exp16_sum=total, factor=factor, product=product, output=out)
        return out

    def exp_table(self, c: SchemeConstants) -> np.ndarray:
        """The 16-bit exponentials exp16 of d = 0, -1, ..., -(2^bits - 1), taken from `reference`."""
        from .ivit import exp_table_from_reference

        return exp_table_from_reference(self, c, "exp16")

    def bounds(self, c: SchemeConstants) -> dict[str, int]:
        length = c.site_input.length
        b_int, c_int = c["b_int"], c["c_int"]
        # z = r^2 + b r + c on r in (x0, 0] with |x0| < b: at most c, at least c - b^2/4.
        z_bound = max(c_int, b_int * b_int // 4 - c_int + 1)
        return {
            "row_diff": -c["d_min"],
            "z": z_bound,
            "z_scaled": z_bound * c["exp16_multiplier"],
            "exp16": self.EXP16_MAX,
            "exp16_sum": self.EXP16_MAX * length,
            "factor": 2**self.MAX_BIT,
            "product": 2**self.MAX_BIT,
            "output": c.output_max,
        }

    def onnx_constant_inputs(self, c: SchemeConstants) -> list[np.ndarray]:
        return [
            _scalar(-c["x0_int"]), _scalar(c["d_min"]), _scalar(c["b_int"]), _scalar(c["c_int"]),
            _scalar(c["exp16_multiplier"]), _scalar(c["exp16_shift"]), _scalar(c["q_cap"]),
            _scalar(self.EXP16_MAX), _scalar(2**self.MAX_BIT),
            _scalar(2 ** (self.MAX_BIT - c["output_bits"])), _scalar(c.output_max), _powers_input(),
        ]

    @staticmethod
    def float_op(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=-1)


@register
class IBertGELU(Scheme):
    """I-BERT i-GELU: GELU(x) ~ x/2 (1 + L(x/sqrt 2)), L a clipped second-order erf polynomial.

    With S' = S/1.4142: y = sign(x) ((min(|x|, -b) + b)^2 + c), b = floor(-1.769/S'),
    c = floor((1/-0.2888)/S'^2), sigmoid = floor(y / 2^14), out = x (sigmoid + floor(1/S_sig)),
    S_sig = -0.2888 S'^2 2^14.

    Differences from the reference: S_sig is negative in the reference, which returns codes
    at a negative output scale S S_sig / 2. Here the codes are negated and the output scale
    is -S S_sig / 2 > 0; the real values are the same.

    The scheme is built for the wide accumulator of the preceding linear layer
    (preferred_input_bits = 16): at 8-bit scales the 2^14 pre-shift leaves sigmoid only a
    few levels and the output has the wrong slope.
    """

    op = "gelu"
    family = "ibert"
    name = "ibert"
    paper = PAPER
    preferred_input_bits = 16
    onnx_function = ibert_onnx.IBertGELU
    # Each output code depends on its own input code only, so the lowering may use a table.
    elementwise = True

    K = 1.4142
    SHIFT_BITS = 14
    A = -0.2888
    B = -1.769

    def constants(self, site_input: SiteInput, **options: Any) -> SchemeConstants:
        if options:
            raise ValueError(f"invalid options for gelu 'ibert': {sorted(options)}; it takes none")
        s = site_input.scale
        s_erf = s / self.K
        b_int = math.floor(self.B / s_erf)
        c_int = math.floor((1.0 / self.A) / s_erf**2)
        sigmoid_scale = s_erf**2 * self.A * 2**self.SHIFT_BITS
        shift_int = math.floor(1.0 / sigmoid_scale)
        values = {"b_int": b_int, "c_int": c_int, "shift_int": shift_int}
        c = SchemeConstants(values, output_scale=-s * sigmoid_scale / 2, output_min=0, output_max=0,
                            site_input=site_input)
        out_bound = self.bounds(c)["output"]
        return SchemeConstants(values, output_scale=c.output_scale, output_min=-out_bound,
                               output_max=out_bound, site_input=site_input)

    def reference(self, q: torch.Tensor, c: SchemeConstants,
                  intermediates: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        b_int = c["b_int"]
        base = q.abs().clamp(max=-b_int) + b_int
        y = torch.sign(q) * (base * base + c["c_int"])
        sigmoid = y >> self.SHIFT_BITS
        multiplier = sigmoid + c["shift_int"]
        out = -(q * multiplier)
        _record(intermediates, y=y, sigmoid=sigmoid, multiplier=multiplier, output=out)
        return out

    def bounds(self, c: SchemeConstants) -> dict[str, int]:
        b_int, c_int = c["b_int"], c["c_int"]
        y_bound = max(abs(c_int), abs(b_int * b_int + c_int))
        sigmoid_bound = -(-y_bound >> self.SHIFT_BITS)
        multiplier_bound = sigmoid_bound + abs(c["shift_int"])
        code_bound = -c.site_input.code_min
        return {"y": y_bound, "sigmoid": sigmoid_bound, "multiplier": multiplier_bound,
                "output": code_bound * multiplier_bound}

    def onnx_constant_inputs(self, c: SchemeConstants) -> list[np.ndarray]:
        return [_scalar(-c["b_int"]), _scalar(c["b_int"]), _scalar(c["c_int"]),
                _scalar(2**self.SHIFT_BITS), _scalar(c["shift_int"])]

    @staticmethod
    def float_op(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x)


def layernorm_float(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last axis without affine: (x - mean) / sqrt(var + 1e-6), population var."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6)


def layernorm_statistics(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (row sum, half-up integer mean, centred codes y, sum of y^2) over the last axis."""
    length = q.shape[-1]
    total = q.sum(dim=-1, keepdim=True)
    mean = floor_div(2 * total + length, 2 * length)
    y = q - mean
    return total, mean, y, (y * y).sum(dim=-1, keepdim=True)


def layernorm_constants(family: str, site_input: SiteInput, numerator: int) -> SchemeConstants:
    """Check the int64 range of an integer LayerNorm site and return its constants.

    With R = 2^bits - 1 and a half-up mean, sum(y^2) <= C (R^2 + 1) / 4; it passes through
    ReduceSum, so it must stay below 2^53 (for 16-bit inputs, C < 2^21).
    """
    length = site_input.length
    code_range = 2**site_input.bits - 1
    var_bound = length * (code_range**2 + 1) // 4
    if var_bound >= REDUCE_SUM_EXACT_LIMIT:
        raise ValueError(
            f"layernorm '{family}' with {site_input.bits}-bit inputs and {length} channels can reach "
            f"sum(y^2) = {var_bound}, beyond the 2^53 that an exact int64 ReduceSum allows; use fewer input bits"
        )
    values = {"length": length, "numerator": numerator, "variance_bound": var_bound}
    return SchemeConstants(values, output_scale=math.sqrt(length) / 2**30, output_min=-(2**30),
                           output_max=2**30, site_input=site_input)


def layernorm_bounds(c: SchemeConstants, start_bound: int) -> dict[str, int]:
    spec = c.site_input
    var_bound = c["variance_bound"]
    return {
        "row_sum": spec.length * -spec.code_min,
        "centered": 2**spec.bits - 1,
        "variance": var_bound,
        "sqrt_start": start_bound,
        "std": math.isqrt(var_bound),
        "factor": c["numerator"],
        # |y| <= isqrt(sum y^2) = std, so |y * floor(N/std)| <= N.
        "product": c["numerator"],
        "output": 2**30,
    }


@register
class IBertLayerNorm(Scheme):
    """I-BERT integer LayerNorm without affine: n = floor(y floor(2^31/std) / 2), scale sqrt(C)/2^30.

    y = x - round(mean), std = floor(sqrt(sum y^2)) by the paper's Newton iteration from
    2^ceil(bits(var)/2). The caller applies gamma and beta.

    Differences from the reference:
    - The square root is the paper's integer Newton iteration; the reference code calls
      torch.sqrt on floats and floors. Both give floor(sqrt(var)).
    - No dynamic right shift before squaring: int64 keeps sum(y^2) exact (bounded by
      `layernorm_constants`), so no precision is dropped.
    - A row with zero variance has y = 0 everywhere and returns n = 0 (the caller then
      outputs beta); the reference divides by std = 0. The square root runs on max(var, 1).
    """

    op = "layernorm"
    family = "ibert"
    name = "ibert"
    paper = PAPER
    onnx_function = ibert_onnx.IBertLayerNorm

    NUMERATOR = 2**31
    # Proof of the step count: the start x0 = 2^ceil(b/2) with 2^(b-1) <= var < 2^b lies in
    # [sqrt(var), 2 sqrt(var)], so the ratio R = x/sqrt(var) starts <= 2. A Newton step maps
    # R to (R + 1/R)/2 (the floor only lowers x, never below isqrt(var)), giving R - 1 <=
    # 1, 1/4, 1/40, 3.1e-4, 4.7e-8, 1.1e-15. With sqrt(var) < 2^31, five steps leave
    # x < sqrt(var) + 1, so x is isqrt(var) or isqrt(var) + 1, and a sixth step ends at isqrt(var).
    SQRT_STEPS = 6

    def constants(self, site_input: SiteInput, **options: Any) -> SchemeConstants:
        if options:
            raise ValueError(f"invalid options for layernorm 'ibert': {sorted(options)}; it takes none")
        return layernorm_constants(self.name, site_input, self.NUMERATOR)

    def reference(self, q: torch.Tensor, c: SchemeConstants,
                  intermediates: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        total, _, y, var = layernorm_statistics(q)
        start, std = self.integer_sqrt(var.clamp(min=1))
        factor = floor_div(torch.full_like(std, c["numerator"]), std)
        product = y * factor
        out = product >> 1
        _record(intermediates, row_sum=total, centered=y, variance=var, sqrt_start=start, std=std,
                factor=factor, product=product, output=out)
        return out

    def integer_sqrt(self, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (Newton start, floor(sqrt(var))) for 1 <= var < 2^62."""
        start = torch.ones_like(var) << floor_div(bit_length(var) + 1, 2)
        return start, isqrt_newton_steps(var, start, self.SQRT_STEPS)

    def bounds(self, c: SchemeConstants) -> dict[str, int]:
        var_bound = max(c["variance_bound"], 1)
        return layernorm_bounds(c, 1 << ((var_bound.bit_length() + 1) // 2))

    def onnx_constant_inputs(self, c: SchemeConstants) -> list[np.ndarray]:
        return [_scalar(c["length"]), _scalar(c["numerator"]), _powers_input()]

    @staticmethod
    def float_op(x: torch.Tensor) -> torch.Tensor:
        return layernorm_float(x)
