"""Small things a new user hit: the offline hint names a command that has the option, a run
directory stands for its weights, and counts are never '1 images'."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cifarctl import fetch
from cifarctl.cli import app
from cifarctl.errors import CifarctlError
from cifarctl.progress import Reporter
from modelfiles import brightness_weights


def cli(*args: object, **env: str):
    return CliRunner().invoke(app, [str(a) for a in args], env=env or None)


def test_offline_hint_names_download_source_and_the_env_var(tmp_path: Path) -> None:
    """With no network, the error names `cifarctl download --source` and CIFARCTL_SOURCE, not a --source train lacks."""
    with pytest.raises(CifarctlError) as info:
        fetch.fetch("http://nonexistent.invalid/x.tar.gz", tmp_path / "x.part", Reporter())
    assert "cifarctl download --source" in str(info.value) and "CIFARCTL_SOURCE" in str(info.value)
    result = cli("train", "--data-dir", tmp_path / "d", "-o", tmp_path / "r",
                 CIFARCTL_SOURCE="http://nonexistent.invalid/cifar-10-python.tar.gz")
    assert result.exit_code == 1
    assert "cifarctl download --source" in result.output and "Traceback" not in result.output


def test_evaluate_and_predict_accept_a_run_directory(tiny_data_dir: Path, tmp_path: Path) -> None:
    """`evaluate runs/latest` and `predict --weights RUN_DIR` use the run's weights.safetensors."""
    run = tmp_path / "runs" / "a"
    brightness_weights(run / "weights.safetensors")
    (tmp_path / "runs" / "latest").symlink_to("a")
    result = cli("evaluate", tmp_path / "runs" / "latest", "--data-dir", tiny_data_dir, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["weights"].endswith("weights.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("evaluate", empty, "--data-dir", tiny_data_dir)
    assert result.exit_code == 2 and "is a folder without weights.safetensors" in result.output


def test_one_image_is_singular(tmp_path: Path) -> None:
    """predict on one file titles its table '1 image', not '1 images'."""
    import numpy as np
    from PIL import Image

    weights = brightness_weights(tmp_path / "w" / "weights.safetensors")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "one.png")
    result = cli("predict", tmp_path / "one.png", "--weights", weights)
    assert result.exit_code == 0, result.output
    assert "1 image," in result.stdout and "1 images" not in result.stdout
