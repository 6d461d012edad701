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
   more than one wasted step in the bulk).
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
from dataclasses import asdict, dataclass

import torch

from deconcnn_curvature.errors import BackendFailedError, InvalidOptionError
from deconcnn_curvature.linalg._quantiles import normal_quantile
from deconcnn_curvature.linalg.hutchinson import (
    TraceEstimate,
    _mean_se,
    _Reporter,
    student_t_interval,
)
from deconcnn_curvature.linalg.lanczos import LanczosState, ritz_converged
from deconcnn_curvature.linalg.operator import LinearOperator, rademacher

__all__ = [
    "HutchppResult",
    "LowRankSketch",
    "RitzEstimate",
    "hutchpp",
    "hutchpp_with_sketch",
    "refined_top_eigenvalues",
    "sketch_top_eigenvalues",
]

MIN_DEFLATED_PROBES = 3
"""Fewest deflated probes ever used (a standard error from 2 samples is too noisy to report)."""
_MIN_BUDGET = 2 + MIN_DEFLATED_PROBES  # the adaptive start pair (or 1 sketch column + A Q)
_MAX_FAILED_INJECTIONS = 1
_RESIDUAL_SHARE = 0.5
"""A refined eigenvalue is converged when its residual is at most this share of ``rtol · |θ|``.

Two close eigenvalues ``λ₁ − λ₂ = g`` seen as one mixture ``a v₁ + b v₂`` give the Ritz value
``λ₁ − b²g`` with residual ``|ab|g``: a residual test at ``rtol`` passes mixtures whose error is up
to ``g`` when ``g`` is near ``rtol``. At half of it, a mixture is passed with an error above
``rtol`` only if ``|a| < |b|/2`` in the union of two independent sequences. Measured on 1000
close-gap spectra (gaps 0.1–5 %, tests/linalg/test_hutchpp.py): at the full ``rtol`` 2 wrong
values were reported converged (errors 1.2–1.5e-3 at rtol 1e-3), at half none (worst 2.4e-6).
"""


@dataclass(frozen=True)
class LowRankSketch:
    """The subspace Hutch++ deflated: orthonormal ``basis`` ``Q`` (dim × r) and ``products = A Q``.

    Kept so that other quantities can reuse the matvecs already paid for (Rayleigh–Ritz eigenvalues
    in :func:`sketch_top_eigenvalues`). ``n_matvecs`` counts every matvec spent choosing and
    building it (sketch, Krylov steps, scouts), not the deflated probes.
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


@dataclass(frozen=True)
class RitzEstimate:
    """Top-``k`` eigenvalue estimates (descending) with residual bounds and their provenance.

    ``residuals[i] = ‖A y_i − θ_i y_i‖`` for the unit Ritz vector ``y_i``: some eigenvalue of ``A``
    lies within it of ``values[i]`` (a rigorous bound for symmetric ``A``; it cannot exclude an
    eigenvalue the subspace never saw). ``methods[i]`` is ``"rayleigh_ritz"`` (from the Hutch++
    sketch, no extra matvecs) or ``"lanczos"``. ``n_matvecs`` counts only the extra matvecs spent
    here. ``converged``: for :func:`sketch_top_eigenvalues`, whether every residual met
    ``rtol · |value|`` (``None``: none asked); for :func:`refined_top_eigenvalues`, its stricter
    rule (residuals and two independent sequences agreeing on the top).
    """

    values: tuple[float, ...]
    residuals: tuple[float, ...]
    methods: tuple[str, ...]
    n_matvecs: int
    converged: bool | None
    rtol: float | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Subspace bookkeeping


def _rank_tol(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) ** (2 / 3)


def _orth_new(
    x: torch.Tensor,
    basis: torch.Tensor,
    *,
    ax: torch.Tensor | None = None,
    products: torch.Tensor | None = None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Orthonormal basis ``V`` of the part of ``range(x)`` orthogonal to ``basis`` (and ``A V``).

    Two passes of block Gram–Schmidt, then a QR of the projected block whose rank is read off the
    singular values of ``R`` (directions below ``tol · scale`` are dropped — always safe: ``Q`` only
    affects the variance). If ``ax = A x`` is given, ``A V`` is formed from it and ``products``
    (``= A basis``) without any matvec.
    """
    for _ in range(2):
        if basis.shape[1] == 0:
            break
        c = basis.T @ x
        x = x - basis @ c
        if ax is not None:
            ax = ax - products @ c  # type: ignore[operator]
    if x.shape[1] == 0:
        return x, ax
    f, r = torch.linalg.qr(x)
    u, s, vh = torch.linalg.svd(r)
    keep = s > _rank_tol(x.dtype) * max(scale, 1e-300)
    v = f @ u[:, keep]
    av = None if ax is None else ax @ (vh[keep, :].T / s[keep])
    return v, av


class _Subspace:
    """``Q`` and ``A Q`` grown block by block; tracks the matvecs spent on the operator."""

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


def _draw(op: LinearOperator, k: int, generator: torch.Generator) -> torch.Tensor:
    # Column by column, so a result never depends on how columns are grouped into blocks.
    cols = [
        rademacher(op.dim, 1, generator=generator, dtype=op.dtype, device=op.device)
        for _ in range(k)
    ]
    return torch.cat(cols, dim=1)


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
    v, _ = _orth_new(eye, sub.basis, scale=1.0)
    v = v[:, : sub.op.dim - sub.rank]
    if v.shape[1]:
        sub.add(v, budget.matmat(v))


def _fixed_sketch(
    op: LinearOperator, budget: _Budget, generator: torch.Generator, fraction: float, m: int
) -> tuple[_Subspace, dict[str, object]]:
    sub = _Subspace(op)
    s = max(1, min(round(fraction * m / 2), (m - MIN_DEFLATED_PROBES) // 2))
    sketch = _draw(op, s, generator)
    y = budget.matmat(sketch)
    scale = float(torch.linalg.vector_norm(y, dim=0).max())
    q, _ = _orth_new(y, sub.basis, scale=scale)
    if q.shape[1]:
        sub.add(q, budget.matmat(q))
    return sub, {"split": "fixed", "sketch_columns": s, "steps": "S"}


def _adaptive_subspace(
    op: LinearOperator,
    budget: _Budget,
    generator: torch.Generator,
    plan_probes,
) -> tuple[_Subspace, dict[str, object]]:
    """Grow ``Q`` (Krylov steps 'K', scout injections 'R') while the variance bound says it pays.

    ``plan_probes(F̂, trace_hat)`` is how many deflated probes the estimate will use if we stop now.
    """
    n = op.dim
    sub = _Subspace(op)
    steps: list[str] = []
    scouts_used = 0

    def fits(extra: int) -> bool:
        return budget.left - extra >= MIN_DEFLATED_PROBES

    def complete_if_cheaper(limit: int) -> bool:
        if n - sub.rank <= limit:
            _complete(sub, budget)
            steps.append("E")
            return True
        return False

    if complete_if_cheaper(plan_probes(math.inf, 0.0, start=True)):
        return sub, {"split": "adaptive", "steps": "".join(steps), "scouts": 0}

    # 1. The start pair: a random vector and its Krylov continuation.
    start = _draw(op, 1, generator)
    a_start = budget.matmat(start)
    v, av = _orth_new(start, sub.basis, ax=a_start, products=sub.products, scale=1.0)
    sub.add(v, av)  # type: ignore[arg-type]
    a_frontier = av
    forced = True  # the continuation of a random block is always taken (it is the informative one)
    gains: list[float] = []  # per-column gains of the current Krylov sequence, continuation first
    injected = False  # whether the current sequence started from an injected scout
    after_injection: float | None = None  # gain of the first free Krylov step after an injection
    scouts = a_scouts = None
    failures = 0
    injected_threshold: float | None = None

    def predicted_gain() -> float:
        if not gains:
            return 0.0
        if len(gains) == 1 and injected and after_injection is not None:
            return after_injection  # what Krylov did the last time it continued an injection
        return max(gains[-2:])

    while sub.rank < n:
        if forced:
            v, _ = _orth_new(a_frontier, sub.basis, scale=sub.scale)  # type: ignore[arg-type]
            v = v[:, : max(budget.left - MIN_DEFLATED_PROBES, 0)]
            forced = False
            if v.shape[1] == 0:
                continue
            av = budget.matmat(v)
            gain = sub.add(v, av)
            gains.append(gain)
            steps.append("K")
            a_frontier = av
            if injected_threshold is not None and gain <= injected_threshold:
                failures += 1
            injected_threshold = None
            continue
        # A decision: is another step worth its matvecs?
        if not fits(1):
            break
        if scouts is None:
            if not fits(2):  # a scout only helps if a step could still follow it
                break
            scouts = _draw(op, 1, generator)
            a_scouts = budget.matmat(scouts)
            scouts_used += 1
        f_hat, trace_hat = sub.residual_stats(scouts, a_scouts)  # type: ignore[arg-type]
        probes = plan_probes(f_hat, trace_hat)
        if complete_if_cheaper(min(probes, budget.left)):
            break
        if f_hat <= (_rank_tol(op.dtype) * sub.scale) ** 2:
            break  # the residual is numerically zero
        threshold = f_hat / max(probes, 1)
        predicted = predicted_gain()
        v, _ = _orth_new(a_frontier, sub.basis, scale=sub.scale)  # type: ignore[arg-type]
        if predicted > threshold and v.shape[1] and fits(1):
            v = v[:, : budget.left - MIN_DEFLATED_PROBES]
            av = budget.matmat(v)
            gain = sub.add(v, av)
            if injected and len(gains) == 1:
                after_injection = gain
            gains.append(gain)
            steps.append("K")
            a_frontier = av
            continue
        hidden = f_hat - (n - sub.rank) * predicted
        if hidden > 2 * threshold and failures < _MAX_FAILED_INJECTIONS and fits(2):
            v, av = _orth_new(
                scouts,  # type: ignore[arg-type]
                sub.basis,
                ax=a_scouts,
                products=sub.products,
                scale=float(torch.linalg.vector_norm(scouts)),  # type: ignore[arg-type]
            )
            scouts = a_scouts = None
            if v.shape[1] == 0:
                continue
            sub.add(v, av)  # type: ignore[arg-type]
            steps.append("R")
            a_frontier = av
            forced, injected, gains = True, True, []
            injected_threshold = threshold
            continue
        break
    info: dict[str, object] = {"split": "adaptive", "steps": "".join(steps), "scouts": scouts_used}
    return sub, info


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
        rtol: target-error mode: add deflated probes until the ``ci_level`` interval half-width is
            at most ``rtol · |estimate|`` (checked after ``min_samples`` probes); the adaptive
            split then sizes ``Q`` for the number of probes this target is predicted to need.
        min_samples: fewest deflated probes before the ``rtol`` rule is consulted.
        ci_level: confidence level of the reported interval.
        layer_slices: optional name → slice of the vector: per-block traces from the same work,
            unbiased for each block and summing to the total (stderrs in ``details``).
        block_size: deflated probes multiplied per ``op.matmat`` call (speed only; results are
            identical for any block size).

    Returns:
        :class:`HutchppResult`: ``trace`` (``method="hutch++"``; ``details`` holds the split, the
        rank of ``Q``, the matvecs spent on it, the number of deflated probes, the exact part
        ``tr(QᵀAQ)`` and the deflated estimate with its standard error) and ``sketch`` (``Q`` and
        ``A Q`` for :func:`sketch_top_eigenvalues`).
    """
    _check_args(num_matvecs, sketch_fraction, rtol, min_samples, ci_level, block_size)
    m = int(num_matvecs)
    before = op.n_matvecs
    budget = _Budget(op, m)
    z_level = normal_quantile(0.5 + ci_level / 2)
    floor = max(min_samples, MIN_DEFLATED_PROBES) if rtol is not None else MIN_DEFLATED_PROBES

    def plan_probes(f_hat: float, trace_hat: float, start: bool = False) -> int:
        if rtol is None:
            return budget.left
        if start:  # completing Q is only worth it if no cheaper rtol run is possible
            return min(budget.left, 2 + floor)
        if trace_hat == 0.0 or not math.isfinite(f_hat):
            return budget.left
        need = math.ceil(2 * z_level**2 * f_hat / (rtol * trace_hat) ** 2)
        return max(floor, min(need, budget.left))

    if sketch_fraction is None:
        sub, info = _adaptive_subspace(op, budget, generator, plan_probes)
    else:
        sub, info = _fixed_sketch(op, budget, generator, float(sketch_fraction), m)
    sketch_matvecs = budget.spent
    exact = sub.exact_part()
    sketch = LowRankSketch(
        basis=sub.basis,
        products=sub.products,
        n_matvecs=sketch_matvecs,
        method="hutch++-adaptive" if sketch_fraction is None else "hutch++-sketch",
    )

    exact_layers: dict[str, float] = {}
    if layer_slices:
        t = sub.basis.T @ sub.products
        both = (2 * sub.products - sub.basis @ t) * sub.basis  # Q∘(AQ) + Q∘(PAQ)
        both = both.to(torch.float64).sum(dim=1)
        exact_layers = {name: float(both[sl].sum()) for name, sl in layer_slices.items()}

    samples: list[float] = []
    layer_samples: dict[str, list[float]] = {name: [] for name in layer_slices or {}}
    target_met: bool | None = None if rtol is None else False
    is_exact = sub.rank >= op.dim
    if is_exact:
        target_met = None if rtol is None else True
    else:
        report = _Reporter("hutch++", m, offset=exact)  # [issue 10] progress / partial estimate
        while budget.left > 0:
            size = min(max(1, block_size), budget.left)
            z = _draw(op, size, generator)
            pz = z - sub.basis @ (sub.basis.T @ z)
            apz = budget.matmat(pz)
            new = (pz * apz).to(torch.float64).sum(dim=0).tolist()
            samples.extend(new)
            report(new, budget.spent)
            if layer_slices:
                papz = apz - sub.basis @ (sub.basis.T @ apz)
                prod = (z * papz).to(torch.float64)
                for name, sl in layer_slices.items():
                    layer_samples[name].extend(prod[sl].sum(dim=0).tolist())
            if rtol is not None and len(samples) >= floor:
                mean, se = _mean_se(samples)
                lo, hi = student_t_interval(mean, se, len(samples) - 1, ci_level)
                half = (hi - lo) / 2  # the relative error proved for every trace inside
                if half <= rtol * (abs(exact + mean) - half):
                    target_met = True
                    break

    used = op.n_matvecs - before
    if used != budget.spent:
        raise BackendFailedError(
            f"the operator counted {used} matvecs but hutchpp multiplied {budget.spent} columns; "
            "its n_matvecs must count one per column of every matmat call"
        )
    g = len(samples)
    if g:
        mean, se = _mean_se(samples)
        value = exact + mean
        ci = student_t_interval(value, se, g - 1, ci_level)
    else:
        mean, se, value, ci = 0.0, 0.0, exact, (exact, exact)
    layers = None
    layer_se: dict[str, float] = {}
    if layer_slices:
        layers = {}
        for name in layer_slices:
            lm, lse = _mean_se(layer_samples[name]) if g else (0.0, 0.0)
            layers[name] = exact_layers[name] + lm
            layer_se[name] = lse
    details: dict[str, object] = {
        **info,
        "sketch_rank": sub.rank,
        "sketch_matvecs": sketch_matvecs,
        "deflated_probes": g,
        "exact_part": exact,
        "deflated_estimate": mean,
        "deflated_stderr": se,
        "exact": is_exact,
    }
    if layer_slices:
        details["layer_stderr"] = layer_se
    trace = TraceEstimate(
        value=value,
        stderr=se,
        n_matvecs=used,
        ci=ci,
        ci_level=ci_level,
        method="hutch++",
        target_met=target_met,
        samples=tuple(samples),
        layers=layers,
        details=details,
    )
    return HutchppResult(trace=trace, sketch=sketch)


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
    if rtol is not None and not rtol > 0.0:
        raise InvalidOptionError(f"rtol must be > 0 or None, got {rtol}")
    if min_samples < 2:
        raise InvalidOptionError(f"min_samples must be >= 2, got {min_samples}")
    if not 0.0 < ci_level < 1.0:
        raise InvalidOptionError(f"ci_level must be in (0, 1), got {ci_level}")
    if block_size < 1:
        raise InvalidOptionError(f"block_size must be >= 1, got {block_size}")


# --------------------------------------------------------------------------------------------------
# Eigenvalues from the sketch


def _ritz_pairs(sketch: LowRankSketch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ritz values (descending), unit Ritz vectors ``Q u`` and exact residual norms."""
    theta, u = torch.linalg.eigh(sketch.projected())
    order = torch.argsort(theta, descending=True)
    theta, u = theta[order], u[:, order]
    uq = u.to(sketch.basis.dtype)
    y = sketch.basis @ uq
    ay = sketch.products @ uq
    res = torch.linalg.vector_norm((ay - y * theta.to(y.dtype)).to(torch.float64), dim=0)
    return theta, y, res


def sketch_top_eigenvalues(
    sketch: LowRankSketch, k: int = 1, *, rtol: float | None = None
) -> RitzEstimate:
    """Rayleigh–Ritz on the Hutch++ subspace: the ``k`` largest eigenvalues of ``QᵀAQ``.

    No matvecs: ``A Q`` is stored, so for a Ritz pair ``(θ, y = Q u)`` the residual
    ``‖(AQ)u − θ Qu‖`` is exact. Ritz values never exceed the true ones (Cauchy interlacing), and
    an eigenvalue lies within the residual of each. On the adaptive (Krylov) subspace they are
    Lanczos-quality estimates of the top of the spectrum; on a one-pass sketch, rougher.
    """
    if k < 1 or k > sketch.rank:
        raise InvalidOptionError(
            f"k must be in [1, rank of the sketch = {sketch.rank}], got {k}; "
            "use refined_top_eigenvalues() or a larger budget"
        )
    theta, _, res = _ritz_pairs(sketch)
    values = tuple(float(x) for x in theta[:k])
    residuals = tuple(float(x) for x in res[:k])
    converged = None if rtol is None else _all_within(values, residuals, rtol)
    return RitzEstimate(
        values=values,
        residuals=residuals,
        methods=("rayleigh_ritz",) * k,
        n_matvecs=0,
        converged=converged,
        rtol=rtol,
    )


def _all_within(values: tuple[float, ...], residuals: tuple[float, ...], rtol: float) -> bool:
    """:func:`ritz_converged` relative to each value (``1e-12 · |θ_1|`` only guards a zero)."""
    return ritz_converged(values, residuals, rtol, floor=1e-12 * max(abs(values[0]), 1e-300))


def refined_top_eigenvalues(
    op: LinearOperator,
    sketch: LowRankSketch,
    k: int = 1,
    *,
    rtol: float = 1e-2,
    generator: torch.Generator,
    max_matvecs: int = 50,
) -> RitzEstimate:
    """Top-``k`` eigenvalues: Rayleigh–Ritz on the sketch together with independent Lanczos runs.

    A small residual proves that *some* eigenvalue lies near a Ritz value, never that it is the
    largest one. A single Krylov sequence sees two close eigenvalues ``λ₁ > λ₂`` as one mixture
    ``a v₁ + b v₂`` of their eigenvectors until its polynomial resolves the gap ``g``: Ritz value
    ``λ₁ − b²g``, residual ``|ab|·g``. When its start had little weight on ``v₁`` (``|a| ≪ |b|``)
    the residual passes any test while the value is ``λ₂``. A residual test on the sketch, or on
    Lanczos started from the sketch's top Ritz vector (which carries the same small ``a``), passed
    λ₂ off as λ_max. So the sketch's values are never returned alone unless the sketch spans the
    whole space (then they are exact).

    Two sequences take part: (1) the sketch — its own top Ritz value — continued by Lanczos from
    its top Ritz vector (the sum of the top ``k``) once it needs refining, and (2) Lanczos from a
    fresh Rademacher start drawn from ``generator``, independent of the sketch (both with full
    reorthogonalisation). Every Krylov vector ``q``, with ``A q`` (which Lanczos computes anyway),
    joins the sketch's subspace, and Rayleigh–Ritz on the union is reported. The ``i``-th Ritz
    value of a subspace is at most ``λ_i`` and grows with the subspace (Cauchy interlacing), so
    every value is at least what the sketch or either run alone gives; and two independent
    sequences see a pair of close eigenvalues as two dimensions, which Rayleigh–Ritz separates.
    Each step is one matvec for one sequence: while the union's residuals miss the test, the
    sequence nearest its top (it is converging there); then whichever lags the union's top, to
    confirm it.

    ``converged`` needs (1) every top-``k`` residual on the union at most
    ``rtol/2 · |θ_i|`` (:data:`_RESIDUAL_SHARE`) and (2) both sequences' own top Ritz values within
    ``rtol · |θ_1|`` of the union's ``θ_1``: two independent starts reached the same top of the
    spectrum. The runs stop when both hold or after ``max_matvecs``. ``methods[i]`` is
    ``"lanczos"`` (Rayleigh–Ritz on the union) or ``"rayleigh_ritz"`` (the sketch's own value was
    larger, by rounding; or the sketch was the whole space, no matvecs). Values ``2..k`` are
    certified by their residuals only.
    """
    if max_matvecs < 1:
        raise InvalidOptionError(f"max_matvecs must be >= 1, got {max_matvecs}")
    if not rtol > 0:
        raise InvalidOptionError(f"rtol must be > 0, got {rtol}")
    if sketch.basis.shape[0] != op.dim:
        raise InvalidOptionError(
            f"the sketch has dimension {sketch.basis.shape[0]} but the operator {op.dim}"
        )
    if k < 1 or k > op.dim:
        raise InvalidOptionError(f"k must be in [1, dimension = {op.dim}], got {k}")
    if sketch.rank >= op.dim:
        return sketch_top_eigenvalues(sketch, k, rtol=rtol)  # the whole space: exact

    union = _Union(op, sketch, capacity=max_matvecs)
    # Two sequences: the sketch, continued by Lanczos from its top Ritz vector when it needs
    # refining, and a Lanczos run from an independent random start. One matvec per step, for the
    # sequence that needs it: while the union's residuals miss rtol, the one nearest its top (it
    # is converging there); then whichever lags the union's top, to confirm it.
    own = sketch_top_eigenvalues(sketch, min(k, sketch.rank)) if sketch.rank else None
    sketch_top = own.values[0] if own is not None else -math.inf

    methods: list[str] = []
    eps = float(torch.finfo(op.dtype).eps)

    def union_top() -> tuple[tuple[float, ...], tuple[float, ...]]:
        # Per index the larger of the union's and the sketch's own Rayleigh–Ritz values (both
        # at most λ_i): in exact arithmetic the union's, but in float32 its coefficients can
        # round it a few ulps below the sketch's.
        values, residuals = union.top(k)
        methods[:] = ["lanczos"] * len(values)
        if not values or own is None:
            return values, residuals
        vals, ress = list(values), list(residuals)
        for i, (v, r) in enumerate(zip(own.values, own.residuals, strict=True)):
            if v > vals[i] + 8 * eps * abs(v):  # beyond a few ulps of rounding
                vals[i], ress[i], methods[i] = v, r, "rayleigh_ritz"
        return tuple(vals), tuple(ress)

    continued: _Run | None = None
    independent: _Run | None = None
    before = op.n_matvecs
    values, residuals = union_top()
    done = False
    while True:
        tops = [
            sketch_top if continued is None else continued.top(),
            -math.inf if independent is None else independent.top(),
        ]
        if values:
            slack = rtol * max(abs(values[0]), 1e-300)
            agree = min(tops) >= values[0] - slack
            if union.whole or (agree and _all_within(values, residuals, _RESIDUAL_SHARE * rtol)):
                done = True
                break
            refining = not _all_within(values, residuals, _RESIDUAL_SHARE * rtol)
        else:
            refining = True
        pick = (max if refining else min)(range(2), key=lambda i: (tops[i], -i))
        if op.n_matvecs - before >= max_matvecs:
            break
        if pick == 0:
            if continued is None:
                start = (
                    _ritz_pairs(sketch)[1][:, :k].sum(dim=1, keepdim=True) if sketch.rank else None
                )
                continued = _Run(op, generator, union, start=start)
            run = continued
        else:
            if independent is None:
                independent = _Run(op, generator, union)
            run = independent
        aq = op.matmat(run.q)
        run.step(aq, union.add(run.q, aq))
        values, residuals = union_top()
    used = op.n_matvecs - before
    if len(values) < k:
        raise InvalidOptionError(
            f"only {union.rank} directions were found within max_matvecs={max_matvecs}, fewer "
            f"than k={k}; raise max_matvecs"
        )
    return RitzEstimate(
        values=values,
        residuals=residuals,
        methods=tuple(methods),
        n_matvecs=used,
        converged=done,
        rtol=rtol,
    )


class _Union:
    """The span of the sketch and the Lanczos vectors, each ``A`` column kept exactly as computed.

    An orthonormal basis ``W = B C`` of the raw columns ``B`` (the sketch's ``Q``, then the
    Lanczos vectors) is built by Gram–Schmidt, but only its coefficients ``C`` are kept:
    ``A W = (A B) C`` always comes from the products as the operator returned them. (Deriving each
    new ``A w`` from earlier derived ones compounds rounding by ``1/s`` per step, which blew up as
    the union neared the whole space.) A raw column whose part outside the span is below
    ``eps^{1/4}`` of its norm, or whose coefficients would exceed ``eps^{-1/4}``, adds no direction
    (dropping one only makes the union smaller). Memory: the sketch is referenced, not copied;
    each refinement matvec adds two vectors (``q`` and ``A q``), which the runs share.
    """

    def __init__(self, op: LinearOperator, sketch: LowRankSketch, capacity: int) -> None:
        self.dim = op.dim
        self.r = sketch.rank
        self.sketch_basis, self.sketch_products = sketch.basis, sketch.products
        self.new = torch.empty(op.dim, capacity, dtype=op.dtype, device=op.device)
        self.new_products = torch.empty_like(self.new)
        self.count = 0
        self.coef = torch.eye(self.r, dtype=torch.float64, device=op.device)  # W = raw @ coef
        self.projected_raw = sketch.projected().to(op.device)  # rawᵀ A raw
        self._cut = float(torch.finfo(op.dtype).eps) ** 0.25

    @property
    def rank(self) -> int:
        return int(self.coef.shape[1])

    @property
    def whole(self) -> bool:
        return self.rank >= self.dim

    def _raw_t(self, x: torch.Tensor) -> torch.Tensor:
        """``rawᵀ x`` in float64."""
        parts = [self.sketch_basis.T @ x, self.new[:, : self.count].T @ x]
        return torch.cat(parts).to(torch.float64)

    def _raw_mul(self, c: torch.Tensor, *, products: bool = False) -> torch.Tensor:
        """``raw @ c`` (or ``(A raw) @ c``)."""
        first, rest = (
            (self.sketch_products, self.new_products) if products else (self.sketch_basis, self.new)
        )
        c = c.to(self.new.dtype)
        return first @ c[: self.r] + rest[:, : self.count] @ c[self.r :]

    def add(self, q: torch.Tensor, aq: torch.Tensor) -> int:
        """Append ``q`` (with ``A q``); return its column among the Lanczos vectors."""
        x, total = q, torch.zeros(self.rank, 1, dtype=torch.float64, device=q.device)
        for _ in range(2):
            c = self.coef.T @ self._raw_t(x)
            x = x - self._raw_mul(self.coef @ c)
            total = total + c
        j = self.count
        self.new[:, j : j + 1] = q
        self.new_products[:, j : j + 1] = aq
        self.count = j + 1
        m = self._raw_t(aq)  # rawᵀ A q; A is symmetric
        self.projected_raw = torch.cat([torch.cat([self.projected_raw, m[:-1].T]), m], dim=1)
        self.coef = torch.cat([self.coef, self.coef.new_zeros(1, self.rank)])
        norm = float(torch.linalg.vector_norm(q))
        s = float(torch.linalg.vector_norm(x)) / norm
        if s > self._cut and self.rank < self.dim:
            new = -(self.coef @ total)
            new[-1, 0] += 1.0
            new = new / (s * norm)
            if float(torch.linalg.vector_norm(new)) <= 1 / self._cut:
                self.coef = torch.cat([self.coef, new], dim=1)
        return j

    def deflate(self, x: torch.Tensor, columns: list[int]) -> torch.Tensor:
        """``x − L Lᵀ x`` for the orthonormal Lanczos vectors ``L`` = these columns (no copies)."""
        if not columns:
            return x
        block = self.new[:, : self.count]
        c = torch.zeros(self.count, 1, dtype=x.dtype, device=x.device)
        c[columns] = (block.T @ x)[columns]
        return x - block @ c

    def top(self, k: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Top-``k`` Ritz values (descending) and exact residual norms (``()`` if rank < k)."""
        if self.rank < k:
            return (), ()
        small = self.coef.T @ self.projected_raw @ self.coef
        theta, u = torch.linalg.eigh((small + small.T) / 2)
        g = self.coef @ u.flip(1)[:, :k]
        y = self._raw_mul(g)
        ay = self._raw_mul(g, products=True)
        # Values and residuals from the vectors themselves: a Rayleigh quotient is never above
        # λ₁, however the coefficients were rounded.
        yy = (y * y).to(torch.float64).sum(dim=0)
        theta = (y * ay).to(torch.float64).sum(dim=0) / yy
        res = torch.linalg.vector_norm((ay - y * theta.to(y.dtype)).to(torch.float64), dim=0)
        res = res / yy.sqrt()
        order = torch.argsort(theta, descending=True)
        return tuple(float(theta[i]) for i in order), tuple(float(res[i]) for i in order)


class _Run:
    """One Lanczos sequence (full reorthogonalisation) from its own start; its vectors live in
    the union (``columns``)."""

    def __init__(
        self,
        op: LinearOperator,
        generator: torch.Generator,
        union: _Union,
        start: torch.Tensor | None = None,
    ) -> None:
        self.op, self.generator, self.union = op, generator, union
        self.columns: list[int] = []
        self.alphas: list[float] = []
        self.betas: list[float] = []
        self.scale = 0.0
        self.q = self._fresh() if start is None else start / torch.linalg.vector_norm(start)

    def _fresh(self) -> torch.Tensor:
        w = rademacher(self.op.dim, 1, generator=self.generator, dtype=self.op.dtype,
                       device=self.op.device)  # fmt: skip
        for _ in range(2):
            w = self.union.deflate(w, self.columns)
        return w / torch.linalg.vector_norm(w)

    def step(self, aq: torch.Tensor, column: int) -> None:
        """Record ``A q`` for the current ``q`` (already in the union as ``column``), move on."""
        self.columns.append(column)
        w = aq
        for _ in range(2):
            w = self.union.deflate(w, self.columns)
        alpha = float((self.q.T @ aq).reshape(()))
        beta = float(torch.linalg.vector_norm(w))
        self.alphas.append(alpha)
        self.betas.append(beta)
        self.scale = max(self.scale, abs(alpha), beta)
        if len(self.columns) >= self.op.dim:
            return
        if beta <= 1e-10 * max(self.scale, 1e-30):  # invariant subspace: a decoupled restart
            self.betas[-1] = 0.0
            self.q = self._fresh()
        else:
            self.q = w / beta

    def top(self) -> float:
        t = LanczosState(self.union.new[:, :0], self.alphas, self.betas).tridiagonal()
        return float(torch.linalg.eigvalsh(t)[-1])
