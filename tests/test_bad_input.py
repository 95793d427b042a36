"""Bad input gets a clear error that names the value and the fix, and leaves no partial file."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from hnq.cli import EXIT_BAD_INPUT, eval_command, export_command
from hnq.io import CheckpointError, OutputPathError, load_checkpoint
from hnq.plan import Plan, PlanError

pytestmark = pytest.mark.slow


def _plan_dict(bundle) -> dict:
    return json.loads(bundle.plan.read_text())


def _export(bundle, tmp_path, plan_dict=None, checkpoint=None, output=None, extra=()):
    args = [str(checkpoint or bundle.checkpoint)]
    if plan_dict is not None:
        plan_path = tmp_path / "plan.json"
        plan_path.write_text(json.dumps(plan_dict))
        args += ["--plan", str(plan_path)]
    output = output or tmp_path / "out.onnx"
    result = CliRunner().invoke(export_command, [*args, "-o", str(output), *extra])
    return result, output


def test_plan_unknown_site_is_rejected(trained_bundle, tmp_path):
    plan = _plan_dict(trained_bundle)
    plan["sites"]["blocks.9.norm1"] = {"op": "layernorm", "scheme": "ibert"}
    result, output = _export(trained_bundle, tmp_path, plan)
    assert result.exit_code == EXIT_BAD_INPUT
    assert "blocks.9.norm1" in result.output
    assert "has no site" in result.output
    assert not output.exists()


def test_plan_unknown_scheme_is_rejected(trained_bundle, tmp_path):
    plan = _plan_dict(trained_bundle)
    plan["sites"]["blocks.0.attn.softmax"]["scheme"] = "shiftmaxx"
    result, _ = _export(trained_bundle, tmp_path, plan, extra=["--allow-plan-change"])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "'shiftmaxx'" in result.output
    assert "available: fqvit, ibert, ivit" in result.output


def test_plan_fqvit_gelu_is_rejected_with_reason(trained_bundle, tmp_path):
    plan = _plan_dict(trained_bundle)
    plan["sites"]["blocks.0.mlp.act"]["scheme"] = "fqvit"
    result, _ = _export(trained_bundle, tmp_path, plan, extra=["--allow-plan-change"])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "FQ-ViT has no integer GELU" in result.output


def test_plan_other_than_trained_is_rejected(trained_bundle, tmp_path):
    plan = _plan_dict(trained_bundle)
    current = plan["sites"]["blocks.0.norm1"]["scheme"]
    plan["sites"]["blocks.0.norm1"]["scheme"] = "ivit" if current == "ibert" else "ibert"
    result, output = _export(trained_bundle, tmp_path, plan)
    assert result.exit_code == EXIT_BAD_INPUT
    assert "trained with" in result.output
    assert "--allow-plan-change" in result.output
    assert not output.exists()


def test_plan_lists_every_problem_with_paths(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"format": "hnq-plan", "version": 1, "model": "m", "colour": 1,
                                "bits": {"activation": 3, "weight": "8", "residual": 16, "softmax": 8, "logits": 16},
                                "sites": {"norm": {"op": "layernorm"}}}))
    with pytest.raises(PlanError) as info:
        Plan.load(path)
    message = str(info.value)
    assert "$.colour: unknown key" in message
    assert "$.bits.activation: unsupported bit width 3" in message
    assert "$.bits.weight: expected an integer" in message
    assert "$.sites['norm'].scheme: expected a string" in message


def test_plan_duplicate_site_is_rejected(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text('{"format": "hnq-plan", "version": 1, "model": "m", '
                    '"bits": {"activation": 8, "weight": 8, "residual": 16, "softmax": 8, "logits": 16}, '
                    '"sites": {"norm": {"op": "layernorm", "scheme": "ibert"}, '
                    '"norm": {"op": "layernorm", "scheme": "ivit"}}}')
    with pytest.raises(PlanError, match="duplicate key 'norm'"):
        Plan.load(path)


def test_plan_not_json_is_rejected(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(path)


def test_checkpoint_random_bytes_rejected(trained_bundle, tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    result, _ = _export(trained_bundle, tmp_path, checkpoint=bad)
    assert result.exit_code == EXIT_BAD_INPUT
    assert "not a readable torch file" in result.output


def test_checkpoint_empty_rejected(tmp_path):
    empty = tmp_path / "model.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        load_checkpoint(empty)


def test_checkpoint_truncated_rejected(trained_bundle, tmp_path):
    truncated = tmp_path / "model.pt"
    data = trained_bundle.checkpoint.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(truncated)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_pickle_with_code_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "model.pt"
    torch.save({"format": "hnq-checkpoint", "payload": _RunsCode(str(marker))}, evil, pickle_protocol=2)
    marker.unlink(missing_ok=True)  # torch.save does not run it; make sure it is absent before loading
    with pytest.raises(CheckpointError, match="could run code"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_checkpoint_plain_pickle_rejected(tmp_path):
    path = tmp_path / "model.pt"
    with open(path, "wb") as handle:
        pickle.dump({"weights": [1, 2, 3]}, handle)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_checkpoint_of_other_kind_rejected(trained_bundle, tmp_path):
    result, _ = _export(trained_bundle, tmp_path, checkpoint=trained_bundle.float_checkpoint)
    assert result.exit_code == EXIT_BAD_INPUT
    assert "is a float checkpoint" in result.output


def test_checkpoint_foreign_state_dict_rejected(tmp_path):
    path = tmp_path / "timm.pth"
    torch.save({"pos_embed": torch.zeros(1, 50, 64)}, path)
    with pytest.raises(CheckpointError, match="not an HNQ checkpoint"):
        load_checkpoint(path)


def test_export_into_missing_folder_rejected(trained_bundle, tmp_path):
    output = tmp_path / "missing" / "model.onnx"
    result, _ = _export(trained_bundle, tmp_path, output=output)
    assert result.exit_code == EXIT_BAD_INPUT
    assert str(output.parent) in result.output
    assert "mkdir -p" in result.output
    assert not output.parent.exists()


def test_export_leaves_no_temporary_files(trained_bundle, tmp_path):
    result, output = _export(trained_bundle, tmp_path)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_eval_empty_image_folder_rejected(trained_bundle, tmp_path):
    empty = tmp_path / "images"
    empty.mkdir()
    result = CliRunner().invoke(eval_command, [str(trained_bundle.onnx), "--imagenet", str(empty), "--no-progress"])
    assert result.exit_code == EXIT_BAD_INPUT
    assert str(empty) in result.output


def test_eval_wrong_image_size_rejected(trained_bundle, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(trained_bundle.images, images)
    victim = sorted(images.rglob("*.png"))[0]
    Image.new("L", (32, 32)).save(victim)
    result = CliRunner().invoke(eval_command, [str(trained_bundle.onnx), "--imagenet", str(images), "--no-progress"])
    assert result.exit_code == EXIT_BAD_INPUT
    assert victim.name in result.output
    assert "32" in result.output and "28" in result.output


def test_eval_non_hnq_onnx_rejected(trained_bundle, tmp_path):
    import onnx

    model = onnx.load(str(trained_bundle.onnx))
    del model.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(model, str(foreign))
    result = CliRunner().invoke(eval_command, [str(foreign), "--imagenet", str(trained_bundle.images)])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "not written by hnq-export" in result.output


def test_eval_json_into_missing_folder_rejected(trained_bundle, tmp_path):
    target = tmp_path / "nope" / "eval.json"
    result = CliRunner().invoke(eval_command, [str(trained_bundle.onnx), "--imagenet", str(trained_bundle.images),
                                               "--json", str(target)])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "does not exist" in result.output


def test_output_path_that_is_folder_rejected(tmp_path):
    from hnq.io import check_output_path

    with pytest.raises(OutputPathError, match="is a folder"):
        check_output_path(tmp_path)
