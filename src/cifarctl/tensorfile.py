"""safetensors files, the one format cifarctl stores tensors in (weights, checkpoints, dataset
caches): written atomically, read with every failure turned into one exception type. Nothing in
them is ever unpickled."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cifarctl import fsutil


class TensorFileError(Exception):
    """A file that safetensors cannot read: missing, truncated or garbled; the message says which."""


def save(path: Path | str, tensors: dict[str, Any], metadata: dict[str, str],
         check: Callable[[Path], None] | None = None) -> None:
    """Write torch tensors or numpy arrays (not mixed) and string metadata to `path` atomically.

    Torch tensors are copied to contiguous CPU memory first (which also breaks shared storage,
    which safetensors refuses). `check(tmp)` may read the written file back and raise before it
    replaces the old one.
    """
    if any(hasattr(v, "detach") for v in tensors.values()):
        from safetensors.torch import save_file

        data = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    else:
        import numpy as np
        from safetensors.numpy import save_file

        data = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    with fsutil.atomic_path(path) as tmp:
        save_file(data, str(tmp), metadata=metadata)
        if check is not None:
            check(tmp)


def load(path: Path | str, framework: str = "pt") -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, as torch tensors ("pt") or numpy arrays ("np")."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise TensorFileError("missing")
    try:
        with safe_open(str(path), framework=framework) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as err:  # safetensors raises several types for truncated or garbled files
        first = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise TensorFileError(f"unreadable: {first}") from err


def read_metadata(path: Path | str) -> dict[str, str]:
    """Only the metadata of a safetensors file, without reading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # as in `load`
        first = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise TensorFileError(f"unreadable: {first}") from err
