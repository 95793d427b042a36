"""ImageNet-layout evaluation of deit_tiny on real photos: labels, preprocessing, bit-exact, float.

The photos are the sample images that scikit-image, scikit-learn and matplotlib ship, at
their native sizes, under the WordNet id of a plausible ImageNet class. The model is
deit_tiny_patch16_224 with random weights (pretrained=False, no network), so accuracies
are near zero; the tests check labels, preprocessing, skipping and exactness, not accuracy.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import matplotlib.cbook
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import skimage.data
import torch
from click.testing import CliRunner
from PIL import Image
from sklearn.datasets import load_sample_images

from hnq.cli import EXIT_BAD_INPUT, eval_command, export_command
from hnq.data import DataError, load_image
from hnq.evaluate import evaluate, read_metadata
from hnq.imagenet import eval_resize, imagenet_synsets, scan_evaluation_folder, synset_indices

MODEL_NAME = "deit_tiny_patch16_224"
INPUT_SIZE = 224
CROP_PCT = 0.9  # deit_tiny_patch16_224.fb_in1k pretrained_cfg in timm 1.0.31
RESIZE = 248  # floor(224 / 0.9)

# ImageNet-1k indices of the folders used, as listed in timm's imagenet_synsets.txt.
EXPECTED_INDICES = {
    "n02123045": 281,  # tabby, tabby cat
    "n03763968": 652,  # military uniform
    "n03877845": 698,  # palace
    "n04266014": 812,  # space shuttle
    "n07920052": 967,  # espresso
    "n11939491": 985,  # daisy
}

READABLE = 10
UNREADABLE = ("n03877845/china_truncated.jpg", "n11939491/notes.png")


@dataclass
class DeitBundle:
    images: Path
    checkpoint: Path
    onnx: Path
    float_onnx: Path
    float_model: torch.nn.Module


def _rgb(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.asarray(array, dtype=np.uint8)).convert("RGB")


def _sample_photos() -> dict[str, Image.Image]:
    """The shipped sample photos, keyed by the WordNet id they are filed under."""
    china, flower = load_sample_images().images
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as stream:
        hopper = Image.open(stream).convert("RGB")
    return {
        "n02123045/chelsea.jpg": _rgb(skimage.data.chelsea()),
        "n07920052/coffee.jpg": _rgb(skimage.data.coffee()),
        "n04266014/rocket.jpg": _rgb(skimage.data.rocket()),
        "n03763968/grace_hopper.jpg": hopper,
        "n03877845/china.jpg": _rgb(china),
        "n11939491/flower.jpg": _rgb(flower),
    }


def write_photo_folder(root: Path) -> Path:
    """Write the photos, odd formats made from them, and two unreadable files."""
    photos = _sample_photos()
    for relative, image in photos.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / relative, quality=95)

    # Converted and evaluated: grey-scale JPEG, CMYK JPEG, RGBA PNG, 16-bit grey PNG.
    photos["n02123045/chelsea.jpg"].convert("L").save(root / "n02123045/chelsea_grey.jpg", quality=95)
    photos["n07920052/coffee.jpg"].convert("CMYK").save(root / "n07920052/coffee_cmyk.jpg", quality=95)
    rocket = np.asarray(photos["n04266014/rocket.jpg"])
    alpha = np.full(rocket.shape[:2] + (1,), 255, dtype=np.uint8)
    alpha[: rocket.shape[0] // 2] = 0  # the top half transparent
    Image.fromarray(np.concatenate([rocket, alpha], axis=2), "RGBA").save(root / "n04266014/rocket_alpha.png")
    grey = np.asarray(photos["n03763968/grace_hopper.jpg"].convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(root / "n03763968/grace_hopper_16bit.png")

    # Skipped: a JPEG cut in half and a text file with an image extension.
    whole = (root / "n03877845/china.jpg").read_bytes()
    (root / UNREADABLE[0]).write_bytes(whole[: len(whole) // 2])
    (root / UNREADABLE[1]).write_text("not an image\n")
    return root


def deit_arch() -> dict:
    return {
        "family": "vit",
        "timm_name": MODEL_NAME,
        "timm_kwargs": {},
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "input_size": [3, INPUT_SIZE, INPUT_SIZE],
        "crop_pct": CROP_PCT,
        "interpolation": "bicubic",
    }


def preprocessed(root: Path) -> tuple[torch.Tensor, list[Path]]:
    """The readable photos as the evaluation feeds them: resized, center-cropped, RGB."""
    skipped = {root / relative for relative in UNREADABLE}
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p not in skipped)
    arrays = [load_image(p, (INPUT_SIZE, INPUT_SIZE), 3, RESIZE, "bicubic") for p in paths]
    return torch.from_numpy(np.stack(arrays)), paths


@pytest.fixture(scope="module")
def deit_bundle(tmp_path_factory) -> DeitBundle:
    """deit_tiny quantized with the alternate plan, calibrated on the photos, exported twice."""
    from hnq.api import bits_from_quant_config, save_quantized_model
    from hnq.export import export_float_from_checkpoint
    from hnq.pipeline import export_from_checkpoint
    from hnq.plan import alternate_plan, apply_plan
    from hnq.train import calibrate_float
    from models import QuantConfig, build_float_model, quantize_model

    folder = tmp_path_factory.mktemp("deit")
    images = write_photo_folder(folder / "val")
    torch.manual_seed(0)
    arch = deit_arch()
    float_model = build_float_model(arch).eval()
    parent = copy.deepcopy(float_model)
    cfg = QuantConfig()
    qmodel = quantize_model(float_model, cfg)
    plan = alternate_plan(MODEL_NAME, qmodel.sites(), bits_from_quant_config(cfg))
    apply_plan(plan, qmodel.sites())
    pixels, _ = preprocessed(images)
    calibrate_float(qmodel, [pixels], 1, progress=False)
    qmodel.eval()
    save_quantized_model(folder / "model.pt", qmodel, plan, arch, float_model=parent)
    export_from_checkpoint(folder / "model.pt", folder / "model_int8.onnx")
    export_float_from_checkpoint(folder / "model.pt", folder / "model_fp32.onnx")
    return DeitBundle(images, folder / "model.pt", folder / "model_int8.onnx", folder / "model_fp32.onnx", parent)


# ---------------------------------------------------------------------------
# WordNet-id folders and timm's preprocessing rule, no model needed
# ---------------------------------------------------------------------------


def test_synsets_come_from_timm():
    from timm.data import ImageNetInfo

    synsets = imagenet_synsets()
    assert len(synsets) == 1000
    assert list(synsets) == ImageNetInfo().label_names()
    assert synsets[0] == "n01440764"


def test_synset_subset_maps_to_timm_indices(tmp_path):
    from timm.data import ImageNetInfo

    write_photo_folder(tmp_path)
    mapping = synset_indices(tmp_path)
    assert mapping == EXPECTED_INDICES
    names = ImageNetInfo().label_names()
    for synset, index in mapping.items():
        assert names[index] == synset


def test_unknown_synset_folder_rejected(tmp_path):
    for name in ("n02123045", "n99999999", "cats"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "a.png")
    with pytest.raises(DataError) as error:
        scan_evaluation_folder(tmp_path, 1000, None)
    assert "n99999999" in str(error.value)
    assert "cats" in str(error.value)
    assert "n02123045" not in str(error.value).split(":", 1)[1]


def test_wordnet_folders_need_thousand_classes(tmp_path):
    # A 2-class model keeps the class-folder mapping (sorted order), as before.
    for name in ("n02123045", "n01440764"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "a.png")
    samples, mapping = scan_evaluation_folder(tmp_path, 2, ["a", "b"])
    assert mapping == "class folders"
    assert [(path.parent.name, label) for path, label in samples] == [("n01440764", 0), ("n02123045", 1)]


@pytest.mark.parametrize("size, crop_pct", [(224, 0.9), (224, 0.875), (384, 1.0), (256, 0.95)])
def test_eval_resize_matches_timm(size, crop_pct):
    from timm.data.transforms_factory import transforms_imagenet_eval

    transform = transforms_imagenet_eval(img_size=size, crop_pct=crop_pct, interpolation="bicubic")
    resize = transform.transforms[0]
    assert eval_resize((size, size), crop_pct) == resize.size


def test_preprocessing_matches_timm_transform(tmp_path):
    from timm.data.transforms_factory import transforms_imagenet_eval

    write_photo_folder(tmp_path)
    transform = transforms_imagenet_eval(img_size=INPUT_SIZE, crop_pct=CROP_PCT, interpolation="bicubic")
    resize_and_crop = transform.transforms[:2]  # Resize, CenterCrop; then ToTensor and Normalize
    for relative in ("n02123045/chelsea.jpg", "n07920052/coffee.jpg", "n11939491/flower.jpg"):
        path = tmp_path / relative
        expected = np.asarray(resize_and_crop[1](resize_and_crop[0](Image.open(path).convert("RGB"))))
        ours = load_image(path, (INPUT_SIZE, INPUT_SIZE), 3, RESIZE, "bicubic")
        assert np.array_equal(ours, expected.transpose(2, 0, 1)), relative


# ---------------------------------------------------------------------------
# deit_tiny end to end
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_metadata_records_timm_preprocessing(deit_bundle):
    meta = read_metadata(deit_bundle.onnx)
    assert meta["hnq.kind"] == "integer"
    assert meta["hnq.model"] == MODEL_NAME
    assert meta["hnq.input"]["shape"] == [3, INPUT_SIZE, INPUT_SIZE]
    preprocessing = meta["hnq.preprocessing"]
    assert preprocessing["resize"] == RESIZE
    assert preprocessing["crop"] == [INPUT_SIZE, INPUT_SIZE]
    assert preprocessing["interpolation"] == "bicubic"
    assert preprocessing["crop_pct"] == CROP_PCT


@pytest.mark.slow
def test_integer_eval_bit_exact_on_photos(deit_bundle):
    report = evaluate(deit_bundle.onnx, deit_bundle.images, batch_size=4, progress=False)
    assert report.kind == "integer"
    assert report.label_mapping == "imagenet-1k synsets"
    assert report.count == READABLE
    assert report.compared == READABLE
    assert report.mismatched == 0
    assert report.mismatched_codes == 0
    assert report.max_code_difference == 0
    assert report.ort_top1 == report.reference_top1
    assert 0.0 <= report.ort_top1 <= report.ort_top5 <= 1.0
    assert report.float_top1 is not None
    assert report.preprocessing == {"resize": RESIZE, "crop": [INPUT_SIZE, INPUT_SIZE], "interpolation": "bicubic"}


@pytest.mark.slow
def test_eval_skips_unreadable_images(deit_bundle):
    report = evaluate(deit_bundle.onnx, deit_bundle.images, reference=False, progress=False)
    skipped = {Path(item["path"]).relative_to(deit_bundle.images).as_posix(): item["reason"]
               for item in report.skipped}
    assert set(skipped) == set(UNREADABLE)
    assert "truncated" in skipped[UNREADABLE[0]]
    assert "cannot identify image file" in skipped[UNREADABLE[1]]
    assert report.count == READABLE


@pytest.mark.slow
def test_top_k_counts_match_labels(deit_bundle):
    # Recount top-1 and top-5 from ORT's codes and the folders' timm indices.
    pixels, paths = preprocessed(deit_bundle.images)
    labels = np.array([EXPECTED_INDICES[path.parent.name] for path in paths])
    session = ort.InferenceSession(str(deit_bundle.onnx), providers=["CPUExecutionProvider"])
    codes = session.run(None, {"pixels": pixels.numpy()})[0]
    order = np.argsort(-codes, axis=1, kind="stable")
    report = evaluate(deit_bundle.onnx, deit_bundle.images, reference=False, progress=False)
    assert report.ort_top1 == pytest.approx(float(np.mean(order[:, 0] == labels)))
    assert report.ort_top5 == pytest.approx(float(np.mean((order[:, :5] == labels[:, None]).any(axis=1))))


@pytest.mark.slow
def test_float_eval_matches_pytorch(deit_bundle):
    report = evaluate(deit_bundle.float_onnx, deit_bundle.images, progress=False)
    assert report.kind == "float"
    assert report.compared == 0
    assert report.reference_top1 is None
    assert report.count == READABLE
    assert len(report.skipped) == len(UNREADABLE)

    pixels, paths = preprocessed(deit_bundle.images)
    labels = torch.tensor([EXPECTED_INDICES[path.parent.name] for path in paths])
    with torch.no_grad():
        logits = deit_bundle.float_model(pixels)
    session = ort.InferenceSession(str(deit_bundle.float_onnx), providers=["CPUExecutionProvider"])
    ort_logits = session.run(None, {"pixels": pixels.numpy()})[0]
    assert np.array_equal(ort_logits.argmax(axis=1), logits.argmax(dim=1).numpy())
    assert np.allclose(ort_logits, logits.numpy(), atol=1e-4)
    assert report.ort_top1 == pytest.approx(float((logits.argmax(dim=1) == labels).double().mean()))


@pytest.mark.slow
def test_float_onnx_metadata(deit_bundle):
    model = onnx.load(str(deit_bundle.float_onnx))
    assert {o.domain: o.version for o in model.opset_import}[""] == 18
    meta = read_metadata(deit_bundle.float_onnx)
    assert meta["hnq.kind"] == "float"
    assert meta["hnq.preprocessing"] == read_metadata(deit_bundle.onnx)["hnq.preprocessing"]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8


@pytest.mark.slow
def test_limit_and_batch_size(deit_bundle):
    report = evaluate(deit_bundle.float_onnx, deit_bundle.images, batch_size=3, limit=4, progress=False)
    assert report.count == 4
    assert report.skipped == []


@pytest.mark.slow
def test_cli_float_export_and_eval(deit_bundle, tmp_path):
    output = tmp_path / "model_fp32.onnx"
    result = CliRunner().invoke(export_command, [str(deit_bundle.checkpoint), "--float", "-o", str(output)])
    assert result.exit_code == 0, result.output
    report_path = tmp_path / "eval.json"
    result = CliRunner().invoke(eval_command, [str(output), "--imagenet", str(deit_bundle.images),
                                               "--batch-size", "5", "--json", str(report_path), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "float top-1 (ONNX Runtime)" in result.output
    assert "china_truncated.jpg" in result.output
    report = json.loads(report_path.read_text())
    assert report["kind"] == "float"
    assert report["compared"] == 0
    assert report["count"] == READABLE
    assert len(report["skipped"]) == len(UNREADABLE)


@pytest.mark.slow
def test_float_checkpoint_export(deit_bundle, tmp_path):
    from hnq.api import save_float_model

    checkpoint = save_float_model(tmp_path / "float.pt", deit_bundle.float_model, deit_arch())
    output = tmp_path / "float.onnx"
    result = CliRunner().invoke(export_command, [str(checkpoint), "--float", "-o", str(output)])
    assert result.exit_code == 0, result.output
    meta = read_metadata(output)
    assert meta["hnq.kind"] == "float"
    assert meta["hnq.preprocessing"]["resize"] == RESIZE
    pixels, _ = preprocessed(deit_bundle.images)
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(str(deit_bundle.float_onnx), providers=["CPUExecutionProvider"])
    feed = {"pixels": pixels[:2].numpy()}
    assert np.array_equal(session.run(None, feed)[0], reference.run(None, feed)[0])


@pytest.mark.slow
def test_cli_float_export_rejects_plan(deit_bundle, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    result = CliRunner().invoke(export_command, [str(deit_bundle.checkpoint), "--float", "--plan", str(plan),
                                                 "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2
    assert "--float" in result.output


@pytest.mark.slow
def test_cli_eval_unknown_synset_rejected(deit_bundle, tmp_path):
    images = tmp_path / "val"
    shutil.copytree(deit_bundle.images, images)
    (images / "n00000001").mkdir()
    Image.new("RGB", (300, 300)).save(images / "n00000001" / "a.jpg")
    result = CliRunner().invoke(eval_command, [str(deit_bundle.float_onnx), "--imagenet", str(images),
                                               "--no-progress"])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "n00000001" in result.output
