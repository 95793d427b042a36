"""The command-line steps a user chains: write-images, import, calibrate, plan, export, eval."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from hnq.cli import EXIT_BAD_INPUT, eval_command, export_command, main

pytestmark = pytest.mark.slow


def _invoke(command, args):
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_post_training_flow_is_bit_exact(tmp_path, fashion_mnist):
    images = tmp_path / "train-images"
    _invoke(main, ["write-images", "--split", "train", "--limit", "256", "-o", images, "--no-progress"])
    _invoke(main, ["import", "hnq_vit_fmnist", "-o", tmp_path / "float.pt"])
    _invoke(main, ["plan", tmp_path / "float.pt", "--calib", images, "-o", tmp_path / "plan.json",
                   "--batches", "2", "--batch-size", "32", "--no-progress"])
    _invoke(main, ["calibrate", tmp_path / "float.pt", "--plan", tmp_path / "plan.json", "--calib", images,
                   "--batches", "2", "--batch-size", "32", "-o", tmp_path / "ptq.pt", "--no-progress"])
    _invoke(export_command, [tmp_path / "ptq.pt", "--plan", tmp_path / "plan.json", "-o", tmp_path / "ptq.onnx"])
    _invoke(eval_command, [tmp_path / "ptq.onnx", "--imagenet", images, "--json", tmp_path / "eval.json",
                           "--no-progress"])
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["compared"] == 256
    assert report["mismatched"] == 0


def test_import_unknown_model_rejected(tmp_path):
    result = CliRunner().invoke(main, ["import", "vit_nonexistent_patch99", "-o", str(tmp_path / "x.pt")])
    assert result.exit_code != 0
    assert "vit_nonexistent_patch99" in result.output


def test_import_missing_weights_file_rejected(tmp_path):
    missing = tmp_path / "weights.pth"
    result = CliRunner().invoke(main, ["import", "hnq_vit_fmnist", "--pretrained", str(missing),
                                       "-o", str(tmp_path / "x.pt")])
    assert result.exit_code == EXIT_BAD_INPUT
    assert str(missing) in result.output
