"""Each scheme reproduces the authors' reference code on the golden integer inputs, code for code.

The vectors in tests/golden/ come from running the reference implementations with integer
inputs in float64 (`outputs_int_f64_*`); tests/golden/README.md describes them. Every
comparison is exact equality, and no output code differs: these inputs trigger none of
the schemes' clamps. The I-BERT GELU codes are negated because HNQ keeps its output scale
positive. The one intermediate that differs, I-ViT GELU's capped exp(-max), is checked
position by position.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hnq.schemes.base import SiteInput
from hnq.schemes.registry import get_scheme

GOLDEN = Path(__file__).parent / "golden"
SOFTMAX_ROWS = ("L197", "L49")


def load(name: str):
    return np.load(GOLDEN / f"{name}.npz")


def as_codes(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.int64))


def assert_codes_equal(actual: torch.Tensor, expected: np.ndarray, what: str, mask: np.ndarray | None = None) -> None:
    differ = actual.numpy() != expected
    if mask is not None:
        differ &= mask
    positions = np.argwhere(differ)
    assert positions.size == 0, f"{what}: {len(positions)} codes differ from the reference, first at {positions[0].tolist()}"


def test_golden_float64_equals_exact():
    for name in ("ibert_softmax", "ivit_softmax", "ibert_gelu", "ivit_gelu"):
        data = load(name)
        for key in data.files:
            if key.startswith("outputs_int_f64_") and "realinput" not in key:
                exact = data[key.replace("_f64_", "_exact_")]
                assert np.array_equal(data[key], exact), f"{name}: {key} is not equal to its exact check"


@pytest.mark.parametrize("rows", SOFTMAX_ROWS)
def test_ibert_softmax_golden(rows):
    data = load("ibert_softmax")
    scheme = get_scheme("softmax", "ibert")
    codes = as_codes(data[f"inputs_int_{rows}"])
    for i, scale in enumerate(data["input_scale"]):
        c = scheme.constants(SiteInput(float(scale), 8, codes.shape[-1]), output_bits=int(data["const_output_bit"]))
        assert c["x0_int"] == data["const_x0_int_f64"][i]
        assert c["b_int"] == data["const_b_int_f64"][i]
        assert c["c_int"] == data["const_c_int_f64"][i]
        assert c.output_scale == data["output_scale"][i]
        intermediates: dict[str, torch.Tensor] = {}
        out = scheme.reference(codes, c, intermediates)
        # Half-up versus the reference's half-to-even 16-bit requantization: no ties occur here.
        assert_codes_equal(intermediates["exp16"], data[f"exact_exp16_{rows}"][i], f"exp16 at scale {scale}")
        assert_codes_equal(intermediates["factor"].squeeze(-1), data[f"exact_factor_{rows}"][i], f"factor at scale {scale}")
        assert_codes_equal(out, data[f"outputs_int_f64_{rows}"][i], f"output at scale {scale}")


@pytest.mark.parametrize("rows", SOFTMAX_ROWS)
def test_ivit_softmax_golden(rows):
    data = load("ivit_softmax")
    scheme = get_scheme("softmax", "ivit")
    codes = as_codes(data[f"inputs_int_{rows}"])
    for j, output_bits in enumerate(data["output_bits"]):
        for i, scale in enumerate(data["input_scale"]):
            c = scheme.constants(SiteInput(float(scale), 8, codes.shape[-1]), output_bits=int(output_bits))
            assert c["x0_int"] == data["const_x0_int_f64"][i]
            assert c.output_scale == data["output_scale"][j]
            intermediates: dict[str, torch.Tensor] = {}
            out = scheme.reference(codes, c, intermediates)
            assert_codes_equal(intermediates["exp"], data[f"exact_exp_int_{rows}"][i], f"exp at scale {scale}")
            assert_codes_equal(out, data[f"outputs_int_f64_{rows}"][j, i], f"{output_bits}-bit output at scale {scale}")


@pytest.mark.parametrize("code_set, bits", [("int8", 8), ("int6", 6), ("extra_wide", 16)])
def test_ibert_gelu_golden(code_set, bits):
    data = load("ibert_gelu")
    scheme = get_scheme("gelu", "ibert")
    prefix = "extra_wide_" if code_set == "extra_wide" else ""
    codes = as_codes(data[f"inputs_int_{code_set}"])
    for i, scale in enumerate(data[f"{prefix}input_scale"]):
        c = scheme.constants(SiteInput(float(scale), bits, 1))
        assert c["b_int"] == data[f"{prefix}const_b_int_f64"][i]
        assert c["c_int"] == data[f"{prefix}const_c_int_f64"][i]
        assert c["shift_int"] == data[f"{prefix}const_shift_int_f64"][i]
        # The reference's output scale is negative; HNQ negates codes and scale together.
        assert c.output_scale == -data[f"{prefix}output_scale"][i]
        intermediates: dict[str, torch.Tensor] = {}
        out = scheme.reference(codes, c, intermediates)
        assert_codes_equal(intermediates["sigmoid"], data[f"exact_sigmoid_int_{code_set}"][i], f"sigmoid at scale {scale}")
        assert_codes_equal(-out, data[f"outputs_int_f64_{code_set}"][i], f"negated output at scale {scale}")


# Row maxima per input scale whose exp(-max) shift the overflow guard caps (negative maxima
# at coarse scales); the outputs stay equal.
EXP_NEG_MAX_CAPPED = {"int8": (0, 61, 95, 84), "int6": (0, 0, 0, 0)}


@pytest.mark.parametrize("code_set, bits", [("int8", 8), ("int6", 6)])
def test_ivit_gelu_golden(code_set, bits):
    """Entry [i, j] is code j in a row whose maximum is code i (valid where j <= i)."""
    data = load("ivit_gelu")
    scheme = get_scheme("gelu", "ivit")
    codes = as_codes(data[f"inputs_int_{code_set}"])
    table = torch.minimum(codes[None, :], codes[:, None])
    valid = data[f"valid_{code_set}"]
    for i, scale in enumerate(data["input_scale"]):
        c = scheme.constants(SiteInput(float(scale), bits, len(codes)))
        assert c["x0_int"] == data["const_x0_int_f64"][i]
        assert c.output_scale == pytest.approx(data["output_scale"][i], rel=1e-15)
        intermediates: dict[str, torch.Tensor] = {}
        out = scheme.reference(table, c, intermediates)
        # exp(-max) caps its shift 23 - q at 31 (HNQ's int64 overflow guard). Where the
        # reference shifts further, both values are >= 2^31 and the sum clamps to 2^31 - 1.
        exp_neg_max = intermediates["exp_neg_max"].squeeze(-1).numpy()
        reference_exp_neg_max = data[f"exact_exp_int_negmax_{code_set}"][i]
        t = -codes.numpy()
        t = t + np.floor_divide(t, 2) - np.floor_divide(t, 16)
        capped = 23 - np.floor_divide(np.maximum(t, 23 * c["x0_int"]), c["x0_int"]) > 31
        differ = exp_neg_max != reference_exp_neg_max
        assert np.array_equal(differ, capped), f"exp(-max) at scale {scale}: differs outside the capped shifts"
        assert differ.sum() == EXP_NEG_MAX_CAPPED[code_set][i]
        assert (exp_neg_max[differ] >= 2**31).all()
        assert (reference_exp_neg_max[differ] >= 2**31).all()
        assert_codes_equal(intermediates["sigmoid"], data[f"exact_sigmoid_int_{code_set}"][i],
                           f"sigmoid at scale {scale}", mask=valid)
        assert_codes_equal(out, data[f"outputs_int_f64_{code_set}"][i], f"output at scale {scale}", mask=valid)
