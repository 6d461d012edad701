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
the two parts level (``n / m = √(B / A)`` scaled by the budget), as in two-stage sampling. Fewer
products than the measurement the noise came from are counted at ``1/m²`` (Hutch++'s rate, the
faster one), more at ``1/m`` (Hutchinson's, the slower): the rule never counts on a product being
worth more than it may be.

**The fixed shape** (``hessian_batch_size`` samples, ``num_hvps`` products) bounds where the
error model is used. Without a noise estimate, or when the shape does not fit, the measurement is
the shape scaled down (with λ_max measured the batch is kept while it fits: λ_max of a small batch
is biased upwards, which the trace's model does not see); below the shape Hutch++ loses its
deflation faster than any per-product rate says (``benchmarks/budget_noise.py``). When the shape
fits, :func:`choose_size` spends the rest by the error model. The first measurement's cost is
predicted from the timed training steps (:data:`FIRST_COST_RATIO`).

**Spending.** The next measurement may take what this interval's training earned plus a quarter
(:data:`PAYBACK_INTERVALS`) of the balance carried from before: an overspent or underspent
measurement is evened out over the next few, never paid back at once by one tiny measurement.
A shortfall of at most a fifth of the fixed shape's predicted seconds (:data:`SHAPE_SLACK`, in
the allowance and in the whole balance) does not shrink it: it is measured as it is and the debt
evened out the same way (``max_seconds`` is never exceeded for it); once measured, the shape is
priced by its own recent seconds rather than the fit.

**Minimums.** A measurement keeps its interval: at least ``min_products`` products (2, or the
backend's minimum) and at least 2 samples per data group (``data_groups ≥ 2``). When even the
minimum does not fit, the measurement is skipped and recorded with the reason, never run over.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "FIRST_COST_RATIO",
    "FIRST_PRODUCTS",
    "FIRST_SAMPLES_PER_GROUP",
    "FIT_SPREAD",
    "MAX_BATCH_FACTOR",
    "MAX_GROWTH",
    "MAX_PRODUCTS",
    "PAYBACK_INTERVALS",
    "SHAPE_SLACK",
    "Limits",
    "Noise",
    "Size",
    "TimeBudget",
    "allowed_seconds",
    "choose_size",
    "fit_cost",
    "predicted_variance",
]

#: Samples per data group of the first measurement when not even the training step's cost is
#: known (no training batch size): 4 per group.
FIRST_SAMPLES_PER_GROUP = 4
#: Trace products of that first measurement, raised to a backend's minimum.
FIRST_PRODUCTS = 4
#: The first measurement's predicted seconds per sample and product, in units of a timed training
#: step's seconds per training sample: a Hessian-vector product costs about two gradients (a
#: double backward), a training step about one gradient and an optimiser update; measured 1.1 on
#: ``small_cnn`` (``benchmarks/time_budget.py``); 2 errs towards a smaller first measurement.
FIRST_COST_RATIO = 2.0
#: An overspent or underspent balance is evened out over about this many measurements.
PAYBACK_INTERVALS = 4
#: A measurement does at most this many times the work (samples x products) of the largest one
#: timed so far: a cost fitted on small measurements is not trusted far beyond them (one fit, all
#: intercept and almost no slope, once sized 169 samples x 54 products where 30 x 5 had been
#: measured, and the run overspent its 5 % target at 8.5 %).
MAX_GROWTH = 2.0
#: The budget's curvature batch is at most this many times ``hessian_batch_size`` (memory bound).
MAX_BATCH_FACTOR = 8
#: The fixed shape is measured as it is when the allowance (and the run's whole balance) falls
#: short of its predicted seconds by at most this share of them: the run then goes at most a
#: fifth of a measurement into debt, paid back from the next intervals, instead of measuring a
#: scaled-down shape whose error is far larger (``benchmarks/budget_noise.py``: Hutch++'s probe
#: variance 25-55x from 10 to 5 products) for a shortfall within the cost model's own scatter.
#: Never beyond ``max_seconds``, which is a per-measurement limit.
SHAPE_SLACK = 0.2
#: Most trace products one measurement may be given.
MAX_PRODUCTS = 512
#: Neither noise component is taken below this share of the measured variance: a data part from
#: ``G − 1`` degrees of freedom (3 with 4 groups) is often estimated as 0 when it is not, and a 0
#: would put the whole budget into products on a minimal batch.
NOISE_FLOOR = 0.1
#: An intercept is fitted to the cost only when the works timed span at least this factor: over
#: nearly equal works the slope is timing noise (seven measurements of 64 x 20 and one of 64 x 18,
#: their seconds +-15 %, fitted 0.13 s of intercept and a hundredth of the slope, which priced
#: even the smallest measurement over the allowance and skipped one).
FIT_SPREAD = 2.0
#: Smoothing of the step time and the noise components (weight of the newest value).
EWMA_WEIGHT = 0.5


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a measurement may be: samples in ``[min_samples, max_samples]``, trace products in
    ``[min_products, max_products]``. ``start`` is the fixed shape ``(samples, products)`` a
    measurement without a noise estimate takes (scaled down to fit; default: the minimums);
    ``floor_samples`` the batch kept whenever it fits (λ_max measured: ``hessian_batch_size``)."""

    min_samples: int
    max_samples: int
    min_products: int
    max_products: int = MAX_PRODUCTS
    start: tuple[int, int] | None = None
    floor_samples: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.min_samples <= self.max_samples:
            raise ValueError(f"need 1 <= min_samples <= max_samples, got {self}")
        if not 1 <= self.min_products <= self.max_products:
            raise ValueError(f"need 1 <= min_products <= max_products, got {self}")

    @property
    def start_shape(self) -> tuple[int, int]:
        """``start`` within the limits."""
        n, m = self.start or (self.min_samples, self.min_products)
        return (
            min(self.max_samples, max(self.min_samples, n)),
            min(self.max_products, max(self.min_products, m)),
        )


@dataclasses.dataclass(frozen=True)
class Noise:
    """Per-unit variances: ``probe`` = ``stderr_probe² · m`` (one product's), ``data`` =
    ``stderr_data² · n`` (one sample's), from a measurement of ``products`` trace products
    (``0``: unknown)."""

    probe: float
    data: float
    products: float = 0.0

    @classmethod
    def from_stderrs(
        cls, stderr_probe: float, stderr_data: float, samples: int, products: int
    ) -> Noise:
        """From a measurement of ``products`` on ``samples``, each component at least
        :data:`NOISE_FLOOR` of their sum."""
        total = stderr_probe**2 + stderr_data**2
        probe = max(stderr_probe**2, NOISE_FLOOR * total)
        data = max(stderr_data**2, NOISE_FLOOR * total)
        return cls(probe=probe * products, data=data * samples, products=float(products))


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
    squares over ``points = [(work, seconds), ...]``, with ``c0, c1 ≥ 0``. One point, or works
    spanning less than a factor :data:`FIT_SPREAD`: ``c0 = 0`` and ``c1`` their mean ratio (it
    overstates the cost of a larger measurement when ``c0 > 0``: the safe side)."""
    pts = [(float(w), float(s)) for w, s in points if w > 0 and math.isfinite(s)]
    if not pts:
        raise ValueError("fit_cost needs at least one measurement with work > 0")
    ratio = sum(s for _, s in pts) / sum(w for w, _ in pts)
    n = len(pts)
    mw = sum(w for w, _ in pts) / n
    ms = sum(s for _, s in pts) / n
    works = [w for w, _ in pts]
    if max(works) < FIT_SPREAD * min(works):  # one point, or works too close to fit a slope
        return 0.0, ratio
    sww = sum((w - mw) ** 2 for w, _ in pts)
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
    is measured from the same batch (see ``docs/time-budget.md``). Below the ``noise.products``
    the noise was measured with, the probe part grows as ``1/m²`` (Hutch++'s rate) instead."""
    fewer = max(1.0, noise.products / products)
    return noise.probe / products * fewer + data_weight * noise.data / samples


def choose_size(
    allowed: float,
    cost: tuple[float, float],
    noise: Noise | None,
    limits: Limits,
    extra_products: float = 0.0,
    data_weight: float = 1.0,
    max_work: float = math.inf,
    balance: float = math.inf,
    hard_limit: float = math.inf,
    shape_seconds: float | None = None,
) -> Size:
    """The size of a measurement whose predicted seconds ``c0 + c1 · n · (m + extra_products)``
    are at most ``allowed`` and whose work ``n · (m + extra_products)`` is at most ``max_work``
    (a cost fitted on small measurements is not trusted far beyond them).

    The one exception: the fixed shape ``limits.start`` is measured as it is when its predicted
    seconds ``s`` exceed ``allowed`` and the run's whole ``balance`` by at most
    :data:`SHAPE_SLACK` ``· s`` and are within ``hard_limit`` (``max_seconds``): rule ``"fixed
    shape, kept"``. ``shape_seconds``: the shape's own measured seconds, used for ``s`` instead
    of the fit (a fit over smaller measurements overstates it: their fixed costs and λ_max's
    extra products are spread over less work).

    When the fixed shape ``limits.start`` fits and the noise is known: the ``(n, m)`` of least
    :func:`predicted_variance` with at least the shape's samples and products (the rest of the
    budget goes where the predicted error falls most). Otherwise the fixed shape scaled down to
    fit (:func:`_scaled_start`: with ``limits.floor_samples`` the batch is kept while it fits
    and the products give way first): below the shape the error model is not trusted, since
    Hutch++ loses its deflation (its probe variance grew 25-35x from 10 to 5 products) and
    λ_max its batch. When even the minimum does not fit, a :class:`Size` with ``skipped`` set."""
    c0, c1 = cost
    max_work = max(max_work, limits.min_samples * (limits.min_products + extra_products))

    def seconds(n: int, m: int) -> float:
        if n * (m + extra_products) > max_work:
            return math.inf  # beyond what the cost was measured on: does not fit
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
    low = limits.min_samples
    if limits.floor_samples is not None:
        floor = min(max(limits.floor_samples, low), limits.max_samples)
        if seconds(floor, limits.min_products) <= allowed:
            low = floor
    n0, m0 = limits.start_shape
    shape = seconds(max(n0, low), m0)
    if shape_seconds is not None and max(n0, low) == n0 and math.isfinite(shape):
        shape = shape_seconds
    short = allowed < shape <= hard_limit and math.isfinite(shape)
    if short and shape * (1 - SHAPE_SLACK) <= min(allowed, balance):
        return Size(max(n0, low), m0, allowed, shape, "fixed shape, kept")
    if noise is None or shape > allowed:
        n, m = _scaled_start(allowed, seconds, limits, low)
        rule = "fixed shape (no noise estimate yet)" if noise is None else "fixed shape, scaled"
        return Size(n, m, allowed, seconds(n, m), rule)
    # The fixed shape fits: the rest goes where the predicted error falls most.
    low = max(low, n0)
    best: tuple[float, int, int] | None = None
    for m in range(m0, limits.max_products + 1):
        room = (allowed - c0) / (c1 * (m + extra_products)) if c1 > 0 else math.inf
        room = min(room, max_work / (m + extra_products))
        n = limits.max_samples if room >= limits.max_samples else math.floor(room)
        if m == m0:
            n = max(n, low)  # it fits (checked above); the division may round a hair below
        if n < low:
            break  # more products leave even fewer samples
        var = predicted_variance(n, m, noise, data_weight)
        if best is None or var < best[0] * (1 - 1e-12):
            best = (var, n, m)
    assert best is not None  # the minimum (or the floor, checked) fits
    _, n, m = best
    return Size(n, m, allowed, seconds(n, m), "balanced")


def _scaled_start(
    allowed: float, seconds: Callable[[int, int], float], limits: Limits, low: int
) -> tuple[int, int]:
    """The fixed shape, both sizes scaled down by the same factor until it fits, the samples
    never below ``low`` (λ_max's batch, when it fits with the least products; the caller checked
    that ``(low, min_products)`` fits)."""
    n0, m0 = limits.start_shape
    scale = 1.0
    while True:
        n = max(low, math.floor(n0 * scale))
        m = max(limits.min_products, math.floor(m0 * scale))
        if seconds(n, m) <= allowed or (n, m) == (low, limits.min_products):
            return n, m
        scale *= 0.9


def allowed_seconds(
    max_overhead: float | None,
    max_seconds: float | None,
    train_seconds: float,
    spent_seconds: float,
    since_last: float | None = None,
) -> float:
    """Seconds the next measurement may take, at most ``max_seconds``; with both budgets the
    tighter wins. With ``max_overhead``: the balance ``max_overhead · train_seconds −
    spent_seconds`` (unspent budget carries over, overspent is paid back, so the cumulative
    share tracks the target); given ``since_last`` (training seconds since the last
    measurement), what they earned plus ``1 /`` :data:`PAYBACK_INTERVALS` of the balance carried
    from before, so a surplus or a debt is evened out over the next few measurements."""
    limit = math.inf
    if max_overhead is not None:
        limit = _balance(max_overhead, train_seconds, spent_seconds)
        if since_last is not None:
            earned = max_overhead * since_last
            limit = earned + (limit - earned) / PAYBACK_INTERVALS
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
        train_batch_size: int | None = None,
        first_extra_products: float = 0.0,
    ) -> None:
        self.max_overhead = max_overhead
        self.max_seconds = max_seconds
        self.limits = limits
        self.data_weight = data_weight
        self.train_batch_size = train_batch_size
        self.first_extra_products = first_extra_products
        self.step_seconds: float | None = None  # EWMA of one training step
        self.train_seconds = 0.0
        self.train_at_last = 0.0  # training seconds at the last measurement
        self.spent_seconds = 0.0
        self.steps = 0
        self.first_point: tuple[float, float] | None = None  # (samples x products, seconds)
        self.points: list[tuple[float, float]] = []  # the later ones, the last 8
        self.shape_points: list[float] = []  # seconds of the later ones of the fixed shape, last 4
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
        self.train_at_last = self.train_seconds
        if total_products > 0:
            point = (float(size.samples * total_products), float(seconds))
            # The first measurement pays one-time costs (imports, the first graph): it sizes the
            # second only. Then the recent cost (it moves with the phase of training).
            if self.first_point is None:
                self.first_point = point
            else:
                self.points = [*self.points, point][-8:]
                if (size.samples, size.products) == self.limits.start_shape:
                    self.shape_points = [*self.shape_points, float(seconds)][-4:]
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
                    # Per-product variances measured at different m are averaged as if the
                    # 1/m rate held between them; the latest m is the reference for fewer.
                    else Noise(_ewma(old.probe, new.probe), _ewma(old.data, new.data), new.products)
                )

    def charge(self, seconds: float) -> None:
        """Measuring time spent outside a measurement (the monitor's setup and start-up check)."""
        self.spent_seconds += max(0.0, float(seconds))

    def skipped(self, size: Size) -> None:
        """A measurement skipped for lack of budget (nothing spent)."""
        self.chosen.append(_said(size))

    # -------------------------------------------------------------------------- sizing

    def balance(self) -> float:
        """``max_overhead · train_seconds − spent_seconds`` (``inf`` without ``max_overhead``):
        what the run may still spend in all."""
        if self.max_overhead is None:
            return math.inf
        return _balance(self.max_overhead, self.train_seconds, self.spent_seconds)

    def _slack(self) -> dict[str, Any]:
        """:func:`choose_size`'s ``balance``, ``hard_limit`` and ``shape_seconds`` (the fixed
        shape kept; its price the mean of its recent measurements, the first left out: it pays
        one-time costs)."""
        return {
            "balance": self.balance(),
            "hard_limit": math.inf if self.max_seconds is None else self.max_seconds,
            "shape_seconds": (
                sum(self.shape_points) / len(self.shape_points) if self.shape_points else None
            ),
        }

    def allowed(self) -> float:
        """Seconds the next measurement may take (:func:`allowed_seconds`)."""
        return allowed_seconds(
            self.max_overhead,
            self.max_seconds,
            self.train_seconds,
            self.spent_seconds,
            since_last=self.train_seconds - self.train_at_last,
        )

    def first_size(self) -> Size:
        """The first measurement's size (no measurement timed yet): the fixed shape scaled to
        fit, its cost predicted as :data:`FIRST_COST_RATIO` × the timed training step's seconds
        per training sample. Without a timed step or the training batch size, or when even the
        minimum would not fit that guess: :data:`FIRST_SAMPLES_PER_GROUP` samples per group
        (``min_samples`` is 2 per group) and :data:`FIRST_PRODUCTS` products, within the
        limits."""
        lim, allowed = self.limits, self.allowed()
        if self.step_seconds and self.train_batch_size:
            per = FIRST_COST_RATIO * self.step_seconds / self.train_batch_size
            size = choose_size(
                allowed,
                (0.0, per),
                None,
                lim,
                extra_products=self.first_extra_products,
                **self._slack(),
            )
            if size.skipped is None:
                return dataclasses.replace(size, rule="first: fixed shape, cost from the steps")
            # The step-based guess can be far off (a step dominated by data loading or a slow
            # optimiser): measure small rather than never learn the real cost.
        n = min(lim.max_samples, FIRST_SAMPLES_PER_GROUP // 2 * lim.min_samples)
        m = min(lim.max_products, max(lim.min_products, FIRST_PRODUCTS))
        return Size(n, m, allowed, None, "first (no cost measured yet)")

    def size(self) -> Size:
        """The next measurement's size (see :func:`choose_size`), remembered for the summary."""
        if self.first_point is None:
            allowed = self.allowed()
            if allowed <= 0:
                lim = self.limits
                size = Size(
                    lim.min_samples,
                    lim.min_products,
                    allowed,
                    None,
                    "skip",
                    skipped=(
                        f"no budget left yet ({allowed:.3g} s: the monitor's set-up and "
                        "earlier measurements are not yet paid for by training time)"
                    ),
                )
            else:
                size = self.first_size()
        else:
            size = choose_size(
                self.allowed(),
                fit_cost(self.points or [self.first_point]),
                self.noise,
                self.limits,
                extra_products=self.extra_products or 0.0,
                data_weight=self.data_weight,
                max_work=MAX_GROWTH * max(w for w, _ in [self.first_point, *self.points]),
                **self._slack(),
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
            "train_at_last": self.train_at_last,
            "steps": self.steps,
            "first_point": None if self.first_point is None else list(self.first_point),
            "points": [list(p) for p in self.points],
            "shape_points": list(self.shape_points),
            "extra_products": self.extra_products,
            "noise": None if self.noise is None else dataclasses.asdict(self.noise),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step_seconds = state.get("step_seconds")
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.spent_seconds = float(state.get("spent_seconds", 0.0))
        # A checkpoint from before the field: as if it had just measured (never one huge
        # allowance for the whole run so far).
        self.train_at_last = float(state.get("train_at_last", self.train_seconds))
        self.steps = int(state.get("steps", 0))
        first = state.get("first_point")
        self.first_point = None if first is None else (float(first[0]), float(first[1]))
        self.points = [(float(w), float(s)) for w, s in state.get("points", ())]
        self.shape_points = [float(s) for s in state.get("shape_points", ())]
        self.extra_products = state.get("extra_products")
        noise = state.get("noise")
        self.noise = None if noise is None else Noise(**noise)


def _balance(max_overhead: float, train_seconds: float, spent_seconds: float) -> float:
    """What a run may still spend in all: its share of the training so far less what it spent."""
    return max_overhead * train_seconds - spent_seconds


def _ewma(old: float, new: float) -> float:
    return (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * new


def _said(size: Size) -> dict[str, Any]:
    return {
        "samples": size.samples,
        "products": size.products,
        "seconds": size.seconds,
        "skipped": size.skipped,
    }
