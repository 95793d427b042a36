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


COMMON_FUNCTIONS = COMMON_FUNCTIONS + (BitLength, NewtonSqrtStep)
