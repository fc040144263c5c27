"""Resumable training state in one safetensors file: tensors for weights, optimizer buffers,
the epoch's shuffle order and RNG states; JSON metadata for the rest. Loading it runs no code."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarctl import tensorfile
from cifarctl.errors import UsageError


def rng_state(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every random-number state a run depends on, as (tensors, JSON-able values).

    `generators` are the run's own torch generators (shuffling, augmentation), saved by name.
    """
    tensors = {"rng.torch": torch.get_rng_state()}
    tensors.update({f"rng.{name}": g.get_state() for name, g in generators.items()})
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    values = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, key.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, values


def set_rng_state(tensors: dict[str, torch.Tensor], values: dict[str, Any],
                  generators: dict[str, torch.Generator], path: Path | str = "file") -> None:
    """Restore what `rng_state` captured; a state the generators refuse is a damaged checkpoint."""
    missing = [f"rng.{name}" for name in generators if f"rng.{name}" not in tensors]
    if missing:
        raise damaged(path, f"no {missing[0]} tensor")
    try:
        torch.set_rng_state(tensors["rng.torch"])
        for name, g in generators.items():
            g.set_state(tensors[f"rng.{name}"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        version, internal, gauss = values["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, key, pos, has_gauss, cached = values["numpy"]
        np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    except (RuntimeError, ValueError, TypeError) as err:
        raise damaged(path, f"a random-number state is refused: {str(err).splitlines()[0][:80]}") from err


def save(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write a checkpoint atomically; `meta` must be JSON-able."""
    tensorfile.save(path, tensors, {"cifarctl_checkpoint": json.dumps(meta)})


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by `save`, checked by `validate`."""
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path}; is it a cifarctl run directory?")
    try:
        tensors, metadata = tensorfile.load(path)
    except tensorfile.TensorFileError as err:
        raise UsageError(f"checkpoint {path} is {err}; start a new run") from err
    text = metadata.get("cifarctl_checkpoint")
    if text is None:
        raise damaged(path, "no cifarctl_checkpoint metadata")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise damaged(path, "its metadata is not JSON") from err
    validate(meta, tensors, path)
    return tensors, meta


def damaged(path: Path | str, what: str) -> UsageError:
    """The one-line error for a checkpoint that does not hold what `save` writes."""
    return UsageError(f"checkpoint {path} is damaged or not from cifarctl ({what}); start a new run")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _words(value: Any, n: int) -> bool:
    """A list of n unsigned 32-bit integers: a Mersenne Twister key."""
    return isinstance(value, list) and len(value) == n and all(_count(v) and v < 2**32 for v in value)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate(meta: Any, tensors: dict[str, torch.Tensor], path: Path | str) -> None:
    """Check that `meta` and the tensors have the keys, types and ranges `save` writes and resuming
    reads; raise one `damaged` line naming the first thing that is wrong."""
    if not isinstance(meta, dict):
        raise damaged(path, "its metadata is not an object")
    for key in ("epoch", "step"):
        if not _count(meta.get(key)):
            raise damaged(path, f"{key!r} is not a count but {str(meta.get(key))[:40]!r}")
    if not (_finite(meta.get("elapsed_s")) and meta["elapsed_s"] >= 0):
        raise damaged(path, f"'elapsed_s' is not a time in seconds but {str(meta.get('elapsed_s'))[:40]!r}")
    if not isinstance(meta.get("config"), dict):
        raise damaged(path, "'config' is not an object")
    names = meta.get("class_names", [])  # absent from checkpoints older than the key
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise damaged(path, "'class_names' is not a list of names")
    if not isinstance(meta.get("dataset", {}), dict):
        raise damaged(path, "'dataset' is not an object")
    if meta["step"] and "perm" not in tensors:  # mid-epoch, the rest of the epoch's order is needed
        raise damaged(path, f"stopped at step {meta['step']} but holds no 'perm' shuffle order")
    problem = _rng_problem(meta.get("rng")) or _tensor_problem(tensors)
    if problem:
        raise damaged(path, problem)


def _rng_problem(values: Any) -> str | None:
    """What is wrong with the JSON part of `rng_state`'s output: random.getstate() and np.random.get_state()."""
    if not isinstance(values, dict):
        return "'rng' is not an object"
    py, npy = values.get("python"), values.get("numpy")
    # random.getstate(): (version 3, 624 key words + position 0..624, cached gauss or None)
    if not (isinstance(py, list) and len(py) == 3 and py[0] == 3 and _words(py[1], 625) and py[1][-1] <= 624
            and (py[2] is None or _finite(py[2]))):
        return "'rng.python' is not a Python random state"
    # np.random.get_state(): ("MT19937", 624 key words, position 0..624, has_gauss 0/1, cached gauss)
    if not (isinstance(npy, list) and len(npy) == 5 and npy[0] == "MT19937" and _words(npy[1], 624)
            and _count(npy[2]) and npy[2] <= 624 and _count(npy[3]) and npy[3] <= 1 and _finite(npy[4])):
        return "'rng.numpy' is not a NumPy random state"
    return None


def _tensor_problem(tensors: dict[str, torch.Tensor]) -> str | None:
    """Generator states are byte vectors (the CPU one of a fixed size); the shuffle order is a
    permutation; weights and optimizer buffers are finite."""
    state = tensors.get("rng.torch")
    if state is None or state.dtype != torch.uint8 or tuple(state.shape) != tuple(torch.get_rng_state().shape):
        return "no valid 'rng.torch' tensor"
    for key, value in tensors.items():
        if key.startswith("rng.") and (value.dtype != torch.uint8 or value.dim() != 1):
            return f"{key!r} is not a uint8 vector"
        if value.is_floating_point() and not torch.isfinite(value).all():
            return f"{key!r} holds NaN or infinite values"
    perm = tensors.get("perm")
    if perm is not None and (perm.dtype != torch.int64 or perm.dim() != 1
                             or not torch.equal(perm.sort().values, torch.arange(len(perm)))):
        return "'perm' is not a permutation"
    return None


def read_config(path: Path) -> dict[str, Any]:
    """The run's saved config (TrainConfig.to_json()) from a checkpoint's metadata alone; its
    tensors are read and the whole checkpoint validated once, later, by `load`."""
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path}; is it a cifarctl run directory?")
    try:
        meta = json.loads(tensorfile.read_metadata(path).get("cifarctl_checkpoint") or "null")
    except tensorfile.TensorFileError as err:
        raise UsageError(f"checkpoint {path} is {err}; start a new run") from err
    except (ValueError, RecursionError) as err:
        raise damaged(path, "its metadata is not JSON") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise damaged(path, "'config' is not an object")
    return meta["config"]


GROUPS = ("model", "momentum", "lookahead")  # state dicts stored under "<group>.<key>"


def pack(**groups: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One flat tensor dict from named state dicts: pack(model={"fc1.weight": w}) -> {"model.fc1.weight": w}."""
    return {f"{group}.{key}": value for group, values in groups.items() for key, value in values.items()}


def unpack(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Undo `pack` for every group in GROUPS (an empty dict for a group the checkpoint lacks)."""
    out: dict[str, dict[str, torch.Tensor]] = {group: {} for group in GROUPS}
    for key, value in tensors.items():
        group, _, rest = key.partition(".")
        if group in out and rest:
            out[group][rest] = value
    return out


_FIX = "resume with the model and --data-dir the run was started with, or start a new run"


def check_dataset(path: Path | str, meta: dict[str, Any], class_names: list[str]) -> None:
    """Refuse in one line to resume on a dataset with other classes than the run's. Checkpoints
    written before `class_names` was stored pass; `check_compatible`'s shape check covers them."""
    saved = meta.get("class_names")
    if saved is not None and list(saved) != list(class_names):
        raise UsageError(f"checkpoint {path} was trained on {len(saved)} classes ({_names(saved)}), "
                         f"this dataset has {len(class_names)} ({_names(class_names)}); {_FIX}")


def check_compatible(meta: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path | str, *, model: str,
                     class_names: list[str], state: dict[str, torch.Tensor] | None = None,
                     dataset: dict[str, Any] | None = None) -> None:
    """Refuse, in one line, to resume a checkpoint into another model or onto another dataset.

    `state` is the freshly built model's state_dict: the checkpoint's `model.*` tensors must have
    its names and shapes (this is what catches another class count in checkpoints that predate the
    `class_names` key). `dataset` holds facts about the training set, such as `train_count`; only
    keys the checkpoint also recorded (meta["dataset"], or the length of its shuffle order) are compared.
    """
    saved_model = meta["config"].get("model")
    if saved_model != model:
        raise UsageError(f"checkpoint {path} is of model {str(saved_model)[:40]!r}, not {model!r}; {_FIX}")
    check_dataset(path, meta, class_names)
    recorded = {**(meta.get("dataset") or {}), **({"train_count": len(tensors["perm"])} if "perm" in tensors else {})}
    for key, value in (dataset or {}).items():
        if recorded.get(key) is not None and value is not None and recorded[key] != value:
            raise UsageError(f"checkpoint {path} was made from another dataset ({key} {str(recorded[key])[:40]}, "
                             f"here {str(value)[:40]}); {_FIX}")
    if state is not None:
        _check_state(tensors, path, model, state)


def _names(names: list[Any]) -> str:
    text = ", ".join(map(str, names[:4]))
    return text + ", ..." if len(names) > 4 else text


def _check_state(tensors: dict[str, torch.Tensor], path: Path | str, model: str,
                 state: dict[str, torch.Tensor]) -> None:
    """The checkpoint's weights have exactly the model's names and shapes; momentum buffers a subset of them."""
    groups = unpack(tensors)
    saved, momentum = groups["model"], groups["momentum"]
    missing, extra = sorted(set(state) - set(saved)), sorted(set(saved) - set(state))
    if missing or extra:
        what = f"missing model.{missing[0]}" if missing else f"unexpected model.{extra[0]}"
        raise UsageError(f"checkpoint {path} does not match model {model!r} ({what}); {_FIX}")
    # in the model's own order, so that the first layer that differs is the one named
    for group, values in (("model", saved), ("momentum", momentum)):
        for key in [k for k in state if k in values] + sorted(set(values) - set(state)):
            expected, value = state.get(key), values[key]
            if expected is None or value.shape != expected.shape:
                what = "belongs to no weight" if expected is None else \
                    f"has shape {tuple(value.shape)}, expected {tuple(expected.shape)}"
                raise UsageError(f"checkpoint {path} does not match model {model!r} ({group}.{key} {what}); {_FIX}")
