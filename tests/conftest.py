"""Shared fixtures: a small model trained on a slice of real Fashion-MNIST, built once per session."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from hnq.data import DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_CLASSES, load_fashion_mnist, write_image_folder

TRAIN_IMAGES = 6000
TEST_IMAGES = 1000


@dataclass
class TrainedBundle:
    folder: Path
    float_checkpoint: Path
    checkpoint: Path
    plan: Path
    onnx: Path
    images: Path
    test_images: torch.Tensor
    test_labels: torch.Tensor
    float_top1: float


def require_fashion_mnist() -> None:
    if not DEFAULT_FASHION_MNIST_DIR.is_dir():
        pytest.skip(f"Fashion-MNIST not installed at {DEFAULT_FASHION_MNIST_DIR}: "
                    "run `apt-get install -y dataset-fashion-mnist` (scripts/setup.sh does it as root)")


@pytest.fixture(scope="session")
def fashion_mnist():
    require_fashion_mnist()
    return load_fashion_mnist()


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory, fashion_mnist) -> TrainedBundle:
    """Float training (2 epochs on 6000 images), alternate plan, calibration, short QAT, export."""
    from hnq.api import bits_from_quant_config, save_float_model, save_quantized_model
    from hnq.pipeline import export_from_checkpoint
    from hnq.plan import alternate_plan, apply_plan
    from hnq.train import TrainConfig, calibrate, predict, top1, train_float, train_qat
    from models import QuantConfig, build_float_model, builtin_arch, quantize_model

    folder = tmp_path_factory.mktemp("trained")
    data = fashion_mnist
    train_x = torch.from_numpy(data.train_images[:TRAIN_IMAGES]).unsqueeze(1)
    train_y = torch.from_numpy(data.train_labels[:TRAIN_IMAGES])
    test_x = torch.from_numpy(data.test_images[:TEST_IMAGES]).unsqueeze(1)
    test_y = torch.from_numpy(data.test_labels[:TEST_IMAGES])

    torch.manual_seed(0)
    arch = builtin_arch()
    float_model = build_float_model(arch)
    train_float(float_model, train_x, train_y, TrainConfig(epochs=2, lr=2e-3, progress=False))
    float_top1 = top1(predict(float_model, test_x), test_y)
    save_float_model(folder / "float.pt", float_model, arch, class_names=list(FASHION_MNIST_CLASSES))

    cfg = QuantConfig()
    parent = copy.deepcopy(float_model)
    qmodel = quantize_model(float_model, cfg)
    plan = alternate_plan(arch["timm_name"], qmodel.sites(), bits_from_quant_config(cfg))
    apply_plan(plan, qmodel.sites())
    plan.save(folder / "plan.json")
    calibrate(qmodel, train_x, 4, 128, progress=False)
    train_qat(qmodel, train_x, train_y, TrainConfig(epochs=0.5, lr=1e-4, warmup_fraction=0.0, progress=False))
    save_quantized_model(folder / "model.pt", qmodel, plan, arch, float_model=parent,
                         class_names=list(FASHION_MNIST_CLASSES))
    export_from_checkpoint(folder / "model.pt", folder / "model_int8.onnx")
    images = write_image_folder(data.test_images[:TEST_IMAGES], data.test_labels[:TEST_IMAGES],
                                FASHION_MNIST_CLASSES, folder / "images", progress=False)
    return TrainedBundle(folder, folder / "float.pt", folder / "model.pt", folder / "plan.json",
                         folder / "model_int8.onnx", images, test_x, test_y, float_top1)
