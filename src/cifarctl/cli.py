"""The `cifarctl` command line: parses options into config dataclasses, calls the core, and hands
the result to `render` (or prints it as JSON).

Heavy modules (torch, numpy, the core) are imported inside the commands so that
`cifarctl --help` answers at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cifarctl import __version__
from cifarctl.config import (
    TTA,
    EvaluateConfig,
    Flip,
    ModelName,
    Normalization,
    PredictConfig,
    Precision,
    Schedule,
    ShowBatchConfig,
    SplitName,
    TrainConfig,
    describe_presets,
)

app = typer.Typer(
    name="cifarctl",
    help="Train, evaluate and use CIFAR-10 image classifiers.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"max_content_width": 100},
)

DataDir = Annotated[
    Optional[Path],
    typer.Option("--data-dir", envvar="CIFARCTL_DATA_DIR", help="Folder holding the dataset cache  \\[default: ./data].",
                 rich_help_panel="Data"),
]
DatasetOpt = Annotated[
    Optional[str],
    typer.Option("--dataset", envvar="CIFARCTL_DATASET", help="A dataset by name: cifar10, cifar100, cifar100-coarse, or "
                 "one imported with `download --name`  \\[default: cifar10].", rich_help_panel="Data"),
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else.",
                                       rich_help_panel="Output")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N or mps  \\[default: auto].",
                                                  rich_help_panel="Devices and scale-out")]
GpuOpt = Annotated[bool, typer.Option("--gpu", help="The same as --device cuda.",
                                      rich_help_panel="Devices and scale-out")]


def _consoles(json_mode: bool = False):
    """(stdout console, console for progress and news): news goes to stderr when stdout carries JSON."""
    from rich.console import Console

    out = Console()
    err = Console(stderr=True)
    return out, (err if json_mode else out)


def _run(fn: Callable[[], Any]) -> Any:
    """Run a command body; every failure becomes one line on stderr and its documented exit code."""
    from cifarctl.errors import CifarctlError, Interrupted
    from cifarctl.render import error_line

    try:
        return fn()
    except Interrupted as err:
        error_line(str(err), "interrupted:")
        raise typer.Exit(err.exit_code) from None
    except CifarctlError as err:
        error_line(str(err))
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        error_line("stopped by Ctrl-C", "interrupted:")
        raise typer.Exit(130) from None
    except MemoryError:
        error_line("out of memory; try a smaller --batch-size")
        raise typer.Exit(1) from None
    except Exception as err:  # a bug of ours: still one line, with a way to get the traceback
        if os.environ.get("CIFARCTL_DEBUG"):
            raise
        error_line(f"unexpected {type(err).__name__}: {err}; rerun with CIFARCTL_DEBUG=1 for a traceback and "
                   "please report it")
        raise typer.Exit(1) from None


def _command(json_out: bool, work: Callable[[Any], Any], render: Callable[[Any, Any], None]) -> Any:
    """The shape every command shares: run the core with a progress reporter, then print the
    result as JSON or render it for a person. Returns the result."""
    out, news = _consoles(json_out)

    def body() -> Any:
        from cifarctl.progress import make_reporter

        return work(make_reporter(news))

    result = _run(body)
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return result  # under torchrun only rank 0 reports
    if json_out:
        from cifarctl.render import print_json

        print_json(result)
    else:
        render(out, result)
    return result


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cifarctl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Train, evaluate and use CIFAR-10 image classifiers."""


@app.command()
def download(
    data_dir: DataDir = None,
    source: Annotated[
        Optional[str],
        typer.Option(
            "--source",
            envvar="CIFARCTL_SOURCE",
            help="URL of a mirror, or a local archive or folder: the official python tarball, or an image folder "
            "laid out train/<class>/* and test/<class>/* (a directory, .tar or .tar.gz).",
        ),
    ] = None,
    md5: Annotated[
        Optional[str], typer.Option("--md5", help="Expected md5 of a source that differs from the official archive.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild the cache even if a valid one exists.")] = False,
    dataset: DatasetOpt = None,
    name: Annotated[Optional[str], typer.Option(
        "--name", help="Import --source as a dataset of this name (the same as --dataset NAME).")] = None,
    test_split: Annotated[float, typer.Option(
        "--test-split", help="For a folder of <class>/ folders without train/ and test/: the share of each class "
        "held out as the test split (seeded, stratified).")] = 0.2,
    image_size: Annotated[Optional[int], typer.Option(
        "--image-size", help="For an image folder: the side of the square images it is stored at, 8 to 512 "
        "(default 32; 64 for Tiny ImageNet). Models train and predict at the size the dataset has.")] = None,
    json_out: JsonOut = False,
) -> None:
    """Fetch and verify a dataset once, and cache it as uint8 tensors in DATA_DIR/<dataset>.safetensors.

    cifar10 (default), cifar100 and cifar100-coarse come from their official archives (or a mirror or local copy with --source). Any image folder becomes a named dataset with --source DIR_OR_TAR --name NAME: train/<class>/* and test/<class>/*, Tiny ImageNet's layout (wnids.txt, words.txt, train/<wnid>/images/, val/), or one <class>/* tree split by --test-split; 2 to 1,000 classes; --image-size 64 keeps 64x64 images. A cache built from another --source is rebuilt from the one given; the old cache is replaced only once the new one is verified.
    """
    from cifarctl import render
    from cifarctl.config import DownloadConfig

    if name is not None and dataset is not None and name != dataset:
        from cifarctl.render import error_line

        error_line(f"--name {name} and --dataset {dataset} disagree; give one of them")
        raise typer.Exit(2)
    cfg = DownloadConfig(force=force, md5=md5, test_split=test_split, image_size=image_size)
    if name is not None or dataset is not None:
        cfg.dataset = name if name is not None else dataset
    if data_dir is not None:
        cfg.data_dir = data_dir
    if source is not None:
        cfg.source = source

    def work(reporter):
        from cifarctl import data

        return data.download(cfg, reporter)

    _command(json_out, work, render.download)


@app.command()
def datasets(data_dir: DataDir = None, json_out: JsonOut = False) -> None:
    """List the datasets cached in DATA_DIR: name, classes, train/test images, source and size on disk."""
    from cifarctl import render

    def work(reporter):
        from cifarctl.config import DownloadConfig
        from cifarctl.data import list_datasets

        return {"data_dir": str(data_dir or DownloadConfig().data_dir),
                "datasets": list_datasets(data_dir or DownloadConfig().data_dir)}

    _command(json_out, work, render.datasets)


_T = TrainConfig  # defaults shown in --help come from the config dataclass itself
_RECIPE = "Model and recipe"
_OUTPUT = "Output"
_SCALE = "Devices and scale-out"


# The options of `train`, one alias each, so that the command reads as its list of options.
_Model = Annotated[Optional[ModelName], typer.Option(
    "--model", "-m", metavar="NAME", help=f"Network to train: tutorial, fast or resnet18  \\[default: {_T.model}].",
    rich_help_panel=_RECIPE)]
_BatchSize = Annotated[Optional[int], typer.Option(
    "--batch-size", "-b", min=1, metavar="N", help=f"Images per step  \\[default: {_T.batch_size}].",
    rich_help_panel=_RECIPE)]
_Epochs = Annotated[Optional[int], typer.Option(
    min=1, metavar="N", help=f"Passes over the training set  \\[default: {_T.epochs}].", rich_help_panel=_RECIPE)]
_Lr = Annotated[Optional[float], typer.Option(
    "--lr", help=f"Learning rate  \\[default: {_T.lr}].", rich_help_panel=_RECIPE)]
_Momentum = Annotated[Optional[float], typer.Option(
    help=f"SGD momentum  \\[default: {_T.momentum}].", rich_help_panel=_RECIPE)]
_WeightDecay = Annotated[Optional[float], typer.Option(
    "--weight-decay", help=f"L2 weight decay  \\[default: {_T.weight_decay}].", rich_help_panel=_RECIPE)]
_BiasLrScale = Annotated[Optional[float], typer.Option(
    "--bias-lr-scale", help="Learning-rate multiplier for biases and BatchNorm shifts  "
    f"\\[default: {_T.bias_lr_scale}].", rich_help_panel=_RECIPE)]
_Seed = Annotated[Optional[int], typer.Option(
    help="Random seed  \\[default: a fresh one, recorded in the run].", rich_help_panel=_RECIPE)]
_Deterministic = Annotated[Optional[bool], typer.Option(
    "--deterministic", help="Use deterministic kernels only.", rich_help_panel=_SCALE)]
_LogEvery = Annotated[Optional[int], typer.Option(
    "--log-every", min=1, metavar="N", help=f"Steps between loss lines  \\[default: {_T.log_every}].",
    rich_help_panel=_OUTPUT)]
_Nesterov = Annotated[Optional[bool], typer.Option(
    "--nesterov/--no-nesterov", help="Nesterov momentum.", rich_help_panel=_RECIPE)]
_LabelSmoothing = Annotated[Optional[float], typer.Option(
    "--label-smoothing", help="Label smoothing of the loss.", rich_help_panel=_RECIPE)]
_Schedule = Annotated[Optional[Schedule], typer.Option(
    metavar="NAME", help="Learning-rate schedule: constant, or onecycle (warm-up, linear decay).",
    rich_help_panel=_RECIPE)]
_WarmupEpochs = Annotated[Optional[float], typer.Option(
    "--warmup-epochs", help="Warm-up length.", rich_help_panel=_RECIPE)]
_Flip = Annotated[Optional[Flip], typer.Option(
    metavar="MODE", help="Horizontal flips: none, random, alternate.", rich_help_panel=_RECIPE)]
_CropPad = Annotated[Optional[int], typer.Option(
    "--crop-pad", min=0, metavar="PX", help="Random crops: translate up to N px (reflect pad).", rich_help_panel=_RECIPE)]
_Cutout = Annotated[Optional[int], typer.Option(
    min=0, metavar="PX", help="Cutout square side in px (0: off).", rich_help_panel=_RECIPE)]
_Lookahead = Annotated[Optional[bool], typer.Option(
    "--lookahead/--no-lookahead", help="Average the weights every 5 steps, more strongly late in the run; the "
    "final weights are the average.", rich_help_panel=_RECIPE)]
_Width = Annotated[Optional[str], typer.Option(
    help="Channel widths of --model fast, e.g. 32,96,192.", rich_help_panel=_RECIPE)]
_Precision = Annotated[Optional[Precision], typer.Option(
    metavar="NAME", help="fp32, or bf16 autocast.", rich_help_panel=_SCALE)]
_ChannelsLast = Annotated[Optional[bool], typer.Option(
    "--channels-last/--no-channels-last", help="NHWC memory layout.", rich_help_panel=_SCALE)]
_CompileModel = Annotated[Optional[bool], typer.Option(
    "--compile/--no-compile", help="torch.compile the model (slow to start).", rich_help_panel=_SCALE)]
_Tta = Annotated[Optional[TTA], typer.Option(
    metavar="MODE", help="Test-time augmentation: none, flip, flip-translate.", rich_help_panel=_RECIPE)]
_Normalization = Annotated[Optional[Normalization], typer.Option(
    metavar="NAME", help="tutorial ([-1, 1]) or dataset (CIFAR-10 mean/std).", rich_help_panel=_RECIPE)]
_OutputDir = Annotated[Optional[Path], typer.Option(
    "--output-dir", "-o", help="Run directory  \\[default: runs/<model>-<timestamp>].",
    rich_help_panel=_OUTPUT)]
_Overwrite = Annotated[bool, typer.Option(
    "--overwrite", help="Let -o name a folder that already holds a run, and replace that run.",
    rich_help_panel=_OUTPUT)]
_Resume = Annotated[Optional[Path], typer.Option(
    "--resume", help="Continue the run in this directory (or runs/latest) where it stopped.",
    rich_help_panel=_OUTPUT)]
_Nproc = Annotated[Optional[int], typer.Option(
    "--nproc", min=1, metavar="N", help="Train data-parallel in N processes (torch.distributed.run; NCCL on CUDA, gloo on "
    "CPU). The global batch is --batch-size x N.", rich_help_panel=_SCALE)]
_DistTimeout = Annotated[Optional[float], typer.Option(
    "--dist-timeout", help="Seconds to wait for another process before failing  \\[default: 60].",
    rich_help_panel=_SCALE)]
_ValSplit = Annotated[Optional[float], typer.Option(
    "--val-split", help="Hold out this share of each training class for validation; each epoch then reports "
    "validation accuracy, best.safetensors keeps the best epoch, and the test set is scored once at the end  "
    "\\[default: 0].", rich_help_panel="Data")]
_EvalEvery = Annotated[Optional[int], typer.Option(
    "--eval-every", min=0, metavar="N", help="Score the test set every N epochs; 0: only at the end (the final "
    "epoch is always scored)  \\[default: 1].", rich_help_panel=_OUTPUT)]
_Budget = Annotated[Optional[float], typer.Option(
    "--budget", metavar="SECONDS", help="Fit the run to this many seconds, start to exit: epochs and width (for "
    "fast also batch size, lr and TTA) are planned from a few timed steps, the schedule is set for that length, "
    "and a slow-down shortens the end. Not with the options it plans. fast and resnet18.", rich_help_panel=_RECIPE)]
_Patience = Annotated[Optional[int], typer.Option(
    "--patience", min=1, metavar="N", help="Stop after N epochs without a better validation accuracy (needs "
    "--val-split).", rich_help_panel=_RECIPE)]


@app.command(epilog="Recipes per model (every option above overrides them):\n\n" + describe_presets())
def train(
    model: _Model = None,
    batch_size: _BatchSize = None,
    epochs: _Epochs = None,
    lr: _Lr = None,
    momentum: _Momentum = None,
    weight_decay: _WeightDecay = None,
    bias_lr_scale: _BiasLrScale = None,
    seed: _Seed = None,
    deterministic: _Deterministic = None,
    log_every: _LogEvery = None,
    nesterov: _Nesterov = None,
    label_smoothing: _LabelSmoothing = None,
    schedule: _Schedule = None,
    warmup_epochs: _WarmupEpochs = None,
    flip: _Flip = None,
    crop_pad: _CropPad = None,
    cutout: _Cutout = None,
    lookahead: _Lookahead = None,
    width: _Width = None,
    precision: _Precision = None,
    channels_last: _ChannelsLast = None,
    compile_model: _CompileModel = None,
    tta: _Tta = None,
    normalization: _Normalization = None,
    output_dir: _OutputDir = None,
    overwrite: _Overwrite = False,
    resume: _Resume = None,
    device: DeviceOpt = None,
    gpu: GpuOpt = False,
    nproc: _Nproc = None,
    dist_timeout: _DistTimeout = None,
    dataset: DatasetOpt = None,
    val_split: _ValSplit = None,
    patience: _Patience = None,
    eval_every: _EvalEvery = None,
    budget: _Budget = None,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
) -> None:
    """Train a model; the defaults are the PyTorch tutorial's recipe (batch 4, SGD lr 0.001 momentum 0.9, 2 epochs).

    Writes weights.safetensors, metrics.csv, config.json, curves.png and a checkpoint to the run directory, and points runs/latest at it once it has weights. Ctrl-C or SIGTERM saves a checkpoint; --resume continues. Options given with --resume override the saved run's settings (e.g. more --epochs).
    """
    given = dict(locals())  # every option above; those not given are None
    given.update(device=_device(device, gpu), compile=compile_model, overwrite=overwrite or None)
    overrides = {k: given[k] for k in TrainConfig.__dataclass_fields__ if given.get(k) is not None}
    overrides = {k: (v.value if hasattr(v, "value") else v) for k, v in overrides.items()}
    if nproc is not None and "WORLD_SIZE" not in os.environ:
        _launch_distributed(nproc, resume, overrides)

    def work(reporter):
        from cifarctl.train import train as train_run

        import time

        from cifarctl.budget import process_age_s

        started = time.perf_counter() - process_age_s()  # --budget counts from the moment the user pressed Enter
        return train_run(_train_config(resume, overrides), reporter, resume=resume, overrides=overrides,
                         started=started)

    from cifarctl import render

    _command(json_out, work, render.train)


def _train_config(resume: Optional[Path], overrides: dict[str, Any]) -> TrainConfig:
    """The preset of the chosen model with the options given applied (with --resume the saved
    config is the base instead, and `overrides` are applied to it by the core)."""
    from cifarctl.config import train_config

    if resume is not None:
        return train_config()
    values = dict(overrides)
    return train_config(values.pop("model", TrainConfig.model), **values)


def _launch_distributed(nproc: int, resume: Optional[Path], overrides: dict[str, Any]) -> None:
    """Check the options once, as a single process would, then relaunch under torchrun; exits."""
    import sys

    from cifarctl import distributed

    def preflight() -> list[str]:
        from cifarctl.train import preflight as check

        seed = check(_train_config(resume, overrides), resume, overrides, nproc)
        # Every rank must draw the same shuffle: they all get the seed chosen here.
        return distributed.relaunch_argv(sys.argv[1:], seed if "seed" not in overrides and resume is None else None)

    argv = _run(preflight)
    raise typer.Exit(_run(lambda: distributed.launch(nproc, argv)))


def _device(device: Optional[str], gpu: bool) -> Optional[str]:
    """--device with --gpu folded in (None: neither given)."""
    if gpu:
        if device is not None and not str(device).startswith("cuda"):
            from cifarctl.render import error_line

            error_line(f"--gpu conflicts with --device {device}")
            raise typer.Exit(2)
        return device or "cuda"
    return device


_E, _P, _S = EvaluateConfig, PredictConfig, ShowBatchConfig  # defaults shown in --help come from the config


@app.command()
def evaluate(
    weights: Annotated[Path, typer.Argument(
        help="A weights file written by `cifarctl train`, or a run directory.")] = _E.weights,
    per_class: Annotated[bool, typer.Option(
        "--per-class", help="Also show correct/total and accuracy per class.")] = False,
    confusion: Annotated[bool, typer.Option(
        "--confusion", help="Also show the confusion matrix, and write it to confusion.png.")] = False,
    split: Annotated[SplitName, typer.Option("--split", help="The images to score.")] = SplitName.test,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", "-b", min=1, max=1 << 16, show_default=False,
        help="Images per forward pass  \\[default: 128 on a CPU, 1000 on a GPU].")] = _E.batch_size,
    device: DeviceOpt = None,
    gpu: GpuOpt = False,
    output_dir: Annotated[Optional[Path], typer.Option(
        "--output-dir", "-o", help="Where confusion.png goes  \\[default: the weights file's folder].")] = None,
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", envvar="CIFARCTL_DATASET", help="The dataset to score on; it must be the one the weights were "
        "trained on  \\[default: the weights' own].")] = None,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
) -> None:
    """Score a weights file on the test set: top-1 and top-3 accuracy and the mean loss.

    The model is rebuilt from the file's metadata alone. The dataset is downloaded first when missing. A bad weights file (not safetensors, truncated, not written by cifarctl, not matching its model) is refused with one line and exit 2, before the dataset is read or anything is written.
    """
    from cifarctl import render

    cfg = EvaluateConfig(weights=weights, split=split.value, batch_size=batch_size,
                         device=_device(device, gpu) or "auto", confusion=confusion, output_dir=output_dir,
                         dataset=dataset)
    if data_dir is not None:
        cfg.data_dir = data_dir

    def work(reporter):
        from cifarctl.evaluation import evaluate_file

        return evaluate_file(cfg, reporter)

    _command(json_out, work, lambda out, s: render.evaluate(out, s, per_class, confusion))


@app.command()
def predict(
    paths: Annotated[list[str], typer.Argument(
        help="Image files, folders (searched recursively) or quoted globs such as 'photos/**/*.jpg'.",
        show_default=False)],
    weights: Annotated[Path, typer.Option(
        "--weights", "-w", help="A weights file written by `cifarctl train`, or a run directory.")] = _P.weights,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Classes listed per image.")] = _P.top_k,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", "-b", min=1, max=1 << 16, help="Images decoded and classified together.")] = _P.batch_size,
    device: DeviceOpt = None,
    gpu: GpuOpt = False,
    json_out: JsonOut = False,
) -> None:
    """Classify image files: PNG, JPEG, BMP, GIF (first frame), WebP, TIFF.

    Each image is prepared like the training images: EXIF orientation applied; palette, greyscale and CMYK converted to RGB; transparency composited on white; 16-bit images scaled (not clipped) to 8 bits; centre-cropped to a square and resized to 32x32 with antialiasing (Lanczos); then normalised with the mean and std stored in the weights file.

    A path that gives no image (missing, a folder without images, not an image or not a regular file, truncated, or declaring over 100 megapixels, which is refused from its header before decoding) gets an error line; the other files are still classified, and the exit code is 1.
    """
    from cifarctl import render

    cfg = PredictConfig(paths=list(paths), weights=weights, top_k=top_k, batch_size=batch_size,
                        device=_device(device, gpu) or "auto")

    def work(reporter):
        from cifarctl.prediction import predict_files

        return predict_files(cfg, reporter)

    def show(out, summary):
        if summary["results"]:
            render.predict(out, summary)

    summary = _command(json_out, work, show)
    render.path_errors(summary["errors"])
    if summary["errors"]:
        raise typer.Exit(1)


@app.command("show-batch")
def show_batch(
    split: Annotated[SplitName, typer.Option("--split", help="The images to draw from.")] = SplitName.train,
    n: Annotated[int, typer.Option("-n", "--count", min=1, max=1024, help="How many images.")] = _S.n,
    seed: Annotated[Optional[int], typer.Option(
        min=0, help="Random seed  \\[default: a fresh one, printed so the batch can be shown again].")] = None,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Where to write the grid PNG.")] = _S.out,
    weights: Annotated[Optional[Path], typer.Option(
        "--weights", "-w", help="Also show the class this weights file (or run directory) predicts; wrong ones "
        "in red.")] = None,
    scale: Annotated[int, typer.Option(min=1, max=16, help="Magnification of each image in the PNG.")] = _S.scale,
    no_preview: Annotated[bool, typer.Option("--no-preview", help="Do not draw the images in the terminal.")] = False,
    dataset: DatasetOpt = None,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
) -> None:
    """Show a random batch of images with their classes, like the tutorial's imshow.

    Writes a labelled grid PNG (each image magnified, its class under it; with --weights the predicted and true class, wrong ones in red) and prints the labels. On a terminal the images are also drawn in place, each with its label: in full resolution where the terminal speaks a graphics protocol (Kitty, Sixel), else as truecolor half blocks (32x16 cells per image). Not on a terminal, or with --no-preview or --json, nothing but text is printed.
    """
    from cifarctl import render

    cfg = ShowBatchConfig(split=split.value, n=n, seed=seed, out=out_path, weights=weights, scale=scale)
    if dataset is not None:
        cfg.dataset = dataset
    if data_dir is not None:
        cfg.data_dir = data_dir

    def work(reporter):
        from cifarctl.grid import show_batch as run_show_batch

        return run_show_batch(cfg, reporter)

    def show(out, batch):
        if out.is_terminal and not no_preview:
            from cifarctl.errors import CifarctlError
            from cifarctl.grid import preview_text

            try:
                out.file.write(preview_text(batch, out.width, out.color_system))
            except CifarctlError as err:
                render.dim_line(out, str(err))
        render.show_batch(out, batch.summary)

    _command(json_out, (lambda reporter: work(reporter).summary) if json_out else work, show)


@app.command()
def export(
    weights: Annotated[Path, typer.Argument(
        help="A weights file written by `cifarctl train`, a run directory, or pretrained.")] = _E.weights,
    fmt: Annotated[str, typer.Option(
        "--format", "-f", metavar="FORMAT", help="onnx (run with onnxruntime, no torch) or pt2 (torch.export).")] = "onnx",
    out: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="The file to write  \\[default: beside the weights, WEIGHTS.onnx or .pt2].")] = None,
    tta: Annotated[bool, typer.Option(
        "--tta", help="Bake the weights' test-time augmentation into the graph (costs a forward pass per view).")] = False,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
) -> None:
    """Export a model to ONNX or torch.export (pt2), with its mean/std inside: feed float32 RGB in [0, 1], NCHW, 32x32; get logits.

    Every export is checked before it is written: the file is run on up to 1,000 test images (onnxruntime for ONNX, torch.export.load for pt2) and compared with the PyTorch model; a disagreement beyond float tolerance writes nothing and exits 1. ONNX needs the export extra: pip install 'cifarctl\\[export]'.
    """
    from cifarctl import render

    def work(reporter):
        from cifarctl.export import export_file

        return export_file(weights, fmt, out, tta, data_dir, reporter)

    def show(console, s):
        check = s["verify"]
        render.say(console, f"wrote {s['out']} ({s['format']}, {s['bytes']:,} bytes, {s['model']} model, "
                   f"TTA {s['tta']}) in {s['export_s']:.1f} s")
        render.say(console, f"verified on {check['images']:,} test images: top-1 agreement "
                   f"{100 * check['top1_agreement']:.1f}%, max logit difference {check['max_logit_diff']:.2g}")

    _command(json_out, work, show)


def main() -> None:
    """Entry point of the `cifarctl` console script: usage errors (a bad option value, a missing
    argument) are one line on stderr and exit 2, like every other failure."""
    from cifarctl.render import error_line

    try:
        code = app(standalone_mode=False)
    except Exception as err:
        if type(err).__name__ == "Abort":  # Ctrl-C at a prompt or during parsing
            error_line("stopped by Ctrl-C", "interrupted:")
            _exit(130)
        if not (hasattr(err, "format_message") and hasattr(err, "exit_code")):
            raise
        ctx = getattr(err, "ctx", None)
        hint = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
        error_line(f"{err.format_message().rstrip('.')}{hint}")
        _exit(err.exit_code)
    _exit(code if isinstance(code, int) else 0)


def _exit(code: int) -> None:
    """Exit with `code`. A process that has loaded torch skips the interpreter's teardown, which
    spends most of a second unloading torch's CUDA build here after every command: the atexit
    handlers run and the streams are flushed first, and only when no other Python thread is left."""
    import sys
    import threading

    if "torch" in sys.modules and threading.active_count() == 1:
        import atexit
        import contextlib

        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    sys.exit(code)
