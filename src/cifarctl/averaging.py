"""Lookahead weight averaging (airbench's variant): every few steps the weights are pulled into a
running average and then replaced by it, with a decay that grows over the run, so the last
epochs average over more and more steps. The final weights are the average."""

from __future__ import annotations

import torch


class Lookahead:
    """Every `every` optimizer steps: avg <- decay * avg + (1 - decay) * w, then w <- avg.

    decay = base ** every * (step / total_steps) ** 3: almost no averaging early, when the weights
    move fast, and decay near base ** every at the end. BatchNorm running statistics are averaged
    with the weights, so the averaged model evaluates with matching statistics.
    """

    def __init__(self, model: torch.nn.Module, total_steps: int, every: int = 5, base: float = 0.95) -> None:
        self.model = model
        self.total_steps = total_steps
        self.every = every
        self.base = base
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def decay(self, step: int) -> float:
        """The decay after 1-based optimizer step `step`."""
        return self.base ** self.every * (step / self.total_steps) ** 3

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Call after optimizer step `step` (1-based, counted over the whole run)."""
        if step >= self.total_steps:
            self._pull(1.0)  # the run is over: the model takes the average
        elif step % self.every == 0:
            self._pull(self.decay(step))

    def _pull(self, decay: float) -> None:
        current = self.model.state_dict()
        for name, avg in self.average.items():
            avg.lerp_(current[name], 1 - decay)
            current[name].copy_(avg)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The running average by state-dict name, for the checkpoint."""
        return dict(self.average)

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` returned."""
        for name, avg in self.average.items():
            avg.copy_(tensors[name])
