"""The model registry: every network is built by name from a JSON-able config, so that a
weights file alone is enough to rebuild it."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifarctl.errors import UsageError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
Check = Callable[[Any], str | None]  # what is wrong with a config value, or None when it is fine
_CHECKS: dict[str, dict[str, Check]] = {}

# Bounds on what a config (from a weights file or a checkpoint) may ask for. They cap what
# building a model can allocate: 8 groups of 4096 channels is already 2.3 G parameters.
MAX_CLASSES = 100_000
MAX_WIDTH = 4096
MAX_GROUPS = 8


def _short(value: Any) -> str:
    """repr clipped to one short line: hostile values can be megabytes long."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def int_in(lo: int, hi: int) -> Check:
    """A check for an integer (not a bool) in [lo, hi]."""
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            return f"must be an integer in [{lo}, {hi}], not {_short(value)}"
        return None
    return check


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, not {_short(value)}"


def _positive_number(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1e6
    return None if ok else f"must be a number in (0, 1e6], not {_short(value)}"


def _widths(value: Any) -> str | None:
    ok = (isinstance(value, (list, tuple)) and 1 <= len(value) <= MAX_GROUPS
          and all(int_in(1, MAX_WIDTH)(w) is None for w in value))
    return None if ok else f"must be a list of 1 to {MAX_GROUPS} integers in [1, {MAX_WIDTH}], not {_short(value)}"


_NUM_CLASSES = int_in(2, MAX_CLASSES)


def register(name: str, checks: dict[str, Check] | None = None
             ) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Add a model constructor to the registry under `name`, with a check per config key.

    Keys without a check are refused by `validate_config`, except `num_classes`, which every model takes.
    """

    def wrap(ctor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ctor
        _CHECKS[name] = {"num_classes": _NUM_CLASSES, **(checks or {})}
        return ctor

    return wrap


def model_names() -> list[str]:
    """Names of all registered models."""
    return sorted(_REGISTRY)


def validate_config(name: str, config: Any) -> None:
    """Refuse, with a UsageError naming the key, a config that is not an object of known keys whose
    values have the right types and lie within bounds. Runs before any constructor does."""
    if name not in _REGISTRY:
        raise UsageError(f"unknown model {_short(name)}; choose one of: {', '.join(model_names())}")
    if not isinstance(config, dict):
        raise UsageError(f"the config of model {name!r} must be an object, not {_short(config)}")
    checks = _CHECKS[name]
    for key, value in config.items():
        if key not in checks:
            raise UsageError(f"model {name!r} takes no config key {_short(key)}; it takes {', '.join(sorted(checks))}")
        problem = checks[key](value)
        if problem:
            raise UsageError(f"model {name!r} config {key!r} {problem}")
    rule = getattr(_REGISTRY[name], "config_problem", None)
    problem = rule(config) if rule else None
    if problem:
        raise UsageError(f"model {name!r} config: {problem}")


def config_num_classes(name: str, config: dict[str, Any]) -> int:
    """The number of outputs model `name` has with `config` (its constructor's default when unset)."""
    if "num_classes" in config:
        return config["num_classes"]
    return inspect.signature(_REGISTRY[name]).parameters["num_classes"].default


def check_image_size(name: str, size: int) -> None:
    """Refuse images of a size model `name` is not defined for (the tutorial net's first fully
    connected layer fixes 32x32; the others pool globally and take any size)."""
    fixed = getattr(_REGISTRY.get(name), "fixed_size", None)
    if fixed is not None and size != fixed:
        raise UsageError(f"the {name} model is defined for {fixed}x{fixed} images and this dataset's are "
                         f"{size}x{size}; use --model fast or --model resnet18")


def build_model(name: str, config: dict[str, Any] | None = None) -> nn.Module:
    """Build model `name` from its config (keyword arguments of its constructor), checked first."""
    config = config or {}
    validate_config(name, config)
    try:
        return _REGISTRY[name](**config)
    except TypeError as err:
        raise UsageError(f"bad config for model {name!r}: {err}") from err


@register("tutorial")
class TutorialNet(nn.Module):
    """The PyTorch tutorial's LeNet-style network, layer for layer."""

    fixed_size = 32

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)  # 5x5 after two conv+pool stages: the net takes 32x32 only
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 32, 32) normalised floats -> (N, num_classes) logits."""
        x = self.pool(F.relu(self.conv1(x)))  # (N, 6, 14, 14)
        x = self.pool(F.relu(self.conv2(x)))  # (N, 16, 5, 5)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class _MaxPool2Fn(torch.autograd.Function):
    """2x2 max-pooling whose backward keeps only the argmax indices. PyTorch's keeps its input as
    well: the conv output before each pool of the fast net, 63 of the 202 MB that a 256-image step
    saves for backward. max_unpool2d routes the gradient to the same places, bit for bit."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out, idx = F.max_pool2d(x, 2, return_indices=True)
        ctx.save_for_backward(idx)
        ctx.size = x.shape[-2:]
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (idx,) = ctx.saved_tensors
        return F.max_unpool2d(grad, idx, 2, output_size=ctx.size)


class MaxPool2(nn.Module):
    """nn.MaxPool2d(2) that trains in less memory on the CPU (_MaxPool2Fn). Everywhere else it is
    plain max-pooling: inference, exports, torch.compile, GPUs (unmeasured), and --deterministic,
    where torch refuses max_unpool2d (deterministic on the CPU, but flagged for all devices)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.requires_grad and torch.is_grad_enabled() and x.device.type == "cpu" \
                and not (torch.compiler.is_compiling() or torch.jit.is_tracing()
                         or torch.are_deterministic_algorithms_enabled()):
            return _MaxPool2Fn.apply(x)
        return F.max_pool2d(x, 2)


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]


@register("fast", {"widths": _widths, "stem": int_in(2, MAX_WIDTH), "head_scale": _positive_number,
                   "whiten": _boolean, "learn_bn_scale": _boolean})
class FastNet(nn.Module):
    """A small BatchNorm conv net built for speed: a stem conv, then three groups of
    (conv, max-pool, BN, GELU, conv, BN, GELU) with configurable widths, global max-pool, a linear head.

    The BatchNorm scales stay fixed at 1 unless `learn_bn_scale`, as in airbench: the next conv can
    scale its input itself, and the recipe trains the BatchNorm shifts with a higher learning rate.

    With `whiten` (the default) the stem is airbench's 2x2 patch-whitening conv: its filters are
    set once from the training data (`init_whitening`) and stay fixed, which makes the first
    epochs learn much faster and costs fewer multiply-adds than a trained 3x3 stem.
    """

    def __init__(self, num_classes: int = 10, widths: list[int] | tuple[int, ...] = (32, 96, 192),
                 stem: int = 24, head_scale: float = 1 / 9, whiten: bool = True, learn_bn_scale: bool = False) -> None:
        super().__init__()
        if whiten:
            if stem % 2 or not 2 <= stem <= 24:
                raise ValueError("a whitening stem has an even width of at most 24 (12 patch dimensions, +/-)")
            # Nothing in the stem learns: with no trainable parameter before it, the first body conv's
            # backward skips the gradient for its 31x31 input, about 10% of a step on the CPU.
            self.stem = nn.Sequential(nn.Conv2d(3, stem, 2, bias=False), nn.GELU())  # (N, stem, 31, 31)
            self.stem[0].weight.requires_grad_(False)
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem), nn.GELU())
        layers: list[nn.Module] = []
        c_in = stem
        for width in widths:
            conv1, bn1 = _conv_bn(c_in, width)
            conv2, bn2 = _conv_bn(width, width)
            # The second conv of a group starts as the identity (airbench): early training sees a
            # shallower net, and at this training length it scored higher than a random start.
            nn.init.dirac_(conv2.weight)
            layers += [conv1, MaxPool2(), bn1, nn.GELU(), conv2, bn2, nn.GELU()]
            c_in = width
        self.body = nn.Sequential(*layers)
        if not learn_bn_scale:
            for layer in layers:
                if isinstance(layer, nn.BatchNorm2d):
                    layer.weight.requires_grad_(False)
        self.head = nn.Linear(c_in, num_classes, bias=False)
        # A small logit scale keeps early softmax outputs soft, which lets a high learning rate train stably.
        self.head_scale = head_scale

    @staticmethod
    def config_problem(config: dict[str, Any]) -> str | None:
        """The one rule across keys: 2x2 patches have 12 dimensions, each filter is used with both signs."""
        stem = config.get("stem", 24)
        if config.get("whiten", True) and (stem % 2 or stem > 24):
            return f"a whitening stem has an even width of at most 24, not {stem}"
        return None

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the stem's filters to the whitening transform of the 2x2 patches of `images`
        (N, 3, H, W): the top eigenvectors of their covariance, scaled by 1/sqrt(eigenvalue),
        each used with both signs. The moments are summed in float64 over chunks of images, so
        the patches (12 floats per pixel) never exist for all images at once."""
        conv = self.stem[0]
        if conv.kernel_size != (2, 2):
            return
        total = torch.zeros(12, dtype=torch.float64, device=images.device)
        outer = torch.zeros((12, 12), dtype=torch.float64, device=images.device)
        count = 0
        for start in range(0, len(images), 500):
            patches = images[start:start + 500].double().unfold(2, 2, 1).unfold(3, 2, 1)  # (n, 3, H-1, W-1, 2, 2)
            patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)  # (n*(H-1)*(W-1), 12), as (c, kh, kw)
            total += patches.sum(0)
            outer += patches.T @ patches
            count += len(patches)
        mean = total / max(count, 1)
        cov = outer / max(count, 1) - torch.outer(mean, mean)
        eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
        k = conv.out_channels // 2
        filters = (eigvecs[:, -k:].T / torch.sqrt(eigvals[-k:, None] + eps)).view(k, 3, 2, 2)
        conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 32, 32) -> (N, num_classes)."""
        x = self.body(self.stem(x))  # (N, C, 3, 3) with the whitening stem, (N, C, 4, 4) without
        # Not torch.amax: under torch.compile on the CPU its bf16 backward (which splits the gradient
        # among tied maxima) came out NaN in torch 2.14; max-pooling routes it to one maximum.
        x = F.adaptive_max_pool2d(x, 1).flatten(1)  # (N, C)
        return self.head(x) * self.head_scale


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


@register("resnet18")
class ResNet18(nn.Module):
    """The standard CIFAR ResNet-18: 3x3 stem without max-pool, four stages of two basic blocks."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(_BasicBlock(c_in, c_out, stride), _BasicBlock(c_out, c_out, 1)))
            c_in = c_out
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 32, 32) -> (N, num_classes)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)  # (N, 512, 4, 4)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
