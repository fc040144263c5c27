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
    typer.Option("--data-dir", envvar="CIFARCTL_DATA_DIR", help="Folder holding the dataset cache [default: ./data]."),
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


@app.command()
def train() -> None:
    """Train a model (not built yet)."""
    _not_built("train")


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
