"""Your own data: datasets by name (CIFAR-100 fine and coarse, image folders with or without a
test/ split), side by side in one data dir; a validation split with best-epoch weights and early
stopping."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import fakecifar as fc
from cifarctl import data
from cifarctl.cli import app
from cifarctl.config import check_dataset_name
from cifarctl.errors import UsageError
from cifarctl.weights import load_weights

FAST = ["--seed", "0", "--log-every", "100000"]


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout) if result.stdout.lstrip().startswith("{") else result


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    """No cifarctl settings from the environment."""
    for var in ("CIFARCTL_DATA_DIR", "CIFARCTL_SOURCE", "CIFARCTL_DATASET"):
        monkeypatch.delenv(var, raising=False)


def test_cifar100_download_train_evaluate_with_100_classes(tmp_path: Path) -> None:
    """A CIFAR-100-format archive from a loopback server becomes cifar100 (fine) and cifar100-coarse."""
    archive = fc.build_cifar100_archive(tmp_path / "src" / "cifar-100-python.tar.gz", train_per_class=2)
    d = tmp_path / "data"
    with fc.FileServer(archive.data, name="cifar-100-python.tar.gz") as server:
        fine = ok(cli("download", "--dataset", "cifar100", "--source", server.url, "--md5", archive.md5,
                      "--data-dir", d, "--json"))
    assert fine["class_names"] == fc.FINE and fine["splits"]["train"]["images"] == 200
    coarse = ok(cli("download", "--dataset", "cifar100-coarse", "--source", archive.path, "--md5", archive.md5,
                    "--data-dir", d, "--json"))
    assert coarse["class_names"] == fc.COARSE
    ds = data.load_dataset(d, "cifar100-coarse")
    assert np.array_equal(ds.train.labels.numpy(), archive.train_labels // 5)
    ok(cli("train", "--dataset", "cifar100", "--data-dir", d, "--epochs", "1", "-o", tmp_path / "run", *FAST, "--json"))
    assert load_weights(tmp_path / "run" / "weights.safetensors").meta["dataset"] == "cifar100"
    s = ok(cli("evaluate", tmp_path / "run", "--data-dir", d, "--json", "--per-class", "--confusion"))
    assert s["dataset"] == "cifar100" and len(s["per_class"]) == 100 and len(s["confusion"]) == 100
    table = cli("evaluate", tmp_path / "run", "--data-dir", d, "--per-class", "--confusion")
    flat = " ".join(table.stdout.split())
    assert "the 10 worst and 10 best of 100" in flat and "too wide for a terminal" in flat
    assert (tmp_path / "run" / "confusion.png").stat().st_size > 0


def test_cifar10_archive_is_not_taken_for_cifar100(tmp_path: Path) -> None:
    """An official archive of the wrong dataset is one line naming the right --dataset."""
    archive = fc.build_cifar100_archive(tmp_path / "c100.tar.gz")
    result = cli("download", "--source", archive.path, "--md5", archive.md5, "--data-dir", tmp_path / "d")
    assert result.exit_code == 2 and "--dataset cifar100" in result.output


@pytest.mark.parametrize("n_classes, with_test", [(2, True), (3, False), (37, False), (37, True)])
def test_image_folders_become_named_datasets(tmp_path: Path, n_classes: int, with_test: bool) -> None:
    """train/ + test/ folders, or one <class>/ tree split by a seeded, stratified --test-split, for 2-37 classes."""
    names = [f"c{i:02d}" for i in range(n_classes)]
    tree = fc.build_image_tree(tmp_path / "src", names, per_class={"train": 5, "test": 1})
    source = tree.root if with_test else tree.root / "train"
    s = ok(cli("download", "--source", source, "--name", "pets", "--data-dir", tmp_path / "d", "--json"))
    assert s["dataset"] == "pets" and s["class_names"] == names
    assert (tmp_path / "d" / "pets.safetensors").is_file() and not (tmp_path / "d" / "cifar10.safetensors").exists()
    per_class_test = s["splits"]["test"]["per_class"]
    assert set(per_class_test.values()) == {1}  # 1 of 5 per class at --test-split 0.2, or test/ as given
    if not with_test:
        meta = data.load_dataset(tmp_path / "d", "pets").metadata
        assert meta["test_split"] == "0.2"
    ok(cli("train", "--dataset", "pets", "--data-dir", tmp_path / "d", "--epochs", "1", "-o", tmp_path / "r", *FAST))
    ev = ok(cli("evaluate", tmp_path / "r", "--data-dir", tmp_path / "d", "--json"))
    assert ev["dataset"] == "pets" and ev["class_names"] == names


def test_two_named_datasets_side_by_side(tmp_path: Path, tiny_data_dir: Path) -> None:
    """Importing `pets` next to CIFAR-10 leaves CIFAR-10's cache byte for byte; `datasets` lists both."""
    before = data.cache_path(tiny_data_dir).read_bytes()
    tree = fc.build_image_tree(tmp_path / "src", ["cat", "dog", "emu"])
    ok(cli("download", "--source", tree.root, "--name", "pets", "--data-dir", tiny_data_dir, "--json"))
    assert data.cache_path(tiny_data_dir).read_bytes() == before
    listing = ok(cli("datasets", "--data-dir", tiny_data_dir, "--json"))
    rows = {d["name"]: d for d in listing["datasets"]}
    assert rows["pets"]["classes"] == 3 and rows["cifar10"]["classes"] == 10 and rows["cifar10"]["train"] == 200
    assert rows["pets"]["bytes"] > 0
    table = cli("datasets", "--data-dir", tiny_data_dir)
    assert "pets" in table.stdout and "cifar10" in table.stdout


def test_mismatched_dataset_at_evaluate_is_one_line(tmp_path: Path, tiny_data_dir: Path) -> None:
    """evaluate --dataset X on weights trained on Y exits 2 with one line naming both."""
    ok(cli("train", "--data-dir", tiny_data_dir, "--epochs", "1", "-o", tmp_path / "r", *FAST))
    result = cli("evaluate", tmp_path / "r", "--data-dir", tiny_data_dir, "--dataset", "pets")
    assert result.exit_code == 2 and "'cifar10', not 'pets'" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["../evil", "a/b", "", "UPPER", ".hidden", "x" * 65, "a b", "nul\x00"])
def test_hostile_dataset_names_are_refused(name: str, tmp_path: Path) -> None:
    """A dataset name that could leave the data dir or is not a plain name is a UsageError."""
    with pytest.raises(UsageError, match="not allowed"):
        check_dataset_name(name)
    if "\x00" not in name:
        result = cli("download", "--name", name, "--source", tmp_path, "--data-dir", tmp_path / "d")
        assert result.exit_code == 2 and "Traceback" not in result.output


def test_unknown_dataset_says_how_to_import_it(tiny_data_dir: Path, tmp_path: Path) -> None:
    """train --dataset pets with no such cache says how to import it."""
    result = cli("train", "--dataset", "pets", "--data-dir", tiny_data_dir, "-o", tmp_path / "r")
    assert result.exit_code == 1 and "--name pets" in result.output


def test_dataset_normalisation_uses_the_datasets_own_statistics(tmp_path: Path) -> None:
    """--normalization dataset uses the mean/std of that dataset's training images, recorded at import."""
    tree = fc.build_image_tree(tmp_path / "src", ["a", "b"], per_class={"train": 4, "test": 1})
    ok(cli("download", "--source", tree.root, "--name", "ab", "--data-dir", tmp_path / "d"))
    ds = data.load_dataset(tmp_path / "d", "ab")
    images = ds.train.images.numpy().reshape(-1, 3) / 255
    mean, std = data.dataset_stats(ds)
    assert np.allclose(mean, images.mean(0), atol=1e-5) and np.allclose(std, images.std(0), atol=1e-5)
    ok(cli("train", "--dataset", "ab", "--data-dir", tmp_path / "d", "--epochs", "1", "-o", tmp_path / "r",
           "--normalization", "dataset", *FAST))
    assert np.allclose(load_weights(tmp_path / "r" / "weights.safetensors").meta["mean"], mean)


def test_stratified_split_is_disjoint_seeded_and_balanced() -> None:
    """The held-out part is disjoint from the rest, the same for the same seed, and takes the share of each class."""
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    kept, held = data.stratified_split(labels, 0.1, seed=3)
    assert not set(kept) & set(held) and len(kept) + len(held) == 100
    assert np.bincount(labels[held]).tolist() == [1, 2, 3, 4]
    again, held_again = data.stratified_split(labels, 0.1, seed=3)
    assert np.array_equal(held, held_again) and not np.array_equal(held, data.stratified_split(labels, 0.1, 4)[1])


def test_val_split_reports_validation_keeps_best_and_resumes_the_same_split(tiny_data_dir: Path, tmp_path: Path) -> None:
    """--val-split: per-epoch validation, test once at the end, best.safetensors = best epoch, same split after resume."""
    args = ["--data-dir", tiny_data_dir, "--val-split", "0.2", "--lr", "0.01", *FAST]
    full = ok(cli("train", *args, "--epochs", "3", "-o", tmp_path / "full", "--json"))
    assert full["val_accuracy"] is not None and full["best_epoch"] >= 1 and full["stop_reason"] == "epochs"
    rows = (tmp_path / "full" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    epochs = [dict(zip(header, r.split(","))) for r in rows[1:] if r.startswith("epoch,")]
    assert all(e["val_acc"] for e in epochs) and [bool(e["test_acc"]) for e in epochs] == [False, False, True]
    best = load_weights(tmp_path / "full" / "best.safetensors")
    val = {int(e["epoch"]): float(e["val_acc"]) for e in epochs}
    assert int(best.meta["best_epoch"]) == full["best_epoch"] == max(val, key=lambda k: (val[k], -k))
    assert float(best.meta["val_accuracy"]) == pytest.approx(max(val.values()), abs=1e-5)
    ok(cli("train", *args, "--epochs", "1", "-o", tmp_path / "part"))
    resumed = ok(cli("train", "--resume", tmp_path / "part", "--epochs", "3", "--json"))
    assert resumed["val_accuracy"] == pytest.approx(full["val_accuracy"], abs=1e-9)
    a, b = load_file(str(tmp_path / "part" / "weights.safetensors")), load_file(str(tmp_path / "full" / "weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same split, so the same run
    assert load_weights(tmp_path / "full" / "weights.safetensors").meta["val_split"] == "0.2"


def test_patience_stops_early_and_says_so(tiny_data_dir: Path, tmp_path: Path) -> None:
    """--patience 1 with a learning rate too small to improve stops after the second epoch and says why."""
    s = ok(cli("train", "--data-dir", tiny_data_dir, "--val-split", "0.2", "--patience", "1", "--lr", "1e-9",
               "--epochs", "6", "-o", tmp_path / "r", *FAST, "--json"))
    assert s["stop_reason"].startswith("no better validation accuracy") and s["epochs_run"] < 6
    result = json.loads((tmp_path / "r" / "config.json").read_text())["result"]
    assert result["stop_reason"] == s["stop_reason"] and result["best_epoch"] == s["best_epoch"]
    result = cli("train", "--data-dir", tiny_data_dir, "--patience", "2", "-o", tmp_path / "x")
    assert result.exit_code == 2 and "--val-split" in result.output
