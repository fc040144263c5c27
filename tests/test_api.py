"""The Python API: `cifarctl.load` and `Classifier.predict` on paths, PIL images and arrays,
`cifarctl.train` and `cifarctl.evaluate` returning the fields of their `--json` output, errors
raised rather than exits, and an `import cifarctl` that does not import torch."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import cifarctl
from cifarctl.cli import app
from cifarctl.data import CLASSES
from cifarctl.device import flush_denormal_enabled
from modelfiles import brightness_class, brightness_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return brightness_weights(tmp_path_factory.mktemp("w") / "weights.safetensors")


def test_import_is_light() -> None:
    """`import cifarctl` loads no torch (and neither does naming the API); the first call does."""
    code = ("import sys, cifarctl; cifarctl.load; cifarctl.Prediction; cifarctl.evaluate\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_predict_a_path(weights: Path, tmp_path: Path) -> None:
    """load(path).predict("file.png") returns one Prediction with the class, its probability and the top k."""
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(path)
    clf = cifarctl.load(weights)
    p = clf.predict(str(path), top_k=3)
    assert isinstance(p, cifarctl.Prediction)
    assert p.class_name == CLASSES[brightness_class(90)] and 0 < p.probability <= 1
    assert len(p.top_k) == 3 and p.top_k[0] == (p.class_name, p.probability)
    assert clf.class_names == list(CLASSES) and clf.model == "tutorial" and clf.mean == [0.5] * 3


def test_predict_a_mixed_list(weights: Path, tmp_path: Path) -> None:
    """A list of a PIL image, a 32x32 array, a larger array and a Path gives a list of Predictions, in order."""
    path = tmp_path / "bright.jpg"
    Image.fromarray(np.full((64, 48, 3), 240, np.uint8)).save(path, quality=95)
    items = [Image.new("RGB", (50, 50), (30, 30, 30)), np.full((32, 32, 3), 120, np.uint8),
             np.full((100, 80, 3), 180, np.uint8), path]
    got = cifarctl.load(weights).predict(items, top_k=1)
    assert [p.class_name for p in got] == [CLASSES[brightness_class(m)] for m in (30, 120, 180, 240)]
    assert all(len(p.top_k) == 1 for p in got)


def test_predict_a_batch_array(weights: Path) -> None:
    """An (N, 32, 32, 3) uint8 array is a batch: N predictions."""
    batch = np.stack([np.full((32, 32, 3), m, np.uint8) for m in (10, 250)])
    got = cifarctl.load(weights).predict(batch)
    assert [p.class_name for p in got] == [CLASSES[brightness_class(10)], CLASSES[brightness_class(250)]]


def test_bad_inputs_raise_cifarctl_errors(weights: Path, tmp_path: Path) -> None:
    """Wrong arrays, unknown objects, missing files and bad weights raise CifarctlError, never exit."""
    clf = cifarctl.load(weights)
    for bad in (np.zeros((32, 32, 3), np.float32), 42, str(tmp_path / "missing.png")):
        with pytest.raises(cifarctl.CifarctlError):
            clf.predict(bad)
    with pytest.raises(cifarctl.UsageError):
        cifarctl.load(tmp_path / "nothing.safetensors")


def snapshot() -> tuple:
    return (torch.get_num_threads(), flush_denormal_enabled(), torch.are_deterministic_algorithms_enabled(),
            torch.backends.cudnn.benchmark, torch.get_rng_state().clone(), random.getstate())


def test_train_and_evaluate(tiny_data_dir: Path, tmp_path: Path) -> None:
    """cifarctl.train(...) returns the fields of `train --json`, leaves torch's settings alone, and
    cifarctl.evaluate(...) the fields of `evaluate --json`."""
    torch.set_num_threads(2)
    before = snapshot()
    result = cifarctl.train(model="tutorial", epochs=1, seed=0, deterministic=True, data_dir=tiny_data_dir,
                            output_dir=tmp_path / "run", progress=False)
    after = snapshot()
    assert before[:4] == after[:4] and torch.equal(before[4], after[4]) and before[5] == after[5]
    assert isinstance(result, cifarctl.TrainResult) and result.model == "tutorial" and result.seed == 0
    assert Path(result.weights).is_file() and 0 <= result.test_accuracy <= 1
    cli_json = CliRunner().invoke(app, ["evaluate", result.weights, "--data-dir", str(tiny_data_dir), "--json"])
    ev = cifarctl.evaluate(result.weights, data_dir=tiny_data_dir, per_class=True)
    assert isinstance(ev, cifarctl.EvaluateResult) and len(ev.per_class) == 10 and ev.images == 100
    assert ev.to_dict().keys() == json.loads(cli_json.stdout).keys() and not ev.extra
    assert ev.accuracy == json.loads(cli_json.stdout)["accuracy"]


def test_train_result_has_the_json_fields(tiny_data_dir: Path, tmp_path: Path) -> None:
    """TrainResult.to_dict() has exactly the keys `cifarctl train --json` prints, each named field among them."""
    out = CliRunner().invoke(app, ["train", "--epochs", "1", "--seed", "0", "--data-dir", str(tiny_data_dir),
                                   "-o", str(tmp_path / "cli"), "--json"])
    assert out.exit_code == 0, out.output
    keys = set(json.loads(out.stdout))
    result = cifarctl.train(epochs=1, seed=0, data_dir=tiny_data_dir, output_dir=tmp_path / "api", progress=False)
    assert set(result.to_dict()) == keys
    assert {f.name for f in dataclasses.fields(result)} - {"extra"} <= keys


def test_train_refuses_unknown_options(tmp_path: Path) -> None:
    """A misspelt option raises UsageError naming it, before anything is trained."""
    with pytest.raises(cifarctl.UsageError, match="'epoch'"):
        cifarctl.train(epoch=2, output_dir=tmp_path / "run", progress=False)


def test_train_module_is_still_the_module() -> None:
    """cifarctl.train is callable and still the core module the CLI and tests import."""
    import cifarctl.train as core

    assert cifarctl.train is core and callable(cifarctl.train) and callable(core.train)


def test_shell_completion_is_offered() -> None:
    """`cifarctl --install-completion` exists, so a shell can complete commands and options."""
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "--install-completion" in result.output
