"""Hutchinson's stochastic trace estimator.

Hutchinson, M. F. (1989). *A stochastic estimator of the trace of the influence matrix for Laplacian
smoothing splines.* Communications in Statistics – Simulation and Computation 18(3), 1059–1076.

For Rademacher probes ``z``, ``E[zᵀAz] = tr A`` and ``Var[zᵀAz] = 2(‖A‖²_F − Σ A_ii²)``. We return
the sample mean of ``m`` independent quadratic forms with its standard error (sample standard
deviation / √m) and a Student-t confidence interval. In target-error mode the estimator stops when
the half-width of that interval, relative to |mean|, falls below ``rtol`` — an error bound, not a
"the running mean stopped moving" rule (which is what PyHessian 0.1 uses, and which stops after two
probes on a negative trace).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from deconcnn_curvature.linalg._quantiles import student_t_quantile
from deconcnn_curvature.linalg.operator import LinearOperator, rademacher

__all__ = [
    "TraceEstimate",
    "TraceProgress",
    "hutchinson",
    "student_t_interval",
    "trace_progress",
]


@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate with its uncertainty.

    ``samples`` holds the individual quadratic forms (``None`` for estimators whose samples are not
    i.i.d.). ``layers`` maps a block name to its own trace estimate (same probes, sums to
    ``value``).
    """

    value: float
    stderr: float
    n_matvecs: int
    ci: tuple[float, float]
    ci_level: float
    method: str
    target_met: bool | None = None
    samples: tuple[float, ...] | None = None
    layers: Mapping[str, float] | None = None
    details: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class TraceProgress:
    """A running trace estimate, reported after every block of probes to the callback of
    :func:`trace_progress`: what a front end shows while it runs and prints if it is stopped.

    ``value`` and ``stderr`` are the estimate from the ``n_probes`` probes finished so far (the
    same formula as the final result, so the last report equals it); ``n_matvecs`` counts every
    product spent (Hutch++'s sketch included) against ``budget``, the most the run will spend.
    """

    method: str
    value: float
    stderr: float
    n_probes: int
    n_matvecs: int
    budget: int


_observer: contextvars.ContextVar[Callable[[TraceProgress], None] | None] = contextvars.ContextVar(
    "deconcnn_curvature_trace_progress", default=None
)


@contextlib.contextmanager
def trace_progress(callback: Callable[[TraceProgress], None]) -> Iterator[None]:
    """Within this block, every trace loop (Hutchinson, the deflated probes of Hutch++) calls
    ``callback(TraceProgress)`` after each block of probes. The callback runs in the estimator's
    thread, so it should be quick; an exception it raises stops the estimate."""
    token = _observer.set(callback)
    try:
        yield
    finally:
        _observer.reset(token)


class _Reporter:
    """Running mean and variance (Welford) of the probes, kept only while someone listens, so a
    report costs O(block) and not O(probes so far)."""

    def __init__(self, method: str, budget: int, offset: float = 0.0) -> None:
        self.callback = _observer.get()
        self.method, self.budget, self.offset = method, budget, offset
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def __call__(self, new: Sequence[float], n_matvecs: int) -> None:
        if self.callback is None:
            return
        for x in new:
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (x - self.mean)
        se = math.sqrt(self.m2 / (self.count - 1) / self.count) if self.count > 1 else math.inf
        self.callback(
            TraceProgress(
                method=self.method,
                value=self.offset + self.mean,
                stderr=se,
                n_probes=self.count,
                n_matvecs=n_matvecs,
                budget=self.budget,
            )
        )


def student_t_interval(mean: float, stderr: float, dof: int, level: float) -> tuple[float, float]:
    """Two-sided Student-t interval ``mean ± t_{(1+level)/2, dof} · stderr``."""
    if dof < 1 or not math.isfinite(stderr):
        return (-math.inf, math.inf)
    half = student_t_quantile(0.5 + level / 2, dof) * stderr
    return (mean - half, mean + half)


def _blocks(total: int, block: int) -> list[int]:
    sizes = [block] * (total // block)
    if total % block:
        sizes.append(total % block)
    return sizes


def hutchinson(
    op: LinearOperator,
    num_matvecs: int,
    *,
    generator: torch.Generator,
    block_size: int = 1,
    rtol: float | None = None,
    min_matvecs: int = 10,
    ci_level: float = 0.95,
    layer_slices: Mapping[str, slice] | None = None,
) -> TraceEstimate:
    """Estimate ``tr A`` from Rademacher quadratic forms.

    Args:
        op: the symmetric operator.
        num_matvecs: probe budget. Without ``rtol`` exactly this many probes are used; with ``rtol``
            it is the cap.
        generator: the only source of randomness (seed it for reproducibility).
        block_size: probes multiplied per ``op.matmat`` call (a speed knob; results are identical
            for any block size because probes are drawn column by column in the same order).
        rtol: stop once the ``ci_level`` interval half-width is at most ``rtol · |mean|`` (checked
            after each block, never before ``min_matvecs`` probes).
        min_matvecs: smallest sample before the stopping rule is consulted (keeps the standard
            error itself from being too noisy to trust).
        ci_level: confidence level of the reported interval.
        layer_slices: optional name → slice of the vector; per-block traces from the same probes.
    """
    if num_matvecs < 2:
        raise ValueError(
            f"Hutchinson needs at least 2 probes for a standard error, got {num_matvecs}"
        )
    samples: list[float] = []
    # Per-layer sums stay on the operator's device: one host sync per block, not per layer.
    layer_names = list(layer_slices) if layer_slices else []
    layer_acc = torch.zeros(len(layer_names), dtype=torch.float64, device=op.device)
    target_met: bool | None = None if rtol is None else False
    report = _Reporter("hutchinson", num_matvecs)
    # Probes are drawn one column at a time, so the sequence does not depend on block_size.
    for size in _blocks(num_matvecs, max(1, block_size)):
        cols = [
            rademacher(op.dim, 1, generator=generator, dtype=op.dtype, device=op.device)
            for _ in range(size)
        ]
        z = torch.cat(cols, dim=1)
        hz = op.matmat(z)
        prod = (z * hz).to(torch.float64)
        new = prod.sum(dim=0).tolist()
        samples.extend(new)
        report(new, len(samples))
        if layer_names:
            layer_acc += torch.stack([prod[layer_slices[n]].sum() for n in layer_names])
        if rtol is not None and len(samples) >= max(min_matvecs, 2):
            mean, se = _mean_se(samples)
            lo, hi = student_t_interval(mean, se, len(samples) - 1, ci_level)
            # The interval must prove the relative error for every trace it contains:
            # half <= rtol * (|mean| - half). Testing against |mean| alone stops early exactly
            # when |mean| came out too large, biasing the estimate away from zero.
            half = (hi - lo) / 2
            if half <= rtol * (abs(mean) - half):
                target_met = True
                break
    mean, se = _mean_se(samples)
    return TraceEstimate(
        value=mean,
        stderr=se,
        n_matvecs=len(samples),
        ci=student_t_interval(mean, se, len(samples) - 1, ci_level),
        ci_level=ci_level,
        method="hutchinson",
        target_met=target_met,
        samples=tuple(samples),
        layers=(
            dict(zip(layer_names, (layer_acc / len(samples)).tolist(), strict=True))
            if layer_names
            else None
        ),
    )


def _mean_se(samples: list[float]) -> tuple[float, float]:
    m = len(samples)
    mean = math.fsum(samples) / m
    if m < 2:
        return mean, math.inf
    var = math.fsum((s - mean) ** 2 for s in samples) / (m - 1)
    return mean, math.sqrt(var / m)
