"""cifarctl: train and use CIFAR-10 classifiers from the command line, or from Python:

    import cifarctl
    clf = cifarctl.load()                 # the bundled weights; or a weights/.onnx file, a run directory
    clf.predict("cat.jpg")                # Prediction(class_name='cat', probability=0.91, top_k=[...])
    summary = cifarctl.train(model="fast", epochs=2, progress=False)
    result = cifarctl.evaluate(summary.weights)

`import cifarctl` is light: torch is imported by the first function that needs it (docs/python.md).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from cifarctl.errors import CifarctlError, UsageError

__version__ = "0.1.0"

_API = ("load", "evaluate", "Classifier", "Prediction", "TrainResult", "EvaluateResult")
__all__ = ["CifarctlError", "UsageError", "__version__", "train", *_API]


class _TrainModule(types.ModuleType):
    """The core module cifarctl.train, made callable as the API function `cifarctl.train(**options)`.

    The package attribute `train` is necessarily the submodule once anything imports
    `cifarctl.train` (the import system sets it, and the CLI and tests use the module), so the
    module itself answers the call rather than a function that an import would replace.
    """

    def __call__(self, **options: Any) -> Any:
        from cifarctl.api import train

        return train(**options)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name == "train" and type(value) is types.ModuleType:
            value.__class__ = _TrainModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    """The API, imported on first use so that `import cifarctl` does not import torch."""
    if name in _API:
        from cifarctl import api

        return getattr(api, name)
    if name == "train":
        import importlib

        return importlib.import_module("cifarctl.train")
    raise AttributeError(f"module 'cifarctl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
