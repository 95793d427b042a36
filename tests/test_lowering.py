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
