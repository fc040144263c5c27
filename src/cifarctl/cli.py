"""The `cifarctl` command line: parses options, calls the core, renders results.

Heavy modules (torch, numpy, the core) are imported inside the commands so that
`cifarctl --help` answers at once.
"""

from __future__ import annotations

import json
import os
import sys
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
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

DataDir = Annotated[
    Optional[Path],
    typer.Option("--data-dir", envvar="CIFARCTL_DATA_DIR", help="Folder holding the dataset cache  \\[default: ./data]."),
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else.")]


def _consoles(json_mode: bool = False):
    """(stdout console, console for progress and news): news goes to stderr when stdout carries JSON."""
    from rich.console import Console

    out = Console()
    err = Console(stderr=True)
    return out, (err if json_mode else out)


def _fail(message: str, code: int) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _run(fn: Callable[[], Any]) -> Any:
    """Run a command body, turning CifarctlError into one line on stderr and its exit code."""
    from cifarctl.errors import CifarctlError

    try:
        return fn()
    except CifarctlError as err:
        _fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


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
    json_out: JsonOut = False,
) -> None:
    """Fetch and verify CIFAR-10 once, and cache it as uint8 tensors in DATA_DIR/cifar10.safetensors."""
    from cifarctl import data
    from cifarctl.config import DownloadConfig
    from cifarctl.progress import make_reporter

    cfg = DownloadConfig(force=force, md5=md5)
    if data_dir is not None:
        cfg.data_dir = data_dir
    if source is not None:
        cfg.source = source
    out, news = _consoles(json_out)
    summary = _run(lambda: data.download(cfg, make_reporter(news)))
    if json_out:
        _print_json(summary)
        return
    _render_download(out, summary)


def _render_download(console, summary: dict[str, Any]) -> None:
    from rich.table import Table

    splits = summary["splits"]
    table = Table(title="CIFAR-10 dataset cache", title_justify="left")
    table.add_column("class")
    for name in splits:
        table.add_column(name, justify="right")
    for cls in summary["class_names"]:
        table.add_row(cls, *(f"{s['per_class'][cls]:,}" for s in splits.values()))
    table.add_section()
    table.add_row("[bold]images[/]", *(f"[bold]{s['images']:,}[/]" for s in splits.values()))
    console.print(table)
    if summary["status"] == "cached":
        console.print(f"already downloaded and verified: {summary['cache']}", highlight=False)
    else:
        console.print(f"cached at {summary['cache']}", highlight=False)
    if summary["converted"]:
        console.print(f"{summary['converted']:,} images were not 32x32 RGB and were converted and resized")
    if summary["skipped"]:
        console.print(f"[yellow]skipped {len(summary['skipped'])} unreadable files:[/]")
        for item in summary["skipped"][:20]:
            console.print(f"  {item['path']}: {item['error']}", highlight=False)
        if len(summary["skipped"]) > 20:
            console.print(f"  ... and {len(summary['skipped']) - 20} more (see --json)")


_T = TrainConfig  # defaults shown in --help come from the config dataclass itself
DeviceOpt = Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N or mps  \\[default: auto].")]
GpuOpt = Annotated[bool, typer.Option("--gpu", help="The same as --device cuda.")]


def _device(device: Optional[str], gpu: bool) -> str:
    """--device with --gpu folded in."""
    if gpu:
        if device not in (None, "cuda") and not str(device).startswith("cuda"):
            _fail("--gpu conflicts with --device " + str(device), 2)
        return device or "cuda"
    return device or "auto"



@app.command(epilog="Recipes per model (every option above overrides them):\n\n" + describe_presets())
def train(
    model: Annotated[
        Optional[ModelName], typer.Option("--model", "-m", help=f"Network to train  \\[default: {_T.model}].")
    ] = None,
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", "-b", min=1, help=f"Images per step  \\[default: {_T.batch_size}].")
    ] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help=f"Passes over the training set  \\[default: {_T.epochs}].")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help=f"Learning rate  \\[default: {_T.lr}].")] = None,
    momentum: Annotated[Optional[float], typer.Option(help=f"SGD momentum  \\[default: {_T.momentum}].")] = None,
    weight_decay: Annotated[
        Optional[float], typer.Option("--weight-decay", help=f"L2 weight decay  \\[default: {_T.weight_decay}].")
    ] = None,
    bias_lr_scale: Annotated[
        Optional[float], typer.Option("--bias-lr-scale", min=0.0, help="Learning-rate multiplier for biases and "
                                      f"BatchNorm shifts  \\[default: {_T.bias_lr_scale}].")
    ] = None,
    device: DeviceOpt = None,
    gpu: GpuOpt = False,
    seed: Annotated[Optional[int], typer.Option(help="Random seed  \\[default: a fresh one, recorded in the run].")] = None,
    deterministic: Annotated[
        Optional[bool], typer.Option("--deterministic", help="Use deterministic kernels only.")
    ] = None,
    log_every: Annotated[
        Optional[int], typer.Option("--log-every", min=1, help=f"Steps between loss lines  \\[default: {_T.log_every}].")
    ] = None,
    nesterov: Annotated[Optional[bool], typer.Option("--nesterov/--no-nesterov", help="Nesterov momentum.")] = None,
    label_smoothing: Annotated[
        Optional[float], typer.Option("--label-smoothing", min=0.0, max=1.0, help="Label smoothing of the loss.")
    ] = None,
    schedule: Annotated[
        Optional[Schedule], typer.Option(help="Learning-rate schedule: constant, or onecycle (warm-up, linear decay).")
    ] = None,
    warmup_epochs: Annotated[Optional[float], typer.Option("--warmup-epochs", min=0.0, help="Warm-up length.")] = None,
    flip: Annotated[Optional[Flip], typer.Option(help="Horizontal flips: none, random, alternate.")] = None,
    crop_pad: Annotated[
        Optional[int], typer.Option("--crop-pad", min=0, help="Random crops: translate up to N px (reflect pad).")
    ] = None,
    cutout: Annotated[Optional[int], typer.Option(min=0, help="Cutout square side in px (0: off).")] = None,
    lookahead: Annotated[
        Optional[bool], typer.Option("--lookahead/--no-lookahead", help="Average the weights every 5 steps, more "
                                     "strongly late in the run; the final weights are the average.")
    ] = None,
    width: Annotated[Optional[str], typer.Option(help="Channel widths of --model fast, e.g. 32,96,192.")] = None,
    precision: Annotated[Optional[Precision], typer.Option(help="fp32, or bf16 autocast.")] = None,
    channels_last: Annotated[
        Optional[bool], typer.Option("--channels-last/--no-channels-last", help="NHWC memory layout.")
    ] = None,
    compile_model: Annotated[
        Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the model (slow to start).")
    ] = None,
    tta: Annotated[Optional[TTA], typer.Option(help="Test-time augmentation: none, flip, flip-translate.")] = None,
    normalization: Annotated[
        Optional[Normalization], typer.Option(help="tutorial ([-1, 1]) or dataset (CIFAR-10 mean/std).")
    ] = None,
    output_dir: Annotated[
        Optional[Path], typer.Option("--output-dir", "-o", help="Run directory  \\[default: runs/<model>-<timestamp>].")
    ] = None,
    resume: Annotated[
        Optional[Path], typer.Option("--resume", help="Continue the run in this directory where it stopped.")
    ] = None,
    nproc: Annotated[
        Optional[int],
        typer.Option("--nproc", min=1, help="Train data-parallel in N processes (torch.distributed.run; NCCL on CUDA, "
                     "gloo on CPU). The global batch is --batch-size x N."),
    ] = None,
    dist_timeout: Annotated[
        Optional[float], typer.Option("--dist-timeout", min=1.0, help="Seconds to wait for another process "
                                      "before failing  \\[default: 60].")
    ] = None,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
) -> None:
    """Train a model; the defaults are the PyTorch tutorial's recipe (batch 4, SGD lr 0.001 momentum 0.9, 2 epochs).

    Writes weights.safetensors, metrics.csv, config.json, curves.png and a checkpoint to the run directory, and points runs/latest at it. Ctrl-C or SIGTERM saves a checkpoint; --resume continues. Options given with --resume override the saved run's settings (e.g. more --epochs).
    """
    from cifarctl.config import train_config

    if gpu or device is not None:
        device = _device(device, gpu)
    overrides = dict(batch_size=batch_size, epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                     bias_lr_scale=bias_lr_scale,
                     device=device, seed=seed, deterministic=deterministic, log_every=log_every,
                     nesterov=nesterov, label_smoothing=label_smoothing, warmup_epochs=warmup_epochs,
                     crop_pad=crop_pad, cutout=cutout, lookahead=lookahead, width=width, channels_last=channels_last,
                     compile=compile_model, dist_timeout=dist_timeout, output_dir=output_dir, data_dir=data_dir)
    for key, choice in (("schedule", schedule), ("flip", flip), ("precision", precision), ("tta", tta),
                        ("normalization", normalization)):
        if choice is not None:
            overrides[key] = choice.value
    if model is not None:
        overrides["model"] = model.value
    if nproc is not None and "WORLD_SIZE" not in os.environ:
        from cifarctl.distributed import launch

        raise typer.Exit(_run(lambda: launch(nproc, _argv_without("--nproc"))))
    out, news = _consoles(json_out)

    def run() -> dict[str, Any]:
        from cifarctl.progress import make_reporter
        from cifarctl.train import train as train_run

        reporter = make_reporter(news)
        if resume is not None:
            return train_run(train_config(), reporter, resume=resume, overrides=overrides)
        name = overrides.pop("model", None) or TrainConfig.model
        return train_run(train_config(name, **overrides), reporter)

    summary = _run(run)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun only rank 0 reports
    if json_out:
        _print_json(summary)
        return
    _render_train(out, summary)


def _argv_without(option: str) -> list[str]:
    """This process's arguments minus `option` and its value (for relaunching under torchrun)."""
    args, out, skip = sys.argv[1:], [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def _render_train(console, s: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"trained {s['model']}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("test accuracy", f"{100 * s['test_accuracy']:.2f}%")
    table.add_row("time", f"{s['time_s']:.1f} s")
    if s["images_per_s"]:
        table.add_row("images/s", f"{s['images_per_s']:,.0f}")
    table.add_row("device", s["device"])
    table.add_row("seed", str(s["seed"]))
    for name, path in s["files"].items():
        table.add_row(name, path)
    console.print(table)


_E, _P, _S = EvaluateConfig, PredictConfig, ShowBatchConfig  # defaults shown in --help come from the config


@app.command()
def evaluate(
    weights: Annotated[Path, typer.Argument(help="A weights file written by `cifarctl train`.")] = _E.weights,
    per_class: Annotated[
        bool, typer.Option("--per-class", help="Also show correct/total and accuracy per class.")
    ] = False,
    confusion: Annotated[
        bool, typer.Option("--confusion", help="Also show the confusion matrix, and write it to confusion.png.")
    ] = False,
    split: Annotated[SplitName, typer.Option("--split", help="The images to score.")] = SplitName.test,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")
    ] = _E.batch_size,
    device: DeviceOpt = None,
    gpu: GpuOpt = False,
    output_dir: Annotated[
        Optional[Path],
        typer.Option("--output-dir", "-o", help="Where confusion.png goes  \\[default: the weights file's folder]."),
    ] = None,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
) -> None:
    """Score a weights file on the test set: top-1 and top-3 accuracy and the mean loss.

    The model is rebuilt from the file's metadata alone. The dataset is downloaded first when missing. A bad weights file (not safetensors, truncated, not written by cifarctl, not matching its model) is refused with one line and exit 2, before the dataset is read or anything is written.
    """
    from cifarctl.config import EvaluateConfig

    cfg = EvaluateConfig(weights=weights, split=split.value, batch_size=batch_size, device=_device(device, gpu),
                         confusion=confusion, output_dir=output_dir)
    if data_dir is not None:
        cfg.data_dir = data_dir
    out, news = _consoles(json_out)

    def run() -> dict[str, Any]:
        from cifarctl.evaluation import evaluate_file
        from cifarctl.progress import make_reporter

        return evaluate_file(cfg, make_reporter(news))

    summary = _run(run)
    if json_out:
        _print_json(summary)
        return
    _render_evaluate(out, summary, per_class, confusion)


def _render_evaluate(console, s: dict[str, Any], per_class: bool, confusion: bool) -> None:
    from rich.table import Table

    table = Table(title=f"{s['model']} on {s['split']}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("top-1 accuracy", f"{100 * s['accuracy']:.2f}%  ({s['correct']:,} of {s['images']:,})")
    table.add_row("top-3 accuracy", f"{100 * s['top3_accuracy']:.2f}%")
    table.add_row("mean loss", f"{s['loss']:.4f}")
    table.add_row("time", f"{s['time_s']:.2f} s  ({s['images_per_s']:,.0f} images/s on {s['device']})")
    table.add_row("weights", s["weights"])
    console.print(table)
    if per_class:
        pc = Table(title="per class", title_justify="left")
        pc.add_column("class")
        pc.add_column("correct / total", justify="right")
        pc.add_column("accuracy", justify="right")
        for row in s["per_class"]:
            pc.add_row(row["class"], f"{row['correct']:,} / {row['total']:,}", f"{100 * row['accuracy']:.1f}%")
        console.print(pc)
    if confusion:
        console.print(_confusion_table(s["confusion"], s["class_names"]))
        console.print(f"confusion matrix drawn in {s['files']['confusion_png']}", highlight=False)


def _confusion_table(matrix: list[list[int]], class_names: list[str]):
    from rich import box
    from rich.table import Table

    from cifarctl.data import ALIASES

    short = {full: alias for alias, full in ALIASES.items()}  # the tutorial's "plane" and "car" fit the columns
    names = [short.get(n, n[:6]) for n in class_names]
    off = sorted(((count, t, p) for t, row in enumerate(matrix) for p, count in enumerate(row) if t != p and count),
                 reverse=True)
    worst = {(t, p) for _, t, p in off[:5]}  # the five largest confusions stand out
    # Left padding only and no vertical rules: 10 columns of 4-digit counts fit 80 characters.
    table = Table(title="confusion matrix: rows true, columns predicted", title_justify="left",
                  box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1), pad_edge=False)
    table.add_column("", no_wrap=True)
    for name in names:
        table.add_column(name, justify="right", no_wrap=True)
    for t, row in enumerate(matrix):
        cells = []
        for p, count in enumerate(row):
            style = "bold green" if t == p else "bold red" if (t, p) in worst else "dim" if not count else ""
            cells.append(f"[{style}]{count}[/]" if style else str(count))
        table.add_row(names[t], *cells)
    return table


@app.command()
def predict(
    paths: Annotated[
        list[str],
        typer.Argument(help="Image files, folders (searched recursively) or quoted globs such as 'photos/**/*.jpg'.",
                       show_default=False),
    ],
    weights: Annotated[
        Path, typer.Option("--weights", "-w", help="A weights file written by `cifarctl train`.")
    ] = _P.weights,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Classes listed per image.")] = _P.top_k,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", min=1, help="Images decoded and classified together.")
    ] = _P.batch_size,
    device: DeviceOpt = None,
    gpu: GpuOpt = False,
    json_out: JsonOut = False,
) -> None:
    """Classify image files: PNG, JPEG, BMP, GIF (first frame), WebP, TIFF.

    Each image is prepared like the training images: EXIF orientation applied; palette, greyscale and CMYK converted to RGB; transparency composited on white; 16-bit images scaled (not clipped) to 8 bits; centre-cropped to a square and resized to 32x32 with antialiasing (Lanczos); then normalised with the mean and std stored in the weights file.

    A path that gives no image (missing, a folder without images, not an image, truncated, or declaring over 100 megapixels, which is refused from its header before decoding) gets an error line; the other files are still classified, and the exit code is 1.
    """
    from cifarctl.config import PredictConfig

    cfg = PredictConfig(paths=list(paths), weights=weights, top_k=top_k, batch_size=batch_size,
                        device=_device(device, gpu))
    out, news = _consoles(json_out)

    def run() -> dict[str, Any]:
        from cifarctl.prediction import predict_files
        from cifarctl.progress import make_reporter

        return predict_files(cfg, make_reporter(news))

    summary = _run(run)
    if json_out:
        _print_json(summary)
    elif summary["results"]:
        _render_predict(out, summary)
    _print_errors(summary["errors"])
    if summary["errors"]:
        raise typer.Exit(1)


def _render_predict(console, s: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"{len(s['results']):,} images, {s['model']} model", title_justify="left")
    table.add_column("file", overflow="fold")
    table.add_column("class", style="bold")
    table.add_column("probability", justify="right")
    if s["top_k"] > 1:
        table.add_column(f"next {s['top_k'] - 1}")
    for r in s["results"]:
        others = "  ".join(f"{o['class']} {100 * o['probability']:.1f}%" for o in r["top_k"][1:])
        table.add_row(r["path"], r["class"], f"{100 * r['probability']:.1f}%", *([others] if s["top_k"] > 1 else []))
    console.print(table)


def _print_errors(errors: list[dict[str, str]]) -> None:
    """One line on stderr per path that produced no result."""
    from rich.console import Console
    from rich.markup import escape

    err = Console(stderr=True)
    for e in errors:
        err.print(f"[bold red]error:[/] {escape(e['path'])}: {escape(e['error'])}", highlight=False, soft_wrap=True)


@app.command("show-batch")
def show_batch(
    split: Annotated[SplitName, typer.Option("--split", help="The images to draw from.")] = SplitName.train,
    n: Annotated[int, typer.Option("-n", "--count", min=1, max=1024, help="How many images.")] = _S.n,
    seed: Annotated[
        Optional[int],
        typer.Option(help="Random seed  \\[default: a fresh one, printed so the batch can be shown again]."),
    ] = None,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Where to write the grid PNG.")] = _S.out,
    weights: Annotated[
        Optional[Path],
        typer.Option("--weights", "-w", help="Also show the class this weights file predicts; wrong ones in red."),
    ] = None,
    scale: Annotated[int, typer.Option(min=1, max=16, help="Magnification of each image in the PNG.")] = _S.scale,
    no_preview: Annotated[bool, typer.Option("--no-preview", help="Do not draw the images in the terminal.")] = False,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
) -> None:
    """Show a random batch of images with their classes, like the tutorial's imshow.

    Writes a labelled grid PNG (each image magnified, its class under it; with --weights the predicted and true class, wrong ones in red) and prints the labels. On a terminal the images are also drawn in place, each with its label: in full resolution where the terminal speaks a graphics protocol (Kitty, Sixel), else as truecolor half blocks (32x16 cells per image). Not on a terminal, or with --no-preview or --json, nothing but text is printed.
    """
    from cifarctl.config import ShowBatchConfig

    cfg = ShowBatchConfig(split=split.value, n=n, seed=seed, out=out_path, weights=weights, scale=scale)
    if data_dir is not None:
        cfg.data_dir = data_dir
    out, news = _consoles(json_out)

    def run():
        from cifarctl.grid import show_batch as run_show_batch
        from cifarctl.progress import make_reporter

        return run_show_batch(cfg, make_reporter(news))

    batch = _run(run)
    if json_out:
        _print_json(batch.summary)
        return
    if out.is_terminal and not no_preview:
        from cifarctl.errors import CifarctlError
        from cifarctl.grid import preview_text

        try:
            out.file.write(preview_text(batch, out.width, out.color_system))
        except CifarctlError as err:
            out.print(f"[dim]{err}[/]", highlight=False)
    _render_show_batch(out, batch.summary)


def _render_show_batch(console, s: dict[str, Any]) -> None:
    from rich.markup import escape

    def say(text: str) -> None:
        console.print(text, highlight=False, soft_wrap=True)

    labels = " ".join(f"{escape(label):5s}" for label in s["labels"])  # the tutorial's print of the labels
    if s["predicted"] is None:
        say(labels)
    else:
        say("GroundTruth: " + labels)
        say("Predicted:   " + " ".join(f"{escape(p):5s}" if p == t else f"[bold red]{escape(p):5s}[/]"
                                       for p, t in zip(s["predicted"], s["labels"])))
        say(f"{s['correct']} of {len(s['labels'])} correct")
    width, height = s["size"]
    say(f"saved {s['out']} ({width}x{height}); --seed {s['seed']} shows this batch again")


def main() -> None:
    """Entry point of the `cifarctl` console script."""
    app()
