"""Datasets of other image sizes than 32: import at --image-size, Tiny ImageNet's layout as it
unpacks, and train, evaluate, predict and show-batch at the size recorded in the cache and weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cifarctl import data
from cifarctl.cli import app
from cifarctl.grid import grid_size
from cifarctl.metrics import predict_logits
from cifarctl.weights import load_weights

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    """No cifarctl settings from the environment."""
    for var in ("CIFARCTL_DATA_DIR", "CIFARCTL_SOURCE", "CIFARCTL_DATASET"):
        monkeypatch.delenv(var, raising=False)


def photo(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (64, 64), fmt: str = "JPEG") -> None:
    """A flat-coloured image with a little noise, in the given format."""
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    pixels = np.clip(np.array(colour) + rng.integers(-10, 10, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)


def tiny_imagenet(root: Path, per_class: int = 4, val_per_class: int = 2) -> list[str]:
    """A miniature of tiny-imagenet-200 as it unpacks: wnids.txt, words.txt (more ids than used,
    several names per id), train/<wnid>/images/*.JPEG with a boxes file, val/images/ labelled by
    val/val_annotations.txt, and an unlabelled test/images/. Returns the wnids."""
    wnids = ["n01443537", "n01629819", "n01641577"]
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n00001740\tentity\nn01443537\tgoldfish, Carassius auratus\n"
                                    "n01629819\tEuropean fire salamander, Salamandra salamandra\n"
                                    "n01641577\tbullfrog, Rana catesbeiana\n")
    notes = []
    for c, wnid in enumerate(wnids):
        for i in range(per_class):
            photo(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", COLOURS[c])
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
        for i in range(val_per_class):
            name = f"val_{c * val_per_class + i}.JPEG"
            photo(root / "val" / "images" / name, COLOURS[c])
            notes.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(notes) + "\n")
    photo(root / "test" / "images" / "test_0.JPEG", COLOURS[0])
    return wnids


def test_tiny_imagenet_layout_imports_as_it_comes(tmp_path: Path) -> None:
    """wnids.txt orders the classes, words.txt names them, val/ becomes the test split, at 64x64."""
    tiny_imagenet(tmp_path / "tiny-imagenet-200")
    out = ok(cli("download", "--source", tmp_path / "tiny-imagenet-200", "--name", "tiny", "--image-size", "64",
                 "--data-dir", tmp_path / "data", "--json"))
    assert out["class_names"] == ["goldfish", "European fire salamander", "bullfrog"]
    assert out["splits"]["train"]["images"] == 12 and out["splits"]["test"]["images"] == 6
    ds = data.load_dataset(tmp_path / "data", "tiny")
    assert ds.train.images.shape[1:] == (64, 64, 3) and ds.metadata["image_size"] == "64"
    for split in (ds.train, ds.test):  # each image's colour says its class
        means = split.images.float().mean((1, 2))
        assert all(int(means[i].argmax()) == int(split.labels[i]) for i in range(len(split)))


def test_tiny_imagenet_annotations_cannot_reach_outside_val(tmp_path: Path) -> None:
    """A val annotation is a bare file name inside val/images: '../' paths are not followed, and a
    class that wnids.txt does not list is one clear error."""
    root = tmp_path / "tiny"
    tiny_imagenet(root)
    photo(tmp_path / "secret.JPEG", COLOURS[3])
    notes = root / "val" / "val_annotations.txt"
    notes.write_text(notes.read_text() + "../../../secret.JPEG\tn01443537\t0\t0\t1\t1\n")
    out = ok(cli("download", "--source", root, "--name", "t", "--image-size", "64", "--data-dir", tmp_path / "d",
                 "--json"))
    assert out["splits"]["test"]["images"] == 6 and len(out["skipped"]) == 1
    notes.write_text(notes.read_text() + "val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    result = cli("download", "--source", root, "--name", "u", "--data-dir", tmp_path / "d")
    assert result.exit_code == 1 and "n99999999" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("name", ["val/val_annotations.txt", "words.txt"])
def test_tiny_imagenet_text_files_that_are_fifos_are_refused_not_read(tmp_path: Path, name: str) -> None:
    """A FIFO in place of one of Tiny ImageNet's lists is one error line, never a read that blocks."""
    import subprocess
    import sys

    root = tmp_path / "tiny"
    tiny_imagenet(root)
    (root / name).unlink()
    os.mkfifo(root / name)
    out = subprocess.run([sys.executable, "-m", "cifarctl", "download", "--source", str(root), "--name", "t",
                          "--data-dir", str(tmp_path / "d")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "not a regular file" in out.stderr and "Traceback" not in out.stderr


def test_image_size_is_checked_and_rebuilds_a_cache_of_another_size(tmp_path: Path) -> None:
    """--image-size outside 8..512 is a usage error; a new size rebuilds the folder's cache at it."""
    for c, colour in enumerate(COLOURS[:2]):
        for i in range(3):
            photo(tmp_path / "src" / f"class{c}" / f"{i}.png", colour, (50, 40), "PNG")
    for bad in ("7", "513"):
        result = cli("download", "--source", tmp_path / "src", "--name", "s", "--image-size", bad)
        assert result.exit_code == 2 and "--image-size" in result.output
    result = cli("download", "--image-size", "64", "--data-dir", tmp_path / "official")  # before any download
    assert result.exit_code == 2 and "32x32" in result.output and not (tmp_path / "official").exists()
    for size in (48, 16):
        ok(cli("download", "--source", tmp_path / "src", "--name", "s", "--image-size", size, "--test-split", "0.34",
               "--data-dir", tmp_path / "d", "--json"))
        assert data.load_dataset(tmp_path / "d", "s").train.images.shape[1:] == (size, size, 3)


def write_64(data_dir: Path, n_train: int = 96, n_test: int = 32, size: int = 64) -> None:
    """A 64x64 (or size x size) four-class cache whose class shows in the colour."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n, dtype=np.int64) % 4
        base = np.array(COLOURS)[labels][:, None, None, :]
        arrays[f"{split}_images"] = np.clip(base + rng.integers(-20, 20, (n, size, size, 3)), 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels
    data.save_cache(data_dir, "sixtyfour", arrays, ["red", "green", "blue", "yellow"])


def test_a_64x64_dataset_trains_evaluates_predicts_and_shows(tmp_path: Path) -> None:
    """fast trains at 64x64 and records the size in the weights; evaluate scores it; predict reads
    files of any size at 64x64; show-batch draws 64-pixel tiles with predictions."""
    write_64(tmp_path / "d")
    common = ["--data-dir", tmp_path / "d", "--dataset", "sixtyfour"]
    run = ok(cli("train", "--model", "fast", "--epochs", "2", "-b", "32", "--width", "16,32,32", "--seed", "0",
                 "--tta", "flip", "-o", tmp_path / "run", *common, "--json"))
    weights = load_weights(Path(run["weights"]))
    assert weights.image_size == 64 and run["test_accuracy"] > 0.5
    ev = ok(cli("evaluate", run["weights"], *common, "--json"))
    assert ev["images"] == 32 and ev["accuracy"] == pytest.approx(run["test_accuracy"])
    ds = data.load_dataset(tmp_path / "d", "sixtyfour")
    expected = torch.softmax(predict_logits(weights, ds.test.images[:4]), 1)
    files = [tmp_path / f"test{i}.png" for i in range(4)]
    for i, f in enumerate(files):  # lossless and already 64x64: predict must see exactly these pixels
        Image.fromarray(ds.test.images[i].numpy()).save(f)
    photo(tmp_path / "odd.jpg", COLOURS[2], (90, 70))
    pred = ok(cli("predict", *files, tmp_path / "odd.jpg", "--weights", run["weights"], "--json"))
    got = torch.tensor([r["probabilities"] for r in pred["results"][:4]])
    assert torch.allclose(got, expected, atol=1e-5) and len(pred["results"]) == 5
    shown = ok(cli("show-batch", "-n", "4", "--scale", "2", "--weights", run["weights"], "--out", tmp_path / "g.png",
                   "--no-preview", *common, "--json"))
    assert shown["size"] == list(grid_size(4, 2, True, 64))


def test_the_tutorial_net_and_mismatched_sizes_are_refused_in_one_line(tmp_path: Path) -> None:
    """The tutorial net is defined for 32x32; a 64x64 model meets no 32x32 dataset in evaluate."""
    write_64(tmp_path / "d")
    result = cli("train", "--epochs", "1", "--data-dir", tmp_path / "d", "--dataset", "sixtyfour", "-o", tmp_path / "r")
    assert result.exit_code == 2 and "defined for 32x32" in result.output and "Traceback" not in result.output
    run = ok(cli("train", "--model", "fast", "--epochs", "1", "-b", "32", "--width", "8,8,8", "--tta", "none",
                 "--data-dir", tmp_path / "d", "--dataset", "sixtyfour", "-o", tmp_path / "r2", "--json"))
    write_64(tmp_path / "small", size=32)  # the same classes and name, at 32x32
    result = cli("evaluate", run["weights"], "--data-dir", tmp_path / "small")
    assert result.exit_code != 0 and "64x64" in result.output and "Traceback" not in result.output
