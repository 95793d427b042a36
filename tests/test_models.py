"""The ViT adapter: fused attention off, unsupported options rejected, sites named as in timm."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import Attention

from models import QuantConfig, build_float_model, builtin_arch, quantize_model


def test_builtin_model_registered_in_timm():
    model = timm.create_model("hnq_vit_fmnist", pretrained=False)
    assert model.patch_embed.num_patches == 49
    assert model.num_classes == 10


def test_builtin_model_has_no_pretrained_weights():
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("hnq_vit_fmnist", pretrained=True)


def test_quantize_turns_fused_attention_off():
    float_model = build_float_model(builtin_arch())
    attentions = [m for m in float_model.modules() if isinstance(m, Attention)]
    assert attentions
    for attn in attentions:
        attn.fused_attn = True
    quantize_model(float_model, QuantConfig())
    assert all(attn.fused_attn is False for attn in attentions)


def test_unfused_attention_matches_fused():
    torch.manual_seed(0)
    float_model = build_float_model(builtin_arch()).eval()
    pixels = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    for attn in float_model.modules():
        if isinstance(attn, Attention):
            attn.fused_attn = True
    fused = float_model(pixels)
    quantize_model(float_model, QuantConfig())
    assert torch.allclose(float_model(pixels), fused, atol=1e-5)


def test_sites_in_model_order():
    qmodel = quantize_model(build_float_model(builtin_arch()), QuantConfig())
    names = list(qmodel.sites())
    assert names[:4] == ["blocks.0.norm1", "blocks.0.attn.softmax", "blocks.0.norm2", "blocks.0.mlp.act"]
    assert names[-1] == "norm"
    assert len(names) == 4 * 4 + 1


@pytest.mark.parametrize("option, value, reason", [
    ("global_pool", "avg", "class-token head"),
    ("init_values", 1e-5, "LayerScale"),
    ("qk_norm", True, "normalized queries"),
    ("reg_tokens", 2, "register tokens"),
])
def test_unsupported_vit_option_rejected(option, value, reason):
    arch = builtin_arch()
    arch["timm_kwargs"] = {option: value}
    with pytest.raises(NotImplementedError, match=reason):
        quantize_model(build_float_model(arch), QuantConfig())


def test_wrong_image_shape_rejected():
    qmodel = quantize_model(build_float_model(builtin_arch()), QuantConfig()).eval()
    with pytest.raises(ValueError, match=r"expected images of shape \[N, 1, 28, 28\]"):
        qmodel(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))


@pytest.mark.parametrize("field, value", [("act_bits", 9), ("softmax_bits", 12), ("weight_bits", 2)])
def test_quant_config_rejects_bits(field, value):
    with pytest.raises(ValueError, match=str(value)):
        QuantConfig(**{field: value})


def test_float_mode_matches_timm_model():
    from hnq.nn import float_mode

    torch.manual_seed(0)
    float_model = build_float_model(builtin_arch()).eval()
    pixels = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    qmodel = quantize_model(float_model, QuantConfig()).eval()
    with torch.no_grad(), float_mode(qmodel):
        mirrored = qmodel(pixels)
    assert torch.allclose(mirrored, float_model(pixels), atol=1e-4)
    assert not qmodel.training


def test_builtin_swin_registered_with_a_shifted_block():
    from models.swin import QuantSwin

    model = timm.create_model("hnq_swin_fmnist", pretrained=False)
    assert type(model).__name__ == "SwinTransformer"
    assert model.num_classes == 10
    assert builtin_arch("hnq_swin_fmnist")["family"] == "swin"
    qmodel = quantize_model(build_float_model(builtin_arch("hnq_swin_fmnist")), QuantConfig())
    assert isinstance(qmodel, QuantSwin)
    shifts = [block.shift_size for stage in model.layers for block in stage.blocks]
    assert any(max(shift) > 0 for shift in shifts), "the first stage's second block shifts its windows"
    with pytest.raises(ValueError, match="not a built-in model"):
        builtin_arch("hnq_swin")


@pytest.mark.parametrize("family", ["ibert", "ivit", "fqvit"])
def test_builtin_swin_ort_equals_reference(fashion_mnist, family):
    """The built-in Swin exports and runs in ORT with the reference's codes, for every family."""
    import onnxruntime as ort

    from hnq.api import bits_from_quant_config
    from hnq.export import build_onnx_model
    from hnq.plan import Plan, apply_plan
    from hnq.train import calibrate_float

    torch.manual_seed(0)
    qmodel = quantize_model(build_float_model(builtin_arch("hnq_swin_fmnist")), QuantConfig())
    pixels = torch.from_numpy(fashion_mnist.test_images[:32]).unsqueeze(1).contiguous()
    calibrate_float(qmodel, [pixels], 1, progress=False)
    sites = {name: {"op": site.op, "scheme": "ibert" if (site.op, family) == ("gelu", "fqvit") else family}
             for name, site in qmodel.sites().items()}
    plan = Plan(model="hnq_swin_fmnist", bits=bits_from_quant_config(QuantConfig()), sites=sites, rule=family)
    apply_plan(plan, qmodel.sites())
    qmodel.eval()
    model, _ = build_onnx_model(qmodel, plan, {})
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    codes = session.run(None, {"pixels": pixels.numpy()})[0]
    reference, _ = qmodel.logits_codes(pixels)
    assert (codes.astype("int64") == reference.numpy()).all()
