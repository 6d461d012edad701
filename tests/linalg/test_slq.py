"""Stochastic Lanczos quadrature on dense matrices with known spectra.

With ``m`` Lanczos steps from ``z/‖z‖`` the nodes and weights are a Gauss quadrature exact for
polynomials of degree < 2m: ``n · Σ w θ^p = zᵀ A^p z`` for every ``p ≤ 2m − 1`` (averaged over
runs). ``p = 1`` is the Hutchinson identity; higher ``p`` checks the weights themselves.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deconcnn_curvature.linalg.operator import DenseOperator, make_generator, rademacher
from deconcnn_curvature.linalg.slq import slq_density
from deconcnn_curvature.results import Density

N = 50


def with_spectrum(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``Q diag(λ) Qᵀ`` with a seeded random orthogonal ``Q`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * eigenvalues) @ q.T


_g = torch.Generator().manual_seed(2)
SPECTRA = {
    "flat": 1 + torch.rand(N, generator=_g, dtype=torch.float64),
    "outliers": torch.cat(
        [
            torch.tensor([40.0, 25.0], dtype=torch.float64),
            torch.rand(N - 2, generator=_g, dtype=torch.float64),
        ]
    ),
    "indefinite": torch.randn(N, generator=_g, dtype=torch.float64) * 2,
}


@pytest.fixture(params=list(SPECTRA))
def spectrum(request: pytest.FixtureRequest) -> torch.Tensor:
    return SPECTRA[request.param]


def _probes(seed: int, runs: int) -> list[torch.Tensor]:
    gen = make_generator(seed, "cpu")
    return [rademacher(N, 1, generator=gen, dtype=torch.float64, device="cpu") for _ in range(runs)]


@pytest.mark.parametrize("power", [1, 2, 3, 5])
def test_quadrature_moments_equal_the_probes_quadratic_forms(
    spectrum: torch.Tensor, power: int
) -> None:
    a = with_spectrum(spectrum)
    steps, runs = 6, 4  # exact up to degree 11; no restart can happen with 6 < rank
    density, quad = slq_density(
        DenseOperator(a), num_steps=steps, num_runs=runs, generator=make_generator(5, "cpu")
    )
    z = _probes(5, runs)
    ap = torch.linalg.matrix_power(a, power)
    forms = [float((zi.T @ ap @ zi).squeeze()) for zi in z]
    moment = N * math.fsum(
        w * x**power for w, x in zip(density.weights, density.nodes, strict=True)
    )
    assert moment == pytest.approx(sum(forms) / runs, rel=1e-9, abs=1e-9)
    if power == 1:
        assert quad == pytest.approx(
            [float((zi.T @ a @ zi).squeeze()) for zi in z], rel=1e-10, abs=1e-10
        )
        assert density.trace_estimate() == pytest.approx(sum(quad) / runs, rel=1e-12, abs=1e-12)


def test_weights_sum_to_one_and_nodes_lie_in_the_spectrum(spectrum: torch.Tensor) -> None:
    a = with_spectrum(spectrum)
    density, _ = slq_density(
        DenseOperator(a), num_steps=20, num_runs=3, generator=make_generator(0, "cpu")
    )
    assert isinstance(density, Density)
    assert len(density.nodes) == len(density.weights) == 60
    assert math.fsum(density.weights) == pytest.approx(1.0, abs=1e-12)
    assert min(density.weights) >= 0
    lo, hi = float(spectrum.min()), float(spectrum.max())
    assert lo - 1e-9 <= min(density.nodes) and max(density.nodes) <= hi + 1e-9
    assert density.dim == N and density.num_runs == 3 and density.lanczos_steps == 20


def test_extreme_nodes_converge_to_the_extreme_eigenvalues() -> None:
    lam = SPECTRA["outliers"]
    density, _ = slq_density(
        DenseOperator(with_spectrum(lam)),
        num_steps=30,
        num_runs=2,
        generator=make_generator(0, "cpu"),
    )
    assert max(density.nodes) == pytest.approx(40.0, rel=1e-8)


def test_full_length_runs_reproduce_the_spectrum() -> None:
    lam = SPECTRA["indefinite"]
    density, _ = slq_density(
        DenseOperator(with_spectrum(lam)),
        num_steps=N + 10,
        num_runs=1,
        generator=make_generator(0, "cpu"),
    )
    assert density.lanczos_steps == N
    torch.testing.assert_close(
        torch.tensor(sorted(density.nodes), dtype=torch.float64),
        lam.sort().values,
        rtol=1e-8,
        atol=1e-8,
    )


def test_smoothed_density_integrates_to_one() -> None:
    density, _ = slq_density(
        DenseOperator(with_spectrum(SPECTRA["flat"])),
        num_steps=10,
        num_runs=2,
        generator=make_generator(0, "cpu"),
    )
    grid = np.linspace(-1, 4, 4001)
    values = density.smoothed(grid, sigma=0.05)
    assert np.trapezoid(values, grid) == pytest.approx(1.0, abs=1e-3)
    assert density.to_dict()["num_runs"] == 2


def test_invalid_arguments() -> None:
    op = DenseOperator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="must be >= 1"):
        slq_density(op, num_steps=0, num_runs=1, generator=make_generator(0, "cpu"))
    with pytest.raises(ValueError, match="must be >= 1"):
        slq_density(op, num_steps=3, num_runs=0, generator=make_generator(0, "cpu"))
