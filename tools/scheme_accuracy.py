"""Measure every integer scheme's error against its float op and write docs/schemes.md.

For each scheme at 8-bit and 6-bit inputs (and 16-bit where a scheme or site uses it):
- GELU: every input code, all in one row (so ShiftGELU's row maximum is the largest code),
  at input ranges of 4, 8 and 16;
- softmax: 256 rows of 197 attention-like logits (a Gaussian body plus one to three
  spikes), clipped to input ranges of 5, 10 and 20;
- LayerNorm: 256 rows of 768 channels with per-channel means and spreads, with and
  without outlier channels, at the scale a min-max observer picks.

The error is |integer output * output scale - float op(dequantized input)|, so input
quantization is common to both sides and only the scheme's approximation is measured.
Everything is seeded, so the numbers are reproducible on any machine.

Usage: PYTHONPATH=. .venv/bin/python tools/scheme_accuracy.py [--output docs/schemes.md]
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from hnq.schemes.base import Scheme, SiteInput  # noqa: E402
from hnq.schemes.registry import UNSUPPORTED, all_schemes  # noqa: E402

COMMAND = "PYTHONPATH=. .venv/bin/python tools/scheme_accuracy.py"
SEED = 2024
SOFTMAX_LENGTH = 197
SOFTMAX_ROWS = 256
SOFTMAX_RANGES = (5.0, 10.0, 20.0)
GELU_RANGES = (4.0, 8.0, 16.0)
LAYERNORM_CHANNELS = 768
LAYERNORM_ROWS = 256
# Variants a plan can select through site options, per (op, scheme name).
VARIANTS: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("softmax", "ibert"): [{"output_bits": 8}, {"output_bits": 16}],
    ("softmax", "ivit"): [{"output_bits": 8}, {"output_bits": 16}],
    ("softmax", "fqvit"): [{"output_bits": 8, "log_bits": 4}, {"output_bits": 8, "log_bits": 6}],
}
# Typical settings for the bounds tables: 8-bit codes at scale 10/127, 197 tokens, 768 channels.
TYPICAL_BITS = 8
TYPICAL_SCALE = 10 / 127


@dataclass
class Measurement:
    op: str
    name: str
    variant: str
    bits: int
    setting: str
    max_error: float
    mean_error: float
    note: str = ""


def code_max(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def quantize(x: torch.Tensor, scale: float, bits: int) -> torch.Tensor:
    return torch.round(x / scale).clamp(-code_max(bits) - 1, code_max(bits)).to(torch.int64)


def attention_logits(generator: torch.Generator, value_range: float) -> torch.Tensor:
    """Rows of a Gaussian body (spread 0.5 to range/4) with one to three spikes in [range/2, range]."""
    spread = 0.5 + torch.rand(SOFTMAX_ROWS, 1, generator=generator, dtype=torch.float64) * (value_range / 4 - 0.5)
    logits = torch.randn(SOFTMAX_ROWS, SOFTMAX_LENGTH, generator=generator, dtype=torch.float64) * spread
    for row in range(SOFTMAX_ROWS):
        spikes = int(torch.randint(1, 4, (1,), generator=generator))
        positions = torch.randint(0, SOFTMAX_LENGTH, (spikes,), generator=generator)
        logits[row, positions] = value_range * (0.5 + 0.5 * torch.rand(spikes, generator=generator, dtype=torch.float64))
    return logits.clamp(-value_range, value_range)


def layernorm_inputs(generator: torch.Generator, outliers: bool, rows: int) -> torch.Tensor:
    """Draw residual-stream rows with channel means N(0, 0.5) and spreads U(0.5, 2).

    With `outliers`, every 128th channel has mean +-20 and spread 5, like the few large
    channels of ViT LayerNorm inputs.
    """
    channel_generator = torch.Generator().manual_seed(SEED + 1)
    mean = torch.randn(LAYERNORM_CHANNELS, generator=channel_generator, dtype=torch.float64) * 0.5
    spread = 0.5 + 1.5 * torch.rand(LAYERNORM_CHANNELS, generator=channel_generator, dtype=torch.float64)
    if outliers:
        outlier_channels = torch.arange(7, LAYERNORM_CHANNELS, 128)
        signs = torch.where(torch.arange(len(outlier_channels)) % 2 == 0, 1.0, -1.0).double()
        mean[outlier_channels] = 20.0 * signs
        spread[outlier_channels] = 5.0
    return mean + spread * torch.randn(rows, LAYERNORM_CHANNELS, generator=generator, dtype=torch.float64)


def errors(scheme: Scheme, codes: torch.Tensor, c, scale: float) -> tuple[float, float, str]:
    """Return the max and mean absolute error, and for PTF LayerNorm a note on clipped rows."""
    intermediates: dict[str, torch.Tensor] = {}
    out = scheme.reference(codes, c, intermediates).double() * c.output_scale
    expected = scheme.float_op(codes.double() * scale)
    error = (out - expected).abs()
    note = ""
    if "ptf_codes" in intermediates:
        # Values beyond the calibrated channel range clip on the 8-bit PTF grid.
        ptf = intermediates["ptf_codes"]
        clipped = ((ptf == c["code_min"]) | (ptf == c["code_max"])).any(dim=-1)
        unclipped_max = float(error[~clipped].max()) if bool((~clipped).any()) else float("nan")
        note = (f"{int(clipped.sum())} of {len(clipped)} rows have a PTF code at the end of its range; "
                f"max error on the other rows {unclipped_max:.3g}")
    return float(error.max()), float(error.mean()), note


def variant_label(options: dict[str, Any]) -> str:
    shown = {k: v for k, v in options.items() if k != "channel_absmax"}
    if "log_bits" in shown:
        return f"log2 {shown['log_bits']}-bit"
    if "output_bits" in shown:
        return f"{shown['output_bits']}-bit output"
    return ""


def measure_softmax(scheme: Scheme, options: dict[str, Any], bits: int) -> list[Measurement]:
    results = []
    for value_range in SOFTMAX_RANGES:
        generator = torch.Generator().manual_seed(SEED)
        scale = value_range / code_max(bits)
        codes = quantize(attention_logits(generator, value_range), scale, bits)
        c = scheme.constants(SiteInput(scale, bits, SOFTMAX_LENGTH), **options)
        max_error, mean_error, note = errors(scheme, codes, c, scale)
        results.append(Measurement(scheme.op, scheme.name, variant_label(options), bits,
                                   f"logits in +-{value_range:g}, scale {scale:.4g}", max_error, mean_error, note))
    return results


def measure_gelu(scheme: Scheme, bits: int) -> list[Measurement]:
    results = []
    codes = torch.arange(-code_max(bits) - 1, code_max(bits) + 1, dtype=torch.int64).unsqueeze(0)
    for value_range in GELU_RANGES:
        scale = value_range / code_max(bits)
        c = scheme.constants(SiteInput(scale, bits, codes.shape[-1]))
        max_error, mean_error, note = errors(scheme, codes, c, scale)
        results.append(Measurement(scheme.op, scheme.name, "", bits,
                                   f"every code, range +-{value_range:g}, scale {scale:.4g}", max_error, mean_error, note))
    return results


def measure_layernorm(scheme: Scheme, bits: int) -> list[Measurement]:
    results = []
    for outliers in (False, True):
        calibration = layernorm_inputs(torch.Generator().manual_seed(SEED + 2), outliers, LAYERNORM_ROWS)
        x = layernorm_inputs(torch.Generator().manual_seed(SEED + 3), outliers, LAYERNORM_ROWS)
        scale = float(calibration.abs().max()) / code_max(bits)
        codes = quantize(x, scale, bits)
        options = {}
        if "channel_absmax" in scheme.calibration:
            options["channel_absmax"] = calibration.abs().amax(dim=0).numpy()
        c = scheme.constants(SiteInput(scale, bits, LAYERNORM_CHANNELS), **options)
        max_error, mean_error, note = errors(scheme, codes, c, scale)
        setting = "with outlier channels" if outliers else "no outlier channels"
        results.append(Measurement(scheme.op, scheme.name, "", bits, f"{setting}, scale {scale:.4g}",
                                   max_error, mean_error, note))
    return results


def input_bits_for(scheme: Scheme) -> tuple[int, ...]:
    # LayerNorm sites read the 16-bit residual stream, and I-BERT GELU prefers 16-bit inputs.
    if scheme.op == "layernorm" or scheme.preferred_input_bits == 16:
        return (8, 6, 16)
    return (8, 6)


def measure_all() -> list[Measurement]:
    jobs = []
    for scheme in all_schemes():
        for options in VARIANTS.get((scheme.op, scheme.name), [{}]):
            for bits in input_bits_for(scheme):
                jobs.append((scheme, options, bits))
    results: list[Measurement] = []
    for scheme, options, bits in tqdm(jobs, desc="schemes", unit="setting"):
        if scheme.op == "softmax":
            results += measure_softmax(scheme, options, bits)
        elif scheme.op == "gelu":
            results += measure_gelu(scheme, bits)
        else:
            results += measure_layernorm(scheme, bits)
    return results


def typical_constants(scheme: Scheme, options: dict[str, Any]):
    length = SOFTMAX_LENGTH if scheme.op == "softmax" else LAYERNORM_CHANNELS
    options = dict(options)
    if "channel_absmax" in scheme.calibration:
        calibration = layernorm_inputs(torch.Generator().manual_seed(SEED + 2), True, LAYERNORM_ROWS)
        options["channel_absmax"] = calibration.abs().amax(dim=0).numpy()
    return scheme.constants(SiteInput(TYPICAL_SCALE, TYPICAL_BITS, length), **options)


def accuracy_table(rows: list[Measurement]) -> list[str]:
    lines = ["| op | scheme | variant | input bits | setting | max abs error | mean abs error | note |",
             "|---|---|---|---|---|---|---|---|"]
    for m in rows:
        lines.append(f"| {m.op} | {m.name} | {m.variant or '-'} | {m.bits} | {m.setting} | "
                     f"{m.max_error:.4g} | {m.mean_error:.3g} | {m.note or '-'} |")
    return lines


def bounds_table(scheme: Scheme, options: dict[str, Any]) -> list[str]:
    c = typical_constants(scheme, options)
    bounds = scheme.bounds(c)
    label = variant_label(options)
    head = f"Bounds at {TYPICAL_BITS}-bit input, scale 10/127, length {c.site_input.length}"
    head += f" ({label})" if label else ""
    fits = max(bounds.values()) < 2**31
    lines = [f"{head}: every bound is below 2^31, so the scheme can be lowered in int32."
             if fits else f"{head}: some bounds reach 2^31 or more, so the scheme needs int64.", "",
             "| intermediate | bound on the absolute value | bits |", "|---|---|---|"]
    for key, value in bounds.items():
        lines.append(f"| {key} | {value} | {value.bit_length()} |")
    return lines


def render_markdown(results: list[Measurement], date: str, command: str) -> str:
    lines = [
        "# Integer non-linear schemes",
        "",
        f"Generated on {date} by `{command}` (seed {SEED}).",
        "Do not edit by hand: change the schemes or the tool and run the command again.",
        "",
        "Each section gives the scheme's source, its integer steps and its differences from the",
        "authors' reference code (the class docstring), its worst-case intermediate values from",
        "`bounds()`, and its error against the float op. Errors are absolute, in the op's real",
        "output units, against the float op applied to the same dequantized input codes, so they",
        "measure the integer approximation and the output quantization but not the input",
        "quantization. Inputs:",
        "",
        f"- softmax: {SOFTMAX_ROWS} rows of {SOFTMAX_LENGTH} attention-like logits (Gaussian body with spread",
        "  0.5 to range/4 and one to three spikes in [range/2, range]), clipped to the input range;",
        "- GELU: every input code in one row, so ShiftGELU's row maximum is the largest code;",
        f"- LayerNorm: {LAYERNORM_ROWS} rows of {LAYERNORM_CHANNELS} channels with channel means N(0, 0.5) and spreads",
        "  U(0.5, 2), optionally with every 128th channel an outlier (mean +-20, spread 5). The input",
        "  scale is max |x| of a separate calibration batch over the code maximum; FQ-ViT's PTF",
        "  LayerNorm takes its per-channel max |x| from the same batch.",
        "",
    ]
    for scheme in all_schemes():
        key = (scheme.op, scheme.name)
        lines += [f"## {scheme.op}: {scheme.name}", "", f"Source: {scheme.paper}.", "",
                  "```text", inspect.getdoc(type(scheme)) or "", "```", ""]
        for options in VARIANTS.get(key, [{}]):
            lines += bounds_table(scheme, options) + [""]
        lines += accuracy_table([m for m in results if (m.op, m.name) == key]) + [""]
    for (op, name), reason in UNSUPPORTED.items():
        lines += [f"## {op}: {name} (not available)", "", reason[0].upper() + reason[1:] + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "schemes.md",
                        help="Markdown file to write (default: docs/schemes.md)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)

    results = measure_all()
    print("\n".join(accuracy_table(results)))
    if not args.no_write:
        date = datetime.date.today().isoformat()
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(render_markdown(results, date, COMMAND) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
