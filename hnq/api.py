"""Build, save and load float and quantized models from HNQ checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from models import QuantConfig, build_float_model, quantize_model
from models.builtin import PixelClassifier

from .io import CheckpointError, load_checkpoint, load_state_strict, save_checkpoint
from .plan import Plan, PlanError, apply_plan


def quant_config_from_bits(bits: dict[str, int]) -> QuantConfig:
    return QuantConfig(act_bits=bits["activation"], weight_bits=bits["weight"], residual_bits=bits["residual"],
                       softmax_bits=bits["softmax"], logits_bits=bits["logits"])


def bits_from_quant_config(cfg: QuantConfig) -> dict[str, int]:
    return {"activation": cfg.act_bits, "weight": cfg.weight_bits, "residual": cfg.residual_bits,
            "softmax": cfg.softmax_bits, "logits": cfg.logits_bits}


def load_float_model(path: str | Path) -> tuple[PixelClassifier, dict[str, Any]]:
    payload = load_checkpoint(path, expect_kind="float")
    model = build_float_model(payload["arch"])
    load_state_strict(model, payload["state_dict"], str(path))
    model.eval()
    return model, payload


def save_float_model(path: str | Path, model: PixelClassifier, arch: dict[str, Any], **extra: Any) -> Path:
    return save_checkpoint(path, "float", arch, model.state_dict(), **extra)


def quantize(float_model: PixelClassifier, plan: Plan) -> nn.Module:
    """Wrap a float model in its integer-only model with the plan's bits and schemes."""
    qmodel = quantize_model(float_model, quant_config_from_bits(plan.bits))
    apply_plan(plan, qmodel.sites())
    return qmodel


def save_quantized_model(path: str | Path, qmodel: nn.Module, plan: Plan, arch: dict[str, Any],
                         float_model: PixelClassifier | None = None, **extra: Any) -> Path:
    """Save the QAT model with every quantization constant, its plan and (optionally) its float parent."""
    if float_model is not None:
        extra["float_state_dict"] = {k: v.detach().cpu() for k, v in float_model.state_dict().items()}
    return save_checkpoint(path, "quantized", arch, qmodel.state_dict(), plan=plan.to_dict(), **extra)


def load_quantized_model(path: str | Path, plan: Plan | None = None,
                         allow_plan_change: bool = False) -> tuple[nn.Module, Plan, dict[str, Any]]:
    """Rebuild a quantized model from its checkpoint, in eval (integer reference) mode.

    With `plan`, the plan must name the same bits and schemes the model was trained with,
    unless `allow_plan_change` (the export then differs from what QAT trained).
    """
    payload = load_checkpoint(path, expect_kind="quantized")
    if "plan" not in payload:
        raise CheckpointError(f"quantized checkpoint {path} has no plan entry; re-create it with hnq")
    trained_plan = Plan.from_dict(payload["plan"], source=f"{path} (embedded plan)")
    float_model = build_float_model(payload["arch"])
    qmodel = quantize(float_model, trained_plan)
    if plan is not None:
        plan.validate(qmodel.sites())  # an unknown site or scheme is reported before any difference
        differences = plan_differences(trained_plan, plan)
        if differences and not allow_plan_change:
            raise PlanError(plan.source, [
                *differences,
                "the model was trained with another plan; pass the plan written next to the checkpoint, "
                "or --allow-plan-change to export a model that differs from what was trained",
            ])
        if differences:
            qmodel = quantize(build_float_model(payload["arch"]), plan)
    load_state_strict(qmodel, payload["state_dict"], str(path))
    qmodel.eval()
    return qmodel, plan or trained_plan, payload


def load_float_parent(payload: dict[str, Any], source: str) -> PixelClassifier | None:
    """Rebuild the float model a quantized checkpoint was fine-tuned from, if it was saved with it."""
    if "float_state_dict" not in payload:
        return None
    model = build_float_model(payload["arch"])
    load_state_strict(model, payload["float_state_dict"], f"{source} (float parent)")
    model.eval()
    return model


def plan_differences(trained: Plan, given: Plan) -> list[str]:
    problems = []
    if trained.bits != given.bits:
        problems.append(f"$.bits: the model was trained with {trained.bits}, the plan says {given.bits}")
    for site in sorted(set(trained.sites) & set(given.sites)):
        if trained.scheme_for(site) != given.scheme_for(site):
            problems.append(f"$.sites[{site!r}].scheme: the model was trained with "
                            f"{trained.scheme_for(site)!r}, the plan says {given.scheme_for(site)!r}")
    return problems


def load_calibration_images(image_dir: str | Path, image_shape: tuple[int, int, int], batches: int,
                            batch_size: int, progress: bool = True, arch: dict[str, Any] | None = None):
    """Load batches * batch_size images of an image folder, spread over its classes, as uint8 tensors.

    With `arch`, images are resized and cropped as the model's timm config specifies (as hnq-eval
    does); without it they must already have the model's size.
    """
    import torch

    from .data import DataError, iter_image_batches, scan_image_folder
    from .imagenet import preprocessing_from_arch

    resizing = preprocessing_from_arch(arch, image_shape) if arch is not None else {"resize": None,
                                                                                    "interpolation": "bilinear"}

    samples = scan_image_folder(image_dir)
    needed = batches * batch_size
    if len(samples) < needed:
        raise DataError(f"calibration folder {image_dir} has {len(samples)} images, but {batches} batches of "
                        f"{batch_size} need {needed}; lower --batches or --batch-size, or add images")
    channels, height, width = image_shape
    # Take images across classes: samples are sorted by class, so stride through them.
    stride = len(samples) // needed
    chosen = samples[::stride][:needed]
    return [torch.from_numpy(images) for images, _, _ in
            iter_image_batches(chosen, (height, width), channels, batch_size, progress=progress,
                               desc="calibration images", resize=resizing["resize"],
                               interpolation=resizing["interpolation"])]


def search_plan(checkpoint: str | Path, calib_dir: str | Path, act_bits: int | None = None, batches: int = 16,
                batch_size: int = 32, rule: str = "delta-sqnr", progress: bool = True):
    """Calibrate (for a float checkpoint) and measure every site under every candidate scheme.

    Returns (plan, sensitivity result, quantized model). A quantized checkpoint keeps its
    calibrated observers and bits; a float checkpoint is quantized with `act_bits`
    (default 8) and calibrated on the same images first.
    """
    from models import QuantConfig

    from .sensitivity import measure_sensitivity
    from .train import calibrate_float

    payload = load_checkpoint(checkpoint)
    if payload["kind"] == "quantized":
        qmodel, plan, payload = load_quantized_model(checkpoint)
        bits = dict(plan.bits)
        if act_bits is not None and act_bits != bits["activation"]:
            raise PlanError("request", [f"--bits {act_bits}: {checkpoint} was quantized with "
                                        f"{bits['activation']}-bit activations; give its float parent instead"])
    else:
        float_model = build_float_model(payload["arch"])
        load_state_strict(float_model, payload["state_dict"], str(checkpoint))
        qmodel = quantize_model(float_model, QuantConfig(act_bits=act_bits or 8))
        bits = bits_from_quant_config(qmodel.cfg)
    image_batches = load_calibration_images(calib_dir, qmodel.image_shape, batches, batch_size, progress,
                                            arch=payload["arch"])
    if payload["kind"] == "float":
        calibrate_float(qmodel, image_batches, len(image_batches), progress=progress)
    result = measure_sensitivity(qmodel, image_batches, len(image_batches), progress=progress)
    plan = result.make_plan(payload["arch"].get("timm_name", "model"), bits, rule)
    calibrated = payload["kind"] == "float"
    plan.notes["calibration"] = {"passes": 1 if calibrated else 0,
                                 "images": sum(len(b) for b in image_batches) if calibrated else 0}
    return plan, result, qmodel


def default_plan(float_model: PixelClassifier, act_bits: int = 8, family: str | None = None) -> Plan:
    """Build a plan for `float_model` before any search: one `family` everywhere, or the alternate mix.

    With a family that has no scheme for an op (FQ-ViT has no integer GELU), those sites
    take I-BERT's scheme.
    """
    import copy

    from models import QuantConfig

    from .plan import alternate_plan
    from .schemes.registry import UNSUPPORTED

    bits = bits_from_quant_config(QuantConfig(act_bits=act_bits))
    sites = quantize_model(copy.deepcopy(float_model), quant_config_from_bits(bits)).sites()
    name = (getattr(float_model.model, "pretrained_cfg", None) or {}).get("architecture", type(float_model.model).__name__)
    if family is None:
        return alternate_plan(name, sites, bits)
    entries = {site_name: {"op": site.op, "scheme": "ibert" if (site.op, family) in UNSUPPORTED else family}
               for site_name, site in sites.items()}
    return Plan(model=name, bits=bits, sites=entries, rule=f"uniform-{family}")


def check_bit_exact(onnx_model, qmodel: nn.Module, pixels) -> dict[str, Any]:
    """Run `pixels` (uint8 [N, C, H, W]) through ORT and the integer reference; compare the codes.

    `onnx_model` is a path or a ModelProto. Returns compared and mismatched counts and, on a
    mismatch, the first differing site (see hnq.diagnose).
    """
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    pixels = torch.as_tensor(pixels)
    source = onnx_model.SerializeToString() if isinstance(onnx_model, onnx.ModelProto) else str(onnx_model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    codes = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})[0].astype(np.int64)
    qmodel.eval()
    reference, _ = qmodel.logits_codes(pixels)
    differs = codes != reference.numpy()
    result: dict[str, Any] = {"compared": int(pixels.shape[0]), "mismatched": int(differs.any(axis=1).sum()),
                              "mismatched_codes": int(differs.sum()), "first_site": None}
    if result["mismatched"] and not isinstance(onnx_model, onnx.ModelProto):
        from .diagnose import locate_mismatch

        report, _ = locate_mismatch(onnx_model, qmodel, pixels.numpy())
        result["first_site"] = report.to_dict() if report is not None else None
    return result
