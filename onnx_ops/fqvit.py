"""ONNX lowerings of the FQ-ViT schemes in `hnq.schemes.fqvit`, in domain `hnq` version 1.

Each function takes codes `x` followed by the constant tensors that
`Scheme.onnx_constant_inputs` returns, in the same order, and equals the torch reference
code for code. Every function is polymorphic in the integer type T: constants are built
with CastLike, and `Div` runs only on non-negative dividends with positive divisors
unless it goes through `FloorDiv`.
"""

from __future__ import annotations

from onnxscript import opset18 as op
from onnxscript import script

from .common import BitLength, FloorDiv, FloorLog2, IntegerSqrt, NewtonSqrtStep, RoundDivHalfEven, T, hnq


@script(hnq, default_opset=op)
def FQViTLogIntSoftmax(x: T, x0_abs: T, d_min: T, b: T, c: T, n: T, linear_shift: T, powers: T) -> T:
    """FQ-ViT Log-Int-Softmax as linear codes 2^(N - k) at scale 2^-N, N = linear_shift.

    k is the rounded log2 of round(sum / exp). The reference's clamp of k to 2^b - 1 and its
    mask for k >= 2^b reduce to "code 0 where k > N", because N <= 2^b - 1 for every
    supported b, so the function needs no log_bits input.
    """
    axes = op.Constant(value_ints=[-1])
    zero = op.CastLike(op.Constant(value_int=0), x)
    one = op.CastLike(op.Constant(value_int=1), x)
    two = op.CastLike(op.Constant(value_int=2), x)
    three = op.CastLike(op.Constant(value_int=3), x)
    # I-BERT i-exp: d = q x0 + r, z = (r + b) r + c, exp = max(z * 2^(n - q), 0).
    d = op.Max(op.Sub(x, op.ReduceMax(x, axes, keepdims=1)), d_min)
    q = op.Div(op.Neg(d), x0_abs)
    r = op.Add(d, op.Mul(q, x0_abs))
    z = op.Add(op.Mul(op.Add(r, b), r), c)
    exp = op.Max(op.Mul(z, op.Gather(powers, op.Sub(n, q))), zero)
    # ReduceSum on int64 accumulates in float64, exact only below 2^53, while a row's sum
    # reaches 2^62. Summing the high and low 26 bits apart keeps each partial sum below
    # 2^53 for rows up to 2^27 entries (high parts are at most 2^36), and the int64
    # recombination is exact.
    low_span = op.CastLike(op.Constant(value_int=2**26), x)
    high = op.Div(exp, low_span)
    low = op.Sub(exp, op.Mul(high, low_span))
    total = op.Add(op.Mul(op.ReduceSum(high, axes, keepdims=1), low_span), op.ReduceSum(low, axes, keepdims=1))
    # An entry with exp = 0 is masked, as the reference's division by zero does.
    ratio = RoundDivHalfEven(total, op.Max(exp, one))
    floor_k = FloorLog2(ratio, powers)
    k = op.Add(floor_k, op.CastLike(op.GreaterOrEqual(op.Mul(ratio, two), op.Mul(op.Gather(powers, floor_k), three)), x))
    keep = op.Mul(op.CastLike(op.Greater(exp, zero), x), op.CastLike(op.LessOrEqual(k, linear_shift), x))
    return op.Mul(op.Gather(powers, op.Max(op.Sub(linear_shift, k), zero)), keep)


@script(hnq, default_opset=op)
def FQViTLayerNorm(x: T, multiplier: T, divisors: T, code_min: T, code_max: T, alpha_scale: T,
                   length: T, numerator: T, powers: T) -> T:
    """PTF LayerNorm without affine: per-channel 8-bit requantization, shift to the common grid,
    then floor((xs - mean) * floor((2^31-1)/isqrt(var)) / 2)."""
    axes = op.Constant(value_ints=[-1])
    one = op.CastLike(op.Constant(value_int=1), x)
    two = op.CastLike(op.Constant(value_int=2), x)
    # Half-up rounding by the per-channel power of two 2^(shift + alpha_c), then 2^alpha_c.
    rounded = FloorDiv(op.Add(op.Mul(x, multiplier), op.Div(divisors, two)), divisors)
    common = op.Mul(op.Min(op.Max(rounded, code_min), code_max), alpha_scale)
    total = op.ReduceSum(common, axes, keepdims=1)
    mean = FloorDiv(op.Add(op.Mul(total, two), length), op.Mul(length, two))
    y = op.Sub(common, mean)
    var = op.Max(op.ReduceSum(op.Mul(y, y), axes, keepdims=1), one)
    factor = op.Div(numerator, IntegerSqrt(var, powers))
    return FloorDiv(op.Mul(y, factor), two)


FUNCTIONS = (FQViTLogIntSoftmax, FQViTLayerNorm, FloorDiv, FloorLog2, RoundDivHalfEven, BitLength, NewtonSqrtStep,
             IntegerSqrt)
