"""Float training, calibration and quantization-aware training (QAT) loops.

Inputs are uint8 pixel tensors [N, C, H, W] and int64 labels held in memory (the built-in
data set is 60k 28x28 images). Optimizer: AdamW with a cosine schedule. Every loop shows a
tqdm bar with loss, rate and ETA, stops cleanly at a time budget, and returns a history
of per-epoch records that the caller writes as JSON.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

_logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 128
    label_smoothing: float = 0.1
    warmup_fraction: float = 0.05
    seed: int = 0
    max_minutes: float | None = None
    # QAT only: fraction of the steps during which activation observers still update.
    observer_fraction: float = 0.5
    progress: bool = True


def _as_nchw(images: torch.Tensor) -> torch.Tensor:
    return images.unsqueeze(1) if images.dim() == 3 else images


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warmup = max(1, int(total * cfg.warmup_fraction))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train_loop(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
               desc: str, on_step=None) -> list[dict]:
    """Train `model` (a float or a QAT model) on pixel tensors; return per-epoch records."""
    images = _as_nchw(images)
    generator = torch.Generator().manual_seed(cfg.seed)
    n = images.shape[0]
    steps_per_epoch = max(1, n // cfg.batch_size)
    total_steps = max(1, int(round(cfg.epochs * steps_per_epoch)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.lr, weight_decay=cfg.weight_decay)
    deadline = time.monotonic() + cfg.max_minutes * 60 if cfg.max_minutes else None
    history: list[dict] = []
    model.train()
    step = 0
    epoch = 0
    bar = tqdm(total=total_steps, desc=desc, unit="step", disable=not cfg.progress, dynamic_ncols=True)
    stopped_by_budget = False
    while step < total_steps and not stopped_by_budget:
        order = torch.randperm(n, generator=generator)
        loss_sum, correct, seen, started = 0.0, 0, 0, time.monotonic()
        for start in range(0, n - cfg.batch_size + 1, cfg.batch_size):
            if step >= total_steps:
                break
            if deadline is not None and time.monotonic() > deadline:
                stopped_by_budget = True
                _logger.info("%s: time budget of %.1f min reached at step %d", desc, cfg.max_minutes, step)
                break
            if on_step is not None:
                on_step(step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total_steps, cfg)
            index = order[start:start + cfg.batch_size]
            x, y = images[index], labels[index]
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        if seen:
            history.append({"epoch": epoch, "steps": step, "loss": loss_sum / seen, "train_top1": correct / seen,
                            "seconds": round(time.monotonic() - started, 2), "lr": _lr_at(step - 1, total_steps, cfg)})
        epoch += 1
    bar.close()
    if stopped_by_budget and history:
        history[-1]["stopped_by_time_budget"] = True
    model.eval()
    return history


def train_float(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig) -> list[dict]:
    torch.manual_seed(cfg.seed)
    return train_loop(model, images, labels, cfg, desc="float training")


@torch.no_grad()
def calibrate(qmodel: nn.Module, images: torch.Tensor, batches: int, batch_size: int, progress: bool = True) -> int:
    """Run `batches` batches through the QAT path so every activation observer sees data."""
    images = _as_nchw(images)
    needed = batches * batch_size
    if images.shape[0] == 0:
        raise ValueError("calibration set is empty; give at least one batch of images")
    if images.shape[0] < needed:
        raise ValueError(f"calibration needs {batches} batches of {batch_size} = {needed} images, "
                         f"but only {images.shape[0]} were given; lower --calib-batches or add images")
    qmodel.train()
    for module in qmodel.modules():
        if hasattr(module, "freeze") and hasattr(module, "running_absmax"):
            module.freeze(False)
    for i in tqdm(range(batches), desc="calibration", unit="batch", disable=not progress, dynamic_ncols=True):
        qmodel(images[i * batch_size:(i + 1) * batch_size])
    qmodel.eval()
    return needed


def freeze_observers(qmodel: nn.Module, frozen: bool = True) -> None:
    for module in qmodel.modules():
        if hasattr(module, "freeze") and hasattr(module, "running_absmax"):
            module.freeze(frozen)


def train_qat(qmodel: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig) -> list[dict]:
    """QAT: observers update for the first `observer_fraction` of the steps, then freeze."""
    torch.manual_seed(cfg.seed)
    freeze_observers(qmodel, False)

    def on_step(step: int, total: int) -> None:
        if step == int(total * cfg.observer_fraction):
            freeze_observers(qmodel, True)

    history = train_loop(qmodel, images, labels, cfg, desc="QAT", on_step=on_step)
    freeze_observers(qmodel, True)
    return history


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 500, progress: bool = False,
            desc: str = "predict") -> torch.Tensor:
    """Logits of `model` in eval mode (for a QuantViT: the integer reference, dequantized)."""
    images = _as_nchw(images)
    model.eval()
    outputs = []
    for start in tqdm(range(0, images.shape[0], batch_size), desc=desc, unit="batch", disable=not progress,
                      dynamic_ncols=True):
        outputs.append(model(images[start:start + batch_size]).double())
    return torch.cat(outputs) if outputs else torch.zeros(0)


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).double().mean()) if len(labels) else float("nan")


@torch.no_grad()
def calibrate_float(qmodel: nn.Module, batches, n_batches: int, progress: bool = True) -> int:
    """Set every activation observer from float activations (post-training calibration).

    Unlike `calibrate`, which runs the QAT path, this needs no plan: the model runs in float
    mode and the observers record what the float model computes.
    """
    from .nn import float_mode

    freeze_observers(qmodel, False)
    seen = 0
    with float_mode(qmodel, observe=True):
        for batch in tqdm(batches, total=n_batches, desc="calibration", unit="batch", disable=not progress,
                          dynamic_ncols=True):
            qmodel(batch)
            seen += batch.shape[0]
    if seen == 0:
        raise ValueError("calibration set is empty; give at least one batch of images")
    return seen
