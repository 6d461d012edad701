"""Ground truth and state checks for the peer suites.

The dense Hessian of the sample-weighted mean loss over several batches is built by plain
double-backward autograd with :func:`test_foreign_models.autograd_hessian` (and checked by
central finite differences with :func:`test_foreign_models.assert_matches_finite_differences`):
the model is wrapped so that one forward runs every batch and the loss is
``Σ_b n_b/N · loss(model(x_b), y_b)`` — the package's definition for several batches.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from peers.peer_cases import Batches, PeerCase
from test_foreign_models import assert_matches_finite_differences, autograd_hessian
from torch import nn

__all__ = ["assert_unchanged", "dense", "finite_difference_check", "in_flight", "snapshot"]


class _AllBatches(nn.Module):
    """``model`` applied to each batch's inputs (same parameters, same order)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: list[Any]) -> list[torch.Tensor]:
        return [self.model(x) for x in inputs]


def _weighted(loss_fn: nn.Module, batches: Batches) -> Callable[[Any, Any], torch.Tensor]:
    sizes = [len(y) for _, y in batches]
    total = sum(sizes)

    def loss(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        parts = [
            loss_fn(o, y) * (n / total) for o, y, n in zip(outputs, targets, sizes, strict=True)
        ]
        return torch.stack(parts).sum()

    return loss


def _problem(case: PeerCase) -> tuple[nn.Module, Callable[[Any, Any], torch.Tensor], list, list]:
    model, loss_fn, batches = case.make()
    wrapped = _AllBatches(model.eval())
    return wrapped, _weighted(loss_fn, batches), [x for x, _ in batches], [y for _, y in batches]


def dense(case: PeerCase) -> torch.Tensor:
    """The exact Hessian (float64, eval mode) w.r.t. the trainable parameters in order."""
    wrapped, loss, inputs, targets = _problem(case)
    h = autograd_hessian(wrapped, loss, inputs, targets)
    torch.testing.assert_close(h, h.T, rtol=1e-10, atol=1e-12 * float(h.abs().max()))
    return h


def finite_difference_check(case: PeerCase, hessian: torch.Tensor) -> None:
    wrapped, loss, inputs, targets = _problem(case)
    assert_matches_finite_differences(hessian, wrapped, loss, inputs, targets)


def in_flight(model: nn.Module) -> nn.Module:
    """The model as a training loop hands it over: train mode, a gradient on every parameter."""
    model.train()
    g = torch.Generator().manual_seed(123)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    return model


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "modes": [m.training for m in model.modules()],
        "params": [
            (
                n,
                p,
                p.detach().clone(),
                p.requires_grad,
                p.grad,
                None if p.grad is None else p.grad.clone(),
            )
            for n, p in model.named_parameters()
        ],
        "buffers": [(n, b, b.clone()) for n, b in model.named_buffers()],
        "rng": (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()),
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    """Mode, parameters, ``requires_grad``, ``.grad`` (the same tensor, same values), buffers and
    the torch/random/numpy RNG states are exactly as in ``before``."""
    after = snapshot(model)
    assert after["modes"] == before["modes"]
    for (n, p, v, rg, g, gv), (_, p2, v2, rg2, g2, gv2) in zip(
        before["params"], after["params"], strict=True
    ):
        assert p2 is p and torch.equal(v2, v) and rg2 == rg, n
        assert g2 is g and ((gv is None and gv2 is None) or torch.equal(gv2, gv)), n
    for (n, b, v), (_, b2, v2) in zip(before["buffers"], after["buffers"], strict=True):
        assert b2 is b and torch.equal(v2, v), n
    assert torch.equal(after["rng"][0], before["rng"][0])
    assert after["rng"][1] == before["rng"][1]
    assert np.array_equal(after["rng"][2], before["rng"][2])


def float32(case: PeerCase) -> tuple[nn.Module, nn.Module, Batches]:
    """The case's problem in float32 (for layers BackPACK runs only in float32)."""
    model, loss_fn, batches = case.make()
    cast = [(x.float(), y.float() if y.is_floating_point() else y) for x, y in batches]
    return copy.deepcopy(model).float(), loss_fn, cast
