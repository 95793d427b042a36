"""HNQ: integer-only Vision Transformers with mixed non-linear quantization, exported to bit-exact ONNX.

The functions below are what the commands are made of; `import hnq` stays light because
each is imported on first use.

    float_model, arch = hnq.create_float_model("deit_tiny_patch16_224", pretrained="deit_tiny.pth")
    plan = hnq.default_plan(float_model, act_bits=8)          # or hnq.search_plan(...)
    qmodel = hnq.quantize(float_model, plan)
    hnq.calibrate(qmodel, batches)                            # uint8 image batches
    hnq.export_onnx(qmodel, plan, "deit_int8.onnx", {})
    hnq.check_bit_exact("deit_int8.onnx", qmodel, batches[0])
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> (module, attribute).
_EXPORTS = {
    "create_float_model": ("models.pretrained", "create_float_model"),
    "build_float_model": ("models", "build_float_model"),
    "QuantConfig": ("models", "QuantConfig"),
    "Plan": ("hnq.plan", "Plan"),
    "PlanError": ("hnq.plan", "PlanError"),
    "default_plan": ("hnq.api", "default_plan"),
    "quantize": ("hnq.api", "quantize"),
    "calibrate": ("hnq.train", "calibrate_float"),
    "calibrate_qat": ("hnq.train", "calibrate"),
    "measure_sensitivity": ("hnq.sensitivity", "measure_sensitivity"),
    "search_plan": ("hnq.api", "search_plan"),
    "TrainConfig": ("hnq.train", "TrainConfig"),
    "train_float": ("hnq.train", "train_float"),
    "train_qat": ("hnq.train", "train_qat"),
    "TrainJob": ("hnq.qat", "TrainJob"),
    "run_training": ("hnq.qat", "run_training"),
    "save_float_model": ("hnq.api", "save_float_model"),
    "load_float_model": ("hnq.api", "load_float_model"),
    "save_quantized_model": ("hnq.api", "save_quantized_model"),
    "load_quantized_model": ("hnq.api", "load_quantized_model"),
    "build_onnx_model": ("hnq.export", "build_onnx_model"),
    "export_onnx": ("hnq.export", "export_onnx"),
    "export_float_onnx": ("hnq.export", "export_float_onnx"),
    "export_from_checkpoint": ("hnq.pipeline", "export_from_checkpoint"),
    "evaluate": ("hnq.evaluate", "evaluate"),
    "check_bit_exact": ("hnq.api", "check_bit_exact"),
    "locate_mismatch": ("hnq.diagnose", "locate_mismatch"),
    "load_fashion_mnist": ("hnq.data", "load_fashion_mnist"),
    "run_demo": ("hnq.pipeline", "run_demo"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    try:
        module_name, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'hnq' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module_name), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
