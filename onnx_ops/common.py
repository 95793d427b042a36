"""ONNX lowerings of the integer helpers in `hnq.intops`, as `hnq`-domain functions.

Every function is an onnxscript function in domain `hnq`, version 1, on default opset 18,
and uses only ops that onnxruntime implements for int32/int64 on CPU and CUDA
(Div, Mul, Add, Sub, Less, Cast, Max, Min, Pow of two, ReduceMax). Integer `Div` truncates
toward zero in ONNX, so floor division adds the correction `- (x < q*d)`; `BitShift`
takes unsigned types only, so shifts are divisions by powers of two.
"""

from __future__ import annotations

from typing import TypeVar

from onnxscript import opset18 as op
from onnxscript import script, values
from onnxscript.onnx_types import TensorType

OPSET_VERSION = 18
IR_VERSION = 10
HNQ_DOMAIN = "hnq"
hnq = values.Opset(HNQ_DOMAIN, 1)

T = TypeVar("T", bound=TensorType)


@script(hnq, default_opset=op)
def FloorDiv(x: T, d: T) -> T:
    """floor(x / d) for d > 0; exact over the whole int32/int64 range because |q*d| <= |x|."""
    q = op.Div(x, d)
    return op.Sub(q, op.CastLike(op.Less(x, op.Mul(q, d)), x))


@script(hnq, default_opset=op)
def RoundShift(x: T, p: T) -> T:
    """floor(x / p + 1/2) for p = 2^s >= 2, i.e. a right shift by s that rounds half up."""
    half = op.Div(p, op.CastLike(op.Constant(value_int=2), x))
    return FloorDiv(op.Add(x, half), p)


@script(hnq, default_opset=op)
def Requantize(x: T, m: T, p: T, lo: T, hi: T) -> T:
    """clamp(round_half_up(x * m / p), lo, hi) with p a power of two; x, m int64."""
    return op.Min(op.Max(RoundShift(op.Mul(x, m), p), lo), hi)


COMMON_FUNCTIONS = (FloorDiv, RoundShift, Requantize)


@script(hnq, default_opset=op)
def BitLength(v: T, powers: T) -> T:
    """Return the bit length of each v >= 0 as #{i : powers[i] <= v}, with powers[i] = 2^i."""
    above = op.CastLike(op.GreaterOrEqual(op.Unsqueeze(v, op.Constant(value_ints=[-1])), powers), v)
    return op.ReduceSum(above, op.Constant(value_ints=[-1]), keepdims=0)


@script(hnq, default_opset=op)
def NewtonSqrtStep(x: T, v: T) -> T:
    """min(x, floor((x + floor(v/x)) / 2)) for x >= 1, v >= 0: one monotone integer Newton step."""
    two = op.CastLike(op.Constant(value_int=2), x)
    return op.Min(x, op.Div(op.Add(x, op.Div(v, x)), two))


@script(hnq, default_opset=op)
def IntegerSqrt(v: T, powers: T) -> T:
    """floor(sqrt(v)) for 1 <= v < 2^62, with powers[i] = 2^i.

    The start 2^ceil(bits(v)/2) is at least sqrt(v), and six monotone Newton steps reach
    the integer square root from there (the proof is in hnq.schemes.ibert.IBertLayerNorm).
    """
    one = op.CastLike(op.Constant(value_int=1), v)
    two = op.CastLike(op.Constant(value_int=2), v)
    root = op.Gather(powers, op.Div(op.Add(BitLength(v, powers), one), two))
    root = NewtonSqrtStep(root, v)
    root = NewtonSqrtStep(root, v)
    root = NewtonSqrtStep(root, v)
    root = NewtonSqrtStep(root, v)
    root = NewtonSqrtStep(root, v)
    return NewtonSqrtStep(root, v)


COMMON_FUNCTIONS = COMMON_FUNCTIONS + (BitLength, NewtonSqrtStep, IntegerSqrt)


@script(hnq, default_opset=op)
def FloorLog2(v: T, powers: T) -> T:
    """floor(log2 v) for 1 <= v < 2^62 by binary search, with powers[i] = 2^i for i = 0..62.

    Each step tests v >= 2^(k + step). The index k + step reaches 63 only in the last step
    with k = 62, that is for v >= 2^62, so capping it at 62 changes nothing for v < 2^62.
    """
    top = op.CastLike(op.Constant(value_int=62), v)
    step = op.CastLike(op.Constant(value_int=32), v)
    k = op.Mul(op.CastLike(op.GreaterOrEqual(v, op.Gather(powers, step)), v), step)
    step = op.CastLike(op.Constant(value_int=16), v)
    k = op.Add(k, op.Mul(op.CastLike(op.GreaterOrEqual(v, op.Gather(powers, op.Min(op.Add(k, step), top))), v), step))
    step = op.CastLike(op.Constant(value_int=8), v)
    k = op.Add(k, op.Mul(op.CastLike(op.GreaterOrEqual(v, op.Gather(powers, op.Min(op.Add(k, step), top))), v), step))
    step = op.CastLike(op.Constant(value_int=4), v)
    k = op.Add(k, op.Mul(op.CastLike(op.GreaterOrEqual(v, op.Gather(powers, op.Min(op.Add(k, step), top))), v), step))
    step = op.CastLike(op.Constant(value_int=2), v)
    k = op.Add(k, op.Mul(op.CastLike(op.GreaterOrEqual(v, op.Gather(powers, op.Min(op.Add(k, step), top))), v), step))
    step = op.CastLike(op.Constant(value_int=1), v)
    k = op.Add(k, op.Mul(op.CastLike(op.GreaterOrEqual(v, op.Gather(powers, op.Min(op.Add(k, step), top))), v), step))
    return k


@script(hnq, default_opset=op)
def RoundDivHalfEven(numerator: T, denominator: T) -> T:
    """round(numerator / denominator) with ties to even, for numerator >= 0 and denominator >= 1."""
    two = op.CastLike(op.Constant(value_int=2), numerator)
    quotient = op.Div(numerator, denominator)
    twice_remainder = op.Mul(op.Sub(numerator, op.Mul(quotient, denominator)), two)
    odd = op.Sub(quotient, op.Mul(op.Div(quotient, two), two))
    above_half = op.CastLike(op.Greater(twice_remainder, denominator), numerator)
    tie = op.CastLike(op.Equal(twice_remainder, denominator), numerator)
    return op.Add(quotient, op.Add(above_half, op.Mul(tie, odd)))


COMMON_FUNCTIONS = COMMON_FUNCTIONS + (FloorLog2, RoundDivHalfEven)
