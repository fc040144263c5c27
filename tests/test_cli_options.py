"""The CLI maps options 1:1 onto the config dataclasses: each command is checked with the core
patched out, so these tests train nothing and take milliseconds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cifarctl.cli import app
from cifarctl.config import PRESETS, TrainConfig


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def captured(monkeypatch) -> dict[str, Any]:
    """Replace each command's core function by one that records its arguments."""
    seen: dict[str, Any] = {}

    def fake_train(cfg, reporter, resume=None, overrides=None, **kwargs):
        seen.update(cfg=cfg, resume=resume, overrides=overrides)
        return {"run_dir": "r", "weights": "w", "model": cfg.model, "epochs": cfg.epochs, "test_accuracy": 0.5,
                "test_accuracy_plain": 0.5, "tta": cfg.tta, "time_s": 1.0, "train_time_s": 1.0, "images_per_s": 1.0,
                "device": "cpu", "world_size": 1, "seed": cfg.seed, "files": {}}

    def fake(name):
        def record(cfg, reporter):
            seen.update(cfg=cfg)
            return {"called": name, "errors": [], "results": []}
        return record

    import cifarctl.data
    import cifarctl.evaluation
    import cifarctl.prediction
    import cifarctl.train

    monkeypatch.setattr(cifarctl.train, "train", fake_train)
    monkeypatch.setattr(cifarctl.evaluation, "evaluate_file", fake("evaluate"))
    monkeypatch.setattr(cifarctl.prediction, "predict_files", fake("predict"))
    monkeypatch.setattr(cifarctl.data, "download", fake("download"))
    return seen


def test_train_options_map_onto_the_config_over_the_preset(captured) -> None:
    """Every train option lands in its TrainConfig field; unset ones keep the model's preset."""
    result = cli("train", "--model", "fast", "-b", "64", "--epochs", "3", "--lr", "0.2", "--momentum", "0.8",
                 "--weight-decay", "0.001", "--bias-lr-scale", "4", "--seed", "7", "--deterministic",
                 "--log-every", "9", "--no-nesterov", "--label-smoothing", "0.1", "--schedule", "constant",
                 "--warmup-epochs", "0.5", "--flip", "random", "--crop-pad", "3", "--cutout", "8", "--no-lookahead",
                 "--width", "16,32,64", "--precision", "fp32", "--no-channels-last", "--compile", "--tta", "flip",
                 "--normalization", "tutorial", "-o", "out", "--overwrite", "--device", "cpu",
                 "--dist-timeout", "30", "--data-dir", "dd", "--json")
    assert result.exit_code == 0, result.output
    cfg: TrainConfig = captured["cfg"]
    expected = dict(model="fast", batch_size=64, epochs=3, lr=0.2, momentum=0.8, weight_decay=0.001, bias_lr_scale=4.0,
                    seed=7, deterministic=True, log_every=9, nesterov=False, label_smoothing=0.1, schedule="constant",
                    warmup_epochs=0.5, flip="random", crop_pad=3, cutout=8, lookahead=False, width="16,32,64",
                    precision="fp32", channels_last=False, compile=True, tta="flip", normalization="tutorial",
                    output_dir=Path("out"), overwrite=True, device="cpu", dist_timeout=30.0, data_dir=Path("dd"))
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert json.loads(result.stdout)["model"] == "fast"


@pytest.mark.parametrize("model", sorted(PRESETS))
def test_train_without_options_is_the_preset(captured, model: str) -> None:
    """With only --model, the config is exactly that model's preset."""
    assert cli("train", "--model", model).exit_code == 0
    cfg = captured["cfg"]
    for key, value in PRESETS[model].items():
        assert getattr(cfg, key) == value, key


def test_train_gpu_means_cuda_and_resume_passes_overrides(captured) -> None:
    """--gpu becomes device cuda; with --resume only the options given are passed on as overrides."""
    assert cli("train", "--gpu").exit_code == 0
    assert captured["cfg"].device == "cuda"
    assert cli("train", "--resume", "runs/x", "--epochs", "4").exit_code == 0
    assert captured["resume"] == Path("runs/x") and captured["overrides"] == {"epochs": 4}
    result = cli("train", "--gpu", "--device", "cpu")
    assert result.exit_code == 2 and "conflicts" in result.output


def test_evaluate_predict_download_map_their_options(captured) -> None:
    """evaluate, predict and download build their configs from their options."""
    assert cli("evaluate", "w.safetensors", "--split", "train", "-b", "50", "--confusion", "-o", "o",
               "--data-dir", "dd", "--device", "cpu", "--json").exit_code == 0
    cfg = captured["cfg"]
    assert (cfg.weights, cfg.split, cfg.batch_size, cfg.confusion, cfg.output_dir, cfg.data_dir, cfg.device) == \
        (Path("w.safetensors"), "train", 50, True, Path("o"), Path("dd"), "cpu")
    assert cli("predict", "a.png", "b", "-w", "w", "-k", "2", "-b", "8", "--json").exit_code == 0
    cfg = captured["cfg"]
    assert (cfg.paths, cfg.weights, cfg.top_k, cfg.batch_size, cfg.device) == (["a.png", "b"], Path("w"), 2, 8, "auto")
    assert cli("download", "--source", "s.tar.gz", "--md5", "abc", "--force", "--data-dir", "dd",
               "--json").exit_code == 0
    cfg = captured["cfg"]
    assert (cfg.source, cfg.md5, cfg.force, cfg.data_dir) == ("s.tar.gz", "abc", True, Path("dd"))


def test_help_does_not_break_choices_at_80_columns() -> None:
    """`train --help` at 80 columns keeps every option name and the model choices whole."""
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    assert "tutorial, fast or" in result.output and "<tutorial|fast|r" not in result.output
    for panel in ("Model and recipe", "Output", "Devices and scale-out", "Data"):
        assert panel in result.output
