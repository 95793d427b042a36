"""Local pretrained weights: every file format, checkpoint wrappers, head resets and clear errors."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from models import build_float_model
from models.pretrained import PretrainedWeightsError, create_float_model, read_state_dict

NAME = "deit_tiny_patch16_224"


@pytest.fixture(scope="module")
def source_state():
    """A seeded 10-class DeiT-tiny state dict standing in for downloaded weights."""
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False, num_classes=10)
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_tensors(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    assert set(own) == set(state)
    for key, value in state.items():
        assert torch.equal(own[key], value), key


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".safetensors"])
def test_each_format_round_trips(tmp_path, source_state, suffix):
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(source_state, str(path))
    else:
        torch.save(source_state, path)
    float_model, arch = create_float_model(NAME, pretrained=path, num_classes=10)
    assert_same_tensors(float_model.model, source_state)
    assert not float_model.training


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_ema"])
def test_wrapped_checkpoint_loads(tmp_path, source_state, wrapper):
    path = tmp_path / "checkpoint.pth"
    torch.save({wrapper: source_state, "epoch": 299, "arch": NAME}, path)
    float_model, _ = create_float_model(NAME, pretrained=path, num_classes=10)
    assert_same_tensors(float_model.model, source_state)


def test_data_parallel_prefix_stripped(tmp_path, source_state):
    path = tmp_path / "parallel.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source_state.items()}}, path)
    float_model, _ = create_float_model(NAME, pretrained=path, num_classes=10)
    assert_same_tensors(float_model.model, source_state)


def test_wrong_class_count_names_reset_head(tmp_path, source_state):
    path = tmp_path / "weights.pth"
    torch.save(source_state, path)
    with pytest.raises(PretrainedWeightsError, match="reset_head=True") as info:
        create_float_model(NAME, pretrained=path, num_classes=1000)
    assert "10-class head" in str(info.value)
    assert str(path) in str(info.value)


def test_reset_head_keeps_fresh_head(tmp_path, source_state):
    path = tmp_path / "weights.pth"
    torch.save(source_state, path)
    torch.manual_seed(1)
    float_model, arch = create_float_model(NAME, pretrained=path, num_classes=3, reset_head=True)
    torch.manual_seed(1)
    fresh = timm.create_model(NAME, pretrained=False, num_classes=3)
    own = float_model.model.state_dict()
    for key in ("head.weight", "head.bias"):
        assert own[key].shape[0] == 3
        assert torch.equal(own[key], fresh.state_dict()[key])
    for key, value in source_state.items():
        if not key.startswith("head."):
            assert torch.equal(own[key], value), key
    assert arch["timm_kwargs"]["num_classes"] == 3


def test_reset_head_on_distilled_drops_both_heads(tmp_path):
    name = "deit_tiny_distilled_patch16_224"
    torch.manual_seed(0)
    source = timm.create_model(name, pretrained=False, num_classes=10).state_dict()
    path = tmp_path / "distilled.safetensors"
    save_file(dict(source), str(path))
    float_model, _ = create_float_model(name, pretrained=path, num_classes=4, reset_head=True)
    own = float_model.model.state_dict()
    assert own["head.weight"].shape[0] == 4
    assert own["head_dist.weight"].shape[0] == 4
    assert torch.equal(own["dist_token"], source["dist_token"])


def test_key_mismatch_lists_keys_and_file(tmp_path, source_state):
    state = dict(source_state)
    del state["blocks.0.norm1.weight"]
    state["blocks.0.extra.weight"] = torch.zeros(3)
    state["pos_embed"] = torch.zeros(1, 50, 192)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(PretrainedWeightsError) as info:
        create_float_model(NAME, pretrained=path, num_classes=10)
    message = str(info.value)
    assert str(path) in message
    assert "missing keys (1): blocks.0.norm1.weight" in message
    assert "unexpected keys (1): blocks.0.extra.weight" in message
    assert "pos_embed (file (1, 50, 192), model (1, 197, 192))" in message


def test_non_checkpoint_file_rejected(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n")
    with pytest.raises(PretrainedWeightsError, match="cannot read .* as a PyTorch checkpoint"):
        read_state_dict(path)
    fake = tmp_path / "notes.safetensors"
    fake.write_text("these are not weights either\n")
    with pytest.raises(PretrainedWeightsError, match="cannot read .* as a safetensors file"):
        read_state_dict(fake)


def test_checkpoint_without_tensors_rejected(tmp_path):
    path = tmp_path / "metadata.pth"
    torch.save({"epoch": 3, "arch": NAME}, path)
    with pytest.raises(PretrainedWeightsError, match="not a model checkpoint"):
        read_state_dict(path)


def test_missing_file_and_unknown_suffix_rejected(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="not found"):
        read_state_dict(tmp_path / "absent.pth")
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"\0")
    with pytest.raises(PretrainedWeightsError, match="unsupported weights file suffix '.npz'"):
        read_state_dict(odd)


def test_arch_rebuilds_same_model(tmp_path, source_state):
    path = tmp_path / "weights.pth"
    torch.save(source_state, path)
    float_model, arch = create_float_model(NAME, pretrained=path, num_classes=10)
    assert arch["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert arch["input_size"] == [3, 224, 224]
    rebuilt = build_float_model(arch)
    rebuilt.load_state_dict(float_model.state_dict())
    rebuilt.eval()
    pixels = torch.arange(2 * 3 * 224 * 224).remainder(256).to(torch.uint8).view(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(rebuilt(pixels), float_model(pixels))


def test_swin_checkpoint_with_stale_buffers_loads(tmp_path):
    name = "swin_tiny_patch4_window7_224"
    torch.manual_seed(0)
    source = timm.create_model(name, pretrained=False, num_classes=5)
    state = dict(source.state_dict())
    # Older Swin checkpoints also saved these buffers, which timm 1.0 no longer persists.
    state.update({k: v for k, v in source.named_buffers() if k.endswith(("relative_position_index", "attn_mask"))})
    path = tmp_path / "swin.pth"
    torch.save({"model": state}, path)
    float_model, arch = create_float_model(name, pretrained=path, num_classes=5, mean=(0.5, 0.5, 0.5),
                                           std=(0.25, 0.25, 0.25))
    assert arch["family"] == "swin"
    assert arch["std"] == [0.25, 0.25, 0.25]
    assert torch.equal(float_model.model.head.fc.weight, source.head.fc.weight)


def test_unknown_model_name_rejected():
    with pytest.raises(ValueError, match="unknown timm model 'deit_nano'"):
        create_float_model("deit_nano")
