"""Reproduce the comparison HNQ is known for, on the built-in data: single-scheme vs mixed plans.

Rows: float; uniform I-BERT; uniform I-ViT; uniform FQ-ViT (its Softmax and LayerNorm, with
I-BERT's GELU, since FQ-ViT has no integer GELU); HNQ's mixed plan chosen by ΔSQNR; and the
mixed plan chosen on each site's float input. Each quantized row gets the same calibration
and the same QAT budget, at 8-bit and 6-bit activations, and its top-1 is measured by
onnxruntime on the exported integer model over the whole test split. A second budget, much
shorter, gives the limited-training setting.

    PYTHONPATH=. .venv/bin/python tools/compare_schemes.py --output runs/compare
    PYTHONPATH=. .venv/bin/python tools/compare_schemes.py --model hnq_swin_fmnist --output runs/compare-swin

writes runs/compare/results.json and, with --markdown, the tables for docs/results.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hnq.api import bits_from_quant_config, load_float_model, save_float_model  # noqa: E402
from hnq.data import FASHION_MNIST_CLASSES, load_fashion_mnist  # noqa: E402
from hnq.export import build_onnx_model  # noqa: E402
from hnq.plan import Plan, apply_plan  # noqa: E402
from hnq.sensitivity import measure_sensitivity  # noqa: E402
from hnq.train import TrainConfig, calibrate, calibrate_float, predict, top1, train_float, train_qat  # noqa: E402
from models import BUILTIN_MODELS, QuantConfig, build_float_model, builtin_arch, quantize_model  # noqa: E402

ROWS = ("ibert", "ivit", "fqvit", "hnq-delta-sqnr", "hnq-float-input")
ROW_TITLES = {
    "float": "float (no quantization)",
    "ibert": "uniform I-BERT",
    "ivit": "uniform I-ViT",
    "fqvit": "uniform FQ-ViT (I-BERT GELU)",
    "hnq-delta-sqnr": "HNQ mixed, rule delta-sqnr",
    "hnq-float-input": "HNQ mixed, rule float-input",
}


def uniform_plan(model_name: str, sites: dict, family: str, bits: dict) -> Plan:
    entries = {}
    for name, site in sites.items():
        scheme = "ibert" if (site.op, family) == ("gelu", "fqvit") else family
        entries[name] = {"op": site.op, "scheme": scheme}
    return Plan(model=model_name, bits=dict(bits), sites=entries, rule=f"uniform-{family}")


def ort_top1(qmodel, plan: Plan, test_x: torch.Tensor, test_y: torch.Tensor, check: int) -> tuple[float, int]:
    """Top-1 of the exported model in ORT, and mismatched codes on the first `check` images."""
    model, _ = build_onnx_model(qmodel, plan, {})
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    codes = np.concatenate([session.run(None, {"pixels": test_x[i:i + 500].numpy()})[0]
                            for i in range(0, len(test_x), 500)])
    reference, _ = qmodel.logits_codes(test_x[:check])
    mismatched = int((codes[:check].astype(np.int64) != reference.numpy()).sum())
    return float((codes.argmax(1) == test_y.numpy()).mean()), mismatched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=BUILTIN_MODELS, default="hnq_vit_fmnist", help="built-in model to compare on")
    parser.add_argument("--output", type=Path, default=Path("runs/compare"))
    parser.add_argument("--float-checkpoint", type=Path, default=None,
                        help="float model to start from (default: train one for --float-epochs)")
    parser.add_argument("--float-epochs", type=float, default=4.0)
    parser.add_argument("--qat-epochs", type=float, default=1.0, help="QAT budget of the main setting, in epochs")
    parser.add_argument("--limited-epochs", type=float, default=0.1, help="QAT budget of the limited setting")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 6])
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--search-batches", type=int, default=8)
    parser.add_argument("--check-images", type=int, default=1000, help="images checked bit for bit per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, help="quantized rows to run")
    parser.add_argument("--budgets", nargs="+", default=["main", "limited"], choices=["main", "limited"])
    parser.add_argument("--tables-from", type=Path, default=None,
                        help="print the markdown tables of an existing results.json (complete or not) and exit")
    args = parser.parse_args()
    if args.tables_from is not None:
        print(markdown(json.loads(args.tables_from.read_text()), args))
        return
    args.output.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    data = load_fashion_mnist()
    train_x = torch.from_numpy(data.train_images).unsqueeze(1)
    train_y = torch.from_numpy(data.train_labels)
    test_x = torch.from_numpy(data.test_images).unsqueeze(1)
    test_y = torch.from_numpy(data.test_labels)

    if args.float_checkpoint is None:
        torch.manual_seed(args.seed)
        float_model = build_float_model(builtin_arch(args.model))
        train_float(float_model, train_x, train_y, TrainConfig(epochs=args.float_epochs, lr=2e-3, seed=args.seed))
        args.float_checkpoint = args.output / "float.pt"
        save_float_model(args.float_checkpoint, float_model, builtin_arch(args.model), class_names=list(FASHION_MNIST_CLASSES))
    float_model, payload = load_float_model(args.float_checkpoint)
    if payload["arch"]["timm_name"] != args.model:
        parser.error(f"--float-checkpoint holds {payload['arch']['timm_name']}, not --model {args.model}")
    results: dict = {"model": args.model, "float_top1": top1(predict(float_model, test_x), test_y), "rows": [],
                     "plans": {}}
    previous = args.output / "results.json"
    if previous.is_file():  # keep the rows of an earlier, interrupted run; rerun only the missing ones
        results["rows"] = json.loads(previous.read_text())["rows"]
    done = {(r["bits"], r["budget"], r["row"]) for r in results["rows"]}
    print(f"float top-1 {results['float_top1']:.4f}", flush=True)

    search_images = train_x[-args.search_batches * 64:]
    for bits in args.bits:
        bit_dict = bits_from_quant_config(QuantConfig(act_bits=bits))
        probe = quantize_model(copy.deepcopy(float_model), QuantConfig(act_bits=bits))
        batches = [search_images[i:i + 64] for i in range(0, len(search_images), 64)]
        calibrate_float(probe, batches, len(batches), progress=False)
        sensitivity = measure_sensitivity(probe, batches, len(batches), progress=False)
        plans = {family: uniform_plan(args.model, probe.sites(), family, bit_dict) for family in ("ibert", "ivit", "fqvit")}
        plans["hnq-delta-sqnr"] = sensitivity.make_plan(args.model, bit_dict, "delta-sqnr")
        plans["hnq-float-input"] = sensitivity.make_plan(args.model, bit_dict, "float-input")
        results["plans"][str(bits)] = {row: {s: e["scheme"] for s, e in plan.sites.items()}
                                       for row, plan in plans.items()}
        results.setdefault("sensitivity", {})[str(bits)] = sensitivity.to_dict()
        for budget_name, epochs in (("main", args.qat_epochs), ("limited", args.limited_epochs)):
            if budget_name not in args.budgets:
                continue
            for row in args.rows:
                if (bits, budget_name, row) in done:
                    continue
                tick = time.monotonic()
                model = copy.deepcopy(float_model)
                qmodel = quantize_model(model, QuantConfig(act_bits=bits))
                apply_plan(plans[row], qmodel.sites())
                calibrate(qmodel, train_x, args.calib_batches, 128, progress=False)
                train_qat(qmodel, train_x, train_y, TrainConfig(epochs=epochs, lr=1e-4, seed=args.seed + 1,
                                                                warmup_fraction=0.0, progress=False))
                qmodel.eval()
                accuracy, mismatched = ort_top1(qmodel, plans[row], test_x, test_y, args.check_images)
                record = {"bits": bits, "budget": budget_name, "qat_epochs": epochs, "row": row,
                          "ort_top1": accuracy, "mismatched_codes": mismatched,
                          "seconds": round(time.monotonic() - tick, 1)}
                results["rows"].append(record)
                print(json.dumps(record), flush=True)
                (args.output / "results.json").write_text(json.dumps(results, indent=1))

    results["seconds"] = round(time.monotonic() - started, 1)
    results["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                          "onnxruntime": ort.__version__, "processor": platform.processor() or platform.machine(),
                          "threads": torch.get_num_threads()}
    (args.output / "results.json").write_text(json.dumps(results, indent=1))
    print(markdown(results, args))


def markdown(results: dict, args) -> str:
    lines = []
    bits_order = sorted({r["bits"] for r in results["rows"]} | set(args.bits), reverse=True)
    args.bits = bits_order
    for budget in ("main", "limited"):
        recorded = [r["qat_epochs"] for r in results["rows"] if r["budget"] == budget]
        epochs = recorded[0] if recorded else (args.qat_epochs if budget == "main" else args.limited_epochs)
        lines.append(f"\n### QAT budget: {epochs} epoch{'s' if epochs != 1 else ''} ({budget})\n")
        lines.append("| row | " + " | ".join(f"{b}-bit top-1" for b in args.bits) + " |")
        lines.append("|---|" + "---|" * len(args.bits))
        lines.append(f"| {ROW_TITLES['float']} | " + " | ".join(f"{100 * results['float_top1']:.2f}"
                                                             for _ in args.bits) + " |")
        for row in ROWS:
            cells = []
            for bits in args.bits:
                match = [r for r in results["rows"] if r["row"] == row and r["bits"] == bits and r["budget"] == budget]
                cells.append(f"{100 * match[0]['ort_top1']:.2f}" if match else "n/a")
            lines.append(f"| {ROW_TITLES[row]} | " + " | ".join(cells) + " |")
    for bits in args.bits:
        lines += sensitivity_table(results, bits)
    return "\n".join(lines)


def sensitivity_table(results: dict, bits: int) -> list[str]:
    """ΔSQNR per site and scheme (dB, larger is better), the delta-sqnr plan's choice starred."""
    report = results.get("sensitivity", {}).get(str(bits))
    if report is None:
        return []
    chosen = results["plans"][str(bits)]["hnq-delta-sqnr"]
    names = report["pass_names"][1:]
    lines = [f"\n### ΔSQNR per site at {bits} bits (dB; * = the delta-sqnr plan's choice)\n",
             "| site | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for site, entry in report["sites"].items():
        cells = []
        for name in names:
            value = entry["delta_sqnr_db"].get(name)
            cells.append("" if value is None else f"{value:.2f}{'*' if chosen[site] == name else ''}")
        lines.append(f"| {site} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
