"""No tracebacks, anywhere: impossible option values are refused up front (with or without
--nproc), a checkpoint from another dataset or model is one line, and an interruption is reported
as one, not as an error."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cifarctl import train as train_module
from cifarctl.cli import app
from cifarctl.config import TrainConfig, train_config
from cifarctl.errors import UsageError
from conftest import write_tiny_cache

FAST = ["--epochs", "1", "--seed", "0", "--log-every", "100000"]


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(result, code: int, needle: str) -> None:
    assert result.exit_code == code, result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1, result.output
    assert needle in result.output and "Traceback" not in result.output, result.output


BAD_OPTIONS = [
    (["--lr", "1e308"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "-1"], "--lr"),
    (["--momentum", "nan"], "--momentum"), (["--momentum", "1.5"], "--momentum"),
    (["--weight-decay", "inf"], "--weight-decay"), (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--bias-lr-scale", "inf"], "--bias-lr-scale"), (["--warmup-epochs", "nan"], "--warmup-epochs"),
    (["--label-smoothing", "nan"], "--label-smoothing"), (["--dist-timeout", "inf"], "--dist-timeout"),
    (["--batch-size", str(1 << 30)], "--batch-size"), (["--crop-pad", "1000"], "--crop-pad"),
    (["--width", "32,x"], "--width"), (["--width", "0,10"], "--width"), (["--width", "99999999"], "--width"),
    (["--seed", "-5"], "--seed"), (["--warmup-epochs", "5", "--epochs", "1"], "--warmup-epochs"),
]


@pytest.mark.parametrize("args, needle", BAD_OPTIONS)
def test_impossible_option_values_are_refused_up_front(tmp_path: Path, args: list[str], needle: str) -> None:
    """Non-finite or out-of-range option values exit 2 with one line naming the option, before any work."""
    one_line(cli("train", "--data-dir", tmp_path / "no-data", "-o", tmp_path / "run", *args), 2, needle)
    assert not (tmp_path / "run").exists() and not (tmp_path / "no-data").exists()


def test_config_validates_itself() -> None:
    """TrainConfig.validate accepts every preset and refuses an unknown choice."""
    for model in ("tutorial", "fast", "resnet18"):
        train_config(model).validate()
    with pytest.raises(UsageError, match="--schedule"):
        TrainConfig(schedule="cosine").validate()


@pytest.mark.parametrize("args, needle", [(["--lr", "nan"], "--lr"), (["--width", "abc", "--model", "fast"], "--width")])
def test_nproc_with_a_bad_option_is_exit_2_before_launching(tmp_path: Path, args: list[str], needle: str) -> None:
    """--nproc 2 with a bad option value exits 2 with one line, at once, without starting torchrun."""
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "cifarctl", "train", "--nproc", "2", "--data-dir",
                             str(tmp_path / "d"), "-o", str(tmp_path / "r"), *args], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr + result.stdout
    assert "torch.distributed" not in result.stderr and time.monotonic() - start < 60


def test_nproc_into_an_existing_run_is_exit_2(tiny_data_dir: Path, tmp_path: Path) -> None:
    """--nproc into a folder that holds a run is refused before launching, as without --nproc."""
    assert cli("train", "--data-dir", tiny_data_dir, *FAST, "-o", tmp_path / "r").exit_code == 0
    result = subprocess.run([sys.executable, "-m", "cifarctl", "train", "--nproc", "2", "--data-dir",
                             str(tiny_data_dir), "-o", str(tmp_path / "r")], capture_output=True, text=True)
    assert result.returncode == 2 and "--resume" in result.stderr, result.stderr


def test_relaunch_argv_drops_nproc_and_fixes_the_seed() -> None:
    """The torchrun workers get the same options minus --nproc, plus the seed chosen once."""
    from cifarctl.distributed import relaunch_argv

    assert relaunch_argv(["train", "--nproc", "2", "-b", "8", "--nproc=3"], 42) == \
        ["train", "-b", "8", "--seed", "42"]
    assert relaunch_argv(["train", "--seed", "1", "--nproc", "2"]) == ["train", "--seed", "1"]


def test_checkpoint_from_another_dataset_is_one_line(tmp_path: Path) -> None:
    """Resuming a run after the data dir changed to another class list exits 2 with one line."""
    data_dir = write_tiny_cache(tmp_path / "data")
    assert cli("train", "--data-dir", data_dir, *FAST, "-o", tmp_path / "r").exit_code == 0
    from fakecifar import build_image_tree

    tree = build_image_tree(tmp_path / "pets", ["cat", "dog", "fish"])
    assert cli("download", "--data-dir", data_dir, "--source", tree.root).exit_code == 0
    result = cli("train", "--resume", tmp_path / "r", "--epochs", "2")
    one_line(result, 2, "was trained on 10 classes")


def test_checkpoint_from_another_model_is_one_line(tiny_data_dir: Path, tmp_path: Path) -> None:
    """A checkpoint whose tensors belong to another model is refused with one line, not a load_state_dict traceback."""
    assert cli("train", "--data-dir", tiny_data_dir, *FAST, "-o", tmp_path / "r").exit_code == 0
    path = tmp_path / "r" / "checkpoint.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["model.fc3.weight"] = torch.zeros(7, 84)
    save_file(tensors, str(path), metadata=meta)
    result = cli("train", "--resume", tmp_path / "r", "--epochs", "2")
    one_line(result, 2, "does not match model")


def test_ctrl_c_is_reported_as_an_interruption(monkeypatch, tiny_data_dir: Path, tmp_path: Path) -> None:
    """A KeyboardInterrupt anywhere in a command prints 'interrupted:', not 'error:', and exits 130."""
    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", stop)
    result = cli("train", "--data-dir", tiny_data_dir, "-o", tmp_path / "r")
    assert result.exit_code == 130
    assert "interrupted:" in result.output and "error:" not in result.output and "Traceback" not in result.output


def test_an_unexpected_exception_is_one_line(monkeypatch, tiny_data_dir: Path, tmp_path: Path) -> None:
    """A bug surfaces as one line naming CIFARCTL_DEBUG, exit 1, not a traceback."""
    def boom(*args, **kwargs):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(train_module, "train", boom)
    result = cli("train", "--data-dir", tiny_data_dir, "-o", tmp_path / "r")
    one_line(result, 1, "CIFARCTL_DEBUG")


@pytest.mark.parametrize("args", [["train", "--batch-size", "0"], ["train", "--lr", "abc"], ["nope"],
                                  ["predict"], ["evaluate", "--split", "valid"]])
def test_usage_errors_from_the_parser_are_one_line(args: list[str]) -> None:
    """A value the option parser rejects, an unknown command or a missing argument: one line and exit 2."""
    result = subprocess.run([sys.executable, "-m", "cifarctl", *args], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error:") and "--help" in result.stderr
