"""The CPU lowering's shortcuts (BitShift requantization, lookup tables) equal the integer reference on every code."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from hnq.nn import GeluSite, SoftmaxSite, quantizer_requantize
from hnq.onnx_builder import GraphBuilder
from hnq.quant import QTensor
from hnq.schemes.registry import onnx_functions

_FUNCTIONS = onnx_functions()


def run_graph(b: GraphBuilder, output: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Run `output` of builder `b` in ORT CPU as plain int64 codes, at no and at full graph optimization."""
    plain = b.codes(output)
    b.add_output(plain, TensorProto.INT64, ["rows", "columns"])
    model = b.make_model(_FUNCTIONS, graph_name="lowering_test", metadata={})
    onnx.checker.check_model(model, full_check=True)
    results = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        results.append(session.run([plain], feeds)[0])
    assert np.array_equal(results[0], results[1])
    return results[0]


def stored_input(b: GraphBuilder, bits: int) -> str:
    """Graph input of int64 codes, converted to the CPU form code - code_min (uint8 up to 8 bits, else int32)."""
    x = b.add_input("x", TensorProto.INT64, ["rows", "columns"])
    shifted = b.node("Add", [x, b.const(2 ** (bits - 1))])
    elem_type = TensorProto.UINT8 if bits <= 8 else TensorProto.INT32
    return b.mark(b.cast(shifted, elem_type), elem_type, 2 ** (bits - 1))


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [8, 16])
def test_bitshift_requantize_equals_floor_div(per_channel, bits):
    rng = np.random.default_rng(bits)
    bound = 2**24
    values = np.concatenate([rng.integers(-bound, bound + 1, (64, 6)), np.array([[-bound] * 6, [bound] * 6,
                                                                                   [0] * 6, [-1] * 6, [1] * 6])])
    if per_channel:
        multiplier = rng.integers(2**30, 2**31, 6)
        shift = rng.integers(28, 44, 6)
        offset = rng.integers(-(2**40), 2**40, 6)
    else:
        multiplier, shift, offset = np.int64(1518500250), np.int64(38), None
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    outputs = {}
    for target in ("cpu", "cuda"):
        b = GraphBuilder(target=target)
        x = b.add_input("x", TensorProto.INT64, ["rows", "columns"])
        y = b.requantize(x, multiplier, shift, lo, hi, offset=offset, bound=bound)
        outputs[target] = run_graph(b, y, {"x": values.astype(np.int64)})
    m = torch.as_tensor(multiplier)
    s = torch.as_tensor(shift)
    product = torch.from_numpy(values) * m + (torch.as_tensor(offset) if offset is not None else 0)
    expected = ((product + torch.where(s > 0, torch.ones_like(s) << (s - 1).clamp(min=0), 0)) >> s).clamp(lo, hi)
    assert np.array_equal(outputs["cpu"], expected.numpy())
    assert np.array_equal(outputs["cuda"], expected.numpy())


def calibrated_site(site, scheme: str, absmax: float):
    site.scheme_name = scheme
    site.site_name = "site"
    quantizer = site.input_quantizer() if isinstance(site, SoftmaxSite) else None
    if quantizer is not None:
        quantizer.running_absmax.fill_(absmax)
    site.eval()
    return site


@pytest.mark.parametrize("scheme", ["ibert", "ivit"])
@pytest.mark.parametrize("bits", [8, 6])
@pytest.mark.parametrize("absmax", [3.0, 12.0, 40.0])
def test_softmax_table_equals_reference(scheme, bits, absmax):
    """Rows that reach every row difference d = x - rowmax, plus random rows."""
    length = 2**bits
    site = calibrated_site(SoftmaxSite(bits, 8, length=length), scheme, absmax)
    site.in_quant.bits = bits
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    ramp = torch.arange(hi, lo - 1, -1)
    generator = torch.Generator().manual_seed(bits)
    rows = torch.cat([ramp[None], ramp.flip(0)[None], torch.randint(lo, hi + 1, (6, length), generator=generator),
                      torch.full((1, length), lo), torch.full((1, length), hi)])
    x = QTensor(rows, site.in_quant.scale, bits, True)
    c = site.constants(x, output_bits=8)
    b = GraphBuilder(target="cpu")
    probs = site.table_onnx(b, QTensor(stored_input(b, bits), x.scale, bits, True), c)
    assert probs is not None, "the table path did not apply"
    got = run_graph(b, probs, {"x": rows.numpy()})
    assert np.array_equal(got, site.scheme.reference(rows, c).numpy())


@pytest.mark.parametrize("scheme,bits", [("ibert", 16), ("ibert", 8), ("ivit", 8), ("ivit-shift", 8), ("ivit", 6)])
@pytest.mark.parametrize("scale", [0.002, 0.05])
def test_gelu_table_equals_reference(scheme, bits, scale):
    """Every input code, and for row-dependent schemes every code under every row maximum."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = torch.arange(lo, hi + 1)
    site = calibrated_site(GeluSite(8, length=len(codes)), scheme, 0.0)
    site.out_quant.running_absmax.fill_(4.0)
    rows = codes.reshape(-1, 256) if site.scheme.elementwise and bits > 8 else \
        torch.minimum(codes[None, :], codes[:, None])
    x = QTensor(rows, scale, bits, True)
    c = site.constants(x)
    b = GraphBuilder(target="cpu")
    y = site.table_onnx(b, QTensor(stored_input(b, bits), scale, bits, True), c)
    assert y is not None, "the table path did not apply"
    got = run_graph(b, y.value, {"x": rows.numpy()})
    out = site.scheme.reference(rows, c)
    bound = max(abs(c.output_min), abs(c.output_max))
    expected = quantizer_requantize(site.out_quant, out, c.output_scale, bound).value
    assert np.array_equal(got, expected.numpy())


def graph_ops(b: GraphBuilder) -> set[str]:
    return {node.op_type for node in b.nodes}


@pytest.mark.parametrize("multiplier,shift", [(3, 1), (5, 2), (2**27 + 12345, 40), ([3, 2**20 + 1, 7, 2**26 - 1], [1, 30, 3, 38])])
def test_float64_requantize_equals_floor_div(multiplier, shift):
    """The float64 lowering on values that include every rounding tie of small shifts."""
    rng = np.random.default_rng(7)
    bound = 2**22
    values = np.concatenate([rng.integers(-bound, bound + 1, (64, 4)), np.arange(-64, 64).reshape(-1, 4),
                             np.array([[-bound] * 4, [bound] * 4])]).astype(np.int64)
    m, s = np.asarray(multiplier, dtype=np.int64), np.asarray(shift, dtype=np.int64)
    offset = np.array([-7, 0, 5, 1], dtype=np.int64) << np.minimum(s, 20)
    b = GraphBuilder(target="cpu")
    y = b.requantize(b.add_input("x", TensorProto.INT64, ["rows", "columns"]), m, s, -128, 127,
                     offset=offset, bound=bound)
    assert "Clip" in graph_ops(b), "the float64 path did not apply"
    assert "BitShift" not in graph_ops(b)
    got = run_graph(b, y, {"x": values})
    product = torch.from_numpy(values) * torch.from_numpy(np.broadcast_to(m, (4,)).copy()) + torch.from_numpy(offset)
    half = torch.from_numpy(np.where(s > 0, np.left_shift(1, np.maximum(s - 1, 0)), 0))
    expected = ((product + half) >> torch.from_numpy(np.broadcast_to(s, (4,)).copy())).clamp(-128, 127)
    assert np.array_equal(got, expected.numpy())


def test_float64_requantize_of_a_sum_with_offset_forms():
    """Two uint8 operands stored as code + 128, as the residual add feeds them."""
    codes = np.array(np.meshgrid(np.arange(-128, 128), np.arange(-128, 128))).reshape(2, -1, 8).astype(np.int64)
    m_a, m_c, s = 3_000_001, 1_234_567, 23
    b = GraphBuilder(target="cpu")
    x = b.add_input("x", TensorProto.INT64, ["rows", "columns"])
    z = b.add_input("z", TensorProto.INT64, ["rows", "columns"])
    stored = [b.mark(b.cast(b.node("Add", [t, b.const(128)]), TensorProto.UINT8), TensorProto.UINT8, 128)
              for t in (x, z)]
    y = b.requantize_sum([(stored[0], m_a, 128), (stored[1], m_c, 128)], s, -(2**15), 2**15 - 1)
    assert y is not None, "the float64 path did not apply"
    assert "BitShift" not in graph_ops(b)
    got = run_graph(b, y, {"x": codes[0], "z": codes[1]})
    expected = ((codes[0] * m_a + codes[1] * m_c + (1 << (s - 1))) >> s).clip(-(2**15), 2**15 - 1)
    assert np.array_equal(got, expected)


def test_float64_requantize_declines_past_2_53():
    b = GraphBuilder(target="cpu")
    x = b.add_input("x", TensorProto.INT64, ["rows", "columns"])
    assert b.requantize_sum([(x, 2**31 - 1, 2**22)], 40, -128, 127) is None
    assert b.requantize_sum([(x, 2**30, 2**22)], 40, -128, 127) is not None


@pytest.mark.parametrize("absmax", [0.3, 3.0, 40.0])
def test_fqvit_ratio_table_equals_reference(absmax):
    """FQ-ViT's table lowering, with the split row sum (absmax 0.3) and the single one."""
    length = 256
    site = calibrated_site(SoftmaxSite(8, 8, length=length), "fqvit", absmax)
    ramp = torch.arange(127, -129, -1)
    generator = torch.Generator().manual_seed(3)
    rows = torch.cat([ramp[None], ramp.flip(0)[None], torch.randint(-128, 128, (6, length), generator=generator),
                      torch.full((1, length), -128), torch.full((1, length), 127),
                      torch.cat([torch.tensor([127]), torch.full((length - 1,), -128)])[None]])
    x = QTensor(rows, site.in_quant.scale, 8, True)
    c = site.constants(x, output_bits=8)
    b = GraphBuilder(target="cpu")
    probs = site.ratio_table_onnx(b, QTensor(stored_input(b, 8), x.scale, 8, True), c)
    assert probs is not None, "the table path did not apply"
    got = run_graph(b, probs, {"x": rows.numpy()})
    assert np.array_equal(got, site.scheme.reference(rows, c).numpy())


def test_safe_dyadic_prefers_the_float64_range():
    from hnq.quant import FLOAT64_MIN_MULTIPLIER_BITS, safe_dyadic

    d = safe_dyadic(0.37, 2**22)
    assert 2**22 * d.multiplier < 2**53
    assert d.multiplier.bit_length() >= FLOAT64_MIN_MULTIPLIER_BITS
    wide = safe_dyadic(0.37, 2**35)  # 2^53 would leave 18 bits, so the int64 range applies
    assert 2**53 <= 2**35 * wide.multiplier < 2**62


def test_safe_dyadic_output_bound_sets_room():
    """A LayerNorm-wide input (2^31) with 8-bit outputs still fits the float64 range."""
    from hnq.quant import FLOAT64_STEP_ERROR_BITS, safe_dyadic

    d = safe_dyadic(3e-7, 2**31, output_bound=128)
    assert 2**31 * d.multiplier + (129 << d.shift) < 2**53
    assert d.multiplier.bit_length() >= 8 + FLOAT64_STEP_ERROR_BITS
    b = GraphBuilder(target="cpu")
    x = b.add_input("x", TensorProto.INT64, ["rows", "columns"])
    assert b.requantize_sum([(x, d.multiplier, 2**31)], d.shift, -128, 127) is not None


@pytest.mark.parametrize("scheme", ["ibert", "ivit"])
def test_layernorm_float64_equals_reference(scheme):
    """16-bit residual codes stored as int32 code + 2^15, with random, constant and extreme rows."""
    from hnq.nn import LayerNormSite

    length = 96
    norm = torch.nn.LayerNorm(length)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(length, generator=generator) * 4 - 2)
        norm.bias.copy_(torch.rand(length, generator=generator) * 2 - 1)
    site = calibrated_site(LayerNormSite(norm, 8), scheme, 0.0)
    site.out_quant.running_absmax.fill_(3.0)
    lo, hi = -(2**15), 2**15 - 1
    rows = torch.cat([torch.randint(lo, hi + 1, (8, length), generator=generator),
                      torch.randint(-40, 41, (4, length), generator=generator),
                      torch.full((1, length), 123), torch.full((1, length), lo),
                      torch.tensor([lo, hi]).repeat(length // 2)[None]])
    x = QTensor(rows, 0.01, 16, True)
    expected = site.integer_forward(x).value

    b = GraphBuilder(target="cpu")
    y = site.to_onnx(b, QTensor(stored_input(b, 16), x.scale, 16, True))
    assert "Floor" in graph_ops(b), "the float64 path did not apply"
    assert not any(node.domain == "hnq" and "LayerNorm" in node.op_type for node in b.nodes)
    got = run_graph(b, y.value, {"x": rows.numpy()})
    assert np.array_equal(got, expected.numpy())
