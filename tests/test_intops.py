"""Integer helpers: torch reference against the ONNX functions, bit for bit, over the full range."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from hnq.intops import Dyadic, dyadic, floor_div, requantize, round_shift
from hnq.quant import safe_dyadic
from onnx_ops.common import COMMON_FUNCTIONS, FloorDiv, Requantize, RoundShift


def _run_function(function, inputs: dict[str, np.ndarray], elem_type=TensorProto.INT64) -> np.ndarray:
    names = list(inputs)
    graph = helper.make_graph(
        [helper.make_node(function.name, names, ["y"], domain="hnq")], "g",
        [helper.make_tensor_value_info(n, elem_type, list(inputs[n].shape)) for n in names],
        [helper.make_tensor_value_info("y", elem_type, list(inputs[names[0]].shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("hnq", 1)],
                              functions=[f.to_function_proto() for f in COMMON_FUNCTIONS], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def _full_range(dtype, n=200_000, seed=0):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(seed)
    edges = np.array([info.min, info.min + 1, -65, -64, -63, -2, -1, 0, 1, 2, 63, 64, 65, info.max - 1, info.max],
                     dtype=dtype)
    return np.concatenate([edges, rng.integers(info.min, info.max, size=n, dtype=dtype, endpoint=True),
                           rng.integers(-1000, 1000, size=n, dtype=dtype)])


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("k", [0, 1, 7, 16, 30])
def test_floor_div_matches_torch(dtype, k):
    x = _full_range(dtype)
    d = np.array(2**k, dtype=dtype)
    elem = TensorProto.INT32 if dtype == np.int32 else TensorProto.INT64
    got = _run_function(FloorDiv, {"x": x, "d": d}, elem)
    assert np.array_equal(got, floor_div(torch.from_numpy(x), 2**k).numpy())


def test_floor_div_odd_divisor():
    x = _full_range(np.int64)
    got = _run_function(FloorDiv, {"x": x, "d": np.array(7, dtype=np.int64)})
    assert np.array_equal(got, floor_div(torch.from_numpy(x), 7).numpy())


@pytest.mark.parametrize("s", [1, 5, 31, 40])
def test_round_shift_matches_torch(s):
    x = _full_range(np.int64) // 4  # leave room for the added half
    got = _run_function(RoundShift, {"x": x, "p": np.array(2**s, dtype=np.int64)})
    assert np.array_equal(got, round_shift(torch.from_numpy(x), s).numpy())


def test_round_shift_is_half_up():
    x = torch.tensor([-3, -2, -1, 1, 2, 3], dtype=torch.int64)
    assert round_shift(x, 1).tolist() == [-1, -1, 0, 1, 1, 2]


@pytest.mark.parametrize("ratio", [1e-3, 0.0123, 0.5, 0.999999, 3.75, 1234.5])
def test_requantize_matches_onnx(ratio):
    x = _full_range(np.int32).astype(np.int64)
    d = dyadic(ratio)
    got = _run_function(Requantize, {"x": x, "m": np.array(d.multiplier), "p": np.array(2**d.shift),
                                     "lo": np.array(-128), "hi": np.array(127)})
    assert np.array_equal(got, requantize(torch.from_numpy(x), d, 8).numpy())


@pytest.mark.parametrize("ratio", [1e-9, 1e-3, 0.3, 1.0, 1.5, 2**20 + 0.25])
def test_dyadic_is_accurate(ratio):
    d = dyadic(ratio)
    assert 2**30 <= d.multiplier < 2**31
    assert abs(d.value - ratio) <= ratio * 2.0**-30


def test_dyadic_rounds_up_to_power_of_two():
    d = dyadic(1 - 2.0**-40)
    assert d == Dyadic(2**30, 30)


def test_dyadic_rejects_negative():
    with pytest.raises(ValueError, match="non-negative"):
        dyadic(-1.0)


def test_safe_dyadic_keeps_product_below_int64():
    bound = 2**40
    d = safe_dyadic(0.37, bound)
    assert bound * d.multiplier < 2**62
    assert math.isclose(d.value, 0.37, rel_tol=2.0**-15)
