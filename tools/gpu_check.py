"""The CUDA check for a machine with a GPU: full-size exports under the CUDA provider.

    HNQ_RUNTIME=gpu bash scripts/setup.sh
    PYTHONPATH=. .venv/bin/python tools/gpu_check.py --json runs/gpu_check.json

For each model it builds the timm architecture (pretrained=False), calibrates on photos
that scikit-image ships, exports for the CUDA target, and then:
- asserts that CUDA is the session's first provider (onnxruntime falls back to the CPU
  silently when the CUDA libraries are missing);
- lists every node that ran on another provider, from ORT's profile;
- compares the logits codes of the CUDA run with the CPU run and with the PyTorch
  integer reference, for equality.
It prints one JSON record per model and exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hnq.data import load_sample_photos  # noqa: E402

MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "vit_base_patch16_224", "swin_tiny_patch4_window7_224")


def photos(size: int) -> torch.Tensor:
    return load_sample_photos(size)


def providers_by_node(profile_path: str) -> dict[str, str]:
    events = json.loads(Path(profile_path).read_text())
    placement = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args:
            placement[event["name"].removesuffix("_kernel_time")] = args["provider"]
    return placement


def check_model(name: str, folder: Path) -> dict:
    import onnxruntime as ort

    from hnq.api import check_bit_exact, default_plan, quantize
    from hnq.export import build_onnx_model
    from hnq.onnx_builder import lowering_target
    from hnq.train import calibrate_float
    from models.pretrained import create_float_model

    started = time.monotonic()
    float_model, _ = create_float_model(name)
    plan = default_plan(float_model, act_bits=8)
    qmodel = quantize(float_model, plan)
    pixels = photos(qmodel.image_shape[-1])
    calibrate_float(qmodel, [pixels], 1, progress=False)
    qmodel.eval()
    with lowering_target("cuda"):
        model, _ = build_onnx_model(qmodel, plan, {})
    path = folder / f"{name}.onnx"
    import onnx

    onnx.save(model, str(path))

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / name)
    cuda = ort.InferenceSession(str(path), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    active = cuda.get_providers()[0]
    cuda_codes = cuda.run(None, {"pixels": pixels.numpy()})[0]
    placement = providers_by_node(cuda.end_profiling())
    cpu = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cpu_codes = cpu.run(None, {"pixels": pixels.numpy()})[0]
    reference = check_bit_exact(model, qmodel, pixels)
    on_cpu = sorted(node for node, provider in placement.items() if provider != "CUDAExecutionProvider")
    record = {
        "model": name,
        "active_provider": active,
        "nodes_profiled": len(placement),
        "nodes_not_on_cuda": on_cpu[:50],
        "nodes_not_on_cuda_count": len(on_cpu),
        "cuda_equals_cpu": bool(np.array_equal(cuda_codes, cpu_codes)),
        "cpu_mismatched_vs_reference": reference["mismatched"],
        "seconds": round(time.monotonic() - started, 1),
    }
    record["ok"] = (active == "CUDAExecutionProvider" and record["cuda_equals_cpu"]
                    and record["cpu_mismatched_vs_reference"] == 0)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--json", type=Path, default=None, help="write all records to this file")
    args = parser.parse_args()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            record = check_model(name, Path(tmp))
            records.append(record)
            print(json.dumps(record), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    sys.exit(0 if all(r["ok"] for r in records) else 1)


if __name__ == "__main__":
    main()
