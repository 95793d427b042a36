"""FQ-ViT Log-Int-Softmax and PTF LayerNorm, made integer-only.

Paper: Y. Lin, T. Zhang, P. Sun, Z. Li, S. Zhou, "FQ-ViT: Post-Training Quantization for
Fully Quantized Vision Transformer", IJCAI 2022, https://arxiv.org/abs/2111.13824.
Reference code: megvii-research/FQ-ViT @ 5daf5915c715dc21d6afcd64e661652030e640ab,
models/ptq/layers.py (`QIntSoftmax` with log_i_softmax=True, `QIntLayerNorm`) and
models/ptq/observer/ptf.py (the power-of-two factor).

FQ-ViT has no integer GELU: it runs GELU in floating point, so the registry rejects
("gelu", "fqvit") with that reason. Every step here is an exact int64 operation; each
scheme's docstring names where the result differs from the reference and why.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from onnx_ops import fqvit as fqvit_onnx

from ..intops import INT32_MAX, dyadic, floor_div, floor_log2, round_div_half_even
from .base import RowExpSoftmax, Scheme, SchemeConstants, SiteInput
from .ibert import (IBertLayerNorm, IBertSoftmax, _powers_input, _record, _scalar,
                    layernorm_float, layernorm_statistics)
from .registry import register

# A row's exponential sum must stay below this: the integer log2 (FloorLog2) covers
# 1 <= v < 2^62, and the ONNX sum splits each exponential so ReduceSum stays exact.
EXP_SUM_LIMIT = 2**62

PAPER = ("FQ-ViT: Post-Training Quantization for Fully Quantized Vision Transformer "
         "(Lin et al., IJCAI 2022), arXiv:2111.13824")


@register
class FQViTLogIntSoftmax(RowExpSoftmax):
    """FQ-ViT Log-Int-Softmax: I-BERT's integer exp, then a rounded integer log2 of sum/exp.

    Steps on d = x - rowmax, with b = `log_bits`:
    1. exp = max(z * 2^(30 - q), 0): I-BERT's i-exp unchanged (x0 = -0.6931, n = 30, the same
       polynomial and floors), with the constants and the split d = q x0 + r of IBertSoftmax.
    2. sum = sum(exp) over the row, without I-BERT's 16-bit requantization.
    3. r = round(sum / exp) by integer division, ties to even as the reference's torch.round.
       r >= 1 because sum >= exp.
    4. k = floor(log2 r), plus 1 when the bit below the leading one is set (r >= 1.5 * 2^k).
    5. qlog = clamp(k, 0, 2^b - 1); entries with k >= 2^b are masked (probability 0).

    The reference returns the real value 2^-qlog. Here the output is linear unsigned codes
    p = 2^(N - qlog) at scale 2^-N (0 where masked), so the attention P @ V is an ordinary
    integer matmul. For b = 4, N = 15 is exact. For b = 6 and b = 8, the exact N = 2^b - 1
    needs 64 bits or more, so N = 30: entries with 30 < qlog are floored to 0 (the codes then
    fit in 31 bits). Each floored entry has a log2 probability of at most 2^-31, so over a row
    of L entries the attention output changes by at most L * 2^-31 * max|V|
    (2.7e-7 max|V| for L = 577). With sum < 2^62, k <= 62, so qlog = k for both b = 6 and
    b = 8, and those two settings give the same codes. The ONNX lowering sums the high and
    low 26 bits of the exponentials apart, because ReduceSum on int64 is exact only below
    2^53.

    `output_bits`, which SoftmaxSite always passes, is accepted and ignored: the code width
    is set by `log_bits` (N + 1 bits). The site does not pass `log_bits` yet, so sites use
    the default of 4 bits.

    Differences from the reference:
    - An entry whose exp is 0 makes the reference divide by zero: sum/0 = inf, whose log2
      is inf, which is >= 2^b, so the reference masks it. Here the division runs on
      max(exp, 1) and the entry is masked explicitly. With the constants from `constants()`,
      z >= 1 on the whole split range at each of 200,000 scales checked between 0.004 and
      1.6, so the guard is not expected to apply outside hand-made constants.
    - The reference divides in floating point, float32 by default. For sum < 2^52 a float64
      quotient rounds to the same integer as the exact one, but float32 can round large
      quotients differently (the reference vectors show no such case).
    """

    op = "softmax"
    family = "fqvit"
    name = "fqvit"
    paper = PAPER
    onnx_function = fqvit_onnx.FQViTLogIntSoftmax

    N = IBertSoftmax.N
    LOG_BITS = (4, 6, 8)
    # Scale exponent of the linear output codes, per log_bits.
    LINEAR_SHIFT = {4: 15, 6: 30, 8: 30}
    # Maximum length of the table of codes per ratio (`ratio_table`). log_bits 4 needs 49,153 entries.
    RATIO_TABLE_LIMIT = 2**17

    def constants(self, site_input: SiteInput, **options: Any) -> SchemeConstants:
        options.pop("output_bits", None)
        log_bits = int(options.pop("log_bits", 4))
        if options:
            raise ValueError(f"invalid options for softmax 'fqvit': {sorted(options)}; "
                             f"the options are log_bits and output_bits (ignored)")
        if log_bits not in self.LOG_BITS:
            raise ValueError(f"softmax 'fqvit' log_bits must be one of {self.LOG_BITS}, got {log_bits}")

        s = site_input.scale
        x0_int = math.floor(IBertSoftmax.X0 / s)
        b_int = math.floor(IBertSoftmax.COEF[1] / s)
        c_int = math.floor(IBertSoftmax.COEF[2] / s**2)
        if c_int < 1:
            raise ValueError(f"input scale {s} is too coarse for the I-BERT exp polynomial (c_int = {c_int}); "
                             f"use a scale below 1.6")
        exp_sum_bound = site_input.length * (c_int << self.N)
        if exp_sum_bound >= EXP_SUM_LIMIT:
            raise ValueError(
                f"softmax 'fqvit': a row of {site_input.length} exponentials of up to c_int * 2^30 = "
                f"{c_int << self.N} can sum past 2^62, beyond the integer log2 of the lowering; "
                f"use a coarser input scale (above about {math.sqrt(IBertSoftmax.COEF[2] * site_input.length * 2.0**-32):.3g})"
            )
        linear_shift = self.LINEAR_SHIFT[log_bits]
        values = {
            "x0_int": x0_int,
            "d_min": self.N * x0_int,
            "b_int": b_int,
            "c_int": c_int,
            "log_bits": log_bits,
            "linear_shift": linear_shift,
        }
        return SchemeConstants(values, output_scale=2.0**-linear_shift, output_min=0,
                               output_max=2**linear_shift, site_input=site_input)

    def integer_exp(self, d: torch.Tensor, c: SchemeConstants) -> dict[str, torch.Tensor]:
        """Run I-BERT's i-exp on d = x - rowmax <= 0: the clamped d, z and exp = max(z 2^(30-q), 0)."""
        d = d.clamp(min=c["d_min"])
        quotient = floor_div(-d, -c["x0_int"])
        r = d - quotient * c["x0_int"]
        z = (r + c["b_int"]) * r + c["c_int"]
        exp = (z * (torch.ones_like(z) << (self.N - quotient))).clamp(min=0)
        return {"row_diff": d, "z": z, "exp": exp}

    def reference(self, q: torch.Tensor, c: SchemeConstants,
                  intermediates: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        steps = self.integer_exp(q - q.amax(dim=-1, keepdim=True), c)
        _record(intermediates, **steps)
        return self.normalize(steps["exp"], c, intermediates)

    def exp_table(self, c: SchemeConstants) -> np.ndarray:
        d = -torch.arange(2**c.site_input.bits, dtype=torch.int64)
        return self.integer_exp(d, c)["exp"].numpy()

    def normalize(self, exp: torch.Tensor, c: SchemeConstants,
                  intermediates: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        total = exp.sum(dim=-1, keepdim=True)
        ratio = round_div_half_even(total, exp.clamp(min=1))
        steps = self.codes_of_ratio(ratio, c)
        is_zero = steps["is_zero"] | (exp == 0)
        out = torch.where(exp == 0, torch.zeros_like(ratio), steps["output"])
        _record(intermediates, **steps, exp_sum=total, ratio=ratio)
        _record(intermediates, is_zero=is_zero.to(torch.int64), output=out)
        return out

    def codes_of_ratio(self, ratio: torch.Tensor, c: SchemeConstants) -> dict[str, torch.Tensor]:
        """Steps 4 and 5 for ratios >= 1 of entries whose exp is not 0: the rounded log2 k, the
        clamped qlog, whether k masks the entry (is_zero) and the output code."""
        floor_k = floor_log2(ratio)
        round_threshold = 3 * (torch.ones_like(floor_k) << floor_k)
        k = floor_k + (2 * ratio >= round_threshold).to(torch.int64)
        log_levels = 2 ** c["log_bits"]
        qlog = k.clamp(0, log_levels - 1)
        shift = c["linear_shift"]
        is_zero = k >= log_levels
        keep = ~is_zero & (qlog <= shift)
        out = torch.where(keep, torch.ones_like(qlog) << (shift - qlog).clamp(min=0), torch.zeros_like(qlog))
        return {"round_threshold": round_threshold, "log2": k, "qlog": qlog, "is_zero": is_zero, "output": out}

    def ratio_table(self, c: SchemeConstants) -> np.ndarray | None:
        """Output codes for the ratios 0, 1, ..., R, where every ratio from R on gives code 0,
        or None where R passes RATIO_TABLE_LIMIT (log_bits 6 and 8, whose R is 3 * 2^29).

        k never decreases as the ratio grows, and the code is 0 from the first k that masks,
        K = min(2^b - 1, N) + 1, on: so R is the first ratio with k = K, 3 * 2^(K - 2). Entry
        0 is never read (ratio >= 1) and is 0.
        """
        first_masked_k = min(2 ** c["log_bits"] - 1, c["linear_shift"]) + 1
        limit = 3 << (first_masked_k - 2)
        if limit > self.RATIO_TABLE_LIMIT:
            return None
        ratios = torch.arange(limit + 1, dtype=torch.int64)
        codes = self.codes_of_ratio(ratios.clamp(min=1), c)["output"]
        codes[0] = 0
        # The derivation of R above, checked: R is the first ratio whose code is 0.
        assert int(codes[limit]) == 0, f"ratio table: code of R = {limit} is not 0"
        assert int(codes[limit - 1]) != 0, f"ratio table: code of R - 1 = {limit - 1} is already 0"
        return codes.numpy()

    def bounds(self, c: SchemeConstants) -> dict[str, int]:
        length = c.site_input.length
        b_int, c_int = c["b_int"], c["c_int"]
        z_bound = max(c_int, b_int * b_int // 4 - c_int + 1)
        exp_sum_bound = length * (c_int << self.N)
        return {
            "row_diff": min(2**c.site_input.bits - 1, -c["d_min"]),
            "z": z_bound,
            # The ONNX lowering forms z * 2^(30-q) before the clamp at 0.
            "exp": z_bound << self.N,
            "exp_sum": exp_sum_bound,
            "ratio": exp_sum_bound,
            # 3 * 2^floor(log2 r) <= 3 r.
            "round_threshold": 3 * exp_sum_bound,
            "log2": exp_sum_bound.bit_length(),
            "qlog": 2 ** c["log_bits"] - 1,
            "is_zero": 1,
            "output": c.output_max,
        }

    def onnx_constant_inputs(self, c: SchemeConstants) -> list[np.ndarray]:
        return [_scalar(-c["x0_int"]), _scalar(c["d_min"]), _scalar(c["b_int"]), _scalar(c["c_int"]),
                _scalar(self.N), _scalar(c["linear_shift"]), _powers_input()]

    @staticmethod
    def float_op(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=-1)


def ptf_alphas(channel_absmax: np.ndarray, max_alpha: int, code_max: int) -> tuple[float, list[int]]:
    """Return the PTF base scale s and the smallest alpha_c in 0..max_alpha whose range covers each channel.

    s = max_c(absmax_c) / (2^max_alpha * code_max), so the widest channel needs alpha = max_alpha
    and channel c covers [-s 2^alpha_c code_max, s 2^alpha_c code_max].
    """
    global_max = float(np.max(channel_absmax))
    base_scale = global_max / (2**max_alpha * code_max)
    alphas = []
    for absmax in channel_absmax:
        alpha = next((a for a in range(max_alpha) if absmax <= base_scale * 2**a * code_max), max_alpha)
        alphas.append(alpha)
    return base_scale, alphas


@register
class FQViTLayerNorm(Scheme):
    """FQ-ViT LayerNorm with power-of-two factors (PTF), as an integer LayerNorm without affine.

    Calibration gives max |x| per channel. With K = 3 and 8-bit PTF codes (code max 127),
    the base scale is s = max_c(max |x_c|) / (2^K 127), and channel c gets the smallest
    alpha_c in 0..K for which s 2^alpha_c 127 covers its max |x_c|.

    Integer steps on the site's input codes x (scale S_in):
    1. x8_c = clamp(round_half_up(x_c S_in / (s 2^alpha_c)), -128, 127), with S_in / s as a
       dyadic m / 2^shift and channel c rounding by 2^(shift + alpha_c).
    2. xs_c = x8_c 2^alpha_c: every channel on the common grid s (|xs| <= 128 2^K).
    3. y = xs - round_half_up(mean(xs)), var = sum(y^2), std = floor(sqrt(var)) by I-BERT's
       integer Newton iteration, factor = floor((2^31 - 1) / std), n = floor(y factor / 2).
    The output contract is that of the other LayerNorm schemes: n at scale sqrt(C) / 2^30,
    and the caller applies gamma and beta.

    The dyadic multiplier m has 31 - bits significant bits (at least 15), so |x m| < 2^30
    for inputs of up to 16 bits and the requantization fits int32. Its relative error of at
    most 2^-15 moves x8 only where x S_in / (s 2^alpha_c) lies within 2^-8 of a rounding tie.
    The numerator 2^31 - 1 (I-ViT's) keeps |y factor| below 2^31.

    Differences from the reference:
    - alpha_c: the reference picks the alpha with the smallest L2 error of the fake-quantized
      calibration data. HNQ keeps only max |x_c| per channel, so it takes the smallest alpha
      that covers the channel's range without clipping.
    - PTF codes are symmetric signed 8-bit with no zero point; the reference quantizes to
      asymmetric uint8 with a zero point computed from the coarsest scale.
    - The reference computes the mean and the standard deviation in floating point with a
      float square root, so its LayerNorm is not integer-only (megvii-research/FQ-ViT
      issues 22 and 42). Here both are integer: the half-up integer mean and I-BERT's
      Newton square root.
    - The reference folds gamma / (std s_out) into an 8-bit mantissa per token. Here n has a
      fixed scale and the site applies gamma and beta with its per-channel dyadic.
    - A row with zero variance makes the reference divide by std = 0 and return NaN
      (megvii-research/FQ-ViT issue 31). Here y = 0 on that row and n = 0 (the caller then outputs beta); the
      square root runs on max(var, 1).
    """

    op = "layernorm"
    family = "fqvit"
    name = "fqvit"
    paper = PAPER
    calibration = ("channel_absmax",)
    onnx_function = fqvit_onnx.FQViTLayerNorm

    MAX_ALPHA = 3
    PTF_BITS = 8
    NUMERATOR = INT32_MAX
    MIN_MULTIPLIER_BITS = 15

    def __init__(self) -> None:
        self._sqrt = IBertLayerNorm()

    def constants(self, site_input: SiteInput, **options: Any) -> SchemeConstants:
        channel_absmax = options.pop("channel_absmax", None)
        if options:
            raise ValueError(f"invalid options for layernorm 'fqvit': {sorted(options)}; it takes channel_absmax")
        if channel_absmax is None:
            raise ValueError("layernorm 'fqvit' needs channel_absmax (max |x| per channel): calibrate the site first")
        channel_absmax = np.asarray(channel_absmax, dtype=np.float64).reshape(-1)
        length = site_input.length
        if channel_absmax.shape != (length,):
            raise ValueError(f"layernorm 'fqvit': channel_absmax has {channel_absmax.size} entries "
                             f"for a site with {length} channels")
        if not np.all(np.isfinite(channel_absmax)) or np.any(channel_absmax < 0) or not np.any(channel_absmax > 0):
            raise ValueError("layernorm 'fqvit': channel_absmax must be finite, non-negative and not all zero")

        code_max = 2 ** (self.PTF_BITS - 1) - 1
        base_scale, alphas = ptf_alphas(channel_absmax, self.MAX_ALPHA, code_max)
        multiplier_bits = max(self.MIN_MULTIPLIER_BITS, 31 - site_input.bits)
        ratio = dyadic(site_input.scale / base_scale, multiplier_bits=multiplier_bits)
        if ratio.shift + self.MAX_ALPHA > 62:
            raise ValueError(f"layernorm 'fqvit': input scale {site_input.scale} is too fine for the PTF "
                             f"base scale {base_scale} (rounding shift {ratio.shift + self.MAX_ALPHA} exceeds 62)")

        alpha_max = max(alphas)
        common_range = (2**self.PTF_BITS - 1) << alpha_max
        variance_bound = length * (common_range**2 + 1) // 4
        values = {
            "length": length,
            "numerator": self.NUMERATOR,
            "alpha": tuple(alphas),
            "alpha_max": alpha_max,
            "requant_multiplier": ratio.multiplier,
            "requant_shift": ratio.shift,
            "code_min": -(code_max + 1),
            "code_max": code_max,
            "variance_bound": variance_bound,
        }
        return SchemeConstants(values, output_scale=math.sqrt(length) / 2**30, output_min=-(2**30),
                               output_max=2**30, site_input=site_input)

    def _channel_tensors(self, c: SchemeConstants, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = torch.tensor(c["alpha"], dtype=torch.int64, device=device)
        return alpha, c["requant_shift"] + alpha

    def reference(self, q: torch.Tensor, c: SchemeConstants,
                  intermediates: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        alpha, shifts = self._channel_tensors(c, q.device)
        divisor = torch.ones_like(shifts) << shifts
        requant_sum = q * c["requant_multiplier"] + (divisor >> 1)
        x8 = (requant_sum >> shifts).clamp(c["code_min"], c["code_max"])
        common = x8 << alpha

        total, _, y, var = layernorm_statistics(common)
        start, std = self._sqrt.integer_sqrt(var.clamp(min=1))
        factor = floor_div(torch.full_like(std, c["numerator"]), std)
        product = y * factor
        out = product >> 1
        _record(intermediates, requant_divisor=divisor.expand_as(q), requant_sum=requant_sum, ptf_codes=x8,
                common_codes=common, row_sum=total, centered=y, variance=var, sqrt_start=start, std=std,
                factor=factor, product=product, output=out)
        return out

    def bounds(self, c: SchemeConstants) -> dict[str, int]:
        spec = c.site_input
        alpha_max = c["alpha_max"]
        shift_max = c["requant_shift"] + alpha_max
        var_bound = c["variance_bound"]
        common_bound = (c["code_max"] + 1) << alpha_max
        return {
            "requant_divisor": 1 << shift_max,
            "requant_sum": -spec.code_min * c["requant_multiplier"] + (1 << shift_max >> 1),
            "ptf_codes": c["code_max"] + 1,
            "common_codes": common_bound,
            "row_sum": spec.length * common_bound,
            "centered": (2**self.PTF_BITS - 1) << alpha_max,
            "variance": var_bound,
            "sqrt_start": 1 << ((max(var_bound, 1).bit_length() + 1) // 2),
            "std": math.isqrt(var_bound),
            "factor": c["numerator"],
            # |y| <= isqrt(sum y^2) = std, so |y * floor(N/std)| <= N.
            "product": c["numerator"],
            "output": 2**30,
        }

    def onnx_constant_inputs(self, c: SchemeConstants) -> list[np.ndarray]:
        alpha = np.array(c["alpha"], dtype=np.int64)
        divisors = np.left_shift(np.int64(1), c["requant_shift"] + alpha)
        # powers[i] = 2^i for 2^i <= the variance bound (at least 2^0 and 2^1): enough for an
        # exact BitLength of var and for the square-root start at index ceil(bits/2), and
        # below 2^31 whenever the variance bound is.
        var_bits = max(c["variance_bound"], 1).bit_length()
        powers = np.array([1 << i for i in range(max(var_bits, 2))], dtype=np.int64)
        return [_scalar(c["requant_multiplier"]), divisors, _scalar(c["code_min"]), _scalar(c["code_max"]),
                np.left_shift(np.int64(1), alpha), _scalar(c["length"]), _scalar(c["numerator"]), powers]

    @staticmethod
    def float_op(x: torch.Tensor) -> torch.Tensor:
        return layernorm_float(x)
