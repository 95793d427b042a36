"""The plan: which integer scheme each non-linear site uses, and the bit widths, as data.

A plan file (`plan.json`) looks like

    {
      "format": "hnq-plan", "version": 1,
      "model": "hnq_vit_fmnist",
      "bits": {"activation": 8, "weight": 8, "residual": 16, "softmax": 8, "logits": 16},
      "rule": "alternate",
      "sites": {"blocks.0.norm1": {"op": "layernorm", "scheme": "ibert"}, ...}
    }

Each site entry may carry extra numbers under "metrics" (the sensitivity behind the
choice). Validation against a model reports every problem at once, each with its JSON path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io import atomic_write_text
from .schemes.registry import SchemeError, get_scheme

PLAN_FORMAT = "hnq-plan"
PLAN_VERSION = 1
BIT_KEYS = {"activation", "weight", "residual", "softmax", "logits"}
SITE_KEYS = {"op", "scheme", "metrics"}
TOP_KEYS = {"format", "version", "model", "bits", "rule", "sites", "notes"}

# Families mixed by the "alternate" rule, per op, taken in turn along the model.
ALTERNATE_FAMILIES = {
    "softmax": ("ivit", "ibert"),
    "gelu": ("ibert", "ivit"),
    "layernorm": ("ibert", "ivit"),
}


class PlanError(ValueError):
    """An invalid plan; the message lists every problem with its JSON path."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        listing = "\n  ".join(problems)
        super().__init__(f"invalid plan {source}:\n  {listing}")


@dataclass
class Plan:
    model: str
    bits: dict[str, int]
    sites: dict[str, dict[str, Any]]
    rule: str = "manual"
    notes: dict[str, Any] = field(default_factory=dict)
    # Where the plan came from (a file path), for error messages.
    source: str = field(default="plan", compare=False)

    def scheme_for(self, site: str) -> str:
        return self.sites[site]["scheme"]

    def to_dict(self) -> dict[str, Any]:
        data = {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model": self.model,
            "bits": dict(self.bits),
            "rule": self.rule,
            "sites": {name: dict(entry) for name, entry in self.sites.items()},
        }
        if self.notes:
            data["notes"] = self.notes
        return data

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> "Plan":
        problems = _structure_problems(data)
        if problems:
            raise PlanError(source, problems)
        return cls(model=data["model"], bits=dict(data["bits"]), sites={k: dict(v) for k, v in data["sites"].items()},
                   rule=data.get("rule", "manual"), notes=dict(data.get("notes", {})), source=source)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise PlanError(str(path), [f"$: file not found: {path}; create one with `hnq demo` or `hnq plan`"])
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise PlanError(str(path), [f"$: cannot read the file: {error}"]) from None
        try:
            data = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
        except json.JSONDecodeError as error:
            raise PlanError(str(path), [f"$: not valid JSON: {error}"]) from None
        except _DuplicateKey as error:
            raise PlanError(str(path), [f"$: duplicate key {error.args[0]!r}: each site may appear once"]) from None
        return cls.from_dict(data, str(path))

    def validate(self, sites: dict[str, Any], source: str | None = None) -> None:
        """Check the plan against a model's sites ({name: site module with `.op`}); raise PlanError."""
        source = source or self.source
        problems = []
        for name, site in sites.items():
            if name not in self.sites:
                problems.append(f"$.sites: missing site {name!r} ({site.op}); every site of the model needs a scheme")
        for name, entry in self.sites.items():
            path = f"$.sites[{name!r}]"
            if name not in sites:
                known = ", ".join(list(sites)[:6]) + (", ..." if len(sites) > 6 else "")
                problems.append(f"{path}: the model has no site {name!r} (its sites are {known})")
                continue
            op = sites[name].op
            if entry["op"] != op:
                problems.append(f"{path}.op: site {name!r} is a {op} site, not {entry['op']!r}")
                continue
            try:
                get_scheme(op, entry["scheme"])
            except SchemeError as error:
                problems.append(f"{path}.scheme: {error}")
        if problems:
            raise PlanError(source, problems)


class _DuplicateKey(ValueError):
    pass


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _structure_problems(data: Any) -> list[str]:
    """Type and key problems of a plan document, each with its JSON path."""
    if not isinstance(data, dict):
        return [f"$: expected a JSON object, got {type(data).__name__}"]
    problems = []
    for key in sorted(set(data) - TOP_KEYS):
        problems.append(f"$.{key}: unknown key; allowed keys are {', '.join(sorted(TOP_KEYS))}")
    if data.get("format") != PLAN_FORMAT:
        problems.append(f"$.format: expected {PLAN_FORMAT!r}, got {data.get('format')!r}")
    if data.get("version") != PLAN_VERSION:
        problems.append(f"$.version: expected {PLAN_VERSION}, got {data.get('version')!r}")
    if not isinstance(data.get("model"), str):
        problems.append(f"$.model: expected a string (the model name), got {data.get('model')!r}")
    if "rule" in data and not isinstance(data["rule"], str):
        problems.append(f"$.rule: expected a string, got {data['rule']!r}")
    bits = data.get("bits")
    if not isinstance(bits, dict):
        problems.append(f"$.bits: expected an object with keys {', '.join(sorted(BIT_KEYS))}")
    else:
        for key in sorted(BIT_KEYS - set(bits)):
            problems.append(f"$.bits.{key}: missing")
        for key, value in bits.items():
            if key not in BIT_KEYS:
                problems.append(f"$.bits.{key}: unknown key; allowed keys are {', '.join(sorted(BIT_KEYS))}")
            elif not isinstance(value, int) or isinstance(value, bool):
                problems.append(f"$.bits.{key}: expected an integer, got {value!r}")
        problems += _bit_range_problems(bits)
    sites = data.get("sites")
    if not isinstance(sites, dict) or not sites:
        problems.append("$.sites: expected a non-empty object mapping site names to {op, scheme}")
        return problems
    for name, entry in sites.items():
        path = f"$.sites[{name!r}]"
        if not isinstance(entry, dict):
            problems.append(f"{path}: expected an object with 'op' and 'scheme', got {entry!r}")
            continue
        for key in sorted(set(entry) - SITE_KEYS):
            problems.append(f"{path}.{key}: unknown key; allowed keys are {', '.join(sorted(SITE_KEYS))}")
        for key in ("op", "scheme"):
            if not isinstance(entry.get(key), str):
                problems.append(f"{path}.{key}: expected a string, got {entry.get(key)!r}")
    return problems


def _bit_range_problems(bits: dict[str, Any]) -> list[str]:
    allowed = {
        "activation": range(4, 9),
        "weight": range(4, 9),
        "residual": range(8, 25),
        "softmax": (8, 16),
        "logits": range(8, 25),
    }
    problems = []
    for key, values in allowed.items():
        value = bits.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value not in values:
            shown = f"{values.start}..{values.stop - 1}" if isinstance(values, range) else " or ".join(map(str, values))
            problems.append(f"$.bits.{key}: unsupported bit width {value}; use {shown}")
    return problems


def alternate_plan(model_name: str, sites: dict[str, Any], bits: dict[str, int]) -> Plan:
    """Build a mixed plan that alternates I-BERT and I-ViT per op, in model order.

    This is a fixed pattern, not a measured choice: `hnq plan` chooses per site by
    sensitivity. It exists so a model can be quantized with both families before a search.
    """
    seen: dict[str, int] = {}
    entries = {}
    for name, site in sites.items():
        index = seen.get(site.op, 0)
        seen[site.op] = index + 1
        entries[name] = {"op": site.op, "scheme": ALTERNATE_FAMILIES[site.op][index % 2]}
    return Plan(model=model_name, bits=dict(bits), sites=entries, rule="alternate")


def apply_plan(plan: Plan, sites: dict[str, Any]) -> None:
    """Validate the plan against the sites and set each site's scheme."""
    plan.validate(sites)
    for name, site in sites.items():
        site.scheme_name = plan.scheme_for(name)
