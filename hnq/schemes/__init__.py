"""Integer schemes for Softmax, GELU and LayerNorm, one module per published family."""

from .base import OPS, Scheme, SchemeConstants, SiteInput
from .registry import SchemeError, UNSUPPORTED, all_schemes, get_scheme, scheme_names

__all__ = ["OPS", "Scheme", "SchemeConstants", "SiteInput", "SchemeError", "UNSUPPORTED", "all_schemes",
           "get_scheme", "scheme_names"]
