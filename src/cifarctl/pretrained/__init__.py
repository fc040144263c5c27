"""The bundled pretrained weights: the `fast` model trained on CIFAR-10 by `make pretrained`
(benchmarks/make_pretrained.py), stored as float16 so that the wheel stays small.

Reading its note needs the safetensors header only, so that nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path

from cifarctl.errors import UsageError

NAME = "pretrained"  # what `--weights pretrained` and `cifarctl.load("pretrained")` call it
FILE = Path(__file__).with_name("fast-cifar10.safetensors")


def path() -> Path:
    """The bundled weights file; UsageError when this install lacks it (a source tree without it)."""
    if not FILE.is_file():
        raise UsageError(f"this install has no bundled weights ({FILE} is missing); reinstall cifarctl, "
                         "or train a model (`cifarctl train`)")
    return FILE


def accuracy() -> float | None:
    """The test accuracy recorded in the bundled file's metadata (0..1), or None when unreadable."""
    from cifarctl.weights import read_header

    try:
        return float(read_header(path())[1]["test_accuracy"])
    except (UsageError, KeyError, ValueError):
        return None


def fallback_note() -> str:
    """The line a command prints when it falls back to the bundled model."""
    acc = accuracy()
    score = f" ({100 * acc:.1f}% on CIFAR-10 test)" if acc is not None else ""
    return f"using the bundled fast model{score}; train your own with cifarctl train"
