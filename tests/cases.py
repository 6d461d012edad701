"""Seeded tiny problems with exact dense Hessians (ground truth via ``torch.func.hessian``).

Every case is float64 so comparisons can be tight; ``Case.dense_hessian()`` is the Hessian of the
sample-weighted mean loss with respect to the trainable parameters, flattened in
``named_parameters()`` order — the same order and dimension as the package's operator (unused
parameters included, as zero rows/columns; frozen ones excluded).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn
from torch.func import functional_call, hessian

__all__ = ["CASES", "Case", "dense_hessian", "get_case"]


def dense_hessian(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Exact Hessian of the size-weighted mean loss over ``batches`` w.r.t. trainable parameters.

    The model is evaluated in its current mode; call with the model in eval mode for BatchNorm.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    total = sum(len(y) for _, y in batches)

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, sizes)
        ps = {n: t.view(s) for (n, _), t, s in zip(named, parts, shapes, strict=True)}
        out = 0.0
        for x, y in batches:
            pred = functional_call(model, {**ps, **fixed, **buffers}, (x,))
            out = out + loss_fn(pred, y) * (len(y) / total)
        return out

    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    return hessian(loss_of)(flat)


class NegativeCurvatureLoss(nn.Module):
    """A mean-reduced loss whose Hessian has a negative trace: ``−mean((out − y)²)``."""

    reduction = "mean"

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -((out - y) ** 2).mean()


class UnusedParam(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        self.unused = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _cnn(bn: bool = False) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(2, 3, 3)]
    if bn:
        layers.append(nn.BatchNorm2d(3))
    layers += [nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)]
    return nn.Sequential(*layers)


def _frozen() -> nn.Module:
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    for p in m[0].parameters():
        p.requires_grad_(False)
    return m


@dataclass
class Case:
    """A seeded problem: model (float64), loss, one batch, and its exact Hessian."""

    id: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    loss: str = "ce"  # "ce" | "mse" | "neg"
    n: int = 12
    out_dim: int = 3
    seed: int = 0
    bn_stats: bool = False  # give BatchNorm non-trivial running statistics first

    def make(self) -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        model = self.build().double()
        x = torch.randn(self.n, *self.input_shape, generator=g, dtype=torch.float64)
        if self.loss == "ce":
            y = torch.randint(0, self.out_dim, (self.n,), generator=g)
            loss_fn: nn.Module = nn.CrossEntropyLoss()
        else:
            y = torch.randn(self.n, self.out_dim, generator=g, dtype=torch.float64)
            loss_fn = nn.MSELoss() if self.loss == "mse" else NegativeCurvatureLoss()
        if self.bn_stats:
            model.train()
            with torch.no_grad():
                for _ in range(3):
                    model(
                        torch.randn(self.n, *self.input_shape, generator=g, dtype=torch.float64) * 2
                        + 1
                    )
        model.eval()
        return model, loss_fn, (x, y)

    @cached_property
    def exact(self) -> torch.Tensor:
        model, loss_fn, batch = self.make()
        return dense_hessian(model, loss_fn, [batch])


CASES: list[Case] = [
    Case("mlp", _mlp, (6,)),
    Case("cnn", lambda: _cnn(False), (2, 6, 6)),
    Case("cnn_bn_eval", lambda: _cnn(True), (2, 6, 6), bn_stats=True),
    Case("frozen_layer", _frozen, (6,)),
    Case("unused_param", UnusedParam, (6,)),
    Case("negative_trace", _mlp, (6,), loss="neg"),
]


def get_case(case_id: str) -> Case:
    return next(c for c in CASES if c.id == case_id)
