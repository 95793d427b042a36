"""The training command: exact resume after SIGKILL, time budget, checkpoints, DDP on CPU."""

from __future__ import annotations

import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hnq.api import load_quantized_model
from hnq.io import load_checkpoint

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def small_fashion_mnist(tmp_path_factory, fashion_mnist):
    """A slice of the real Fashion-MNIST in its idx format: 1536 training and 256 test images."""
    folder = tmp_path_factory.mktemp("fmnist-slice")
    data = fashion_mnist
    _write_idx(folder / "train-images-idx3-ubyte.gz", data.train_images[:1536], 2051)
    _write_idx(folder / "train-labels-idx1-ubyte.gz", data.train_labels[:1536], 2049)
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", data.test_images[:256], 2051)
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", data.test_labels[:256], 2049)
    return folder


def _hnq(*args: str, env_extra: dict | None = None) -> list[str]:
    return [sys.executable, "-m", "hnq.cli", *args]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # the same kernels in every run, so results can be compared exactly
    return env


def _train_args(bundle, data_dir, output) -> list[str]:
    return ["train", str(bundle.float_checkpoint), "-o", str(output), "--data-dir", str(data_dir),
            "--epochs", "2", "--batch-size", "64", "--calib-batches", "2", "--checkpoint-every", "4",
            "--no-progress", "--quiet"]


def _state(path: Path) -> dict:
    return load_checkpoint(path)["state_dict"]


def test_resume_after_sigkill_matches_uninterrupted(trained_bundle, small_fashion_mnist, tmp_path):
    whole = tmp_path / "whole"
    subprocess.run(_hnq(*_train_args(trained_bundle, small_fashion_mnist, whole)), env=_env(), check=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_hnq(*_train_args(trained_bundle, small_fashion_mnist, killed)), env=_env())
    deadline = time.monotonic() + 300
    while not (killed / "last.pt").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # let a few more steps run, so the kill lands between checkpoints
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "model.pt").exists()
    assert not list(killed.glob(".*.tmp"))

    subprocess.run(_hnq(*_train_args(trained_bundle, small_fashion_mnist, killed), "--resume"), env=_env(),
                   check=True)
    expected, resumed = _state(whole / "model.pt"), _state(killed / "model.pt")
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    log = json.loads((killed / "train_log.json").read_text())
    assert log["steps"] == log["total_steps"] == 2 * (1536 // 64)


def test_existing_run_needs_resume_flag(trained_bundle, small_fashion_mnist, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"x")
    result = subprocess.run(_hnq(*_train_args(trained_bundle, small_fashion_mnist, out)), env=_env(),
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "--resume" in result.stderr


def test_time_budget_stops_and_saves(trained_bundle, small_fashion_mnist, tmp_path):
    out = tmp_path / "budget"
    args = _train_args(trained_bundle, small_fashion_mnist, out)
    args[args.index("--epochs") + 1] = "50"
    subprocess.run(_hnq(*args, "--max-minutes", "0.05"), env=_env(), check=True)
    log = json.loads((out / "train_log.json").read_text())
    assert log["stopped_by_time_budget"] is True
    assert log["steps"] < log["total_steps"]
    assert 0.0 <= log["test_top1"] <= 1.0
    assert (out / "model.pt").is_file()


def test_checkpoint_round_trip_gives_same_codes(trained_bundle):
    qmodel, plan, _ = load_quantized_model(trained_bundle.checkpoint)
    codes, scale = qmodel.logits_codes(trained_bundle.test_images[:64])
    again, _, _ = load_quantized_model(trained_bundle.checkpoint)
    codes_again, scale_again = again.logits_codes(trained_bundle.test_images[:64])
    assert torch.equal(codes, codes_again)
    assert scale == scale_again


def test_two_process_gloo_run_keeps_ranks_equal(trained_bundle, small_fashion_mnist, tmp_path):
    out = tmp_path / "ddp"
    args = _train_args(trained_bundle, small_fashion_mnist, out)
    args[args.index("--epochs") + 1] = "0.5"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
               "-m", "hnq.cli", *args]
    subprocess.run(command, env=_env(), check=True, timeout=600)
    log = json.loads((out / "train_log.json").read_text())
    digests = log["rank_weight_sha256"]
    assert len(digests) == 2
    assert digests[0] == digests[1]
