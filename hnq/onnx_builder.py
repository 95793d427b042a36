"""A small graph builder over onnx.helper, used by the modules' `to_onnx` methods.

Names are made unique per builder; constants become initializers. Integer helpers
(`floor_div`, `requantize`, ...) emit calls to the `hnq`-domain functions of
`onnx_ops.common`, so the lowering of each integer step is written once.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_ops.common import HNQ_DOMAIN, IR_VERSION, OPSET_VERSION

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


def onnx_dtype(dtype) -> int:
    return _NP_TO_ONNX[np.dtype(dtype)]


class GraphBuilder:
    """Collects nodes, initializers, inputs and outputs of one ONNX graph."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._counts: Counter[str] = Counter()
        self._scope: list[str] = []
        self._constant_cache: dict[tuple, str] = {}
        # Site name -> its input and output tensors and the node that calls its scheme,
        # recorded in the model's metadata so a mismatch can be traced to a site.
        self.site_tensors: dict[str, dict[str, str]] = {}
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
        return outputs[0] if n_outputs == 1 else outputs

    def call(self, function, inputs: list[str], name: str | None = None) -> str:
        """Call an `hnq`-domain function (an onnxscript function object) with tensor inputs."""
        return self.node(function.name, inputs, domain=HNQ_DOMAIN, name=name or function.name)

    # Integer steps --------------------------------------------------------------------

    def cast(self, x: str, elem_type: int) -> str:
        return self.node("Cast", [x], to=elem_type)

    def requantize(self, x_int64: str, multiplier, shift, lo: int, hi: int, offset=None) -> str:
        """clamp(round_half_up((x * m + offset) / 2^s), lo, hi) on int64, m and s scalars or per channel."""
        from onnx_ops.common import FloorDiv

        product = self.node("Mul", [x_int64, self.const(multiplier)])
        if offset is not None:
            product = self.node("Add", [product, self.const(offset)])
        shift_arr = np.asarray(shift, dtype=np.int64)
        half = np.where(shift_arr > 0, np.left_shift(np.int64(1), np.maximum(shift_arr - 1, 0)), 0).astype(np.int64)
        rounded = self.call(FloorDiv, [self.node("Add", [product, self.const(half)]),
                                       self.const(np.left_shift(np.int64(1), shift_arr))])
        return self.node("Min", [self.node("Max", [rounded, self.const(lo)]), self.const(hi)])

    # Model ----------------------------------------------------------------------------

    def make_model(self, functions: list[onnx.FunctionProto], graph_name: str,
                   metadata: dict[str, str]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
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
