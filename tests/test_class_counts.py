"""The default recipe (and the fused tutorial step behind it) trains on any class count that
`download` accepts, and the weights carry that dataset's classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cifarctl.cli import app
from cifarctl.weights import load_weights
from fakecifar import build_image_tree


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("n_classes", [2, 3, 11])
def test_default_recipe_trains_and_evaluates_on_any_class_count(tmp_path: Path, n_classes: int) -> None:
    """An image folder with 2, 3 or 11 classes imports, trains with the defaults, and evaluates."""
    names = [f"class{i:02d}" for i in range(n_classes)]
    tree = build_image_tree(tmp_path / "src", names, per_class={"train": 3, "test": 1})
    data_dir = tmp_path / "data"
    assert cli("download", "--data-dir", data_dir, "--source", tree.root).exit_code == 0
    result = cli("train", "--data-dir", data_dir, "--epochs", "1", "--seed", "0", "-o", tmp_path / "run", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images_per_s"] > 0
    weights = load_weights(tmp_path / "run" / "weights.safetensors")
    assert weights.class_names == names and weights.meta["model_config"]["num_classes"] == n_classes
    evaluated = cli("evaluate", tmp_path / "run", "--data-dir", data_dir, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["images"] == n_classes
