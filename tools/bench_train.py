"""Training-step time of QAT against float training, same model, batch and machine.

    PYTHONPATH=. .venv/bin/python tools/bench_train.py --batch-size 128 --steps 20

Both models see the same real Fashion-MNIST batches; the steps alternate float, QAT, float,
... so drifts in machine load hit both, and the medians are compared as a ratio.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hnq.api import bits_from_quant_config  # noqa: E402
from hnq.data import load_fashion_mnist  # noqa: E402
from hnq.plan import alternate_plan, apply_plan  # noqa: E402
from hnq.train import calibrate  # noqa: E402
from models import QuantConfig, build_float_model, builtin_arch, quantize_model  # noqa: E402


def step_time(model, optimizer, x, y) -> float:
    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--bits", type=int, default=8)
    args = parser.parse_args()

    data = load_fashion_mnist()
    images = torch.from_numpy(data.train_images).unsqueeze(1)
    labels = torch.from_numpy(data.train_labels)
    torch.manual_seed(0)
    float_model = build_float_model(builtin_arch())
    qmodel = quantize_model(copy.deepcopy(float_model), QuantConfig(act_bits=args.bits))
    bits = bits_from_quant_config(QuantConfig(act_bits=args.bits))
    apply_plan(alternate_plan("hnq_vit_fmnist", qmodel.sites(), bits), qmodel.sites())
    calibrate(qmodel, images, 2, args.batch_size, progress=False)
    float_model.train()
    qmodel.train()
    optimizers = {"float": torch.optim.AdamW(float_model.parameters(), 1e-4),
                  "qat": torch.optim.AdamW(qmodel.parameters(), 1e-4)}
    models = {"float": float_model, "qat": qmodel}
    times: dict[str, list[float]] = {"float": [], "qat": []}
    for i in range(args.warmup + args.steps):
        x = images[i * args.batch_size:(i + 1) * args.batch_size]
        y = labels[i * args.batch_size:(i + 1) * args.batch_size]
        for name in ("float", "qat"):
            elapsed = step_time(models[name], optimizers[name], x, y)
            if i >= args.warmup:
                times[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "batch_size": args.batch_size, "steps": args.steps, "activation_bits": args.bits,
        "float_step_ms": round(1000 * medians["float"], 1), "qat_step_ms": round(1000 * medians["qat"], 1),
        "qat_over_float": round(medians["qat"] / medians["float"], 2),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
