"""FQ-ViT schemes: Log-Int-Softmax against the reference vectors, PTF LayerNorm, and the GELU rejection.

tests/golden/fqvit_lis_softmax.npz contains FQ-ViT's `QIntSoftmax` (log_i_softmax=True) run on
integer inputs in float64: the log2 code qlog, the zero mask, and exact intermediates, for
log2 widths 4, 6 and 8. Every comparison is exact equality.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from hnq.intops import floor_log2, round_div_half_even
from hnq.schemes.base import SiteInput
from hnq.schemes.fqvit import ptf_alphas
from hnq.schemes.registry import SchemeError, get_scheme
from test_scheme_bounds import assert_ort_equal, build_model, extreme_rows, random_rows, run_ort

GOLDEN = Path(__file__).parent / "golden"
SOFTMAX_ROWS = ("L197", "L49")


def assert_codes_equal(actual: torch.Tensor, expected: np.ndarray, what: str) -> None:
    positions = np.argwhere(actual.numpy() != expected)
    assert positions.size == 0, f"{what}: {len(positions)} codes differ from the reference, first at {positions[0].tolist()}"


@pytest.mark.parametrize("rows", SOFTMAX_ROWS)
def test_log_int_softmax_golden(rows):
    data = np.load(GOLDEN / "fqvit_lis_softmax.npz")
    scheme = get_scheme("softmax", "fqvit")
    codes = torch.from_numpy(data[f"inputs_int_{rows}"].astype(np.int64))
    for j, log_bits in enumerate(data["bits"]):
        for i, scale in enumerate(data["input_scale"]):
            c = scheme.constants(SiteInput(float(scale), 8, codes.shape[-1]), output_bits=8, log_bits=int(log_bits))
            assert c["x0_int"] == data["const_x0_int_f64"][i]
            assert c["b_int"] == data["const_b_int_f64"][i]
            assert c["c_int"] == data["const_c_int_f64"][i]
            intermediates: dict[str, torch.Tensor] = {}
            out = scheme.reference(codes, c, intermediates)
            where = f"{log_bits}-bit log2 at scale {scale}"
            assert_codes_equal(intermediates["exp"], data[f"exact_exp_int_{rows}"][i], f"exp, {where}")
            assert_codes_equal(intermediates["exp_sum"].squeeze(-1), data[f"exact_exp_sum_{rows}"][i], f"sum, {where}")
            assert_codes_equal(intermediates["ratio"], data[f"exact_softmax_out_{rows}"][i], f"round(sum/exp), {where}")
            assert_codes_equal(intermediates["log2"], data[f"exact_rounds_{rows}"][i], f"rounded log2, {where}")
            assert_codes_equal(intermediates["qlog"], data[f"outputs_int_f64_{rows}"][j, i], f"qlog, {where}")
            assert_codes_equal(intermediates["is_zero"].bool(), data[f"outputs_is_zero_f64_{rows}"][j, i],
                               f"zero mask, {where}")

            # The linear codes are 2^(N - qlog) at scale 2^-N, 0 where masked or where qlog > N.
            qlog = data[f"outputs_int_f64_{rows}"][j, i].astype(np.int64)
            kept = ~data[f"outputs_is_zero_f64_{rows}"][j, i] & (qlog <= c["linear_shift"])
            expected = np.where(kept, np.left_shift(1, np.maximum(c["linear_shift"] - qlog, 0)), 0)
            assert_codes_equal(out, expected, f"linear codes, {where}")


def test_golden_needs_ties_to_even():
    """round(sum/exp) has exact ties in the vectors; rounding them half up would change the ratio."""
    data = np.load(GOLDEN / "fqvit_lis_softmax.npz")
    exp = torch.from_numpy(data["exact_exp_int_L197"])
    total = torch.from_numpy(data["exact_exp_sum_L197"]).unsqueeze(-1)
    half_up = (2 * total + exp) // (2 * exp)
    assert int((half_up != round_div_half_even(total, exp)).sum()) == 1
    assert torch.equal(round_div_half_even(total, exp), torch.from_numpy(data["exact_softmax_out_L197"]))


def test_round_div_half_even_ties():
    numerator = torch.tensor([0, 1, 3, 5, 7, 5, 6, 10, 2**52 + 1])
    denominator = torch.tensor([3, 2, 2, 2, 2, 3, 4, 4, 2])
    expected = [round(n / d) for n, d in zip([0, 1, 3, 5, 7, 5, 6, 10], [3, 2, 2, 2, 2, 3, 4, 4])] + [2**51]
    assert round_div_half_even(numerator, denominator).tolist() == expected


def test_floor_log2_exact():
    values = {1, 2, 3}
    for k in range(2, 62):
        values.update({(1 << k) - 1, 1 << k, (1 << k) + 1, 3 << (k - 1)})
    values.update(int(v) for v in np.random.default_rng(3).integers(1, 2**62, 5000, dtype=np.int64))
    v = torch.tensor(sorted(x for x in values if x < 2**62))
    expected = torch.tensor([x.bit_length() - 1 for x in v.tolist()])
    assert torch.equal(floor_log2(v), expected)


def test_log_bits_6_and_8_give_same_codes():
    scheme = get_scheme("softmax", "fqvit")
    codes = torch.cat([extreme_rows(8, 197), random_rows(8, 197, 4, seed=1)])
    for scale in (0.05, 10 / 127, 0.5):
        six = scheme.reference(codes, scheme.constants(SiteInput(scale, 8, 197), log_bits=6))
        eight = scheme.reference(codes, scheme.constants(SiteInput(scale, 8, 197), log_bits=8))
        assert torch.equal(six, eight)


def test_log_int_softmax_options():
    scheme = get_scheme("softmax", "fqvit")
    spec = SiteInput(0.1, 8, 49)
    assert scheme.constants(spec).output_scale == 2.0**-15
    assert scheme.constants(spec, log_bits=6).output_scale == 2.0**-30
    assert scheme.constants(spec, log_bits=6).output_max == 2**30
    codes = random_rows(8, 49, 4, seed=2)
    eight = scheme.reference(codes, scheme.constants(spec, output_bits=8))
    sixteen = scheme.reference(codes, scheme.constants(spec, output_bits=16))
    assert torch.equal(eight, sixteen), "output_bits must not change the codes"
    with pytest.raises(ValueError, match="log_bits must be one of"):
        scheme.constants(spec, log_bits=5)
    with pytest.raises(ValueError, match="invalid options"):
        scheme.constants(spec, bits=4)
    # Row sums past 2^53 are fine (the lowering splits the sum; test_properties checks ORT
    # on them); past 2^62 the integer log2 no longer covers them.
    assert scheme.bounds(scheme.constants(SiteInput(0.005, 8, 577)))["exp_sum"] > 2**53
    with pytest.raises(ValueError, match="past 2\\^62"):
        scheme.constants(SiteInput(0.0004, 8, 577))


def test_log_int_softmax_masks_small_probabilities():
    """At 4 bits, entries whose rounded log2 of sum/exp reaches 16 get code 0.

    A lone maximum has sum/exp = 1, so k = 0 and its code is 2^15 (probability 1).
    """
    scheme = get_scheme("softmax", "fqvit")
    c = scheme.constants(SiteInput(0.1, 8, 50))
    row = torch.full((1, 50), -128)
    row[0, 0] = 127
    intermediates: dict[str, torch.Tensor] = {}
    out = scheme.reference(row, c, intermediates)
    assert bool(intermediates["is_zero"][0, 1:].all())
    assert out[0, 1:].eq(0).all()
    assert int(out[0, 0]) == 2**15
    uniform = scheme.reference(torch.zeros(1, 50, dtype=torch.int64), c)
    # 1/50 is 2^-5.64, which rounds to 2^-6.
    assert uniform.eq(2 ** (15 - 6)).all()


def test_zero_exp_masked():
    """A zero exp (possible only with hand-made constants) gives probability 0, as the reference's sum/0 = inf does."""
    scheme = get_scheme("softmax", "fqvit")
    c = scheme.constants(SiteInput(0.5, 8, 8))
    # b_int = 2 and c_int = 1 make z = (r + 1)^2, which is 0 at r = -1 (d = -1, -5, ...).
    values = dict(c.values, b_int=2, c_int=1, x0_int=-4, d_min=-120)
    broken = dataclasses.replace(c, values=values)
    codes = torch.tensor([[10, 9, 8, 7, 6, 5, 4, 3]])
    intermediates: dict[str, torch.Tensor] = {}
    out = scheme.reference(codes, broken, intermediates)
    zero_exp = intermediates["exp"] == 0
    assert bool(zero_exp.any())
    assert out[zero_exp].eq(0).all()
    assert intermediates["is_zero"][zero_exp].eq(1).all()
    assert_ort_equal(scheme, broken, codes, out)


def test_gelu_fqvit_rejected_with_reason():
    with pytest.raises(SchemeError, match="FQ-ViT has no integer GELU") as error:
        get_scheme("gelu", "fqvit")
    assert "floating point" in str(error.value)
    assert "'ibert' or 'ivit'" in str(error.value)


def test_ptf_alpha_is_smallest_covering_factor():
    absmax = np.array([8.0, 1.0, 1.0001, 2.0, 3.9, 4.0, 4.1, 0.0])
    base_scale, alphas = ptf_alphas(absmax, 3, 127)
    assert base_scale == 8.0 / (8 * 127)
    assert alphas == [3, 0, 1, 1, 2, 2, 3, 0]


def test_ptf_constants_carry_alpha_vector():
    scheme = get_scheme("layernorm", "fqvit")
    assert scheme.calibration == ("channel_absmax",)
    absmax = np.array([4.0, 0.5, 1.0, 2.0] * 24)
    c = scheme.constants(SiteInput(10 / 32767, 16, 96), channel_absmax=absmax)
    assert c["alpha"] == (3, 0, 1, 2) * 24
    assert c.output_scale == np.sqrt(96) / 2**30
    alpha_input = scheme.onnx_constant_inputs(c)[4]
    assert alpha_input.tolist() == [8, 1, 2, 4] * 24


def test_ptf_constants_reject_bad_statistics():
    scheme = get_scheme("layernorm", "fqvit")
    spec = SiteInput(0.1, 8, 4)
    with pytest.raises(ValueError, match="needs channel_absmax"):
        scheme.constants(spec)
    with pytest.raises(ValueError, match="3 entries for a site with 4 channels"):
        scheme.constants(spec, channel_absmax=np.ones(3))
    with pytest.raises(ValueError, match="not all zero"):
        scheme.constants(spec, channel_absmax=np.zeros(4))
    with pytest.raises(ValueError, match="not all zero"):
        scheme.constants(spec, channel_absmax=np.array([1.0, np.nan, 1.0, 1.0]))


def test_ptf_requantization_matches_float_rounding():
    """x8_c is round_half_up(x S_in / (s 2^alpha_c)) clamped to 8 bits, away from rounding ties."""
    scheme = get_scheme("layernorm", "fqvit")
    width, scale = 64, 10 / 32767
    absmax = np.linspace(0.5, 8.0, width)
    c = scheme.constants(SiteInput(scale, 16, width), channel_absmax=absmax)
    base_scale, alphas = ptf_alphas(absmax, 3, 127)
    codes = torch.cat([random_rows(16, width, 16, seed=5), extreme_rows(16, width)])
    intermediates: dict[str, torch.Tensor] = {}
    scheme.reference(codes, c, intermediates)
    exact = codes.double() * scale / (base_scale * 2.0 ** torch.tensor(alphas, dtype=torch.float64))
    expected = torch.floor(exact + 0.5).clamp(-128, 127).to(torch.int64)
    away_from_ties = (exact - exact.floor() - 0.5).abs() > 1e-3
    assert torch.equal(intermediates["ptf_codes"][away_from_ties], expected[away_from_ties])
    assert torch.equal(intermediates["common_codes"], intermediates["ptf_codes"] << torch.tensor(alphas))


@pytest.mark.parametrize("bits", [8, 6, 16])
def test_ptf_layernorm_zero_variance_gives_zero(bits):
    """Constant rows, and rows that become constant on the 8-bit PTF grid, give n = 0 (the reference gives NaN)."""
    scheme = get_scheme("layernorm", "fqvit")
    width = 96
    scale = 10 / (2 ** (bits - 1) - 1)
    c = scheme.constants(SiteInput(scale, bits, width), channel_absmax=np.full(width, 1.0))
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = torch.tensor([lo, -1, 0, 3, hi]).repeat_interleave(width).reshape(5, width)
    clipped = torch.full((1, width), hi)
    clipped[0, ::2] = hi - 1
    codes = torch.cat([codes, clipped])
    expected = torch.zeros_like(codes)
    assert torch.equal(scheme.reference(codes, c), expected)
    assert np.array_equal(run_ort(build_model(scheme, c, 2), codes.numpy()), expected.numpy())


def test_ptf_layernorm_close_to_float_layernorm():
    """On rows with outlier channels, n stays within 0.2 of the float LayerNorm (0.145 measured)."""
    scheme = get_scheme("layernorm", "fqvit")
    generator = torch.Generator().manual_seed(7)
    width, scale = 768, 20 / 32767
    spread = torch.ones(width, dtype=torch.float64)
    spread[::97] = 12.0
    x = torch.randn(32, width, generator=generator, dtype=torch.float64) * spread
    codes = torch.round(x / scale).to(torch.int64)
    c = scheme.constants(SiteInput(scale, 16, width), channel_absmax=(x.abs().amax(dim=0)).numpy())
    n = scheme.reference(codes, c)
    assert_ort_equal(scheme, c, codes, n)
    error = (n.double() * c.output_scale - scheme.float_op(codes.double() * scale)).abs()
    assert float(error.max()) < 0.2
