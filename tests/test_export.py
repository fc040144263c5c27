"""`cifarctl export`: ONNX and pt2 files that compute what the PyTorch model computes, carry their
metadata, check themselves before they are written, and run in `predict` without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cifarctl import export
from cifarctl.cli import app
from cifarctl.data import CLASSES
from cifarctl.models import build_model
from cifarctl.weights import load_weights, save_weights
from modelfiles import brightness_class, brightness_weights

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def legacy(monkeypatch) -> None:
    """The TorchScript-based exporter: the same graph in a fraction of a second (the dynamo one takes seconds)."""
    monkeypatch.setattr(export, "_has_onnxscript", lambda: False)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return brightness_weights(tmp_path_factory.mktemp("w") / "weights.safetensors")


def fast_weights(path: Path, tta: str) -> Path:
    """A small random `fast` model (its BatchNorm statistics made non-trivial) recorded with a TTA mode."""
    torch.manual_seed(0)
    config = {"num_classes": 10, "widths": [8, 8, 8]}
    model = build_model("fast", config)
    state = {k: (v + torch.rand_like(v) if k.endswith("running_var") else v) for k, v in model.state_dict().items()}
    save_weights(path, state, {"model": "fast", "model_config": config, "class_names": list(CLASSES),
                               "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26], "tta": tta})
    return path


def props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_onnx_export_round_trip(weights: Path, tiny_data_dir: Path, tmp_path: Path, legacy) -> None:
    """An ONNX export verifies itself, has a dynamic batch axis, and takes plain [0, 1] pixels."""
    out = tmp_path / "model.onnx"
    result = cli("export", weights, "--data-dir", tiny_data_dir, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["verify"]["top1_agreement"] == 1.0 and summary["verify"]["images"] == 100
    assert summary["verify"]["max_logit_diff"] <= summary["verify"]["tolerance"]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        m = np.full((n, 3, 32, 32), 200 / 255, np.float32)
        assert sess.run(None, {"pixels": m})[0].shape == (n, 10)
        assert sess.run(None, {"pixels": m})[0].argmax(1).tolist() == [brightness_class(200)] * n


def test_onnx_metadata(weights: Path, tiny_data_dir: Path, tmp_path: Path, legacy) -> None:
    """The ONNX file names its classes, mean/std, model, version and TTA in metadata_props."""
    out = tmp_path / "model.onnx"
    assert cli("export", weights, "--data-dir", tiny_data_dir, "-o", out).exit_code == 0
    meta = props(out)
    assert json.loads(meta["class_names"]) == list(CLASSES) and meta["model"] == "tutorial"
    assert json.loads(meta["mean"]) == [0.5] * 3 and json.loads(meta["std"]) == [0.5] * 3
    assert meta["tta"] == "none" and meta["cifarctl_version"] and meta["format"] == "cifarctl-onnx"


def test_tta_export_matches_pytorch(tiny_data_dir: Path, tmp_path: Path, legacy) -> None:
    """--tta bakes the weights' TTA into the graph: its logits are what PyTorch computes with TTA."""
    from cifarctl.metrics import predict_logits

    w = fast_weights(tmp_path / "fast.safetensors", "flip-translate")
    summary = export.export_file(w, "onnx", tmp_path / "fast.onnx", tta=True, data_dir=tiny_data_dir)
    assert summary["tta"] == "flip-translate" and props(tmp_path / "fast.onnx")["tta"] == "flip-translate"
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    sess = ort.InferenceSession(str(tmp_path / "fast.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"pixels": images.transpose(0, 3, 1, 2).astype(np.float32) / 255})[0]
    expected = predict_logits(load_weights(w), images).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_dynamo_exporter(weights: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    """With onnxscript installed the default is torch.export's ONNX exporter, and its file verifies too."""
    pytest.importorskip("onnxscript")
    summary = export.export_file(weights, "onnx", tmp_path / "m.onnx", data_dir=tiny_data_dir)
    assert summary["exporter"] == "dynamo" and summary["verify"]["top1_agreement"] == 1.0
    assert json.loads(props(tmp_path / "m.onnx")["class_names"]) == list(CLASSES)


def test_tta_is_off_by_default(tiny_data_dir: Path, tmp_path: Path, legacy) -> None:
    """Without --tta the graph is the plain model, and the metadata says so."""
    w = fast_weights(tmp_path / "fast.safetensors", "flip")
    result = cli("export", w, "--data-dir", tiny_data_dir, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tta"] == "none" and props(tmp_path / "fast.onnx")["tta"] == "none"


def test_pt2_export_round_trip(weights: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    """A pt2 export loads with torch.export.load alone, takes any batch size, and carries the metadata."""
    out = tmp_path / "model.pt2"
    result = cli("export", weights, "--format", "pt2", "--data-dir", tiny_data_dir, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["verify"]["max_logit_diff"] == 0.0
    extra = {export.PT2_META: ""}
    program = torch.export.load(out, extra_files=extra)
    assert json.loads(json.loads(extra[export.PT2_META])["class_names"]) == list(CLASSES)
    pixels = torch.full((3, 3, 32, 32), 60 / 255)
    assert program.module()(pixels).argmax(1).tolist() == [brightness_class(60)] * 3


def _tampered(data: bytes) -> bytes:
    """The same ONNX graph with its largest weight tensor scaled: it still runs, but computes something else."""
    from onnx import numpy_helper

    model = onnx.load_from_string(data)
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * -3, init.name))
    return model.SerializeToString()


def test_corrupted_onnx_export_is_caught(weights: Path, tiny_data_dir: Path, tmp_path: Path, monkeypatch,
                                        legacy) -> None:
    """An export whose numbers differ from the PyTorch model exits 1, says by how much, and writes nothing."""
    real = export.to_onnx
    monkeypatch.setattr(export, "to_onnx", lambda *a, **k: (_tampered(real(*a, **k)[0]), "legacy"))
    out = tmp_path / "model.onnx"
    result = cli("export", weights, "--data-dir", tiny_data_dir, "-o", out)
    assert result.exit_code == 1
    assert "disagrees with the PyTorch model" in result.stderr and "max logit difference" in result.stderr
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_corrupted_pt2_export_is_caught(weights: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    """A pt2 program of another model fails the check against this one."""
    other = export.Pixels(build_model("tutorial", {"num_classes": 10}).eval(), [0.5] * 3, [0.5] * 3, "none")
    mine = export.Pixels(load_weights(weights).model, [0.5] * 3, [0.5] * 3, "none")
    with pytest.raises(export.ExportMismatch, match="disagrees"):
        export.verify(mine, export.to_pt2(other, {}), "pt2", torch.rand(8, 3, 32, 32))


def test_missing_onnxruntime_names_the_extra(weights: Path, tiny_data_dir: Path, monkeypatch) -> None:
    """Without onnxruntime, export says in one line how to install it (exit 2)."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    result = cli("export", weights, "--data-dir", tiny_data_dir)
    assert result.exit_code == 2
    assert "pip install 'cifarctl[export]'" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_output_folder_is_refused(weights: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    """-o naming a folder is refused before any work, with exit 2."""
    result = cli("export", weights, "--data-dir", tiny_data_dir, "-o", tmp_path, "--format", "pt2")
    assert result.exit_code == 2 and "error" in result.stderr


def _images(folder: Path) -> list[Path]:
    folder.mkdir()
    paths = []
    for m in (10, 90, 140, 250):
        paths.append(folder / f"grey{m}.png")
        Image.fromarray(np.full((40, 30, 3), m, np.uint8)).save(paths[-1])
    return paths


def test_predict_with_onnx_matches_safetensors(weights: Path, tiny_data_dir: Path, tmp_path: Path,
                                               legacy) -> None:
    """predict --weights model.onnx gives the classes and probabilities the weights file gives."""
    out = tmp_path / "model.onnx"
    assert cli("export", weights, "--data-dir", tiny_data_dir, "-o", out).exit_code == 0
    folder = tmp_path / "imgs"
    _images(folder)
    a = json.loads(cli("predict", folder, "--weights", weights, "--json", "-k", "3").stdout)
    b = json.loads(cli("predict", folder, "--weights", out, "--json", "-k", "3").stdout)
    assert [r["class"] for r in a["results"]] == [r["class"] for r in b["results"]]
    assert [[c["class"] for c in r["top_k"]] for r in a["results"]] == [[c["class"] for c in r["top_k"]]
                                                                         for r in b["results"]]
    assert np.allclose([r["probability"] for r in a["results"]], [r["probability"] for r in b["results"]], atol=1e-5)
    assert b["model"] == "tutorial" and b["class_names"] == list(CLASSES)


def test_predict_with_onnx_does_not_import_torch(weights: Path, tiny_data_dir: Path, tmp_path: Path,
                                                 legacy) -> None:
    """Predicting with an .onnx file never imports torch: a deployment needs onnxruntime only."""
    out = tmp_path / "model.onnx"
    assert cli("export", weights, "--data-dir", tiny_data_dir, "-o", out).exit_code == 0
    paths = _images(tmp_path / "imgs")
    code = ("import sys, json\nfrom cifarctl.cli import app\n"
            f"sys.argv = ['cifarctl', 'predict', {str(paths[0])!r}, '--weights', {str(out)!r}, '--json']\n"
            "try:\n    app(standalone_mode=False)\nfinally:\n"
            "    print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["results"][0]["class"] == CLASSES[brightness_class(10)]
    assert "NO-TORCH" in done.stderr


def test_bad_onnx_file_is_refused(tmp_path: Path) -> None:
    """An .onnx file that is not a model, or not one cifarctl exported, exits 2 with one line."""
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    img = _images(tmp_path / "imgs")[0]
    result = cli("predict", img, "--weights", bad)
    assert result.exit_code == 2 and "not a valid ONNX model" in result.stderr
    plain = tmp_path / "plain.onnx"
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 32, 32])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 32, 32])]))
    plain.write_bytes(model.SerializeToString())
    result = cli("predict", img, "--weights", plain)
    assert result.exit_code == 2 and "format=cifarctl-onnx" in result.stderr
