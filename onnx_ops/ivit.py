"""ONNX lowerings of the I-ViT schemes in `hnq.schemes.ivit`, in domain `hnq` version 1.

Each function takes int64 codes `x` followed by the int64 constant tensors that
`Scheme.onnx_constant_inputs` returns, in the same order, and equals the torch reference
code for code. Shifts of signed values are `FloorDiv` by powers of two; `Div` is used
directly only on non-negative dividends with positive divisors.
"""

from __future__ import annotations

from onnxscript import opset18 as op
from onnxscript import script

from .common import FloorDiv, NewtonSqrtStep, T, hnq


@script(hnq, default_opset=op)
def ShiftExp(t: T, x0_abs: T, t_min: T, n: T, shift_cap: T, powers: T) -> T:
    """I-ViT shift exponential of t (codes of t*S): 2^(n-q) (r/2 - x0) with t*log2(e) = q x0 + r."""
    two = op.CastLike(op.Constant(value_int=2), t)
    sixteen = op.CastLike(op.Constant(value_int=16), t)
    # t * 1.0111b = t + floor(t/2) - floor(t/16)
    t = op.Sub(op.Add(t, FloorDiv(t, two)), FloorDiv(t, sixteen))
    t = op.Max(t, t_min)
    # q = floor(t / x0) with x0 = -x0_abs < 0; r = t - q x0 lies in (x0, 0].
    q = FloorDiv(op.Neg(t), x0_abs)
    r = op.Add(t, op.Mul(q, x0_abs))
    shift = op.Min(op.Sub(n, q), shift_cap)
    return op.Div(op.Mul(op.Add(r, op.Mul(x0_abs, two)), op.Gather(powers, shift)), two)


@script(hnq, default_opset=op)
def IViTShiftmax(x: T, x0_abs: T, t_min: T, n: T, sum_max: T, out_divisor: T, out_max: T,
                 powers: T) -> T:
    """I-ViT Shiftmax: shift exponential (n = 15), factor = floor((2^31-1)/sum)."""
    axes = op.Constant(value_ints=[-1])
    e = ShiftExp(op.Sub(x, op.ReduceMax(x, axes, keepdims=1)), x0_abs, t_min, n, n, powers)
    total = op.Min(op.ReduceSum(e, axes, keepdims=1), sum_max)
    factor = op.Div(sum_max, total)
    return op.Min(op.Div(op.Mul(e, factor), out_divisor), out_max)


@script(hnq, default_opset=op)
def ShiftSigmoid(x: T, y: T, x0_abs: T, t_min: T, n: T, shift_cap: T, sum_max: T,
                 sigmoid_divisor: T, sigmoid_max: T, powers: T) -> T:
    """x * sigmoid(y) with sigmoid(y) = e^(y-m) / (e^(y-m) + e^(-m)), m the row maximum of y."""
    axes = op.Constant(value_ints=[-1])
    y_max = op.ReduceMax(y, axes, keepdims=1)
    e_x = ShiftExp(op.Sub(y, y_max), x0_abs, t_min, n, shift_cap, powers)
    e_neg_max = ShiftExp(op.Neg(y_max), x0_abs, t_min, n, shift_cap, powers)
    total = op.Min(op.Add(e_x, e_neg_max), sum_max)
    factor = op.Div(sum_max, total)
    sigmoid = op.Min(op.Div(op.Mul(e_x, factor), sigmoid_divisor), sigmoid_max)
    return op.Mul(x, sigmoid)


@script(hnq, default_opset=op)
def IViTShiftGELU(x: T, x0_abs: T, t_min: T, n: T, shift_cap: T, sum_max: T,
                  sigmoid_divisor: T, sigmoid_max: T, powers: T) -> T:
    """I-ViT ShiftGELU with 1.702 folded into the input scale: x * sigmoid(x) at scale 1.702 S."""
    return ShiftSigmoid(x, x, x0_abs, t_min, n, shift_cap, sum_max, sigmoid_divisor, sigmoid_max, powers)


@script(hnq, default_opset=op)
def IViTShiftGELUShiftChain(x: T, x0_abs: T, t_min: T, n: T, shift_cap: T, sum_max: T,
                            sigmoid_divisor: T, sigmoid_max: T, powers: T) -> T:
    """I-ViT ShiftGELU with 1.702 as the shift chain x + x>>1 + x>>3 + x>>4 = 1.6875 x."""
    two = op.CastLike(op.Constant(value_int=2), x)
    eight = op.CastLike(op.Constant(value_int=8), x)
    sixteen = op.CastLike(op.Constant(value_int=16), x)
    y = op.Add(op.Add(op.Add(x, FloorDiv(x, two)), FloorDiv(x, eight)), FloorDiv(x, sixteen))
    return ShiftSigmoid(x, y, x0_abs, t_min, n, shift_cap, sum_max, sigmoid_divisor, sigmoid_max, powers)


@script(hnq, default_opset=op)
def IViTLayerNorm(x: T, length: T, numerator: T, start: T) -> T:
    """I-LayerNorm without affine: floor((x - mean) * floor((2^31-1)/isqrt(var)) / 2)."""
    axes = op.Constant(value_ints=[-1])
    one = op.CastLike(op.Constant(value_int=1), x)
    two = op.CastLike(op.Constant(value_int=2), x)
    total = op.ReduceSum(x, axes, keepdims=1)
    mean = FloorDiv(op.Add(op.Mul(total, two), length), op.Mul(length, two))
    y = op.Sub(x, mean)
    var = op.Max(op.ReduceSum(op.Mul(y, y), axes, keepdims=1), one)
    # A plain Newton step from 2^16 lands at or above isqrt(var); 19 monotone steps follow
    # (the step count is proven in hnq.schemes.ivit.IViTLayerNorm).
    std = op.Div(op.Add(start, op.Div(var, start)), two)
    std = NewtonSqrtStep(std, var)
    std = NewtonSqrtStep(std, var)
    std = NewtonSqrtStep(std, var)
    std = NewtonSqrtStep(std, var)
    std = NewtonSqrtStep(std, var)
    std = NewtonSqrtStep(std, var)
    std = NewtonSqrtStep(std, var)
    std = NewtonSqrtStep(std, var)
    std = NewtonSqrtStep(std, var)
    std = NewtonSqrtStep(std, var)
    std = NewtonSqrtStep(std, var)
    std = NewtonSqrtStep(std, var)
    std = NewtonSqrtStep(std, var)
    std = NewtonSqrtStep(std, var)
    std = NewtonSqrtStep(std, var)
    std = NewtonSqrtStep(std, var)
    std = NewtonSqrtStep(std, var)
    std = NewtonSqrtStep(std, var)
    std = NewtonSqrtStep(std, var)
    factor = op.Div(numerator, std)
    return FloorDiv(op.Mul(y, factor), two)


FUNCTIONS = (IViTShiftmax, IViTShiftGELU, IViTShiftGELUShiftChain, IViTLayerNorm,
             ShiftExp, ShiftSigmoid, FloorDiv, NewtonSqrtStep)
