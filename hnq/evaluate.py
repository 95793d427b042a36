"""Evaluate an HNQ ONNX model in onnxruntime on an image folder, with the bit-exact check.

Images are preprocessed as the model's `hnq.preprocessing` metadata specifies: resize,
center crop and colour mode, applied by hnq.data.load_image. When the model has 1000 outputs and the
class folders are WordNet ids, the labels are timm's ImageNet-1k class indices. Other
folders are labelled by class name or sorted order, as hnq.imagenet.scan_evaluation_folder
describes.
Images that cannot be read are skipped and listed in the report.

For an integer model (`hnq.kind` = "integer"), every image's int32 logits codes from ORT
are compared for equality with the PyTorch integer reference rebuilt from the checkpoint
behind the export. The report gives top-1 and top-5 of ORT, top-1 of the integer reference
and of the float parent model, the execution provider that ran, and the number of compared
and mismatched images and codes. A float model (`hnq.kind` = "float", from
`hnq-export --float`) gets top-1 and top-5 of ORT only, with no bit-exact check.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from .data import DataError, SkippedImage, check_interpolation, iter_image_batches
from .imagenet import scan_evaluation_folder
from .io import CheckpointError, atomic_write_text, sha256_file

_logger = logging.getLogger(__name__)


class ModelFileError(ValueError):
    """An ONNX file that HNQ cannot evaluate (missing, unreadable, or not written by HNQ)."""


@dataclass
class EvalReport:
    model: str
    images: str
    count: int
    provider: str
    ort_top1: float
    ort_top5: float
    reference_top1: float | None
    float_top1: float | None
    compared: int
    mismatched: int
    mismatched_codes: int
    max_code_difference: int
    seconds: float
    images_per_second: float
    first_mismatch: str | None = None
    # The first site where ORT and the reference differ, and where its reproducer was written.
    mismatch_site: dict | None = None
    reproducer: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    # "integer" (bit-exact check against the PyTorch reference) or "float" (no check).
    kind: str = "integer"
    # How class folders became labels: "imagenet-1k synsets" or "class folders".
    label_mapping: str = "class folders"
    # Resize, crop and interpolation applied to every image, from the model's metadata.
    preprocessing: dict[str, Any] = field(default_factory=dict)
    # Images left out because they could not be read: {"path", "reason"} each. `count`
    # and every accuracy cover only the evaluated images.
    skipped: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        def pct(value: float | None) -> str:
            return "n/a" if value is None else f"{100 * value:.2f} %"

        rows = [
            ("images evaluated", str(self.count)),
            ("images skipped (unreadable)", str(len(self.skipped))),
            ("labels", self.label_mapping),
            ("execution provider", self.provider),
        ]
        if self.kind == "float":
            rows += [
                ("float top-1 (ONNX Runtime)", pct(self.ort_top1)),
                ("float top-5 (ONNX Runtime)", pct(self.ort_top5)),
                ("bit-exact check", "not run (float model)"),
            ]
        else:
            rows += [
                ("float top-1 (PyTorch)", pct(self.float_top1)),
                ("integer top-1 (PyTorch reference)", pct(self.reference_top1)),
                ("integer top-1 (ONNX Runtime)", pct(self.ort_top1)),
                ("integer top-5 (ONNX Runtime)", pct(self.ort_top5)),
                ("bit-exact: images compared", str(self.compared)),
                ("bit-exact: images mismatched", str(self.mismatched)),
                ("bit-exact: codes mismatched", str(self.mismatched_codes)),
            ]
        rows.append(("ORT throughput", f"{self.images_per_second:.0f} images/s"))
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def read_metadata(onnx_path: str | Path) -> dict[str, Any]:
    """Read the `hnq.*` metadata of an HNQ ONNX file, JSON values decoded."""
    path = Path(onnx_path)
    if not path.is_file():
        raise ModelFileError(f"ONNX model {path} not found; export one with `hnq-export model.pt --plan plan.json -o {path}`")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # onnx raises DecodeError, ValueError or OSError depending on the damage
        raise ModelFileError(f"{path} is not a readable ONNX file: {error}") from None
    props = {p.key: p.value for p in model.metadata_props}
    if "hnq.format" not in props:
        raise ModelFileError(f"{path} was not written by hnq-export (no hnq metadata); "
                             "hnq-eval needs the input layout, preprocessing and class names that HNQ records")
    decoded: dict[str, Any] = {}
    for key, value in props.items():
        if not key.startswith("hnq."):
            continue
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value
    return decoded


def resolve_checkpoint(meta: dict[str, Any], onnx_path: Path, checkpoint: str | Path | None) -> Path:
    """The checkpoint that holds the integer reference, verified against the export's hash."""
    if checkpoint is None:
        stored = meta.get("hnq.checkpoint")
        if stored is None:
            raise CheckpointError(f"{onnx_path} records no checkpoint; pass --checkpoint model.pt "
                                  "or --no-reference to skip the bit-exact check")
        checkpoint = (onnx_path.resolve().parent / str(stored)).resolve()
        if not checkpoint.is_file():
            raise CheckpointError(f"the checkpoint recorded in {onnx_path} ({checkpoint}) is missing; "
                                  "pass --checkpoint PATH, or --no-reference to skip the bit-exact check")
    checkpoint = Path(checkpoint)
    expected = meta.get("hnq.checkpoint_sha256")
    if expected and checkpoint.is_file() and sha256_file(checkpoint) != expected:
        raise CheckpointError(f"checkpoint {checkpoint} is not the one {onnx_path} was exported from "
                              "(SHA-256 differs); pass the matching checkpoint or re-export")
    return checkpoint


def make_session(onnx_path: str | Path, provider: str = "auto"):
    """An onnxruntime session on CUDA when asked or available ("auto"), else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider == "auto":
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available \
            else ["CPUExecutionProvider"]
    elif provider == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ModelFileError("the CUDA execution provider is not available in this onnxruntime "
                                 f"(available: {', '.join(available)}); install the gpu extra or use --provider cpu")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=providers)
    return session, session.get_providers()[0]


def topk_hits(codes: np.ndarray, labels: np.ndarray, k: int) -> int:
    k = min(k, codes.shape[1])
    top = np.argsort(-codes, axis=1, kind="stable")[:, :k]
    return int((top == labels[:, None]).any(axis=1).sum())


def input_preprocessing(meta: dict[str, Any], onnx_path: Path) -> dict[str, Any]:
    """Return the resize, crop and interpolation to apply, validated against `hnq.input`."""
    _, height, width = meta["hnq.input"]["shape"]
    recorded = meta.get("hnq.preprocessing") or {}
    resize = recorded.get("resize")
    crop = recorded.get("crop")
    interpolation = recorded.get("interpolation") or "bicubic"
    valid_resize = resize is None or (isinstance(resize, int) and resize > 0) or (
        isinstance(resize, list) and len(resize) == 2 and all(isinstance(v, int) and v > 0 for v in resize))
    if not valid_resize:
        raise ModelFileError(f"{onnx_path} records an invalid hnq.preprocessing resize {resize!r} "
                             "(expected null, a positive int or [height, width]); re-export the model")
    if crop is not None and list(crop) != [height, width]:
        raise ModelFileError(f"{onnx_path} records hnq.preprocessing crop {crop}, but the model input is "
                             f"{height}x{width}; re-export the model")
    if resize is not None:
        try:
            check_interpolation(interpolation)
        except DataError as error:
            raise ModelFileError(f"{onnx_path}: hnq.preprocessing: {error}; re-export the model") from None
    return {"resize": resize, "crop": [height, width] if resize is not None else None,
            "interpolation": interpolation}


def evaluate(onnx_path: str | Path, image_dir: str | Path, checkpoint: str | Path | None = None,
             reference: bool = True, batch_size: int = 256, limit: int | None = None, provider: str = "auto",
             progress: bool = True, workers: int | None = None,
             reproducer_dir: str | Path | None = None) -> EvalReport:
    """Run the evaluation described in the module docstring.

    On a mismatch, the report names the first differing site; with `reproducer_dir`, the
    smallest model around it, its tensors and a script that shows the difference go there.

    `limit` keeps the first N image files in folder order, before unreadable ones are
    skipped. `reference` is ignored for float models, which have no integer reference.
    `workers` threads decode images (default: one per CPU core).
    """
    from .api import load_float_parent, load_quantized_model

    onnx_path = Path(onnx_path)
    meta = read_metadata(onnx_path)
    kind = meta.get("hnq.kind", "integer")  # files written before hnq.kind existed are integer
    if kind not in ("integer", "float"):
        raise ModelFileError(f"{onnx_path} records hnq.kind {kind!r}; expected 'integer' or 'float', "
                             "so re-export it with hnq-export")
    c, h, w = meta["hnq.input"]["shape"]
    preprocessing = input_preprocessing(meta, onnx_path)
    session, active = make_session(onnx_path, provider)
    input_name = session.get_inputs()[0].name
    class_names = meta.get("hnq.class_names")
    num_classes = len(class_names) if class_names else int(session.get_outputs()[0].shape[1])
    samples, label_mapping = scan_evaluation_folder(image_dir, num_classes, class_names)
    if limit is not None:
        samples = samples[:limit]

    qmodel = float_model = None
    if reference and kind == "integer":
        ckpt = resolve_checkpoint(meta, onnx_path, checkpoint)
        qmodel, _, payload = load_quantized_model(ckpt)
        float_model = load_float_parent(payload, str(ckpt))

    hits1 = hits5 = ref_hits = float_hits = 0
    compared = mismatched = mismatched_codes = max_diff = 0
    first_mismatch = None
    mismatch_pixels = None
    ort_seconds = 0.0
    skipped: list[SkippedImage] = []
    count = 0
    started = time.monotonic()
    batches = iter_image_batches(samples, (h, w), c, batch_size, progress=progress, desc="hnq-eval",
                                 resize=preprocessing["resize"], interpolation=preprocessing["interpolation"],
                                 skipped=skipped, workers=workers or os.cpu_count() or 1)
    for images, labels, paths in batches:
        count += len(labels)
        tick = time.perf_counter()
        outputs = session.run(None, {input_name: images})[0]
        ort_seconds += time.perf_counter() - tick
        hits1 += topk_hits(outputs, labels, 1)
        hits5 += topk_hits(outputs, labels, 5)
        if qmodel is None:
            continue
        pixels = torch.from_numpy(images)
        ref_codes, _ = qmodel.logits_codes(pixels)
        ref_codes = ref_codes.numpy()
        ref_hits += topk_hits(ref_codes, labels, 1)
        differs = outputs.astype(np.int64) != ref_codes
        compared += len(labels)
        bad_rows = np.flatnonzero(differs.any(axis=1))
        mismatched += len(bad_rows)
        mismatched_codes += int(differs.sum())
        if len(bad_rows):
            max_diff = max(max_diff, int(np.abs(outputs.astype(np.int64) - ref_codes).max()))
            if first_mismatch is None:
                first_mismatch = str(paths[bad_rows[0]])
                mismatch_pixels = images[bad_rows[:8]]
        if float_model is not None:
            with torch.no_grad():
                float_hits += topk_hits(float_model(pixels).numpy(), labels, 1)
    seconds = time.monotonic() - started
    if count == 0:
        first = "; ".join(f"{item.path}: {item.reason}" for item in skipped[:3])
        raise DataError(f"none of the {len(samples)} images under {image_dir} could be read (first: {first}); "
                        "replace or remove the unreadable files")
    if skipped:
        _logger.warning("skipped %d of %d images that could not be read", len(skipped), len(samples))
    import onnxruntime as ort

    mismatch_site = reproducer_path = None
    if mismatch_pixels is not None:
        mismatch_site, reproducer_path = _explain_mismatch(onnx_path, qmodel, mismatch_pixels, reproducer_dir)

    return EvalReport(
        model=str(onnx_path), images=str(image_dir), count=count, provider=active,
        ort_top1=hits1 / count, ort_top5=hits5 / count,
        reference_top1=ref_hits / count if qmodel is not None else None,
        float_top1=float_hits / count if float_model is not None else None,
        compared=compared, mismatched=mismatched, mismatched_codes=mismatched_codes,
        max_code_difference=max_diff, seconds=round(seconds, 2),
        images_per_second=count / ort_seconds if ort_seconds else 0.0,
        first_mismatch=first_mismatch, mismatch_site=mismatch_site, reproducer=reproducer_path,
        versions={"onnxruntime": ort.__version__, "onnx": onnx.__version__, "torch": torch.__version__,
                  "python": platform.python_version()},
        kind=kind, label_mapping=label_mapping, preprocessing=preprocessing,
        skipped=[{"path": item.path, "reason": item.reason} for item in skipped],
    )


def _explain_mismatch(onnx_path: Path, qmodel, pixels: np.ndarray,
                      reproducer_dir: str | Path | None) -> tuple[dict | None, str | None]:
    """Locate the first differing site on the mismatching images; write a reproducer if asked."""
    from .diagnose import locate_mismatch, write_reproducer

    try:
        report, tensors = locate_mismatch(onnx_path, qmodel, pixels)
    except (ValueError, RuntimeError) as error:  # an export without site tensors, or ORT refusing the probe
        _logger.error("could not trace the mismatch to a site: %s", error)
        return None, None
    if report is None:
        return None, None
    _logger.error("%s", report.describe())
    folder = None
    if reproducer_dir is not None:
        folder = str(write_reproducer(onnx_path, report, tensors, reproducer_dir))
    return report.to_dict(), folder


def write_report(report: EvalReport, path: str | Path) -> Path:
    return atomic_write_text(path, json.dumps(report.to_dict(), indent=2) + "\n")
