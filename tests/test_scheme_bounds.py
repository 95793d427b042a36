"""Every scheme keeps each intermediate within `bounds(c)` on worst-case rows, in torch and in ORT.

The rows sit at the corners of the input code range (constant rows, one maximum among
minima, alternation, ramps, every code) at the row lengths and channel widths of the
common ViTs. The torch reference records every intermediate and each is compared with its
declared bound. ORT is checked on the same rows by equality with the reference, in int64,
and in int32 for every setting whose bounds are all below 2^31: that is the condition
under which a scheme may be lowered in int32.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from hnq.intops import POWERS_OF_TWO
from hnq.schemes.base import SiteInput
from hnq.schemes.registry import all_schemes, get_scheme, onnx_functions
from onnx_ops.common import HNQ_DOMAIN, IR_VERSION, OPSET_VERSION

INT32_LIMIT = 2**31
SOFTMAX_LENGTHS = (49, 50, 197, 577)
CHANNEL_WIDTHS = (96, 192, 384, 768, 1024)
SOFTMAX_SCALES = (0.02, 10 / 127, 0.5)
GELU_SCALES = (0.01, 10 / 127, 0.5)
# I-BERT GELU is built for the 16-bit accumulator of the preceding linear layer.
WIDE_GELU_SCALES = (1e-4, 10 / 32767)
SOFTMAX_VARIANTS = (
    ("ibert", {"output_bits": 8}), ("ibert", {"output_bits": 16}),
    ("ivit", {"output_bits": 8}), ("ivit", {"output_bits": 16}),
    ("fqvit", {"output_bits": 8, "log_bits": 4}), ("fqvit", {"output_bits": 8, "log_bits": 6}),
)

_FUNCTIONS = onnx_functions()
_ONNX_TYPES = {np.int64: TensorProto.INT64, np.int32: TensorProto.INT32}


def int32_constant(value: np.ndarray) -> np.ndarray:
    """Cast one constant input to int32; the 2^0..2^62 table keeps its entries below 2^31.

    A scheme whose bounds are all below 2^31 gathers only powers below 2^31 from that table,
    so the truncated table gives the same results. Any other constant must fit int32.
    """
    array = np.asarray(value, dtype=np.int64)
    if array.shape == (len(POWERS_OF_TWO),) and np.array_equal(array, POWERS_OF_TWO):
        array = array[:31]
    assert np.all(np.abs(array) < INT32_LIMIT), f"constant {array.tolist()} does not fit int32"
    return array.astype(np.int32)


def scheme_node_model(scheme, constant_names: list[str], extra_inputs: list, initializers: list,
                      onnx_type: int, rank: int) -> onnx.ModelProto:
    """Check and return a one-node model y = scheme function(x, *constants), x and y of `onnx_type`.

    The constants are initializers, extra graph inputs, or both; `extra_inputs` are their
    value infos when they are graph inputs.
    """
    dims = [f"d{i}" for i in range(rank)]
    x = helper.make_tensor_value_info("x", onnx_type, dims)
    y = helper.make_tensor_value_info("y", onnx_type, dims)
    node = helper.make_node(scheme.onnx_function.name, ["x", *constant_names], ["y"], domain=HNQ_DOMAIN)
    graph = helper.make_graph([node], f"{scheme.op}_{scheme.name}", [x, *extra_inputs], [y],
                              initializer=initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET_VERSION), helper.make_opsetid(HNQ_DOMAIN, 1)],
        functions=_FUNCTIONS,
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def build_model(scheme, c, rank: int, dtype=np.int64) -> onnx.ModelProto:
    """One-node model around the scheme's function, with inputs, constants and output of `dtype`."""
    constants = scheme.onnx_constant_inputs(c)
    if dtype is np.int32:
        constants = [int32_constant(v) for v in constants]
    names = [f"const_{i}" for i in range(len(constants))]
    initializers = [numpy_helper.from_array(np.asarray(v, dtype=dtype), name) for v, name in zip(constants, names)]
    return scheme_node_model(scheme, names, [], initializers, _ONNX_TYPES[dtype], rank)


def run_ort(model: onnx.ModelProto, x: np.ndarray, dtype=np.int64) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.astype(dtype)})[0]


def fits_int32(scheme, c) -> bool:
    return max(scheme.bounds(c).values()) < INT32_LIMIT


def assert_within_bounds(scheme, c, codes: torch.Tensor) -> torch.Tensor:
    intermediates: dict[str, torch.Tensor] = {}
    out = scheme.reference(codes, c, intermediates)
    bounds = scheme.bounds(c)
    assert set(intermediates) == set(bounds), f"{scheme}: recorded intermediates differ from bounds() keys"
    for name, value in intermediates.items():
        worst = int(value.abs().max())
        assert worst <= bounds[name], (
            f"{scheme} at scale {c.site_input.scale}, {c.site_input.bits} bits, length {c.site_input.length}: "
            f"|{name}| reaches {worst}, above its bound {bounds[name]}"
        )
    return out


def assert_ort_equal(scheme, c, codes: torch.Tensor, expected: torch.Tensor, dtype=np.int64) -> None:
    actual = run_ort(build_model(scheme, c, codes.dim(), dtype), codes.numpy(), dtype)
    assert actual.dtype == dtype
    mismatch = np.argwhere(actual.astype(np.int64) != expected.numpy())
    assert mismatch.size == 0, (
        f"{scheme} in {np.dtype(dtype).name} at scale {c.site_input.scale}, {c.site_input.bits} bits, length "
        f"{c.site_input.length}: ORT differs from the torch reference at {len(mismatch)} positions, "
        f"first {mismatch[0].tolist()}"
    )


def check_scheme(scheme, c, codes: torch.Tensor) -> None:
    """Bounds in torch, then ORT equality in int64, and in int32 when every bound is below 2^31."""
    expected = assert_within_bounds(scheme, c, codes)
    assert int(expected.min()) >= c.output_min
    assert int(expected.max()) <= c.output_max
    assert_ort_equal(scheme, c, codes, expected)
    if fits_int32(scheme, c):
        assert_ort_equal(scheme, c, codes, expected, np.int32)


def extreme_rows(bits: int, length: int) -> torch.Tensor:
    """Rows at the corners of the code range: constant rows, one maximum among minima, alternation, ramps."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    rows = [torch.full((length,), v) for v in (lo, 0, hi, -1, 1)]
    for position in (0, length // 2, length - 1):
        row = torch.full((length,), lo)
        row[position] = hi
        rows.append(row)
    alternating = torch.full((length,), lo)
    alternating[::2] = hi
    rows.append(alternating)
    one_low = torch.full((length,), hi)
    one_low[length // 3] = lo
    rows.append(one_low)
    rows.append(torch.linspace(lo, hi, length).round())
    rows.append(torch.linspace(hi, lo, length).round())
    return torch.stack(rows).to(torch.int64)


def every_code_rows(bits: int, length: int) -> torch.Tensor:
    """Every code of the range, in rows of `length` (the last row padded with the minimum code)."""
    lo = -(2 ** (bits - 1))
    codes = torch.arange(lo, -lo, dtype=torch.int64)
    padding = (-len(codes)) % length
    return torch.cat([codes, torch.full((padding,), lo)]).reshape(-1, length)


def random_rows(bits: int, length: int, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    uniform = torch.randint(lo, hi + 1, (count, length), generator=generator)
    narrow = (torch.randn(count, length, generator=generator) * 2 ** (bits - 3)).round().clamp(lo, hi)
    return torch.cat([uniform, narrow.to(torch.int64)])


@pytest.mark.parametrize("bits", [8, 6])
@pytest.mark.parametrize("length", SOFTMAX_LENGTHS)
@pytest.mark.parametrize("name, options", SOFTMAX_VARIANTS, ids=lambda v: str(v))
def test_softmax_bounds(name, options, length, bits):
    scheme = get_scheme("softmax", name)
    codes = torch.cat([extreme_rows(bits, length), random_rows(bits, length, 2, seed=length)])
    for scale in SOFTMAX_SCALES:
        c = scheme.constants(SiteInput(scale, bits, length), **options)
        check_scheme(scheme, c, codes)


@pytest.mark.parametrize("bits", [8, 6])
@pytest.mark.parametrize("width", CHANNEL_WIDTHS)
@pytest.mark.parametrize("name", ["ibert", "ivit", "ivit-shift"])
def test_gelu_bounds(name, width, bits):
    scheme = get_scheme("gelu", name)
    codes = torch.cat([extreme_rows(bits, width), every_code_rows(bits, width), random_rows(bits, width, 2, seed=width)])
    for scale in GELU_SCALES:
        c = scheme.constants(SiteInput(scale, bits, width))
        check_scheme(scheme, c, codes)


@pytest.mark.parametrize("width", CHANNEL_WIDTHS)
def test_ibert_gelu_bounds_16_bit(width):
    scheme = get_scheme("gelu", "ibert")
    codes = torch.cat([extreme_rows(16, width), every_code_rows(16, width)])
    for scale in WIDE_GELU_SCALES:
        c = scheme.constants(SiteInput(scale, 16, width))
        check_scheme(scheme, c, codes)


def channel_absmax_patterns(bits: int, scale: float, width: int) -> dict[str, np.ndarray]:
    """Per-channel max |x| for FQ-ViT's PTF: equal channels (alpha = 3 everywhere) and outliers.

    The widest channel covers 90 % of the input range, so extreme codes clip on every channel.
    """
    input_max = (2 ** (bits - 1) - 1) * scale
    outliers = np.full(width, 0.9 * input_max / 8)
    outliers[::17] = 0.9 * input_max
    outliers[5::17] = 0.9 * input_max / 3
    outliers[9::17] = 0.9 * input_max / 5
    return {"equal": np.full(width, 0.9 * input_max), "outliers": outliers}


@pytest.mark.parametrize("bits", [8, 6, 16])
@pytest.mark.parametrize("width", CHANNEL_WIDTHS)
@pytest.mark.parametrize("name", ["ibert", "ivit", "fqvit"])
def test_layernorm_bounds(name, width, bits):
    scheme = get_scheme("layernorm", name)
    scale = 10 / (2 ** (bits - 1) - 1)
    codes = torch.cat([extreme_rows(bits, width), random_rows(bits, width, 2, seed=width)])
    if name == "fqvit":
        option_sets = [{"channel_absmax": a} for a in channel_absmax_patterns(bits, scale, width).values()]
    else:
        option_sets = [{}]
    for options in option_sets:
        c = scheme.constants(SiteInput(scale, bits, width), **options)
        check_scheme(scheme, c, codes)


def test_every_scheme_declares_bounds():
    names = {(scheme.op, scheme.name) for scheme in all_schemes()}
    assert names == {
        ("softmax", "ibert"), ("softmax", "ivit"), ("softmax", "fqvit"),
        ("gelu", "ibert"), ("gelu", "ivit"), ("gelu", "ivit-shift"),
        ("layernorm", "ibert"), ("layernorm", "ivit"), ("layernorm", "fqvit"),
    }


def typical_constants(scheme):
    """Constants at 8-bit input, scale 10/127, 197 tokens or 768 channels."""
    length = 197 if scheme.op == "softmax" else 768
    options = {"channel_absmax": np.linspace(0.5, 10.0, length)} if "channel_absmax" in scheme.calibration else {}
    return scheme.constants(SiteInput(10 / 127, 8, length), **options)


def test_int32_schemes_at_typical_settings():
    """Which schemes may be lowered in int32 at 8-bit input, scale 10/127, L = 197, C = 768, and why not."""
    qualified = {(s.op, s.name) for s in all_schemes() if fits_int32(s, typical_constants(s))}
    assert qualified == {("softmax", "ivit"), ("gelu", "ibert"), ("layernorm", "ivit"), ("layernorm", "fqvit")}
    too_wide = {(s.op, s.name): sorted(k for k, v in s.bounds(typical_constants(s)).items() if v >= INT32_LIMIT)
                for s in all_schemes() if (s.op, s.name) not in qualified}
    # I-BERT softmax: z times the 31-bit requantization multiplier, and 2^32 / sum.
    assert too_wide[("softmax", "ibert")] == ["factor", "product", "z_scaled"]
    # FQ-ViT softmax: exp = z * 2^30 itself.
    assert "exp" in too_wide[("softmax", "fqvit")]
    # ShiftGELU: exp(-max) is shifted by up to 31 bits.
    assert too_wide[("gelu", "ivit")] == ["exp_neg_max"]
    assert too_wide[("gelu", "ivit-shift")] == ["exp_neg_max"]
    # I-BERT LayerNorm: the numerator 2^31.
    assert too_wide[("layernorm", "ibert")] == ["factor", "product"]
