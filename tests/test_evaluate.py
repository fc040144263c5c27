"""`cifarctl evaluate`: exact agreement with a plain loop, per-class counts, the documented JSON,
the confusion matrix, and refusal of bad weights files."""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

import fakecifar as fc
from cifarctl.cli import app
from cifarctl.data import CLASSES, load_dataset
from cifarctl.models import build_model
from cifarctl.weights import MAX_HEADER_BYTES, load_weights, save_weights
from conftest import write_tiny_cache
from modelfiles import brightness_weights

DOCS = Path(__file__).resolve().parents[1] / "docs" / "evaluate.md"
# Centres between the tiny cache's class brightnesses (25k): about a third right, the rest one off.
HALF_RIGHT = [25 * k + 13 for k in range(10)]


def cli(*args: object, **env: str):
    return CliRunner().invoke(app, [str(a) for a in args], env=env or None)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    """No cifarctl settings from the environment."""
    for var in ("CIFARCTL_DATA_DIR", "CIFARCTL_SOURCE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A tiny cache: 300 train and 200 test images whose class shows in their brightness."""
    return write_tiny_cache(tmp_path_factory.mktemp("d") / "data", n_train=300, n_test=200)


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    """A weights file that gets about a third of the tiny cache right."""
    return brightness_weights(tmp_path / "run" / "weights.safetensors", HALF_RIGHT)


def reference_counts(weights_path: Path, data_dir: Path, split: str = "test") -> tuple[int, int]:
    """(correct, total) by the tutorial's loop: one image at a time, ToTensor then Normalize."""
    w = load_weights(weights_path)
    part = getattr(load_dataset(data_dir), split)
    mean = torch.tensor(w.meta["mean"]).view(3, 1, 1)
    std = torch.tensor(w.meta["std"]).view(3, 1, 1)
    correct = 0
    with torch.no_grad():
        for image, label in zip(part.images, part.labels):
            x = (image.permute(2, 0, 1).float() / 255 - mean) / std
            correct += int(w.model(x[None]).argmax(1).item() == int(label))
    return correct, len(part.labels)


def test_accuracy_equals_a_plain_loop(weights: Path, data_dir: Path) -> None:
    """Batched evaluation counts exactly the images a one-at-a-time loop gets right, for any batch size."""
    correct, total = reference_counts(weights, data_dir)
    assert 0 < correct < total  # a model that is neither always right nor always wrong
    for batch in ("1000", "7"):
        s = json.loads(cli("evaluate", weights, "--data-dir", data_dir, "-b", batch, "--json").stdout)
        assert (s["correct"], s["images"]) == (correct, total)
        assert s["accuracy"] == correct / total


def test_train_split_also_matches_and_per_class_counts_sum_to_the_split(weights: Path, data_dir: Path) -> None:
    """--split train scores all 300 training images; per-class totals and confusion rows add up to the split."""
    s = json.loads(cli("evaluate", weights, "--data-dir", data_dir, "--split", "train", "--json").stdout)
    assert (s["correct"], s["images"]) == reference_counts(weights, data_dir, "train")
    assert [r["class"] for r in s["per_class"]] == list(CLASSES)
    assert sum(r["total"] for r in s["per_class"]) == s["images"] == 300
    assert sum(r["correct"] for r in s["per_class"]) == s["correct"]
    assert [sum(row) for row in s["confusion"]] == [r["total"] for r in s["per_class"]]
    assert sum(s["confusion"][i][i] for i in range(10)) == s["correct"]


def test_json_matches_the_documented_schema(weights: Path, data_dir: Path) -> None:
    """--json prints exactly the keys and value types of the example in docs/evaluate.md."""
    example = json.loads(re.search(r"```json\n(.*?)```", DOCS.read_text(), re.S).group(1))
    result = cli("evaluate", weights, "--data-dir", data_dir, "--json", "--confusion")
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)

    def kinds(obj):
        if isinstance(obj, dict):
            return {k: kinds(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [kinds(obj[0])] if obj else []
        return "number" if isinstance(obj, (int, float)) and not isinstance(obj, bool) else type(obj).__name__

    assert kinds(s) == kinds(example)
    assert len(s["per_class"]) == len(s["confusion"]) == len(s["class_names"]) == 10
    assert 0 <= s["accuracy"] <= s["top3_accuracy"] <= 1 and s["loss"] > 0


def test_tables_and_confusion_png(weights: Path, data_dir: Path, tmp_path: Path) -> None:
    """--per-class and --confusion print their tables and write confusion.png beside the weights, or in -o."""
    result = cli("evaluate", weights, "--data-dir", data_dir, "--per-class", "--confusion")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "top-1 accuracy" in out and "top-3 accuracy" in out and "mean loss" in out
    rows = re.findall(r"^\W*(\w+)\W+(\d+) / (\d+)\W+[\d.]+%", out, re.M)  # the per-class table
    assert [name for name, _, _ in rows] == list(CLASSES)
    assert sum(int(total) for _, _, total in rows) == 200
    assert "plane" in out and "truck" in out and "confusion matrix" in out
    png = weights.parent / "confusion.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 400 and im.height > 400
    other = tmp_path / "reports"
    assert cli("evaluate", weights, "--data-dir", data_dir, "--confusion", "-o", other).exit_code == 0
    assert (other / "confusion.png").is_file()


def test_default_weights_are_the_latest_run(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Without WEIGHTS, evaluate reads runs/latest/weights.safetensors as written by `cifarctl train`."""
    monkeypatch.chdir(tmp_path)
    trained = cli("train", "--data-dir", data_dir, "--epochs", "1", "--seed", "0", "-o", "runs/r1")
    assert trained.exit_code == 0, trained.output
    result = cli("evaluate", "--data-dir", data_dir, "--json")
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert s["weights"] == "runs/latest/weights.safetensors" and s["images"] == 200
    assert (s["correct"], s["images"]) == reference_counts(tmp_path / "runs/r1/weights.safetensors", data_dir)


def test_missing_dataset_is_downloaded_first(weights: Path, tmp_path: Path) -> None:
    """With no cache in --data-dir, evaluate runs the download step (here from CIFARCTL_SOURCE) and then scores."""
    tree = fc.build_image_tree(tmp_path / "src", list(CLASSES), per_class={"train": 1, "test": 2})
    data = tmp_path / "fresh"
    result = cli("evaluate", weights, "--data-dir", data, "--json", CIFARCTL_SOURCE=str(tree.root))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"] == 20
    assert (data / "cifar10.safetensors").is_file()


def test_gpu_without_cuda_is_a_usage_error(weights: Path, data_dir: Path) -> None:
    """--gpu on a machine without CUDA exits 2 with one line that says so."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = cli("evaluate", weights, "--data-dir", data_dir, "--gpu")
    assert result.exit_code == 2 and "no CUDA GPU is available" in result.stderr


def _state(**changes) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in build_model("tutorial", {"num_classes": 10}).state_dict().items()}
    for key, value in changes.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    return state


_META = {"model": "tutorial", "model_config": {"num_classes": 10}, "class_names": list(CLASSES),
         "mean": [0.5] * 3, "std": [0.5] * 3}


class _Bomb:
    """Unpickling this creates the folder it names: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _write_bad(kind: str, path: Path, marker: Path) -> None:
    if kind == "not safetensors":
        path.write_text("just some text, not a weights file\n" * 4)
    elif kind == "tiny file":
        path.write_bytes(b"\x01\x02")
    elif kind == "truncated":
        save_weights(path, _state(), _META)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "oversized header":
        n = MAX_HEADER_BYTES + 1
        path.write_bytes(struct.pack("<Q", n) + b"{" + b" " * (n - 2) + b"}")
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"conv1.weight": _Bomb(marker)}))
    elif kind == "torch.save":
        torch.save({"state_dict": _state(), "bomb": _Bomb(marker)}, path)
    elif kind == "no metadata":
        save_file(_state(), str(path))
    elif kind == "metadata lacks class names":
        save_weights(path, _state(), {k: v for k, v in _META.items() if k != "class_names"})
    elif kind == "unknown model":
        save_weights(path, _state(), {**_META, "model": "resnet9000"})
    elif kind == "wrong shapes":
        save_weights(path, _state(**{"fc3.weight": torch.zeros(5, 84), "fc3.bias": torch.zeros(5)}), _META)
    elif kind == "missing keys":
        save_weights(path, _state(**{"fc3.bias": None}), _META)


BAD = {
    "not safetensors": "not a valid safetensors file",
    "tiny file": "not a safetensors file (only 2 bytes)",
    "truncated": "truncated or corrupt",
    "oversized header": "header of 16,777,217 bytes",
    "pickle": "a pickle or other file renamed to .safetensors",
    "torch.save": "a pickle or other file renamed to .safetensors",
    "no metadata": "not cifarctl weights",
    "metadata lacks class names": "lacks the 'class_names' metadata",
    "unknown model": "unknown model 'resnet9000'",
    "wrong shapes": "fc3.weight has shape (5, 84), expected (10, 84)",
    "missing keys": "missing fc3.bias",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_weights_file_is_one_line_and_exit_2(kind: str, tmp_path: Path) -> None:
    """Each kind of bad weights file: one error line naming the problem, exit 2, nothing written or unpickled."""
    run = tmp_path / "run"
    run.mkdir()
    weights = run / "weights.safetensors"
    marker = tmp_path / "unpickled"
    _write_bad(kind, weights, marker)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    # No dataset either: the weights must be refused before any download is tried.
    result = cli("evaluate", weights, "--data-dir", tmp_path / "nodata", "--confusion", "--per-class",
                 CIFARCTL_SOURCE=str(tmp_path / "nowhere"))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and BAD[kind] in lines[0], result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not marker.exists()


def test_missing_weights_file_says_to_train(tmp_path: Path) -> None:
    """A weights path that does not exist exits 2 and says to train a model first."""
    result = cli("evaluate", tmp_path / "none.safetensors", "--data-dir", tmp_path)
    assert result.exit_code == 2 and "train a model first" in result.stderr
