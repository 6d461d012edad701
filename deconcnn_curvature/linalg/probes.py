"""What every stochastic trace estimator here shares: the probes, their loop, the stopping rule.

Hutchinson (:mod:`~deconcnn_curvature.linalg.hutchinson`), its data-group variant
(:mod:`~deconcnn_curvature.linalg.two_way`) and the deflated part of Hutch++
(:mod:`~deconcnn_curvature.linalg.hutchpp`) are the same loop: draw Rademacher probes column by
column (so no result depends on how columns are grouped into blocks), multiply a block, turn it into
one quadratic form per probe, and stop when the budget is spent or the interval proves the
requested relative error (:func:`rtol_met`). Only the product and the interval differ; each
estimator passes its own.

The loop reports after every block to an optional ``on_product`` callback, with the running
estimate (:class:`TraceProgress`). It is the only way out of the loop besides its result: a front
end shows progress from it, and an exception raised inside it (an interrupt) propagates at once,
after the products already made and before the next one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from deconcnn_curvature.errors import InvalidOptionError
from deconcnn_curvature.linalg.operator import OperatorShape, rademacher
from deconcnn_curvature.linalg.quantiles import student_t_quantile

__all__ = [
    "OnProduct",
    "ProbeLoop",
    "TraceProgress",
    "check_trace_args",
    "draw_columns",
    "mean_stderr",
    "rtol_met",
    "student_t_interval",
    "t_half_width",
]


@dataclass(frozen=True)
class TraceProgress:
    """A running trace estimate, passed to ``on_product`` after every block of products.

    ``value`` and ``stderr`` are the estimate from the ``n_probes`` probes finished so far (the
    same formula as the final result's probe part, so the last report equals a probe-only
    result); ``n_matvecs`` counts every product spent (Hutch++'s sketch included) against
    ``budget``, the most the run will spend.
    """

    method: str
    value: float
    stderr: float
    n_probes: int
    n_matvecs: int
    budget: int


OnProduct = Callable[[TraceProgress], None]
"""The per-product callback an estimator accepts (called in the estimator's thread, after each
block of products; an exception it raises ends the estimate and propagates unchanged)."""


def rtol_met(value: float, half_width: float, rtol: float) -> bool:
    """The one stopping rule of every trace estimator: the interval ``value ± half_width`` proves
    a relative error of at most ``rtol`` for every trace it contains.

    That is ``half ≤ rtol · (|value| − half)``. Testing ``half ≤ rtol · |value|`` instead stops
    early exactly when ``|value|`` came out too large, biasing the estimate away from zero.
    """
    return half_width <= rtol * (abs(value) - half_width)


def student_t_interval(mean: float, stderr: float, dof: float, level: float) -> tuple[float, float]:
    """Two-sided Student-t interval ``mean ± t_{(1+level)/2, dof} · stderr``."""
    if dof < 1 or not math.isfinite(stderr):
        return (-math.inf, math.inf)
    half = student_t_quantile(0.5 + level / 2, dof) * stderr
    return (mean - half, mean + half)


def mean_stderr(samples: Sequence[float]) -> tuple[float, float]:
    """The sample mean and its standard error (``inf`` from fewer than 2 samples)."""
    m = len(samples)
    mean = math.fsum(samples) / m
    if m < 2:
        return mean, math.inf
    var = math.fsum((s - mean) ** 2 for s in samples) / (m - 1)
    return mean, math.sqrt(var / m)


def draw_columns(shape: OperatorShape, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` Rademacher probes drawn one column at a time, so the sequence never depends on how
    the columns are grouped into blocks."""
    cols = [
        rademacher(shape.dim, 1, generator=generator, dtype=shape.dtype, device=shape.device)
        for _ in range(k)
    ]
    return torch.cat(cols, dim=1)


def check_trace_args(*, rtol: float | None, ci_level: float, block_size: int) -> None:
    """The argument checks every trace estimator shares. Every invalid argument in linalg raises
    :class:`~deconcnn_curvature.errors.InvalidOptionError` (a ``ValueError``)."""
    if rtol is not None and not rtol > 0.0:
        raise InvalidOptionError(f"rtol must be > 0 or None, got {rtol}")
    if not 0.0 < ci_level < 1.0:
        raise InvalidOptionError(f"ci_level must be in (0, 1), got {ci_level}")
    if block_size < 1:
        raise InvalidOptionError(f"block_size must be >= 1, got {block_size}")


def _blocks(total: int, block: int) -> list[int]:
    sizes = [block] * (total // block)
    if total % block:
        sizes.append(total % block)
    return sizes


@dataclass
class ProbeLoop:
    """The probe loop, parameterised by what differs between estimators.

    ``forms(z)`` multiplies the ``(dim, k)`` probe block (deflated or split by group as the
    estimator needs, keeping whatever per-layer sums it wants) and returns the ``k`` quadratic
    forms whose mean is the estimate's stochastic part. ``interval(samples)`` returns the estimate
    and the half-width of its interval, for :func:`rtol_met`. ``offset`` (Hutch++'s exact part)
    and ``spent`` (products made before the loop) only shape the progress reports.
    """

    shape: OperatorShape
    forms: Callable[[torch.Tensor], list[float]]
    interval: Callable[[list[float]], tuple[float, float]]
    method: str
    budget: int
    offset: float = 0.0
    spent: int = 0

    def run(
        self,
        num_probes: int,
        *,
        generator: torch.Generator,
        block_size: int,
        rtol: float | None,
        min_probes: int,
        on_product: OnProduct | None,
    ) -> tuple[list[float], bool | None]:
        """Up to ``num_probes`` probes; returns their forms and ``target_met`` (``None`` without
        ``rtol``)."""
        samples: list[float] = []
        for size in _blocks(num_probes, max(1, block_size)):
            samples.extend(self.forms(draw_columns(self.shape, size, generator)))
            if on_product is not None:
                mean, se = mean_stderr(samples)
                on_product(
                    TraceProgress(
                        method=self.method,
                        value=self.offset + mean,
                        stderr=se,
                        n_probes=len(samples),
                        n_matvecs=self.spent + len(samples),
                        budget=self.budget,
                    )
                )
            if rtol is not None and len(samples) >= min_probes:
                value, half = self.interval(samples)
                if rtol_met(value, half, rtol):
                    return samples, True
        return samples, None if rtol is None else False


def t_half_width(
    samples: Sequence[float], ci_level: float, offset: float = 0.0
) -> tuple[float, float]:
    """``(offset + mean, half-width of its Student-t interval)`` of i.i.d. ``samples``."""
    mean, se = mean_stderr(samples)
    lo, hi = student_t_interval(mean, se, len(samples) - 1, ci_level)
    return offset + mean, (hi - lo) / 2
