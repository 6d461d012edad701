"""Lanczos for the largest algebraic eigenvalues, on dense matrices with known spectra."""

from __future__ import annotations

import pytest
import torch

from deconcnn_curvature.linalg.lanczos import (
    lanczos,
    lanczos_top_eigenvalues,
    ritz,
    ritz_converged,
)
from deconcnn_curvature.linalg.operator import DenseOperator, make_generator

N = 60


def with_spectrum(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``Q diag(λ) Qᵀ`` with a seeded random orthogonal ``Q`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * eigenvalues) @ q.T


def _bulk(n: int, lo: float, hi: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


SPECTRA = {
    "separated": torch.cat([_f64(10, 7, 5), _bulk(N - 3, 0, 2)]),
    "clustered": torch.cat([_f64(10, 9.99, 9.98, 9.97), _bulk(N - 4, 0, 5)]),
    "negative-dominant": torch.cat([_f64(-40, -30, 3, 2.5, 2), _bulk(N - 5, -1, 1)]),
    "all-negative": -_bulk(N, 1, 5),
    "decaying": 10 * 0.7 ** torch.arange(N, dtype=torch.float64),
}


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", list(SPECTRA))
def test_top_k_largest_algebraic(name: str, k: int) -> None:
    lam = SPECTRA[name]
    a = with_spectrum(lam)
    expected = lam.sort(descending=True).values[:k]
    op = DenseOperator(a)
    est = lanczos_top_eigenvalues(
        op, k, generator=make_generator(0, "cpu"), tol=1e-8, max_matvecs=N
    )
    assert est.converged and est.method == "lanczos"
    assert est.n_matvecs == op.n_matvecs <= N
    got = torch.tensor(est.values, dtype=torch.float64)
    assert list(est.values) == sorted(est.values, reverse=True)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    # The Ritz residual is a rigorous bound: an eigenvalue lies within it.
    for theta, res in zip(est.values, est.residuals, strict=True):
        assert float((lam - theta).abs().min()) <= res + 1e-10


def test_largest_algebraic_not_largest_magnitude() -> None:
    lam = SPECTRA["negative-dominant"]
    est = lanczos_top_eigenvalues(
        DenseOperator(with_spectrum(lam)), 1, generator=make_generator(0, "cpu")
    )
    assert est.values[0] == pytest.approx(3.0, rel=1e-6)  # not -40


def test_fewer_matvecs_than_the_dimension_for_a_separated_top() -> None:
    lam = torch.cat([_f64(100), _bulk(400, 0, 1)])
    op = DenseOperator(with_spectrum(lam))
    est = lanczos_top_eigenvalues(op, 1, generator=make_generator(0, "cpu"), tol=1e-6)
    assert est.converged and est.n_matvecs < 30
    assert est.values[0] == pytest.approx(100, rel=1e-9)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_invariant_subspace_restart_on_low_rank_matrices(rank: int) -> None:
    lam = torch.cat([_f64(5, 3, 2)[:rank], torch.zeros(N - rank, dtype=torch.float64)])
    k = rank + 2
    op = DenseOperator(with_spectrum(lam))
    est = lanczos_top_eigenvalues(op, k, generator=make_generator(0, "cpu"))
    assert est.converged and est.n_matvecs < N
    torch.testing.assert_close(
        torch.tensor(est.values, dtype=torch.float64), lam[:k], rtol=1e-9, atol=1e-9
    )


def test_repeated_eigenvalue_is_recovered_through_restarts() -> None:
    a = 2 * torch.eye(20, dtype=torch.float64)  # every vector is an eigenvector
    state = lanczos(DenseOperator(a), 3, generator=make_generator(0, "cpu"))
    assert state.betas[:2] == [0.0, 0.0]  # decoupled restarts
    q = state.basis
    torch.testing.assert_close(q.T @ q, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
    est = lanczos_top_eigenvalues(DenseOperator(a), 3, generator=make_generator(0, "cpu"))
    assert est.values == pytest.approx((2.0, 2.0, 2.0), rel=1e-12)


def test_basis_stays_orthonormal_and_tridiagonal_matches_projection() -> None:
    a = with_spectrum(SPECTRA["clustered"])
    state = lanczos(DenseOperator(a), 40, generator=make_generator(1, "cpu"))
    q = state.basis
    torch.testing.assert_close(q.T @ q, torch.eye(40, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(q.T @ a @ q, state.tridiagonal(), rtol=0, atol=1e-9)
    theta, _, res = ritz(state)
    assert theta.shape == (40,) and res.shape == (40,) and bool((res >= 0).all())


def test_budget_exhausted_reports_not_converged() -> None:
    a = with_spectrum(SPECTRA["clustered"])
    est = lanczos_top_eigenvalues(
        DenseOperator(a), 3, generator=make_generator(0, "cpu"), tol=1e-12, max_matvecs=5
    )
    assert est.n_matvecs == 5 and est.converged is False


def test_float32_operator() -> None:
    lam = SPECTRA["separated"]
    a = with_spectrum(lam).float()
    est = lanczos_top_eigenvalues(DenseOperator(a), 2, generator=make_generator(0, "cpu"), tol=1e-5)
    assert est.values == pytest.approx((10.0, 7.0), rel=1e-5)


def test_seeded_start_is_reproducible() -> None:
    a = with_spectrum(SPECTRA["decaying"])
    x = lanczos_top_eigenvalues(DenseOperator(a), 2, generator=make_generator(4, "cpu"))
    y = lanczos_top_eigenvalues(DenseOperator(a), 2, generator=make_generator(4, "cpu"))
    assert x == y


def test_invalid_k() -> None:
    op = DenseOperator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="k must be >= 1"):
        lanczos_top_eigenvalues(op, 0, generator=make_generator(0, "cpu"))
    with pytest.raises(ValueError, match="exceeds the operator dimension 4"):
        lanczos_top_eigenvalues(op, 5, generator=make_generator(0, "cpu"))


def test_ritz_converged_is_residual_against_rtol_times_size_or_floor() -> None:
    assert ritz_converged([2.0, -1.0], [0.02, 0.01], 0.01, floor=0.0)  # at the bound passes
    assert not ritz_converged([2.0, -1.0], [0.02, 0.0101], 0.01, floor=0.0)
    assert not ritz_converged([2.0, 1e-6], [0.0, 1e-3], 0.01, floor=0.0)  # a tiny value
    assert ritz_converged([2.0, 1e-6], [0.0, 1e-3], 0.01, floor=0.1)  # the floor covers it


def test_lanczos_converges_relative_to_the_spectral_scale() -> None:
    # λ_max = 0.01 beside eigenvalues down to -10: the stop rule (ritz_converged with the spectral
    # scale as floor) accepts a residual of half |λ_max|, as it did before the rule was shared.
    lam = torch.cat([-torch.linspace(1, 10, 27, dtype=torch.float64), _f64(0.01)])
    est = lanczos_top_eigenvalues(
        DenseOperator(with_spectrum(lam)), 1, generator=make_generator(0, "cpu"), tol=1e-3
    )
    assert est.converged and est.n_matvecs == 14
    assert est.values[0] == pytest.approx(0.00999006090375736, rel=1e-12)
    assert 1e-3 * 10 >= est.residuals[0] > 0.5 * abs(est.values[0])
