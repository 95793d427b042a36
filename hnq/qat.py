"""The training command: float training or QAT under a plan, resumable and distributed.

An output folder contains everything a run writes:

| file | written |
|---|---|
| `last.pt` | every `--checkpoint-every` steps, at each epoch end and at a time-budget stop: the model, the optimizer and the position, for `--resume` |
| `model.pt` | at the end: the quantized (or float) checkpoint that hnq-export and hnq-eval read |
| `plan.json` | the plan the model is trained with |
| `train_log.json` | one record per epoch, the final evaluation and the time taken |

Every file is written atomically. Under `torchrun --nproc_per_node=W`, the processes train
one model together (gloo on CPU, NCCL on GPU) and only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .api import (
    bits_from_quant_config,
    quant_config_from_bits,
    quantize,
    save_float_model,
    save_quantized_model,
)
from .data import FASHION_MNIST_CLASSES, load_fashion_mnist
from .io import (
    CheckpointError,
    atomic_output,
    atomic_write_text,
    load_checkpoint,
    load_resume_state,
    load_state_strict,
)
from .plan import Plan, alternate_plan
from .train import Trainer, TrainConfig, calibrate, freeze_observers, predict, qat_trainer, top1

_logger = logging.getLogger(__name__)


@dataclass
class TrainJob:
    output: Path
    checkpoint: Path | None = None  # float checkpoint to quantize; None with --float trains from scratch
    plan: Path | None = None
    float_training: bool = False
    model_name: str = "hnq_vit_fmnist"
    data_dir: Path | None = None
    epochs: float = 1.0
    lr: float = 1e-4
    batch_size: int = 128
    act_bits: int | None = None
    calib_batches: int = 8
    seed: int = 0
    max_minutes: float | None = None
    checkpoint_every: int = 100
    resume: bool = False
    progress: bool = True


def _is_rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def init_distributed() -> bool:
    """Join the process group that torchrun describes in the environment, if any."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    _logger.info("rank %d of %d joined the %s process group", dist.get_rank(), dist.get_world_size(), backend)
    return True


def run_training(job: TrainJob) -> dict[str, Any]:
    """Run the job; returns the final log (also written to train_log.json)."""
    from models import BUILTIN_MODELS, build_float_model, builtin_arch

    started = time.monotonic()
    out = job.output
    last = out / "last.pt"
    if job.resume and not last.is_file():
        raise CheckpointError(f"--resume: no {last} to resume from; start the run without --resume")
    if not job.resume and last.is_file():
        raise CheckpointError(f"{last} exists from an earlier run; pass --resume to continue it, "
                              "or choose another --output")

    # Inputs that can be checked cheaply are checked before the data set loads and before
    # the run folder exists, so a bad argument leaves nothing behind.
    if job.plan is not None:
        Plan.load(job.plan)
    if job.checkpoint is not None:
        load_checkpoint(job.checkpoint)
    data = load_fashion_mnist(job.data_dir)
    train_x = torch.from_numpy(data.train_images).unsqueeze(1)
    train_y = torch.from_numpy(data.train_labels)
    test_x = torch.from_numpy(data.test_images).unsqueeze(1)
    test_y = torch.from_numpy(data.test_labels)
    torch.manual_seed(job.seed)

    if job.float_training:
        arch = builtin_arch(job.model_name) if job.model_name in BUILTIN_MODELS else \
            {**builtin_arch(), "timm_name": job.model_name}
        model = build_float_model(arch)
        plan = None
        trainer_model = model
        parent = None
        cfg = TrainConfig(epochs=job.epochs, lr=job.lr, batch_size=job.batch_size, seed=job.seed,
                          max_minutes=job.max_minutes, progress=job.progress)
    else:
        model, plan, arch, parent = _quantized_start(job, train_x)
        trainer_model = model
        cfg = TrainConfig(epochs=job.epochs, lr=job.lr, batch_size=job.batch_size, seed=job.seed,
                          max_minutes=job.max_minutes, warmup_fraction=0.0, progress=job.progress)

    if _is_rank_zero():
        out.mkdir(parents=True, exist_ok=True)

    def save_last(trainer: Trainer) -> None:
        if not _is_rank_zero():
            return
        payload = {"trainer": trainer.state_dict(), "model": trainer_model.state_dict(),
                   "job": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(job).items()}}
        with atomic_output(last) as tmp:
            torch.save(payload, tmp)

    if job.float_training:
        trainer = Trainer(trainer_model, train_x, train_y, cfg, desc="float training", save=save_last,
                          checkpoint_every=job.checkpoint_every)
    else:
        trainer = qat_trainer(trainer_model, train_x, train_y, cfg, save=save_last,
                              checkpoint_every=job.checkpoint_every)
    if job.resume:
        state = load_resume_state(last)
        load_state_strict(trainer_model, state["model"], str(last))
        trainer.load_state_dict(state["trainer"])
        _logger.info("resumed from %s at step %d of %d", last, trainer.step, trainer.total_steps)
    history = trainer.run()
    if not job.float_training:
        freeze_observers(trainer_model, True)

    log: dict[str, Any] = {"history": history, "steps": trainer.step, "total_steps": trainer.total_steps,
                           "stopped_by_time_budget": trainer.stopped_by_budget}
    digests = _rank_digests(trainer_model)
    if digests is not None:
        log["rank_weight_sha256"] = digests
        if len(set(digests)) != 1:
            _logger.error("ranks ended with different weights: %s", digests)
    if _is_rank_zero():
        trainer_model.eval()
        log["test_top1"] = top1(predict(trainer_model, test_x, progress=job.progress, desc="test"), test_y)
        if job.float_training:
            save_float_model(out / "model.pt", trainer_model, arch, class_names=list(FASHION_MNIST_CLASSES))
        else:
            save_quantized_model(out / "model.pt", trainer_model, plan, arch, float_model=parent,
                                 class_names=list(FASHION_MNIST_CLASSES))
            plan.save(out / "plan.json")
        log["seconds"] = round(time.monotonic() - started, 1)
        atomic_write_text(out / "train_log.json", json.dumps(log, indent=2) + "\n")
    return log


def _rank_digests(model: torch.nn.Module) -> list[str] | None:
    """SHA-256 of every rank's parameters and buffers (None outside torch.distributed)."""
    import hashlib

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digest.hexdigest())
    return [str(d) for d in gathered]


def _quantized_start(job: TrainJob, train_x: torch.Tensor):
    """Build the model QAT starts from: a float checkpoint quantized under the plan, or a quantized one."""
    from models import QuantConfig, build_float_model, quantize_model

    from .api import load_float_parent, load_quantized_model

    if job.checkpoint is None:
        raise CheckpointError("QAT needs a checkpoint to start from: pass a float model.pt (or --float to "
                              "train the float model first)")
    payload = load_checkpoint(job.checkpoint)
    given_plan = Plan.load(job.plan) if job.plan is not None else None
    if payload["kind"] == "quantized":
        qmodel, plan, payload = load_quantized_model(job.checkpoint, given_plan)
        return qmodel, plan, payload["arch"], load_float_parent(payload, str(job.checkpoint))
    arch = payload["arch"]
    float_model = build_float_model(arch)
    load_state_strict(float_model, payload["state_dict"], str(job.checkpoint))
    import copy

    parent = copy.deepcopy(float_model)
    if given_plan is None:
        bits = bits_from_quant_config(QuantConfig(act_bits=job.act_bits or 8))
        given_plan = alternate_plan(arch["timm_name"], quantize_model(copy.deepcopy(float_model),
                                                                      quant_config_from_bits(bits)).sites(), bits)
    elif job.act_bits is not None and job.act_bits != given_plan.bits["activation"]:
        given_plan.bits["activation"] = job.act_bits
    qmodel = quantize(float_model, given_plan)
    if not job.resume:
        calibrate(qmodel, train_x, job.calib_batches, job.batch_size, progress=job.progress)
    return qmodel, given_plan, arch, parent
