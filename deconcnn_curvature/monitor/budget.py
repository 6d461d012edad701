"""A time budget for the monitor: how long measurements may take, and how to spend it.

The user states the budget as time — ``max_overhead`` (a share of training time, e.g. 0.05) and/or
``max_seconds`` (per measurement) — and the monitor chooses, before each measurement, the number of
curvature-batch samples ``n`` and trace products ``m`` (the backend's probe budget) that fit it and
minimise the predicted error of the trace of the *whole data set's* Hessian. Pure functions and one
small stateful class (:class:`TimeBudget`), testable without Lightning; the rule is written out in
``docs/time-budget.md``.

**Cost model.** One measurement of ``n`` samples and ``p`` products (the trace's ``m`` plus the
products the eigenvalues spend beyond them) takes ``t ≈ c0 + c1 · n · p`` seconds: a product over
``n`` samples costs one forward-and-double-backward over them, and the data groups of a two-way
interval cost nothing extra (the groups' products sum to the union's). ``c0, c1 ≥ 0`` are fitted by
least squares to the measurements so far (:func:`fit_cost`).

**Error model.** The two-way random-effects model (:mod:`deconcnn_curvature.linalg.two_way`) splits
the variance of the trace into a probe part ``V_probe = σ²_z / m`` (``σ²_z`` the variance of one
probe's quadratic form) and a data part ``V_data = S²_t / n`` (``S²_t`` the variance of a sample's
trace). The previous measurement's ``stderr_probe`` and ``stderr_data`` (of ``m0`` products on
``n0`` samples) give ``A = stderr_probe² · m0`` and ``B = stderr_data² · n0``, so
``V(n, m) = A / m + B / n`` (:func:`predicted_variance`). Minimising it under ``n · p ≤ K`` puts
the two parts level (``n / m = √(B / A)`` scaled by the budget), as in two-stage sampling.

**Minimums.** A measurement keeps its interval: at least ``min_products`` products (2, or the
backend's minimum) and at least 2 samples per data group (``data_groups ≥ 2``). When even the
minimum does not fit, the measurement is skipped and recorded with the reason, never run over.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "FIRST_PRODUCTS",
    "FIRST_SAMPLES_PER_GROUP",
    "MAX_BATCH_FACTOR",
    "MAX_PRODUCTS",
    "Limits",
    "Noise",
    "Size",
    "TimeBudget",
    "allowed_seconds",
    "choose_size",
    "fit_cost",
    "predicted_variance",
]

#: Samples per data group of the first measurement (no cost known yet): 4 per group.
FIRST_SAMPLES_PER_GROUP = 4
#: Trace products of the first measurement (no noise known yet), raised to a backend's minimum.
FIRST_PRODUCTS = 4
#: The budget's curvature batch is at most this many times ``hessian_batch_size`` (memory bound).
MAX_BATCH_FACTOR = 8
#: Most trace products one measurement may be given.
MAX_PRODUCTS = 512
#: Neither noise component is taken below this share of the measured variance: a data part from
#: ``G − 1`` degrees of freedom (3 with 4 groups) is often estimated as 0 when it is not, and a 0
#: would put the whole budget into products on a minimal batch.
NOISE_FLOOR = 0.1
#: Smoothing of the step time and the noise components (weight of the newest value).
EWMA_WEIGHT = 0.5


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a measurement may be: samples in ``[min_samples, max_samples]``, trace products in
    ``[min_products, max_products]``."""

    min_samples: int
    max_samples: int
    min_products: int
    max_products: int = MAX_PRODUCTS

    def __post_init__(self) -> None:
        if not 1 <= self.min_samples <= self.max_samples:
            raise ValueError(f"need 1 <= min_samples <= max_samples, got {self}")
        if not 1 <= self.min_products <= self.max_products:
            raise ValueError(f"need 1 <= min_products <= max_products, got {self}")


@dataclasses.dataclass(frozen=True)
class Noise:
    """Per-unit variances: ``probe`` = ``stderr_probe² · m`` (one product's), ``data`` =
    ``stderr_data² · n`` (one sample's)."""

    probe: float
    data: float

    @classmethod
    def from_stderrs(
        cls, stderr_probe: float, stderr_data: float, samples: int, products: int
    ) -> Noise:
        """From a measurement of ``products`` on ``samples``, each component at least
        :data:`NOISE_FLOOR` of their sum."""
        total = stderr_probe**2 + stderr_data**2
        probe = max(stderr_probe**2, NOISE_FLOOR * total)
        data = max(stderr_data**2, NOISE_FLOOR * total)
        return cls(probe=probe * products, data=data * samples)


@dataclasses.dataclass(frozen=True)
class Size:
    """A measurement's size (``samples``, trace ``products``) and what it was sized for; or a
    skip (``skipped`` the reason, sizes at the minimum)."""

    samples: int
    products: int
    seconds: float | None
    predicted_seconds: float | None
    rule: str
    skipped: str | None = None


def fit_cost(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """``(c0, c1)`` of ``seconds ≈ c0 + c1 · work`` (``work`` = samples × products) by least
    squares over ``points = [(work, seconds), ...]``, with ``c0, c1 ≥ 0``. One point, or points
    of one ``work``: ``c0 = 0`` and ``c1`` their mean ratio (it overstates the cost of a larger
    measurement when ``c0 > 0``: the safe side)."""
    pts = [(float(w), float(s)) for w, s in points if w > 0 and math.isfinite(s)]
    if not pts:
        raise ValueError("fit_cost needs at least one measurement with work > 0")
    ratio = sum(s for _, s in pts) / sum(w for w, _ in pts)
    n = len(pts)
    mw = sum(w for w, _ in pts) / n
    ms = sum(s for _, s in pts) / n
    sww = sum((w - mw) ** 2 for w, _ in pts)
    if n < 2 or sww <= 1e-12 * max(mw, 1.0) ** 2:
        return 0.0, ratio
    c1 = sum((w - mw) * (s - ms) for w, s in pts) / sww
    c0 = ms - c1 * mw
    if c1 <= 0:
        return 0.0, ratio
    if c0 < 0:  # through the origin
        return 0.0, sum(w * s for w, s in pts) / sum(w * w for w, _ in pts)
    return c0, c1


def predicted_variance(
    samples: int, products: int, noise: Noise, data_weight: float = 1.0
) -> float:
    """``V(n, m) = noise.probe / m + data_weight · noise.data / n``: the two-way model's variance
    of the trace of the data set's Hessian from ``m`` products on ``n`` samples (``data_weight``
    1), with the data part counted ``data_weight`` times when λ_max, which only samples improve,
    is measured from the same batch (see ``docs/time-budget.md``)."""
    return noise.probe / products + data_weight * noise.data / samples


def choose_size(
    allowed: float,
    cost: tuple[float, float],
    noise: Noise | None,
    limits: Limits,
    extra_products: float = 0.0,
    data_weight: float = 1.0,
) -> Size:
    """The ``(n, m)`` of least :func:`predicted_variance` with predicted seconds
    ``c0 + c1 · n · (m + extra_products)`` at most ``allowed``. Without a noise estimate the
    products stay at their minimum and the samples take the rest (data noise dominated every
    measurement so far: ``benchmarks/cost_accuracy.py``). When even the minimum does not fit, a
    :class:`Size` with ``skipped`` set."""
    c0, c1 = cost
    model = noise if noise is not None else Noise(probe=0.0, data=1.0)

    def seconds(n: int, m: int) -> float:
        return c0 + c1 * n * (m + extra_products)

    least = seconds(limits.min_samples, limits.min_products)
    if least > allowed:
        return Size(
            limits.min_samples,
            limits.min_products,
            allowed,
            least,
            "skip",
            skipped=(
                f"the smallest measurement ({limits.min_samples} samples x "
                f"{limits.min_products} products, predicted {least:.3g} s) exceeds what the "
                f"budget allows now ({allowed:.3g} s)"
            ),
        )
    best: tuple[float, int, int] | None = None
    for m in range(limits.min_products, limits.max_products + 1):
        room = (allowed - c0) / (c1 * (m + extra_products)) if c1 > 0 else math.inf
        n = limits.max_samples if room >= limits.max_samples else math.floor(room)
        if n < limits.min_samples:
            break  # more products leave even fewer samples
        var = predicted_variance(n, m, model, data_weight)
        if best is None or var < best[0] * (1 - 1e-12):
            best = (var, n, m)
    assert best is not None  # the minimum fits
    _, n, m = best
    rule = "balanced" if noise is not None else "samples first (no noise estimate yet)"
    return Size(n, m, allowed, seconds(n, m), rule)


def allowed_seconds(
    max_overhead: float | None,
    max_seconds: float | None,
    train_seconds: float,
    spent_seconds: float,
) -> float:
    """Seconds the next measurement may take: ``max_overhead`` of the training time so far less
    what measuring has spent (so unspent budget carries over to later measurements and an
    overspent one is paid back by skipping: the cumulative share tracks the target), and at most
    ``max_seconds``; with both, the tighter wins."""
    limit = math.inf
    if max_overhead is not None:
        limit = max_overhead * train_seconds - spent_seconds
    if max_seconds is not None:
        limit = min(limit, max_seconds)
    return limit


class TimeBudget:
    """The monitor's clock and sizing state.

    Call :meth:`tick` at the end of every training batch (before measuring) with the seconds since
    the last tick minus nothing (the monitor restarts the clock after measuring, so measurement
    time is not training time), :meth:`size` before a measurement, :meth:`observe` after it.
    """

    def __init__(
        self,
        max_overhead: float | None,
        max_seconds: float | None,
        limits: Limits,
        data_weight: float = 1.0,
    ) -> None:
        self.max_overhead = max_overhead
        self.max_seconds = max_seconds
        self.limits = limits
        self.data_weight = data_weight
        self.step_seconds: float | None = None  # EWMA of one training step
        self.train_seconds = 0.0
        self.spent_seconds = 0.0
        self.steps = 0
        self.first_point: tuple[float, float] | None = None  # (samples x products, seconds)
        self.points: list[tuple[float, float]] = []  # the later ones, the last 8
        self.extra_products: float | None = None  # EWMA: products beyond the trace's
        self.noise: Noise | None = None
        self.chosen: list[dict[str, Any]] = []

    # -------------------------------------------------------------------------- observing

    def tick(self, seconds: float) -> None:
        """One training step of ``seconds`` (wall time between two batch ends, measuring
        excluded)."""
        seconds = max(0.0, float(seconds))
        self.train_seconds += seconds
        self.steps += 1
        prev = self.step_seconds
        self.step_seconds = seconds if prev is None else _ewma(prev, seconds)

    def observe(
        self,
        size: Size,
        seconds: float,
        total_products: int,
        stderr_probe: float | None,
        stderr_data: float | None,
    ) -> None:
        """A measurement of ``size`` that took ``seconds`` (all of it, batch building included)
        and spent ``total_products`` products in all; the trace's noise components (``None``:
        not reported, e.g. a failed trace, keep the last estimate)."""
        self.spent_seconds += max(0.0, float(seconds))
        if total_products > 0:
            point = (float(size.samples * total_products), float(seconds))
            # The first measurement pays one-time costs (imports, the first graph): it sizes the
            # second only. Then the recent cost (it moves with the phase of training).
            if self.first_point is None:
                self.first_point = point
            else:
                self.points = [*self.points, point][-8:]
            extra = max(0.0, float(total_products - size.products))
            prev = self.extra_products
            self.extra_products = extra if prev is None else _ewma(prev, extra)
        if stderr_probe is not None and stderr_data is not None:
            new = Noise.from_stderrs(stderr_probe, stderr_data, size.samples, size.products)
            if all(math.isfinite(x) for x in (new.probe, new.data)):
                old = self.noise
                self.noise = (
                    new
                    if old is None
                    else Noise(_ewma(old.probe, new.probe), _ewma(old.data, new.data))
                )

    def charge(self, seconds: float) -> None:
        """Measuring time spent outside a measurement (the monitor's setup and start-up check)."""
        self.spent_seconds += max(0.0, float(seconds))

    def skipped(self, size: Size) -> None:
        """A measurement skipped for lack of budget (nothing spent)."""
        self.chosen.append(_said(size))

    # -------------------------------------------------------------------------- sizing

    def allowed(self) -> float:
        """Seconds the next measurement may take (:func:`allowed_seconds`)."""
        return allowed_seconds(
            self.max_overhead, self.max_seconds, self.train_seconds, self.spent_seconds
        )

    def first_size(self) -> Size:
        """The first measurement's size (no cost known): :data:`FIRST_SAMPLES_PER_GROUP` samples
        per group (``min_samples`` is 2 per group) and :data:`FIRST_PRODUCTS` products, within the
        limits."""
        lim = self.limits
        n = min(lim.max_samples, FIRST_SAMPLES_PER_GROUP // 2 * lim.min_samples)
        m = min(lim.max_products, max(lim.min_products, FIRST_PRODUCTS))
        return Size(n, m, self.allowed(), None, "first (no cost measured yet)")

    def size(self) -> Size:
        """The next measurement's size (see :func:`choose_size`), remembered for the summary."""
        if self.first_point is None:
            size = self.first_size()
            if size.seconds is not None and size.seconds <= 0:
                size = dataclasses.replace(
                    size,
                    rule="skip",
                    skipped=(
                        f"no budget left yet ({size.seconds:.3g} s: the monitor's set-up and "
                        "earlier measurements are not yet paid for by training time)"
                    ),
                )
        else:
            size = choose_size(
                self.allowed(),
                fit_cost(self.points or [self.first_point]),
                self.noise,
                self.limits,
                extra_products=self.extra_products or 0.0,
                data_weight=self.data_weight,
            )
        if size.skipped is None:
            self.chosen.append(_said(size))
        return size

    def share(self) -> float | None:
        """Measuring time over training time so far (``None`` before any training)."""
        return self.spent_seconds / self.train_seconds if self.train_seconds > 0 else None

    def summary(self) -> dict[str, Any]:
        """Target, achieved share and the sizes chosen, for a run summary."""
        return {
            "max_overhead": self.max_overhead,
            "max_seconds": self.max_seconds,
            "train_seconds": self.train_seconds,
            "step_seconds": self.step_seconds,
            "curvature_seconds": self.spent_seconds,
            "share": self.share(),
            "measured": sum(1 for c in self.chosen if c.get("skipped") is None),
            "skipped": sum(1 for c in self.chosen if c.get("skipped") is not None),
            "chosen": list(self.chosen),
        }

    def record_field(self, size: Size) -> dict[str, Any]:
        """What a record says of the budget it was sized for."""
        return {
            "seconds": size.seconds,
            "max_overhead": self.max_overhead,
            "max_seconds": self.max_seconds,
            "samples": size.samples,
            "products": size.products,
            "predicted_seconds": size.predicted_seconds,
            "rule": size.rule,
            "train_seconds": self.train_seconds,
            "spent_seconds": self.spent_seconds,
        }

    # -------------------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        return {
            "step_seconds": self.step_seconds,
            "train_seconds": self.train_seconds,
            "spent_seconds": self.spent_seconds,
            "steps": self.steps,
            "first_point": None if self.first_point is None else list(self.first_point),
            "points": [list(p) for p in self.points],
            "extra_products": self.extra_products,
            "noise": None if self.noise is None else dataclasses.asdict(self.noise),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step_seconds = state.get("step_seconds")
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.spent_seconds = float(state.get("spent_seconds", 0.0))
        self.steps = int(state.get("steps", 0))
        first = state.get("first_point")
        self.first_point = None if first is None else (float(first[0]), float(first[1]))
        self.points = [(float(w), float(s)) for w, s in state.get("points", ())]
        self.extra_products = state.get("extra_products")
        noise = state.get("noise")
        self.noise = None if noise is None else Noise(**noise)


def _ewma(old: float, new: float) -> float:
    return (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * new


def _said(size: Size) -> dict[str, Any]:
    return {
        "samples": size.samples,
        "products": size.products,
        "seconds": size.seconds,
        "skipped": size.skipped,
    }
