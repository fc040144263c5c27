"""`cifarctl train`: run files, weights round trip, exact resume, interruption and failure modes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from cifarctl.cli import app
from cifarctl.models import build_model
from cifarctl.weights import load_weights
from conftest import write_tiny_cache

runner = CliRunner()


def _cli(*args: str):
    return runner.invoke(app, list(args))


def test_train_writes_every_run_file_and_weights_round_trip(tiny_data_dir: Path, tmp_path: Path) -> None:
    """A CLI run writes weights, metrics, config, curves and checkpoint; the weights rebuild the model exactly."""
    run = tmp_path / "runs" / "r1"
    result = _cli("train", "--data-dir", str(tiny_data_dir), "--epochs", "2", "--seed", "1", "-o", str(run),
                  "--log-every", "10", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for name in ("weights.safetensors", "metrics.csv", "config.json", "curves.png", "checkpoint.safetensors"):
        assert (run / name).is_file(), name
    assert (tmp_path / "runs" / "latest").resolve() == run.resolve()
    assert summary["epochs"] == 2 and 0 <= summary["test_accuracy"] <= 1

    weights = load_weights(run / "weights.safetensors")
    assert weights.meta["model"] == "tutorial" and weights.meta["epochs"] == "2"
    assert weights.meta["mean"] == [0.5, 0.5, 0.5] and len(weights.class_names) == 10
    ckpt = load_file(str(run / "checkpoint.safetensors"))
    same = build_model("tutorial", weights.meta["model_config"])
    same.load_state_dict({k[6:]: v for k, v in ckpt.items() if k.startswith("model.")})
    x = torch.randn(8, 3, 32, 32)
    assert torch.equal(weights.model(x), same.eval()(x))
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("kind,epoch,step") and sum(r.startswith("epoch,") for r in rows) == 2


def test_gpu_without_cuda_is_a_clear_usage_error(tiny_data_dir: Path, tmp_path: Path) -> None:
    """--gpu on a machine without CUDA exits 2 with one line that says so."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = _cli("train", "--data-dir", str(tiny_data_dir), "--gpu", "-o", str(tmp_path / "r"))
    assert result.exit_code == 2
    assert "no CUDA GPU is available" in result.output
    assert "Traceback" not in result.output


def test_non_finite_loss_stops_and_keeps_last_good_weights(tiny_data_dir: Path, tmp_path: Path) -> None:
    """A loss that turns NaN stops the run with a non-zero exit naming the step; earlier weights stay intact."""
    run = tmp_path / "r"
    assert _cli("train", "--data-dir", str(tiny_data_dir), "--epochs", "1", "--seed", "0", "-o", str(run)).exit_code == 0
    before = {p.name: p.read_bytes() for p in (run / "weights.safetensors", run / "checkpoint.safetensors")}
    result = _cli("train", "--resume", str(run), "--epochs", "2", "--lr", "1e4")
    assert result.exit_code == 1
    assert "NaN or infinite at epoch 2, step" in result.output
    assert {p: (run / p).read_bytes() for p in before} == before


def _train_cmd(data_dir: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cifarctl", "train", "--data-dir", str(data_dir), "-o", str(run), "--epochs", "2",
            "--seed", "0", "--deterministic", "--device", "cpu", "--log-every", "100000", *extra]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A dataset big enough that an epoch takes a second, and the weights of an uninterrupted run."""
    data_dir = write_tiny_cache(tmp_path_factory.mktemp("d") / "data", n_train=4000, n_test=50)
    run = tmp_path_factory.mktemp("full") / "run"
    subprocess.run(_train_cmd(data_dir, run), check=True, capture_output=True)
    return data_dir, load_file(str(run / "weights.safetensors"))


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_resume_after_sigkill_in_epoch_two_is_bit_identical(resume_data, tmp_path: Path) -> None:
    """A run killed with SIGKILL during epoch 2 and resumed ends with exactly the uninterrupted run's weights."""
    data_dir, full = resume_data
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(data_dir, run), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _wait_for(run / "weights.safetensors", proc)  # written at the end of epoch 1
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert load_file(str(run / "weights.safetensors")) != {}  # epoch 1's weights survive the kill
    subprocess.run([sys.executable, "-m", "cifarctl", "train", "--resume", str(run)], check=True, capture_output=True)
    _assert_identical(load_file(str(run / "weights.safetensors")), full)


def _signal_mid_run(data_dir: Path, run: Path, sig: int, *extra: str, after_steps: int = 100) -> tuple[int, str]:
    """Start a run, send `sig` once it has logged its first loss (after `after_steps` steps), and
    return (exit code, output). Waiting for the log line, not a fixed delay, lands the signal
    mid-epoch on a fast machine and a slow one alike."""
    proc = subprocess.Popen(_train_cmd(data_dir, run, *extra, "--log-every", str(after_steps)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "loss:" in line:
            break
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=60)
    return proc.returncode, "".join(seen) + rest


@pytest.mark.slow
def test_resume_after_sigint_mid_epoch_is_bit_identical(resume_data, tmp_path: Path) -> None:
    """Ctrl-C mid-epoch saves a checkpoint, exits 130 with the resume command; resuming gives identical weights."""
    data_dir, full = resume_data
    run = tmp_path / "run"
    code, output = _signal_mid_run(data_dir, run, signal.SIGINT)
    assert code == 130, output
    assert f"cifarctl train --resume {run}" in output
    assert "Traceback" not in output
    with safe_open(str(run / "checkpoint.safetensors"), "pt") as f:
        ckpt_meta = json.loads(f.metadata()["cifarctl_checkpoint"])
    assert ckpt_meta["step"] > 0, "the interrupt should land mid-epoch"
    subprocess.run([sys.executable, "-m", "cifarctl", "train", "--resume", str(run)], check=True, capture_output=True)
    _assert_identical(load_file(str(run / "weights.safetensors")), full)


def test_sigterm_exits_143_with_a_checkpoint(resume_data, tmp_path: Path) -> None:
    """SIGTERM finishes the step, writes the checkpoint and exits 143."""
    data_dir, _ = resume_data
    run = tmp_path / "run"
    code, output = _signal_mid_run(data_dir, run, signal.SIGTERM)
    assert code == 143, output
    assert (run / "checkpoint.safetensors").is_file()
    assert os.path.getsize(run / "checkpoint.safetensors") > 0


def test_fast_model_trains_with_augmentation_and_records_tta(tiny_data_dir: Path, tmp_path: Path) -> None:
    """--model fast trains with its preset (augmentation, bf16, TTA) and its weights say which TTA they use."""
    run = tmp_path / "fast"
    result = _cli("train", "--model", "fast", "--width", "8,16,16", "-b", "32", "--epochs", "1",
                  "--data-dir", str(tiny_data_dir), "-o", str(run), "--seed", "0", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tta"] == "flip-translate" and 0 <= summary["test_accuracy_plain"] <= 1
    weights = load_weights(run / "weights.safetensors")
    assert weights.meta["tta"] == "flip-translate" and weights.meta["model_config"]["widths"] == [8, 16, 16]
    from cifarctl.device import resolve_precision

    assert weights.meta["precision"] == resolve_precision("auto", torch.device("cpu"))  # bf16 where native


def test_resume_restores_augmentation_state_exactly(tiny_data_dir: Path, tmp_path: Path) -> None:
    """A fast run stopped after epoch 1 and resumed ends with the weights of an uninterrupted run."""
    common = ["--model", "fast", "--width", "8,16,16", "-b", "32", "--schedule", "constant", "--lr", "0.05",
              "--data-dir", str(tiny_data_dir), "--seed", "3", "--cutout", "4", "--flip", "random", "--no-lookahead"]
    assert _cli("train", *common, "--epochs", "2", "-o", str(tmp_path / "full")).exit_code == 0
    assert _cli("train", *common, "--epochs", "1", "-o", str(tmp_path / "part")).exit_code == 0
    result = _cli("train", "--resume", str(tmp_path / "part"), "--epochs", "2")
    assert result.exit_code == 0, result.output
    _assert_identical(load_file(str(tmp_path / "part" / "weights.safetensors")),
                      load_file(str(tmp_path / "full" / "weights.safetensors")))


@pytest.mark.slow
def test_lookahead_run_interrupted_mid_epoch_resumes_bit_identical(resume_data, tmp_path: Path) -> None:
    """A fast run with lookahead and the onecycle schedule, Ctrl-C'd mid-run and resumed, ends on the same weights."""
    data_dir, _ = resume_data
    extra = ("--model", "fast", "--width", "8,16,16", "-b", "32", "--lookahead", "--tta", "none")
    subprocess.run(_train_cmd(data_dir, tmp_path / "full", *extra), check=True, capture_output=True)
    run = tmp_path / "run"
    code, output = _signal_mid_run(data_dir, run, signal.SIGINT, *extra, after_steps=20)
    assert code == 130, output
    with safe_open(str(run / "checkpoint.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["cifarctl_checkpoint"])["step"] > 0, "the interrupt should land mid-epoch"
    subprocess.run([sys.executable, "-m", "cifarctl", "train", "--resume", str(run)], check=True, capture_output=True)
    _assert_identical(load_file(str(run / "weights.safetensors")),
                      load_file(str(tmp_path / "full" / "weights.safetensors")))
