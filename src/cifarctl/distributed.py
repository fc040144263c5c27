"""Data-parallel training with PyTorch's own engine: torchrun sets RANK/WORLD_SIZE, cifarctl joins
the process group, shards each epoch's shuffle, and lets DistributedDataParallel all-reduce gradients."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from cifarctl.errors import CifarctlError, UsageError


@dataclass(frozen=True)
class World:
    """Where this process sits among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when more than one process trains together."""
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints progress and writes files."""
        return self.rank == 0


def world_from_env() -> World:
    """Read torchrun's RANK, WORLD_SIZE and LOCAL_RANK (absent: a single process)."""
    try:
        return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as err:
        raise UsageError(f"bad torchrun environment ({err})") from err


def init(world: World, device_type: str, timeout_s: float) -> None:
    """Join the process group: NCCL for CUDA, gloo on the CPU. Collectives that wait longer than
    `timeout_s` (a rank died) raise instead of hanging."""
    import torch.distributed as dist

    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def shutdown() -> None:
    """Leave the process group if one was joined."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(global_idx: Any, world: World) -> Any:
    """This rank's part of a global batch of indices: contiguous, disjoint, and together the whole batch."""
    return global_idx.tensor_split(world.size)[world.rank]


def any_rank(flag: bool, device: Any) -> bool:
    """True on every rank when `flag` is True on any rank (e.g. a stop signal that reached one rank first)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_text(text: str | None) -> str:
    """Rank 0's string on every rank (e.g. the run directory, whose default name holds a timestamp)."""
    import torch.distributed as dist

    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank."""
    import torch.distributed as dist

    dist.barrier()


def collective_error(err: BaseException) -> CifarctlError:
    """A one-line error for a collective that failed because another rank died or timed out."""
    return CifarctlError(f"rank {world_from_env().rank}: another training process stopped or timed out ({err}); "
                         "the run stops; resume it with --resume once all processes can run")


def relaunch_argv(argv: list[str], seed: int | None = None) -> list[str]:
    """This process's arguments for the torchrun workers: without --nproc and its value, plus
    `--seed seed` when given (every rank must shuffle with the same seed)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out + (["--seed", str(seed)] if seed is not None else [])


def launch(nproc: int, argv: list[str]) -> int:
    """Run `cifarctl <argv>` in `nproc` processes through torch.distributed.run; returns its exit code."""
    if nproc < 1:
        raise UsageError("--nproc must be at least 1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "cifarctl", *argv]
    return subprocess.call(cmd)
