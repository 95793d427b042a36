"""Every scheme family on every site of the small trained model: export, ORT, equal codes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from hnq.api import load_calibration_images, load_float_model
from hnq.export import build_onnx_model
from hnq.nn import UnsafeSiteError
from hnq.onnx_builder import lowering_target
from hnq.plan import Plan, apply_plan
from hnq.train import calibrate_float
from models import QuantConfig, quantize_model

pytestmark = pytest.mark.slow

BITS = {"activation": 8, "weight": 8, "residual": 16, "softmax": 8, "logits": 16}


def _uniform_plan(qmodel, family: str, bits: dict) -> Plan:
    sites = {}
    for name, site in qmodel.sites().items():
        scheme = "ibert" if (site.op, family) == ("gelu", "fqvit") else family
        sites[name] = {"op": site.op, "scheme": scheme}
    return Plan(model="hnq_vit_fmnist", bits=dict(bits), sites=sites, rule=f"uniform-{family}")


def _calibrated(bundle, act_bits: int = 8):
    float_model, _ = load_float_model(bundle.float_checkpoint)
    qmodel = quantize_model(float_model, QuantConfig(act_bits=act_bits))
    batches = load_calibration_images(bundle.images, qmodel.image_shape, 2, 32, progress=False)
    calibrate_float(qmodel, batches, len(batches), progress=False)
    return qmodel


@pytest.mark.parametrize("act_bits", [8, 6])
@pytest.mark.parametrize("family", ["ibert", "ivit", "ivit-shift", "fqvit"])
def test_uniform_family_is_bit_exact(trained_bundle, family, act_bits):
    qmodel = _calibrated(trained_bundle, act_bits)
    if family == "ivit-shift":
        plan = _uniform_plan(qmodel, "ivit", {**BITS, "activation": act_bits})
        for entry in plan.sites.values():
            if entry["op"] == "gelu":
                entry["scheme"] = "ivit-shift"
    else:
        plan = _uniform_plan(qmodel, family, {**BITS, "activation": act_bits})
    apply_plan(plan, qmodel.sites())
    qmodel.eval()
    model, _ = build_onnx_model(qmodel, plan, {})
    onnx.checker.check_model(model, full_check=True)
    pixels = trained_bundle.test_images[:200]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    codes = session.run(None, {"pixels": pixels.numpy()})[0]
    reference, _ = qmodel.logits_codes(pixels)
    assert np.array_equal(codes.astype(np.int64), reference.numpy())


def test_int32_lowering_used_where_bounds_allow(trained_bundle):
    qmodel = _calibrated(trained_bundle)
    apply_plan(_uniform_plan(qmodel, "ivit", BITS), qmodel.sites())
    qmodel.eval()
    # The CPU export replaces I-ViT's exponential by a table; the CUDA export calls the function.
    with lowering_target("cuda"):
        model, _ = build_onnx_model(qmodel, _uniform_plan(qmodel, "ivit", BITS), {})
    calls = [n for n in model.graph.node if n.domain == "hnq" and n.op_type == "IViTShiftmax"]
    assert calls
    inputs = {init.name: init for init in model.graph.initializer}
    dtypes = {inputs[name].data_type for node in calls for name in node.input[1:] if name in inputs}
    assert dtypes == {onnx.TensorProto.INT32}


def test_unsafe_site_is_rejected_with_its_name(trained_bundle):
    qmodel = _calibrated(trained_bundle)
    apply_plan(_uniform_plan(qmodel, "ibert", BITS), qmodel.sites())
    qmodel.eval()
    site = qmodel.sites()["blocks.1.attn.softmax"]
    site.in_quant.running_absmax.fill_(1000.0)  # a scale of about 8 per code: too coarse for i-exp
    with pytest.raises(UnsafeSiteError, match=r"site 'blocks.1.attn.softmax', scheme 'ibert'"):
        qmodel.logits_codes(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))
