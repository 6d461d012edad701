"""The probe loop every trace estimator shares: one stopping rule, and a per-product callback
that can end a measurement between products without leaving anything changed."""

from __future__ import annotations

import pytest
import torch

from deconcnn_curvature.errors import InvalidOptionError
from deconcnn_curvature.linalg.hutchinson import hutchinson
from deconcnn_curvature.linalg.hutchpp import hutchpp
from deconcnn_curvature.linalg.operator import DenseOperator, make_generator
from deconcnn_curvature.linalg.probes import rtol_met
from deconcnn_curvature.linalg.two_way import grouped_hutchinson

F64 = torch.float64


def _matrix(seed: int, n: int = 30) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=F64)
    return a + a.T


class _Groups:
    """Two dense parts, weighted 1:3."""

    def __init__(self) -> None:
        self.parts = [_matrix(1, n=100), _matrix(2, n=100)]
        self.group_sizes = [1, 3]
        self.count = 0

    dim = property(lambda self: self.parts[0].shape[0])
    dtype = property(lambda self: F64)
    device = property(lambda self: torch.device("cpu"))
    n_matvecs = property(lambda self: self.count)

    def matmat_groups(self, v: torch.Tensor) -> torch.Tensor:
        self.count += v.shape[1]
        return torch.stack([p @ v for p in self.parts])


def test_the_stopping_rule_proves_the_relative_error_for_every_trace_in_the_interval() -> None:
    # 10 ± 1: the traces inside are 9..11; an error of 1 is 1/9 of the smallest.
    assert rtol_met(10.0, 1.0, 1 / 9)
    assert not rtol_met(10.0, 1.0, 0.1)  # 1 <= 0.1 · 10 would pass a 1/9 error
    assert rtol_met(-10.0, 1.0, 1 / 9)  # the sign does not matter
    assert not rtol_met(0.5, 1.0, 100.0)  # an interval containing 0 proves nothing


class _Interrupt(KeyboardInterrupt):
    """What a front end raises from the callback on a signal."""


ESTIMATORS = {
    "hutchinson": lambda gen, cb: hutchinson(
        DenseOperator(_matrix(0, n=100)), 40, generator=gen, on_product=cb
    ),
    "grouped_hutchinson": lambda gen, cb: grouped_hutchinson(
        _Groups(), 40, generator=gen, on_product=cb
    ),
    "hutchpp": lambda gen, cb: hutchpp(
        DenseOperator(_matrix(0, n=100)), 40, generator=gen, on_product=cb
    ),
}


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_an_exception_from_the_callback_ends_the_estimate_between_products(name: str) -> None:
    run = ESTIMATORS[name]
    matrix = _matrix(0, n=100).clone()
    rng = torch.get_rng_state()
    heard: list[int] = []

    def interrupt(report) -> None:
        heard.append(report.n_matvecs)
        if len(heard) == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        run(make_generator(4, "cpu"), interrupt)
    assert heard == sorted(heard) and len(heard) == 3  # no product after the interrupt
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(_matrix(0, n=100), matrix)
    # Nothing kept between calls: the same seed gives the same numbers as a run never stopped.
    first = run(make_generator(4, "cpu"), None)
    again = run(make_generator(4, "cpu"), lambda report: None)
    assert first == again


def test_invalid_arguments_raise_one_error_type_across_estimators() -> None:
    op = DenseOperator(torch.eye(5, dtype=F64))
    gen = make_generator(0, "cpu")
    for call in (
        lambda: hutchinson(op, 1, generator=gen),
        lambda: hutchinson(op, 10, generator=gen, rtol=0.0),
        lambda: hutchinson(op, 10, generator=gen, ci_level=1.0),
        lambda: hutchinson(op, 10, generator=gen, block_size=0),
        lambda: hutchpp(op, 10, generator=gen, rtol=-1.0),
        lambda: grouped_hutchinson(_Groups(), 1, generator=gen),
    ):
        with pytest.raises(InvalidOptionError):
            call()
    assert op.n_matvecs == 0
