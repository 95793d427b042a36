"""Full-size timm models (DeiT, distilled DeiT, ViT-B, Swin-T) at 224x224: export, ORT, equal codes.

The models are built with pretrained=False and a fixed seed; calibration runs on real
photographs that scikit-image ships, resized with Pillow.

timm's initialization (weights of std 0.02) gives near-uniform attention: every score is
below about 0.4 in magnitude. The tests multiply the qkv weights by QKV_GAIN, which scales
the scores by QKV_GAIN^2 into the few-units range of trained models, so the softmax
schemes run at the input scales they meet in practice.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from onnx import TensorProto
from timm.layers import Attention
from timm.models.swin_transformer import WindowAttention

from hnq.data import SAMPLE_PHOTOS, load_sample_photos
from hnq.export import build_onnx_model
from hnq.quant import QTensor
from hnq.schemes.registry import onnx_functions
from hnq.nn import float_mode
from hnq.onnx_builder import GraphBuilder
from hnq.plan import Plan, alternate_plan, apply_plan
from hnq.train import calibrate_float, freeze_observers
from models import PixelClassifier, QuantConfig, QuantSwin, QuantViT, WindowSizeError, quantize_model
from models.pretrained import create_float_model
from models.swin import WindowSoftmaxSite

pytestmark = pytest.mark.slow

BITS = {"activation": 8, "weight": 8, "residual": 16, "softmax": 8, "logits": 16}
QUANT_CONFIG = QuantConfig(act_bits=8, weight_bits=8, residual_bits=16, softmax_bits=8, logits_bits=16)
# Colour photographs bundled with scikit-image (no download needed).
PHOTOS = SAMPLE_PHOTOS
SMALLEST = "deit_tiny_patch16_224"
SWIN = "swin_tiny_patch4_window7_224"
CALIBRATION_IMAGES = 4
COMPARED_IMAGES = 2
QKV_GAIN = 4.0


@functools.lru_cache(maxsize=1)
def photo_batch(size: int = 224) -> torch.Tensor:
    """uint8 pixels [len(PHOTOS), 3, size, size] of the scikit-image photographs."""
    return load_sample_photos(size, PHOTOS)


@functools.lru_cache(maxsize=None)
def calibrated(name: str) -> tuple[PixelClassifier, QuantViT | QuantSwin]:
    """Seeded float model and its quantized model, calibrated on the photographs (no plan yet)."""
    torch.manual_seed(0)
    float_model, _ = create_float_model(name)
    with torch.no_grad():
        for module in float_model.modules():
            if isinstance(module, (Attention, WindowAttention)):
                module.qkv.weight.mul_(QKV_GAIN)
    qmodel = quantize_model(float_model, QUANT_CONFIG)
    calibrate_float(qmodel, [photo_batch()[:CALIBRATION_IMAGES]], 1, progress=False)
    qmodel.eval()
    return float_model, qmodel


def uniform_plan(name: str, qmodel, family: str) -> Plan:
    """Every site on one family; GELU sites use I-BERT where the family has no integer GELU."""
    sites = {}
    for site_name, site in qmodel.sites().items():
        scheme = "ibert" if (site.op, family) == ("gelu", "fqvit") else family
        sites[site_name] = {"op": site.op, "scheme": scheme}
    return Plan(model=name, bits=dict(BITS), sites=sites, rule=f"uniform-{family}")


def ort_session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def assert_ort_equals_reference(qmodel, plan: Plan, pixels: torch.Tensor) -> None:
    apply_plan(plan, qmodel.sites())
    model, _ = build_onnx_model(qmodel, plan, {})
    onnx.checker.check_model(model, full_check=True)
    codes = ort_session(model).run(None, {"pixels": pixels.numpy()})[0]
    reference, _ = qmodel.logits_codes(pixels)
    assert codes.dtype == np.int32
    assert codes.shape == (pixels.shape[0], qmodel.num_classes)
    assert np.array_equal(codes.astype(np.int64), reference.numpy())


MODELS = [
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "vit_base_patch16_224",
    "swin_tiny_patch4_window7_224",
]


@pytest.mark.parametrize("name", MODELS)
def test_alternate_plan_bit_exact(name):
    _, qmodel = calibrated(name)
    plan = alternate_plan(name, qmodel.sites(), BITS)
    assert_ort_equals_reference(qmodel, plan, photo_batch()[:COMPARED_IMAGES])


@pytest.mark.parametrize("name", MODELS)
def test_float_mode_matches_timm(name):
    float_model, qmodel = calibrated(name)
    pixels = photo_batch()[:COMPARED_IMAGES]
    with torch.no_grad():
        expected = float_model(pixels)
        with float_mode(qmodel):
            mirrored = qmodel(pixels)
    assert not qmodel.training
    assert torch.allclose(mirrored, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["ibert", "ivit", "fqvit"])
def test_single_family_plan_bit_exact(family):
    _, qmodel = calibrated(SMALLEST)
    assert_ort_equals_reference(qmodel, uniform_plan(SMALLEST, qmodel, family), photo_batch()[:COMPARED_IMAGES])


def test_distilled_heads_averaged_with_one_rounding():
    name = "deit_tiny_distilled_patch16_224"
    _, qmodel = calibrated(name)
    apply_plan(alternate_plan(name, qmodel.sites(), BITS), qmodel.sites())
    captured = []
    qmodel.norm.recorder = lambda _site, _x, y: captured.append(y)
    try:
        codes, scale = qmodel.logits_codes(photo_batch()[:COMPARED_IMAGES])
    finally:
        qmodel.norm.recorder = None
    tokens = captured[0]
    cls = QTensor(tokens.value[:, 0], tokens.scale, tokens.bits, tokens.signed)
    dist = QTensor(tokens.value[:, 1], tokens.scale, tokens.bits, tokens.signed)
    acc_cls, scales_cls, _ = qmodel.head.accumulate(cls)
    acc_dist, scales_dist, _ = qmodel.head_dist.accumulate(dist)
    average = (acc_cls.double() * torch.from_numpy(scales_cls) + acc_dist.double() * torch.from_numpy(scales_dist)) / 2
    exact = average / scale
    assert exact.abs().max() < 2**15 - 1  # no logit reaches the clamp
    # One half-up rounding of the exact average; the dyadic multipliers add far less than 0.01 code.
    assert (codes.double() - exact).abs().max() <= 0.51


def masked_probabilities(qmodel: QuantSwin, block_path: str, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The masked attention probabilities of one shifted block from the torch reference and from ORT."""
    site = qmodel.sites()[f"{block_path}.attn.softmax"]
    captured = []
    site.recorder = lambda _site, _x, y: captured.append(y.value.clone())
    try:
        qmodel.logits_codes(pixels)
    finally:
        site.recorder = None
    builder = GraphBuilder()
    qmodel.to_onnx(builder)
    probs_name = f"{block_path}/attn/masked_probs"
    assert any(probs_name in node.output for node in builder.nodes)
    builder.add_output(probs_name, TensorProto.INT64, None)
    model = builder.make_model(onnx_functions(), graph_name="swin_masked_probs", metadata={})
    outputs = ort_session(model).run([probs_name], {"pixels": pixels.numpy()})
    return captured[0].numpy(), outputs[0]


@pytest.mark.parametrize("family", ["ibert", "ivit", "fqvit"])
def test_swin_masked_probabilities_zero(family):
    _, qmodel = calibrated(SWIN)
    apply_plan(uniform_plan(SWIN, qmodel, family), qmodel.sites())
    block_path = "layers.0.blocks.1"  # a shifted-window block of the first stage
    block = qmodel.layers[0].blocks[1]
    mask = block.attn.mask
    assert mask is not None
    assert bool(mask.any())
    pixels = photo_batch()[:COMPARED_IMAGES]
    torch_probs, ort_probs = masked_probabilities(qmodel, block_path, pixels)
    n_windows, area = mask.shape[0], mask.shape[-1]
    per_image = (COMPARED_IMAGES, n_windows, block.attn.num_heads, area, area)
    windowed_mask = np.broadcast_to(mask.numpy()[None, :, None], per_image).reshape(torch_probs.shape)
    assert np.all(torch_probs[windowed_mask] == 0)
    assert np.all(ort_probs[windowed_mask] == 0)
    assert np.array_equal(torch_probs, ort_probs)
    assert np.all(torch_probs.max(axis=-1) > 0)


def test_swin_qat_masks_and_trains_bias():
    _, qmodel = calibrated(SWIN)
    apply_plan(alternate_plan(SWIN, qmodel.sites(), BITS), qmodel.sites())
    attention = qmodel.layers[0].blocks[1].attn
    captured = []
    attention.softmax.recorder = lambda _site, _x, y: captured.append(y.value.detach())
    freeze_observers(qmodel, True)
    qmodel.train()
    try:
        qmodel(photo_batch()[:1]).sum().backward()
    finally:
        qmodel.eval()
        attention.softmax.recorder = None
    windowed_mask = attention.mask[:, None].expand(-1, attention.num_heads, -1, -1).reshape(captured[0].shape)
    assert torch.all(captured[0][windowed_mask] == 0)
    gradient = attention.relative_position_bias_table.grad
    assert gradient is not None
    assert gradient.abs().sum() > 0
    qmodel.zero_grad(set_to_none=True)


def test_swin_sites_include_merging_norms():
    _, qmodel = calibrated(SWIN)
    names = list(qmodel.sites())
    assert names[0] == "patch_embed.norm"
    assert names[-1] == "norm"
    for stage in (1, 2, 3):
        merging = f"layers.{stage}.downsample.norm"
        assert merging in names
        assert names.index(merging) + 1 == names.index(f"layers.{stage}.blocks.0.norm1")
    assert "layers.0.downsample.norm" not in names
    assert "layers.0.blocks.1.attn.softmax" in names
    assert len(names) == 1 + 3 + 4 * (2 + 2 + 6 + 2) + 1


def test_swin_shifted_blocks_have_masks():
    _, qmodel = calibrated(SWIN)
    shifted = [block.attn.mask is not None for stage in qmodel.layers for block in stage.blocks]
    # Odd blocks shift, except in the last stage, whose 7x7 grid is a single window.
    assert shifted == [False, True, False, True] + [False, True] * 3 + [False, False]
    assert isinstance(qmodel.layers[0].blocks[1].attn.softmax, WindowSoftmaxSite)


def test_swin_non_divisible_input_rejected():
    float_model, _ = create_float_model(SWIN, img_size=200)
    with pytest.raises(WindowSizeError) as info:
        quantize_model(float_model, QUANT_CONFIG)
    message = str(info.value)
    assert "window size 7x7" in message
    assert "50x50 patch grid" in message
    assert "200x200" in message


def test_swin_turns_fused_attention_off():
    torch.manual_seed(0)
    float_model, _ = create_float_model(SWIN)
    attentions = [m for m in float_model.modules() if isinstance(m, WindowAttention)]
    for attn in attentions:
        attn.fused_attn = True
    pixels = photo_batch()[:COMPARED_IMAGES]
    with torch.no_grad():
        fused = float_model(pixels)
    quantize_model(float_model, QUANT_CONFIG)
    assert attentions
    assert all(attn.fused_attn is False for attn in attentions)
    with torch.no_grad():
        assert torch.allclose(float_model(pixels), fused, atol=1e-4)


def test_swin_unsupported_option_rejected():
    model = timm.create_model(SWIN, pretrained=False, global_pool="max")
    float_model = PixelClassifier(model, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with pytest.raises(NotImplementedError, match="global_pool='max'"):
        quantize_model(float_model, QUANT_CONFIG)


def test_unsupported_class_rejected():
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    float_model = PixelClassifier(model, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with pytest.raises(NotImplementedError, match="ResNet") as info:
        quantize_model(float_model, QUANT_CONFIG)
    assert "SwinTransformer" in str(info.value)
    assert "VisionTransformerDistilled" in str(info.value)
