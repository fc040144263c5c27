"""The bundled pretrained weights: a complete, float16, loadable file that `predict`, `evaluate`
and `show-batch --weights` fall back to on a fresh install, and that `--weights pretrained` and
`cifarctl.load()` name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import cifarctl
from cifarctl import pretrained
from cifarctl.cli import app
from cifarctl.data import CLASSES
from cifarctl.weights import load_weights, read_header

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
PROVENANCE = ("command", "seed", "test_accuracy", "test_accuracy_fp32", "data_source", "data_sha256",
              "cifarctl_version", "torch_version")


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch) -> Path:
    """A current folder with no runs/ and one image in it."""
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "img.png")
    return tmp_path


def test_bundled_file_loads_with_complete_metadata() -> None:
    """The bundled file is float16, about 1.3 MB, rebuilds its model, and records how it was made."""
    entries, meta = read_header(pretrained.FILE)
    assert all(e["dtype"] in ("F16", "I64") for e in entries.values())
    assert 0.5e6 < pretrained.FILE.stat().st_size < 2.5e6
    missing = [k for k in PROVENANCE if not meta.get(k)]
    assert not missing, f"metadata lacks {missing}"
    assert len(meta["data_sha256"]) == 64 and "cifarctl train" in meta["command"]
    weights = load_weights(pretrained.FILE)
    assert weights.meta["model"] == "fast" and weights.class_names == list(CLASSES)
    assert 0.5 < float(meta["test_accuracy"]) <= 1


def test_predict_on_a_fresh_install_uses_the_bundled_model(fresh: Path) -> None:
    """predict with no --weights and no runs/latest uses the bundled model and says so in one stderr line."""
    result = cli("predict", "img.png", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["weights"] == str(pretrained.FILE)
    assert "using the bundled fast model (" in result.stderr and "train your own with cifarctl train" in result.stderr


def test_weights_pretrained_names_it(fresh: Path) -> None:
    """--weights pretrained uses the bundled model without the fallback note."""
    result = cli("predict", "img.png", "--weights", "pretrained", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == "fast" and "bundled" not in result.stderr


def test_runs_latest_wins_over_the_bundled_model(fresh: Path) -> None:
    """A runs/latest that exists (even a broken one) is used, never silently replaced by the bundled model."""
    (fresh / "runs" / "latest").mkdir(parents=True)
    result = cli("predict", "img.png")
    assert result.exit_code == 2 and "runs/latest/weights.safetensors does not exist" in result.stderr
    assert "bundled" not in result.stderr


def test_evaluate_and_show_batch_fall_back(fresh: Path, tiny_data_dir: Path) -> None:
    """evaluate and show-batch --weights runs/latest use the bundled model when there is no run."""
    result = cli("evaluate", "--data-dir", tiny_data_dir, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == "fast" and "bundled fast model" in result.stderr
    result = cli("show-batch", "--weights", "runs/latest", "-n", "4", "--seed", "0", "--data-dir", tiny_data_dir,
                 "--no-preview", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["weights"] == str(pretrained.FILE)


def test_load_without_a_path_is_the_bundled_model() -> None:
    """cifarctl.load() is the bundled model, ready to predict."""
    clf = cifarctl.load()
    assert clf.model == "fast" and clf.class_names == list(CLASSES)
    assert clf.predict(np.full((32, 32, 3), 128, np.uint8)).class_name in CLASSES


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_file(), reason="the shared CIFAR-10 copy is not on this machine")
def test_bundled_model_scores_its_recorded_accuracy(tmp_path: Path) -> None:
    """On the real CIFAR-10 test set the bundled model scores its recorded (plain) accuracy within 0.2 points."""
    import torch

    import tarfile

    from cifarctl.data import CLASSES as ORDER
    from cifarctl.images import load_images
    from cifarctl.metrics import evaluate_weights
    from cifarctl.weights import load_weights

    # Only the 10,000 test images are unpacked and decoded (by the import pipeline's own function):
    # a fraction of the time of importing all 60,000.
    files, labels = [], []
    with tarfile.open(SHARED) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) >= 3 and parts[-3] == "test" and parts[-2] in ORDER:
                path = tmp_path / parts[-2] / Path(parts[-1]).name
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(tar.extractfile(member).read())
                files.append(path)
                labels.append(ORDER.index(parts[-2]))
    images, ok, problems = load_images(files)
    assert not problems and len(ok) == 10_000
    weights = load_weights(pretrained.FILE)
    # Scored without TTA against the recorded plain accuracy: six times less model work than the
    # TTA figure, which `make pretrained` checks when it builds the file.
    weights.meta["tta"] = "none"
    ev = evaluate_weights(weights, images, torch.tensor(labels))
    recorded = float(read_header(pretrained.FILE)[1]["test_accuracy_plain"])
    assert abs(ev.accuracy - recorded) <= 0.002
