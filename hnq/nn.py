"""Quantized building blocks of an integer-only transformer, each with three paths.

- `forward` in training mode: QAT, real values on the quantization grid, straight-through
  gradients;
- `forward` in eval mode: the integer reference on int64 codes;
- `to_onnx(builder, x)`: the same integer steps as ONNX nodes.

Integer matmuls run as float64 matmuls of codes. They are exact: every product of an
int8 (or int6) code with an int8 weight is below 2^14 in magnitude (2^22 for a 16-bit
softmax probability times an int8 value), and a sum of K of them stays below 2^53 for any
K below 2^31, far above any row length or width used here.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto

from onnx_ops.common import FloorDiv, IntegerSqrt, RoundDivHalfEven

from .intops import FLOAT64_EXACT_LIMIT, POWERS_OF_TWO, round_shift
from .onnx_builder import GraphBuilder
from .onnx_builder import onnx_dtype as onnx_elem_type
from .quant import OBSERVER_MOMENTUM, ActQuantizer, QTensor, fake_quantize, fake_quantize_weight, quantize_weight, safe_dyadic, weight_scales
from .schemes.base import SchemeConstants, SiteInput
from .schemes.registry import get_scheme


@contextmanager
def float_mode(model: nn.Module, observe: bool = False):
    """Run a quantized model as its float counterpart: every quantizer and site passes through.

    The model runs its training-mode path with fake quantization off, so parameters and
    module structure are shared with the integer model; the previous mode is restored.
    With `observe`, the activation observers record the float activations (calibration).
    """
    switches = [m for m in model.modules() if hasattr(m, "quant_enabled")]
    was_training = model.training
    model.train()
    for module in switches:
        module.quant_enabled = False
        if hasattr(module, "observe_in_float_mode"):
            module.observe_in_float_mode = observe
    try:
        yield model
    finally:
        for module in switches:
            module.quant_enabled = True
            if hasattr(module, "observe_in_float_mode"):
                module.observe_in_float_mode = False
        model.train(was_training)


def exact_int_matmul(a: torch.Tensor, b: torch.Tensor, bound: int) -> torch.Tensor:
    """a @ b on integer codes via float64; `bound` is the proven max |result|."""
    if bound >= FLOAT64_EXACT_LIMIT:
        raise OverflowError(f"integer matmul bound {bound} exceeds 2^53: float64 would round")
    return torch.matmul(a.double(), b.double()).to(torch.int64)


def requant_params(in_scale, out_scale: float, in_bound: int, out_bound: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Dyadic (multiplier, shift) per element of `in_scale / out_scale`, as int64 arrays.

    `out_bound` is the largest |output code| (see `safe_dyadic`); the integer reference and
    the ONNX lowering must pass the same value.
    """
    ratios = np.atleast_1d(np.asarray(in_scale, dtype=np.float64)) / out_scale
    pairs = [safe_dyadic(float(r), in_bound, output_bound=out_bound) for r in ratios]
    multipliers = np.array([p.multiplier for p in pairs], dtype=np.int64)
    shifts = np.array([p.shift for p in pairs], dtype=np.int64)
    if np.ndim(in_scale) == 0:
        return multipliers[0], shifts[0]
    return multipliers, shifts


def code_bound(quant: ActQuantizer) -> int:
    """Return the largest |code| of `quant`'s range."""
    return max(abs(quant.code_min), quant.code_max)


def requantize_codes(codes: torch.Tensor, multiplier, shift, lo: int, hi: int) -> torch.Tensor:
    m = torch.as_tensor(multiplier, dtype=torch.int64)
    s = torch.as_tensor(shift, dtype=torch.int64)
    return round_shift(codes.to(torch.int64) * m, s).clamp(lo, hi)


def quantizer_requantize(quant: ActQuantizer, acc: torch.Tensor, acc_scale, acc_bound: int) -> QTensor:
    """Integer mode: rescale accumulator codes (scalar or per-channel scale) onto `quant`'s grid."""
    m, s = requant_params(acc_scale, quant.scale, acc_bound, code_bound(quant))
    codes = requantize_codes(acc, m, s, quant.code_min, quant.code_max)
    return QTensor(codes, quant.scale, quant.bits, quant.signed)


def quantizer_requantize_onnx(b: GraphBuilder, quant: ActQuantizer, acc: str, acc_scale, acc_bound: int,
                              offset=None) -> QTensor:
    """ONNX form of `quantizer_requantize`; `offset` (per channel) is added to acc * m before the shift.

    The result is in any form of `GraphBuilder.forms` (uint8 code + 128 for 8-bit codes on
    the CPU target).
    """
    m, s = requant_params(acc_scale, quant.scale, acc_bound, code_bound(quant))
    codes = b.requantize(acc, m, s, quant.code_min, quant.code_max, offset=offset, bound=acc_bound)
    return QTensor(codes, quant.scale, quant.bits, quant.signed)


def _signed_int8_operand(b: GraphBuilder, x: str) -> str:
    """int8 codes of `x` for the B operand of MatMulInteger (the only B type the CUDA kernel takes)."""
    dtype, offset = b.form(x)
    if dtype == TensorProto.INT8 and offset == 0:
        return x
    return b.cast(b.codes(x, TensorProto.INT32), TensorProto.INT8)


def matmul_integer_onnx(b: GraphBuilder, a: QTensor, weight_codes: np.ndarray | None = None,
                        b_tensor: str | None = None, out_type: int = TensorProto.INT64) -> str:
    """Result of A @ B (int64, or int32 when `out_type` says so) with A's codes in `a` and B int8 codes.

    B is a constant (`weight_codes`, shape [K, N]) or a runtime tensor `b_tensor` of codes
    in any form. On the CPU target, a signed 8-bit A is fed as uint8 code + 128 with zero
    point 128 (MatMulInteger's u8 x s8 form is the fast one on CPU and stays exact); an
    unsigned 8-bit A is fed as uint8. On the CUDA target A and B are int8 (s8 x s8 is the
    only CUDA form), and an unsigned 8-bit A is shifted by -128 with B's column sums adding
    the shift back. An unsigned A wider than 8 bits is split into bytes and the partial
    products are recombined in int64.
    """
    if weight_codes is not None:
        b_name = b.const(weight_codes.astype(np.int8), dtype=np.int8, name="weight")
    else:
        b_name = _signed_int8_operand(b, b_tensor)
    dtype, offset = b.form(a.value)

    def finish(acc: str) -> str:
        return acc if out_type == TensorProto.INT32 else b.cast(acc, out_type)

    def unsigned_byte_matmul(byte: str) -> str:
        """int32 A @ B for A with codes in 0..255 (any integer form)."""
        if b.target != "cuda":
            return b.node("MatMulInteger", [b.cast(b.codes(byte), TensorProto.UINT8), b_name])
        # CUDA's MatMulInteger is s8 x s8 only: sum a*w = sum (a - 128)*w + 128 * sum_k w.
        shifted = b.cast(b.node("Sub", [b.codes(byte, TensorProto.INT32), b.const(128, dtype=np.int32)]),
                         TensorProto.INT8)
        column_sums = b.node("ReduceSum", [b.cast(b_name, TensorProto.INT32), b.const([-2])], keepdims=1)
        return b.node("Add", [b.node("MatMulInteger", [shifted, b_name]),
                              b.node("Mul", [column_sums, b.const(128, dtype=np.int32)])])

    if a.bits <= 8 and b.target == "cuda" and a.signed:
        return finish(b.node("MatMulInteger", [b.cast(b.codes(a.value, TensorProto.INT32), TensorProto.INT8), b_name]))
    if a.signed:
        if a.bits > 8:
            raise NotImplementedError("signed matmul inputs wider than 8 bits are not lowered")
        if dtype == TensorProto.UINT8 and offset == 128:
            shifted = a.value
        else:
            shifted = b.cast(b.node("Add", [b.codes(a.value), b.const(128)]), TensorProto.UINT8)
        return finish(b.node("MatMulInteger", [shifted, b_name, b.const(128, dtype=np.uint8)]))
    if a.bits <= 8:
        if dtype == TensorProto.UINT8 and offset == 0 and b.target != "cuda":
            return finish(b.node("MatMulInteger", [a.value, b_name]))
        return finish(unsigned_byte_matmul(a.value))
    if a.bits > 32:
        raise NotImplementedError(f"unsigned matmul inputs wider than 32 bits are not lowered (got {a.bits})")
    # A = sum_j byte_j * 256^j; each byte goes through its own 8-bit MatMulInteger.
    total = None
    remaining = b.codes(a.value)
    for j in range((a.bits + 7) // 8):
        if j == (a.bits + 7) // 8 - 1:
            byte = remaining
        else:
            high = b.node("Div", [remaining, b.const(256)])  # non-negative, so truncation is floor
            byte = b.node("Sub", [remaining, b.node("Mul", [high, b.const(256)])])
            remaining = high
        part = b.cast(unsigned_byte_matmul(byte), TensorProto.INT64)
        if j:
            part = b.node("Mul", [part, b.const(256**j)])
        total = part if total is None else b.node("Add", [total, part])
    return finish(total) if out_type == TensorProto.INT32 else total


def lookup_onnx(b: GraphBuilder, table: np.ndarray, index: str, name: str) -> str:
    """table[index] elementwise for an int32 `index` tensor of any shape.

    GatherElements on the flattened index: onnxruntime's CPU Gather copies one element per
    index through a generic block copy and is about 3x slower here.
    """
    flat = b.node("Reshape", [index, b.const([-1])])
    values = b.node("GatherElements", [b.const(table, dtype=table.dtype, name=name), flat], axis=0)
    return b.node("Reshape", [values, b.node("Shape", [index])])


def _table_dtype(lo: int, hi: int):
    if lo >= 0 and hi <= 255:
        return np.uint8
    if -(2**31) <= lo and hi < 2**31:
        return np.int32
    return np.int64


class QuantLinear(nn.Module):
    """Linear layer with int8 per-channel weights, int32 bias and a requantized output."""

    def __init__(self, linear: nn.Linear | None, weight_bits: int, out_bits: int):
        super().__init__()
        if linear is not None:  # subclasses without an nn.Linear override effective_weight/bias
            self.weight = linear.weight
            self.bias = linear.bias
        self.weight_bits = weight_bits
        self.out_quant = ActQuantizer(out_bits)
        self.quant_enabled = True

    def effective_weight(self) -> torch.Tensor:
        """The float weight [out, in] that is quantized (subclasses fold extra factors in)."""
        return self.weight

    def effective_bias(self) -> torch.Tensor | None:
        return self.bias

    @property
    def in_features(self) -> int:
        return self.effective_weight().shape[1]

    def integer_weights(self, in_scale: float) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray]:
        """Weight codes [out, in], bias codes at scale in_scale * w_scale, and the per-channel scales."""
        w_codes, w_scales = quantize_weight(self.effective_weight(), self.weight_bits)
        acc_scales = w_scales * in_scale
        bias_codes = None
        bias = self.effective_bias()
        if bias is not None:
            bias_codes = torch.round(bias.detach().double() / acc_scales).to(torch.int64)
            limit = 2**31 - 1
            if bias_codes.abs().max() > limit:
                raise OverflowError(f"bias of {self._name()} does not fit int32 at input scale {in_scale:g}")
        return w_codes, bias_codes, acc_scales.numpy()

    def accumulator_bound(self, x: QTensor, bias_codes: torch.Tensor | None) -> int:
        in_max = max(abs(x.code_min), abs(x.code_max))
        bound = self.in_features * in_max * (2 ** (self.weight_bits - 1) - 1)
        if bias_codes is not None:
            bound += int(bias_codes.abs().max())
        return bound

    def forward(self, x: QTensor) -> QTensor:
        if self.training:
            weight = self.effective_weight()
            bias = self.effective_bias()
            if not self.quant_enabled:
                return self.out_quant(F.linear(x.value, weight, bias))
            if bias is not None:
                acc_scales = (weight_scales(weight, self.weight_bits) * x.scale).to(bias.dtype)
                bias = fake_quantize(bias, acc_scales, -(2**31) + 1, 2**31 - 1)
            return self.out_quant(F.linear(x.value, fake_quantize_weight(weight, self.weight_bits), bias))
        acc, acc_scales, bound = self.accumulate(x)
        return quantizer_requantize(self.out_quant, acc, acc_scales, bound)

    def accumulate(self, x: QTensor) -> tuple[torch.Tensor, np.ndarray, int]:
        """Integer mode: int64 accumulator codes, their per-channel scales and bound."""
        w_codes, bias_codes, acc_scales = self.integer_weights(x.scale)
        bound = self.accumulator_bound(x, bias_codes)
        acc = exact_int_matmul(x.value, w_codes.t(), bound)
        if bias_codes is not None:
            acc = acc + bias_codes
        return acc, acc_scales, bound

    def accumulate_onnx(self, b: GraphBuilder, x: QTensor) -> tuple[str, np.ndarray, int]:
        w_codes, bias_codes, acc_scales = self.integer_weights(x.scale)
        bound = self.accumulator_bound(x, bias_codes)
        acc = matmul_integer_onnx(b, x, weight_codes=w_codes.t().contiguous().numpy())
        if bias_codes is not None:
            acc = b.node("Add", [acc, b.const(bias_codes.numpy(), name="bias")])
        return acc, acc_scales, bound

    def to_onnx(self, b: GraphBuilder, x: QTensor) -> QTensor:
        if b.target != "cpu":
            acc, acc_scales, bound = self.accumulate_onnx(b, x)
            return quantizer_requantize_onnx(b, self.out_quant, acc, acc_scales, bound)
        # (acc + bias) * m = acc * m + bias * m, so the bias folds into the requantization's
        # constant and the int32 accumulator goes straight into it.
        w_codes, bias_codes, acc_scales = self.integer_weights(x.scale)
        bound = self.accumulator_bound(x, bias_codes)
        acc = matmul_integer_onnx(b, x, weight_codes=w_codes.t().contiguous().numpy(), out_type=TensorProto.INT32)
        b.mark(acc, TensorProto.INT32, 0)
        offset = None
        if bias_codes is not None:
            m, _ = requant_params(acc_scales, self.out_quant.scale, bound, code_bound(self.out_quant))
            offset = bias_codes.numpy() * m
        return quantizer_requantize_onnx(b, self.out_quant, acc, acc_scales, bound, offset=offset)

    def _name(self) -> str:
        return getattr(self, "site_name", type(self).__name__)


class QuantAdd(nn.Module):
    """Residual add: both operands rescaled onto one grid with a single rounding."""

    def __init__(self, out_bits: int):
        super().__init__()
        self.out_quant = ActQuantizer(out_bits)

    def integer_params(self, a: QTensor, c: QTensor) -> tuple[int, int, int]:
        # One shift s for both operands: out = round((a*m_a + c*m_c) / 2^s).
        bound = max(abs(a.code_min), a.code_max) + max(abs(c.code_min), c.code_max)
        ratio_a, ratio_c = a.scale / self.out_quant.scale, c.scale / self.out_quant.scale
        reference = safe_dyadic(max(ratio_a, ratio_c), bound, output_bound=code_bound(self.out_quant))
        m_a = round(ratio_a * 2**reference.shift)
        m_c = round(ratio_c * 2**reference.shift)
        return m_a, m_c, reference.shift

    def forward(self, a: QTensor, c: QTensor) -> QTensor:
        if self.training:
            return self.out_quant(a.value + c.value)
        m_a, m_c, s = self.integer_params(a, c)
        q = self.out_quant
        codes = round_shift(a.value * m_a + c.value * m_c, s).clamp(q.code_min, q.code_max)
        return QTensor(codes, q.scale, q.bits, q.signed)

    def to_onnx(self, b: GraphBuilder, a: QTensor, c: QTensor) -> QTensor:
        m_a, m_c, s = self.integer_params(a, c)
        q = self.out_quant
        if b.target == "cpu":
            terms = [(a.value, m_a, max(abs(a.code_min), a.code_max)), (c.value, m_c, max(abs(c.code_min), c.code_max))]
            out = b.requantize_sum(terms, s, q.code_min, q.code_max)
            if out is not None:
                return QTensor(out, q.scale, q.bits, q.signed)
        # Stored values are code + z; their offsets fold into one constant.
        (a_type, z_a), (c_type, z_c) = b.form(a.value), b.form(c.value)
        a_value = a.value if a_type == TensorProto.INT64 else b.cast(a.value, TensorProto.INT64)
        c_value = c.value if c_type == TensorProto.INT64 else b.cast(c.value, TensorProto.INT64)
        summed = b.node("Add", [b.node("Mul", [a_value, b.const(m_a)]), b.node("Mul", [c_value, b.const(m_c)])])
        bound = (max(abs(a.code_min), a.code_max) + z_a) * m_a + (max(abs(c.code_min), c.code_max) + z_c) * m_c
        offset = -(z_a * m_a + z_c * m_c)
        out = b.requantize(summed, 1, s, q.code_min, q.code_max, offset=offset if offset else None, bound=bound)
        return QTensor(out, q.scale, q.bits, q.signed)


class UnsafeSiteError(ValueError):
    """A scheme that cannot run safely at a site's scale or bit width."""


def _constant_for_dtype(value, np_dtype) -> np.ndarray:
    """A scheme constant as int32 or int64.

    The 2^0..2^62 powers table some schemes gather from is cut to 2^0..2^30 for int32: a
    scheme whose bounds are all below 2^31 never gathers a larger power.
    """
    from .intops import POWERS_OF_TWO

    array = np.asarray(value, dtype=np.int64)
    if np_dtype == np.int32:
        if array.shape == (len(POWERS_OF_TWO),) and np.array_equal(array, POWERS_OF_TWO):
            array = array[:31]
        if np.any(np.abs(array) >= 2**31):
            raise OverflowError(f"scheme constant {array.tolist()[:4]} does not fit int32")
    return array.astype(np_dtype)


class SchemeSite(nn.Module):
    """A non-linear layer whose integer scheme the plan chooses ("site").

    Besides QAT and the integer reference, a site runs in float mode (`quant_enabled`
    False: the float op on real values) and reports its input and output to `recorder`
    when one is set, which is how the sensitivity search observes every site.
    """

    op: str = ""

    def __init__(self, act_bits: int, length: int):
        super().__init__()
        self.act_bits = act_bits
        self._length = length
        self.scheme_name: str | None = None
        self.site_name = ""
        self.quant_enabled = True
        self.recorder = None

    @property
    def scheme(self):
        if self.scheme_name is None:
            raise RuntimeError(f"site {self.site_name!r} has no scheme: apply a plan first")
        return get_scheme(self.op, self.scheme_name)

    def input_bits(self) -> int:
        if self.scheme_name is None:  # float mode before a plan: any width passes through
            return self.act_bits
        preferred = self.scheme.preferred_input_bits
        return preferred if preferred is not None else self.act_bits

    def constants(self, x: QTensor, **options) -> SchemeConstants:
        scheme = self.scheme
        for statistic in scheme.calibration:
            options[statistic] = self.calibration_statistic(statistic)
        try:
            return scheme.constants(SiteInput(scale=x.scale, bits=x.bits, length=self._length), **options)
        except (ValueError, OverflowError) as error:
            raise UnsafeSiteError(f"site {self.site_name!r}, scheme {scheme.name!r}: {error}") from None

    def onnx_dtype(self, c: SchemeConstants) -> int:
        """int32 when every declared intermediate stays below 2^31, else int64.

        Raises UnsafeSiteError when an intermediate can reach 2^62, where int64 products
        and sums would no longer be safe.
        """
        bounds = self.scheme.bounds(c)
        name, worst = max(bounds.items(), key=lambda item: item[1])
        if worst >= 2**62:
            raise UnsafeSiteError(
                f"site {self.site_name!r}, scheme {self.scheme.name!r}: intermediate {name!r} can reach "
                f"{worst} (2^{math.log2(worst):.1f}), past the int64 safety limit 2^62; choose another "
                "scheme for this site or fewer input bits"
            )
        return TensorProto.INT32 if worst < 2**31 else TensorProto.INT64

    def calibration_statistic(self, name: str):
        raise ValueError(f"site {self.site_name!r} ({self.op}) does not collect {name!r}, "
                         f"which scheme {self.scheme_name!r} needs")

    def run_scheme_onnx(self, b: GraphBuilder, x: QTensor, c: SchemeConstants) -> str:
        """Call the scheme's function in int32 or int64 (see onnx_dtype); returns int64 codes."""
        scheme = self.scheme
        dtype = self.onnx_dtype(c)
        np_dtype = np.int32 if dtype == TensorProto.INT32 else np.int64
        consts = [b.const(_constant_for_dtype(v, np_dtype), dtype=np_dtype, name=f"{scheme.name}_const")
                  for v in scheme.onnx_constant_inputs(c)]
        x_value = b.codes(x.value, dtype)
        out = b.call(scheme.onnx_function, [x_value, *consts], name=f"{self.op}_{scheme.name}")
        b.site_tensors[self.site_name] = {"input": b.site_tensor(x_value), "node": b.last_node_name,
                                          "scheme": scheme.name}
        return b.cast(out, TensorProto.INT64) if dtype == TensorProto.INT32 else out

    def record_onnx_output(self, b: GraphBuilder, y: QTensor) -> QTensor:
        # The stored tensor and its offset, for the mismatch search (hnq.diagnose); a
        # conversion node here would run on every inference although nothing reads it.
        b.site_tensors[self.site_name]["output"] = b.site_tensor(y.value)
        return y

    def integer_forward(self, x: QTensor) -> QTensor:
        """Run the integer reference of this site on input codes `x` (eval mode)."""
        raise NotImplementedError

    def input_quantizer(self) -> ActQuantizer | None:
        """Return the quantizer that sets this site's input grid, if the site's scheme chooses its width."""
        return None

    def quantize_input(self, x: QTensor, scheme_name: str) -> QTensor:
        """Codes of the real input `x` on the grid this site would use under `scheme_name`."""
        quantizer = self.input_quantizer()
        if quantizer is None:
            scale, bits = x.scale, x.bits
        else:
            preferred = get_scheme(self.op, scheme_name).preferred_input_bits
            bits = preferred if preferred is not None else self.act_bits
            scale = max(float(quantizer.running_absmax), 1e-8) / (2 ** (bits - 1) - 1)
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        codes = torch.round(x.value.detach().double() / scale).clamp(lo, hi).to(torch.int64)
        return QTensor(codes, scale, bits, signed=True)

    def float_op(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _record(self, x: QTensor, y: QTensor) -> QTensor:
        if self.recorder is not None:
            self.recorder(self, x, y)
        return y


# Softmax schemes that the CPU export lowers with an exponential table (SoftmaxSite.table_onnx).
TABLE_SOFTMAX_SCHEMES = ("ibert", "ivit")

# Bits of the low part when a row sum of exponentials is split (SoftmaxSite.ratio_table_onnx).
LOW_BITS = 26


class SoftmaxSite(SchemeSite):
    op = "softmax"

    def __init__(self, act_bits: int, output_bits: int, length: int):
        super().__init__(act_bits, length)
        self.output_bits = output_bits
        self.in_quant = ActQuantizer(act_bits)

    def float_op(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=-1)

    def input_quantizer(self) -> ActQuantizer:
        return self.in_quant

    def forward(self, scores: torch.Tensor | None = None, acc: torch.Tensor | None = None,
                acc_scale: float = 0.0, acc_bound: int = 0) -> QTensor:
        """QAT or float mode: real `scores`; integer mode: accumulator codes `acc` at `acc_scale`."""
        self.in_quant.bits = self.input_bits()
        if self.training:
            x = self.in_quant(scores)
            if not self.quant_enabled:
                return self._record(x, QTensor(self.float_op(x.value), 1.0, 16, signed=False))
            c = self.constants(x, output_bits=self.output_bits)
            y = self.scheme.qat_forward(x.value, c, self.float_op)
            return self._record(x, QTensor(y, c.output_scale, self.probability_bits(c), signed=False))
        return self.integer_forward(quantizer_requantize(self.in_quant, acc, acc_scale, acc_bound))

    def integer_forward(self, x: QTensor) -> QTensor:
        c = self.constants(x, output_bits=self.output_bits)
        y = QTensor(self.scheme.fast_reference(x.value, c), c.output_scale, self.probability_bits(c), signed=False)
        return self._record(x, y)

    @staticmethod
    def probability_bits(c: SchemeConstants) -> int:
        """Width of the unsigned probability codes, from the scheme's largest output code."""
        return max(1, int(c.output_max).bit_length())

    def to_onnx(self, b: GraphBuilder, acc: str, acc_scale: float, acc_bound: int) -> QTensor:
        self.in_quant.bits = self.input_bits()
        x = quantizer_requantize_onnx(b, self.in_quant, acc, acc_scale, acc_bound)
        c = self.constants(x, output_bits=self.output_bits)
        probs = self.table_onnx(b, x, c) if self.scheme_name in TABLE_SOFTMAX_SCHEMES else None
        if probs is None:
            probs = self.ratio_table_onnx(b, x, c)
        if probs is None:
            probs = self.run_scheme_onnx(b, x, c)
        y = QTensor(probs, c.output_scale, self.probability_bits(c), signed=False)
        return self.record_onnx_output(b, y)

    def table_onnx(self, b: GraphBuilder, x: QTensor, c: SchemeConstants, mask: str | None = None) -> str | None:
        """CPU lowering with the exponential as a table of -d = rowmax - x; None where it does not apply.

        It applies to schemes with `exp_table` (I-BERT, I-ViT) on uint8 inputs (code - code_min)
        with probabilities below 256, and returns uint8 probability codes. `mask` (bool,
        broadcast to x) marks entries set to code_min before the scheme and to 0 after it.
        """
        scheme = self.scheme
        if b.target != "cpu" or not hasattr(scheme, "exp_table") or c.output_max > 255:
            return None
        if b.form(x.value) != (TensorProto.UINT8, -x.code_min):
            return None
        self.onnx_dtype(c)  # raises UnsafeSiteError where a scheme bound passes 2^62
        b.site_tensors[self.site_name] = {"input": b.site_tensor(x.value), "scheme": scheme.name}
        stored = x.value
        if mask is not None:
            stored = b.node("Where", [mask, b.const(0, dtype=np.uint8), stored])
        values = b.cast(stored, TensorProto.INT32)
        row_diff = b.node("Sub", [b.node("ReduceMax", [values, b.const([-1])], keepdims=1), values])
        table = scheme.exp_table(c)
        if int(table.max()) * c.site_input.length >= FLOAT64_EXACT_LIMIT:
            return None
        # The exponentials are read as float64, so the normalization below needs no Cast, and
        # their row sum is exact because every partial sum is an integer below 2^53.
        exp = lookup_onnx(b, table.astype(np.float64), row_diff, name=f"{scheme.name}_exp_table")
        b.site_tensors[self.site_name]["node"] = b.last_node_name
        total = b.cast(b.node("ReduceSum", [exp, b.const([-1])], keepdims=1), TensorProto.INT64)

        # Both schemes give floor(exp * factor / 2^(32 - k)) capped at output_max, with
        # factor = floor(2^32 / sum) for I-BERT and floor((2^31 - 1) / min(sum, 2^31 - 1)) for
        # I-ViT. The product is at most 2^32 (scheme bounds), so it and its scaling by
        # 2^-(32 - k) are exact in float64, and `clamped_floor` gives the capped floor.
        if scheme.name == "ivit":
            from .schemes.ivit import INT32_MAX

            limit = b.const(INT32_MAX)
            factor = b.node("Div", [limit, b.node("Min", [total, limit])])
        else:
            factor = b.node("Div", [b.const(2**scheme.MAX_BIT), total])
        step = b.const(2.0 ** -(32 - c["output_bits"]), dtype=np.float64)
        scaled_factor = b.node("Mul", [b.node("Cast", [factor], to=TensorProto.DOUBLE), step])
        value = b.node("Mul", [exp, scaled_factor])
        out = b.clamped_floor(value, c.output_max, TensorProto.UINT8)
        if mask is not None:
            out = b.node("Where", [mask, b.const(0, dtype=np.uint8), out])
        return b.mark(out, TensorProto.UINT8, 0)

    def ratio_table_onnx(self, b: GraphBuilder, x: QTensor, c: SchemeConstants) -> str | None:
        """CPU lowering of FQ-ViT's Log-Int-Softmax with two tables; None where it does not apply.

        The exponential is a table of rowmax - x, as in `table_onnx`. The output code is a
        table of min(ratio, R) (`FQViTLogIntSoftmax.ratio_table`), which replaces the integer
        log2, the rounding to the nearer power of two and the masks of the hnq function.
        Applies on uint8 inputs (code - code_min) with log_bits 4. Returns int32 codes.
        """
        scheme = self.scheme
        if b.target != "cpu" or not hasattr(scheme, "ratio_table"):
            return None
        if b.form(x.value) != (TensorProto.UINT8, -x.code_min):
            return None
        codes = scheme.ratio_table(c)
        exp_table = scheme.exp_table(c)
        # onnxruntime's int64 ReduceSum is exact below 2^53 (see the hnq function). Longer
        # sums add the high and low 26 bits of each exponential apart, from two more tables.
        length = c.site_input.length
        split = int(exp_table.max()) * length >= FLOAT64_EXACT_LIMIT
        if codes is None or (int(exp_table.max()) >> LOW_BITS) * length >= FLOAT64_EXACT_LIMIT:
            return None
        b.site_tensors[self.site_name] = {"input": b.site_tensor(x.value), "scheme": scheme.name}
        values = b.cast(x.value, TensorProto.INT32)
        row_diff = b.node("Sub", [b.node("ReduceMax", [values, b.const([-1])], keepdims=1), values])
        exp = lookup_onnx(b, exp_table.astype(np.int64), row_diff, name=f"{scheme.name}_exp_table")
        b.site_tensors[self.site_name]["node"] = b.last_node_name

        def row_sum(tensor: str) -> str:
            return b.node("ReduceSum", [tensor, b.const([-1])], keepdims=1)

        if split:
            high = lookup_onnx(b, exp_table >> LOW_BITS, row_diff, name=f"{scheme.name}_exp_high_table")
            low = lookup_onnx(b, exp_table & ((1 << LOW_BITS) - 1), row_diff, name=f"{scheme.name}_exp_low_table")
            total = b.node("Add", [b.node("Mul", [row_sum(high), b.const(1 << LOW_BITS)]), row_sum(low)])
        else:
            total = row_sum(exp)

        # The reference divides by max(exp, 1), and an exp of 0 only occurs where the table has one.
        has_zero = int(exp_table.min()) == 0
        ratio = b.call(RoundDivHalfEven, [total, b.node("Max", [exp, b.const(1)]) if has_zero else exp])
        limit = len(codes) - 1
        out = lookup_onnx(b, codes.astype(np.int32), b.node("Min", [ratio, b.const(limit)]),
                          name=f"{scheme.name}_ratio_table")
        # An entry with exp = 0 gets code 0. Its ratio is the row's sum, at least the row
        # maximum's exp = exp_table[0], so the ratio table already gives 0 when that reaches R.
        if has_zero and int(exp_table[0]) < limit:
            out = b.node("Mul", [out, b.cast(b.node("Greater", [exp, b.const(0)]), TensorProto.INT32)])
        return b.mark(out, TensorProto.INT32, 0)


class GeluSite(SchemeSite):
    """GELU; its input quantizer is the preceding linear layer's output quantizer."""

    op = "gelu"

    def __init__(self, act_bits: int, length: int):
        super().__init__(act_bits, length)
        self.out_quant = ActQuantizer(act_bits)
        self._input_quantizer: ActQuantizer | None = None

    def attach_input_quantizer(self, quantizer: ActQuantizer) -> None:
        # object.__setattr__ keeps the linear layer's quantizer out of this module's
        # children, so it is saved once, under the linear layer.
        object.__setattr__(self, "_input_quantizer", quantizer)

    def input_quantizer(self) -> ActQuantizer | None:
        return self._input_quantizer

    def float_op(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x)

    def forward(self, x: QTensor) -> QTensor:
        if not self.training:
            return self.integer_forward(x)
        if not self.quant_enabled:
            return self._record(x, self.out_quant(self.float_op(x.value)))
        c = self.constants(x)
        return self._record(x, self.out_quant(self.scheme.qat_forward(x.value, c, self.float_op)))

    def integer_forward(self, x: QTensor) -> QTensor:
        c = self.constants(x)
        codes = self.scheme.fast_reference(x.value, c)
        bound = max(abs(c.output_min), abs(c.output_max))
        return self._record(x, quantizer_requantize(self.out_quant, codes, c.output_scale, bound))

    def lookup_table(self, c: SchemeConstants) -> tuple[np.ndarray, int] | None:
        """Output codes minus out_quant.code_min for every input (the scheme's `code_table`
        followed by the output requantization), flattened, and the table's row length."""
        codes = self.scheme.code_table(c)
        if codes is None:
            return None
        bound = max(abs(c.output_min), abs(c.output_max))
        final = quantizer_requantize(self.out_quant, codes, c.output_scale, bound).value - self.out_quant.code_min
        table = final.reshape(-1).numpy()
        return table.astype(_table_dtype(0, int(table.max()))), codes.shape[-1]

    def table_onnx(self, b: GraphBuilder, x: QTensor, c: SchemeConstants) -> QTensor | None:
        """CPU lowering of scheme and output requantization as one table lookup; None where it does not apply.

        Applies where the scheme has a `code_table` (see `Scheme.code_table` for the limits).
        """
        if b.target != "cpu" or b.form(x.value)[1] != -x.code_min:
            return None
        found = self.lookup_table(c)
        if found is None:
            return None
        table, row_length = found
        values = b.cast(x.value, TensorProto.INT32) if b.form(x.value)[0] != TensorProto.INT32 else x.value
        index = values
        if not self.scheme.elementwise:
            row_max = b.node("ReduceMax", [values, b.const([-1])], keepdims=1)
            index = b.node("Add", [b.node("Mul", [row_max, b.const(row_length, dtype=np.int32)]), values])
        b.site_tensors[self.site_name] = {"input": b.site_tensor(x.value), "scheme": self.scheme.name}
        out = lookup_onnx(b, table, index, name=f"gelu_{self.scheme.name}_table")
        b.site_tensors[self.site_name]["node"] = b.last_node_name
        q = self.out_quant
        out_type = TensorProto.UINT8 if table.dtype == np.uint8 else onnx_elem_type(table.dtype)
        return QTensor(b.mark(out, out_type, -q.code_min), q.scale, q.bits, q.signed)

    def to_onnx(self, b: GraphBuilder, x: QTensor) -> QTensor:
        c = self.constants(x)
        y = self.table_onnx(b, x, c)
        if y is not None:
            return self.record_onnx_output(b, y)
        codes = self.run_scheme_onnx(b, x, c)
        return self.record_onnx_output(b, quantizer_requantize_onnx(b, self.out_quant, codes, c.output_scale,
                                                                    max(abs(c.output_min), abs(c.output_max))))


# LayerNorm schemes that the CPU export lowers in float64 (LayerNormSite.float64_onnx).
FLOAT64_LAYERNORM_SCHEMES = ("ibert", "ivit")


class LayerNormSite(SchemeSite):
    """LayerNorm: the scheme normalizes, then a per-channel dyadic applies gamma and beta."""

    op = "layernorm"

    def __init__(self, norm: nn.LayerNorm, act_bits: int):
        super().__init__(act_bits, norm.normalized_shape[-1])
        self.weight = norm.weight
        self.bias = norm.bias
        self.eps = norm.eps
        self.out_quant = ActQuantizer(act_bits)
        # Per-channel input range, observed alongside the activation observers; schemes
        # with per-channel input factors (FQ-ViT's PTF) read it.
        self.register_buffer("channel_absmax", torch.zeros(self._length, dtype=torch.float64))
        self.register_buffer("channel_observed", torch.zeros((), dtype=torch.bool))

    def observe_channels(self, x: torch.Tensor) -> None:
        absmax = x.detach().double().abs().flatten(0, -2).amax(dim=0)
        if not bool(self.channel_observed):
            self.channel_absmax.copy_(absmax)
            self.channel_observed.fill_(True)
        else:
            self.channel_absmax.mul_(OBSERVER_MOMENTUM).add_(absmax * (1 - OBSERVER_MOMENTUM))

    def calibration_statistic(self, name: str):
        if name == "channel_absmax":
            if not bool(self.channel_observed):
                raise RuntimeError(f"site {self.site_name!r} has no per-channel statistics: calibrate first")
            return self.channel_absmax.numpy().copy()
        return super().calibration_statistic(name)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=self.eps)

    def float_op(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, eps=self.eps)

    def affine_params(self, c: SchemeConstants) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-channel m_c, s_c and offset B_c = round(beta_c / S_out * 2^s_c)."""
        q = self.out_quant
        gamma = self.weight.detach().double().numpy()
        beta = self.bias.detach().double().numpy() if self.bias is not None else np.zeros_like(gamma)
        n_bound = max(abs(c.output_min), abs(c.output_max))
        # The offset only shifts the output, and any |offset| past the output range plus
        # the largest |n * gamma| term saturates the clamp the same way, so it is capped.
        offset_cap = q.code_max + int(np.abs(gamma).max() * c.output_scale / q.scale * n_bound) + 2
        multipliers, shifts, offsets = [], [], []
        for g, beta_c in zip(gamma, beta):
            d = safe_dyadic(abs(g) * c.output_scale / q.scale, n_bound, offset_bound=offset_cap,
                            output_bound=code_bound(q))
            multipliers.append(d.multiplier if g >= 0 else -d.multiplier)
            shifts.append(d.shift)
            offset = max(-offset_cap, min(offset_cap, beta_c / q.scale))
            offsets.append(math.floor(offset * 2.0**d.shift + 0.5))
        return (np.array(multipliers, dtype=np.int64), np.array(shifts, dtype=np.int64),
                np.array(offsets, dtype=np.int64))

    def forward(self, x: QTensor) -> QTensor:
        if not self.training:
            return self.integer_forward(x)
        q = self.out_quant
        if not bool(q.frozen) and (self.quant_enabled or q.observe_in_float_mode):
            self.observe_channels(x.value)
        if not self.quant_enabled:
            return self._record(x, q(self.float_op(x.value)))
        normalized = self.scheme.qat_forward(x.value, self.constants(x), self.normalize)
        return self._record(x, q(normalized * self.weight + (self.bias if self.bias is not None else 0)))

    def integer_forward(self, x: QTensor) -> QTensor:
        c = self.constants(x)
        q = self.out_quant
        n = self.scheme.fast_reference(x.value, c)
        m, s, offset = (torch.from_numpy(a) for a in self.affine_params(c))
        codes = round_shift(n * m + offset, s).clamp(q.code_min, q.code_max)
        return self._record(x, QTensor(codes, q.scale, q.bits, q.signed))

    def to_onnx(self, b: GraphBuilder, x: QTensor) -> QTensor:
        c = self.constants(x)
        n = self.float64_onnx(b, x, c)
        if n is None:
            n = self.run_scheme_onnx(b, x, c)
        m, s, offset = self.affine_params(c)
        q = self.out_quant
        n_bound = max(abs(c.output_min), abs(c.output_max))
        y = QTensor(b.requantize(n, m, s, q.code_min, q.code_max, offset=offset, bound=n_bound), q.scale, q.bits,
                    q.signed)
        return self.record_onnx_output(b, y)

    def float64_onnx(self, b: GraphBuilder, x: QTensor, c: SchemeConstants) -> str | None:
        """CPU lowering of I-BERT's and I-ViT's LayerNorm in float64; None where it does not apply.

        Both compute n = floor(y floor(N / std) / 2) with std = floor(sqrt(max(sum y^2, 1))),
        N = c["numerator"]. Their Newton iterations differ but both end at that floor (each
        scheme proves its step count), so `IntegerSqrt` serves both. n is returned as
        float64 integers, marked (DOUBLE, 0), so the requantization that follows reads it
        without a Cast. The full-tensor steps (y, y^2, its row sum, y * factor / 2 and the
        floor) run on integers, or halves of integers, below 2^53, which float64 represents
        exactly. The scheme bounds give |y * factor| <= N and sum(y^2) < 2^53, and the row
        sum of the stored codes is checked here. Mean, square root and factor are per row
        and stay in int64.
        """
        if b.target != "cpu" or self.scheme.name not in FLOAT64_LAYERNORM_SCHEMES:
            return None
        dtype, z = b.form(x.value)
        length = c.site_input.length
        if length * (max(abs(x.code_min), x.code_max) + abs(z)) >= FLOAT64_EXACT_LIMIT:
            return None
        b.site_tensors[self.site_name] = {"input": b.site_tensor(x.value), "scheme": self.scheme.name}
        stored = b.node("Cast", [x.value], to=TensorProto.DOUBLE)

        # The half-up mean of the stored values x + z is mean(x) + z, because z is an integer,
        # so y = (x + z) - (mean + z) needs no separate offset step.
        axes = b.const([-1])
        total = b.cast(b.node("ReduceSum", [stored, axes], keepdims=1), TensorProto.INT64)
        mean = b.call(FloorDiv, [b.node("Add", [b.node("Mul", [total, b.const(2)]), b.const(length)]),
                                 b.const(2 * length)])
        y = b.node("Sub", [stored, b.node("Cast", [mean], to=TensorProto.DOUBLE)])
        b.site_tensors[self.site_name]["node"] = b.last_node_name

        variance = b.node("ReduceSum", [b.node("Mul", [y, y]), axes], keepdims=1)
        variance = b.node("Max", [b.cast(variance, TensorProto.INT64), b.const(1)])
        powers = b.const(np.array(POWERS_OF_TWO, dtype=np.int64), name="powers")
        factor = b.node("Div", [b.const(c["numerator"]), b.call(IntegerSqrt, [variance, powers])])
        half_factor = b.node("Mul", [b.node("Cast", [factor], to=TensorProto.DOUBLE),
                                     b.const(0.5, dtype=np.float64)])
        n = b.node("Floor", [b.node("Mul", [y, half_factor])])
        return b.mark(n, TensorProto.DOUBLE, 0)
