"""Command line: the `hnq` group and the fixed commands `hnq-export` and `hnq-eval`.

Exit codes: 0 success, 2 bad input (a wrong plan, checkpoint, data set or path; the message
says what to fix), 1 an internal failure (a bug: please report it with the traceback).
"""

from __future__ import annotations

import json
import logging
import sys
from functools import wraps
from pathlib import Path

import click

from .data import DataError
from .io import CheckpointError, OutputPathError
from .plan import PlanError
from .schemes.registry import SchemeError

EXIT_BAD_INPUT = 2

_USER_ERRORS = (PlanError, CheckpointError, OutputPathError, SchemeError, DataError)


def _user_errors() -> tuple[type[Exception], ...]:
    from models.pretrained import PretrainedWeightsError, UnknownModelError
    from models.swin import WindowSizeError

    from .evaluate import ModelFileError
    from .nn import UnsafeSiteError

    return (*_USER_ERRORS, ModelFileError, UnsafeSiteError, PretrainedWeightsError, UnknownModelError,
            WindowSizeError)


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _report_user_errors(func):
    """Turn HNQ's bad-input errors into a one-paragraph message and exit code 2."""

    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except _user_errors() as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(EXIT_BAD_INPUT)

    return wrapper


def _logging_options(func):
    func = click.option("--quiet", "-q", is_flag=True, help="Show warnings and errors only.")(func)
    func = click.option("--verbose", "-v", is_flag=True, help="Show debug messages.")(func)
    return func


@click.group()
def main() -> None:
    """HNQ: integer-only Vision Transformers with mixed non-linear quantization."""


@main.command("demo")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True,
              help="Folder for every artefact: checkpoints, plan.json, the ONNX model, images, eval.json.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Folder with the four Fashion-MNIST idx files (default: /usr/share/datasets/fashion-mnist).")
@click.option("--epochs", type=float, default=4.0, show_default=True, help="Float training epochs.")
@click.option("--qat-epochs", type=float, default=0.5, show_default=True, help="QAT epochs (fractions allowed).")
@click.option("--bits", type=click.IntRange(4, 8), default=8, show_default=True, help="Activation bits.")
@click.option("--calib-batches", type=click.IntRange(1), default=8, show_default=True,
              help="Calibration batches before QAT.")
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True, help="Training batch size.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--max-minutes", type=float, default=None, help="Time budget of the float training, in minutes.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@_logging_options
@_report_user_errors
def demo_command(output, data_dir, epochs, qat_epochs, bits, calib_batches, batch_size, seed, max_minutes,
                 no_progress, verbose, quiet) -> None:
    """Run the main job on the built-in default (Fashion-MNIST, small ViT), end to end."""
    from .io import check_output_folder
    from .pipeline import DemoConfig, run_demo

    _configure_logging(verbose, quiet)
    check_output_folder(output)
    report = run_demo(DemoConfig(output=output, data_dir=data_dir, epochs=epochs, qat_epochs=qat_epochs,
                                 act_bits=bits, calib_batches=calib_batches, batch_size=batch_size, seed=seed,
                                 max_minutes=max_minutes, progress=not (no_progress or quiet)))
    click.echo(report.table())
    click.echo(f"wrote {output / 'eval.json'}")
    if report.mismatched:
        click.echo(f"error: {report.mismatched} images differ between ONNX Runtime and the integer reference",
                   err=True)
        sys.exit(1)


@main.command("plan")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--calib", "calib_dir", type=click.Path(path_type=Path), required=True,
              help="Image folder (one sub-folder per class) with the calibration images.")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="plan.json to write.")
@click.option("--bits", type=click.IntRange(4, 8), default=None,
              help="Activation bits for a float checkpoint (default 8); a quantized one keeps its own.")
@click.option("--batches", type=click.IntRange(1), default=16, show_default=True, help="Calibration batches.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Images per batch.")
@click.option("--rule", type=click.Choice(["delta-sqnr", "float-input"]), default="delta-sqnr", show_default=True,
              help="delta-sqnr: largest SQNR_out - SQNR_in in the all-one-family model; "
                   "float-input: largest SQNR_out on the site's own float input.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@_logging_options
@_report_user_errors
def plan_command(checkpoint, calib_dir, output, bits, batches, batch_size, rule, no_progress, verbose, quiet) -> None:
    """Measure every site under every candidate scheme and write the least-error plan.

    Besides plan.json it writes PLAN.sensitivity.json (every number, for scripts) and
    PLAN.sensitivity.png (a heat map of sites x schemes).
    """
    from .api import search_plan
    from .io import atomic_write_text, check_output_path
    from .sensitivity import format_table, save_heatmap

    _configure_logging(verbose, quiet)
    check_output_path(output)
    plan, result, _ = search_plan(checkpoint, calib_dir, bits, batches, batch_size, rule, progress=not (no_progress or quiet))
    choice = {site: entry["scheme"] for site, entry in plan.sites.items()}
    click.echo(format_table(result, choice, rule))
    click.echo(f"search: {result.passes} batch passes ({len(result.pass_names) + 1} per batch: float and "
               f"{', '.join(result.pass_names)}) over {result.images} images in {result.seconds:.1f} s")
    plan.save(output)
    stem = output.with_suffix("")
    report = {"rule": rule, "plan": str(output), **result.to_dict(), "choice": choice}
    atomic_write_text(f"{stem}.sensitivity.json", json.dumps(report, indent=2, allow_nan=False,
                                                             default=str) + "\n")
    save_heatmap(result, choice, f"{stem}.sensitivity.png", rule)
    click.echo(f"wrote {output}, {stem}.sensitivity.json and {stem}.sensitivity.png")


@main.command("train")
@click.argument("checkpoint", type=click.Path(path_type=Path), required=False)
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), default=None,
              help="plan.json for QAT (default: I-BERT and I-ViT schemes taken in turn along the model).")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True,
              help="Run folder: last.pt, model.pt, plan.json, train_log.json.")
@click.option("--float", "float_training", is_flag=True,
              help="Train the float model from scratch instead of QAT (no CHECKPOINT).")
@click.option("--model", "model_name", default="hnq_vit_fmnist", show_default=True,
              help="timm model name for --float.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Folder with the four Fashion-MNIST idx files (default: /usr/share/datasets/fashion-mnist).")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Training epochs (fractions allowed).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Peak learning rate of AdamW's cosine schedule (default 1e-4 for QAT, 2e-3 for --float).")
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True,
              help="Images per step and process.")
@click.option("--bits", type=click.IntRange(4, 8), default=None, help="Activation bits (default: the plan's).")
@click.option("--calib-batches", type=click.IntRange(1), default=8, show_default=True,
              help="Calibration batches before QAT.")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Time budget in minutes: stop cleanly, evaluate and save when it runs out.")
@click.option("--checkpoint-every", type=click.IntRange(0), default=100, show_default=True,
              help="Steps between resumable checkpoints (last.pt); 0 writes one per epoch only.")
@click.option("--resume", is_flag=True, help="Continue the run in --output from its last.pt.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@_logging_options
@_report_user_errors
def train_command(checkpoint, plan_path, output, float_training, model_name, data_dir, epochs, lr, batch_size,
                  bits, calib_batches, max_minutes, checkpoint_every, resume, seed, no_progress, verbose,
                  quiet) -> None:
    """Train on the built-in data: QAT of a float CHECKPOINT under a plan, or --float from scratch.

    Runs under torchrun for several processes (gloo on CPU, NCCL on GPU).
    """
    from .io import check_output_folder
    from .qat import TrainJob, init_distributed, run_training

    _configure_logging(verbose, quiet)
    check_output_folder(output)
    if float_training and checkpoint is not None:
        raise click.UsageError("--float trains from scratch: drop CHECKPOINT, or drop --float for QAT")
    if not float_training and checkpoint is None:
        raise click.UsageError("QAT needs CHECKPOINT (a float model.pt); use --float to train one first")
    init_distributed()
    job = TrainJob(output=output, checkpoint=checkpoint, plan=plan_path, float_training=float_training,
                   model_name=model_name, data_dir=data_dir, epochs=epochs,
                   lr=lr if lr is not None else (2e-3 if float_training else 1e-4), batch_size=batch_size,
                   act_bits=bits, calib_batches=calib_batches, seed=seed, max_minutes=max_minutes,
                   checkpoint_every=checkpoint_every, resume=resume, progress=not (no_progress or quiet))
    log = run_training(job)
    if "test_top1" in log:
        click.echo(f"test top-1 {100 * log['test_top1']:.2f} % after {log['steps']} of {log['total_steps']} steps"
                   f"{' (time budget reached)' if log['stopped_by_time_budget'] else ''}; wrote {output}/model.pt")


@main.command("import")
@click.argument("model_name")
@click.option("--pretrained", type=click.Path(path_type=Path), default=None,
              help="Local timm checkpoint (.pth, .pt, .bin or .safetensors); no download ever happens.")
@click.option("--num-classes", type=click.IntRange(1), default=None, help="Classes of the head (default: timm's).")
@click.option("--reset-head", is_flag=True, help="Drop the checkpoint's head when --num-classes differs from it.")
@click.option("--img-size", type=click.IntRange(1), default=None, help="Input size in pixels (default: timm's).")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Float checkpoint to write.")
@_logging_options
@_report_user_errors
def import_command(model_name, pretrained, num_classes, reset_head, img_size, output, verbose, quiet) -> None:
    """Build timm model MODEL_NAME with local weights and save it as an HNQ float checkpoint."""
    from models.pretrained import create_float_model

    from .api import save_float_model
    from .io import check_output_path

    _configure_logging(verbose, quiet)
    check_output_path(output)
    model, arch = create_float_model(model_name, pretrained=pretrained, num_classes=num_classes,
                                     reset_head=reset_head, img_size=img_size)
    save_float_model(output, model, arch)
    click.echo(f"wrote {output} ({model_name}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")


@main.command("calibrate")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), default=None,
              help="plan.json (default: the alternate plan at --bits).")
@click.option("--calib", "calib_dir", type=click.Path(path_type=Path), required=True,
              help="Image folder with the calibration images (resized and cropped as the model expects).")
@click.option("--bits", type=click.IntRange(4, 8), default=8, show_default=True,
              help="Activation bits when no plan is given.")
@click.option("--batches", type=click.IntRange(1), default=8, show_default=True, help="Calibration batches.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Images per batch.")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True,
              help="Quantized checkpoint to write (post-training quantization, no QAT).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@_logging_options
@_report_user_errors
def calibrate_command(checkpoint, plan_path, calib_dir, bits, batches, batch_size, output, no_progress, verbose,
                      quiet) -> None:
    """Quantize a float checkpoint under a plan and calibrate it on images (post-training quantization).

    The result exports like a QAT model; `hnq train` can fine-tune it further.
    """
    import copy

    from .api import default_plan, load_calibration_images, load_float_model, quantize, save_quantized_model
    from .io import check_output_path
    from .plan import Plan
    from .train import calibrate_float

    _configure_logging(verbose, quiet)
    check_output_path(output)
    float_model, payload = load_float_model(checkpoint)
    plan = Plan.load(plan_path) if plan_path is not None else default_plan(float_model, act_bits=bits)
    parent = copy.deepcopy(float_model)
    qmodel = quantize(float_model, plan)
    image_batches = load_calibration_images(calib_dir, qmodel.image_shape, batches, batch_size,
                                            progress=not (no_progress or quiet), arch=payload["arch"])
    calibrate_float(qmodel, image_batches, len(image_batches), progress=not (no_progress or quiet))
    extra = {k: payload[k] for k in ("class_names",) if k in payload}
    save_quantized_model(output, qmodel, plan, payload["arch"], float_model=parent, **extra)
    click.echo(f"wrote {output} (calibrated on {batches * batch_size} images, plan rule {plan.rule})")


@main.command("write-images")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True,
              help="Fashion-MNIST split to write.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Write only the first N images.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Folder with the four Fashion-MNIST idx files (default: /usr/share/datasets/fashion-mnist).")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Image folder to write.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@_logging_options
@_report_user_errors
def write_images_command(split, limit, data_dir, output, no_progress, verbose, quiet) -> None:
    """Write a Fashion-MNIST split as an image folder (one sub-folder per class, PNG files)."""
    from .data import FASHION_MNIST_CLASSES, load_fashion_mnist, write_image_folder

    _configure_logging(verbose, quiet)
    data = load_fashion_mnist(data_dir)
    images, labels = (data.train_images, data.train_labels) if split == "train" else \
        (data.test_images, data.test_labels)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    write_image_folder(images, labels, FASHION_MNIST_CLASSES, output, progress=not (no_progress or quiet))
    click.echo(f"wrote {len(labels)} images to {output}")


@click.command("hnq-export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), default=None,
              help="plan.json to export with (default: the plan stored in the checkpoint).")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="ONNX file to write.")
@click.option("--allow-plan-change", is_flag=True,
              help="Export with a plan that differs from the one the model was trained with.")
@click.option("--float", "export_float", is_flag=True,
              help="Export the float model instead: a float checkpoint's model, or the float parent saved in "
                   "a quantized checkpoint (float32 logits, no plan).")
@click.option("--target", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="onnxruntime execution provider to lower the integer graph for. cuda also checks the "
                   "model against onnxruntime's CUDA kernel table and fails if a node would run on the CPU.")
@_logging_options
@_report_user_errors
def export_command(checkpoint, plan_path, output, allow_plan_change, export_float, target, verbose, quiet) -> None:
    """Export a quantized checkpoint (model.pt) to an integer-only ONNX model, or with --float a float one."""
    from .io import check_output_path
    from .onnx_builder import lowering_target
    from .pipeline import export_from_checkpoint
    from .plan import Plan

    _configure_logging(verbose, quiet)
    check_output_path(output)
    if export_float:
        from .export import export_float_from_checkpoint

        if plan_path is not None or allow_plan_change:
            raise click.UsageError("--float exports the float model, which has no plan; "
                                   "drop --plan and --allow-plan-change")
        if target != "cpu":
            raise click.UsageError("--target applies to integer exports only; drop it with --float")
        result = export_float_from_checkpoint(checkpoint, output)
        click.echo(f"wrote {result.path} (float, {result.nodes} nodes, {result.bytes / 1024:.1f} KiB)")
        return
    plan = Plan.load(plan_path) if plan_path is not None else None
    try:
        with lowering_target(target):
            result = export_from_checkpoint(checkpoint, output, plan, allow_plan_change)
    except NotImplementedError as error:
        if target != "cuda":
            raise
        click.echo(f"error: the CUDA lowering cannot export this model: {error}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    click.echo(f"wrote {result.path} ({result.nodes} nodes, {result.bytes / 1024:.1f} KiB)")
    if target == "cuda":
        _check_cuda_kernels(result.path)


def _check_cuda_kernels(path: Path) -> None:
    """Exit with code 2, listing the nodes, if onnxruntime's CUDA provider would run any node of `path` on the CPU."""
    import onnx

    from .cuda_kernels import KERNEL_TABLE_COMMIT, find_cuda_fallbacks

    fallbacks = find_cuda_fallbacks(onnx.load(str(path)))
    if not fallbacks:
        click.echo(f"CUDA kernel check passed: every node has a CUDA kernel in onnxruntime's table "
                   f"(commit {KERNEL_TABLE_COMMIT[:12]})")
        return
    click.echo(f"error: {len(fallbacks)} nodes of {path} would run on the CPU under onnxruntime's CUDA provider "
               f"(kernel table at commit {KERNEL_TABLE_COMMIT}):", err=True)
    for fallback in fallbacks:
        click.echo(f"  {fallback.describe()}", err=True)
    click.echo("the model was written anyway; export with --target cpu, or fix the CUDA lowering of these ops",
               err=True)
    sys.exit(EXIT_BAD_INPUT)


@click.command("hnq-eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--imagenet", "--images", "image_dir", type=click.Path(path_type=Path), required=True,
              help="Image folder with one sub-folder per class (the ImageNet validation layout).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Checkpoint holding the PyTorch integer reference (default: the one recorded at export).")
@click.option("--no-reference", is_flag=True, help="Skip the PyTorch reference and the bit-exact check.")
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True, help="Images per batch.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Evaluate only the first N images in folder order (class folders sorted by name), "
                   "so a small N may cover only the first class.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="onnxruntime execution provider; auto takes CUDA where present.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the report as JSON.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@_logging_options
@_report_user_errors
def eval_command(model, image_dir, checkpoint, no_reference, batch_size, limit, provider, json_path, no_progress,
                 verbose, quiet) -> None:
    """Evaluate an HNQ ONNX model on an image folder and check it bit for bit against PyTorch.

    Images are resized and cropped as recorded in the model. Folders named by WordNet id
    (n01440764, ...) get timm's ImageNet-1k class indices. Unreadable images are skipped
    and listed. A float model (hnq-export --float) gets top-1 and top-5 only.
    """
    from .evaluate import evaluate, write_report
    from .io import check_output_path

    _configure_logging(verbose, quiet)
    if json_path is not None:
        check_output_path(json_path)
    reproducer_dir = (json_path if json_path is not None else model).with_suffix(".mismatch")
    report = evaluate(model, image_dir, checkpoint=checkpoint, reference=not no_reference, batch_size=batch_size,
                      limit=limit, provider=provider, progress=not (no_progress or quiet), reproducer_dir=reproducer_dir)
    click.echo(report.table())
    max_listed = 20
    for item in report.skipped[:max_listed]:
        click.echo(f"skipped {item['path']}: {item['reason']}", err=True)
    if len(report.skipped) > max_listed:
        click.echo(f"skipped {len(report.skipped) - max_listed} more images; --json lists them all", err=True)
    if json_path is not None:
        write_report(report, json_path)
        click.echo(f"wrote {json_path}")
    if report.mismatched:
        click.echo(f"error: {report.mismatched} of {report.compared} images differ between ONNX Runtime and the "
                   f"integer reference (first: {report.first_mismatch})", err=True)
        if report.mismatch_site is not None:
            site = report.mismatch_site
            click.echo(f"first differing site: {site['site']} (scheme {site['scheme']}, ONNX node {site['node']}, "
                       f"its {site['where']}): {site['mismatched']} codes differ, largest difference "
                       f"{site['max_difference']}; reproducer in {report.reproducer}", err=True)
        sys.exit(1)


main.add_command(export_command, name="export")
main.add_command(eval_command, name="eval")


if __name__ == "__main__":
    main()

