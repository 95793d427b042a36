"""A small graph builder over onnx.helper, used by the modules' `to_onnx` methods.

Names are made unique per builder; constants become initializers. Integer helpers
(`floor_div`, `requantize`, ...) emit calls to the `hnq`-domain functions of
`onnx_ops.common`, so the lowering of each integer step is written once.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_ops.common import HNQ_DOMAIN, IR_VERSION, OPSET_VERSION

from .intops import FLOAT64_EXACT_LIMIT

_NP_TO_ONNX = {
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int16): TensorProto.INT16,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float64): TensorProto.DOUBLE,
    np.dtype(np.bool_): TensorProto.BOOL,
}


_ONNX_TO_NP = {value: key for key, value in _NP_TO_ONNX.items()}
_ONNX_TO_NP[TensorProto.UINT64] = np.dtype(np.uint64)

TARGETS = ("cpu", "cuda")
_default_target = "cpu"

# Ops that only move or select elements, so their output holds codes in the same form
# (dtype and offset) as their first input.
_LAYOUT_OPS = {"Reshape", "Transpose", "Gather", "Squeeze", "Unsqueeze", "Slice", "Flatten", "Identity"}

# Every int64 value a fast requantization forms stays below this (see GraphBuilder.requantize).
_INT64_SAFE = 2**62


def onnx_dtype(dtype) -> int:
    return _NP_TO_ONNX[np.dtype(dtype)]


@contextmanager
def lowering_target(target: str):
    """Make GraphBuilders created inside the block lower for `target` ("cpu" or "cuda").

    The CPU lowering keeps 8-bit activations as uint8 (code + 128) between steps, feeds
    MatMulInteger u8 x s8 and requantizes in float64 where that is exact (else with
    BitShift on uint64). The CUDA lowering uses only
    ops and types that onnxruntime's CUDA provider implements for integers: s8 x s8
    MatMulInteger, Div-based shifts, Max/Min clamps and no BitShift or Bitwise ops.
    """
    global _default_target
    if target not in TARGETS:
        raise ValueError(f"invalid lowering target {target!r}; expected one of {', '.join(TARGETS)}")
    previous = _default_target
    _default_target = target
    try:
        yield
    finally:
        _default_target = previous


class GraphBuilder:
    """Collects nodes, initializers, inputs and outputs of one ONNX graph."""

    def __init__(self, target: str | None = None) -> None:
        self.target = target or _default_target
        if self.target not in TARGETS:
            raise ValueError(f"invalid lowering target {self.target!r}; expected one of {', '.join(TARGETS)}")
        # Tensors that hold codes in a form other than plain int64: name -> (ONNX elem type,
        # offset z), the tensor holding code + z. Tensors not listed hold int64 codes.
        self.forms: dict[str, tuple[int, int]] = {}
        self._plain_codes: dict[tuple[str, int], str] = {}
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._counts: Counter[str] = Counter()
        self._scope: list[str] = []
        self._constant_cache: dict[tuple, str] = {}
        # Site name -> its input and output tensors (as stored: see `site_tensor`) and the
        # node that calls its scheme, recorded in the model's metadata so a mismatch can be
        # traced to a site without any extra node in the shipped graph.
        self.site_tensors: dict[str, dict[str, Any]] = {}
        # Output of a Cast whose values all fit its type -> that Cast's input.
        self._lossless_cast_source: dict[str, str] = {}
        self.last_node_name = ""

    # Naming ---------------------------------------------------------------------------

    def scope(self, name: str) -> "_Scope":
        """Context manager that prefixes new names with `name/` (the module path)."""
        return _Scope(self, name)

    def fresh(self, base: str) -> str:
        prefix = "/".join(self._scope)
        name = f"{prefix}/{base}" if prefix else base
        self._counts[name] += 1
        count = self._counts[name]
        return name if count == 1 else f"{name}_{count}"

    # Graph pieces ---------------------------------------------------------------------

    def add_input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def add_output(self, name: str, elem_type: int, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def const(self, value, dtype=np.int64, name: str = "const") -> str:
        """An initializer holding `value`; equal small constants are shared."""
        array = np.asarray(value, dtype=dtype)
        key = None
        if array.size <= 16:
            key = (array.dtype.str, array.shape, array.tobytes())
            if key in self._constant_cache:
                return self._constant_cache[key]
        tensor_name = self.fresh(name)
        self.initializers.append(numpy_helper.from_array(array, tensor_name))
        if key is not None:
            self._constant_cache[key] = tensor_name
        return tensor_name

    def node(self, op_type: str, inputs: list[str], n_outputs: int = 1, domain: str = "",
             name: str | None = None, **attrs) -> str | list[str]:
        base = name or op_type
        outputs = [self.fresh(base if n_outputs == 1 else f"{base}_{i}") for i in range(n_outputs)]
        node_name = self.fresh(f"{base}_node")
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=node_name, domain=domain, **attrs))
        self.last_node_name = node_name
        if op_type in _LAYOUT_OPS and domain == "" and inputs and inputs[0] in self.forms:
            for output in outputs:
                self.forms[output] = self.forms[inputs[0]]
        return outputs[0] if n_outputs == 1 else outputs

    def call(self, function, inputs: list[str], name: str | None = None) -> str:
        """Call an `hnq`-domain function (an onnxscript function object) with tensor inputs."""
        return self.node(function.name, inputs, domain=HNQ_DOMAIN, name=name or function.name)

    # Integer steps --------------------------------------------------------------------

    def cast(self, x: str, elem_type: int) -> str:
        # A narrowing cast that kept every value (see `_requantize_shift`) followed by a cast
        # to int32/int64 becomes one cast from the wider source. The narrow tensor is then
        # often unused, and `live_nodes` drops it.
        if elem_type in (TensorProto.INT32, TensorProto.INT64) and x in self._lossless_cast_source:
            x = self._lossless_cast_source[x]
        return self.node("Cast", [x], to=elem_type)

    def mark(self, x: str, elem_type: int, offset: int) -> str:
        """Record that tensor `x` holds code + offset in `elem_type` (see `forms`)."""
        self.forms[x] = (elem_type, offset)
        return x

    def form(self, x: str) -> tuple[int, int]:
        """Return (ONNX elem type, offset) of the codes in `x`; plain int64 codes are (INT64, 0)."""
        return self.forms.get(x, (TensorProto.INT64, 0))

    def site_tensor(self, x: str) -> dict[str, Any]:
        """Name and offset of tensor `x`: its plain codes are the stored values minus the offset.

        A lossless narrowing cast is looked through, since it may be dropped as unused.
        """
        return {"name": self._lossless_cast_source.get(x, x), "offset": self.form(x)[1]}

    def codes(self, x: str, elem_type: int = TensorProto.INT64) -> str:
        """Plain signed codes of `x` in `elem_type` (int32 or int64), undoing any offset form."""
        dtype, offset = self.form(x)
        if dtype == elem_type and not offset:
            return x
        key = (x, elem_type)
        if key not in self._plain_codes:
            value = x if dtype == elem_type else self.cast(x, elem_type)
            if offset:
                value = self.node("Sub", [value, self.const(offset, dtype=_ONNX_TO_NP[elem_type])])
            self._plain_codes[key] = value
        return self._plain_codes[key]

    def requantize(self, x_int64: str, multiplier, shift, lo: int, hi: int, offset=None, bound: int | None = None) -> str:
        """clamp(round_half_up((x * m + offset) / 2^s), lo, hi), m and s scalars or per channel.

        `x_int64` holds codes in any form (`forms`). Without `bound` (max |x|), or on the
        CUDA target, the result is plain int64 codes computed with `FloorDiv`. With it, the
        CPU lowering returns code - lo (uint8 when the range has at most 256 codes, else
        int32), in float64 where that is exact (`requantize_sum`), else from one Mul, Add,
        Max, Min and a BitShift on uint64 (`_requantize_shift`).
        """
        m = np.asarray(multiplier, dtype=np.int64)
        s = np.asarray(shift, dtype=np.int64)
        dtype, x_offset = self.form(x_int64)
        extra = np.zeros((), dtype=np.int64) if offset is None else np.asarray(offset, dtype=np.int64)
        if x_offset:
            # (x_r - z) * m + offset = x_r * m + (offset - z m), x_r the stored value.
            extra = extra - x_offset * m
        if self.target == "cpu" and bound is not None and np.all(s >= 0):
            fast = self.requantize_sum([(x_int64, m, bound)], s, lo, hi, offset)
            if fast is not None:
                return fast
            fast = self._requantize_shift(x_int64, dtype, m, s, lo, hi, extra, bound + abs(x_offset))
            if fast is not None:
                return fast
        return self._requantize_floor_div(self.codes(x_int64), m, s, lo, hi, offset)

    def requantize_sum(self, terms: list[tuple[str, Any, int]], shift, lo: int, hi: int,
                       offset=None) -> str | None:
        """CPU lowering of clamp(round_half_up((sum_i x_i m_i + offset) / 2^s), lo, hi) in float64.

        `terms` contains (x, m, bound): codes in any form (`forms`, including float64 integers
        marked DOUBLE), a multiplier (scalar or per channel) and the largest |code|. Returns
        code - lo like `_requantize_shift` does, or None when an intermediate could reach 2^53
        or the range has 2^31 codes or more.

        With P = sum_i x_i m_i + offset + 2^(s-1) + (-lo) 2^s, an integer, the graph forms
        sum_i x_i (m_i 2^-s) + (P - sum_i x_i m_i) 2^-s. Every operand and partial sum is an
        integer below 2^53 times the power of two 2^-s, so each step is exact and the value
        is P 2^-s. `clamped_floor` then gives clamp(floor(P / 2^s), 0, span). Measured on a
        [8, 197, 768] int32 tensor, this takes 3.3 ms against 6.0 ms for `_requantize_shift`.
        """
        s = np.asarray(shift, dtype=np.int64)
        span = hi - lo
        if span >= 2**31 or np.any(s < 0):
            return None
        s_max = int(s.max())
        offset_max = 0 if offset is None else int(np.abs(np.asarray(offset, dtype=np.int64)).max())
        # Python integers, so that the check itself cannot overflow.
        worst = offset_max + (1 << max(s_max - 1, 0)) + (abs(lo) << s_max)
        for x, m, bound in terms:
            worst += (int(bound) + abs(self.form(x)[1])) * int(np.abs(np.asarray(m, dtype=np.int64)).max())
        if worst >= FLOAT64_EXACT_LIMIT:
            return None

        constant = np.zeros((), dtype=np.int64) if offset is None else np.asarray(offset, dtype=np.int64)
        constant = constant + np.where(s > 0, np.left_shift(np.int64(1), np.maximum(s - 1, 0)), 0)
        constant = constant + np.left_shift(np.int64(-lo), s)
        step = np.ldexp(1.0, -s)
        value = None
        for x, multiplier, _ in terms:
            m = np.asarray(multiplier, dtype=np.int64)
            x_type, x_offset = self.form(x)
            constant = constant - x_offset * m  # x stores code + z, and (x - z) m = x m - z m
            term = x if x_type == TensorProto.DOUBLE else self.node("Cast", [x], to=TensorProto.DOUBLE)
            factor = m * step
            if not np.all(factor == 1.0):
                term = self.node("Mul", [term, self.const(factor, dtype=np.float64)])
            value = term if value is None else self.node("Add", [value, term])

        if np.any(constant != 0):
            value = self.node("Add", [value, self.const(constant * step, dtype=np.float64)])
        out_type = TensorProto.UINT8 if span <= 255 else TensorProto.INT32
        return self.mark(self.clamped_floor(value, span, out_type), out_type, -lo)

    def clamped_floor(self, value: str, upper: int, out_type: int) -> str:
        """Compute clamp(floor(v), 0, upper) of a float64 tensor as `out_type` integers.

        Clip to [0, upper + 1/2] and the Cast to an integer type give it, because onnxruntime
        casts by truncation, which is the floor for values that are not negative. Every upper
        limit in [upper, upper + 1) has the same floor, and a scalar one serves per-channel
        values too. A Floor node before the Clip would add about 1 ms on [8, 197, 768].
        """
        clipped = self.node("Clip", [value, self.const(0.0, dtype=np.float64),
                                     self.const(upper + 0.5, dtype=np.float64)])
        return self.node("Cast", [clipped], to=out_type)

    def _requantize_floor_div(self, x_int64: str, m: np.ndarray, s: np.ndarray, lo: int, hi: int, offset) -> str:
        from onnx_ops.common import FloorDiv

        product = x_int64 if (m.ndim == 0 and int(m) == 1) else self.node("Mul", [x_int64, self.const(m)])
        if offset is not None:
            product = self.node("Add", [product, self.const(offset)])
        half = np.where(s > 0, np.left_shift(np.int64(1), np.maximum(s - 1, 0)), 0).astype(np.int64)
        rounded = self.call(FloorDiv, [self.node("Add", [product, self.const(half)]),
                                       self.const(np.left_shift(np.int64(1), s))])
        return self.node("Min", [self.node("Max", [rounded, self.const(lo)]), self.const(hi)])

    def _requantize_shift(self, x: str, dtype: int, m: np.ndarray, s: np.ndarray, lo: int, hi: int,
                          extra: np.ndarray, bound: int) -> str | None:
        """CPU requantization to code - lo, or None when an int64 intermediate could pass 2^62.

        With P = x m + offset + 2^(s-1) + (-lo) 2^s, the result is floor(P / 2^s) clamped to
        [0, hi - lo], which equals floor(clamp(P, 0, (hi - lo + 1) 2^s - 1) / 2^s) because
        floor(. / 2^s) is monotone. P is non-negative after the clamp, so a logical right
        shift on uint64 is that floor.
        """
        span = hi - lo
        half = np.where(s > 0, np.left_shift(np.int64(1), np.maximum(s - 1, 0)), 0).astype(np.int64)
        constant = extra + half + np.left_shift(np.int64(-lo), s)
        # Per-channel shifts make `upper` a [C] vector. One shift shared by all channels
        # (a scalar bound) was measured no faster: deit_tiny at batch 8 ran 571.5 ms against
        # 569.0 ms side by side.
        upper = np.left_shift(np.int64(span + 1), s) - 1
        worst = bound * int(np.abs(m).max()) + int(np.abs(constant).max())
        if worst >= _INT64_SAFE or int(upper.max()) >= _INT64_SAFE or span >= 2**31:
            return None
        value = x if dtype == TensorProto.INT64 else self.cast(x, TensorProto.INT64)
        if not (m.ndim == 0 and int(m) == 1):
            value = self.node("Mul", [value, self.const(m)])
        value = self.node("Add", [value, self.const(constant)])
        value = self.node("Min", [self.node("Max", [value, self.const(0)]), self.const(upper)])
        if np.any(s > 0):
            unsigned = self.cast(value, TensorProto.UINT64)
            value = self.node("BitShift", [unsigned, self.const(s, dtype=np.uint64)], direction="RIGHT")
        out_type = TensorProto.UINT8 if span <= 255 else TensorProto.INT32
        out = self.cast(value, out_type)
        self._lossless_cast_source[out] = value  # the value is in [0, span] after the clamp
        return self.mark(out, out_type, -lo)

    # Model ----------------------------------------------------------------------------

    def live_nodes(self) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        """Nodes and initializers that a graph output depends on, in order.

        onnxruntime runs every node of a graph, including ones whose results nothing
        reads, so nodes left over by the lowering (a conversion that a later step made
        unnecessary) are dropped here rather than at run time.
        """
        needed = {value.name for value in self.outputs}
        kept = []
        for node in reversed(self.nodes):
            if any(name in needed for name in node.output):
                kept.append(node)
                needed.update(name for name in node.input if name)
        return kept[::-1], [t for t in self.initializers if t.name in needed]

    def make_model(self, functions: list[onnx.FunctionProto], graph_name: str,
                   metadata: dict[str, str]) -> onnx.ModelProto:
        nodes, initializers = self.live_nodes()
        available = {name for node in nodes for name in node.output} | {value.name for value in self.inputs}
        lost = [f"{site} {key}" for site, entry in self.site_tensors.items() for key in ("input", "output")
                if key in entry and entry[key]["name"] not in available]
        if lost:
            raise RuntimeError(f"site tensors dropped as unused, so a mismatch could not be traced: {lost}")
        graph = helper.make_graph(nodes, graph_name, self.inputs, self.outputs, initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET_VERSION), helper.make_opsetid(HNQ_DOMAIN, 1)],
            functions=functions,
            ir_version=IR_VERSION,
            producer_name="hnq",
        )
        for key, value in metadata.items():
            entry = model.metadata_props.add()
            entry.key = key
            entry.value = value
        return model


class _Scope:
    def __init__(self, builder: GraphBuilder, name: str):
        self.builder = builder
        self.name = name

    def __enter__(self) -> GraphBuilder:
        self.builder._scope.append(self.name)
        return self.builder

    def __exit__(self, *exc) -> None:
        self.builder._scope.pop()
