"""The main job on the built-in default: Fashion-MNIST, a small ViT, mixed I-BERT/I-ViT schemes.

Steps: train the float model, choose the plan, calibrate, QAT, export, write the test split
as an image folder, and evaluate the ONNX model against the PyTorch integer reference.
Everything goes under one output folder.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models import QuantConfig, build_float_model, builtin_arch, quantize_model

from .api import (
    bits_from_quant_config,
    load_quantized_model,
    quant_config_from_bits,
    save_float_model,
    save_quantized_model,
)
from .data import FASHION_MNIST_CLASSES, load_fashion_mnist, write_image_folder
from .evaluate import EvalReport, evaluate, write_report
from .export import ExportResult, export_onnx, model_metadata
from .io import atomic_write_text
from .plan import Plan, alternate_plan, apply_plan
from .train import TrainConfig, calibrate, predict, top1, train_float, train_qat

_logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    output: Path = Path("runs/demo")
    data_dir: Path | None = None
    epochs: float = 4.0
    qat_epochs: float = 0.5
    act_bits: int = 8
    calib_batches: int = 8
    batch_size: int = 128
    seed: int = 0
    max_minutes: float | None = None
    progress: bool = True


def export_from_checkpoint(checkpoint: Path, output: Path, plan: Plan | None = None,
                           allow_plan_change: bool = False) -> ExportResult:
    """Rebuild the integer model from a checkpoint and write ONNX (what `hnq-export` does).

    The preprocessing metadata (resize, crop, interpolation) comes from the checkpoint's
    arch, as hnq.export.model_metadata describes.
    """
    qmodel, used_plan, payload = load_quantized_model(checkpoint, plan, allow_plan_change)
    metadata: dict[str, Any] = {
        **model_metadata(payload, qmodel.image_shape, qmodel.num_classes, checkpoint, output),
        "hnq.bits": used_plan.bits,
    }
    return export_onnx(qmodel, used_plan, output, metadata)


def run_demo(cfg: DemoConfig) -> EvalReport:
    out = cfg.output
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log: dict[str, Any] = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()}}

    data = load_fashion_mnist(cfg.data_dir)
    train_x = torch.from_numpy(data.train_images).unsqueeze(1)
    train_y = torch.from_numpy(data.train_labels)
    test_x = torch.from_numpy(data.test_images).unsqueeze(1)
    test_y = torch.from_numpy(data.test_labels)

    # 1. Float model.
    torch.manual_seed(cfg.seed)
    arch = builtin_arch()
    float_model = build_float_model(arch)
    float_cfg = TrainConfig(epochs=cfg.epochs, lr=2e-3, batch_size=cfg.batch_size, seed=cfg.seed,
                            max_minutes=cfg.max_minutes, progress=cfg.progress)
    log["float_training"] = train_float(float_model, train_x, train_y, float_cfg)
    float_top1 = top1(predict(float_model, test_x, progress=cfg.progress, desc="float eval"), test_y)
    _logger.info("float model: test top-1 %.4f", float_top1)
    save_float_model(out / "float.pt", float_model, arch, class_names=list(FASHION_MNIST_CLASSES))

    # 2. Plan and quantized model; a copy of the float parent stays untouched for the report.
    bits = bits_from_quant_config(QuantConfig(act_bits=cfg.act_bits))
    parent = copy.deepcopy(float_model)
    qmodel = quantize_model(float_model, quant_config_from_bits(bits))
    plan = alternate_plan(arch["timm_name"], qmodel.sites(), bits)
    apply_plan(plan, qmodel.sites())
    plan.save(out / "plan.json")

    # 3. Calibration and QAT.
    calibrate(qmodel, train_x, cfg.calib_batches, cfg.batch_size, progress=cfg.progress)
    qat_cfg = TrainConfig(epochs=cfg.qat_epochs, lr=1e-4, batch_size=cfg.batch_size, seed=cfg.seed + 1,
                          warmup_fraction=0.0, progress=cfg.progress)
    log["qat"] = train_qat(qmodel, train_x, train_y, qat_cfg)
    save_quantized_model(out / "model.pt", qmodel, plan, arch, float_model=parent,
                         class_names=list(FASHION_MNIST_CLASSES))

    # 4. Export through the same path as `hnq-export model.pt --plan plan.json -o model_int8.onnx`.
    exported = export_from_checkpoint(out / "model.pt", out / "model_int8.onnx", Plan.load(out / "plan.json"))
    log["export"] = {"path": str(exported.path), "nodes": exported.nodes, "bytes": exported.bytes}

    # 5. The test split as an image folder, read back like ImageNet would be.
    image_dir = write_image_folder(data.test_images, data.test_labels, FASHION_MNIST_CLASSES,
                                   out / "fashion-mnist-test", progress=cfg.progress)

    # 6. Evaluation in onnxruntime with the bit-exact comparison.
    report = evaluate(exported.path, image_dir, progress=cfg.progress)
    write_report(report, out / "eval.json")
    log["seconds"] = round(time.monotonic() - started, 1)
    atomic_write_text(out / "train_log.json", json.dumps(log, indent=2) + "\n")
    return report
