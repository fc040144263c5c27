"""The Python API: `cifarctl.load`, `cifarctl.train` and `cifarctl.evaluate` (docs/python.md).

The same core as the command line, with keyword arguments named like its options, typed results
with the fields of its `--json` output, and CifarctlError subclasses instead of exit codes.
Nothing prints unless asked (`progress=True`, to stderr), and torch's process-wide settings are
left as they were.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cifarctl.errors import UsageError
from cifarctl.progress import PlainReporter, Reporter

ImageInput = Any  # a path (str or Path), a PIL image, or a uint8 HWC numpy array


@dataclass(frozen=True)
class Prediction:
    """One image's class, its probability, and the `top_k` most probable (class, probability) pairs."""

    class_name: str
    probability: float
    top_k: list[tuple[str, float]]


class Classifier:
    """A loaded model: `predict` images; `class_names`, `model` (its name), `mean`, `std` describe it.

    `module` is the torch.nn.Module for weights files, None for an .onnx file (run by onnxruntime).
    """

    def __init__(self, path: Path, model: str, class_names: list[str], mean: list[float], std: list[float],
                 probabilities: Any, module: Any = None, image_size: int = 32) -> None:
        self.path, self.model, self.class_names, self.image_size = path, model, list(class_names), image_size
        self.mean, self.std, self.module = list(mean), list(std), module
        self._probabilities = probabilities

    def __repr__(self) -> str:
        return f"Classifier(model={self.model!r}, classes={len(self.class_names)}, path={str(self.path)!r})"

    def predict(self, images: ImageInput | list[ImageInput], top_k: int = 3,
                batch_size: int = 256) -> Prediction | list[Prediction]:
        """Classify one image (-> Prediction) or a list of them, or an (N, S, S, 3) array (-> list).

        Every input is prepared as `cifarctl predict` prepares files: RGB, centre-cropped, resized
        with Lanczos to the model's image size S (32 for CIFAR).
        """
        single = not isinstance(images, (list, tuple)) and not (isinstance(images, np.ndarray) and images.ndim == 4)
        items = [images] if single else list(images)
        size = self.image_size
        batch = np.stack([to_array(x, size) for x in items]) if items else np.zeros((0, size, size, 3), np.uint8)
        k = max(1, min(int(top_k), len(self.class_names)))
        out: list[Prediction] = []
        for start in range(0, len(batch), batch_size):
            probs = self._probabilities(batch[start:start + batch_size])
            order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            for row, best in zip(probs, order):
                pairs = [(self.class_names[c], float(row[c])) for c in best.tolist()]
                out.append(Prediction(pairs[0][0], pairs[0][1], pairs))
        return out[0] if single else out


def to_array(image: ImageInput, size: int = 32) -> np.ndarray:
    """Any supported input -> (size, size, 3) uint8 RGB, through the same steps as `cifarctl predict`."""
    from cifarctl.images import ImageError, load_image, preprocess

    if isinstance(image, (str, Path)):
        return load_image(image, size)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise UsageError(f"an image array must be uint8 HWC (H, W, 3) RGB, not {image.dtype} {image.shape}")
        if image.shape == (size, size, 3):
            return np.ascontiguousarray(image)
        from PIL import Image

        image = Image.fromarray(image)
    if hasattr(image, "mode") and hasattr(image, "convert"):  # a PIL image
        try:
            return preprocess(image, size)
        except Exception as err:
            raise ImageError(f"cannot use this image ({type(err).__name__}: {err})") from err
    raise UsageError(f"cannot classify a {type(image).__name__}; pass a path, a PIL image or a uint8 HWC array")


def load(path: str | Path | None = None, device: str = "cpu") -> Classifier:
    """The model in a weights file, run directory or exported .onnx file; None or "pretrained": the bundled one."""
    from cifarctl import pretrained
    from cifarctl.onnx_runtime import is_onnx
    from cifarctl.rundir import weights_file

    weights_path = pretrained.path() if path is None else weights_file(Path(path), note=None)
    if is_onnx(weights_path):
        from cifarctl.onnx_runtime import load_onnx, softmax

        onnx = load_onnx(weights_path)
        return Classifier(weights_path, onnx.meta["model"], onnx.class_names, onnx.meta["mean"], onnx.meta["std"],
                          lambda images: softmax(onnx.logits(images)), image_size=onnx.image_size)
    import torch

    from cifarctl.device import resolve_device
    from cifarctl.metrics import predict_logits
    from cifarctl.weights import load_weights

    w = load_weights(weights_path, str(resolve_device(device)))

    def probabilities(images: np.ndarray) -> np.ndarray:
        return torch.softmax(predict_logits(w, images), 1).cpu().numpy()

    return Classifier(weights_path, w.meta["model"], w.class_names, w.meta["mean"], w.meta["std"], probabilities,
                      w.model, w.image_size)


@dataclass
class _Result:
    """Fields named like the keys of a command's `--json` output; keys a newer core adds and this
    class does not name yet land in `extra`, so that an upgrade never breaks a caller."""

    def to_dict(self) -> dict[str, Any]:
        """The same object `--json` prints."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**values, **getattr(self, "extra", {})}


@dataclass
class TrainResult(_Result):
    """What `cifarctl train --json` prints (docs/train.md)."""

    run_dir: str
    weights: str
    model: str
    epochs: int
    test_accuracy: float
    test_accuracy_plain: float
    tta: str
    time_s: float
    train_time_s: float
    images_per_s: float | None
    device: str
    world_size: int
    seed: int
    files: dict[str, str] = field(default_factory=dict)
    dataset: str | None = None
    val_split: float = 0.0
    val_accuracy: float | None = None
    val_loss: float | None = None
    best_epoch: int | None = None
    stop_reason: str = "epochs"
    epochs_run: int | None = None
    compiled_graphs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluateResult(_Result):
    """What `cifarctl evaluate --json` prints (docs/evaluate.md)."""

    weights: str
    model: str
    split: str
    images: int
    device: str
    accuracy: float
    top3_accuracy: float
    loss: float
    correct: int
    correct_top3: int
    time_s: float
    images_per_s: float
    class_names: list[str]
    per_class: list[dict[str, Any]]
    confusion: list[list[int]]
    files: dict[str, str] = field(default_factory=dict)
    dataset: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# `cifarctl train` options that the API takes by the same name (underscores for dashes).
TRAIN_OPTIONS = ("model", "batch_size", "epochs", "lr", "momentum", "weight_decay", "bias_lr_scale", "seed",
                 "deterministic", "log_every", "nesterov", "label_smoothing", "schedule", "warmup_epochs", "flip",
                 "crop_pad", "cutout", "lookahead", "width", "precision", "channels_last", "compile", "tta",
                 "normalization", "output_dir", "overwrite", "device", "data_dir")


def _reporter(progress: bool) -> Reporter:
    return PlainReporter(sys.stderr) if progress else Reporter()


def _result(cls: type, summary: dict[str, Any]) -> Any:
    """A result dataclass from a core summary."""
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    return cls(**{k: v for k, v in summary.items() if k in names},
               extra={k: v for k, v in summary.items() if k not in names})


def train(*, resume: str | Path | None = None, gpu: bool = False, progress: bool = True,
          **options: Any) -> TrainResult:
    """Train like `cifarctl train`, e.g. `train(model="fast", epochs=2, data_dir="data", progress=False)`."""
    from cifarctl.config import train_config
    from cifarctl.train import train as core_train

    unknown = sorted(set(options) - set(TRAIN_OPTIONS) - {"compile_model"})
    if unknown:
        hint = " (--nproc is for the command line)" if {"nproc", "dist_timeout"} & set(unknown) else ""
        raise UsageError(f"unknown train option {unknown[0]!r}{hint}; the options are {', '.join(TRAIN_OPTIONS)}")
    if "compile_model" in options:
        options["compile"] = options.pop("compile_model")
    if gpu:
        options["device"] = options.get("device") or "cuda"
    overrides = {k: (v.value if hasattr(v, "value") else v) for k, v in options.items() if v is not None}
    for key in ("output_dir", "data_dir"):
        if key in overrides:
            overrides[key] = Path(overrides[key])
    resume_path = Path(resume) if resume is not None else None
    values = dict(overrides)
    cfg = train_config() if resume_path is not None else train_config(values.pop("model", "tutorial"), **values)
    summary = core_train(cfg, _reporter(progress), resume=resume_path, overrides=overrides)
    return _result(TrainResult, summary)


def evaluate(weights: str | Path | None = None, *, per_class: bool = True, confusion: bool = False,
             split: str = "test", batch_size: int = 1000, device: str = "auto", gpu: bool = False,
             output_dir: str | Path | None = None, data_dir: str | Path | None = None,
             progress: bool = False) -> EvaluateResult:
    """Score a weights file like `cifarctl evaluate`; None: runs/latest, else the bundled weights.

    The result always holds the per-class rows and the confusion matrix (`per_class` is accepted
    for symmetry with the command); `confusion=True` also writes confusion.png.
    """
    from cifarctl.config import EvaluateConfig
    from cifarctl.evaluation import evaluate_file

    del per_class  # the summary always has the rows; the flag only changes what the CLI shows
    cfg = EvaluateConfig(split=split, batch_size=batch_size, device="cuda" if gpu and device == "auto" else device,
                         confusion=confusion, output_dir=None if output_dir is None else Path(output_dir))
    if weights is not None:
        cfg.weights = Path(weights)
    if data_dir is not None:
        cfg.data_dir = Path(data_dir)
    return _result(EvaluateResult, evaluate_file(cfg, _reporter(progress)))
