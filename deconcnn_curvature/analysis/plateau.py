"""Where λ_max plateaus, with an interval: deconCNN's written rule plus the records' uncertainty.

The rule (:func:`plateau_epochs`), as deconCNN's analysis plan writes it:

1. smooth the λ₁ series with an exponentially weighted moving average, ``alpha = 0.3``
   (``s₀ = x₀``, ``sᵢ = α xᵢ + (1 − α) sᵢ₋₁``, one update per measurement, in step order);
2. resample the smoothed series to the epoch grid: its value after ``E`` whole epochs of training
   (step ``E · steps_per_epoch``), linearly interpolated between the measurements around it;
3. take the derivative per epoch on that grid, ``d(E) = s(E + 1) − s(E)``;
4. the plateau epoch is the first ``E`` from which ``|d|`` stays below ``threshold`` for at least
   ``patience = 3`` epochs in a row (``d(E), …, d(E + patience − 1)``).

``threshold = 0.05`` is **relative** by default: ``|d(E)| / |s(E)| < 0.05``, a change of less
than 5 % of λ_max per epoch. λ_max differs by orders of magnitude between models, widths and
learning rates (about 5 for the tiny CNN here, tens to hundreds for a CIFAR ResNet-18), so an
absolute 0.05 per epoch would call every small-λ run flat from the start and no large-λ run ever
flat; ``relative=False`` applies it as written, in λ units per epoch. The absolute value of the
derivative is used: a plateau is flat, and a falling λ_max is not a plateau.

The uncertainty (:func:`find_plateau`): each point's standard error comes from its record (the
trace's ``stderr``, else its interval's half width over the normal quantile; for eigenvalues the
Lanczos residual, which bounds the distance to an eigenvalue and is used as a standard deviation,
a generous one). ``n_boot`` seeded parametric-bootstrap replicates redraw every point from a
normal distribution around its value with that standard deviation and apply the rule again; the
interval is described below, and ``found_share``
is the share of replicates that found a plateau at all. The interval is the percentile interval of
the replicates' plateau epochs at ``level`` (widened to hold the measured plateau).

What it covers: the measurement error the records report, nothing else. The run-to-run spread of
SGD (another seed, another batch order) is not in it: compare seeds of a sweep for that. With
``batch_mode=fixed`` λ_max is measured on one batch, and its Lanczos residual is small (at most
the tolerance, 1e-3 of the spectral scale by default; 1e-5 to 4e-5 measured on the demo), so the
interval is usually zero wide: the rule's answer does not depend on the measurement noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from deconcnn_curvature.errors import ConfigurationError

__all__ = ["Plateau", "find_plateau", "infer_steps_per_epoch", "plateau_epochs", "point_sigmas"]

#: The rule's parameters as deconCNN's analysis plan writes them (one place).
EWMA_ALPHA = 0.3
THRESHOLD = 0.05
PATIENCE = 3
#: Bootstrap replicates of the plateau interval.
N_BOOT = 1000


@dataclass(frozen=True)
class Plateau:
    """Where a series plateaus (:func:`find_plateau`).

    ``epoch``/``step``: the plateau of the measured series (``None`` when not found, then
    ``reason`` says why: too few points, or never flat). ``epoch_interval``/``step_interval``:
    the bootstrap interval at ``level`` over the replicates that found a plateau (``None`` when
    fewer than half of them did: then the plateau is not resolved by the data).
    """

    epoch: int | None
    step: int | None
    epoch_interval: tuple[float, float] | None
    step_interval: tuple[int, int] | None
    level: float
    found_share: float
    points: int
    steps_per_epoch: float | None
    reason: str | None = None

    @property
    def found(self) -> bool:
        return self.epoch is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "found": self.found,
            "epoch": self.epoch,
            "step": self.step,
            "epoch_interval": None if self.epoch_interval is None else list(self.epoch_interval),
            "step_interval": None if self.step_interval is None else list(self.step_interval),
            "level": self.level,
            "found_share": self.found_share,
            "points": self.points,
            "steps_per_epoch": self.steps_per_epoch,
            "reason": self.reason,
        }


def infer_steps_per_epoch(steps: Sequence[int], epochs: Sequence[int]) -> float | None:
    """Optimiser steps per epoch from the records' ``(step, epoch)`` pairs.

    The monitor measures after the step that brings ``global_step`` onto its cadence, during the
    epoch ``epoch``, so ``epoch · n < step ≤ (epoch + 1) · n``: ``n ≥ step / (epoch + 1)``. The
    largest such bound is returned (exact once a measurement falls on an epoch's last step);
    ``None`` without a measurement past step 0."""
    bounds = [s / (e + 1) for s, e in zip(steps, epochs, strict=True) if s > 0 and e >= 0]
    return max(bounds) if bounds else None


def _ewma(values: np.ndarray, alpha: float) -> np.ndarray:
    """EWMA along the last axis (``s₀ = x₀``; pandas' ``ewm(alpha=…, adjust=False)``)."""
    out = np.empty_like(values)
    out[..., 0] = values[..., 0]
    for i in range(1, values.shape[-1]):
        out[..., i] = alpha * values[..., i] + (1 - alpha) * out[..., i - 1]
    return out


def _grid_weights(at: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices and weights that interpolate a series measured at ``at`` onto ``grid``."""
    right = np.clip(np.searchsorted(at, grid, side="left"), 1, len(at) - 1)
    left = right - 1
    span = at[right] - at[left]
    weight = np.where(span > 0, (grid - at[left]) / np.where(span > 0, span, 1.0), 1.0)
    return left, np.clip(weight, 0.0, 1.0)


def _first_flat(
    smooth_grid: np.ndarray, threshold: float, patience: int, relative: bool
) -> np.ndarray:
    """Index on the grid of the first flat stretch per row (-1: none)."""
    diff = np.abs(np.diff(smooth_grid, axis=-1))
    if relative:
        scale = np.abs(smooth_grid[..., :-1])
        flat = diff < threshold * scale
    else:
        flat = diff < threshold
    count = flat.shape[-1] - patience + 1
    if count <= 0:
        return np.full(flat.shape[:-1], -1)
    window = np.ones((*flat.shape[:-1], count), dtype=bool)
    for lag in range(patience):
        window &= flat[..., lag : lag + count]
    first = np.argmax(window, axis=-1)
    return np.where(window.any(axis=-1), first, -1)


def plateau_epochs(
    epochs_at: np.ndarray,
    values: np.ndarray,
    *,
    alpha: float = EWMA_ALPHA,
    threshold: float = THRESHOLD,
    patience: int = PATIENCE,
    relative: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """The rule on one or many series (rows of ``values``) measured at fractional epochs
    ``epochs_at`` (increasing). Returns the plateau epoch per row (-1: never flat) and the
    epoch grid."""
    grid = np.arange(math.ceil(epochs_at[0]), math.floor(epochs_at[-1]) + 1, dtype=float)
    smooth = _ewma(np.asarray(values, dtype=float), alpha)
    left, weight = _grid_weights(epochs_at, grid)
    on_grid = smooth[..., left] * (1 - weight) + smooth[..., left + 1] * weight
    first = _first_flat(on_grid, threshold, patience, relative)
    return np.where(first >= 0, grid[np.maximum(first, 0)], -1.0), grid


def point_sigmas(
    stderr: Sequence[float | None],
    ci_low: Sequence[float | None] = (),
    ci_high: Sequence[float | None] = (),
    ci_level: Sequence[float | None] = (),
    residual: Sequence[float | None] = (),
) -> np.ndarray:
    """Each point's standard deviation for the bootstrap: ``stderr``; else the interval's half
    width over the normal quantile of its level; else the Lanczos ``residual``; else 0."""
    out = []
    for i, se in enumerate(stderr):
        picks = [se]
        lo, hi = _at(ci_low, i), _at(ci_high, i)
        level = _at(ci_level, i) or 0.95
        if lo is not None and hi is not None and 0 < level < 1:
            picks.append((hi - lo) / 2 / NormalDist().inv_cdf(0.5 + level / 2))
        picks.append(_at(residual, i))
        usable = [abs(float(p)) for p in picks if p is not None and math.isfinite(float(p))]
        out.append(usable[0] if usable else 0.0)
    return np.asarray(out, dtype=float)


def _at(seq: Sequence[float | None], i: int) -> float | None:
    if i >= len(seq) or seq[i] is None:
        return None
    value = float(seq[i])
    return value if math.isfinite(value) else None


def _check_rule(alpha: float, threshold: float, patience: int, level: float, n_boot: int) -> None:
    if not 0 < alpha <= 1:
        raise ConfigurationError(f"alpha must be in (0, 1]; got {alpha}.")
    if not threshold > 0:
        raise ConfigurationError(f"threshold must be positive; got {threshold}.")
    if patience < 1:
        raise ConfigurationError(f"patience must be at least 1; got {patience}.")
    if not 0 < level < 1:
        raise ConfigurationError(f"level must be in (0, 1); got {level}.")
    if n_boot < 0:
        raise ConfigurationError(f"n_boot must be 0 or more; got {n_boot}.")


def find_plateau(
    steps: Sequence[int],
    epochs: Sequence[int],
    values: Sequence[float],
    sigmas: Sequence[float] | None = None,
    *,
    alpha: float = EWMA_ALPHA,
    threshold: float = THRESHOLD,
    patience: int = PATIENCE,
    relative: bool = True,
    steps_per_epoch: float | None = None,
    n_boot: int = N_BOOT,
    level: float = 0.95,
    seed: int = 0,
) -> Plateau:
    """The plateau of a series (λ_max by default in the report) by the rule in this module's
    docstring, with a seeded parametric-bootstrap interval from each point's ``sigmas``
    (:func:`point_sigmas`; ``None`` or zeros: no uncertainty, a zero-width interval).

    ``steps``/``epochs``: the records' optimiser step and epoch of each point (any order);
    ``steps_per_epoch``: inferred from them when not given (:func:`infer_steps_per_epoch`).
    Returns a :class:`Plateau`; "no plateau" carries the reason (too few points, never flat).
    """
    _check_rule(alpha, threshold, patience, level, n_boot)
    order = np.argsort(np.asarray(steps), kind="stable")
    step_arr = np.asarray(steps, dtype=float)[order]
    x = np.asarray(values, dtype=float)[order]
    sd = np.zeros_like(x) if sigmas is None else np.asarray(sigmas, dtype=float)[order]
    if x.size and not (np.isfinite(x).all() and np.isfinite(sd).all()):
        raise ConfigurationError("find_plateau: values and sigmas must be finite numbers.")
    spe = steps_per_epoch or infer_steps_per_epoch(list(steps), list(epochs))
    need = patience + 1
    span = (step_arr[-1] - step_arr[0]) / spe if spe and x.size > 1 else 0.0
    grid_len = (math.floor(step_arr[-1] / spe) - math.ceil(step_arr[0] / spe) + 1) if spe else 0
    if x.size < 2 or spe is None or grid_len < need:
        return Plateau(
            None, None, None, None, level, 0.0, int(x.size), spe,
            reason=f"too few points: {x.size} point(s) spanning {span:.3g} epochs; the rule "
            f"needs the smoothed series at {need} whole epochs (patience {patience} + 1)",
        )  # fmt: skip
    rule = {"alpha": alpha, "threshold": threshold, "patience": patience, "relative": relative}
    at = step_arr / spe
    measured = float(plateau_epochs(at, x, **rule)[0])
    rng = np.random.default_rng(seed)
    boot = plateau_epochs(at, x + sd * rng.standard_normal((n_boot, x.size)), **rule)[0]
    hits = boot[boot >= 0]
    share = float(hits.size / n_boot) if n_boot else float(measured >= 0)
    epoch = int(measured) if measured >= 0 else None
    interval = _interval(epoch, hits, level, share)
    reason = None
    if epoch is None:
        size = f"{threshold:.0%} of λ" if relative else f"{threshold:g}"
        reason = (
            f"never flat: the smoothed derivative never stayed below {size} per epoch for "
            f"{patience} epochs in a row"
        )
    return Plateau(
        epoch, None if epoch is None else round(epoch * spe), interval, _steps(interval, spe),
        level, share, int(x.size), spe, reason,
    )  # fmt: skip


def _interval(
    epoch: int | None, hits: np.ndarray, level: float, share: float
) -> tuple[float, float] | None:
    """The percentile interval of the replicates' plateau epochs, widened to hold the measured
    one. ``None`` when fewer than half the replicates found a plateau. (The basic interval,
    which reflects the quantiles around the measured epoch, covered less on synthetic series with
    a known plateau: on a whole-epoch grid it is often zero wide; see tests/analysis.)"""
    if hits.size == 0 or share < 0.5:
        return None
    q_lo, q_hi = (float(q) for q in np.quantile(hits, [(1 - level) / 2, (1 + level) / 2]))
    if epoch is None:
        return q_lo, q_hi
    return min(q_lo, float(epoch)), max(q_hi, float(epoch))


def _steps(interval: tuple[float, float] | None, spe: float) -> tuple[int, int] | None:
    if interval is None:
        return None
    return round(interval[0] * spe), round(interval[1] * spe)
