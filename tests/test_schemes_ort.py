"""ONNX Runtime (CPU) runs every scheme's `hnq` function code for code like its torch reference.

Each case builds a one-node model (opset 18 + hnq 1, IR 10) around the scheme's function,
passes the full ONNX checker, and compares int64 outputs by equality: integer codes have
no tolerance. The same cases check every intermediate against `bounds(c)`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hnq.schemes.base import SiteInput
from hnq.schemes.registry import get_scheme
from test_scheme_bounds import build_model, run_ort

SCALES = (0.02, 0.1, 10 / 127)
ROW_LENGTHS = (49, 50, 197)
CHANNELS = (64, 192, 768)
# Intermediates that pass through ReduceSum in the ONNX functions; ORT adds int64 in double.
REDUCE_SUM_NAMES = {"exp16_sum", "exp_sum", "row_sum", "variance"}


def assert_ort_matches_reference(scheme, c, codes: torch.Tensor) -> torch.Tensor:
    expected = scheme.reference(codes, c)
    actual = run_ort(build_model(scheme, c, codes.dim()), codes.numpy())
    mismatch = np.argwhere(actual != expected.numpy())
    assert mismatch.size == 0, (
        f"{scheme} at scale {c.site_input.scale}, {c.site_input.bits} bits: ORT differs from the torch "
        f"reference at {len(mismatch)} positions, first {mismatch[0].tolist()}"
    )
    return expected


def assert_within_bounds(scheme, c, codes: torch.Tensor) -> None:
    intermediates: dict[str, torch.Tensor] = {}
    scheme.reference(codes, c, intermediates)
    bounds = scheme.bounds(c)
    assert set(intermediates) == set(bounds), f"{scheme}: recorded intermediates differ from bounds() keys"
    for name, value in intermediates.items():
        worst = int(value.abs().max())
        assert worst <= bounds[name], f"{scheme}: |{name}| reaches {worst}, above its bound {bounds[name]}"


def extreme_rows(bits: int, length: int) -> torch.Tensor:
    """Rows at the corners of the code range: constant rows, one maximum among minima, alternation."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    rows = [torch.full((length,), v) for v in (lo, 0, hi, -1, 1)]
    for position in (0, length // 2, length - 1):
        row = torch.full((length,), lo)
        row[position] = hi
        rows.append(row)
    two_max = torch.full((length,), lo)
    two_max[[0, length - 1]] = hi
    rows.append(two_max)
    alternating = torch.full((length,), lo)
    alternating[::2] = hi
    rows.append(alternating)
    one_low = torch.full((length,), hi)
    one_low[length // 3] = lo
    rows.append(one_low)
    ramp = torch.linspace(lo, hi, length).round()
    rows.append(ramp)
    return torch.stack(rows).to(torch.int64)


def random_rows(bits: int, length: int, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    uniform = torch.randint(lo, hi + 1, (count, length), generator=generator)
    narrow = (torch.randn(count, length, generator=generator) * 2 ** (bits - 3)).round().clamp(lo, hi)
    return torch.cat([uniform, narrow.to(torch.int64)])


def test_bounds_fit_int64_and_reduce_sum():
    for scheme_op, name, bits, length in [
        ("softmax", "ibert", 8, 197), ("softmax", "ivit", 8, 197), ("gelu", "ibert", 16, 768),
        ("gelu", "ivit", 8, 768), ("gelu", "ivit-shift", 8, 768), ("layernorm", "ibert", 16, 768),
        ("layernorm", "ivit", 16, 768),
    ]:
        scheme = get_scheme(scheme_op, name)
        for scale in (0.001, *SCALES, 1.0):
            c = scheme.constants(SiteInput(scale, bits, length))
            for key, bound in scheme.bounds(c).items():
                assert bound < 2**62, f"{scheme} at scale {scale}: bound of {key} is {bound}, not below 2^62"
                if key in REDUCE_SUM_NAMES:
                    assert bound < 2**53, f"{scheme} at scale {scale}: ReduceSum input {key} can reach {bound}"


@pytest.mark.parametrize("name", ["ibert", "ivit"])
@pytest.mark.parametrize("output_bits", [8, 16])
@pytest.mark.parametrize("bits", [8, 6])
def test_softmax_ort_bit_exact(name, output_bits, bits):
    scheme = get_scheme("softmax", name)
    for scale in SCALES:
        for length in ROW_LENGTHS:
            c = scheme.constants(SiteInput(scale, bits, length), output_bits=output_bits)
            codes = torch.cat([extreme_rows(bits, length), random_rows(bits, length, 8, seed=length + bits)])
            out = assert_ort_matches_reference(scheme, c, codes.reshape(2, -1, length))
            assert int(out.min()) >= c.output_min
            assert int(out.max()) <= c.output_max
            assert_within_bounds(scheme, c, codes)


@pytest.mark.parametrize("bits", [8, 6, 16])
def test_ibert_gelu_ort_exhaustive(bits):
    scheme = get_scheme("gelu", "ibert")
    codes = torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=torch.int64)
    scales = (*SCALES, 1e-4, 2e-4) if bits == 16 else SCALES
    for scale in scales:
        c = scheme.constants(SiteInput(scale, bits, 64))
        out = assert_ort_matches_reference(scheme, c, codes.reshape(-1, 64))
        assert int(out.min()) >= c.output_min
        assert int(out.max()) <= c.output_max
        assert_within_bounds(scheme, c, codes)


@pytest.mark.parametrize("name", ["ivit", "ivit-shift"])
@pytest.mark.parametrize("bits", [8, 6])
def test_shift_gelu_ort_exhaustive(name, bits):
    """Every code against every row maximum (row i is min(code, code_i)), then channel rows."""
    scheme = get_scheme("gelu", name)
    codes = torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=torch.int64)
    table = torch.minimum(codes[None, :], codes[:, None])
    for scale in (0.001, *SCALES, 1.0):
        c = scheme.constants(SiteInput(scale, bits, len(codes)))
        assert_ort_matches_reference(scheme, c, table)
        assert_within_bounds(scheme, c, table)
        for channels in CHANNELS:
            c = scheme.constants(SiteInput(scale, bits, channels))
            rows = torch.cat([extreme_rows(bits, channels), random_rows(bits, channels, 4, seed=channels)])
            out = assert_ort_matches_reference(scheme, c, rows)
            assert int(out.min()) >= c.output_min
            assert int(out.max()) <= c.output_max
            assert_within_bounds(scheme, c, rows)


@pytest.mark.parametrize("name", ["ibert", "ivit"])
@pytest.mark.parametrize("bits", [8, 6, 16])
def test_layernorm_ort_bit_exact(name, bits):
    scheme = get_scheme("layernorm", name)
    for channels in CHANNELS:
        c = scheme.constants(SiteInput(0.1, bits, channels))
        small_variance = torch.zeros(4, channels, dtype=torch.int64)
        small_variance[0, 0] = 1
        small_variance[1, :3] = torch.tensor([1, -1, 1])
        small_variance[2, ::7] = 2
        small_variance[3, ::2] = 1
        codes = torch.cat([extreme_rows(bits, channels), random_rows(bits, channels, 8, seed=channels), small_variance])
        out = assert_ort_matches_reference(scheme, c, codes.reshape(2, -1, channels))
        assert int(out.abs().max()) <= c.output_max
        assert_within_bounds(scheme, c, codes)


@pytest.mark.parametrize("name", ["ibert", "ivit"])
def test_layernorm_constant_rows_give_zero(name):
    scheme = get_scheme("layernorm", name)
    for bits in (8, 6, 16):
        c = scheme.constants(SiteInput(0.1, bits, 192))
        codes = torch.tensor([-(2 ** (bits - 1)), -1, 0, 5, 2 ** (bits - 1) - 1]).repeat_interleave(192).reshape(5, 192)
        expected = torch.zeros_like(codes)
        assert torch.equal(scheme.reference(codes, c), expected), f"{scheme}: torch gives nonzero n on a constant row"
        ort_out = run_ort(build_model(scheme, c, 2), codes.numpy())
        assert np.array_equal(ort_out, expected.numpy()), f"{scheme}: ORT gives nonzero n on a constant row"


def _sqrt_test_values() -> torch.Tensor:
    values = set(range(1, 1 << 16))
    for k in range(1, 63):
        values.update({(1 << k) - 1, 1 << k, (1 << k) + 1})
    for root in [2, 3, 31, 1000, 65535, 65536, 65537, 2**20 + 7, 2**30 - 1, 2**31 - 1]:
        values.update({root * root - 1, root * root, root * root + 1})
    generator = np.random.default_rng(62)
    values.update(int(v) for v in generator.integers(1, 2**62, 20000, dtype=np.int64))
    return torch.tensor(sorted(v for v in values if 1 <= v < 2**62), dtype=torch.int64)


@pytest.mark.parametrize("name", ["ibert", "ivit"])
def test_layernorm_sqrt_equals_isqrt(name):
    scheme = get_scheme("layernorm", name)
    var = _sqrt_test_values()
    _, std = scheme.integer_sqrt(var)
    expected = torch.tensor([math.isqrt(int(v)) for v in var])
    wrong = torch.nonzero(std != expected).flatten()
    assert wrong.numel() == 0, f"{scheme}: Newton square root wrong for var = {var[wrong[:5]].tolist()}"


def test_ivit_reference_sqrt_fix_for_small_variance():
    """I-ViT's fixed 10 Newton steps from 2^16 give 68 for var = 1000; the converged root is 31."""
    k = 2**16
    for _ in range(10):
        k = (k + 1000 // k) // 2
    assert k == 68
    _, std = get_scheme("layernorm", "ivit").integer_sqrt(torch.tensor([1000, 4000]))
    assert std.tolist() == [31, 63]
