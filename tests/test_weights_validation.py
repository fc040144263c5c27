"""Hostile or broken weights files and checkpoints: every value is checked before it is used, and a
bad one is refused with one line naming the file and the field, never a traceback, nan% or a huge allocation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cifarctl import checkpoint
from cifarctl.cli import app
from cifarctl.data import CLASSES
from cifarctl.errors import UsageError
from cifarctl.models import build_model
from cifarctl.weights import load_weights, read_metadata, save_weights
from modelfiles import brightness_weights

NAMES = list(CLASSES)
FAST = {"num_classes": 10, "widths": [8, 8, 8], "stem": 8}


def fast(**config) -> dict:
    """Metadata naming the `fast` model with the small test config changed by `config`."""
    return {"model": "fast", "model_config": {**FAST, **config}}


# case -> (metadata changes, text the error must contain: the field it names)
BAD_META = {
    "NaN mean": ({"mean": [math.nan, 0.5, 0.5]}, "'mean'"),
    "2-number mean": ({"mean": [0.5, 0.5]}, "'mean'"),
    "mean of strings": ({"mean": ["0.5"] * 3}, "'mean'"),
    "std 0": ({"std": [0.5, 0.0, 0.5]}, "'std'"),
    "negative std": ({"std": [-0.5] * 3}, "'std'"),
    "infinite std": ({"std": [math.inf, 0.5, 0.5]}, "'std'"),
    "vanishing std": ({"std": [1e-30] * 3}, "'std'"),
    "tta bogus": ({"tta": "bogus"}, "'tta'"),
    "precision fp64": ({"precision": "fp64"}, "'precision'"),
    "image_size 100000": ({"image_size": "100000"}, "'image_size'"),
    "image_size superscript two": ({"image_size": "\u00b2"}, "'image_size'"),
    "widths [10**9]": (fast(widths=[10**9]), "'widths'"),
    "widths [-1]": (fast(widths=[-1]), "'widths'"),
    "widths 'abc'": (fast(widths="abc"), "'widths'"),
    "9 width groups": (fast(widths=[8] * 9), "'widths'"),
    "odd whitening stem": (fast(stem=7), "stem"),
    "NaN head_scale": (fast(head_scale=math.nan), "'head_scale'"),
    "whiten 'yes'": (fast(whiten="yes"), "'whiten'"),
    "num_classes 0": ({"model_config": {"num_classes": 0}}, "'num_classes'"),
    "num_classes 10**12": ({"model_config": {"num_classes": 10**12}}, "'num_classes'"),
    "num_classes 10.0": ({"model_config": {"num_classes": 10.0}}, "'num_classes'"),
    "num_classes true": ({"model_config": {"num_classes": True}}, "'num_classes'"),
    "unknown config key": ({"model_config": {"num_classes": 10, "depth": 3}}, "'depth'"),
    "config not an object": ({"model_config": [10]}, "config"),
    "model nope": ({"model": "nope"}, "unknown model 'nope'"),
    "no class names": ({"class_names": []}, "'class_names'"),
    "empty class name": ({"class_names": [""] + NAMES[1:]}, "'class_names'"),
    "duplicated class name": ({"class_names": ["cat"] + NAMES[1:]}, "'class_names'"),
    "class name of 201 characters": ({"class_names": ["x" * 201] + NAMES[1:]}, "'class_names'"),
    "class name with a terminal escape": ({"class_names": ["cat\x1b[2J"] + NAMES[1:]}, "'class_names'"),
    "9 names for 10 classes": ({"class_names": NAMES[:9]}, "'class_names'"),
    "train_config not an object": ({"train_config": [1]}, "'train_config'"),
}
# case -> (state change, text the error must contain)
BAD_TENSORS = {
    "tensor of NaNs": ({"fc1.weight": torch.full((120, 400), math.nan)}, "fc1.weight"),
    "an infinite bias": ({"fc3.bias": torch.tensor([math.inf] + [0.0] * 9)}, "fc3.bias"),
    "float64 beyond float32": ({"fc2.weight": torch.full((84, 120), 1e300, dtype=torch.float64)}, "fc2.weight"),
    "integer weights": ({"conv1.weight": torch.zeros(6, 3, 5, 5, dtype=torch.int32)}, "conv1.weight"),
    "bytes of the wrong shape": ({"fc1.weight": torch.zeros(120, 401)}, "fc1.weight"),
}


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    """No cifarctl settings from the environment."""
    for var in ("CIFARCTL_DATA_DIR", "CIFARCTL_SOURCE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of a valid brightness-rule weights file."""
    path = brightness_weights(tmp_path_factory.mktemp("good") / "weights.safetensors")
    meta = {k: v for k, v in read_metadata(path).items() if k != "format"}
    return load_file(str(path)), meta


def write(path: Path, good, meta_changes: dict | None = None, state_changes: dict | None = None) -> Path:
    """A weights file: the good one with some metadata and tensors replaced."""
    state, meta = good
    save_weights(path, {**state, **(state_changes or {})}, {**meta, **(meta_changes or {})})
    return path


def assert_one_line(err: UsageError, path: Path, field: str) -> None:
    """A usage error (exit 2) of one short line naming the file and the field."""
    message = str(err)
    assert err.exit_code == 2
    assert "\n" not in message and len(message) < 400, message
    assert str(path) in message and field in message, message


@pytest.mark.parametrize("case", list(BAD_META))
def test_bad_metadata_value_is_refused(case: str, good, tmp_path: Path) -> None:
    """A metadata value of the wrong type or out of bounds is refused in one line naming the file and field."""
    changes, field = BAD_META[case]
    path = write(tmp_path / "w.safetensors", good, changes)
    for read in (read_metadata, load_weights):
        with pytest.raises(UsageError) as info:
            read(path)
        assert_one_line(info.value, path, field)


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_bad_tensor_is_refused(case: str, good, tmp_path: Path) -> None:
    """A tensor that is not finite, not a float or of the wrong shape is refused in one line naming it."""
    changes, field = BAD_TENSORS[case]
    path = write(tmp_path / "w.safetensors", good, state_changes=changes)
    with pytest.raises(UsageError) as info:
        load_weights(path)
    assert_one_line(info.value, path, field)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_narrow_or_wide_float_weights_load_as_float32(dtype: torch.dtype, good, tmp_path: Path) -> None:
    """float16, bfloat16 and float64 weights files load, widened or rounded to float32, with the same values."""
    state, _ = good
    path = write(tmp_path / "w.safetensors", good, state_changes={k: v.to(dtype) for k, v in state.items()})
    loaded = load_weights(path).model.state_dict()
    for key, value in state.items():
        assert loaded[key].dtype == torch.float32
        assert torch.equal(loaded[key], value.to(dtype).float()), key


def test_a_huge_but_valid_config_allocates_nothing_before_the_file_is_checked(good, tmp_path: Path) -> None:
    """A small file claiming eight 4096-wide groups (2.3 G parameters) is refused from its header alone."""
    path = write(tmp_path / "w.safetensors", good, fast(widths=[4096] * 8))
    with pytest.raises(UsageError) as info:
        load_weights(path)
    assert_one_line(info.value, path, "does not match model 'fast'")


def _hand_written(path: Path, header: dict) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 16)
    return path


@pytest.mark.parametrize("header", [
    {"__metadata__": [1, 2]},
    {"__metadata__": {"format": 5}},
    {"x": {"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}},
    {"x": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}},
], ids=["metadata a list", "metadata value a number", "offsets strings", "shape a string"])
def test_malformed_header_is_refused(header: dict, tmp_path: Path) -> None:
    """A hand-made header of the wrong JSON types is refused in one line, not a TypeError traceback."""
    path = _hand_written(tmp_path / "w.safetensors", header)
    with pytest.raises(UsageError) as info:
        load_weights(path)
    assert_one_line(info.value, path, "safetensors")


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_cli_refuses(result, path: Path, field: str) -> None:
    """Exit 2, one error line naming file and field on stderr, nothing on stdout, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert str(path) in lines[0] and field in lines[0], lines[0]
    assert "Traceback" not in result.output and result.stdout == ""


CLI_CASES = ["NaN mean", "std 0", "widths [10**9]", "num_classes 10**12", "empty class name", "model nope",
             "tensor of NaNs"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_evaluate_and_predict_refuse_a_bad_file(case: str, good, tiny_data_dir: Path, tmp_path: Path) -> None:
    """`evaluate` and `predict` exit 2 with one line naming the file and field for a hostile weights file."""
    if case in BAD_META:
        path = write(tmp_path / "w.safetensors", good, BAD_META[case][0])
        field = BAD_META[case][1]
    else:
        path = write(tmp_path / "w.safetensors", good, state_changes=BAD_TENSORS[case][0])
        field = BAD_TENSORS[case][1]
    image = tmp_path / "grey.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
    assert_cli_refuses(cli("evaluate", path, "--data-dir", tiny_data_dir), path, field)
    assert_cli_refuses(cli("predict", image, "--weights", path), path, field)


def test_float16_weights_evaluate(good, tiny_data_dir: Path, tmp_path: Path) -> None:
    """A float16 weights file scores the test split like any other."""
    state, _ = good
    path = write(tmp_path / "w.safetensors", good, state_changes={k: v.half() for k, v in state.items()})
    result = cli("evaluate", path, "--data-dir", tiny_data_dir, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"] == 100


def make_checkpoint(path: Path, num_classes: int = 10, **meta_changes) -> Path:
    """A checkpoint as `cifarctl train` writes it, for a tutorial net of `num_classes` outputs;
    a meta change to None leaves that key out."""
    model = build_model("tutorial", {"num_classes": num_classes})
    generators = {"shuffle": torch.Generator().manual_seed(0), "augment": torch.Generator().manual_seed(1)}
    rng_tensors, rng_values = checkpoint.rng_state(generators)
    momentum = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    tensors = {**checkpoint.pack(model=model.state_dict(), momentum=momentum), **rng_tensors,
               "perm": torch.randperm(200)}
    meta = {"epoch": 1, "step": 3, "elapsed_s": 1.5, "config": {"model": "tutorial", "batch_size": 4},
            "rng": rng_values, "class_names": NAMES[:num_classes]}
    checkpoint.save(path, tensors, {k: v for k, v in {**meta, **meta_changes}.items() if v is not None})
    return path


def _raw(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["cifarctl_checkpoint"])


def _python_state_short(meta, tensors):
    meta["rng"]["python"][1] = [1, 2, 3]


def _nan_weight(meta, tensors):
    tensors["model.fc1.weight"][0, 0] = math.nan


def _repeated_perm(meta, tensors):
    tensors["perm"][0] = tensors["perm"][1]


DAMAGE = {
    "missing epoch": lambda meta, tensors: meta.pop("epoch"),
    "string epoch": lambda meta, tensors: meta.update(epoch="1"),
    "negative step": lambda meta, tensors: meta.update(step=-1),
    "NaN elapsed_s": lambda meta, tensors: meta.update(elapsed_s=math.nan),
    "config a string": lambda meta, tensors: meta.update(config="tutorial"),
    "no rng": lambda meta, tensors: meta.pop("rng"),
    "short Python state": _python_state_short,
    "numpy state of another kind": lambda meta, tensors: meta["rng"]["numpy"].__setitem__(0, "PCG64"),
    "class_names a string": lambda meta, tensors: meta.update(class_names="cat"),
    "no rng.torch": lambda meta, tensors: tensors.pop("rng.torch"),
    "float rng.torch": lambda meta, tensors: tensors.update({"rng.torch": tensors["rng.torch"].float()}),
    "short rng.torch": lambda meta, tensors: tensors.update({"rng.torch": tensors["rng.torch"][:100]}),
    "NaN weight": _nan_weight,
    "perm not a permutation": _repeated_perm,
    "mid-epoch without perm": lambda meta, tensors: tensors.pop("perm"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_is_refused(case: str, tmp_path: Path) -> None:
    """A checkpoint missing a key or holding a value of the wrong type or range is refused in one line."""
    path = make_checkpoint(tmp_path / "checkpoint.safetensors")
    tensors, meta = _raw(path)
    DAMAGE[case](meta, tensors)
    checkpoint.save(path, tensors, meta)
    with pytest.raises(UsageError) as info:
        checkpoint.load(path)
    assert_one_line(info.value, path, "is damaged or not from cifarctl")
    assert "start a new run" in str(info.value)


@pytest.mark.parametrize("metadata", [None, {"cifarctl_checkpoint": "{"}, {"other": "1"}],
                         ids=["no metadata", "metadata not JSON", "another program's metadata"])
def test_foreign_safetensors_file_is_not_a_checkpoint(metadata, tmp_path: Path) -> None:
    """A safetensors file cifarctl did not write as a checkpoint is refused in one line."""
    path = tmp_path / "checkpoint.safetensors"
    save_file({"x": torch.zeros(2)}, str(path), metadata=metadata)
    with pytest.raises(UsageError) as info:
        checkpoint.load(path)
    assert_one_line(info.value, path, "start a new run")


def test_valid_checkpoint_loads_and_restores(tmp_path: Path) -> None:
    """A checkpoint as training writes it loads unchanged and its random states restore."""
    path = make_checkpoint(tmp_path / "checkpoint.safetensors")
    tensors, meta = checkpoint.load(path)
    assert (meta["epoch"], meta["step"], meta["elapsed_s"]) == (1, 3, 1.5)
    generators = {"shuffle": torch.Generator(), "augment": torch.Generator()}
    checkpoint.set_rng_state(tensors, meta["rng"], generators, path)
    assert torch.equal(generators["augment"].get_state(), torch.Generator().manual_seed(1).get_state())
    with pytest.raises(UsageError) as info:
        checkpoint.set_rng_state(tensors, meta["rng"], {**generators, "dropout": torch.Generator()}, path)
    assert_one_line(info.value, path, "rng.dropout")


COMPATIBLE = {"model": "tutorial", "class_names": NAMES}
INCOMPATIBLE = {
    "another model": ({"model": "fast"}, {}, "is of model 'tutorial', not 'fast'"),
    "other classes": ({}, {"num_classes": 3}, "trained on 3 classes"),
    # checkpoints written before class_names was stored: the weights' shapes give the class count away
    "older checkpoint, other class count": ({}, {"num_classes": 3, "class_names": None},
                                            "model.fc3.weight has shape (3, 84), expected (10, 84)"),
    "another training set size": ({"dataset": {"train_count": 300}}, {}, "another dataset (train_count 200"),
}


@pytest.mark.parametrize("case", list(INCOMPATIBLE))
def test_resuming_into_another_model_or_dataset_is_refused(case: str, tmp_path: Path) -> None:
    """check_compatible refuses in one line a checkpoint from another model, class list or training set."""
    now, saved, text = INCOMPATIBLE[case]
    path = make_checkpoint(tmp_path / "checkpoint.safetensors", **saved)
    tensors, meta = checkpoint.load(path)
    model = now.get("model", "tutorial")
    state = build_model(model, FAST if model == "fast" else {}).state_dict()
    with pytest.raises(UsageError) as info:
        checkpoint.check_compatible(meta, tensors, path, **{**COMPATIBLE, **now}, state=state)
    assert_one_line(info.value, path, text)


def test_compatible_checkpoint_passes(tmp_path: Path) -> None:
    """The same model, classes and training set size pass check_compatible, with or without class_names saved."""
    tensors, meta = checkpoint.load(make_checkpoint(tmp_path / "checkpoint.safetensors"))
    state = build_model("tutorial").state_dict()
    for m in (meta, {k: v for k, v in meta.items() if k != "class_names"}):
        checkpoint.check_compatible(m, tensors, tmp_path, **COMPATIBLE, state=state, dataset={"train_count": 200})


def test_resume_from_a_damaged_checkpoint_is_one_line(tiny_data_dir: Path, tmp_path: Path) -> None:
    """`train --resume` of a run whose checkpoint was tampered with exits 2 with one line, no traceback."""
    run = tmp_path / "run"
    trained = cli("train", "--data-dir", tiny_data_dir, "--epochs", "1", "--seed", "0", "-o", run)
    assert trained.exit_code == 0, trained.output
    path = run / "checkpoint.safetensors"
    tensors, meta = _raw(path)
    checkpoint.save(path, tensors, {**meta, "epoch": "one"})
    result = cli("train", "--resume", run, "--epochs", "2")
    assert_cli_refuses(result, path, "'epoch'")
