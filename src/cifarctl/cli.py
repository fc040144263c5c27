"""The `cifarctl` command line: parses options, calls the core, renders results.

Heavy modules (torch, numpy, the core) are imported inside the commands so that
`cifarctl --help` answers at once.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cifarctl import __version__
from cifarctl.config import ModelName, TrainConfig

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


def _not_built(name: str) -> None:
    _fail(f"`cifarctl {name}` is not built yet", 2)


_T = TrainConfig  # defaults shown in --help come from the config dataclass itself


@app.command()
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
    device: Annotated[
        Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N or mps  \\[default: auto].")
    ] = None,
    gpu: Annotated[bool, typer.Option("--gpu", help="The same as --device cuda.")] = False,
    seed: Annotated[Optional[int], typer.Option(help="Random seed  \\[default: a fresh one, recorded in the run].")] = None,
    deterministic: Annotated[
        Optional[bool], typer.Option("--deterministic", help="Use deterministic kernels only.")
    ] = None,
    log_every: Annotated[
        Optional[int], typer.Option("--log-every", min=1, help=f"Steps between loss lines  \\[default: {_T.log_every}].")
    ] = None,
    output_dir: Annotated[
        Optional[Path], typer.Option("--output-dir", "-o", help="Run directory  \\[default: runs/<model>-<timestamp>].")
    ] = None,
    resume: Annotated[
        Optional[Path], typer.Option("--resume", help="Continue the run in this directory where it stopped.")
    ] = None,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
) -> None:
    """Train a model; the defaults are the PyTorch tutorial's recipe (batch 4, SGD lr 0.001 momentum 0.9, 2 epochs).

    Writes weights.safetensors, metrics.csv, config.json, curves.png and a checkpoint to the run directory, and points runs/latest at it. Ctrl-C or SIGTERM saves a checkpoint; --resume continues. Options given with --resume override the saved run's settings (e.g. more --epochs).
    """
    from cifarctl.config import train_config

    if gpu:
        if device not in (None, "cuda") and not str(device).startswith("cuda"):
            _fail("--gpu conflicts with --device " + str(device), 2)
        device = device or "cuda"
    overrides = dict(batch_size=batch_size, epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                     device=device, seed=seed, deterministic=deterministic, log_every=log_every,
                     output_dir=output_dir, data_dir=data_dir)
    if model is not None:
        overrides["model"] = model.value
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
    if json_out:
        _print_json(summary)
        return
    _render_train(out, summary)


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


@app.command()
def evaluate() -> None:
    """Evaluate weights on the test set (not built yet)."""
    _not_built("evaluate")


@app.command()
def predict() -> None:
    """Classify image files (not built yet)."""
    _not_built("predict")


@app.command("show-batch")
def show_batch() -> None:
    """Show a grid of training images (not built yet)."""
    _not_built("show-batch")


def main() -> None:
    """Entry point of the `cifarctl` console script."""
    app()
