"""Training steps behind one protocol: autograd + SGD for any model (optionally compiled,
optionally data-parallel), and the hand-written fused CPU step for the tutorial net."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from cifarctl.config import TrainConfig
from cifarctl.device import autocast
from cifarctl.distributed import World


class Stepper(Protocol):
    """One optimisation step on a batch, plus the optimizer state a checkpoint needs."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward, backward and update on (x, y); returns the detached mean loss (a 0-d tensor)."""
        ...

    def set_lr(self, lr: float) -> None:
        """Use base learning rate `lr` from the next step on."""
        ...

    def lr(self) -> float:
        """The base learning rate in use now."""
        ...

    def momentum_buffers(self) -> dict[str, torch.Tensor]:
        """Momentum buffers by parameter name."""
        ...

    def load_momentum_buffers(self, bufs: dict[str, torch.Tensor]) -> None:
        """Restore what `momentum_buffers` returned."""
        ...


class CpuSGD:
    """torch.optim.SGD's update as it runs on the CPU (its single-tensor loop), op for op, so the
    weights come out bit for bit the same. torch.optim imports torch._dynamo on first use, which
    cost 150 MB of resident memory and 1.3 s of start-up in every training process here; its
    param_groups and state have the same shape, so the stepper treats both alike."""

    def __init__(self, groups: list[dict[str, Any]], lr: float, momentum: float, weight_decay: float,
                 nesterov: bool) -> None:
        self.param_groups = [{**g, "lr": lr} for g in groups]
        self.state: defaultdict[torch.Tensor, dict[str, torch.Tensor]] = defaultdict(dict)
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 - torch.optim's signature
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(self._direction(p, p.grad), alpha=-group["lr"])

    def _direction(self, p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The gradient with weight decay and (Nesterov) momentum applied, updating the buffer."""
        if self.weight_decay != 0:
            grad = grad.add(p, alpha=self.weight_decay)
        if self.momentum == 0:
            return grad
        buf = self.state[p].get("momentum_buffer")
        if buf is None:
            buf = self.state[p]["momentum_buffer"] = grad.detach().clone()
        else:
            buf.mul_(self.momentum).add_(grad)  # dampening 0: torch's alpha=1 - 0
        return grad.add(buf, alpha=self.momentum) if self.nesterov else buf


class AutogradStepper:
    """Cross-entropy + SGD through autograd: the training step for any model, with
    label smoothing, bf16 autocast, torch.compile and DistributedDataParallel as configured.

    Under DDP the compiled module is the DDP wrapper (torch.compile(DDP(model))), so compiling and
    gradient all-reduce compose instead of one replacing the other.
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device, world: World) -> None:
        self.model = model
        module: torch.nn.Module = model
        if world.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # DDP all-reduces (averages) gradients during backward; the optimizer sees the global mean.
            module = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.compiled = cfg.compile
        self.forward = torch.compile(module) if cfg.compile else module
        self.names = {p: n for n, p in model.named_parameters()}
        params = [p for p in model.parameters() if p.requires_grad]
        # Biases and BatchNorm shifts (the 1-d parameters) may learn faster than the weights (airbench).
        groups = [{"params": [p for p in params if p.ndim > 1], "lr_scale": 1.0},
                  {"params": [p for p in params if p.ndim <= 1], "lr_scale": cfg.bias_lr_scale}]
        groups = [g for g in groups if g["params"]]
        if device.type == "cpu":
            self.opt: Any = CpuSGD(groups, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov)
        else:
            self.opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                       nesterov=cfg.nesterov)
        self.set_lr(cfg.lr)
        self.smoothing = cfg.label_smoothing
        self.autocast = autocast(device, cfg.precision == "bf16")

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            loss = F.cross_entropy(self.forward(x), y, label_smoothing=self.smoothing)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach().float()

    def compiled_graphs(self) -> int:
        """How many graphs torch.compile has captured in this process (0 when not compiling): the
        proof that compiling really happened, under DDP too."""
        if not self.compiled:
            return 0
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr * group["lr_scale"]

    def lr(self) -> float:
        group = self.opt.param_groups[0]
        return group["lr"] / group["lr_scale"]

    def momentum_buffers(self) -> dict[str, torch.Tensor]:
        return {self.names[p]: s["momentum_buffer"] for p, s in self.opt.state.items()
                if s.get("momentum_buffer") is not None}

    def load_momentum_buffers(self, bufs: dict[str, torch.Tensor]) -> None:
        for p, name in self.names.items():
            if name in bufs:
                self.opt.state[p]["momentum_buffer"] = bufs[name].to(p.device, p.dtype).clone()


class FusedTutorialStepper:
    """The fused CPU step of fast_tutorial.py behind the Stepper protocol."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig) -> None:
        from cifarctl.fast_tutorial import TutorialSGDStep

        self.step = TutorialSGDStep(model, cfg.lr, cfg.momentum, cfg.weight_decay)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.step(x, y)

    def set_lr(self, lr: float) -> None:
        self.step.lr = float(lr)

    def lr(self) -> float:
        return self.step.lr

    def momentum_buffers(self) -> dict[str, torch.Tensor]:
        return self.step.momentum_buffers()

    def load_momentum_buffers(self, bufs: dict[str, torch.Tensor]) -> None:
        self.step.load_momentum_buffers(bufs)


def fused_tutorial_ok(cfg: TrainConfig, device: torch.device, world: World) -> bool:
    """The hand-written CPU step covers exactly the tutorial recipe in one process: plain SGD, no extras."""
    return (cfg.model == "tutorial" and device.type == "cpu" and not world.enabled and not cfg.nesterov
            and cfg.label_smoothing == 0 and cfg.schedule == "constant" and cfg.precision == "fp32"
            and not cfg.compile and not cfg.channels_last and cfg.bias_lr_scale == 1)


def make_stepper(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, world: World) -> Stepper:
    """The fastest stepper that computes what the config asks for."""
    if fused_tutorial_ok(cfg, device, world):
        # At batch 4 a second thread only adds synchronisation: the step is faster on one. The
        # caller restores the thread count when training ends (device.preserved_torch_state).
        torch.set_num_threads(1)
        return FusedTutorialStepper(model, cfg)
    return AutogradStepper(model, cfg, device, world)
