"""Static check of an ONNX model against onnxruntime's CUDA kernel table.

onnxruntime places a node on the CPU, without an error, when its CUDA execution provider
has no kernel for the node's op, opset version or types. `find_cuda_fallbacks` finds those
nodes without a GPU: it inlines the model's local functions, infers every tensor type and
looks each node up in `CUDA_KERNELS`.

Source: the "Operators implemented by CUDAExecutionProvider" section of docs/OperatorKernels.md
in microsoft/onnxruntime at commit 001d12d2623fd411ce0f83d05abb5e82304a3389, rows of the
ai.onnx domain only. NOTE: which onnxruntime-gpu release that commit matches is not known.
Its CPU section lists Cast 25+, so it is at least as new as the release that added opset 25.
Releases add kernels and types, so an older onnxruntime-gpu may fall back on nodes that
pass here.

Two kinds of node need no CUDA kernel. onnxruntime turns Constant nodes into initializers
when it loads the graph. CastLike has no kernel in the table, so onnxruntime expands it
into its ONNX function body, a Cast to the second input's type. It is checked as that Cast.

NOTE: onnxruntime also moves some nodes that do have CUDA kernels to the CPU on purpose: its
GetCpuPreferredNodes (onnxruntime/core/framework/fallback_cpu_capability.h) picks
shape-related subgraphs, such as small int64 chains from Shape into a Reshape. The kernel
table does not mark those nodes, so this check does not report them.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto, inliner, shape_inference

KERNEL_TABLE_COMMIT = "001d12d2623fd411ce0f83d05abb5e82304a3389"

# Type names as the kernel table writes them inside tensor(...).
_FLOATS = frozenset({"double", "float", "float16"})
_FLOATS_BF16 = _FLOATS | {"bfloat16"}
_INT_32_64 = frozenset({"int32", "int64", "uint32", "uint64"})
_ARITHMETIC_13 = _FLOATS_BF16 | _INT_32_64
_ARITHMETIC_7 = _FLOATS | _INT_32_64
_ALL_NUMERIC = _FLOATS_BF16 | {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}
# The element types of data-movement kernels (Reshape, Transpose, Gather, ...).
_ALL_TENSOR = _ALL_NUMERIC | {"bool"}
_FLOAT8 = frozenset({"float8e4m3fn", "float8e5m2"})
_FLOAT8_ALL = _FLOAT8 | {"float8e4m3fnuz", "float8e5m2fnuz"}
_INDICES = frozenset({"int32", "int64"})
_COMPARED = _FLOATS | _INT_32_64


@dataclass(frozen=True)
class KernelRange:
    """One row of the kernel table: the opset versions it covers and the types it takes."""

    since_min: int
    since_max: int | None  # None for an open range ("13+")
    types: dict[str, frozenset[str]]  # type constraint -> allowed element types

    def covers(self, since_version: int) -> bool:
        return self.since_min <= since_version and (self.since_max is None or since_version <= self.since_max)

    def label(self) -> str:
        if self.since_max is None:
            return f"{self.since_min}+"
        if self.since_max == self.since_min:
            return str(self.since_min)
        return f"[{self.since_min}, {self.since_max}]"


@dataclass(frozen=True)
class CudaOp:
    """The CUDA kernels of one op.

    `bindings` maps each type constraint to the tensors it types: "i0" is input 0, "o0"
    output 0 and "i*" every input (variadic ops such as Min and Concat). Inputs with a
    fixed type in the schema (Reshape's shape, Expand's shape) are not listed.
    """

    op_type: str
    domain: str
    bindings: dict[str, tuple[str, ...]]
    kernels: tuple[KernelRange, ...]


def _op(op_type: str, bindings: dict[str, tuple[str, ...]], *rows: tuple) -> CudaOp:
    """Build a CudaOp from rows (since_min, since_max, {constraint: types})."""
    return CudaOp(op_type, "", bindings, tuple(KernelRange(lo, hi, types) for lo, hi, types in rows))


def _same_types(op_type: str, bindings: dict[str, tuple[str, ...]], ranges: list[tuple[int, int | None]],
                types: dict[str, frozenset[str]]) -> CudaOp:
    """Build a CudaOp whose rows all take the same types."""
    return _op(op_type, bindings, *((lo, hi, types) for lo, hi in ranges))


_UNARY = {"T": ("i0", "o0")}
_BINARY = {"T": ("i0", "i1", "o0")}
_VARIADIC = {"T": ("i*", "o0")}
_COMPARE = {"T": ("i0", "i1"), "T1": ("o0",)}
_DATA_ONLY = {"T": ("i0", "o0")}
_INDEXED = {"T": ("i0", "o0"), "Tind": ("i1",)}


def _binary_arithmetic(op_type: str) -> CudaOp:
    return _op(op_type, _BINARY,
               (14, None, {"T": _ALL_NUMERIC}),
               (13, 13, {"T": _ARITHMETIC_13}),
               (7, 12, {"T": _ARITHMETIC_7}))


def _comparison(op_type: str, ranges: list[tuple[int, int | None]], older: tuple | None = None) -> CudaOp:
    rows = [(lo, hi, {"T": _COMPARED, "T1": frozenset({"bool"})}) for lo, hi in ranges]
    if older is not None:
        rows.append(older)
    return _op(op_type, _COMPARE, *rows)


_CAST_13 = _ALL_TENSOR
_CAST_9 = _ALL_TENSOR - {"bfloat16"}
_CAST_TO_13 = _ALL_TENSOR | _FLOAT8 | {"float4e2m1"}

_OPS = [
    _op("Abs", _UNARY, (13, None, {"T": _ALL_NUMERIC}), (6, 12, {"T": _ALL_NUMERIC - {"bfloat16"}})),
    _binary_arithmetic("Add"),
    _binary_arithmetic("Sub"),
    _binary_arithmetic("Mul"),
    _binary_arithmetic("Div"),
    _op("Mod", _BINARY, (13, None, {"T": _ARITHMETIC_13}), (10, 12, {"T": _ARITHMETIC_7})),
    _op("Pow", {"T": ("i0", "o0"), "T1": ("i1",)},
        (15, None, {"T": _FLOATS_BF16 | {"int32", "int64"}, "T1": _FLOATS_BF16 | {"int32", "int64"}}),
        (13, 14, {"T": _FLOATS_BF16 | {"int32", "int64"}, "T1": _FLOATS | {"int32", "int64"}}),
        (12, 12, {"T": _FLOATS | {"int32", "int64"}, "T1": _FLOATS | {"int32", "int64"}}),
        (7, 11, {"T": _FLOATS, "T1": _FLOATS})),
    _op("Neg", _UNARY,
        (13, None, {"T": _FLOATS_BF16 | {"int8", "int16", "int32", "int64"}}),
        (6, 12, {"T": _FLOATS | {"int8", "int16", "int32", "int64"}})),
    _op("Sign", _UNARY, (13, None, {"T": _ALL_NUMERIC})),
    _op("Floor", _UNARY, (13, None, {"T": _FLOATS}), (6, 12, {"T": _FLOATS})),
    _op("Min", _VARIADIC, (13, None, {"T": _ARITHMETIC_13}), (12, 12, {"T": _ARITHMETIC_13}),
        (6, 11, {"T": _FLOATS_BF16})),
    _op("Max", _VARIADIC, (13, None, {"T": _ARITHMETIC_13}), (12, 12, {"T": _ARITHMETIC_13}),
        (6, 11, {"T": _FLOATS_BF16})),
    # The CUDA Clip takes no int32, unlike the CPU one.
    _op("Clip", _VARIADIC,
        (13, None, {"T": _FLOATS | {"int8", "int64", "uint8", "uint64"}}),
        (12, 12, {"T": _FLOATS | {"int8", "int64", "uint8", "uint64"}}),
        (11, 11, {"T": frozenset({"float"})}),
        (6, 10, {"T": frozenset({"float"})})),
    _comparison("Less", [(13, None), (9, 12)], (7, 8, {"T": _FLOATS})),
    _comparison("Greater", [(13, None), (9, 12)], (7, 8, {"T": _FLOATS})),
    _comparison("LessOrEqual", [(16, None), (12, 15)]),
    _comparison("GreaterOrEqual", [(16, None), (12, 15)]),
    _op("Equal", _COMPARE,
        (13, None, {"T": _COMPARED | {"bool"}, "T1": frozenset({"bool"})}),
        (11, 12, {"T": _COMPARED | {"bool"}}),
        (7, 10, {"T": frozenset({"bool", "int32", "int64"})})),
    _op("Where", {"B": ("i0",), "T": ("i1", "i2", "o0")},
        (16, None, {"B": frozenset({"bool"}), "T": _FLOATS_BF16 | {"int32", "int64", "uint8"}}),
        (9, 15, {"B": frozenset({"bool"}), "T": _FLOATS | {"int32", "int64", "uint8"}})),
    _op("Not", _UNARY, (1, None, {"T": frozenset({"bool"})})),
    _op("And", _COMPARE, (7, None, {"T": frozenset({"bool"}), "T1": frozenset({"bool"})})),
    _op("Or", _COMPARE, (7, None, {"T": frozenset({"bool"}), "T1": frozenset({"bool"})})),
    _op("Xor", _COMPARE, (7, None, {"T": frozenset({"bool"}), "T1": frozenset({"bool"})})),
    _op("Cast", {"T1": ("i0",), "T2": ("o0",)},
        (23, None, {"T1": _CAST_TO_13, "T2": _CAST_TO_13}),
        (21, 22, {"T1": _CAST_13 | _FLOAT8, "T2": _CAST_TO_13}),
        (19, 20, {"T1": _CAST_13 | _FLOAT8, "T2": _CAST_TO_13}),
        (13, 18, {"T1": _CAST_13, "T2": _CAST_TO_13}),
        (9, 12, {"T1": _CAST_9, "T2": _CAST_TO_13}),
        (6, 8, {"T1": _CAST_9, "T2": _CAST_TO_13})),
    _op("Reshape", _DATA_ONLY,
        (23, None, {"T": _ALL_TENSOR | _FLOAT8_ALL}),
        (21, 22, {"T": _ALL_TENSOR | _FLOAT8_ALL}),
        (19, 20, {"T": _ALL_TENSOR | _FLOAT8_ALL}),
        (14, 18, {"T": _ALL_TENSOR}),
        (13, 13, {"T": _ALL_TENSOR}),
        (5, 12, {"T": _ALL_TENSOR}),
        (1, 4, {"T": _ALL_TENSOR})),
    _op("Shape", {"T": ("i0",), "T1": ("o0",)},
        (23, None, {"T": _ALL_TENSOR | _FLOAT8_ALL, "T1": frozenset({"int64"})}),
        (21, 22, {"T": _ALL_TENSOR | _FLOAT8_ALL, "T1": frozenset({"int64"})}),
        (19, 20, {"T": _ALL_TENSOR | _FLOAT8_ALL, "T1": frozenset({"int64"})}),
        (15, 18, {"T": _ALL_TENSOR, "T1": frozenset({"int64"})}),
        (13, 14, {"T": _ALL_TENSOR, "T1": frozenset({"int64"})}),
        (1, 12, {"T": _ALL_TENSOR, "T1": frozenset({"int64"})})),
    _same_types("Transpose", _DATA_ONLY, [(23, None), (21, 22), (13, 20), (1, 12)], {"T": _ALL_TENSOR}),
    _same_types("Unsqueeze", _DATA_ONLY, [(23, None), (21, 22), (13, 20), (11, 12), (1, 10)], {"T": _ALL_TENSOR}),
    _same_types("Squeeze", _DATA_ONLY, [(23, None), (21, 22), (13, 20), (11, 12), (1, 10)], {"T": _ALL_TENSOR}),
    _same_types("Flatten", _DATA_ONLY, [(13, None), (11, 12), (9, 10), (1, 8)], {"T": _ALL_TENSOR}),
    _same_types("Expand", _DATA_ONLY, [(13, None), (8, 12)], {"T": _ALL_TENSOR}),
    _same_types("Concat", _VARIADIC, [(13, None), (11, 12), (4, 10)], {"T": _ALL_TENSOR}),
    _same_types("Split", {"T": ("i0", "o0")}, [(18, None), (13, 17), (11, 12), (2, 10)], {"T": _ALL_TENSOR}),
    _same_types("Gather", _INDEXED, [(13, None), (11, 12), (1, 10)], {"T": _ALL_TENSOR, "Tind": _INDICES}),
    _same_types("GatherElements", _INDEXED, [(13, None), (11, 12)], {"T": _ALL_TENSOR, "Tind": _INDICES}),
    _op("Slice", {"T": ("i0", "o0"), "Tind": ("i1", "i2", "i3", "i4")},
        (13, None, {"T": _ALL_TENSOR, "Tind": _INDICES}),
        (11, 12, {"T": _ALL_TENSOR, "Tind": _INDICES}),
        (10, 10, {"T": _ALL_TENSOR, "Tind": _INDICES}),
        (1, 9, {"T": _ALL_TENSOR})),
    _op("Tile", {"T": ("i0", "o0"), "T1": ("i1",)},
        (13, None, {"T": _FLOATS_BF16 | {"int32", "int64"}, "T1": frozenset({"int64"})}),
        (6, 12, {"T": _FLOATS | {"int32", "int64"}, "T1": frozenset({"int64"})})),
    # Identity 14+ also takes sequences (constraint V). Only its tensor types are listed.
    _op("Identity", {"T": ("i0", "o0"), "V": ("i0", "o0")},
        (19, None, {"V": _ALL_TENSOR | _FLOAT8_ALL}),
        (14, 18, {"V": _ALL_TENSOR}),
        (13, 13, {"T": _ALL_TENSOR}),
        (1, 12, {"T": _ALL_TENSOR})),
    _op("ConstantOfShape", {"T1": ("i0",), "T2": ("o0",)},
        (9, None, {"T1": frozenset({"int64"}), "T2": _ALL_TENSOR})),
    _op("Range", {"T": ("i*", "o0")}, (11, None, {"T": frozenset({"double", "float", "int16", "int32", "int64"})})),
    _op("ReduceSum", _DATA_ONLY, (13, None, {"T": _FLOATS_BF16 | {"int32", "int64"}}),
        (1, 12, {"T": _FLOATS | {"int32", "int64"}})),
    _same_types("ReduceMax", _DATA_ONLY, [(18, None), (1, 17)], {"T": _FLOATS | {"int32", "int64"}}),
    _same_types("ReduceMin", _DATA_ONLY, [(18, None), (1, 17)],
                {"T": _FLOATS | {"int8", "int32", "int64", "uint8"}}),
    _op("MatMul", _BINARY, (13, None, {"T": _FLOATS_BF16}), (9, 12, {"T": _FLOATS}), (1, 8, {"T": _FLOATS})),
    # Only s8 x s8 has a CUDA kernel. The u8 x s8 form, the fast one on the CPU, has none.
    _op("MatMulInteger", {"T1": ("i0", "i2"), "T2": ("i1", "i3"), "T3": ("o0",)},
        (10, None, {"T1": frozenset({"int8"}), "T2": frozenset({"int8"}), "T3": frozenset({"int32"})})),
]

# BitShift and the Bitwise ops have no CUDA kernel at that commit, so they are absent here.
CUDA_KERNELS: dict[tuple[str, str], CudaOp] = {(op.domain, op.op_type): op for op in _OPS}

# Nodes that onnxruntime removes before it assigns kernels (see the module docstring).
_FOLDED_AT_LOAD = frozenset({"Constant"})

_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class Fallback:
    """A node that onnxruntime's CUDA provider cannot run, so it would run on the CPU.

    `kind` is "no-kernel" (no CUDA kernel for the op), "type" (no kernel for these types),
    "opset" (no kernel for this opset version) or "unknown" (the types or the op could not
    be determined, so the node was not checked).
    """

    op_type: str
    node_name: str
    input_types: tuple[str | None, ...]
    kind: str
    reason: str

    def describe(self) -> str:
        types = ", ".join(t or "?" for t in self.input_types)
        return f"{self.op_type} {self.node_name or '(unnamed)'} ({types}): {self.reason}"


def find_cuda_fallbacks(model: onnx.ModelProto) -> list[Fallback]:
    """Return every node of `model` that onnxruntime's CUDA provider has no kernel for.

    Local functions are inlined first, so the nodes are the ones onnxruntime assigns.
    Nodes whose types shape inference cannot find are reported with kind "unknown".
    """
    inlined = inliner.inline_local_functions(model)
    try:
        inferred = shape_inference.infer_shapes(inlined, data_prop=True)
    except onnx.shape_inference.InferenceError:
        # Without data propagation, fewer shapes are known but the types usually are.
        inferred = shape_inference.infer_shapes(inlined)
    types = _tensor_types(inferred.graph)
    opsets = {entry.domain: entry.version for entry in inferred.opset_import}
    fallbacks = []
    for node in inferred.graph.node:
        fallback = check_node(node, types, opsets)
        if fallback is not None:
            fallbacks.append(fallback)
    return fallbacks


def check_node(node: onnx.NodeProto, types: dict[str, str], opsets: dict[str, int]) -> Fallback | None:
    """Return why `node` would fall back to the CPU, or None when a CUDA kernel takes it.

    `types` maps tensor names to element type names ("int8", ...). `opsets` maps each
    domain to the model's opset version.
    """
    input_types = tuple(types.get(name) if name else None for name in node.input)

    def fallback(kind: str, reason: str) -> Fallback:
        return Fallback(node.op_type, node.name, input_types, kind, reason)

    if node.domain not in _DEFAULT_DOMAINS:
        return fallback("no-kernel", f"domain {node.domain!r} is not checked: the table here covers ai.onnx only")
    if node.op_type in _FOLDED_AT_LOAD:
        return None
    if any(attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attribute in node.attribute):
        return fallback("unknown", "nodes with subgraphs (If, Loop, Scan) are not checked")
    version = opsets.get("", opsets.get("ai.onnx"))
    if version is None:
        return fallback("unknown", "the model imports no ai.onnx opset")
    try:
        since_version = onnx.defs.get_schema(node.op_type, version, "").since_version
    except onnx.defs.SchemaError:
        return fallback("unknown", f"ONNX has no op {node.op_type!r} at opset {version}")

    if node.op_type == "CastLike":
        # onnxruntime expands CastLike into Cast(input 0, to = the type of input 1).
        cast_since = onnx.defs.get_schema("Cast", version, "").since_version
        cast_types = {"T1": _binding_types(node, "i0", types), "T2": _binding_types(node, "i1", types)}
        return _check_types(CUDA_KERNELS[("", "Cast")], cast_since, cast_types, fallback,
                            "CastLike, expanded into Cast,")

    op = CUDA_KERNELS.get(("", node.op_type))
    if op is None:
        return fallback("no-kernel", f"the CUDA provider has no {node.op_type} kernel")
    kernel = next((row for row in op.kernels if row.covers(since_version)), None)
    if kernel is None:
        ranges = ", ".join(row.label() for row in op.kernels)
        return fallback("opset", f"{node.op_type} version {since_version} (opset {version}) has no CUDA kernel; "
                                 f"kernels exist for versions {ranges}")
    bound = {constraint: [t for position in positions for t in _binding_types(node, position, types)]
             for constraint, positions in op.bindings.items() if constraint in kernel.types}
    return _check_types(op, since_version, bound, fallback, node.op_type)


def _check_types(op: CudaOp, since_version: int, bound: dict[str, list[str | None]], fallback,
                 what: str) -> Fallback | None:
    kernel = next(row for row in op.kernels if row.covers(since_version))
    for constraint, found in bound.items():
        if any(t is None for t in found):
            return fallback("unknown", f"shape inference found no type for a tensor of constraint {constraint}, "
                                       "so the node was not checked")
        rejected = sorted({t for t in found if t not in kernel.types[constraint]})
        if rejected:
            allowed = ", ".join(sorted(kernel.types[constraint]))
            return fallback("type", f"the CUDA {what} kernel (version {kernel.label()}) takes {constraint} in "
                                    f"{{{allowed}}}, not {', '.join(rejected)}")
    return None


def _binding_types(node: onnx.NodeProto, position: str, types: dict[str, str]) -> list[str | None]:
    """Element types of the tensors at `position` ("i0", "o0", "i*"); absent optional inputs are skipped."""
    names = node.input if position[0] == "i" else node.output
    if position[1:] == "*":
        selected = list(names)
    else:
        index = int(position[1:])
        selected = [names[index]] if index < len(names) else []
    return [types.get(name) for name in selected if name]


def _tensor_types(graph: onnx.GraphProto) -> dict[str, str]:
    """Map each tensor of `graph` with a known element type to its type name."""
    types: dict[str, str] = {}
    for info in [*graph.input, *graph.output, *graph.value_info]:
        elem_type = info.type.tensor_type.elem_type if info.type.HasField("tensor_type") else 0
        if elem_type:
            types[info.name] = _type_name(elem_type)
    for initializer in graph.initializer:
        types[initializer.name] = _type_name(initializer.data_type)
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.t.data_type:
                    types[node.output[0]] = _type_name(attribute.t.data_type)
    return types


def _type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type).lower()
