"""Time HNQ's integer ONNX export against the float export and onnxruntime's static quantization.

For each model, on the same real images (scikit-image's photographs resized to 224x224,
or Fashion-MNIST test images for the built-in model), this builds:
- the float32 ONNX export (`hnq.export.export_float_onnx`);
- `onnxruntime.quantization.quantize_static` of that file (QDQ, per-channel int8 weights,
  uint8 activations, calibrated on the same images), with its default op list and with
  MatMul/Gemm/Conv only;
- the HNQ integer-only export, calibrated with `calibrate_float` on the same images, under
  the plan `hnq plan` would choose there (rule delta-sqnr; `--plan alternate` takes I-BERT
  and I-ViT in turn instead).

Every session runs on ORT's CPU provider with 2 intra-op threads and
`session.force_spinning_stop=1`, so one session's spinning threads do not steal cores from
the next. Sessions are timed in turn, one run each per round, after warm-up. The script
writes a Markdown page (docs/benchmarks.md by default) with the command, the machine,
the versions, latencies, throughput, SQNR against float, file sizes and a profile of the
HNQ graph.

    PYTHONPATH=. .venv/bin/python tools/bench_inference.py --models deit_small_patch16_224 --batches 8
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hnq.api import bits_from_quant_config  # noqa: E402
from hnq.data import SAMPLE_PHOTOS, load_sample_photos  # noqa: E402
from hnq.export import build_onnx_model, export_float_onnx  # noqa: E402
from hnq.plan import alternate_plan, apply_plan  # noqa: E402
from hnq.sensitivity import measure_sensitivity  # noqa: E402
from hnq.train import calibrate_float  # noqa: E402
from models import QuantConfig, quantize_model  # noqa: E402

DEFAULT_MODELS = ("hnq_vit_fmnist", "deit_tiny_patch16_224", "deit_small_patch16_224", "swin_tiny_patch4_window7_224")
PHOTOS = (*SAMPLE_PHOTOS, "cat", "immunohistochemistry", "hubble_deep_field", "retina")
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "amx_int8", "amx_bf16")
THREADS = 2


def photo_pixels(size: int = 224) -> torch.Tensor:
    """uint8 [len(PHOTOS), 3, size, size] from scikit-image's bundled photographs."""
    return load_sample_photos(size, PHOTOS)


def builtin_float_model(checkpoint: str | None, epochs: float):
    """The built-in Fashion-MNIST model from `checkpoint`, or trained here for `epochs` on 6000 images."""
    from hnq.api import load_float_model
    from hnq.data import load_fashion_mnist
    from hnq.train import TrainConfig, train_float
    from models import build_float_model, builtin_arch

    data = load_fashion_mnist()
    pixels = torch.from_numpy(data.test_images[:64]).unsqueeze(1).contiguous()
    if checkpoint:
        model, _ = load_float_model(checkpoint)
        return model, pixels
    torch.manual_seed(0)
    model = build_float_model(builtin_arch())
    train_x = torch.from_numpy(data.train_images[:6000]).unsqueeze(1)
    train_y = torch.from_numpy(data.train_labels[:6000])
    train_float(model, train_x, train_y, TrainConfig(epochs=epochs, lr=2e-3, progress=False))
    return model, pixels


def timm_float_model(name: str):
    from models.pretrained import create_float_model

    torch.manual_seed(0)
    model, _ = create_float_model(name)
    return model


def session_options(profile_prefix: str | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


def make_session(path: Path, profile_prefix: str | None = None) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(profile_prefix), providers=["CPUExecutionProvider"])


class _Reader:
    """CalibrationDataReader over uint8 pixel batches."""

    def __init__(self, input_name: str, batches: list[np.ndarray]):
        self._items = iter([{input_name: batch} for batch in batches])

    def get_next(self):
        return next(self._items, None)


def quantize_qdq(float_path: Path, out_path: Path, pixels: np.ndarray, op_types: list[str] | None) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    batches = [pixels[i:i + 1] for i in range(len(pixels))]
    quantize_static(str(float_path), str(out_path), _Reader("pixels", batches), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    op_types_to_quantize=op_types, calibrate_method=CalibrationMethod.MinMax)


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """20 log10(||y|| / ||y - y_hat||) over all logits."""
    noise = np.linalg.norm(reference - approx)
    return float("inf") if noise == 0 else float(20 * np.log10(np.linalg.norm(reference) / noise))


def batch_of(pixels: np.ndarray, batch: int) -> np.ndarray:
    repeats = -(-batch // len(pixels))
    return np.ascontiguousarray(np.concatenate([pixels] * repeats)[:batch])


def build_variants(name: str, workdir: Path, builtin_checkpoint: str | None, builtin_epochs: float,
                   plan_rule: str, softmax_bits: int) -> dict:
    """Write the four ONNX files of one model; return their paths, calibration pixels and HNQ logits scale."""
    if name == "hnq_vit_fmnist":
        float_model, pixels = builtin_float_model(builtin_checkpoint, builtin_epochs)
    else:
        float_model, pixels = timm_float_model(name), photo_pixels()
    float_model.eval()
    paths = {kind: workdir / f"{name}.{kind}.onnx" for kind in ("float", "qdq_default", "qdq_matmul", "hnq")}
    export_float_onnx(float_model, paths["float"], {})
    calibration = pixels.numpy()
    quantize_qdq(paths["float"], paths["qdq_default"], calibration, None)
    quantize_qdq(paths["float"], paths["qdq_matmul"], calibration, ["MatMul", "Gemm", "Conv"])

    cfg = QuantConfig(softmax_bits=softmax_bits)
    qmodel = quantize_model(float_model, cfg)
    calibrate_float(qmodel, [pixels], 1, progress=False)
    search_start = time.perf_counter()
    sensitivity = measure_sensitivity(qmodel, [pixels], 1, progress=False)
    search_seconds = time.perf_counter() - search_start
    if plan_rule == "alternate":
        plan = alternate_plan(name, qmodel.sites(), bits_from_quant_config(cfg))
    else:
        plan = sensitivity.make_plan(name, bits_from_quant_config(cfg), plan_rule)
    apply_plan(plan, qmodel.sites())
    qmodel.eval()
    model, logits_scale = build_onnx_model(qmodel, plan, {})
    onnx.save(model, str(paths["hnq"]))
    reference, _ = qmodel.logits_codes(pixels[:2])
    schemes = collections.Counter(f"{entry['op']} {entry['scheme']}" for entry in plan.sites.values())
    return {"paths": paths, "pixels": calibration, "logits_scale": logits_scale, "reference": reference.numpy(),
            "plan": dict(sorted(schemes.items())), "search_seconds_per_image": search_seconds / len(pixels)}


def time_sessions(sessions: dict, feeds: dict, warmup: int, runs: int) -> dict[str, float]:
    """Median seconds per run of each session; rounds alternate the sessions run by run."""
    for key, session in sessions.items():
        for _ in range(warmup):
            session.run(None, feeds[key])
    times: dict = collections.defaultdict(list)
    for _ in range(runs):
        for key, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds[key])
            times[key].append(time.perf_counter() - start)
    return {key: float(np.median(values)) for key, values in times.items()}


def profile_hnq(path: Path, pixels: np.ndarray, runs: int, workdir: Path) -> tuple[dict, dict]:
    """Kernel time per op type and per module or hnq function, in ms per run, from ORT's profiler."""
    session = make_session(path, str(workdir / "hnq_profile"))
    for _ in range(runs):
        session.run(None, {"pixels": pixels})
    events = json.loads(Path(session.end_profiling()).read_text())
    by_op: collections.Counter = collections.Counter()
    by_part: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        node = event["name"][: -len("_kernel_time")]
        by_op[event["args"]["op_name"]] += event["dur"]
        by_part[node_group(node)] += event["dur"]
    scale = 1e-3 / runs
    return ({k: v * scale for k, v in by_op.most_common()}, {k: v * scale for k, v in by_part.most_common()})


def node_group(node: str) -> str:
    """Group a node name by its module scope, with block indices folded and hnq functions named."""
    function = re.search(r"_inlfunc_([A-Za-z0-9]+)", node)
    scope = re.sub(r"(blocks|layers)\.\d+", r"\1.*", node).split("/")
    module = "/".join(scope[:-1]) or "(top)"
    return f"{module} [{function.group(1)}]" if function else module


EXPORT_SCRIPT = """
import resource, sys, time
sys.path.insert(0, {root!r})
from tools.bench_inference import timm_float_model, photo_pixels
from hnq.api import bits_from_quant_config
from hnq.export import export_onnx
from hnq.plan import alternate_plan, apply_plan
from hnq.train import calibrate_float
from models import QuantConfig, quantize_model
model = quantize_model(timm_float_model({name!r}).eval(), QuantConfig())
calibrate_float(model, [photo_pixels()[:4]], 1, progress=False)
plan = alternate_plan({name!r}, model.sites(), bits_from_quant_config(QuantConfig()))
apply_plan(plan, model.sites())
model.eval()
start = time.perf_counter()
result = export_onnx(model, plan, {path!r}, {{}})
print(time.perf_counter() - start, result.bytes, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def measure_export(name: str, workdir: Path) -> dict:
    """Export time and the peak resident memory of a fresh process that builds, calibrates and exports `name`.

    The peak covers the whole process (torch, the float model and the ONNX graph), so it
    is an upper bound on what the export itself needs.
    """
    import subprocess

    path = workdir / f"{name}.export.onnx"
    script = EXPORT_SCRIPT.format(root=str(ROOT), name=name, path=str(path))
    output = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    seconds, size, peak = output.split()[-3:]
    return {"model": name, "seconds": float(seconds), "bytes": int(size), "peak_bytes": int(peak)}


def cpu_description() -> tuple[str, list[str]]:
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, [flag for flag in CPU_FLAGS if flag in flags]


# Text below this line in the output page is written by hand (for example the training
# benchmark) and kept when the script rewrites the page.
KEPT_MARKER = "<!-- Sections below this line are not written by tools/bench_inference.py and are kept. -->"


def write_page(path: Path, command: str, results: list[dict], profiles: dict, load: tuple,
               export: dict | None) -> None:
    cpu, flags = cpu_description()
    lines = [
        "# Inference benchmarks",
        "",
        "Written by `tools/bench_inference.py`; every number on this page comes from the run below.",
        "",
        f"Command: `{command}`",
        "",
        f"- Machine: {cpu}, {os.cpu_count()} logical CPUs, instruction-set flags: {', '.join(flags) or 'none found'}",
        f"- Load average (1, 5, 15 min) before / after the run: {load[0]} / {load[1]}",
        f"- Versions: Python {platform.python_version()}, onnxruntime {ort.__version__}, onnx {onnx.__version__}, "
        f"torch {torch.__version__}",
        f"- Sessions: CPUExecutionProvider, {THREADS} intra-op threads, `session.force_spinning_stop=1`, "
        "default graph optimizations",
        "",
        "SQNR is 20 log10(||y|| / ||y - y_hat||) of the logits against the float32 export on the benchmark "
        "images. HNQ/float and HNQ/QDQ are latency ratios (below 1: HNQ is faster).",
        "",
        "| model | batch | float ms | QDQ default ms | QDQ MatMul-only ms | HNQ ms | HNQ img/s | HNQ/float | "
        "HNQ/QDQ MatMul-only | HNQ/QDQ default |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for batch, t in r["latency"].items():
            lines.append(
                f"| {r['model']} | {batch} | {t['float'] * 1e3:.1f} | {t['qdq_default'] * 1e3:.1f} | "
                f"{t['qdq_matmul'] * 1e3:.1f} | {t['hnq'] * 1e3:.1f} | {batch / t['hnq']:.1f} | "
                f"{t['hnq'] / t['float']:.2f} | {t['hnq'] / t['qdq_matmul']:.2f} | {t['hnq'] / t['qdq_default']:.2f} |")
    lines += ["", "| model | SQNR QDQ default dB | SQNR QDQ MatMul-only dB | SQNR HNQ dB | HNQ equals torch reference | "
              "float MB | QDQ default MB | QDQ MatMul-only MB | HNQ MB | HNQ/float size |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s, q = r["size"], r["sqnr"]
        lines.append(f"| {r['model']} | {q['qdq_default']:.1f} | {q['qdq_matmul']:.1f} | {q['hnq']:.1f} | "
                     f"{r['bit_exact']} | {s['float'] / 1e6:.1f} | {s['qdq_default'] / 1e6:.1f} | "
                     f"{s['qdq_matmul'] / 1e6:.1f} | {s['hnq'] / 1e6:.1f} | {s['hnq'] / s['float']:.2f} |")
    lines += ["", "HNQ plans (schemes per op, number of sites) and the sensitivity search's time per "
              "calibration image (one float pass plus one per candidate scheme name):", ""]
    lines += [f"- {r['model']}: " + ", ".join(f"{k} x{v}" for k, v in r["plan"].items())
              + f"; search {r['search_seconds_per_image']:.2f} s per image" for r in results]
    if export:
        lines += ["", f"Export of {export['model']} (built, calibrated on 4 photos and exported in a fresh process): "
                  f"{export['seconds']:.1f} s for the export, {export['bytes'] / 1e6:.1f} MB written, peak resident "
                  f"memory of the whole process {export['peak_bytes'] / 2**30:.2f} GiB."]
    for (model, batch), (by_op, by_part) in profiles.items():
        total = sum(by_op.values())
        lines += ["", f"## Where the time goes: HNQ {model}, batch {batch}", "",
                  f"ORT profiler kernel time, {total:.1f} ms per run in all.", "",
                  "| op type | ms per run | share |", "|---|---|---|"]
        lines += [f"| {op} | {ms:.2f} | {100 * ms / total:.1f}% |" for op, ms in list(by_op.items())[:15]]
        lines += ["", "| module (blocks folded) [hnq function] | ms per run | share |", "|---|---|---|"]
        lines += [f"| {part} | {ms:.2f} | {100 * ms / total:.1f}% |" for part, ms in list(by_part.items())[:20]]
    kept = ""
    if path.is_file() and KEPT_MARKER in path.read_text():
        kept = path.read_text().split(KEPT_MARKER, 1)[1]
    lines += ["", KEPT_MARKER]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n" + kept.lstrip("\n"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="model names (timm or hnq_vit_fmnist)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="batch sizes to time")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per session (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per session before timing")
    parser.add_argument("--profile-runs", type=int, default=3, help="profiled runs of the HNQ graph per model")
    parser.add_argument("--builtin-checkpoint", help="float.pt of the built-in model; without it, it is trained here")
    parser.add_argument("--builtin-epochs", type=float, default=2.0, help="float epochs when training the built-in model")
    parser.add_argument("--plan", dest="plan_rule", choices=["delta-sqnr", "float-input", "alternate"],
                        default="delta-sqnr", help="how the HNQ export's plan is chosen")
    parser.add_argument("--softmax-bits", type=int, choices=[8, 16], default=8,
                        help="HNQ softmax output bits (16 feeds P @ V as two byte matmuls)")
    parser.add_argument("--export-model", default="vit_base_patch16_224",
                        help="timm model whose export time and peak memory are measured ('' skips it)")
    parser.add_argument("--workdir", help="folder for the ONNX files (default: a temporary folder)")
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"), help="Markdown page to write")
    args = parser.parse_args(argv)

    command = "PYTHONPATH=. .venv/bin/python tools/bench_inference.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    load_before = tuple(round(v, 2) for v in os.getloadavg())
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="hnq_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    results, profiles = [], {}
    for name in args.models:
        print(f"building {name}", flush=True)
        built = build_variants(name, workdir, args.builtin_checkpoint, args.builtin_epochs, args.plan_rule,
                               args.softmax_bits)
        paths, pixels = built["paths"], built["pixels"]
        sessions = {kind: make_session(path) for kind, path in paths.items()}
        hnq_codes = sessions["hnq"].run(None, {"pixels": pixels[:2]})[0]
        bit_exact = bool(np.array_equal(hnq_codes.astype(np.int64), built["reference"]))
        float_logits = sessions["float"].run(None, {"pixels": pixels})[0]
        sqnr = {kind: sqnr_db(float_logits, sessions[kind].run(None, {"pixels": pixels})[0])
                for kind in ("qdq_default", "qdq_matmul")}
        sqnr["hnq"] = sqnr_db(float_logits, sessions["hnq"].run(None, {"pixels": pixels})[0] * built["logits_scale"])
        latency = {}
        for batch in args.batches:
            feed = {"pixels": batch_of(pixels, batch)}
            latency[batch] = time_sessions(sessions, {kind: feed for kind in sessions}, args.warmup, args.runs)
            print(f"{name} batch {batch}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in latency[batch].items()),
                  flush=True)
        del sessions
        profile_batch = max(args.batches)
        profiles[(name, profile_batch)] = profile_hnq(paths["hnq"], batch_of(pixels, profile_batch),
                                                      args.profile_runs, workdir)
        results.append({"model": name, "latency": latency, "sqnr": sqnr, "bit_exact": bit_exact, "plan": built["plan"],
                        "search_seconds_per_image": built["search_seconds_per_image"],
                        "size": {kind: path.stat().st_size for kind, path in paths.items()}})
    export = None
    if args.export_model:
        print(f"measuring the export of {args.export_model}", flush=True)
        export = measure_export(args.export_model, workdir)
    load_after = tuple(round(v, 2) for v in os.getloadavg())
    write_page(Path(args.output), command, results, profiles, (load_before, load_after), export)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
