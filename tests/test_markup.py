"""Untrusted text is never markup: class names, file names, paths and error text with `[`, `]`,
`[/]` or `[bold]` print exactly as written through every command's tables and error lines, and
reach matplotlib without mathtext."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cifarctl import plots, render
from cifarctl.cli import app
from cifarctl.models import build_model
from cifarctl.weights import save_weights
from fakecifar import build_image_tree

# Names a Rich markup parser would eat, reject or choke on; each must print literally.
HOSTILE = ["[bold]cat", "dog[/]", "[red]x[/red]", "a [b] c", "holiday [draft]", "[/]", r"back\[slash", "$x^2$"]


def cli(*args: object, terminal: bool = False):
    env = {"COLUMNS": "200", "TERM": "xterm-256color"} if terminal else {"COLUMNS": "200"}
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def classes_from(names: list[str]) -> list[str]:
    """Folder-safe versions of the hostile names (no '/' in a folder name)."""
    return [n.replace("/", "|") for n in names]


@pytest.fixture(scope="module")
def hostile_data(tmp_path_factory) -> tuple[Path, list[str]]:
    """A data dir imported from an image folder whose class names are all markup-like."""
    root = tmp_path_factory.mktemp("hostile")
    names = classes_from(HOSTILE)
    tree = build_image_tree(root / "src [/] tree", names, per_class={"train": 2, "test": 1})
    data_dir = root / "data [bold]"
    result = cli("download", "--data-dir", data_dir, "--source", tree.root)
    assert result.exit_code == 0, result.output
    for name in names:
        assert name in result.stdout, (name, result.stdout)
    assert str(data_dir) in result.stdout.replace("\n", "")
    return data_dir, sorted(names)


@pytest.fixture(scope="module")
def hostile_weights(tmp_path_factory, hostile_data) -> Path:
    """A tutorial-net weights file whose class names are the hostile ones."""
    _, names = hostile_data
    model = build_model("tutorial", {"num_classes": len(names)})
    path = tmp_path_factory.mktemp("w [x]") / "weights [1].safetensors"
    save_weights(path, model.state_dict(), {"model": "tutorial", "model_config": {"num_classes": len(names)},
                                            "class_names": names, "mean": [0.5] * 3, "std": [0.5] * 3})
    return path


def test_download_table_prints_class_names_and_paths_literally(hostile_data) -> None:
    """The download table shows every markup-like class name exactly (checked in the fixture)."""
    data_dir, names = hostile_data
    result = cli("download", "--data-dir", data_dir, "--json")
    assert json.loads(result.stdout)["class_names"] == names


def test_evaluate_per_class_and_confusion_print_names_literally(hostile_data, tmp_path: Path) -> None:
    """evaluate --per-class --confusion prints every class name and the weights path exactly."""
    data_dir, names = hostile_data
    model = build_model("tutorial", {"num_classes": len(names)})
    weights = tmp_path / "[bold]run" / "weights.safetensors"
    save_weights(weights, model.state_dict(), {"model": "tutorial", "model_config": {"num_classes": len(names)},
                                               "class_names": names, "mean": [0.5] * 3, "std": [0.5] * 3})
    for terminal in (False, True):
        result = cli("evaluate", weights, "--data-dir", data_dir, "--per-class", "--confusion", terminal=terminal)
        assert result.exit_code == 0, result.output
        for name in names:
            assert name in result.stdout, name
        assert str(weights) in result.stdout.replace("\n", "")


def test_predict_prints_file_and_class_names_literally(hostile_weights: Path, hostile_data, tmp_path: Path) -> None:
    """predict shows a file called `holiday [draft].png` and markup-like class names exactly, in table and errors."""
    _, names = hostile_data
    folder = tmp_path / "pics [/]"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "holiday [draft].png")
    (folder / "[bold]broken.png").write_bytes(b"not an image")
    result = cli("predict", folder, "--weights", hostile_weights, "-k", "3")
    assert result.exit_code == 1
    flat = result.output.replace("\n", "")
    assert "holiday [draft].png" in flat
    assert f"{folder / '[bold]broken.png'}: not an image" in flat
    assert any(name in result.stdout for name in names)
    assert str(hostile_weights) not in result.output  # nothing else from the file leaks into the lines


def test_error_lines_print_paths_literally(tmp_path: Path) -> None:
    """An error naming a path with `[/]` and `[bold]` prints it whole, with no traceback."""
    missing = tmp_path / "[bold]no [/] such [red].safetensors"
    result = cli("evaluate", missing)
    assert result.exit_code == 2
    assert str(missing) in result.output.replace("\n", "")
    assert "Traceback" not in result.output


def test_show_batch_labels_print_literally(hostile_data, hostile_weights: Path, tmp_path: Path) -> None:
    """show-batch prints markup-like labels and predictions, and the output path, exactly."""
    data_dir, names = hostile_data
    out = tmp_path / "[bold]grid [/].png"
    result = cli("show-batch", "--data-dir", data_dir, "-n", "8", "--seed", "1", "--out", out, "--no-preview",
                 "--weights", hostile_weights)
    assert result.exit_code == 0, result.output
    batch = json.loads(cli("show-batch", "--data-dir", data_dir, "-n", "8", "--seed", "1", "--out", out,
                           "--json").stdout)
    for label in batch["labels"]:
        assert label in result.stdout
    assert str(out) in result.stdout.replace("\n", "")


def test_progress_news_prints_literally(capsys) -> None:
    """Reporter lines (paths in progress news) are not parsed as markup on a terminal either."""
    from rich.console import Console

    from cifarctl.progress import RichReporter

    console = Console(force_terminal=True, color_system=None, width=200)
    RichReporter(console).log("resuming runs/[bold]x[/] at epoch 1")
    with RichReporter(console).task("downloading [red]a[/].tar.gz", 10) as task:
        task.advance(10, info="[/]")
    out = capsys.readouterr().out
    assert "resuming runs/[bold]x[/] at epoch 1" in out
    assert "downloading [red]a[/].tar.gz" in out


def test_render_helpers_keep_text_literal() -> None:
    """render.plain and render.error_line never interpret markup."""
    assert render.plain("[bold]x[/]").plain == "[bold]x[/]"
    assert render.plural(1, "image") == "1 image" and render.plural(2, "image") == "2 images"


def test_matplotlib_text_is_not_mathtext(tmp_path: Path) -> None:
    """Class names with `$` (even invalid maths) are drawn literally in the confusion PNG and the curves title."""
    names = [r"$\frac{1$", "cost $5", "a_b^c", "[bold]x"]
    plots.plot_confusion([[1, 0, 0, 0]] * 4, names, tmp_path / "c.png", r"title $\undefined$")
    assert (tmp_path / "c.png").stat().st_size > 0
    rows = [{"kind": "epoch", "step": "1", "test_loss": "1.0", "test_acc": "0.5", "train_loss": ""}]
    plots.plot_curves(rows, tmp_path / "curves.png", r"model $\oops")
    assert (tmp_path / "curves.png").stat().st_size > 0
    import matplotlib

    assert matplotlib.rcParams["text.parse_math"] is True  # the global setting is left alone
