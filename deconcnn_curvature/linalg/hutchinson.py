"""Hutchinson's stochastic trace estimator.

Hutchinson, M. F. (1989). *A stochastic estimator of the trace of the influence matrix for Laplacian
smoothing splines.* Communications in Statistics – Simulation and Computation 18(3), 1059–1076.

For Rademacher probes ``z``, ``E[zᵀAz] = tr A`` and ``Var[zᵀAz] = 2(‖A‖²_F − Σ A_ii²)``. We return
the sample mean of ``m`` independent quadratic forms with its standard error (sample standard
deviation / √m) and a Student-t confidence interval. In target-error mode the estimator stops when
the interval proves a relative error of at most ``rtol``
(:func:`~deconcnn_curvature.linalg.probes.rtol_met`) — an error bound, not a "the running mean
stopped moving" rule (which is what PyHessian 0.1 uses, and which stops after two probes on a
negative trace).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from deconcnn_curvature.errors import InvalidOptionError
from deconcnn_curvature.linalg.operator import LinearOperator
from deconcnn_curvature.linalg.probes import (
    OnProduct,
    ProbeLoop,
    TraceProgress,
    check_trace_args,
    mean_stderr,
    student_t_interval,
    t_half_width,
)

__all__ = [
    "TraceEstimate",
    "TraceProgress",
    "check_probe_count",
    "hutchinson",
    "student_t_interval",
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


def check_probe_count(num_matvecs: int) -> None:
    """At least 2 probes: a standard error needs two samples."""
    if num_matvecs < 2:
        raise InvalidOptionError(
            f"Hutchinson needs at least 2 probes for a standard error, got {num_matvecs}"
        )


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
    on_product: OnProduct | None = None,
) -> TraceEstimate:
    """Estimate ``tr A`` from Rademacher quadratic forms.

    Args:
        op: the symmetric operator.
        num_matvecs: probe budget. Without ``rtol`` exactly this many probes are used; with ``rtol``
            it is the cap.
        generator: the only source of randomness (seed it for reproducibility).
        block_size: probes multiplied per ``op.matmat`` call (a speed knob; results are identical
            for any block size because probes are drawn column by column in the same order).
        rtol: stop once the ``ci_level`` interval proves a relative error of at most ``rtol``
            (checked after each block, never before ``min_matvecs`` probes).
        min_matvecs: smallest sample before the stopping rule is consulted (keeps the standard
            error itself from being too noisy to trust).
        ci_level: confidence level of the reported interval.
        layer_slices: optional name → slice of the vector; per-block traces from the same probes.
        on_product: called with the running estimate after every block of products; an exception
            it raises propagates with nothing changed but the products made.
    """
    check_probe_count(num_matvecs)
    check_trace_args(rtol=rtol, ci_level=ci_level, block_size=block_size)
    # Per-layer sums stay on the operator's device: one host sync per block, not per layer.
    layer_names = list(layer_slices) if layer_slices else []
    layer_acc = torch.zeros(len(layer_names), dtype=torch.float64, device=op.device)

    def forms(z: torch.Tensor) -> list[float]:
        prod = (z * op.matmat(z)).to(torch.float64)
        if layer_names:
            layer_acc.add_(torch.stack([prod[layer_slices[n]].sum() for n in layer_names]))
        return prod.sum(dim=0).tolist()

    loop = ProbeLoop(
        op, forms, lambda s: t_half_width(s, ci_level), method="hutchinson", budget=num_matvecs
    )
    samples, target_met = loop.run(
        num_matvecs,
        generator=generator,
        block_size=block_size,
        rtol=rtol,
        min_probes=max(min_matvecs, 2),
        on_product=on_product,
    )
    mean, se = mean_stderr(samples)
    layers = dict(zip(layer_names, (layer_acc / len(samples)).tolist(), strict=True))
    return TraceEstimate(
        value=mean,
        stderr=se,
        n_matvecs=len(samples),
        ci=student_t_interval(mean, se, len(samples) - 1, ci_level),
        ci_level=ci_level,
        method="hutchinson",
        target_met=target_met,
        samples=tuple(samples),
        layers=layers or None,
    )
