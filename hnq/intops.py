"""Integer arithmetic shared by every HNQ integer reference.

Every function here takes and returns int32/int64 torch tensors and uses only integer
operators (`>>`, `<<`, `*`, `+`, floor division), so results are exact and equal to the
ONNX lowerings in `onnx_ops.common`. Rounding is half-up everywhere:
`round_shift(x, s) = floor((x + 2^(s-1)) / 2^s)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

# Multipliers of a dyadic requantization lie in [2^30, 2^31), so they carry 31 significant
# bits and a product with an int32 code stays below 2^62.
DYADIC_MULTIPLIER_BITS = 31

# Integers below 2^53 are exact in float64, and so are their products by powers of two, sums
# and differences that stay below it. Two routes rest on this: the float64 matmul of int8
# codes (nn.exact_int_matmul) and the CPU lowering of requantization (GraphBuilder.requantize_sum).
FLOAT64_EXACT_LIMIT = 2**53


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    """Return the (min, max) code of a `bits`-wide integer."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def clamp_to_bits(q: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    lo, hi = code_range(bits, signed)
    return q.clamp(lo, hi)


def shift_right_floor(x: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Arithmetic right shift, i.e. floor(x / 2^k), for k >= 0."""
    return x >> k


def round_shift(x: torch.Tensor, s: int | torch.Tensor) -> torch.Tensor:
    """floor(x / 2^s + 1/2) for s >= 1 (round half up); x must leave room for 2^(s-1)."""
    if isinstance(s, int):
        if s == 0:
            return x
        return (x + (1 << (s - 1))) >> s
    half = torch.where(s > 0, torch.ones_like(s) << (s - 1).clamp(min=0), torch.zeros_like(s))
    return (x + half) >> s


def floor_div(x: torch.Tensor, d: int | torch.Tensor) -> torch.Tensor:
    """floor(x / d) for a positive integer divisor d."""
    return torch.div(x, d, rounding_mode="floor")


@dataclass(frozen=True)
class Dyadic:
    """A positive real r represented as m / 2^s with integers m and s."""

    multiplier: int
    shift: int

    @property
    def value(self) -> float:
        return self.multiplier / 2.0**self.shift


def dyadic(ratio: float, multiplier_bits: int = DYADIC_MULTIPLIER_BITS, max_shift: int = 62) -> Dyadic:
    """Approximate a positive ratio by m / 2^s, m in [2^(bits-1), 2^bits).

    The multiplier is rounded half up from the float64 mantissa, as I-BERT's and I-ViT's
    `batch_frexp` do. Ratios too small for `max_shift` lose mantissa bits; a ratio below
    2^-max_shift becomes zero.
    """
    if not math.isfinite(ratio) or ratio < 0:
        raise ValueError(f"dyadic ratio must be finite and non-negative, got {ratio!r}")
    if ratio == 0:
        return Dyadic(0, 0)
    mantissa, exponent = math.frexp(ratio)  # ratio = mantissa * 2^exponent, mantissa in [0.5, 1)
    multiplier = math.floor(mantissa * 2**multiplier_bits + 0.5)
    shift = multiplier_bits - exponent
    if multiplier == 2**multiplier_bits:  # the mantissa rounded up to the next power of two
        multiplier //= 2
        shift -= 1
    if shift < 0:
        raise ValueError(f"dyadic ratio {ratio!r} is too large: it needs a left shift of {-shift} bits")
    if shift > max_shift:
        drop = shift - max_shift
        multiplier = (multiplier + (1 << (drop - 1))) >> drop
        shift = max_shift
    return Dyadic(int(multiplier), int(shift))


def requantize(q: torch.Tensor, d: Dyadic, bits: int, signed: bool = True) -> torch.Tensor:
    """Rescale integer codes by d (half-up rounding) and clamp them to `bits`.

    Works in int64: |q| < 2^31 and m < 2^31 keep q*m + 2^(s-1) below 2^63.
    """
    y = round_shift(q.to(torch.int64) * d.multiplier, d.shift)
    return clamp_to_bits(y, bits, signed)


def requantize_per_channel(q: torch.Tensor, multipliers: torch.Tensor, shifts: torch.Tensor,
                           bits: int, signed: bool = True, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Rescale codes whose last axis has one dyadic (m_c, s_c) each, then clamp to `bits`.

    `offsets` (already scaled by 2^s_c) is added before the rounding shift; the caller
    guarantees |q*m + offset| < 2^62.
    """
    y = q.to(torch.int64) * multipliers
    if offsets is not None:
        y = y + offsets
    y = round_shift(y, shifts)
    return clamp_to_bits(y, bits, signed)


# Powers of two 2^0 .. 2^62: the exact shift table and bit-length thresholds for int64 values.
POWERS_OF_TWO = tuple(1 << i for i in range(63))


def bit_length(v: torch.Tensor) -> torch.Tensor:
    """Number of bits of each non-negative v < 2^63, counted as #{i : 2^i <= v}.

    Counting comparisons against the powers of two is how the ONNX lowering gets it too.
    """
    powers = torch.tensor(POWERS_OF_TWO, dtype=torch.int64, device=v.device)
    return (v.unsqueeze(-1) >= powers).sum(dim=-1)


def isqrt_newton_steps(v: torch.Tensor, x: torch.Tensor, steps: int) -> torch.Tensor:
    """Run `steps` Newton steps x <- min(x, floor((x + floor(v/x)) / 2)) for v >= 1.

    For a start x >= floor(sqrt(v)) every iterate stays >= floor(sqrt(v)), the sequence
    decreases until it reaches floor(sqrt(v)), and the min makes later steps no-ops. The
    caller proves that `steps` suffices for its start and range of v.
    """
    for _ in range(steps):
        x = torch.minimum(x, floor_div(x + floor_div(v, x), 2))
    return x


def floor_log2(v: torch.Tensor) -> torch.Tensor:
    """floor(log2 v) for 1 <= v < 2^62, by a binary search over the bit positions.

    Six comparisons per element, as in the ONNX lowering `onnx_ops.common.FloorLog2`;
    `bit_length` would compare against all 63 powers of two.
    """
    k = torch.zeros_like(v)
    for step in (32, 16, 8, 4, 2, 1):
        k = k + step * ((v >> (k + step)) > 0).to(v.dtype)
    return k


def round_div_half_even(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """round(numerator / denominator) with ties to even, for numerator >= 0 and denominator >= 1.

    This is `torch.round` (half to even) on the exact quotient.
    """
    quotient = floor_div(numerator, denominator)
    twice_remainder = 2 * (numerator - quotient * denominator)
    odd = quotient & 1
    round_up = (twice_remainder > denominator) | ((twice_remainder == denominator) & (odd == 1))
    return quotient + round_up.to(quotient.dtype)
