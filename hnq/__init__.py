"""HNQ: integer-only Vision Transformers with mixed non-linear quantization, exported to bit-exact ONNX."""

__version__ = "0.1.0"
