"""A stopping run abandons a measurement between two Hessian-vector products
(:data:`deconcnn_curvature.hvp.CANCEL`), and leaves the model as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deconcnn_curvature as dcc
from deconcnn_curvature import hvp
from deconcnn_curvature.hvp import MeasurementInterrupted


@pytest.fixture
def cancel():
    hvp.CANCEL.clear()
    yield hvp.CANCEL
    hvp.CANCEL.clear()


def _problem() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    return model, (torch.randn(8, 4), torch.randint(0, 2, (8,)))


@pytest.mark.parametrize("backend", ["pyhessian", "hutchpp"])
def test_a_set_cancel_flag_stops_before_the_next_product_and_restores_the_model(
    cancel: object, backend: str
) -> None:
    model, batch = _problem()
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = {"n": 0}
    real = hvp.HessianOperator._product

    def count_then_stop(self, *args, **kwargs):  # the run is told to stop during product 3
        calls["n"] += 1
        out = real(self, *args, **kwargs)
        if calls["n"] == 3:
            hvp.CANCEL.set()
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hvp.HessianOperator, "_product", count_then_stop)
        with pytest.raises(MeasurementInterrupted, match="the run is stopping"):
            dcc.estimate(
                model, nn.functional.cross_entropy, batch, "trace", backend, num_hvps=10**7
            )
    assert calls["n"] == 4  # the fourth product checked the flag first and stopped
    assert model.training
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0)
        torch.testing.assert_close(p.grad, torch.full_like(p, 0.5), rtol=0, atol=0)


def test_a_clear_flag_changes_nothing(cancel: object) -> None:
    model, batch = _problem()
    first = dcc.estimate(model, nn.functional.cross_entropy, batch, "trace", "pyhessian")
    hvp.CANCEL.set()
    hvp.CANCEL.clear()
    second = dcc.estimate(model, nn.functional.cross_entropy, batch, "trace", "pyhessian")
    assert first.value == second.value
