"""The time budget's sizing rule, without Lightning: the cost fit, the allowed seconds (the tighter
of two budgets, carry-over), the split between samples and products that the two-way error model
calls best, the minimums, and skipping when nothing fits."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import pytest

from deconcnn_curvature.monitor.budget import (
    FIT_SPREAD,
    MAX_GROWTH,
    NOISE_FLOOR,
    SHAPE_SLACK,
    Limits,
    Noise,
    Size,
    TimeBudget,
    allowed_seconds,
    choose_size,
    fit_cost,
    predicted_variance,
)

WIDE = Limits(min_samples=8, max_samples=10_000, min_products=2, max_products=10_000)


def test_fit_cost_recovers_an_exact_line_and_is_safe_with_one_point() -> None:
    points = [(w, 0.3 + 0.002 * w) for w in (100, 400, 900)]
    c0, c1 = fit_cost(points)
    assert c0 == pytest.approx(0.3) and c1 == pytest.approx(0.002)
    # One point: through the origin (overstates a larger measurement's cost when c0 > 0).
    assert fit_cost([(100, 0.5)]) == (0.0, pytest.approx(0.005))
    # A decreasing cloud (timing noise) never gives a negative slope or intercept.
    c0, c1 = fit_cost([(100, 1.0), (200, 0.5)])
    assert c0 == 0.0 and c1 > 0
    c0, c1 = fit_cost([(100, 0.1), (200, 0.5)])  # intercept would be negative
    assert c0 == 0.0 and c1 == pytest.approx((100 * 0.1 + 200 * 0.5) / (100**2 + 200**2))
    with pytest.raises(ValueError):
        fit_cost([])
    # Works within a factor FIT_SPREAD: proportional, the slope of nearly equal works being
    # timing noise. Seven 64 x 20 and one 64 x 18 (seconds +-15 %) once fitted 0.13 s of
    # intercept, more than the whole allowance of the smallest measurement.
    rng = random.Random(3)
    near = [(1280.0, 0.128 * rng.uniform(0.85, 1.15)) for _ in range(7)] + [(1152.0, 0.1187)]
    assert max(w for w, _ in near) < FIT_SPREAD * min(w for w, _ in near)
    c0, c1 = fit_cost(near)
    assert c0 == 0.0
    assert c1 == pytest.approx(sum(s for _, s in near) / sum(w for w, _ in near))


@pytest.mark.parametrize(
    ("probe", "data", "n", "m"),
    [
        (1.0, 1.0, 20, 20),  # equal per-unit variances: n = m = √K
        (1.0, 16.0, 80, 5),  # data noise dominates: more samples, m = √(A·K/B)
        (16.0, 1.0, 5, 80),  # probe noise dominates: more products
    ],
)
def test_the_split_levels_the_two_noise_parts(probe: float, data: float, n: int, m: int) -> None:
    """Cost c1·n·m ≤ 400 (c1 = 1): minimising A/m + B/n gives m = √(A·K/B), n = K/m."""
    limits = Limits(min_samples=2, max_samples=10_000, min_products=2, max_products=10_000)
    size = choose_size(400.0, (0.0, 1.0), Noise(probe, data), limits)
    assert (size.samples, size.products) == (n, m)
    assert size.skipped is None and size.predicted_seconds <= 400.0


def test_the_choice_is_the_best_affordable_pair() -> None:
    """No (n, m) within the budget has a smaller predicted variance (exhaustive check)."""
    cost, noise, extra = (0.05, 0.001), Noise(probe=3.0, data=40.0), 7.0
    limits = Limits(min_samples=8, max_samples=300, min_products=3, max_products=60)
    size = choose_size(2.0, cost, noise, limits, extra_products=extra, data_weight=2.0)
    best = predicted_variance(size.samples, size.products, noise, 2.0)
    for n, m in itertools.product(range(8, 301), range(3, 61)):
        if cost[0] + cost[1] * n * (m + extra) <= 2.0:
            assert predicted_variance(n, m, noise, 2.0) >= best * (1 - 1e-9), (n, m)
    assert cost[0] + cost[1] * size.samples * (size.products + extra) <= 2.0


def test_the_minimum_fits_exactly_and_less_is_a_skip_with_a_reason() -> None:
    cost = (0.1, 0.01)
    least = 0.1 + 0.01 * 8 * 2
    size = choose_size(least, cost, Noise(1.0, 1.0), WIDE)
    assert (size.samples, size.products, size.skipped) == (8, 2, None)
    skipped = choose_size(least * 0.99, cost, Noise(1.0, 1.0), WIDE)
    assert skipped.skipped is not None and "8 samples x 2 products" in skipped.skipped
    assert skipped.rule == "skip"


def test_the_batch_never_exceeds_its_cap() -> None:
    limits = Limits(min_samples=8, max_samples=64, min_products=2, max_products=50)
    size = choose_size(1e9, (0.0, 1e-6), Noise(1.0, 1e6), limits)
    assert (size.samples, size.products) == (64, 50)


def test_without_a_noise_estimate_the_fixed_shape_is_scaled_down_to_fit() -> None:
    limits = dataclasses.replace(WIDE, start=(64, 10))
    size = choose_size(1000.0, (0.0, 1.0), None, limits)
    assert (size.samples, size.products) == (64, 10)  # 640 fits: the fixed shape as it is
    assert "no noise estimate" in size.rule
    size = choose_size(100.0, (0.0, 1.0), None, limits)
    # Both scaled by 0.9^k until n*m <= 100: 0.9^6 = 0.53 -> (34, 5) = 170; 0.9^9 -> (24, 3).
    assert size.samples * size.products <= 100
    assert (size.samples, size.products) == (24, 3)
    # Never below the minimums (8 x 2 = 16 fits).
    size = choose_size(16.0, (0.0, 1.0), None, limits)
    assert (size.samples, size.products) == (8, 2)


def test_the_first_shape_keeps_the_lambda_batch_and_gives_up_products_first() -> None:
    """64 x (2 + 10 λ_max products) = 768 fits: the batch stays at 64, products shrink."""
    limits = Limits(8, 512, 2, start=(64, 10), floor_samples=64)
    size = choose_size(768.0, (0.0, 1.0), None, limits, extra_products=10.0)
    assert size.samples == 64 and size.predicted_seconds <= 768.0
    assert size.products < 10


def test_a_budget_exactly_at_the_floor_is_never_lost_to_rounding() -> None:
    """allowed = seconds(floor, least products) exactly: the division inside the search may land
    a hair below the floor; the choice is still made (it used to assert)."""
    rng = random.Random(0)
    for _ in range(20_000):
        c0, c1, extra = rng.uniform(0, 1), rng.uniform(1e-4, 1e-2), rng.uniform(0, 20)
        floor = rng.randint(8, 300)
        limits = Limits(5, 512, 2, floor_samples=floor)
        allowed = c0 + c1 * floor * (2 + extra)
        size = choose_size(allowed, (c0, c1), Noise(1.0, 1.0, 2), limits, extra_products=extra)
        assert size.skipped is None and size.samples >= floor


def test_fewer_products_than_measured_are_counted_at_one_over_m_squared() -> None:
    noise = Noise(probe=10.0, data=0.0, products=10)
    assert predicted_variance(8, 20, noise) == pytest.approx(10.0 / 20)  # more: 1/m
    assert predicted_variance(8, 5, noise) == pytest.approx(10.0 / 5 * 2)  # fewer: 1/m^2


def test_a_cost_fitted_on_small_measurements_is_not_extrapolated_far() -> None:
    """A cost fit that says the measurement is nearly free per unit of work (an intercept with
    almost no slope, as two measurements of nearly the same work fitted before FIT_SPREAD) would
    size the next one as large as the limits allow (it once became 169 x 54 after 30 x 5, and
    overspent the target). It is at most twice the largest work timed."""
    limits = Limits(8, 512, 5, max_products=200, start=(64, 10))
    budget = TimeBudget(0.05, None, limits)
    noise_free = {"stderr_probe": 0.1, "stderr_data": 1.0}
    budget.observe(Size(30, 5, 1.0, None, "first"), 0.30, 20, **noise_free)  # work 600
    budget.observe(Size(30, 5, 1.0, None, "scaled"), 0.2990, 20, **noise_free)
    budget.observe(Size(62, 5, 1.0, None, "scaled"), 0.3001, 20, **noise_free)  # work 1240
    budget.tick(1000.0)  # plenty of budget
    c0, c1 = fit_cost(budget.points)
    assert c1 > 0 and c0 + c1 * 169 * 69 < 1.0  # the fit alone would allow a huge measurement
    size = budget.size()
    assert size.skipped is None
    assert size.samples * (size.products + budget.extra_products) <= MAX_GROWTH * 1240 + 1e-9


def test_smoothed_noise_keeps_the_products_it_was_last_measured_with() -> None:
    limits = Limits(min_samples=8, max_samples=512, min_products=2)
    budget = TimeBudget(0.1, None, limits)
    budget.observe(Size(64, 10, 1.0, None, "first"), 1.0, 10, 0.1, 1.0)
    budget.observe(Size(64, 6, 1.0, None, "balanced"), 1.0, 6, 0.1, 1.0)
    assert budget.noise is not None and budget.noise.products == 6


def test_the_lambda_batch_is_kept_whenever_it_fits() -> None:
    """Probe noise would be happy with 8 samples x many products; with λ_max measured the batch
    stays at floor_samples = 64 while 64 x 2 products fit, and drops below only when not."""
    limits = dataclasses.replace(WIDE, floor_samples=64)
    noise = Noise(probe=1e6, data=1.0, products=2)
    size = choose_size(640.0, (0.0, 1.0), noise, limits)
    assert (size.samples, size.products) == (64, 10) and size.rule == "balanced"
    size = choose_size(100.0, (0.0, 1.0), noise, limits)  # 64 x 2 = 128 does not fit
    assert size.samples < 64  # no fixed shape given: the minimum is the shape


def test_below_the_fixed_shape_the_shape_is_scaled_above_it_the_error_model_splits() -> None:
    """Hutch++'s shape 64 x 10: with 400 sample-products it is scaled (the batch kept, products
    down to 6), whatever the noise says; with 1280 the noise decides the rest, never going below
    64 samples or 10 products (data noise dominating: samples)."""
    limits = Limits(8, 512, 5, start=(64, 10), floor_samples=64)
    noise = Noise(probe=1.0, data=1e4, products=10)
    small = choose_size(400.0, (0.0, 1.0), noise, limits)
    assert (small.samples, small.products, small.rule) == (64, 6, "fixed shape, scaled")
    large = choose_size(1280.0, (0.0, 1.0), noise, limits)
    assert (large.samples, large.products, large.rule) == (128, 10, "balanced")
    probe = choose_size(1280.0, (0.0, 1.0), Noise(probe=1e4, data=1.0, products=10), limits)
    assert (probe.samples, probe.products) == (64, 20)


def test_a_small_shortfall_keeps_the_fixed_shape_a_large_one_or_a_debt_scales_it() -> None:
    """64 x 10 costs 640 s at 1 s per sample-product. Short by at most a fifth (allowed 512) in
    the allowance and in the whole balance: measured as it is. Short by more, or with the run
    already in debt, or beyond max_seconds (a hard per-measurement limit): scaled."""
    limits = Limits(8, 512, 5, start=(64, 10), floor_samples=64)
    noise = Noise(probe=1.0, data=1e4, products=10)
    edge = 640.0 * (1 - SHAPE_SLACK)
    kept = choose_size(edge, (0.0, 1.0), noise, limits)
    assert (kept.samples, kept.products, kept.rule) == (64, 10, "fixed shape, kept")
    assert kept.predicted_seconds == 640.0 and kept.seconds == edge
    first = choose_size(edge, (0.0, 1.0), None, limits)  # no noise estimate: the same rule
    assert (first.samples, first.products) == (64, 10)
    short = choose_size(edge - 1.0, (0.0, 1.0), noise, limits)
    assert short.rule == "fixed shape, scaled" and short.predicted_seconds <= edge - 1.0
    in_debt = choose_size(600.0, (0.0, 1.0), noise, limits, balance=edge - 1.0)
    assert in_debt.rule == "fixed shape, scaled" and in_debt.predicted_seconds <= 600.0
    capped = choose_size(600.0, (0.0, 1.0), noise, limits, hard_limit=600.0)
    assert capped.rule == "fixed shape, scaled" and capped.predicted_seconds <= 600.0


def test_the_fixed_shape_is_priced_by_its_own_measurements() -> None:
    """Seconds measured in a budgeted run (small_cnn, 5 % target): the smaller measurements'
    proportional fit, with λ_max's extra products averaged over them, prices 64 x 10 at 0.45 s
    where it took 0.32 s. Once the shape has been measured (not as the first measurement, which
    pays one-time costs), its own seconds decide whether it is kept."""
    limits = Limits(8, 512, 5, start=(64, 10), floor_samples=64)
    budget = TimeBudget(0.05, None, limits, data_weight=2.0)
    noise = {"stderr_probe": 0.02, "stderr_data": 0.2}
    budget.observe(Size(46, 7, 1.0, None, "first"), 0.339, 20, **noise)
    budget.observe(Size(41, 6, 1.0, None, "scaled"), 0.273, 19, **noise)
    budget.observe(Size(46, 7, 1.0, None, "scaled"), 0.232, 15, **noise)
    for _ in range(200):
        budget.tick(0.027)  # 5.4 s of training: 0.27 s earned, the balance spent
    budget.spent_seconds = 0.05 * budget.train_seconds - 0.27
    assert budget.allowed() == pytest.approx(0.27) and budget.shape_points == []
    unmeasured = budget.size()
    assert unmeasured.rule == "fixed shape, scaled" and unmeasured.predicted_seconds <= 0.27
    budget.observe(Size(64, 10, 1.0, None, "kept"), 0.316, 16, **noise)
    assert budget.shape_points == [0.316]
    for _ in range(200):
        budget.tick(0.027)
    budget.spent_seconds = 0.05 * budget.train_seconds - 0.27
    model = choose_size(
        0.27,
        fit_cost(budget.points),
        budget.noise,
        limits,
        extra_products=budget.extra_products or 0.0,
        data_weight=2.0,
    )
    assert model.rule == "fixed shape, scaled"  # the fit alone still overstates the shape
    kept = budget.size()
    assert (kept.samples, kept.products, kept.rule) == (64, 10, "fixed shape, kept")
    assert kept.predicted_seconds == pytest.approx(0.316)
    again = TimeBudget(0.05, None, limits, data_weight=2.0)
    again.load_state_dict(budget.state_dict())
    assert again.shape_points == [0.316]


@pytest.mark.parametrize("ratio", [0.85, 1.0, 1.15])
def test_a_budget_near_the_fixed_shapes_cost_measures_it_and_holds_its_share(ratio: float) -> None:
    """A run whose target earns ``ratio`` x the fixed shape's mean cost per interval, the cost
    scattering +-15 % from one measurement to the next. Above the cost every measurement is the
    fixed shape or larger; at the cost, nearly all are the shape (a shortfall from the scatter
    does not shrink it); below, the shape alternates with smaller ones. The account is never more
    than a fifth of a measurement over the target, and over the run the share is the target's."""
    rng = random.Random(0)
    limits = Limits(8, 512, 5, start=(64, 10), floor_samples=64)
    per_work = 1e-4  # seconds per sample-product: 64 x (10 + 10) = 0.128 s
    step = 0.128 * ratio / 0.05 / 200  # 200 steps earn ratio x the mean cost
    # The steps' price of the first measurement (2 x a step's seconds per sample) right.
    batch = round(2 * step / per_work)
    budget = TimeBudget(
        0.05, None, limits, data_weight=2.0, train_batch_size=batch, first_extra_products=10.0
    )
    shapes, worst = [], -math.inf
    for _ in range(60):
        for _ in range(200):
            budget.tick(step)
        size = budget.size()
        assert size.skipped is None
        shapes.append((size.samples, size.products))
        cost = per_work * size.samples * (size.products + 10) * rng.uniform(0.85, 1.15)
        budget.observe(size, cost, size.products + 10, stderr_probe=0.05, stderr_data=0.3)
        over = budget.spent_seconds - 0.05 * budget.train_seconds
        worst = max(worst, over)
    # The debt the rule allows, plus what the cost scatter (+-15 %) adds to a prediction.
    assert worst <= (SHAPE_SLACK + 0.2) * 0.128, worst
    at_least = sum(n >= 64 and m >= 10 for n, m in shapes) / len(shapes)
    if ratio > 1.0:
        assert at_least == 1.0
    elif ratio == 1.0:
        assert at_least >= 0.75
    else:
        assert 0.2 <= at_least <= 0.8
        assert budget.share() == pytest.approx(0.05, rel=0.03)
    assert budget.share() <= 0.05 * 1.01


def test_allowed_seconds_tighter_budget_wins_and_carries_over() -> None:
    # 100 s of training: 5 % is 5 s; max_seconds 2 s is tighter.
    assert allowed_seconds(0.05, 2.0, 100.0, 0.0) == 2.0
    assert allowed_seconds(0.05, 10.0, 100.0, 0.0) == pytest.approx(5.0)
    assert allowed_seconds(None, 3.0, 100.0, 50.0) == 3.0  # per measurement only: no account
    # Unspent budget carries over; overspent is paid back.
    assert allowed_seconds(0.05, None, 100.0, 1.0) == pytest.approx(4.0)
    assert allowed_seconds(0.05, None, 100.0, 7.0) == pytest.approx(-2.0)
    assert allowed_seconds(None, None, 100.0, 7.0) == math.inf
    # Spread: 20 s since the last measurement earned 1 s; a 2 s debt from before is paid back a
    # quarter at a time; a 2 s surplus spent a quarter at a time.
    assert allowed_seconds(0.05, None, 100.0, 7.0, since_last=20.0) == pytest.approx(1 - 3 / 4)
    assert allowed_seconds(0.05, None, 100.0, 3.0, since_last=20.0) == pytest.approx(1 + 1 / 4)
    assert allowed_seconds(0.05, None, 100.0, 4.0, since_last=20.0) == pytest.approx(1.0)


def test_noise_components_are_floored_and_scaled_per_unit() -> None:
    noise = Noise.from_stderrs(stderr_probe=2.0, stderr_data=0.0, samples=16, products=5)
    assert noise.probe == pytest.approx(4.0 * 5)
    assert noise.data == pytest.approx(NOISE_FLOOR * 4.0 * 16)


def test_the_time_budget_sizes_from_what_it_timed() -> None:
    limits = Limits(min_samples=8, max_samples=512, min_products=2, max_products=200)
    budget = TimeBudget(max_overhead=0.1, max_seconds=None, limits=limits)
    for _ in range(10):
        budget.tick(1.0)  # ten 1-second steps: 1 s of budget
    first = budget.size()  # no training batch size: the small first size
    assert (first.samples, first.products) == (16, 4) and first.rule.startswith("first")
    # It took 0.2 s with 16 x 4 products, and 4 more (eigenvalue) products; data noise dominates.
    budget.observe(first, 0.2, total_products=8, stderr_probe=0.1, stderr_data=1.0)
    for _ in range(10):
        budget.tick(1.0)
    second = budget.size()
    # 10 s of training since: 1 s earned, plus a quarter of the 0.8 s carried: 1.2 s; cost
    # 0.2/(16*8) s per sample-product.
    assert second.seconds == pytest.approx(1.2)
    assert second.predicted_seconds <= 1.2
    # Probe part floored at 10 % of the variance: A = 0.101 * 4, B = 1 * 16. The time allows
    # K = 768 sample-products, but at most twice the 16 x 8 = 128 timed: 256. m = 4 leaves
    # n = 32 (V = 0.101 + 16/32 = 0.601), m = 5 leaves 28 (0.652): samples first.
    assert (second.samples, second.products) == (32, 4)
    budget.observe(second, second.predicted_seconds, second.products + 4, 0.1, 1.0)
    summary = budget.summary()
    assert summary["share"] == pytest.approx((0.2 + second.predicted_seconds) / 20.0)
    assert summary["chosen"][0]["samples"] == 16
    assert [c["samples"] for c in summary["chosen"]] == [16, second.samples]
    # The account survives a checkpoint; one saved before train_at_last existed resumes as if it
    # had just measured, not with the whole run as this interval's earnings.
    old = {k: v for k, v in budget.state_dict().items() if k != "train_at_last"}
    resumed = TimeBudget(0.1, None, limits)
    resumed.load_state_dict(old)
    assert resumed.allowed() == pytest.approx(0.25 * (0.1 * 20.0 - resumed.spent_seconds))
    again = TimeBudget(0.1, None, limits)
    again.load_state_dict(budget.state_dict())
    assert again.state_dict() == budget.state_dict()
    assert again.size() == budget.size()


def test_the_first_measurement_waits_for_a_positive_budget() -> None:
    limits = Limits(min_samples=8, max_samples=64, min_products=2)
    budget = TimeBudget(max_overhead=0.05, max_seconds=None, limits=limits)
    budget.charge(1.0)  # set-up
    budget.tick(4.0)  # 0.2 s earned, a quarter of the 1 s set-up due: not yet
    size = budget.size()
    assert size.skipped is not None and "no budget left yet" in size.skipped
    budget.tick(20.0)
    assert budget.size().skipped is None


def test_the_first_size_is_the_fixed_shape_priced_from_the_steps() -> None:
    """Steps of 0.1 s on 32 samples: a sample-product priced 2 x 0.1 / 32 = 6.25 ms. 400 s of
    training at 5 % allow 20 s: the fixed 64 x 10 (with 10 λ_max products: 8 s) fits."""
    limits = Limits(min_samples=8, max_samples=512, min_products=2, start=(64, 10))
    budget = TimeBudget(0.05, None, limits, train_batch_size=32, first_extra_products=10.0)
    for _ in range(4000):
        budget.tick(0.1)
    first = budget.size()
    assert (first.samples, first.products) == (64, 10)
    assert first.predicted_seconds == pytest.approx(64 * 20 * 0.00625)
    assert first.rule == "first: fixed shape, cost from the steps"
    # A guess that fits nothing (a step of 1 ms would allow 0.2 s, the minimum costs more at
    # a badly wrong price) still measures small rather than never.
    slow = TimeBudget(0.05, None, limits, train_batch_size=1, first_extra_products=10.0)
    for _ in range(100):
        slow.tick(1.0)
    size = slow.size()
    assert size.skipped is None and (size.samples, size.products) == (16, 4)


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError):
        Limits(min_samples=10, max_samples=5, min_products=2)
    with pytest.raises(ValueError):
        Limits(min_samples=1, max_samples=5, min_products=0)
