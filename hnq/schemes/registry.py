"""The one map from (op, scheme name) to a scheme object.

The plan, the trainer, the sensitivity search and the exporter all look schemes up here,
so a new family is added by registering its classes and nothing else.
"""

from __future__ import annotations

from .base import OPS, Scheme

_SCHEMES: dict[tuple[str, str], Scheme] = {}

# Combinations a plan may name but HNQ cannot build, with the reason shown to the user.
UNSUPPORTED: dict[tuple[str, str], str] = {
    ("gelu", "fqvit"): (
        "FQ-ViT has no integer GELU: it runs GELU in floating point and quantizes only its "
        "output, so it cannot be part of an integer-only graph; use 'ibert' or 'ivit' for GELU sites"
    ),
}


class SchemeError(ValueError):
    """A plan or a caller named a scheme that does not exist or cannot be used."""


def register(cls: type[Scheme]) -> type[Scheme]:
    """Class decorator: add one instance of `cls` to the registry."""
    if cls.op not in OPS:
        raise ValueError(f"{cls.__name__}.op must be one of {OPS}, got {cls.op!r}")
    key = (cls.op, cls.name)
    if key in _SCHEMES:
        raise ValueError(f"scheme {key} is registered twice ({type(_SCHEMES[key]).__name__} and {cls.__name__})")
    _SCHEMES[key] = cls()
    return cls


def _load_builtin() -> None:
    # Importing the family modules runs their @register decorators.
    from . import fqvit, ibert, ivit  # noqa: F401


def get_scheme(op: str, name: str) -> Scheme:
    _load_builtin()
    if op not in OPS:
        raise SchemeError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
    if (op, name) in UNSUPPORTED:
        raise SchemeError(f"scheme {name!r} cannot be used for {op}: {UNSUPPORTED[(op, name)]}")
    try:
        return _SCHEMES[(op, name)]
    except KeyError:
        raise SchemeError(
            f"unknown {op} scheme {name!r}; available: {', '.join(scheme_names(op))}"
        ) from None


def scheme_names(op: str) -> list[str]:
    _load_builtin()
    return sorted(name for (o, name) in _SCHEMES if o == op)


def all_schemes() -> list[Scheme]:
    _load_builtin()
    return [_SCHEMES[k] for k in sorted(_SCHEMES)]


def onnx_functions() -> list:
    """Collect every FunctionProto a model may call: each family module's `FUNCTIONS` and the helpers."""
    import importlib

    from onnx_ops.common import COMMON_FUNCTIONS

    _load_builtin()
    seen: dict[str, object] = {fn.name: fn for fn in COMMON_FUNCTIONS}
    for module_name in ONNX_FUNCTION_MODULES:
        for fn in importlib.import_module(module_name).FUNCTIONS:
            seen.setdefault(fn.name, fn)
    return [fn.to_function_proto() for fn in seen.values()]


# Each onnx_ops family module lists every function it defines, callees included, in FUNCTIONS.
ONNX_FUNCTION_MODULES = ("onnx_ops.ibert", "onnx_ops.ivit", "onnx_ops.fqvit")
