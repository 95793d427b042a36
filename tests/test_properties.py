"""Property tests: every registered scheme, on drawn scales, bit widths, shapes and codes.

For each scheme, hypothesis draws an input scale (log-uniform over the range the scheme
accepts), the input bits, a shape of 1-3 leading dimensions, a row length and scheme
options. The integer codes mix uniform values with the minimum and maximum code, constant
rows and single spikes. `fast_reference` (the lookup-table path of training and
evaluation) and ONNX Runtime must return exactly the torch reference's codes, in int64 and, when every bound is below 2^31, in int32. Every intermediate that
the reference exposes must stay within `bounds(c)`.

The one-node ONNX models take the scheme constants as graph inputs, so one session per
(scheme, rank, dtype) serves every drawn setting.
"""

from __future__ import annotations

import inspect

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from hnq.schemes.base import SiteInput
from hnq.schemes.registry import all_schemes
from test_scheme_bounds import fits_int32, int32_constant, scheme_node_model

# 300 examples per scheme take about 1 s each on 2 CPU cores (about 10 s for the file).
PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ROW_LENGTHS = (7, 49, 50, 64, 197)
# log10 of the input scales drawn per op. Softmax schemes reject scales above about 1.6
# (the I-BERT exp polynomial), and FQ-ViT's softmax rejects fine scales on long rows.
# Draws that a scheme rejects are discarded with `assume`.
LOG10_SCALE_RANGE = {"softmax": (-4.0, 0.2), "gelu": (-4.0, 0.5), "layernorm": (-4.0, 0.5)}
# Narrower ranges by (op, name), where most of the op's range would be rejected.
SCHEME_SCALE_RANGE = {("softmax", "fqvit"): (-3.8, 0.2)}
# Options each scheme accepts, by (op, name). A scheme missing here is drawn without options.
OPTION_CHOICES = {
    ("softmax", "ibert"): {"output_bits": (8, 16)},
    ("softmax", "ivit"): {"output_bits": (8, 16)},
    ("softmax", "fqvit"): {"log_bits": (4, 6, 8)},
}
ROW_KINDS = ("uniform", "extremes", "constant", "spike", "near_max", "narrow")

_ONNX_TYPES = {np.int64: TensorProto.INT64, np.int32: TensorProto.INT32}
_SESSIONS: dict[tuple, ort.InferenceSession] = {}

SCHEMES = all_schemes()


def scheme_id(scheme) -> str:
    return f"{scheme.op}-{scheme.name}"


def input_bit_choices(scheme) -> list[int]:
    """Return 6, 7 and 8 bits, and 16 as well for LayerNorm and for schemes that prefer 16-bit inputs."""
    choices = [6, 7, 8]
    if scheme.op == "layernorm" or scheme.preferred_input_bits == 16:
        choices.append(16)
    return choices


def exposes_intermediates(scheme) -> bool:
    return "intermediates" in inspect.signature(scheme.reference).parameters


def constant_session(scheme, rank: int, constant_ranks: tuple[int, ...], dtype) -> ort.InferenceSession:
    """Build (once per key) a session of a one-node model whose scheme constants are graph inputs."""
    key = (scheme.op, scheme.name, rank, constant_ranks, dtype)
    if key in _SESSIONS:
        return _SESSIONS[key]
    onnx_type = _ONNX_TYPES[dtype]
    names = [f"const_{i}" for i in range(len(constant_ranks))]
    constants = [helper.make_tensor_value_info(name, onnx_type, [f"{name}_d{i}" for i in range(r)])
                 for name, r in zip(names, constant_ranks)]
    model = scheme_node_model(scheme, names, constants, [], onnx_type, rank)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    _SESSIONS[key] = session
    return session


def run_ort_with_constants(scheme, c, codes: np.ndarray, dtype) -> np.ndarray:
    constants = [np.asarray(v, dtype=np.int64) for v in scheme.onnx_constant_inputs(c)]
    if dtype is np.int32:
        constants = [int32_constant(v) for v in constants]
    session = constant_session(scheme, codes.ndim, tuple(v.ndim for v in constants), dtype)
    feeds = {"x": codes.astype(dtype), **{f"const_{i}": v.astype(dtype) for i, v in enumerate(constants)}}
    return session.run(None, feeds)[0]


def make_rows(kinds: list[str], seeds: list[int], bits: int, length: int) -> np.ndarray:
    """Build one row of `length` codes per (kind, seed), with the kinds of ROW_KINDS."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    rows = []
    for kind, seed in zip(kinds, seeds):
        rng = np.random.default_rng(seed)
        if kind == "uniform":
            row = rng.integers(lo, hi + 1, length)
        elif kind == "extremes":
            row = rng.choice(np.array([lo, hi]), length)
        elif kind == "constant":
            row = np.full(length, rng.choice(np.array([lo, hi, 0, -1, 1, int(rng.integers(lo, hi + 1))])))
        elif kind == "spike":
            row = np.full(length, lo)
            row[rng.integers(0, length)] = hi
        elif kind == "near_max":
            row = rng.choice(np.array([hi, hi - 1]), length)
        else:
            row = np.clip(np.round(rng.normal(0, 2 ** (bits - 3), length)), lo, hi)
        rows.append(np.asarray(row, dtype=np.int64))
    return np.stack(rows)


def channel_absmax(mode: str, seed: int, input_max: float, length: int) -> np.ndarray:
    """Build per-channel max |x| as calibration records it: non-negative, not all zero, at most the input range."""
    rng = np.random.default_rng(seed)
    if mode == "equal":
        values = np.full(length, 0.9 * input_max)
    elif mode == "outliers":
        values = np.full(length, 0.9 * input_max / 8)
        values[rng.integers(0, length, max(1, length // 17))] = 0.9 * input_max
    elif mode == "some_zero":
        values = rng.uniform(0.01, 1.0, length) * input_max
        values[rng.random(length) < 0.3] = 0.0
        values[rng.integers(0, length)] = input_max
    else:
        values = rng.uniform(1 / 64, 1.0, length) * input_max
    return values


@st.composite
def site_cases(draw, scheme):
    """Draw (constants, codes) for one scheme, discarding scales the scheme rejects."""
    bits = draw(st.sampled_from(input_bit_choices(scheme)), label="bits")
    low, high = SCHEME_SCALE_RANGE.get((scheme.op, scheme.name), LOG10_SCALE_RANGE[scheme.op])
    scale = 10.0 ** draw(st.floats(low, high), label="log10 scale")
    length = draw(st.sampled_from(ROW_LENGTHS), label="row length")
    leading = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3), label="leading dims")

    options = {key: draw(st.sampled_from(values), label=key)
               for key, values in OPTION_CHOICES.get((scheme.op, scheme.name), {}).items()}
    if "channel_absmax" in scheme.calibration:
        mode = draw(st.sampled_from(["equal", "outliers", "some_zero", "uniform"]), label="channel_absmax")
        input_max = (2 ** (bits - 1) - 1) * scale
        options["channel_absmax"] = channel_absmax(mode, draw(st.integers(0, 2**16)), input_max, length)
    unknown = set(scheme.calibration) - {"channel_absmax"}
    assert not unknown, f"{scheme}: the property test builds no calibration statistics {sorted(unknown)}"

    try:
        c = scheme.constants(SiteInput(scale, bits, length), **options)
    except ValueError:
        assume(False)

    row_count = int(np.prod(leading))
    kinds = draw(st.lists(st.sampled_from(ROW_KINDS), min_size=row_count, max_size=row_count), label="row kinds")
    seeds = draw(st.lists(st.integers(0, 2**32 - 1), min_size=row_count, max_size=row_count), label="row seeds")
    codes = make_rows(kinds, seeds, bits, length).reshape(*leading, length)
    return c, codes


def check_case(scheme, c, codes: np.ndarray) -> None:
    spec = c.site_input
    where = f"{scheme} at scale {spec.scale!r}, {spec.bits} bits, shape {list(codes.shape)}"
    q = torch.from_numpy(codes)
    if exposes_intermediates(scheme):
        intermediates: dict[str, torch.Tensor] = {}
        expected = scheme.reference(q, c, intermediates)
        bounds = scheme.bounds(c)
        for name, value in intermediates.items():
            assert name in bounds, f"{where}: intermediate {name!r} has no entry in bounds()"
            worst = int(value.abs().max())
            assert worst <= bounds[name], f"{where}: |{name}| reaches {worst}, above its bound {bounds[name]}"
    else:
        expected = scheme.reference(q, c)
    fast = scheme.fast_reference(q, c)
    assert torch.equal(fast, expected), (
        f"{where}: fast_reference (lookup tables) differs from reference at "
        f"{torch.nonzero(fast != expected)[:3].tolist()}")
    expected = expected.numpy()
    assert expected.dtype == np.int64, f"{where}: the reference returns {expected.dtype}, not int64"
    assert expected.min() >= c.output_min, f"{where}: output {expected.min()} below output_min {c.output_min}"
    assert expected.max() <= c.output_max, f"{where}: output {expected.max()} above output_max {c.output_max}"

    actual = run_ort_with_constants(scheme, c, codes, np.int64)
    assert np.array_equal(actual, expected), (
        f"{where}: ORT int64 differs from the torch reference at "
        f"{np.argwhere(actual != expected)[:3].tolist()}"
    )
    if fits_int32(scheme, c):
        actual32 = run_ort_with_constants(scheme, c, codes, np.int32)
        assert actual32.dtype == np.int32
        assert np.array_equal(actual32.astype(np.int64), expected), (
            f"{where}: ORT int32 differs from the torch reference at "
            f"{np.argwhere(actual32 != expected)[:3].tolist()}"
        )


@pytest.mark.parametrize("scheme", SCHEMES, ids=scheme_id)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_scheme_ort_equals_reference(scheme, data):
    c, codes = data.draw(site_cases(scheme), label="case")
    check_case(scheme, c, codes)


def test_every_scheme_is_drawn():
    """A scheme registered later either gets drawn statistics or fails here, not silently skipped."""
    for scheme in SCHEMES:
        assert set(scheme.calibration) <= {"channel_absmax"}, f"{scheme}: add its calibration statistics"
        assert scheme.op in LOG10_SCALE_RANGE, f"{scheme}: add a scale range for op {scheme.op!r}"
