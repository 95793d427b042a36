"""Evaluate an HNQ ONNX model in onnxruntime on an image folder, with the bit-exact check.

For every image, the ONNX model's int32 logits codes are compared for equality with the
PyTorch integer reference rebuilt from the checkpoint behind the export. The report gives
top-1 and top-5 of ORT, top-1 of the integer reference and of the float parent model, the
execution provider that ran, and the number of compared and mismatched images and codes.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from .data import iter_image_batches, scan_image_folder
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
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        def pct(value: float | None) -> str:
            return "n/a" if value is None else f"{100 * value:.2f} %"

        rows = [
            ("images", str(self.count)),
            ("execution provider", self.provider),
            ("float top-1 (PyTorch)", pct(self.float_top1)),
            ("integer top-1 (PyTorch reference)", pct(self.reference_top1)),
            ("integer top-1 (ONNX Runtime)", pct(self.ort_top1)),
            ("integer top-5 (ONNX Runtime)", pct(self.ort_top5)),
            ("bit-exact: images compared", str(self.compared)),
            ("bit-exact: images mismatched", str(self.mismatched)),
            ("bit-exact: codes mismatched", str(self.mismatched_codes)),
            ("ORT throughput", f"{self.images_per_second:.0f} images/s"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def read_metadata(onnx_path: str | Path) -> dict[str, Any]:
    """The `hnq.*` metadata of an HNQ ONNX file, JSON values decoded."""
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


def evaluate(onnx_path: str | Path, image_dir: str | Path, checkpoint: str | Path | None = None,
             reference: bool = True, batch_size: int = 256, limit: int | None = None, provider: str = "auto",
             progress: bool = True) -> EvalReport:
    """Run the evaluation described in the module docstring."""
    from .api import load_float_parent, load_quantized_model

    onnx_path = Path(onnx_path)
    meta = read_metadata(onnx_path)
    class_names = meta.get("hnq.class_names")
    c, h, w = meta["hnq.input"]["shape"]
    samples = scan_image_folder(image_dir, class_names)
    if limit is not None:
        samples = samples[:limit]

    qmodel = float_model = None
    if reference:
        ckpt = resolve_checkpoint(meta, onnx_path, checkpoint)
        qmodel, _, payload = load_quantized_model(ckpt)
        float_model = load_float_parent(payload, str(ckpt))
    session, active = make_session(onnx_path, provider)
    input_name = session.get_inputs()[0].name

    hits1 = hits5 = ref_hits = float_hits = 0
    compared = mismatched = mismatched_codes = max_diff = 0
    first_mismatch = None
    ort_seconds = 0.0
    started = time.monotonic()
    for images, labels, paths in iter_image_batches(samples, (h, w), c, batch_size, progress=progress,
                                                    desc="hnq-eval"):
        tick = time.perf_counter()
        codes = session.run(None, {input_name: images})[0]
        ort_seconds += time.perf_counter() - tick
        hits1 += topk_hits(codes, labels, 1)
        hits5 += topk_hits(codes, labels, 5)
        if qmodel is not None:
            pixels = torch.from_numpy(images)
            ref_codes, _ = qmodel.logits_codes(pixels)
            ref_codes = ref_codes.numpy()
            ref_hits += topk_hits(ref_codes, labels, 1)
            differs = codes.astype(np.int64) != ref_codes
            compared += len(labels)
            bad_rows = np.flatnonzero(differs.any(axis=1))
            mismatched += len(bad_rows)
            mismatched_codes += int(differs.sum())
            if len(bad_rows):
                max_diff = max(max_diff, int(np.abs(codes.astype(np.int64) - ref_codes).max()))
                first_mismatch = first_mismatch or str(paths[bad_rows[0]])
            if float_model is not None:
                with torch.no_grad():
                    float_hits += topk_hits(float_model(pixels).numpy(), labels, 1)
    seconds = time.monotonic() - started
    count = len(samples)
    import onnxruntime as ort

    return EvalReport(
        model=str(onnx_path), images=str(image_dir), count=count, provider=active,
        ort_top1=hits1 / count, ort_top5=hits5 / count,
        reference_top1=ref_hits / count if qmodel is not None else None,
        float_top1=float_hits / count if float_model is not None else None,
        compared=compared, mismatched=mismatched, mismatched_codes=mismatched_codes,
        max_code_difference=max_diff, seconds=round(seconds, 2),
        images_per_second=count / ort_seconds if ort_seconds else 0.0,
        first_mismatch=first_mismatch,
        versions={"onnxruntime": ort.__version__, "onnx": onnx.__version__, "torch": torch.__version__,
                  "python": platform.python_version()},
    )


def write_report(report: EvalReport, path: str | Path) -> Path:
    return atomic_write_text(path, json.dumps(report.to_dict(), indent=2) + "\n")
