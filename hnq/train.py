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

from .data import DataError
from .io import CheckpointError

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


class Trainer:
    """The training loop shared by float training and QAT, with exact resume and DDP.

    Epoch e visits the images in the order `randperm(n)` drawn from a generator seeded with
    `seed + e`, so the position (epoch, step) alone fixes which images come next: a run
    resumed from a checkpoint replays exactly what an uninterrupted run does. Under
    torch.distributed (torchrun), each of W ranks takes its own `batch_size` slice of a
    global batch of W * batch_size images and DistributedDataParallel averages gradients.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
                 desc: str, on_step=None, save=None, checkpoint_every: int = 0):
        self.model = model
        self.images = _as_nchw(images)
        self.labels = labels
        self.cfg = cfg
        self.desc = desc
        self.on_step = on_step
        self.save = save
        self.checkpoint_every = checkpoint_every
        self.rank, self.world = _distributed_rank_and_world()
        self.global_batch = cfg.batch_size * self.world
        n = self.images.shape[0]
        if n < self.global_batch:
            raise DataError(f"{n} training images are fewer than one batch of {self.global_batch}; "
                             "lower --batch-size or add images")
        self.steps_per_epoch = n // self.global_batch
        self.total_steps = max(1, int(round(cfg.epochs * self.steps_per_epoch)))
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                           lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step = 0
        self.history: list[dict] = []
        self.stopped_by_budget = False

    def state_dict(self) -> dict:
        return {"step": self.step, "history": self.history, "optimizer": self.optimizer.state_dict(),
                "total_steps": self.total_steps, "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["total_steps"] != self.total_steps:
            raise CheckpointError(f"the checkpoint was written by a run of {state['total_steps']} steps, this run has "
                             f"{self.total_steps}: resume with the same --epochs, --batch-size and data")
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])

    def _order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.images.shape[0], generator=torch.Generator().manual_seed(self.cfg.seed + epoch))

    def run(self) -> list[dict]:
        cfg = self.cfg
        model = self.model
        if self.world > 1:
            model = nn.parallel.DistributedDataParallel(model)
        deadline = time.monotonic() + cfg.max_minutes * 60 if cfg.max_minutes else None
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.desc, unit="step",
                   disable=not cfg.progress or self.rank != 0, dynamic_ncols=True)
        epoch_stats = _EpochStats()
        while self.step < self.total_steps:
            epoch, index_in_epoch = divmod(self.step, self.steps_per_epoch)
            if index_in_epoch == 0 or epoch_stats.epoch != epoch:
                epoch_stats = _EpochStats(epoch)
                order = self._order(epoch)
            if deadline is not None and time.monotonic() > deadline:
                self.stopped_by_budget = True
                _logger.info("%s: time budget of %.1f min reached at step %d", self.desc, cfg.max_minutes, self.step)
                break
            if self.on_step is not None:
                self.on_step(self.step, self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = _lr_at(self.step, self.total_steps, cfg)
            start = index_in_epoch * self.global_batch + self.rank * cfg.batch_size
            index = order[start:start + cfg.batch_size]
            x, y = self.images[index], self.labels[index]
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            epoch_stats.add(loss.item(), int((logits.argmax(1) == y).sum()), len(y))
            bar.update(1)
            bar.set_postfix(loss=f"{epoch_stats.loss:.3f}", acc=f"{epoch_stats.top1:.3f}")
            end_of_epoch = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
            if end_of_epoch:
                self.history.append(epoch_stats.record(self.step, _lr_at(self.step - 1, self.total_steps, cfg)))
            if self.save is not None and (end_of_epoch or (self.checkpoint_every
                                                            and self.step % self.checkpoint_every == 0)):
                self.save(self)
        bar.close()
        if self.stopped_by_budget:
            if epoch_stats.seen:
                record = epoch_stats.record(self.step, _lr_at(self.step - 1, self.total_steps, cfg))
                record["stopped_by_time_budget"] = True
                self.history.append(record)
            if self.save is not None:
                self.save(self)
        self.model.eval()
        return self.history


class _EpochStats:
    def __init__(self, epoch: int = -1):
        self.epoch = epoch
        self.loss_sum = 0.0
        self.correct = 0
        self.seen = 0
        self.started = time.monotonic()

    def add(self, loss: float, correct: int, count: int) -> None:
        self.loss_sum += loss * count
        self.correct += correct
        self.seen += count

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.seen)

    @property
    def top1(self) -> float:
        return self.correct / max(1, self.seen)

    def record(self, step: int, lr: float) -> dict:
        return {"epoch": self.epoch, "steps": step, "loss": self.loss, "train_top1": self.top1,
                "seconds": round(time.monotonic() - self.started, 2), "lr": lr}


def _distributed_rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train_loop(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
               desc: str, on_step=None) -> list[dict]:
    """Train `model` (a float or a QAT model) on pixel tensors; return per-epoch records."""
    return Trainer(model, images, labels, cfg, desc, on_step=on_step).run()


def train_float(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig) -> list[dict]:
    torch.manual_seed(cfg.seed)
    return train_loop(model, images, labels, cfg, desc="float training")


@torch.no_grad()
def calibrate(qmodel: nn.Module, images: torch.Tensor, batches: int, batch_size: int, progress: bool = True) -> int:
    """Run `batches` batches through the QAT path so every activation observer sees data."""
    images = _as_nchw(images)
    needed = batches * batch_size
    if images.shape[0] == 0:
        raise DataError("calibration set is empty; give at least one batch of images")
    if images.shape[0] < needed:
        raise DataError(f"calibration needs {batches} batches of {batch_size} = {needed} images, "
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


def qat_trainer(qmodel: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
                save=None, checkpoint_every: int = 0) -> Trainer:
    """A QAT Trainer: observers update for the first `observer_fraction` of the steps, then freeze.

    The freeze state lives in the observers' buffers, so a resumed run continues it.
    """

    def on_step(step: int, total: int) -> None:
        freeze_observers(qmodel, step >= int(total * cfg.observer_fraction))

    return Trainer(qmodel, images, labels, cfg, desc="QAT", on_step=on_step, save=save,
                   checkpoint_every=checkpoint_every)


def train_qat(qmodel: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig) -> list[dict]:
    torch.manual_seed(cfg.seed)
    history = qat_trainer(qmodel, images, labels, cfg).run()
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
        raise DataError("calibration set is empty; give at least one batch of images")
    return seen
