"""Which device to run on, and the autocast rule shared by training and inference."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch

from cifarctl.errors import UsageError


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str) -> torch.device:
    """Turn auto|cpu|cuda|cuda:N|mps into a usable device, or raise a usage error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("CUDA was requested (--gpu or --device cuda) but no CUDA GPU is available; "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{name} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not _mps_available():
        raise UsageError("MPS was requested but is not available; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def autocast(device: torch.device, bf16: bool) -> torch.autocast:
    """bfloat16 autocast on CUDA and the CPU when `bf16`; other devices run autocast's CPU context,
    which leaves their kernels in float32."""
    return torch.autocast(device.type if device.type in ("cpu", "cuda") else "cpu", dtype=torch.bfloat16,
                          enabled=bf16)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware: most CUDA GPUs, and CPUs with AVX-512 BF16
    or AMX. Elsewhere autocast emulates it, which made `fast` about 20x slower on an AVX2 CPU."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 where it is native on `device`, else fp32; fp32 and bf16 as asked."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def flush_denormal_enabled() -> bool:
    """Whether this thread flushes denormal floats to zero (torch has a setter but no getter):
    a denormal input then reads as zero."""
    return bool((torch.tensor([1e-40], dtype=torch.float32) * 1.0).item() == 0.0)


@contextlib.contextmanager
def preserved_torch_state() -> Iterator[None]:
    """Run a block that may change process-wide torch settings (threads, denormal flushing,
    determinism, cuDNN autotuning, the global RNGs) and put them all back afterwards, so that a
    notebook calling the library finds its process as it left it."""
    import random

    import numpy as np

    saved = (torch.get_num_threads(), flush_denormal_enabled(), torch.are_deterministic_algorithms_enabled(),
             torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    try:
        yield
    finally:
        threads, flush, deterministic, benchmark, cublas = saved
        torch.set_num_threads(threads)
        torch.set_flush_denormal(flush)
        if torch.are_deterministic_algorithms_enabled() != deterministic:
            set_deterministic(deterministic)
        torch.backends.cudnn.benchmark = benchmark
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])


def set_deterministic(mode: bool, compiling: bool = False) -> None:
    """torch.use_deterministic_algorithms(mode), which also imports torch._inductor (and with it
    torch._dynamo: 150 MB and 1.3 s here) to set inductor's copy of the flag. Only torch.compile
    reads that copy, so it is set only when compiling or when inductor is loaded already."""
    if compiling or "torch._inductor.config" in sys.modules or not hasattr(torch._C, "_set_deterministic_algorithms"):
        torch.use_deterministic_algorithms(mode)
    else:
        torch._C._set_deterministic_algorithms(mode)


def configure(device: torch.device, deterministic: bool, compiling: bool = False) -> None:
    """Process settings for a training run (undone by `preserved_torch_state`)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        set_deterministic(True, compiling)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    if device.type == "cpu":
        # Tiny gradients and momentum values late in training otherwise fall into the CPU's slow
        # path for subnormal numbers (seen here: an epoch of `fast` 4x slower).
        torch.set_flush_denormal(True)
