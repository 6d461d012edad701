"""The Lanczos process with full reorthogonalisation, for extreme eigenvalues.

Lanczos, C. (1950). *An iteration method for the solution of the eigenvalue problem of linear
differential and integral operators.* J. Res. Nat. Bur. Standards 45, 255–282.
Paige, C. C. (1972). *Computational variants of the Lanczos method for the eigenproblem.*

Compared with power iteration (what PyHessian 0.1 uses), Lanczos reaches the same accuracy in far
fewer matrix-vector products, and it targets the **largest algebraic** eigenvalues (the right end of
the spectrum) rather than the largest magnitude. Convergence is judged by the Ritz residual
``‖A y − θ y‖ = |β_m s_{m,i}|``, which bounds ``|θ − λ|`` for a symmetric operator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from deconcnn_curvature.errors import InvalidOptionError
from deconcnn_curvature.linalg.operator import LinearOperator, rademacher

__all__ = [
    "EigenEstimate",
    "LanczosState",
    "lanczos",
    "lanczos_top_eigenvalues",
    "ritz_converged",
]


@dataclass(frozen=True)
class EigenEstimate:
    """Top-``k`` eigenvalues (descending) with their Ritz residual bounds."""

    values: tuple[float, ...]
    residuals: tuple[float, ...]
    n_matvecs: int
    converged: bool
    method: str


@dataclass
class LanczosState:
    """The Krylov basis ``Q`` (dim × m) and the tridiagonal coefficients of a Lanczos run."""

    basis: torch.Tensor
    alphas: list[float]
    betas: list[float]  # betas[i] couples step i and i+1; len == len(alphas) (last = residual norm)

    def tridiagonal(self) -> torch.Tensor:
        m = len(self.alphas)
        t = torch.diag(torch.tensor(self.alphas, dtype=torch.float64))
        if m > 1:
            off = torch.tensor(self.betas[: m - 1], dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        return t


def _orthogonalize(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    # Two passes of classical Gram–Schmidt ("twice is enough", Kahan/Parlett).
    for _ in range(2):
        w = w - basis @ (basis.T @ w)
    return w


def lanczos(
    op: LinearOperator,
    num_steps: int,
    *,
    generator: torch.Generator,
    start: torch.Tensor | None = None,
    stop=None,
) -> LanczosState:
    """Run up to ``num_steps`` Lanczos steps with full reorthogonalisation.

    The start vector is ``start`` (normalised) or a Rademacher probe from ``generator``. On an
    invariant subspace (β ≈ 0) the process restarts from a fresh random vector orthogonal to the
    basis, with a zero coupling, so the Ritz values remain those of ``A`` restricted to the basis.
    ``stop(state) -> bool`` is consulted after every step.
    """
    n = op.dim
    num_steps = min(num_steps, n)
    q = (
        start
        if start is not None
        else rademacher(n, 1, generator=generator, dtype=op.dtype, device=op.device)
    )
    q = q.reshape(n, 1).to(dtype=op.dtype, device=op.device)
    q = q / torch.linalg.vector_norm(q)
    basis = torch.empty(n, num_steps, dtype=op.dtype, device=op.device)
    state = LanczosState(basis=basis[:, :0], alphas=[], betas=[])
    scale = 0.0
    for j in range(num_steps):
        basis[:, j : j + 1] = q
        w = op.matmat(q)
        alpha_t = (q.T @ w).reshape(())
        w = _orthogonalize(w, basis[:, : j + 1])
        # One host synchronisation per step for both coefficients.
        alpha, beta = torch.stack([alpha_t, torch.linalg.vector_norm(w)]).double().tolist()
        scale = max(scale, abs(alpha), beta)
        state = LanczosState(
            basis=basis[:, : j + 1], alphas=[*state.alphas, alpha], betas=[*state.betas, beta]
        )
        if stop is not None and stop(state):
            break
        if j + 1 == num_steps:
            break
        if beta <= 1e-10 * max(scale, 1e-30):
            # Invariant subspace: continue from a new direction, decoupled (beta = 0).
            state.betas[-1] = 0.0
            w = rademacher(n, 1, generator=generator, dtype=op.dtype, device=op.device)
            w = _orthogonalize(w, basis[:, : j + 1])
            q = w / torch.linalg.vector_norm(w)
        else:
            q = w / beta
    return state


def ritz(state: LanczosState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ritz values (ascending), the eigenvectors of T, and each Ritz pair's residual bound."""
    theta, s = torch.linalg.eigh(state.tridiagonal())
    residuals = abs(state.betas[-1]) * s[-1, :].abs()
    return theta, s, residuals


def ritz_converged(
    values: Sequence[float], residuals: Sequence[float], rtol: float, *, floor: float
) -> bool:
    """The one test of "converged" for Ritz pairs: every ``residuals[i] ≤ rtol · max(|values[i]|,
    floor)``.

    A Ritz pair's residual ``‖A y − θ y‖`` bounds the distance from ``θ`` to an eigenvalue of a
    symmetric ``A``, so this asks for each value's error bound to be a share ``rtol`` of its size.
    ``floor`` is the caller's choice of scale below which a value's own size stops counting:
    :func:`lanczos_top_eigenvalues` passes the spectral scale (an absolute bound relative to
    ``max |θ|``: a λ_max near 0 next to large negative eigenvalues still converges), the Hutch++
    eigenvalue routines ``1e-12 · |θ_1|`` (relative to each value; the floor only guards a
    zero value).
    """
    return all(r <= rtol * max(abs(v), floor) for v, r in zip(values, residuals, strict=True))


def lanczos_top_eigenvalues(
    op: LinearOperator,
    k: int = 1,
    *,
    generator: torch.Generator,
    tol: float = 1e-5,
    max_matvecs: int = 200,
) -> EigenEstimate:
    """The ``k`` largest **algebraic** eigenvalues of ``op`` (descending).

    Stops when every one of the top ``k`` Ritz residuals is at most ``tol · max_i |θ_i|`` over all
    Ritz values (a bound on the absolute eigenvalue error, relative to the spectral scale; see
    :func:`ritz_converged`), or after ``max_matvecs``.
    Like every single-vector Krylov method, an eigenvalue of multiplicity > 1 is found once.
    """
    if k < 1:
        raise InvalidOptionError(f"k must be >= 1, got {k}")
    if k > op.dim:
        raise InvalidOptionError(f"k={k} exceeds the operator dimension {op.dim}")

    def converged(state: LanczosState) -> bool:
        m = len(state.alphas)
        if m < k:
            return False
        if m == op.dim:
            return True
        theta, _, res = ritz(state)
        scale = max(float(theta.abs().max()), 1e-30)
        return ritz_converged(theta[-k:].tolist(), res[-k:].tolist(), tol, floor=scale)

    state = lanczos(op, max_matvecs, generator=generator, stop=converged)
    theta, _, res = ritz(state)
    if len(theta) < k:
        raise InvalidOptionError(f"only {len(theta)} Lanczos steps were possible, fewer than k={k}")
    order = torch.argsort(theta, descending=True)[:k]
    return EigenEstimate(
        values=tuple(float(theta[i]) for i in order),
        residuals=tuple(float(res[i]) for i in order),
        n_matvecs=len(state.alphas),
        converged=converged(state),
        method="lanczos",
    )
