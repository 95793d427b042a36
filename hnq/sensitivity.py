"""Per-site sensitivity (ΔSQNR) of every candidate scheme, and the plan it chooses.

For one batch of calibration images, the search runs the model once in float mode and
once per candidate pass in integer mode, every site of a pass on the same family. At each
site it accumulates, per sample, the amplitude ratio ‖x‖ / ‖x − x̂‖ of the site's input
and of its output against the float tensors, and reports

    SQNR_dB = 20 · log10(mean over samples of ‖x‖ / ‖x − x̂‖)
    ΔSQNR  = SQNR_out − SQNR_in        (the damage the site does itself)

Rule "delta-sqnr" takes the candidate with the largest ΔSQNR per site (Kim et al., Mixed
Non-linear Quantization for Vision Transformers, arXiv 2407.18437, chose by hand from these
numbers). Rule "float-input" runs each candidate on the site's own float input, quantized onto the
site's input grid, so no error is inherited from earlier sites. It takes the largest
output SQNR, and it needs no extra pass because it runs during the float pass.

Cost: one float pass plus one pass per candidate scheme name over the calibration set.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from .nn import SchemeSite, float_mode
from .plan import Plan
from .quant import QTensor
from .schemes.registry import UNSUPPORTED, all_schemes

_logger = logging.getLogger(__name__)

RULES = ("delta-sqnr", "float-input")

# A pass for a family that has no scheme for an op puts that op on this scheme instead,
# and the site is not scored for that family. FQ-ViT has no integer GELU; its published
# integer-only comparisons pair it with I-BERT's.
FALLBACK_SCHEME = {"gelu": "ibert", "softmax": "ibert", "layernorm": "ibert"}

# Ratio used when a tensor is reproduced exactly (‖x − x̂‖ = 0): 200 dB.
EXACT_RATIO = 1e10


def candidate_passes() -> list[str]:
    """Return one pass per registered scheme name, in a fixed order."""
    return sorted({scheme.name for scheme in all_schemes()})


def scheme_for_pass(op: str, pass_name: str) -> tuple[str, bool]:
    """(scheme used at an `op` site during `pass_name`, whether the site is scored)."""
    registered = {scheme.name for scheme in all_schemes() if scheme.op == op}
    if pass_name in registered:
        return pass_name, True
    family = pass_name.split("-")[0]
    if family in registered and (op, family) not in UNSUPPORTED:
        return family, False
    return FALLBACK_SCHEME[op], False


class _RatioSum:
    """Running sum of per-sample amplitude ratios, for one (site, candidate, in/out)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def add(self, reference: torch.Tensor, estimate: torch.Tensor) -> None:
        reference = reference.detach().double().flatten(1)
        error = (estimate.detach().double().flatten(1) - reference).norm(dim=1)
        signal = reference.norm(dim=1)
        ratio = torch.where(error > 0, signal / error.clamp(min=1e-300), torch.full_like(signal, EXACT_RATIO))
        self.total += float(ratio.clamp(max=EXACT_RATIO).sum())
        self.count += reference.shape[0]

    def sqnr_db(self) -> float:
        if self.count == 0 or self.total <= 0:
            return float("nan")
        return 20.0 * math.log10(self.total / self.count)


def _real(x: QTensor) -> torch.Tensor:
    """Real values of a site tensor: codes * scale in integer mode, the values in float mode."""
    if x.value.dtype in (torch.int64, torch.int32):
        return x.value.double() * x.scale
    return x.value.double()


@dataclass
class SensitivityResult:
    sites: list[str]
    ops: dict[str, str]
    candidates: dict[str, list[str]]
    sqnr_in: dict[str, dict[str, float]]
    sqnr_out: dict[str, dict[str, float]]
    float_input_sqnr_in: dict[str, dict[str, float]]
    float_input_sqnr_out: dict[str, dict[str, float]]
    passes: int
    images: int
    seconds: float
    pass_names: list[str] = field(default_factory=list)
    infeasible: dict[str, dict[str, str]] = field(default_factory=dict)

    def delta(self, site: str, rule: str = "delta-sqnr") -> dict[str, float]:
        """The score each candidate gets under `rule` (larger is better), in dB.

        "delta-sqnr": SQNR_out - SQNR_in in the all-on-one-family model. "float-input":
        SQNR_out of the site run on its quantized float input; nothing is inherited, so the
        input's own quantization belongs to the site's error and is not subtracted (the
        candidates' input grids differ: I-BERT's GELU takes 16-bit inputs).
        """
        if rule == "delta-sqnr":
            return {c: self.sqnr_out[site][c] - self.sqnr_in[site][c] for c in self.candidates[site]}
        return {c: self.float_input_sqnr_out[site][c] for c in self.candidates[site]}

    def choose(self, rule: str = "delta-sqnr") -> dict[str, str]:
        """Pick the candidate with the largest score per site. Ties go to the earlier candidate."""
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; rules are {', '.join(RULES)}")
        choice = {}
        for site in self.sites:
            deltas = self.delta(site, rule)
            finite = {c: v for c, v in deltas.items()
                      if not math.isnan(v) and c not in self.infeasible.get(site, {})}
            choice[site] = max(finite, key=lambda c: (finite[c], -self.candidates[site].index(c))) \
                if finite else self.candidates[site][0]
        return choice

    def to_dict(self) -> dict[str, Any]:
        return {
            "sites": {
                site: {
                    "op": self.ops[site],
                    "sqnr_in_db": _rounded(self.sqnr_in[site]),
                    "sqnr_out_db": _rounded(self.sqnr_out[site]),
                    "delta_sqnr_db": _rounded(self.delta(site, "delta-sqnr")),
                    "float_input_sqnr_in_db": _rounded(self.float_input_sqnr_in[site]),
                    "float_input_sqnr_out_db": _rounded(self.float_input_sqnr_out[site]),
                }
                for site in self.sites
            },
            "passes": self.passes,
            "pass_names": ["float", *self.pass_names],
            "infeasible": self.infeasible,
            "images": self.images,
            "seconds": round(self.seconds, 2),
        }

    def make_plan(self, model_name: str, bits: dict[str, int], rule: str = "delta-sqnr") -> Plan:
        choice = self.choose(rule)
        sites = {}
        for site in self.sites:
            metrics = {
                "delta_sqnr_db": _rounded(self.delta(site, "delta-sqnr")),
                "float_input_sqnr_out_db": _rounded(self.float_input_sqnr_out[site]),
                "sqnr_in_db": _rounded(self.sqnr_in[site]),
                "sqnr_out_db": _rounded(self.sqnr_out[site]),
            }
            sites[site] = {"op": self.ops[site], "scheme": choice[site], "metrics": metrics}
        notes = {"search": {"passes": self.passes, "images": self.images, "seconds": round(self.seconds, 2)}}
        return Plan(model=model_name, bits=dict(bits), sites=sites, rule=rule, notes=notes)


def _rounded(values: dict[str, float]) -> dict[str, float | None]:
    """Values rounded to 0.001 dB; NaN (a candidate that could not run) becomes None for JSON."""
    return {k: (None if math.isnan(v) else round(v, 3)) for k, v in values.items()}


def measure_sensitivity(qmodel: torch.nn.Module, batches: Iterable[torch.Tensor], n_batches: int,
                        progress: bool = True) -> SensitivityResult:
    """Run the search over `batches` (uint8 pixel tensors); the model must be calibrated."""
    sites: dict[str, SchemeSite] = qmodel.sites()
    pass_names = candidate_passes()
    candidates: dict[str, list[str]] = {}
    for name, site in sites.items():
        candidates[name] = [p for p in pass_names if scheme_for_pass(site.op, p)[1]]
    saved_schemes = {name: site.scheme_name for name, site in sites.items()}

    sums: dict[tuple[str, str, str], _RatioSum] = defaultdict(_RatioSum)
    # Candidates whose constants cannot be built at a site's calibrated scale, with the reason.
    infeasible: dict[str, dict[str, str]] = defaultdict(dict)
    started = time.monotonic()
    images = 0
    bar = tqdm(total=n_batches * (len(pass_names) + 1), desc="sensitivity passes", unit="pass",
               disable=not progress, dynamic_ncols=True)
    try:
        for batch in batches:
            images += batch.shape[0]
            float_records: dict[str, tuple[QTensor, QTensor]] = {}

            def record_float(site: SchemeSite, x: QTensor, y: QTensor) -> None:
                float_records[site.site_name] = (x, y)
                _score_float_input(site, x, y, candidates[site.site_name], sums, infeasible)

            _set_recorders(sites, record_float)
            with torch.no_grad(), float_mode(qmodel):
                qmodel(batch)
            bar.update(1)

            for pass_name in pass_names:
                for name, site in sites.items():
                    scheme_name = scheme_for_pass(site.op, pass_name)[0]
                    if scheme_name in infeasible[name]:
                        scheme_name = next(c for c in candidates[name] if c not in infeasible[name])
                    site.scheme_name = scheme_name

                def record_candidate(site: SchemeSite, x: QTensor, y: QTensor, pass_name=pass_name) -> None:
                    name = site.site_name
                    if pass_name not in candidates[name] or pass_name in infeasible[name]:
                        return
                    x_float, y_float = float_records[name]
                    sums[(name, pass_name, "in")].add(_real(x_float), _real(x))
                    sums[(name, pass_name, "out")].add(_real(y_float), _real(y))

                _set_recorders(sites, record_candidate)
                qmodel.eval()
                with torch.no_grad():
                    qmodel(batch)
                bar.update(1)
    finally:
        bar.close()
        _set_recorders(sites, None)
        for name, site in sites.items():
            site.scheme_name = saved_schemes[name]

    def table(kind: str) -> dict[str, dict[str, float]]:
        return {name: {c: sums[(name, c, kind)].sqnr_db() for c in candidates[name]} for name in sites}

    return SensitivityResult(
        sites=list(sites), ops={name: site.op for name, site in sites.items()}, candidates=candidates,
        sqnr_in=table("in"), sqnr_out=table("out"),
        float_input_sqnr_in=table("float_in"), float_input_sqnr_out=table("float_out"),
        passes=n_batches * (len(pass_names) + 1), images=images,
        seconds=time.monotonic() - started, pass_names=pass_names,
        infeasible={name: dict(reasons) for name, reasons in infeasible.items() if reasons},
    )


def _set_recorders(sites: dict[str, SchemeSite], recorder) -> None:
    for site in sites.values():
        site.recorder = recorder


def _score_float_input(site: SchemeSite, x: QTensor, y: QTensor, candidates: list[str],
                       sums: dict[tuple[str, str, str], _RatioSum], infeasible: dict[str, dict[str, str]]) -> None:
    """Rule "float-input": each candidate on this site's float input, during the float pass.

    A candidate whose constants cannot be built at this site's scale (for example a scale
    too coarse for its exp polynomial) is recorded in `infeasible` and skipped.
    """
    saved_scheme, saved_recorder = site.scheme_name, site.recorder
    site.recorder = None
    try:
        for candidate in candidates:
            if candidate in infeasible[site.site_name]:
                continue
            site.scheme_name = candidate
            x_codes = site.quantize_input(x, candidate)
            try:
                y_hat = site.integer_forward(x_codes)
            except (ValueError, OverflowError) as error:
                infeasible[site.site_name][candidate] = str(error)
                _logger.warning("site %s: scheme %s cannot run here: %s", site.site_name, candidate, error)
                continue
            sums[(site.site_name, candidate, "float_in")].add(_real(x), _real(x_codes))
            sums[(site.site_name, candidate, "float_out")].add(_real(y), _real(y_hat))
    finally:
        site.scheme_name, site.recorder = saved_scheme, saved_recorder


def format_table(result: SensitivityResult, choice: dict[str, str], rule: str = "delta-sqnr") -> str:
    """Site x candidate ΔSQNR table, the chosen candidate marked with '*'."""
    columns = result.pass_names
    width = max(len(s) for s in result.sites) + 2
    header = f"{'site':<{width}}{'op':<11}" + "".join(f"{c:>12}" for c in columns)
    title = "ΔSQNR = SQNR_out - SQNR_in" if rule == "delta-sqnr" else "SQNR_out on the float input"
    lines = [f"{title}, in dB (rule {rule}; larger is better; * = chosen)", header, "-" * len(header)]
    for site in result.sites:
        deltas = result.delta(site, rule)
        cells = []
        for c in columns:
            if c not in deltas:
                cells.append(f"{'-':>12}")
            else:
                mark = "*" if choice[site] == c else " "
                cells.append(f"{deltas[c]:>11.2f}{mark}")
        lines.append(f"{site:<{width}}{result.ops[site]:<11}" + "".join(cells))
    return "\n".join(lines)


def save_heatmap(result: SensitivityResult, choice: dict[str, str], path, rule: str = "delta-sqnr") -> None:
    """PNG heat map of ΔSQNR (sites in model order x candidates), chosen cells outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_output

    columns = result.pass_names
    grid = np.full((len(result.sites), len(columns)), np.nan)
    for i, site in enumerate(result.sites):
        for j, c in enumerate(columns):
            grid[i, j] = result.delta(site, rule).get(c, np.nan)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(columns), 0.9 + 0.32 * len(result.sites)))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(result.sites)), result.sites, fontsize=8)
    for i, site in enumerate(result.sites):
        for j, c in enumerate(columns):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=7,
                        color="white" if grid[i, j] < np.nanmean(grid) else "black")
            if choice[site] == c:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    fig.colorbar(image, ax=ax, label="ΔSQNR (dB)" if rule == "delta-sqnr" else "SQNR_out (dB)")
    ax.set_title(f"Per-site sensitivity, rule {rule} (red: chosen)")
    fig.tight_layout()
    with atomic_output(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
