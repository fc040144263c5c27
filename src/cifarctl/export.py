"""`export`: a weights file as a self-contained ONNX graph or torch.export program (pt2).

The exported graph takes float32 RGB pixels in [0, 1], NCHW, 32x32, with a dynamic batch size,
and returns logits: the weights' mean/std (and with `tta` their test-time augmentation) are
inside the graph, so a user feeds plain pixels. Every export is run on real test images and
compared with the PyTorch model before it is written; a mismatch writes nothing and exits 1.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarctl import __version__, fsutil, rundir
from cifarctl.config import DownloadConfig
from cifarctl.errors import CifarctlError, UsageError
from cifarctl.onnx_runtime import ONNX_FORMAT, missing_package, run_pixels, session
from cifarctl.progress import Reporter

FORMATS = ("onnx", "pt2")
EXPORTERS = ("auto", "dynamo", "legacy")
VERIFY_IMAGES = 1000  # test images every export is checked on; more only costs time
OPSET = 18
PT2_META = "cifarctl.json"  # the extra file of a pt2 archive that holds the metadata


class ExportMismatch(CifarctlError):
    """The exported file does not compute what the PyTorch model computes (exit 1)."""


class Pixels(torch.nn.Module):
    """The model behind its own preprocessing: [0, 1] pixels in, (TTA-averaged) logits out."""

    def __init__(self, model: torch.nn.Module, mean: list[float], std: list[float], tta: str) -> None:
        super().__init__()
        self.model, self.tta = model, tta
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from cifarctl.augment import tta_views

        x = (x - self.mean) / self.std
        views = tta_views(x, self.tta)
        if len(views) == 1:
            return self.model(x)
        return torch.stack([self.model(v) for v in views]).mean(0)


def default_output(weights_path: Path, fmt: str) -> Path:
    """Beside the weights file, with the format's suffix; the bundled weights export to the current folder."""
    from cifarctl import pretrained

    if weights_path == pretrained.FILE:
        return Path(weights_path.stem + "." + fmt)
    return weights_path.with_suffix("." + fmt)


def export_file(weights: Path, fmt: str = "onnx", out: Path | None = None, tta: bool = False,
                data_dir: Path | None = None, reporter: Reporter | None = None,
                exporter: str = "auto") -> dict[str, Any]:
    """Export, verify and write; returns the JSON-able summary documented in docs/export.md."""
    from cifarctl.weights import load_weights

    reporter = reporter or Reporter()
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; use {' or '.join(FORMATS)}")
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown exporter {exporter!r}; use {', '.join(EXPORTERS)}")
    if fmt == "onnx":
        _require_onnx()
    weights_path = rundir.weights_file(weights)
    w = load_weights(weights_path, "cpu")  # checked before any download or output
    out = Path(out) if out is not None else default_output(weights_path, fmt)
    fsutil.output_target(out)  # a folder or FIFO in the way is refused before the work
    mode = w.meta.get("tta", "none") if tta else "none"
    module = Pixels(w.model, w.meta["mean"], w.meta["std"], mode).eval()
    pixels = test_pixels(data_dir, reporter, w.class_names, w.meta.get("dataset"), w.image_size)
    meta = export_metadata(w.meta, mode)
    start = time.perf_counter()
    if fmt == "onnx":
        data, used = to_onnx(module, meta, exporter)
    else:
        data, used = to_pt2(module, meta), "torch.export"
    export_s = time.perf_counter() - start
    check = verify(module, data, fmt, pixels)
    fsutil.write_bytes(out, data)
    return {"weights": str(weights_path), "out": str(out), "format": fmt, "model": w.meta["model"],
            "tta": mode, "exporter": used, "bytes": len(data), "export_s": round(export_s, 3),
            "class_names": list(w.class_names), "verify": check}


def _require_onnx() -> None:
    """onnx (metadata) and onnxruntime (verification) are needed; onnxscript only for the dynamo exporter."""
    for package in ("onnx", "onnxruntime"):
        try:
            __import__(package)
        except ImportError as err:
            raise missing_package(package) from err


def test_pixels(data_dir: Path | None, reporter: Reporter, class_names: list[str], dataset: str | None = None,
                size: int = 32) -> torch.Tensor:
    """Up to VERIFY_IMAGES test images of `dataset` (default CIFAR-10) spread over the split, as
    float32 [0, 1] NCHW; they must have the model's image size."""
    from cifarctl.data import ensure_dataset

    cfg = DownloadConfig() if data_dir is None else DownloadConfig(data_dir=Path(data_dir))
    if dataset is not None:
        cfg.dataset = dataset
    split = ensure_dataset(cfg, reporter).test
    if split.images.shape[1] != size:
        raise UsageError(f"the export is checked on test images of the model's size, {size}x{size}, and "
                         f"{cfg.dataset}'s are {split.images.shape[1]}x{split.images.shape[1]}; pass the --data-dir "
                         "that holds the dataset the model was trained on")
    idx = torch.linspace(0, len(split) - 1, min(VERIFY_IMAGES, len(split))).long()
    images = torch.as_tensor(split.images)[idx]
    return images.permute(0, 3, 1, 2).float().div(255).contiguous()


def export_metadata(meta: dict[str, Any], tta: str) -> dict[str, str]:
    """What an exported file says about itself, as strings (ONNX metadata_props are strings)."""
    import torch

    size = int(meta.get("image_size", 32))
    fields = {"format": ONNX_FORMAT, "model": meta["model"], "model_config": meta["model_config"],
              "class_names": meta["class_names"], "mean": meta["mean"], "std": meta["std"], "tta": tta,
              "image_size": str(size),
              "input": f"float32 RGB in [0, 1], NCHW, {size}x{size}, any batch size; mean/std applied inside",
              "output": "logits", "cifarctl_version": __version__, "torch_version": torch.__version__}
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print progress and warn about their own internals: none of it is the user's."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def to_onnx(module: torch.nn.Module, meta: dict[str, str], exporter: str = "auto") -> tuple[bytes, str]:
    """The ONNX model's bytes with `meta` in metadata_props, and the exporter used."""
    import onnx

    size = int(meta.get("image_size", "32"))
    example = torch.rand(2, 3, size, size)
    use_dynamo = exporter == "dynamo" or (exporter == "auto" and _has_onnxscript())
    proto, used = None, "legacy"
    if use_dynamo:
        try:
            with _quiet():
                program = torch.onnx.export(module, (example,), dynamo=True, opset_version=OPSET,
                                            input_names=["pixels"], output_names=["logits"],
                                            dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
            proto, used = program.model_proto, "dynamo"
        except Exception:
            if exporter == "dynamo":
                raise
    if proto is None:  # the TorchScript-based exporter: needs no onnxscript
        buf = io.BytesIO()
        with _quiet():
            torch.onnx.export(module, (example,), buf, dynamo=False, opset_version=OPSET,
                              input_names=["pixels"], output_names=["logits"],
                              dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}})
        proto = onnx.load_from_string(buf.getvalue())
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, meta)
    return proto.SerializeToString(), used


def _has_onnxscript() -> bool:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def to_pt2(module: torch.nn.Module, meta: dict[str, str]) -> bytes:
    """torch.export's ExportedProgram saved as a .pt2 archive, `meta` as its cifarctl.json extra file."""
    size = int(meta.get("image_size", "32"))
    example = torch.rand(2, 3, size, size)
    with _quiet():
        program = torch.export.export(module, (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
        buf = io.BytesIO()  # a buffer: torch.export.save insists on a .pt2 name, and ours is a temporary one
        torch.export.save(program, buf, extra_files={PT2_META: json.dumps(meta)})
    return buf.getvalue()


def run_exported(data: bytes, fmt: str, pixels: torch.Tensor) -> np.ndarray:
    """Logits of the exported bytes on `pixels`, run the way a user would: onnxruntime or torch.export.load."""
    if fmt == "onnx":
        return run_pixels(session(data), pixels.numpy())
    with _quiet():
        program = torch.export.load(io.BytesIO(data))
    with torch.no_grad():
        return program.module()(pixels).float().numpy()


def verify(module: torch.nn.Module, data: bytes, fmt: str, pixels: torch.Tensor) -> dict[str, Any]:
    """Compare the exported file with the PyTorch module on `pixels`; ExportMismatch beyond float tolerance.

    The tolerance scales with the logits' size: float32 kernels that sum in another order differ
    by about 1e-6 relative, far below it; a wrong weight or a dropped normalisation is far above.
    """
    with torch.no_grad():
        expected = module(pixels).float().numpy()
    try:
        got = run_exported(data, fmt, pixels)
    except Exception as err:
        raise ExportMismatch(f"the exported {fmt} file does not run ({type(err).__name__}: "
                             f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}); "
                             "nothing was written; please report it") from err
    tolerance = 1e-3 * max(1.0, float(np.abs(expected).max(initial=0.0)))
    same = got.shape == expected.shape
    diff = float(np.abs(got - expected).max(initial=0.0)) if same else float("inf")
    agreement = float((got.argmax(1) == expected.argmax(1)).mean()) if same and len(got) else 0.0
    check = {"images": len(pixels), "top1_agreement": agreement, "max_logit_diff": diff, "tolerance": tolerance}
    if not (same and np.isfinite(got).all() and diff <= tolerance):
        raise ExportMismatch(f"the exported {fmt} file disagrees with the PyTorch model on {len(pixels):,} test "
                             f"images: top-1 agreement {100 * agreement:.1f}%, max logit difference {diff:.3g} "
                             f"(tolerance {tolerance:.3g}); nothing was written; please report it")
    return check
