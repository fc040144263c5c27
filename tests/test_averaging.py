"""Lookahead weight averaging: when it pulls, by how much, and that the run ends on the average."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cifarctl.averaging import Lookahead


def _model(value: float) -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.fill_(value)
    return model


def test_weights_are_pulled_only_every_fifth_step() -> None:
    """Between pulls the weights are the optimizer's; on a pull they become the running average."""
    model = _model(0.0)
    la = Lookahead(model, total_steps=100)
    weight = model[0].weight
    with torch.no_grad():
        weight.fill_(1.0)
    la.after_step(4)
    assert torch.all(weight == 1.0)
    la.after_step(5)
    expected = 1 - la.decay(5)  # lerp from the average 0 towards 1
    assert la.decay(5) == pytest.approx(0.95 ** 5 * (5 / 100) ** 3)
    assert torch.allclose(weight, torch.full_like(weight, expected))


def test_batchnorm_statistics_are_averaged_with_the_weights() -> None:
    """Running means and variances take part, so the averaged model evaluates consistently."""
    model = _model(0.0)
    la = Lookahead(model, total_steps=10)
    model[1].running_mean.fill_(2.0)
    la.after_step(5)
    assert torch.allclose(model[1].running_mean, torch.full((2,), 2 * (1 - la.decay(5))))


def test_last_step_leaves_the_model_at_the_average() -> None:
    """After the final step the model holds the average, not the last optimizer weights."""
    model = _model(0.0)
    la = Lookahead(model, total_steps=7)
    la.after_step(5)
    average = {k: v.clone() for k, v in la.state_dict().items()}
    with torch.no_grad():
        model[0].weight.fill_(5.0)
    la.after_step(7)
    assert torch.equal(model[0].weight, average["0.weight"])


def test_state_round_trips() -> None:
    """A restored average continues exactly as the original (resumed runs depend on it)."""
    a, b = _model(0.0), _model(0.0)
    la_a, la_b = Lookahead(a, 20), Lookahead(b, 20)
    with torch.no_grad():
        a[0].weight.fill_(3.0)
    la_a.after_step(10)
    la_b.load_state_dict(la_a.state_dict())
    b.load_state_dict(a.state_dict())
    for model in (a, b):
        with torch.no_grad():
            model[0].weight.add_(1.0)
    la_a.after_step(15)
    la_b.after_step(15)
    assert torch.equal(a[0].weight, b[0].weight)
