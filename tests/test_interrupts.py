"""Interrupted and misdirected runs leave no half-written output.

`hnq-export`, `hnq plan` and `hnq train` run in a subprocess on copies of the trained
bundle's files and receive SIGINT or SIGKILL while they work. Every final output name
must then be absent or a complete, valid file. After SIGINT no temporary file
(`.NAME.*.tmp`) may remain. After SIGKILL one may remain, and a rerun must still succeed.
An output path that cannot be written fails with exit code 2 before the long work starts.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from hnq.cli import EXIT_BAD_INPUT, eval_command, export_command, main
from hnq.io import load_checkpoint
from hnq.plan import Plan

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# Exit statuses of an interrupted run: 0 when the signal came after the work, 1 for click's
# "Aborted!" or a KeyboardInterrupt traceback, and death by the signal itself.
SIGINT_STATUSES = {0, 1, -signal.SIGINT}
# Fractions of an uninterrupted export's wall time at which SIGINT or SIGKILL is sent.
EXPORT_DELAY_FRACTIONS = (0.4, 0.7, 0.85, 0.95, 1.0)
PLAN_ARGS = ("--batches", "1", "--batch-size", "8", "--no-progress", "--quiet")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _hnq(*args: str) -> list[str]:
    return [sys.executable, "-m", "hnq.cli", *args]


def _temporary_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp"))


def _run_and_signal(command: list[str], sig: int, delay: float | None = None,
                    watch: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Start `command`, send `sig` after `delay` seconds or as soon as a temporary file shows up in `watch`."""
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    while process.poll() is None and time.monotonic() - started < timeout:
        if delay is not None and time.monotonic() - started >= delay:
            break
        if watch is not None and _temporary_files(watch):
            break
        time.sleep(0.002 if watch is not None else 0.01)
    if process.poll() is None:
        process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _assert_onnx_absent_or_complete(path: Path) -> None:
    if path.exists():
        onnx.checker.check_model(onnx.load(str(path)))


def _assert_plan_outputs_absent_or_complete(output: Path) -> None:
    stem = output.with_suffix("")
    if output.exists():
        Plan.load(output)
    report = Path(f"{stem}.sensitivity.json")
    if report.exists():
        json.loads(report.read_text())
    heatmap = Path(f"{stem}.sensitivity.png")
    if heatmap.exists():
        with Image.open(heatmap) as image:
            image.load()


@pytest.fixture(scope="module")
def bundle_copy(trained_bundle, tmp_path_factory) -> Path:
    """The bundle's checkpoints, plan and images in a folder of their own, so no test alters the originals."""
    folder = tmp_path_factory.mktemp("interrupts-bundle")
    for path in (trained_bundle.float_checkpoint, trained_bundle.checkpoint, trained_bundle.plan):
        shutil.copy2(path, folder / path.name)
    shutil.copytree(trained_bundle.images, folder / "images")
    return folder


@pytest.fixture(scope="module")
def export_seconds(bundle_copy, tmp_path_factory) -> float:
    """Wall time of one uninterrupted `hnq-export`, interpreter start included."""
    output = tmp_path_factory.mktemp("export-timing") / "model.onnx"
    started = time.monotonic()
    subprocess.run(_hnq("export", str(bundle_copy / "model.pt"), "-o", str(output), "--quiet"), env=_env(),
                   check=True, capture_output=True)
    return time.monotonic() - started


@pytest.mark.parametrize("fraction", EXPORT_DELAY_FRACTIONS)
def test_export_sigint_leaves_no_partial_file(bundle_copy, export_seconds, tmp_path, fraction):
    output = tmp_path / "model.onnx"
    command = _hnq("export", str(bundle_copy / "model.pt"), "-o", str(output))
    result = _run_and_signal(command, signal.SIGINT, delay=fraction * export_seconds)
    assert result.returncode in SIGINT_STATUSES, result.stderr
    _assert_onnx_absent_or_complete(output)
    assert _temporary_files(tmp_path) == []

    rerun = subprocess.run(command, env=_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    onnx.checker.check_model(onnx.load(str(output)))
    assert _temporary_files(tmp_path) == []


def test_export_sigint_during_write(bundle_copy, tmp_path):
    """SIGINT as soon as the temporary ONNX file appears, the moment a naive write would leave half a file."""
    output = tmp_path / "model.onnx"
    result = _run_and_signal(_hnq("export", str(bundle_copy / "model.pt"), "-o", str(output)), signal.SIGINT,
                             watch=tmp_path)
    assert result.returncode in SIGINT_STATUSES, result.stderr
    _assert_onnx_absent_or_complete(output)
    assert _temporary_files(tmp_path) == []


@pytest.mark.parametrize("fraction", [0.7, 0.95])
def test_export_sigkill_leaves_no_partial_file(bundle_copy, export_seconds, tmp_path, fraction):
    output = tmp_path / "model.onnx"
    command = _hnq("export", str(bundle_copy / "model.pt"), "-o", str(output))
    _run_and_signal(command, signal.SIGKILL, delay=fraction * export_seconds)
    _assert_onnx_absent_or_complete(output)

    rerun = subprocess.run(command, env=_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    onnx.checker.check_model(onnx.load(str(output)))


def test_export_sigkill_during_write(bundle_copy, tmp_path):
    output = tmp_path / "model.onnx"
    command = _hnq("export", str(bundle_copy / "model.pt"), "-o", str(output))
    _run_and_signal(command, signal.SIGKILL, watch=tmp_path)
    _assert_onnx_absent_or_complete(output)

    rerun = subprocess.run(command, env=_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    onnx.checker.check_model(onnx.load(str(output)))


@pytest.mark.parametrize("moment", ["during search", "during write"])
def test_plan_sigint_leaves_no_partial_file(bundle_copy, tmp_path, moment):
    output = tmp_path / "plan.json"
    command = _hnq("plan", str(bundle_copy / "float.pt"), "--calib", str(bundle_copy / "images"),
                   "-o", str(output), *PLAN_ARGS)
    if moment == "during search":
        # Signal as soon as the command logs that it found the calibration folder: the 31
        # batches of calibration and five search passes each still lie ahead.
        command = [arg for arg in command if arg != "--quiet"] + ["--batches", "31", "--batch-size", "32"]
        result = _signal_after_log_line(command, signal.SIGINT, marker="images in")
        assert result.returncode in SIGINT_STATUSES, result.stderr
        if result.returncode != 0:  # interrupted: nothing may be written
            assert not output.exists(), f"plan.json written after SIGINT (exit {result.returncode})"
        # NOTE: exit 0 means the search finished before the signal took effect; then only
        # the completeness checks below apply. One full-suite run saw plan.json after the
        # signal without its exit status being recorded, so the cause is still open.
    else:
        result = _run_and_signal(command, signal.SIGINT, watch=tmp_path)
    assert result.returncode in SIGINT_STATUSES, result.stderr
    _assert_plan_outputs_absent_or_complete(output)
    assert _temporary_files(tmp_path) == []


def _signal_after_log_line(command: list[str], sig: int, marker: str,
                           timeout: float = 300) -> subprocess.CompletedProcess:
    """Start `command` and send `sig` right after a stderr line containing `marker`."""
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + timeout
    for line in process.stderr:
        lines.append(line)
        if marker in line or time.monotonic() > deadline:
            break
    if process.poll() is None:
        process.send_signal(sig)
    stdout, rest = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(command, process.returncode, stdout, "".join(lines) + rest)


def test_plan_sigkill_then_rerun_succeeds(bundle_copy, tmp_path):
    output = tmp_path / "plan.json"
    command = _hnq("plan", str(bundle_copy / "float.pt"), "--calib", str(bundle_copy / "images"),
                   "-o", str(output), *PLAN_ARGS)
    _run_and_signal(command, signal.SIGKILL, watch=tmp_path)
    _assert_plan_outputs_absent_or_complete(output)

    rerun = subprocess.run(command, env=_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    Plan.load(output)
    _assert_plan_outputs_absent_or_complete(output)
    assert Path(f"{output.with_suffix('')}.sensitivity.png").is_file()


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_train_sigint_keeps_checkpoints_loadable(trained_bundle, fashion_mnist, tmp_path):
    data_dir = tmp_path / "fmnist"
    data_dir.mkdir()
    _write_idx(data_dir / "train-images-idx3-ubyte.gz", fashion_mnist.train_images[:512], 2051)
    _write_idx(data_dir / "train-labels-idx1-ubyte.gz", fashion_mnist.train_labels[:512], 2049)
    _write_idx(data_dir / "t10k-images-idx3-ubyte.gz", fashion_mnist.test_images[:128], 2051)
    _write_idx(data_dir / "t10k-labels-idx1-ubyte.gz", fashion_mnist.test_labels[:128], 2049)
    run = tmp_path / "run"
    command = _hnq("train", str(trained_bundle.float_checkpoint), "-o", str(run), "--data-dir", str(data_dir),
                   "--epochs", "1", "--batch-size", "64", "--calib-batches", "2", "--checkpoint-every", "2",
                   "--no-progress", "--quiet")

    process = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / "last.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # a few more steps, so SIGINT may land in a checkpoint write
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode in SIGINT_STATUSES, stderr

    if (run / "last.pt").exists():
        state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
        assert {"trainer", "model", "job"} <= set(state)
    if (run / "model.pt").exists():
        assert load_checkpoint(run / "model.pt", expect_kind="quantized")["kind"] == "quantized"
    assert _temporary_files(run) == []

    if not (run / "model.pt").exists():
        resumed = subprocess.run([*command, "--resume"], env=_env(), capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr
        assert load_checkpoint(run / "model.pt", expect_kind="quantized")["kind"] == "quantized"


def _blocked_output(tmp_path: Path) -> Path:
    """A folder path whose parent is a regular file, which no user (root included) can create."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder is expected\n")
    return blocker / "out"


# Each command gets a checkpoint that does not exist, so an error naming the output path
# shows that the output check runs before the checkpoint is even read.
def _commands_with_output(output: Path, bundle) -> dict[str, tuple]:
    missing = str(output.parent.parent / "missing.pt")
    return {
        "hnq-export": (export_command, [missing, "-o", str(output / "model.onnx")]),
        "hnq plan": (main, ["plan", missing, "--calib", str(bundle.images), "-o", str(output / "plan.json")]),
        "hnq train": (main, ["train", missing, "-o", str(output / "run"), "--no-progress"]),
        "hnq-eval --json": (eval_command, [str(bundle.onnx), "--imagenet", str(bundle.images),
                                           "--json", str(output / "eval.json"), "--no-progress"]),
        "hnq demo": (main, ["demo", "-o", str(output / "demo"), "--no-progress"]),
    }


@pytest.mark.parametrize("name", ["hnq-export", "hnq plan", "hnq train", "hnq-eval --json", "hnq demo"])
def test_output_under_file_fails_early(trained_bundle, tmp_path, name):
    output = _blocked_output(tmp_path)
    command, args = _commands_with_output(output, trained_bundle)[name]
    started = time.monotonic()
    result = CliRunner().invoke(command, args)
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert str(output.parent) in result.output
    assert "is a file, not a folder" in result.output
    assert "missing.pt" not in result.output
    assert time.monotonic() - started < 10, "the output check should come before any long work"


def test_unwritable_output_folder_fails_early(trained_bundle, tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("this user can write to a 0o555 folder (root); test_output_under_file_fails_early "
                        "covers the unwritable case instead")
        for name, (command, args) in _commands_with_output(folder, trained_bundle).items():
            result = CliRunner().invoke(command, args)
            assert result.exit_code == EXIT_BAD_INPUT, f"{name}: {result.output}"
            assert str(folder) in result.output, name
            assert "not writable" in result.output, name
    finally:
        folder.chmod(0o755)
