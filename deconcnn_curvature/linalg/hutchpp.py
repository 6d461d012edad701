"""Hutch++: a low-rank part computed exactly plus Hutchinson on the deflated rest.

Meyer, R. A., Musco, C., Musco, C. & Woodruff, D. P. (2021). *Hutch++: Optimal stochastic trace
estimation.* Symposium on Simplicity in Algorithms (SOSA), 142–155.
Persson, D., Cortinovis, A. & Kressner, D. (2022). *Improved variants of the Hutch++ algorithm for
trace estimation.* SIAM J. Matrix Anal. Appl. 43(3), 1162–1185.
Chen, T. & Hallman, E. (2023). *Krylov-aware stochastic trace estimation.* SIAM J. Matrix Anal.
Appl. 44(3), 1218–1244.

**The estimator.** For any orthonormal ``Q`` (``dim × r``) chosen independently of the probes
``z``, with ``P = I − QQᵀ``::

    tr A = tr(QᵀAQ) + tr(PAP),      tr(PAP) ≈ (1/g) Σ_j (P z_j)ᵀ A (P z_j)

The first term is exact (it needs ``A Q``: ``r`` matvecs), the second is Hutchinson on the deflated
operator with ``g`` Rademacher probes (one matvec each, applied to ``P z``). Given ``Q`` the
estimate is unbiased whatever ``Q`` is; ``Q`` only decides the variance,
``2(‖PAP‖²_F − Σ (PAP)²_ii)/g``. The standard error is the sample standard deviation of the ``g``
deflated quadratic forms over ``√g`` and the interval is Student-t with ``g − 1`` degrees of
freedom: the low-rank part is deterministic given ``Q``. At least 3 deflated probes are kept.

**Fixed split** (``sketch_fraction=f``): Hutch++ as published. ``s = round(f·m/2)`` Rademacher
columns ``S``, ``Q = orth(A S)`` (QR; the rank is read off the singular values of ``R``), ``A Q``
(``rank(Q)`` more matvecs), the rest of the budget ``m`` on probes. ``f = 2/3`` is Meyer et al.'s
1/3–1/3–1/3 split.

**Adaptive split** (``sketch_fraction=None``, the default), in the spirit of Persson, Cortinovis &
Kressner, whose A-Hutch++ grows the sketch while that lowers the cost of the whole estimate. The
fixed split spends ``2m/3`` matvecs on a subspace that buys nothing on a flat spectrum, and on a
spectrum with outliers half of its low-rank budget goes to ``A S`` alone. Here ``Q`` grows as a
Krylov space, one dimension per matvec instead of per two (as in Chen & Hallman): each ``A V``
computed for the exact part also yields the next Krylov direction ``orth(P A V)``.

1. Start pair: a Rademacher vector ``s`` and its continuation ``orth(P A s)`` (2 matvecs; ``A s``
   is exactly a Hutch++ sketch column, and keeping ``s`` in ``Q`` costs nothing more).
2. A *scout* probe ``w`` (one matvec, never part of the final average). With ``A w`` and ``A Q``
   known, ``F̂ = ‖P A P w‖²`` — an unbiased estimate of ``‖PAP‖²_F``, the variance deflated
   Hutchinson would have — is free for every later ``Q``.
3. A step adding a block ``V`` costs ``|V|`` matvecs and lowers ``‖PAP‖²_F`` by exactly
   ``ΔC = ‖VᵀAV‖²_F + 2‖P'AV‖²_F`` (known once ``A V`` is). With ``g`` probes left the variance
   is ``∝ F/g``, so growing pays iff ``ΔC/|V| > F/g``. The next gain is predicted by the larger of
   the last two measured (Lanczos gains are not monotone, and stopping early on outliers costs
   more than one wasted step in the bulk). A step is also taken while the residual could be used
   up within the budget at the recent gain (``F̂ ≤ 2 · gain · steps left``, :data:`_LOOKAHEAD`): a
   low-rank residual is removed entirely by about ``rank`` steps, and ``F̂`` from one scout is
   too noisy there to stop on.
4. One Krylov sequence sees one direction per eigenvalue, so a repeated or tightly clustered
   outlier hides the rest of its eigenspace. When Krylov no longer pays but
   ``F̂ > (dim − r) · predicted gain`` (more residual energy than a bulk like the directions Krylov
   now finds could hold), the scout is absorbed into ``Q`` (free: ``A w`` is known) and its
   continuation taken: a fresh random start, as a randomized range finder would add. An
   injection that does not pay is not repeated.
5. Stop when nothing pays or only 3 probes would remain, and spend the rest on deflated probes.
   If the remaining dimensions fit in the budget, ``Q`` is completed to the whole space and the
   trace is exact (``stderr = 0``, no probes).

Every decision depends on the start vector and the scouts only, never on the final probes, so the
estimate stays exactly unbiased. On a flat spectrum the adaptive split costs 3 matvecs over plain
Hutchinson (start pair and one scout). With ``rtol`` the same rule runs with ``g`` = the number of
probes the target is predicted to need (capped by the budget).

**Per-block traces** (``layer_slices``). Split ``A = QQᵀA + PAQQᵀ + PAP``. The block traces of
the first two terms are exact, ``Σ_{i∈b} Σ_j Q_ij ((AQ)_ij + (PAQ)_ij)``; over all blocks they
sum to ``tr(QᵀAQ)`` and ``tr(QᵀPAQ) = 0``. The third term's block trace is estimated by
``Σ_{i∈b} z_i (PAPz)_i`` (unbiased as ``E zzᵀ = I``), and these sum over all blocks to the
deflated sample ``zᵀPAPz``. So each block value is unbiased for ``Σ_{i∈b} A_ii`` and, when the
slices partition the vector, the block values sum to the total (up to rounding).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from deconcnn_curvature.errors import BackendFailedError, InvalidOptionError
from deconcnn_curvature.linalg.hutchinson import TraceEstimate
from deconcnn_curvature.linalg.operator import LinearOperator
from deconcnn_curvature.linalg.probes import (
    OnProduct,
    ProbeLoop,
    check_trace_args,
    draw_columns,
    mean_stderr,
    student_t_interval,
    t_half_width,
)
from deconcnn_curvature.linalg.quantiles import normal_quantile

__all__ = [
    "MIN_DEFLATED_PROBES",
    "HutchppResult",
    "LowRankSketch",
    "hutchpp",
    "hutchpp_with_sketch",
]

MIN_DEFLATED_PROBES = 3
"""Fewest deflated probes ever used (a standard error from 2 samples is too noisy to report)."""
_MIN_BUDGET = 2 + MIN_DEFLATED_PROBES  # the adaptive start pair (or 1 sketch column + A Q)
_MAX_FAILED_INJECTIONS = 1
_LOOKAHEAD = 2.0
"""Keep growing ``Q`` while the residual could be used up within the probes at the recent gain,
``F̂ ≤ _LOOKAHEAD · (mean of the last _LOOKAHEAD_STEPS gains) · (g − 3)``, where ``g`` is the
number of probes the estimate would use (the matvecs left, or fewer under ``rtol``), even when one
step alone does not pay.

The one-step test compares a step's gain with ``F̂/g``, and ``F̂`` comes from one scout: on a
residual of low stable rank it is a χ² with few degrees of freedom and came out 7× too large on
a rank-15 network Hessian (``F̂ = 4304`` for ``‖PAP‖²_F = 619``), which stopped the sketch at
rank 2 with 27 matvecs left (60.0 ± 4.5 for a trace of 68.8). A low-rank residual is removed
entirely by about ``rank`` Krylov steps, so the long view is the right one there; the factor 2
absorbs part of ``F̂``'s noise. The gain is averaged over the last :data:`_LOOKAHEAD_STEPS` steps:
Krylov gains stall for a step or two before a close pair is resolved (149, 6.1, 1.8, then larger
again on a rank-12 network Hessian stopped at rank 9). On a flat spectrum ``F̂/gain`` is about
the residual's dimension and the rule stays silent; its extreme eigenvalues give larger gains,
and a factor 3, or the largest recent gain instead of the mean, grew the sketch of an 83-parameter
indefinite Hessian to 17 of 24 products and left too few probes for a trustworthy error bar.
"""
_LOOKAHEAD_STEPS = 4


@dataclass(frozen=True)
class LowRankSketch:
    """The subspace Hutch++ deflated: orthonormal ``basis`` ``Q`` (dim × r) and ``products = A Q``.

    Kept so that other quantities can reuse the matvecs already paid for (Rayleigh–Ritz
    eigenvalues in :func:`~deconcnn_curvature.linalg.ritz.sketch_top_eigenvalues`). ``n_matvecs``
    counts every matvec spent choosing and building it (sketch, Krylov steps, scouts), not the
    deflated probes.
    """

    basis: torch.Tensor
    products: torch.Tensor
    n_matvecs: int
    method: str

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    def projected(self) -> torch.Tensor:
        """``QᵀAQ`` in float64, symmetrised."""
        t = (self.basis.T @ self.products).to(torch.float64)
        return (t + t.T) / 2

    def exact_part(self) -> float:
        """``tr(QᵀAQ)``."""
        return float((self.basis * self.products).to(torch.float64).sum())


@dataclass(frozen=True)
class HutchppResult:
    """A Hutch++ trace estimate together with the subspace it deflated."""

    trace: TraceEstimate
    sketch: LowRankSketch


def _rank_tol(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) ** (2 / 3)


def _project_out(
    x: torch.Tensor, basis: torch.Tensor, carried: list[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Two passes of block Gram–Schmidt of ``x`` against ``basis``; ``carried`` is
    ``[A x, A basis]`` (updated to ``A`` of the projected ``x``) or empty."""
    for _ in range(2):
        if basis.shape[1] == 0:
            break
        c = basis.T @ x
        x = x - basis @ c
        if carried:
            carried = [carried[0] - carried[1] @ c, carried[1]]
    return x, carried


def _rank_revealing(x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(V, keep)``: an orthonormal basis ``V`` of ``range(x)`` from ``x = F R``, directions below
    ``tol · scale`` in the singular values of ``R`` dropped; ``keep`` marks the kept ones."""
    f, r = torch.linalg.qr(x)
    u, s, _ = torch.linalg.svd(r)
    keep = s > _rank_tol(x.dtype) * max(scale, 1e-300)
    return f @ u[:, keep], keep


def _orth_new(x: torch.Tensor, basis: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Orthonormal basis ``V`` of the part of ``range(x)`` orthogonal to ``basis``.

    Two passes of block Gram–Schmidt, then a QR of the projected block whose rank is read off the
    singular values of ``R`` (directions below ``tol · scale`` are dropped — always safe: ``Q`` only
    affects the variance). ``x`` may have more columns than rows.
    """
    x, _ = _project_out(x, basis, [])
    if x.shape[1] == 0:
        return x
    return _rank_revealing(x, scale)[0]


def _orth_new_with_products(
    x: torch.Tensor, ax: torch.Tensor, sub: _Subspace, *, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_orth_new` of a block of at most ``dim`` columns against ``sub``'s basis, with
    ``A V`` formed from ``ax = A x`` and the stored ``A Q`` (no matvec): ``V = x R⁻¹ U`` on the
    kept singular directions, so ``A V = (A x) Vₕᵀ / s``."""
    x, (ax, _) = _project_out(x, sub.basis, [ax, sub.products])
    if x.shape[1] == 0:
        return x, ax
    f, r = torch.linalg.qr(x)
    u, s, vh = torch.linalg.svd(r)
    keep = s > _rank_tol(x.dtype) * max(scale, 1e-300)
    return f @ u[:, keep], ax @ (vh[keep, :].T / s[keep])


class _Subspace:
    """``Q`` and ``A Q`` grown block by block."""

    def __init__(self, op: LinearOperator) -> None:
        self.op = op
        self.basis = torch.empty(op.dim, 0, dtype=op.dtype, device=op.device)
        self.products = torch.empty(op.dim, 0, dtype=op.dtype, device=op.device)
        self.scale = 0.0

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    def add(self, v: torch.Tensor, av: torch.Tensor) -> float:
        """Append ``V`` (orthonormal, ⊥ Q) with ``A V``; return the mean gain ``ΔC/|V|``.

        ``ΔC = ‖VᵀAV‖²_F + 2‖P'AV‖²_F`` is exactly how much ``‖PAP‖²_F`` drops (``P'``: after
        adding).
        """
        self.basis = torch.cat([self.basis, v], dim=1)
        self.products = torch.cat([self.products, av], dim=1)
        if av.numel():
            self.scale = max(self.scale, float(torch.linalg.vector_norm(av, dim=0).max()))
        k = v.shape[1]
        if k == 0:
            return 0.0
        coupling = self.basis.T @ av
        outside = av - self.basis @ coupling
        gain = (
            coupling[-k:].to(torch.float64).square().sum()
            + 2 * outside.to(torch.float64).square().sum()
        )
        return float(gain) / k

    def exact_part(self) -> float:
        return float((self.basis * self.products).to(torch.float64).sum())

    def deflate(self, z: torch.Tensor, az: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P z, A P z)`` from ``z`` and ``A z`` without matvecs."""
        c = self.basis.T @ z
        return z - self.basis @ c, az - self.products @ c

    def residual_stats(self, z: torch.Tensor, az: torch.Tensor) -> tuple[float, float]:
        """From scouts: (``F̂`` ≈ ‖PAP‖²_F, a trace estimate ``tr(QᵀAQ) + mean (Pz)ᵀA(Pz)``)."""
        pz, apz = self.deflate(z, az)
        papz = apz - self.basis @ (self.basis.T @ apz)
        f_hat = float(papz.to(torch.float64).square().sum()) / z.shape[1]
        deflated = float((pz * apz).to(torch.float64).sum()) / z.shape[1]
        return f_hat, self.exact_part() + deflated

    def layer_exact_parts(self, layer_slices: Mapping[str, slice]) -> dict[str, float]:
        """Per block, the exact part of its trace: ``Σ_{i∈b} (Q∘(AQ) + Q∘(PAQ))_i``."""
        t = self.basis.T @ self.products
        both = (2 * self.products - self.basis @ t) * self.basis
        both = both.to(torch.float64).sum(dim=1)
        return {name: float(both[sl].sum()) for name, sl in layer_slices.items()}


class _Budget:
    def __init__(self, op: LinearOperator, cap: int) -> None:
        self.op = op
        self.cap = cap
        self.spent = 0

    @property
    def left(self) -> int:
        return self.cap - self.spent

    def matmat(self, v: torch.Tensor) -> torch.Tensor:
        self.spent += v.shape[1]
        return self.op.matmat(v)


# --------------------------------------------------------------------------------------------------
# Choosing Q


def _complete(sub: _Subspace, budget: _Budget) -> None:
    """Extend ``Q`` to the whole space (exact trace): ``dim − rank`` matvecs."""
    eye = torch.eye(sub.op.dim, dtype=sub.op.dtype, device=sub.op.device)
    v = _orth_new(eye, sub.basis, scale=1.0)[:, : sub.op.dim - sub.rank]
    if v.shape[1]:
        sub.add(v, budget.matmat(v))


def _fixed_sketch(
    op: LinearOperator, budget: _Budget, generator: torch.Generator, fraction: float, m: int
) -> tuple[_Subspace, dict[str, object]]:
    sub = _Subspace(op)
    s = max(1, min(round(fraction * m / 2), (m - MIN_DEFLATED_PROBES) // 2))
    y = budget.matmat(draw_columns(op, s, generator))
    q = _orth_new(y, sub.basis, scale=float(torch.linalg.vector_norm(y, dim=0).max()))
    if q.shape[1]:
        sub.add(q, budget.matmat(q))
    return sub, {"split": "fixed", "sketch_columns": s, "steps": "S"}


@dataclass
class _ProbePlan:
    """How many deflated probes the estimate will use if ``Q`` stops growing now."""

    budget: _Budget
    rtol: float | None
    z_level: float
    floor: int

    def __call__(self, f_hat: float, trace_hat: float) -> int:
        if self.rtol is None:
            return self.budget.left
        if trace_hat == 0.0 or not math.isfinite(f_hat):
            return self.budget.left
        need = math.ceil(2 * self.z_level**2 * f_hat / (self.rtol * trace_hat) ** 2)
        return max(self.floor, min(need, self.budget.left))

    def at_start(self) -> int:
        """Completing ``Q`` at once is only worth it if no cheaper ``rtol`` run is possible."""
        if self.rtol is None:
            return self.budget.left
        return min(self.budget.left, 2 + self.floor)


@dataclass
class _Scout:
    """A probe ``w`` with ``A w``, used to estimate ``‖PAP‖²_F``, never in the final average."""

    vector: torch.Tensor
    product: torch.Tensor


@dataclass
class _AdaptiveGrowth:
    """Grow ``Q`` (Krylov steps 'K', scout injections 'R') while the variance bound says it pays
    (steps 1–5 of the module docstring)."""

    op: LinearOperator
    budget: _Budget
    generator: torch.Generator
    plan: _ProbePlan
    sub: _Subspace = field(init=False)
    frontier: torch.Tensor = field(init=False)  # A V of the last block added
    steps: list[str] = field(default_factory=list)
    gains: list[float] = field(default_factory=list)  # of the current Krylov sequence
    scout: _Scout | None = None
    scouts_used: int = 0
    forced: bool = True  # the continuation of a random block is always taken
    injected: bool = False  # whether the current sequence started from an injected scout
    after_injection: float | None = None  # gain of the first free step after an injection
    injected_threshold: float | None = None
    failures: int = 0

    def __post_init__(self) -> None:
        self.sub = _Subspace(self.op)

    def info(self) -> dict[str, object]:
        return {"split": "adaptive", "steps": "".join(self.steps), "scouts": self.scouts_used}

    def fits(self, extra: int) -> bool:
        return self.budget.left - extra >= MIN_DEFLATED_PROBES

    def complete_if_cheaper(self, limit: int) -> bool:
        if self.op.dim - self.sub.rank <= limit:
            _complete(self.sub, self.budget)
            self.steps.append("E")
            return True
        return False

    def run(self) -> _Subspace:
        if self.complete_if_cheaper(self.plan.at_start()):
            return self.sub
        # 1. The start pair: a random vector and its Krylov continuation.
        start = draw_columns(self.op, 1, self.generator)
        v, av = _orth_new_with_products(start, self.budget.matmat(start), self.sub, scale=1.0)
        self.sub.add(v, av)
        self.frontier = av
        while self.sub.rank < self.op.dim:
            if self.forced:
                self.forced_step()
            elif not self.decide():
                break
        return self.sub

    def predicted_gain(self) -> float:
        """The larger of the last two gains (Lanczos gains are not monotone)."""
        if not self.gains:
            return 0.0
        if len(self.gains) == 1 and self.injected and self.after_injection is not None:
            return self.after_injection  # what Krylov did the last time it continued an injection
        return max(self.gains[-2:])

    def krylov_step(self, v: torch.Tensor) -> float:
        av = self.budget.matmat(v)
        gain = self.sub.add(v, av)
        self.gains.append(gain)
        self.steps.append("K")
        self.frontier = av
        return gain

    def forced_step(self) -> None:
        self.forced = False
        v = _orth_new(self.frontier, self.sub.basis, scale=self.sub.scale)
        v = v[:, : max(self.budget.left - MIN_DEFLATED_PROBES, 0)]
        if v.shape[1] == 0:
            return
        gain = self.krylov_step(v)
        if self.injected_threshold is not None and gain <= self.injected_threshold:
            self.failures += 1
        self.injected_threshold = None

    def decide(self) -> bool:
        """Take the step that pays (a Krylov step, or absorbing the scout); ``False``: stop."""
        if not self.fits(1):
            return False
        if self.scout is None:
            if not self.fits(2):  # a scout only helps if a step could still follow it
                return False
            w = draw_columns(self.op, 1, self.generator)
            self.scout = _Scout(w, self.budget.matmat(w))
            self.scouts_used += 1
        f_hat, trace_hat = self.sub.residual_stats(self.scout.vector, self.scout.product)
        probes = self.plan(f_hat, trace_hat)
        if self.complete_if_cheaper(min(probes, self.budget.left)):
            return False
        if f_hat <= (_rank_tol(self.op.dtype) * self.sub.scale) ** 2:
            return False  # the residual is numerically zero
        threshold = f_hat / max(probes, 1)
        predicted = self.predicted_gain()
        v = _orth_new(self.frontier, self.sub.basis, scale=self.sub.scale)
        # Low rank within reach: at the recent gain the residual is gone in F̂/gain steps.
        last = self.gains[-_LOOKAHEAD_STEPS:]
        recent = sum(last) / len(last) if last else 0.0
        horizon = min(probes, self.budget.left) - MIN_DEFLATED_PROBES
        reach = f_hat <= _LOOKAHEAD * recent * horizon
        if (predicted > threshold or reach) and v.shape[1] and self.fits(1):
            first_after_injection = self.injected and len(self.gains) == 1
            gain = self.krylov_step(v[:, : self.budget.left - MIN_DEFLATED_PROBES])
            if first_after_injection:
                self.after_injection = gain
            return True
        hidden = f_hat - (self.op.dim - self.sub.rank) * predicted
        if hidden > 2 * threshold and self.failures < _MAX_FAILED_INJECTIONS and self.fits(2):
            self.inject(self.scout, threshold)
            return True
        return False

    def inject(self, scout: _Scout, threshold: float) -> None:
        """Absorb the scout into ``Q`` (free: ``A w`` is known) and take its continuation next."""
        w, aw = scout.vector, scout.product
        self.scout = None
        v, av = _orth_new_with_products(w, aw, self.sub, scale=float(torch.linalg.vector_norm(w)))
        if v.shape[1] == 0:
            return
        self.sub.add(v, av)
        self.steps.append("R")
        self.frontier = av
        self.forced, self.injected, self.gains = True, True, []
        self.injected_threshold = threshold


# --------------------------------------------------------------------------------------------------
# The estimator


def hutchpp_with_sketch(
    op: LinearOperator,
    num_matvecs: int,
    *,
    generator: torch.Generator,
    sketch_fraction: float | None = None,
    rtol: float | None = None,
    min_samples: int = 10,
    ci_level: float = 0.95,
    layer_slices: Mapping[str, slice] | None = None,
    block_size: int = 1,
    on_product: OnProduct | None = None,
) -> HutchppResult:
    """Hutch++ trace estimate of ``op`` and the subspace it deflated (see the module docstring).

    Args:
        op: the symmetric operator.
        num_matvecs: budget. Without ``rtol`` all of it is spent (less only when the trace came out
            exact); with ``rtol`` it is the cap (``max_matvecs``). At least 5.
        generator: the only source of randomness (seed it for reproducibility).
        sketch_fraction: ``None`` for the adaptive split; a number in (0, 1) for Hutch++ as
            published, spending that fraction of the budget on ``A S`` and ``A Q`` (2/3 is Meyer et
            al.'s choice). Clipped so that at least 3 deflated probes remain.
        rtol: target-error mode: add deflated probes until the ``ci_level`` interval proves a
            relative error of at most ``rtol`` (checked after ``min_samples`` probes); the adaptive
            split then sizes ``Q`` for the number of probes this target is predicted to need.
        min_samples: fewest deflated probes before the ``rtol`` rule is consulted.
        ci_level: confidence level of the reported interval.
        layer_slices: optional name → slice of the vector: per-block traces from the same work,
            unbiased for each block and summing to the total (stderrs in ``details``).
        block_size: deflated probes multiplied per ``op.matmat`` call (speed only; results are
            identical for any block size).
        on_product: called with the running estimate after every block of deflated probes; an
            exception it raises propagates with nothing changed but the products made.

    Returns:
        :class:`HutchppResult`: ``trace`` (``method="hutch++"``; ``details`` holds the split, the
        rank of ``Q``, the matvecs spent on it, the number of deflated probes, the exact part
        ``tr(QᵀAQ)`` and the deflated estimate with its standard error) and ``sketch`` (``Q`` and
        ``A Q`` for :func:`~deconcnn_curvature.linalg.ritz.sketch_top_eigenvalues`).
    """
    _check_args(num_matvecs, sketch_fraction, rtol, min_samples, ci_level, block_size)
    before = op.n_matvecs
    budget = _Budget(op, int(num_matvecs))
    floor = max(min_samples, MIN_DEFLATED_PROBES) if rtol is not None else MIN_DEFLATED_PROBES
    plan = _ProbePlan(budget, rtol, normal_quantile(0.5 + ci_level / 2), floor)
    sub, info = _choose_subspace(op, budget, generator, sketch_fraction, plan)
    sketch = LowRankSketch(
        basis=sub.basis,
        products=sub.products,
        n_matvecs=budget.spent,
        method="hutch++-adaptive" if sketch_fraction is None else "hutch++-sketch",
    )
    deflated = _DeflatedProbes(sub, budget, layer_slices)
    target_met: bool | None = None if rtol is None else True
    if sub.rank < op.dim:
        loop = ProbeLoop(
            op,
            deflated.forms,
            lambda s: t_half_width(s, ci_level, offset=deflated.exact),
            method="hutch++",
            budget=budget.cap,
            offset=deflated.exact,
            spent=budget.spent,
        )
        deflated.samples, target_met = loop.run(
            budget.left, generator=generator, block_size=block_size, rtol=rtol,
            min_probes=floor, on_product=on_product,
        )  # fmt: skip
    used = op.n_matvecs - before
    if used != budget.spent:
        raise BackendFailedError(
            f"the operator counted {used} matvecs but hutchpp multiplied {budget.spent} columns; "
            "its n_matvecs must count one per column of every matmat call"
        )
    trace = deflated.estimate(info, sketch.n_matvecs, ci_level, target_met, used)
    return HutchppResult(trace=trace, sketch=sketch)


def _choose_subspace(
    op: LinearOperator,
    budget: _Budget,
    generator: torch.Generator,
    sketch_fraction: float | None,
    plan: _ProbePlan,
) -> tuple[_Subspace, dict[str, object]]:
    """``Q`` by the adaptive rule (``sketch_fraction=None``) or the published fixed split."""
    if sketch_fraction is None:
        growth = _AdaptiveGrowth(op, budget, generator, plan)
        return growth.run(), growth.info()
    return _fixed_sketch(op, budget, generator, float(sketch_fraction), budget.cap)


class _DeflatedProbes:
    """Hutchinson on ``PAP``: the forms ``(Pz)ᵀA(Pz)`` and the per-block forms
    ``Σ_{i∈b} z_i (PAPz)_i``, and the estimate they give with the exact part."""

    def __init__(
        self, sub: _Subspace, budget: _Budget, layer_slices: Mapping[str, slice] | None
    ) -> None:
        self.sub, self.budget = sub, budget
        self.slices = dict(layer_slices or {})
        self.exact = sub.exact_part()
        self.exact_layers = sub.layer_exact_parts(self.slices) if self.slices else {}
        self.samples: list[float] = []
        self.layer_samples: dict[str, list[float]] = {name: [] for name in self.slices}

    def forms(self, z: torch.Tensor) -> list[float]:
        basis = self.sub.basis
        pz = z - basis @ (basis.T @ z)
        apz = self.budget.matmat(pz)
        if self.slices:
            papz = apz - basis @ (basis.T @ apz)
            prod = (z * papz).to(torch.float64)
            for name, sl in self.slices.items():
                self.layer_samples[name].extend(prod[sl].sum(dim=0).tolist())
        return (pz * apz).to(torch.float64).sum(dim=0).tolist()

    def estimate(
        self,
        info: dict[str, object],
        sketch_matvecs: int,
        ci_level: float,
        target_met: bool | None,
        used: int,
    ) -> TraceEstimate:
        g = len(self.samples)
        if g:
            mean, se = mean_stderr(self.samples)
            value = self.exact + mean
            ci = student_t_interval(value, se, g - 1, ci_level)
        else:
            mean, se, value, ci = 0.0, 0.0, self.exact, (self.exact, self.exact)
        layers: dict[str, float] = {}
        layer_se: dict[str, float] = {}
        for name in self.slices:
            lm, lse = mean_stderr(self.layer_samples[name]) if g else (0.0, 0.0)
            layers[name] = self.exact_layers[name] + lm
            layer_se[name] = lse
        details: dict[str, object] = {
            **info,
            "sketch_rank": self.sub.rank,
            "sketch_matvecs": sketch_matvecs,
            "deflated_probes": g,
            "exact_part": self.exact,
            "deflated_estimate": mean,
            "deflated_stderr": se,
            "exact": self.sub.rank >= self.sub.op.dim,
        }
        if self.slices:
            details["layer_stderr"] = layer_se
        return TraceEstimate(
            value=value,
            stderr=se,
            n_matvecs=used,
            ci=ci,
            ci_level=ci_level,
            method="hutch++",
            target_met=target_met,
            samples=tuple(self.samples),
            layers=layers if self.slices else None,
            details=details,
        )


def hutchpp(
    op: LinearOperator,
    num_matvecs: int,
    *,
    generator: torch.Generator,
    sketch_fraction: float | None = None,
    rtol: float | None = None,
    min_samples: int = 10,
    ci_level: float = 0.95,
    layer_slices: Mapping[str, slice] | None = None,
    block_size: int = 1,
    on_product: OnProduct | None = None,
) -> TraceEstimate:
    """Estimate ``tr A`` with Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021).

    The adaptive split (default) follows the spirit of Persson, Cortinovis & Kressner (SIMAX 2022);
    see the module docstring for the rule and :func:`hutchpp_with_sketch` for the arguments (this
    is that function without the sketch). ``samples`` are the deflated quadratic forms; ``value`` is
    ``details["exact_part"] + mean(samples)``.
    """
    return hutchpp_with_sketch(
        op,
        num_matvecs,
        generator=generator,
        sketch_fraction=sketch_fraction,
        rtol=rtol,
        min_samples=min_samples,
        ci_level=ci_level,
        layer_slices=layer_slices,
        block_size=block_size,
        on_product=on_product,
    ).trace


def _check_args(
    num_matvecs: int,
    sketch_fraction: float | None,
    rtol: float | None,
    min_samples: int,
    ci_level: float,
    block_size: int,
) -> None:
    if num_matvecs < _MIN_BUDGET:
        raise InvalidOptionError(
            f"hutchpp needs num_matvecs >= {_MIN_BUDGET} (2 for the low-rank part and "
            f"{MIN_DEFLATED_PROBES} deflated probes for a standard error), got {num_matvecs}; "
            "raise the budget or use hutchinson() for fewer matvecs"
        )
    if sketch_fraction is not None and not 0.0 < sketch_fraction < 1.0:
        raise InvalidOptionError(
            f"sketch_fraction must be None (adaptive) or in (0, 1), got {sketch_fraction}; "
            "2/3 is the published Hutch++ split"
        )
    if min_samples < 2:
        raise InvalidOptionError(f"min_samples must be >= 2, got {min_samples}")
    check_trace_args(rtol=rtol, ci_level=ci_level, block_size=block_size)
