"""ONNX lowerings of the I-BERT schemes in `hnq.schemes.ibert`, in domain `hnq` version 1.

Each function takes int64 codes `x` followed by the int64 constant tensors that
`Scheme.onnx_constant_inputs` returns, in the same order, and equals the torch reference
code for code. Every divisor is a positive constant or a positive row statistic. Integer
`Div` truncates toward zero, which is floor division for a non-negative dividend, so
signed dividends go through `FloorDiv`.
"""

from __future__ import annotations

from onnxscript import opset18 as op
from onnxscript import script

from .common import BitLength, FloorDiv, IntegerSqrt, NewtonSqrtStep, RoundShift, T, hnq


@script(hnq, default_opset=op)
def IBertSoftmax(x: T, x0_abs: T, d_min: T, b: T, c: T, m: T, shift_base: T, q_cap: T,
                 max_code16: T, numerator: T, out_divisor: T, out_max: T, powers: T) -> T:
    """I-BERT softmax: polynomial exp after a ln 2 split, 16-bit requantization, 2^32/sum."""
    axes = op.Constant(value_ints=[-1])
    zero = op.CastLike(op.Constant(value_int=0), x)
    d = op.Max(op.Sub(x, op.ReduceMax(x, axes, keepdims=1)), d_min)
    # d <= 0 and x0 < 0, so floor(d / x0) = trunc(-d / |x0|).
    q = op.Div(op.Neg(d), x0_abs)
    r = op.Add(d, op.Mul(q, x0_abs))
    z = op.Add(op.Mul(op.Add(r, b), r), c)
    # exp16 = round(z * 2^(30-q) * 32767 / (c * 2^30)); q is capped where the result is 0 anyway.
    shift = op.Gather(powers, op.Add(shift_base, op.Min(q, q_cap)))
    exp16 = op.Min(op.Max(RoundShift(op.Mul(z, m), shift), zero), max_code16)
    total = op.ReduceSum(exp16, axes, keepdims=1)
    factor = op.Div(numerator, total)
    return op.Min(op.Div(op.Mul(exp16, factor), out_divisor), out_max)


@script(hnq, default_opset=op)
def IBertGELU(x: T, b_neg: T, b: T, c: T, sigmoid_divisor: T, shift: T) -> T:
    """I-BERT i-GELU: x * (erf polynomial + 1), codes negated so the output scale is positive."""
    clipped = op.Min(op.Abs(x), b_neg)
    base = op.Add(clipped, b)
    y = op.Mul(op.Sign(x), op.Add(op.Mul(base, base), c))
    sigmoid = FloorDiv(y, sigmoid_divisor)
    return op.Neg(op.Mul(x, op.Add(sigmoid, shift)))


@script(hnq, default_opset=op)
def IBertLayerNorm(x: T, length: T, numerator: T, powers: T) -> T:
    """I-BERT integer LayerNorm without affine: floor((x - mean) * floor(2^31/isqrt(var)) / 2)."""
    axes = op.Constant(value_ints=[-1])
    one = op.CastLike(op.Constant(value_int=1), x)
    two = op.CastLike(op.Constant(value_int=2), x)
    # Half-up mean: floor((2*sum + C) / (2*C)).
    total = op.ReduceSum(x, axes, keepdims=1)
    mean = FloorDiv(op.Add(op.Mul(total, two), length), op.Mul(length, two))
    y = op.Sub(x, mean)
    var = op.Max(op.ReduceSum(op.Mul(y, y), axes, keepdims=1), one)
    factor = op.Div(numerator, IntegerSqrt(var, powers))
    return FloorDiv(op.Mul(y, factor), two)


FUNCTIONS = (IBertSoftmax, IBertGELU, IBertLayerNorm, FloorDiv, RoundShift, BitLength, NewtonSqrtStep,
             IntegerSqrt)
