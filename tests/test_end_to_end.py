"""End to end on a small model trained on real Fashion-MNIST: export, ORT, bit-exact, accuracy."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from hnq.api import load_quantized_model
from hnq.cli import eval_command, export_command
from hnq.evaluate import evaluate
from hnq.train import top1

pytestmark = pytest.mark.slow


def test_onnx_model_passes_full_check(trained_bundle):
    model = onnx.load(str(trained_bundle.onnx))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 10
    assert {o.domain: o.version for o in model.opset_import} == {"": 18, "hnq": 1}
    assert {f.domain for f in model.functions} == {"hnq"}


def test_onnx_metadata_records_preprocessing(trained_bundle):
    props = {p.key: p.value for p in onnx.load(str(trained_bundle.onnx)).metadata_props}
    preprocessing = json.loads(props["hnq.preprocessing"])
    assert preprocessing["mean"] == pytest.approx([0.2860])
    assert json.loads(props["hnq.input"])["shape"] == [1, 28, 28]
    assert json.loads(props["hnq.class_names"])[9] == "Ankle boot"
    assert json.loads(props["hnq.plan"])["rule"] == "alternate"


def test_ort_codes_equal_reference(trained_bundle):
    qmodel, _, _ = load_quantized_model(trained_bundle.checkpoint)
    pixels = trained_bundle.test_images
    reference, _ = qmodel.logits_codes(pixels)
    session = ort.InferenceSession(str(trained_bundle.onnx), providers=["CPUExecutionProvider"])
    codes = session.run(None, {"pixels": pixels.numpy()})[0]
    assert codes.dtype == np.int32
    assert np.array_equal(codes.astype(np.int64), reference.numpy())


def test_codes_equal_without_graph_optimizations(trained_bundle):
    pixels = trained_bundle.test_images[:200].numpy()
    outputs = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(str(trained_bundle.onnx), options, providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"pixels": pixels})[0])
    assert np.array_equal(outputs[0], outputs[1])


def test_integer_accuracy_within_one_point(trained_bundle):
    qmodel, _, _ = load_quantized_model(trained_bundle.checkpoint)
    with torch.no_grad():
        integer_top1 = top1(qmodel(trained_bundle.test_images), trained_bundle.test_labels)
    assert integer_top1 >= trained_bundle.float_top1 - 0.01, (integer_top1, trained_bundle.float_top1)


def test_evaluate_reports_zero_mismatches(trained_bundle):
    report = evaluate(trained_bundle.onnx, trained_bundle.images, progress=False)
    assert report.count == 1000
    assert report.compared == 1000
    assert report.mismatched == 0
    assert report.mismatched_codes == 0
    assert report.provider == "CPUExecutionProvider"
    assert report.ort_top1 == report.reference_top1
    assert report.ort_top5 >= report.ort_top1
    assert report.float_top1 == pytest.approx(trained_bundle.float_top1)


def test_export_cli_writes_model(trained_bundle, tmp_path):
    out = tmp_path / "again.onnx"
    result = CliRunner().invoke(export_command, [str(trained_bundle.checkpoint), "--plan", str(trained_bundle.plan),
                                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file()
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_eval_cli_writes_json(trained_bundle, tmp_path):
    report_path = tmp_path / "eval.json"
    result = CliRunner().invoke(eval_command, [str(trained_bundle.onnx), "--imagenet", str(trained_bundle.images),
                                               "--limit", "300", "--json", str(report_path), "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["compared"] == 300
    assert report["mismatched"] == 0
    assert "integer top-1 (ONNX Runtime)" in result.output
