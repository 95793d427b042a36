"""A mismatch explains itself: the report names the first differing site and leaves a reproducer."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from hnq.api import load_quantized_model
from hnq.diagnose import locate_mismatch, write_reproducer

pytestmark = pytest.mark.slow


def _tamper(model: onnx.ModelProto, prefix: str) -> str:
    """Change one per-channel requantization constant of the site under `prefix` by about 2 %;
    return its name. The constant is a float64 factor m 2^-s, or an int64 multiplier m where
    the requantization runs in int64."""
    for index, init in enumerate(model.graph.initializer):
        array = numpy_helper.to_array(init)
        if not init.name.startswith(prefix) or array.ndim != 1 or array.size != 64:
            continue
        changed = array.copy()
        if array.dtype == np.float64:
            changed[7] *= 1.02
        elif np.abs(array).max() > 1000:
            changed[7] += np.sign(changed[7]) * (np.abs(changed[7]) // 50)
        else:
            continue
        model.graph.initializer[index].CopyFrom(numpy_helper.from_array(changed, init.name))
        return init.name
    raise AssertionError(f"no per-channel requantization constant under {prefix}")


def test_report_names_tampered_site(trained_bundle, tmp_path):
    model = onnx.load(str(trained_bundle.onnx))
    _tamper(model, "blocks.2/norm1/")
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    qmodel, _, _ = load_quantized_model(trained_bundle.checkpoint)
    pixels = trained_bundle.test_images[:16].numpy()
    report, tensors = locate_mismatch(tampered, qmodel, pixels)
    assert report is not None
    assert report.site == "blocks.2.norm1"
    assert report.where == "output"
    assert report.mismatched > 0
    assert "blocks.2/norm1" in report.node

    folder = write_reproducer(tampered, report, tensors, tmp_path / "repro")
    result = subprocess.run([sys.executable, "reproduce.py"], cwd=folder, capture_output=True, text=True, check=True)
    assert "site: blocks.2.norm1" in result.stdout
    assert f"mismatched: {report.mismatched}" in result.stdout


def test_clean_model_has_no_mismatch(trained_bundle):
    qmodel, _, _ = load_quantized_model(trained_bundle.checkpoint)
    report, _ = locate_mismatch(trained_bundle.onnx, qmodel, trained_bundle.test_images[:8].numpy())
    assert report is None


def test_eval_cli_reports_site_and_writes_reproducer(trained_bundle, tmp_path):
    import shutil

    from click.testing import CliRunner

    from hnq.cli import eval_command

    model = onnx.load(str(trained_bundle.onnx))
    _tamper(model, "blocks.1/norm2/")
    tampered = trained_bundle.folder / "tampered_eval.onnx"  # beside the checkpoint it records
    onnx.save(model, str(tampered))
    report_path = tmp_path / "eval.json"
    try:
        result = CliRunner().invoke(eval_command, [str(tampered), "--imagenet", str(trained_bundle.images),
                                                   "--limit", "64", "--json", str(report_path), "--no-progress"])
    finally:
        tampered.unlink()
    assert result.exit_code == 1, result.output
    assert "first differing site: blocks.1.norm2" in result.output
    assert (tmp_path / "eval.mismatch" / "site.onnx").is_file()
    assert (tmp_path / "eval.mismatch" / "reproduce.py").is_file()
    shutil.rmtree(tmp_path / "eval.mismatch")
