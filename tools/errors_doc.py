"""Generate docs/errors.md: every bad-input error a user can meet, with its message and fix.

The tool builds small real artefacts in a temporary folder: a tiny model trained for a few
steps on a slice of Fashion-MNIST, its plan, checkpoints, ONNX export and an image folder.
It then runs each scenario of SCENARIOS against the real command (through click's test
runner, in this process) or function, records the exit code and the message, and writes
the markdown. The temporary folder is shown as `<dir>`. Rerun it after changing a message:

    PYTHONPATH=. .venv/bin/python tools/errors_doc.py            # writes docs/errors.md
    PYTHONPATH=. .venv/bin/python tools/errors_doc.py -o OTHER.md

tests/test_errors_doc.py regenerates the document and compares it with docs/errors.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import pickle
import shlex
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from hnq import cli  # noqa: E402

DEFAULT_OUTPUT = ROOT / "docs" / "errors.md"
TRAIN_IMAGES = 512
TEST_IMAGES = 200
DATA_SLICE_IMAGES = 256
INTERNAL_FAILURE = 1


@dataclass(frozen=True)
class Scenario:
    """One bad input: how to create it, the command that meets it, and the fix to show."""

    group: str
    title: str
    # Returns (program, arguments) for a command, run through click, or (shown command, callable).
    prepare: Callable[["Workspace"], tuple]
    fix: str


@dataclass(frozen=True)
class Outcome:
    command: str
    exit_code: int
    message: str


class Workspace:
    """The temporary folder with the artefacts every scenario starts from."""

    def __init__(self, root: Path):
        self.root = root
        self.float_checkpoint = root / "float.pt"
        self.checkpoint = root / "model.pt"
        self.plan = root / "plan.json"
        self.onnx = root / "model.onnx"
        self.images = root / "images"
        self.data_dir = root / "fashion-mnist"
        self._count = 0

    def path(self, name: str) -> Path:
        return self.root / name

    def fresh(self, name: str) -> Path:
        """Return a new, empty sub-folder for one scenario."""
        self._count += 1
        folder = self.root / f"{self._count:02d}-{name}"
        folder.mkdir()
        return folder

    def plan_dict(self) -> dict:
        return json.loads(self.plan.read_text())

    def write_plan(self, folder: Path, data: dict | str) -> Path:
        path = folder / "plan.json"
        path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2))
        return path


def build_workspace(root: Path) -> Workspace:
    """Train a tiny model for a few steps on real Fashion-MNIST and write every artefact."""
    import copy

    from hnq.api import bits_from_quant_config, save_float_model, save_quantized_model
    from hnq.data import FASHION_MNIST_CLASSES, load_fashion_mnist, write_image_folder
    from hnq.pipeline import export_from_checkpoint
    from hnq.plan import alternate_plan, apply_plan
    from hnq.train import TrainConfig, calibrate, train_float
    from models import QuantConfig, build_float_model, builtin_arch, quantize_model

    workspace = Workspace(root)
    data = load_fashion_mnist()
    train_x = torch.from_numpy(data.train_images[:TRAIN_IMAGES]).unsqueeze(1)
    train_y = torch.from_numpy(data.train_labels[:TRAIN_IMAGES])

    torch.manual_seed(0)
    arch = builtin_arch()
    float_model = build_float_model(arch)
    train_float(float_model, train_x, train_y, TrainConfig(epochs=1, lr=2e-3, batch_size=128, progress=False))
    save_float_model(workspace.float_checkpoint, float_model, arch, class_names=list(FASHION_MNIST_CLASSES))

    cfg = QuantConfig()
    parent = copy.deepcopy(float_model)
    qmodel = quantize_model(float_model, cfg)
    plan = alternate_plan(arch["timm_name"], qmodel.sites(), bits_from_quant_config(cfg))
    apply_plan(plan, qmodel.sites())
    plan.save(workspace.plan)
    calibrate(qmodel, train_x, 2, 64, progress=False)
    save_quantized_model(workspace.checkpoint, qmodel, plan, arch, float_model=parent,
                         class_names=list(FASHION_MNIST_CLASSES))
    export_from_checkpoint(workspace.checkpoint, workspace.onnx)
    write_image_folder(data.test_images[:TEST_IMAGES], data.test_labels[:TEST_IMAGES], FASHION_MNIST_CLASSES,
                       workspace.images, progress=False)

    workspace.data_dir.mkdir()
    count = DATA_SLICE_IMAGES
    _write_idx(workspace.data_dir / "train-images-idx3-ubyte.gz", data.train_images[:count], 2051)
    _write_idx(workspace.data_dir / "train-labels-idx1-ubyte.gz", data.train_labels[:count], 2049)
    _write_idx(workspace.data_dir / "t10k-images-idx3-ubyte.gz", data.test_images[:count], 2051)
    _write_idx(workspace.data_dir / "t10k-labels-idx1-ubyte.gz", data.test_labels[:count], 2049)
    return workspace


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.GzipFile(path, "wb", mtime=0) as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


# ---------------------------------------------------------------------------
# Scenarios. Each prepare function creates its bad input under a fresh folder and returns
# ("hnq" | "hnq-export" | "hnq-eval", [arguments]) or ("function", shown command, callable).
# ---------------------------------------------------------------------------


def _export_with_plan(ws: Workspace, name: str, edit: Callable[[dict], dict | str], *extra: str) -> tuple:
    folder = ws.fresh(name)
    plan = ws.write_plan(folder, edit(ws.plan_dict()))
    return "hnq-export", [str(ws.checkpoint), "--plan", str(plan), "-o", str(folder / "model.onnx"), *extra]


def _set_scheme(site: str, scheme: str) -> Callable[[dict], dict]:
    def edit(plan: dict) -> dict:
        plan["sites"][site]["scheme"] = scheme
        return plan

    return edit


def _unknown_site(plan: dict) -> dict:
    plan["sites"]["blocks.9.norm1"] = {"op": "layernorm", "scheme": "ibert"}
    return plan


def _wrong_types(plan: dict) -> dict:
    plan["bits"]["weight"] = "8"
    plan["bits"]["activation"] = 3
    plan["sites"]["blocks.0.norm1"] = {"op": "layernorm", "scheme": 1}
    plan["colour"] = "blue"
    return plan


def _duplicate_site(plan: dict) -> str:
    text = json.dumps(plan, indent=2)
    entry = '"blocks.0.norm1": {\n      "op": "layernorm",\n      "scheme": "ivit"\n    },\n    '
    return text.replace('"sites": {\n    ', '"sites": {\n    ' + entry, 1)


def _other_plan(plan: dict) -> dict:
    current = plan["sites"]["blocks.0.norm1"]["scheme"]
    plan["sites"]["blocks.0.norm1"]["scheme"] = "ivit" if current == "ibert" else "ibert"
    return plan


def _write_content(path: Path, content: bytes | Callable[[Path], None]) -> Path:
    """Write `content` to `path`: raw bytes, or a function that writes the file itself."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        content(path)
    return path


def _export_checkpoint(ws: Workspace, name: str, content: bytes | Callable[[Path], None]) -> tuple:
    folder = ws.fresh(name)
    checkpoint = _write_content(folder / "model.pt", content)
    return "hnq-export", [str(checkpoint), "-o", str(folder / "model.onnx")]


class _RunsCode:
    """A pickle payload that would create a file when unpickled by a plain pickle.load."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def _save_code_pickle(path: Path) -> None:
    torch.save({"format": "hnq-checkpoint", "payload": _RunsCode(str(path.parent / "code-ran"))}, path)


def _save_plain_pickle(path: Path) -> None:
    with open(path, "wb") as handle:
        pickle.dump({"weights": [1, 2, 3]}, handle)


def _save_timm_state_dict(path: Path) -> None:
    torch.save({"pos_embed": torch.zeros(1, 50, 64)}, path)


def _eval_model(ws: Workspace, name: str, content: bytes | Callable[[Path], None]) -> tuple:
    folder = ws.fresh(name)
    model = _write_content(folder / "model.onnx", content)
    return "hnq-eval", [str(model), "--imagenet", str(ws.images), "--no-progress"]


def _strip_hnq_metadata(ws: Workspace) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        import onnx

        model = onnx.load(str(ws.onnx))
        del model.metadata_props[:]
        onnx.save(model, str(path))

    return write


def _eval_images(ws: Workspace, name: str, build: Callable[[Path], None]) -> tuple:
    folder = ws.fresh(name)
    images = folder / "images"
    build(images)
    return "hnq-eval", [str(ws.onnx), "--imagenet", str(images), "--no-progress"]


def _copy_with_wrong_size(ws: Workspace) -> Callable[[Path], None]:
    def build(images: Path) -> None:
        import shutil

        from PIL import Image

        shutil.copytree(ws.images, images)
        victim = sorted(images.rglob("*.png"))[0]
        Image.new("L", (32, 32)).save(victim)

    return build


def _copy_with_empty_class(ws: Workspace) -> Callable[[Path], None]:
    def build(images: Path) -> None:
        import shutil

        shutil.copytree(ws.images, images)
        for path in (images / "0_T-shirt-top").iterdir():
            path.unlink()

    return build


def _unknown_synsets(ws: Workspace) -> tuple:
    from hnq.imagenet import scan_imagenet_folder

    folder = ws.fresh("imagenet-val")
    for name in ("n01440764", "n99999999", "cats"):
        (folder / name).mkdir()
    return ("function", f"hnq-eval vit_1000_classes.onnx --imagenet {folder}",
            lambda: scan_imagenet_folder(folder))


def _plan_command(ws: Workspace, name: str, *extra: str, checkpoint: Path | None = None) -> tuple:
    folder = ws.fresh(name)
    return "hnq", ["plan", str(checkpoint or ws.float_checkpoint), "--calib", str(ws.images),
                   "-o", str(folder / "plan.json"), "--no-progress", *extra]


def _train_command(ws: Workspace, name: str, *extra: str, setup: Callable[[Path], None] | None = None,
                   data_dir: Path | None = None) -> tuple:
    folder = ws.fresh(name)
    run = folder / "run"
    if setup is not None:
        setup(run)
    return "hnq", ["train", str(ws.float_checkpoint), "-o", str(run), "--data-dir", str(data_dir or ws.data_dir),
                   "--epochs", "0.1", "--no-progress", "--quiet", *extra]


def _stale_last_checkpoint(run: Path) -> None:
    run.mkdir()
    (run / "last.pt").write_bytes(b"an earlier run")


def _blocked_output(ws: Workspace) -> tuple:
    folder = ws.fresh("blocked")
    (folder / "runs").write_text("a file where a folder is expected\n")
    return "hnq-export", [str(ws.checkpoint), "-o", str(folder / "runs" / "model.onnx")]


PLAN = "Plans"
CHECKPOINT = "Checkpoints"
MODEL = "ONNX models"
IMAGES = "Image folders and data"
OUTPUT = "Output paths"
TRAINING = "Training runs"
OPTIONS = "Options"

SCENARIOS: list[Scenario] = [
    Scenario(PLAN, "Plan names a site the model does not have",
             lambda ws: _export_with_plan(ws, "unknown-site", _unknown_site),
             "Remove the site from the plan, or write the plan for this model with `hnq plan`."),
    Scenario(PLAN, "Plan names an unknown scheme",
             lambda ws: _export_with_plan(ws, "unknown-scheme", _set_scheme("blocks.0.attn.softmax", "shiftmaxx"),
                                          "--allow-plan-change"),
             "Use one of the schemes the message lists for that op."),
    Scenario(PLAN, "Plan asks for FQ-ViT at a GELU site",
             lambda ws: _export_with_plan(ws, "fqvit-gelu", _set_scheme("blocks.0.mlp.act", "fqvit"),
                                          "--allow-plan-change"),
             "Use `ibert` or `ivit` for GELU sites; FQ-ViT is available for softmax and LayerNorm."),
    Scenario(PLAN, "Plan values of the wrong type or range, and unknown keys",
             lambda ws: _export_with_plan(ws, "wrong-types", _wrong_types),
             "Fix every listed JSON path: bit widths are integers in the listed range, op and scheme are strings."),
    Scenario(PLAN, "Plan lists a site twice",
             lambda ws: _export_with_plan(ws, "duplicate-site", _duplicate_site),
             "Keep one entry per site."),
    Scenario(PLAN, "Plan is not valid JSON",
             lambda ws: _export_with_plan(ws, "not-json", lambda plan: "{not json"),
             "Repair the JSON at the line and column shown, or write the plan again with `hnq plan`."),
    Scenario(PLAN, "Plan differs from the one the model was trained with",
             lambda ws: _export_with_plan(ws, "other-plan", _other_plan),
             "Pass the plan.json written next to model.pt, or add `--allow-plan-change` to export anyway."),
    Scenario(PLAN, "Plan file not found",
             lambda ws: ("hnq-export", [str(ws.checkpoint), "--plan", str(ws.fresh("no-plan") / "plan.json"),
                                        "-o", str(ws.root / "model-no-plan.onnx")]),
             "Check the path, or create a plan with `hnq plan`."),
    Scenario(PLAN, "`--bits` differs from a quantized checkpoint's bits",
             lambda ws: _plan_command(ws, "plan-bits", "--bits", "6", checkpoint=ws.checkpoint),
             "Drop `--bits`, or pass the float checkpoint (float.pt) to search at other bits."),
    Scenario(CHECKPOINT, "Checkpoint file not found",
             lambda ws: ("hnq-export", [str(ws.fresh("no-checkpoint") / "model.pt"),
                                        "-o", str(ws.root / "model-none.onnx")]),
             "Check the path; `hnq demo` and `hnq train` write model.pt."),
    Scenario(CHECKPOINT, "Checkpoint is empty",
             lambda ws: _export_checkpoint(ws, "empty-checkpoint", b""),
             "Re-create the checkpoint; an empty file is left by a copy or a write that did not finish."),
    Scenario(CHECKPOINT, "Checkpoint is random bytes",
             lambda ws: _export_checkpoint(ws, "random-checkpoint", np.random.default_rng(0).bytes(4096)),
             "Pass a model.pt written by hnq."),
    Scenario(CHECKPOINT, "Checkpoint is truncated",
             lambda ws: _export_checkpoint(ws, "truncated-checkpoint",
                                           ws.checkpoint.read_bytes()[: ws.checkpoint.stat().st_size // 2]),
             "Copy the checkpoint again in full, or re-create it."),
    Scenario(CHECKPOINT, "Checkpoint contains a pickle that would run code",
             lambda ws: _export_checkpoint(ws, "code-checkpoint", _save_code_pickle),
             "Do not load the file. Re-save trusted models as HNQ checkpoints with hnq itself."),
    Scenario(CHECKPOINT, "Checkpoint is a plain pickle, not a torch file",
             lambda ws: _export_checkpoint(ws, "pickle-checkpoint", _save_plain_pickle),
             "Pass a model.pt written by hnq."),
    Scenario(CHECKPOINT, "Checkpoint is a torch file from another tool",
             lambda ws: _export_checkpoint(ws, "timm-checkpoint", _save_timm_state_dict),
             "Build timm models with `--pretrained`, or train one with `hnq train`."),
    Scenario(CHECKPOINT, "Float checkpoint where a quantized one is needed",
             lambda ws: ("hnq-export", [str(ws.float_checkpoint), "-o", str(ws.fresh("float-kind") / "m.onnx")]),
             "Export the QAT model.pt, or add `--float` to export the float model."),
    Scenario(CHECKPOINT, "Checkpoint is not the one the ONNX model was exported from",
             lambda ws: ("hnq-eval", [str(ws.onnx), "--imagenet", str(ws.images), "--checkpoint",
                                      str(ws.float_checkpoint), "--no-progress"]),
             "Pass the model.pt the ONNX file was exported from, or re-export it from this checkpoint."),
    Scenario(MODEL, "ONNX model not found",
             lambda ws: ("hnq-eval", [str(ws.fresh("no-model") / "model.onnx"), "--imagenet", str(ws.images)]),
             "Check the path, or export the model with `hnq-export`."),
    Scenario(MODEL, "ONNX file is not readable",
             lambda ws: _eval_model(ws, "random-model", np.random.default_rng(1).bytes(4096)),
             "Export the model again with `hnq-export`."),
    Scenario(MODEL, "ONNX model not written by hnq-export",
             lambda ws: _eval_model(ws, "foreign-model", _strip_hnq_metadata(ws)),
             "Evaluate models exported by `hnq-export`, which records the input layout and preprocessing."),
    Scenario(IMAGES, "Image folder not found",
             lambda ws: ("hnq-eval", [str(ws.onnx), "--imagenet", str(ws.fresh("no-images") / "images")]),
             "Check the path; the folder needs one sub-folder per class."),
    Scenario(IMAGES, "Image folder has no class sub-folders",
             lambda ws: _eval_images(ws, "empty-images", lambda images: images.mkdir()),
             "Put the images of each class in a sub-folder of its own."),
    Scenario(IMAGES, "Class folder has no images",
             lambda ws: _eval_images(ws, "empty-class", _copy_with_empty_class(ws)),
             "Add the images of that class, or remove the empty folder."),
    Scenario(IMAGES, "Image of the wrong size",
             lambda ws: _eval_images(ws, "wrong-size", _copy_with_wrong_size(ws)),
             "Resize the image to the model input, or remove it."),
    Scenario(IMAGES, "ImageNet folder with unknown WordNet ids",
             _unknown_synsets,
             "Rename each class folder to its WordNet id (such as n01440764), or remove it."),
    Scenario(IMAGES, "Calibration folder has too few images",
             lambda ws: _plan_command(ws, "few-images", "--batches", "100", "--batch-size", "32"),
             "Lower `--batches` or `--batch-size`, or add images."),
    Scenario(IMAGES, "Fashion-MNIST folder not found",
             lambda ws: _train_command(ws, "no-data", data_dir=ws.path("missing-data")),
             "Install the data set (`apt-get install dataset-fashion-mnist`) or pass `--data-dir`."),
    Scenario(OUTPUT, "Output folder does not exist",
             lambda ws: ("hnq-export", [str(ws.checkpoint), "-o", str(ws.fresh("missing-out") / "out" / "m.onnx")]),
             "Create the folder first (`mkdir -p`), or choose another `-o` path."),
    Scenario(OUTPUT, "Output folder is blocked by a file of the same name",
             _blocked_output,
             "Choose another `-o` path, or move the file away."),
    Scenario(OUTPUT, "Output path is a folder",
             lambda ws: ("hnq-export", [str(ws.checkpoint), "-o", str(ws.fresh("folder-out"))]),
             "Give a file name, such as `-o runs/model.onnx`."),
    Scenario(OUTPUT, "`--json` report into a missing folder",
             lambda ws: ("hnq-eval", [str(ws.onnx), "--imagenet", str(ws.images), "--json",
                                      str(ws.fresh("missing-json") / "out" / "eval.json")]),
             "Create the folder first, or choose another `--json` path."),
    Scenario(TRAINING, "`--resume` without last.pt",
             lambda ws: _train_command(ws, "resume-missing", "--resume"),
             "Start the run without `--resume`, or point `-o` at the folder of the interrupted run."),
    Scenario(TRAINING, "Run folder holds last.pt from an earlier run",
             lambda ws: _train_command(ws, "stale-last", setup=_stale_last_checkpoint),
             "Add `--resume` to continue that run, or choose another `--output`."),
    Scenario(TRAINING, "Calibration needs more images than the training data has",
             lambda ws: _train_command(ws, "calibration-too-few", "--calib-batches", "16", "--batch-size", "32"),
             "Lower `--calib-batches` or `--batch-size`."),
    Scenario(OPTIONS, "`hnq train --float` with a checkpoint",
             lambda ws: ("hnq", ["train", str(ws.float_checkpoint), "--float", "-o", str(ws.fresh("float-ckpt"))]),
             "Drop the checkpoint to train a float model, or drop `--float` for QAT."),
    Scenario(OPTIONS, "`hnq-export --float` with a plan",
             lambda ws: ("hnq-export", [str(ws.checkpoint), "--float", "--plan", str(ws.plan),
                                        "-o", str(ws.fresh("float-plan") / "m.onnx")]),
             "Drop `--plan` and `--allow-plan-change`: the float model has no plan."),
]

COMMANDS = {"hnq": cli.main, "hnq-export": cli.export_command, "hnq-eval": cli.eval_command}


def _format_internal_failure(error: BaseException) -> str:
    return f"Traceback (most recent call last): ...\n{type(error).__name__}: {error}"


def run_scenario(scenario: Scenario, ws: Workspace) -> Outcome:
    prepared = scenario.prepare(ws)
    if prepared[0] == "function":
        _, shown_command, function = prepared
        try:
            function()
        except cli._user_errors() as error:
            return Outcome(shown_command, cli.EXIT_BAD_INPUT, f"error: {error}")
        except Exception as error:  # shown as the internal failure a user would see
            return Outcome(shown_command, INTERNAL_FAILURE, _format_internal_failure(error))
        raise RuntimeError(f"scenario {scenario.title!r} raised no error")

    program, args = prepared
    result = CliRunner().invoke(COMMANDS[program], args, prog_name=program)
    shown_command = " ".join([program, *(shlex.quote(arg) for arg in args)])
    if result.exit_code == 0:
        raise RuntimeError(f"scenario {scenario.title!r} succeeded: {shown_command}\n{result.output}")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return Outcome(shown_command, result.exit_code, _format_internal_failure(result.exception))
    return Outcome(shown_command, result.exit_code, result.stderr.strip())


def normalize(text: str, root: Path) -> str:
    for prefix in {str(root.resolve()), str(root)}:
        text = text.replace(prefix, "<dir>")
    return text


def render(outcomes: list[tuple[Scenario, Outcome]]) -> str:
    lines = [
        "# Errors and their fixes",
        "",
        "Every error below was produced by running the command on a bad input; `<dir>` stands for",
        "the folder that held the files. Exit code 2 means bad input, and the message names the value",
        "and the fix. Exit code 1 means an internal failure, which prints a Python traceback.",
        "",
        "This page is generated by `tools/errors_doc.py`; do not edit it by hand. After changing a",
        "message, run `PYTHONPATH=. .venv/bin/python tools/errors_doc.py`.",
        "",
    ]
    group = None
    for scenario, outcome in outcomes:
        if scenario.group != group:
            group = scenario.group
            lines += [f"## {group}", ""]
        lines += [
            f"### {scenario.title}",
            "",
            "```",
            outcome.command,
            "```",
            "",
            f"Exit code: {outcome.exit_code}",
            "",
            "```",
            outcome.message,
            "```",
            "",
            f"Fix: {scenario.fix}",
            "",
        ]
    return "\n".join(lines)


def generate(output: Path) -> Path:
    """Run every scenario in a temporary folder and write the markdown to `output`."""
    # The commands call logging.basicConfig; one silent handler first keeps their log lines
    # (which hold timings) out of the captured messages.
    logging.basicConfig(level=logging.WARNING, handlers=[logging.NullHandler()], force=True)
    with tempfile.TemporaryDirectory(prefix="hnq-errors-") as tmp:
        root = Path(tmp)
        ws = build_workspace(root)
        outcomes = []
        for scenario in SCENARIOS:
            outcome = run_scenario(scenario, ws)
            outcomes.append((scenario, Outcome(normalize(outcome.command, root), outcome.exit_code,
                                               normalize(outcome.message, root))))
        text = render(outcomes)
    output.write_text(text, encoding="utf-8")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="Markdown file to write.")
    args = parser.parse_args(argv)
    print(f"wrote {generate(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
