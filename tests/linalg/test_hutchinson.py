"""Hutchinson's estimator on dense matrices with known spectra (no network involved)."""

from __future__ import annotations

import math

import pytest
import torch

from deconcnn_curvature.linalg.hutchinson import hutchinson, student_t_interval
from deconcnn_curvature.linalg.operator import DenseOperator, make_generator, rademacher

N = 48


def with_spectrum(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``Q diag(λ) Qᵀ`` with a seeded random orthogonal ``Q`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(
        torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64)
    )
    return (q * eigenvalues) @ q.T


def _spectra() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    i = torch.arange(N, dtype=torch.float64)
    return {
        "flat": 1 + torch.rand(N, generator=g, dtype=torch.float64),
        "decaying": 10 * 0.8**i,
        "outliers": torch.cat(
            [
                torch.tensor([60.0, 45, 30], dtype=torch.float64),
                torch.rand(N - 3, generator=g, dtype=torch.float64),
            ]
        ),
        "indefinite": torch.randn(N, generator=g, dtype=torch.float64) * 3 - 0.5,
    }


SPECTRA = _spectra()
MATRICES = {name: with_spectrum(lam) for name, lam in SPECTRA.items()}


@pytest.fixture(params=list(MATRICES))
def matrix(request: pytest.FixtureRequest) -> torch.Tensor:
    return MATRICES[request.param]


def _variance(a: torch.Tensor) -> float:
    """Var[zᵀAz] for Rademacher z: 2(‖A‖²_F − Σ A_ii²) (Hutchinson 1989)."""
    return 2 * float(a.square().sum() - a.diagonal().square().sum())


def test_samples_are_the_quadratic_forms_of_the_seeded_probes(matrix: torch.Tensor) -> None:
    est = hutchinson(DenseOperator(matrix), 15, generator=make_generator(3, "cpu"))
    gen = make_generator(3, "cpu")
    z = torch.cat(
        [rademacher(N, 1, generator=gen, dtype=torch.float64, device="cpu") for _ in range(15)], 1
    )
    expected = (z * (matrix @ z)).sum(0)
    torch.testing.assert_close(
        torch.tensor(est.samples, dtype=torch.float64), expected, rtol=1e-12, atol=1e-12
    )
    assert est.value == pytest.approx(float(expected.mean()), rel=1e-12, abs=1e-12)
    assert est.stderr == pytest.approx(float(expected.std()) / math.sqrt(15), rel=1e-10)
    assert est.n_matvecs == 15 and est.method == "hutchinson" and est.target_met is None


def test_unbiased_within_error_bars_and_stderr_matches_the_variance(matrix: torch.Tensor) -> None:
    exact = float(matrix.trace())
    m = 200
    values, scaled = [], []
    for seed in range(10):
        est = hutchinson(DenseOperator(matrix), m, generator=make_generator(seed, "cpu"))
        assert abs(est.value - exact) <= 4 * est.stderr, (seed, est.value, exact, est.stderr)
        values.append(est.value)
        scaled.append(est.stderr**2 * m)
    # The mean of 10 independent estimates: 4 standard errors of a 2000-probe estimate.
    pooled = math.sqrt(_variance(matrix) / (m * 10))
    assert abs(sum(values) / 10 - exact) <= 4 * pooled
    assert sum(scaled) / 10 == pytest.approx(_variance(matrix), rel=0.2)


def test_confidence_interval_coverage(matrix: torch.Tensor) -> None:
    exact = float(matrix.trace())
    seeds = range(120)
    covered = 0
    for seed in seeds:
        est = hutchinson(DenseOperator(matrix), 30, generator=make_generator(seed, "cpu"))
        covered += est.ci[0] <= exact <= est.ci[1]
    assert covered / len(seeds) >= 0.90, covered


@pytest.mark.parametrize("block_size", [2, 5, 16, 64])
def test_block_size_does_not_change_the_probes(matrix: torch.Tensor, block_size: int) -> None:
    one = hutchinson(DenseOperator(matrix), 23, generator=make_generator(0, "cpu"))
    op = DenseOperator(matrix)
    blocked = hutchinson(op, 23, generator=make_generator(0, "cpu"), block_size=block_size)
    assert op.n_matvecs == blocked.n_matvecs == 23
    torch.testing.assert_close(
        torch.tensor(blocked.samples), torch.tensor(one.samples), rtol=1e-12, atol=1e-12
    )


def test_layer_traces_sum_to_the_total_and_estimate_their_blocks() -> None:
    a = MATRICES["outliers"]
    slices = {"first": slice(0, 10), "middle": slice(10, 30), "last": slice(30, N)}
    est = hutchinson(DenseOperator(a), 400, generator=make_generator(0, "cpu"), layer_slices=slices)
    assert list(est.layers) == list(slices)
    assert math.fsum(est.layers.values()) == pytest.approx(est.value, rel=1e-12, abs=1e-12)
    for name, sl in slices.items():
        block = a[sl, sl]
        # z_slᵀ (A z)_sl has mean tr(A_sl,sl) and variance from the block row of A.
        rows = a[sl]
        var = 2 * float(rows.square().sum() - block.diagonal().square().sum())
        assert abs(est.layers[name] - float(block.trace())) <= 4 * math.sqrt(var / 400), name


def test_rtol_stops_on_an_error_bound() -> None:
    a = MATRICES["flat"]
    exact = float(a.trace())
    op = DenseOperator(a)
    est = hutchinson(op, 10_000, generator=make_generator(0, "cpu"), rtol=0.01, block_size=4)
    assert est.target_met is True and est.n_matvecs < 10_000 and est.n_matvecs % 4 == 0
    half = (est.ci[1] - est.ci[0]) / 2
    assert half <= 0.01 * abs(est.value)
    assert est.ci[0] <= exact <= est.ci[1]
    # Checked only from min_matvecs on.
    late = hutchinson(
        DenseOperator(a), 10_000, generator=make_generator(0, "cpu"), rtol=0.5, min_matvecs=40
    )
    assert late.n_matvecs == 40


def test_rtol_on_a_negative_trace_uses_the_magnitude() -> None:
    a = -MATRICES["flat"]
    est = hutchinson(DenseOperator(a), 5000, generator=make_generator(0, "cpu"), rtol=0.02)
    assert est.target_met is True and est.value < 0 and est.n_matvecs > 2
    assert est.ci[0] <= float(a.trace()) <= est.ci[1]


def test_unreachable_target_uses_the_budget() -> None:
    est = hutchinson(
        DenseOperator(MATRICES["indefinite"]), 25, generator=make_generator(0, "cpu"), rtol=1e-9
    )
    assert est.target_met is False and est.n_matvecs == 25


def test_needs_two_probes_and_interval_degenerates_safely() -> None:
    with pytest.raises(ValueError, match="at least 2 probes"):
        hutchinson(DenseOperator(MATRICES["flat"]), 1, generator=make_generator(0, "cpu"))
    assert student_t_interval(1.0, 0.5, 0, 0.95) == (-math.inf, math.inf)
    lo, hi = student_t_interval(1.0, 0.5, 1000, 0.95)
    assert (hi - lo) / 2 == pytest.approx(1.96 * 0.5, rel=2e-3)


def test_probes_come_only_from_the_generator() -> None:
    state = torch.get_rng_state()
    a = hutchinson(DenseOperator(MATRICES["flat"]), 5, generator=make_generator(9, "cpu"))
    torch.manual_seed(123)
    b = hutchinson(DenseOperator(MATRICES["flat"]), 5, generator=make_generator(9, "cpu"))
    assert a.samples == b.samples
    torch.set_rng_state(state)
    z = rademacher(1000, 3, generator=make_generator(0, "cpu"), dtype=torch.float32, device="cpu")
    assert set(z.unique().tolist()) == {-1.0, 1.0} and z.dtype == torch.float32
    assert abs(float(z.mean())) < 0.1


@pytest.mark.slow
def test_rtol_stopping_proves_the_relative_error_it_claims() -> None:
    """An indefinite matrix with a small trace (2) and a large per-probe spread (9.5): a rule
    that compares the half-width with rtol·|mean| stops early exactly when |mean| came out too
    large (biased away from zero; within rtol only 86 % of the time at rtol 0.5). The rule
    half ≤ rtol·(|mean| − half) keeps what target_met promises in ≥ 92 % of 200 seeded runs."""
    torch.manual_seed(1)
    n = 40
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    lam = torch.cat([torch.full((20,), 1.0), torch.full((20,), -1.0)]).double()
    lam[0] += 2.0
    matrix = (q * lam) @ q.T
    exact = float(matrix.trace())
    rtol, within, runs = 0.5, 0, 200
    for seed in range(runs):
        est = hutchinson(
            DenseOperator(matrix),
            1000,
            generator=torch.Generator().manual_seed(seed),
            rtol=rtol,
            block_size=5,
        )
        half = (est.ci[1] - est.ci[0]) / 2
        if est.target_met:
            assert half <= rtol * (abs(est.value) - half) + 1e-12
        within += abs(est.value - exact) <= rtol * abs(exact)
    assert within / runs >= 0.92, within / runs
