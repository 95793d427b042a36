"""The static CUDA kernel check: hand-built graphs, CPU-target exports, and CUDA-target exports with no fallbacks."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import skimage.data
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from hnq.api import default_plan, load_quantized_model, quantize
from hnq.cli import export_command
from hnq.cuda_kernels import find_cuda_fallbacks
from hnq.export import build_onnx_model
from hnq.onnx_builder import lowering_target
from hnq.train import calibrate_float


def make_model(nodes, inputs, outputs, opset=18, functions=()):
    graph = helper.make_graph(nodes, "cuda_check", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("local", 1)],
                             functions=list(functions), ir_version=10)


def shift_function() -> onnx.FunctionProto:
    """Local function `local.Shift(x) = BitShift(x, 3)` on uint64, to check that functions are inlined."""
    three = helper.make_node("Constant", [], ["three"], value=numpy_helper.from_array(np.array(3, np.uint64)))
    shift = helper.make_node("BitShift", ["x", "three"], ["y"], direction="RIGHT", name="shift")
    return helper.make_function("local", "Shift", ["x"], ["y"], [three, shift],
                                opset_imports=[helper.make_opsetid("", 18)])


def test_bitshift_and_int32_clip_reported():
    nodes = [
        helper.make_node("Shift", ["wide"], ["shifted"], domain="local", name="call_shift"),
        helper.make_node("Clip", ["narrow", "low", "high"], ["clipped"], name="clip_int32"),
        helper.make_node("Add", ["narrow", "narrow"], ["sum"], name="add_int32"),
    ]
    inputs = [helper.make_tensor_value_info("wide", TensorProto.UINT64, [4]),
              helper.make_tensor_value_info("narrow", TensorProto.INT32, [4]),
              helper.make_tensor_value_info("low", TensorProto.INT32, []),
              helper.make_tensor_value_info("high", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info(name, elem_type, [4]) for name, elem_type in
               (("shifted", TensorProto.UINT64), ("clipped", TensorProto.INT32), ("sum", TensorProto.INT32))]
    model = make_model(nodes, inputs, outputs, functions=[shift_function()])
    onnx.checker.check_model(model, full_check=True)

    fallbacks = {f.op_type: f for f in find_cuda_fallbacks(model)}

    assert set(fallbacks) == {"BitShift", "Clip"}
    assert fallbacks["BitShift"].kind == "no-kernel"
    assert fallbacks["BitShift"].input_types == ("uint64", "uint64")
    assert fallbacks["Clip"].kind == "type"
    assert fallbacks["Clip"].node_name == "clip_int32"
    assert "int32" in fallbacks["Clip"].reason
    assert fallbacks["Clip"].input_types == ("int32", "int32", "int32")


def test_uninferable_types_reported_unknown():
    nodes = [helper.make_node("Opaque", ["x"], ["hidden"], domain="local", name="opaque"),
             helper.make_node("Add", ["hidden", "x"], ["y"], name="add_after_opaque")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.INT64, [2])],
                       [helper.make_tensor_value_info("y", TensorProto.INT64, [2])])

    fallbacks = {f.node_name: f for f in find_cuda_fallbacks(model)}

    assert fallbacks["opaque"].kind == "no-kernel"
    assert fallbacks["add_after_opaque"].kind == "unknown"
    assert fallbacks["add_after_opaque"].input_types == (None, "int64")


def test_opset_outside_kernel_range_reported():
    """Equal at opset 6 is version 1, and the CUDA Equal kernels start at version 7."""
    nodes = [helper.make_node("Equal", ["a", "b"], ["same"], name="old_equal")]
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT32, [3]) for name in ("a", "b")]
    model = make_model(nodes, inputs, [helper.make_tensor_value_info("same", TensorProto.BOOL, [3])], opset=6)

    fallbacks = find_cuda_fallbacks(model)

    assert [f.kind for f in fallbacks] == ["opset"]
    assert "version 1" in fallbacks[0].reason


def test_cast_like_checked_as_cast():
    nodes = [helper.make_node("CastLike", ["x", "like"], ["y"], name="cast_like")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.INT64, [2]),
              helper.make_tensor_value_info("like", TensorProto.INT32, [])]
    model = make_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.INT32, [2])])

    assert find_cuda_fallbacks(model) == []


@pytest.mark.slow
def test_cpu_target_export_fallbacks_listed(trained_bundle):
    """The CPU lowering feeds u8 x s8 MatMulInteger, which CUDA lacks. Its requantizations of
    this model all run in float64 (Cast, Mul, Add, Clip, and Floor in LayerNorm), which CUDA
    has, so no BitShift on uint64 is left to fall back."""
    fallbacks = find_cuda_fallbacks(onnx.load(str(trained_bundle.onnx)))
    by_op = {}
    for fallback in fallbacks:
        by_op.setdefault(fallback.op_type, []).append(fallback)

    assert set(by_op) == {"MatMulInteger"}
    assert all(f.kind == "type" and f.input_types[0] == "uint8" for f in by_op["MatMulInteger"])
    assert all("takes T1 in {int8}, not uint8" in f.reason for f in by_op["MatMulInteger"])
    assert all(f.node_name for f in fallbacks)


def assert_cuda_export_runs_on_cuda(qmodel, plan, pixels: torch.Tensor) -> None:
    with lowering_target("cuda"):
        model, _ = build_onnx_model(qmodel, plan, {})
    fallbacks = find_cuda_fallbacks(model)
    assert fallbacks == [], "\n".join(f.describe() for f in fallbacks)

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    codes = session.run(None, {"pixels": pixels.numpy()})[0]
    reference, _ = qmodel.logits_codes(pixels)
    assert np.array_equal(codes.astype(np.int64), reference.numpy())


@pytest.mark.slow
def test_trained_model_cuda_export_clean(trained_bundle):
    qmodel, plan, _ = load_quantized_model(trained_bundle.checkpoint)
    assert_cuda_export_runs_on_cuda(qmodel, plan, trained_bundle.test_images[:64])


@pytest.mark.slow
def test_export_cli_cuda_target(trained_bundle, tmp_path):
    out = tmp_path / "cuda.onnx"
    result = CliRunner().invoke(export_command, [str(trained_bundle.checkpoint), "--target", "cuda", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert find_cuda_fallbacks(onnx.load(str(out))) == []


def photos(size: int) -> torch.Tensor:
    """uint8 pixels [2, 3, size, size] of two photographs that scikit-image ships."""
    images = []
    for name in ("astronaut", "chelsea"):
        picture = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        resized = picture.resize((size, size), Image.Resampling.BICUBIC)
        images.append(torch.from_numpy(np.array(resized)).permute(2, 0, 1))
    return torch.stack(images).contiguous()


@pytest.mark.slow
def test_deit_tiny_cuda_export_clean():
    from models.pretrained import create_float_model

    torch.manual_seed(0)
    float_model, _ = create_float_model("deit_tiny_patch16_224")
    plan = default_plan(float_model)
    qmodel = quantize(float_model, plan)
    pixels = photos(224)
    calibrate_float(qmodel, [pixels], 1, progress=False)
    qmodel.eval()
    assert_cuda_export_runs_on_cuda(qmodel, plan, pixels)
