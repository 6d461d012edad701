"""Top eigenvalues by Rayleigh–Ritz: on a Hutch++ sketch, and refined by independent Lanczos runs.

Lanczos, C. (1950). *An iteration method for the solution of the eigenvalue problem of linear
differential and integral operators.* J. Res. Nat. Bur. Standards 45, 255–282.
Parlett, B. N. (1998). *The Symmetric Eigenvalue Problem.* SIAM (Rayleigh–Ritz, residual bounds,
Cauchy interlacing: chapters 10–11).
Kuczyński, J. & Woźniakowski, H. (1992). *Estimating the largest eigenvalue by the power and
Lanczos algorithms with a random start.* SIAM J. Matrix Anal. Appl. 13(4), 1094–1122.

The Hutch++ trace (:mod:`~deconcnn_curvature.linalg.hutchpp`) leaves a subspace ``Q`` with
``A Q`` already computed; Rayleigh–Ritz on it gives eigenvalue estimates at no cost
(:func:`sketch_top_eigenvalues`). :func:`refined_top_eigenvalues` joins it with Lanczos runs
from independent starts and reports Rayleigh–Ritz on the union.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from deconcnn_curvature.errors import InvalidOptionError
from deconcnn_curvature.linalg.hutchpp import LowRankSketch
from deconcnn_curvature.linalg.lanczos import LanczosState, ritz, ritz_converged
from deconcnn_curvature.linalg.operator import LinearOperator, rademacher

__all__ = [
    "MIN_SEQUENCES",
    "MULTIPLICITY",
    "RitzEstimate",
    "copies_needed",
    "krylov_top_eigenvalues",
    "refined_top_eigenvalues",
    "sketch_top_eigenvalues",
]

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
class RitzEstimate:
    """Top-``k`` eigenvalue estimates (descending) with residual bounds and their provenance.

    ``residuals[i] = ‖A y_i − θ_i y_i‖`` for the unit Ritz vector ``y_i``: some eigenvalue of ``A``
    lies within it of ``values[i]`` (a rigorous bound for symmetric ``A``; it cannot exclude an
    eigenvalue the subspace never saw). ``methods[i]`` is ``"rayleigh_ritz"`` (from the Hutch++
    sketch, no extra matvecs) or ``"lanczos"``. ``n_matvecs`` counts only the extra matvecs spent
    here. ``converged``: for :func:`sketch_top_eigenvalues`, whether every residual met
    ``rtol · |value|`` (``None``: none asked); for :func:`refined_top_eigenvalues` and
    :func:`krylov_top_eigenvalues`, the stricter rule of :class:`_Sequences` (residuals,
    independent sequences agreeing on the top, multiplicities seen by fewer sequences than took
    part). ``sequences``: how many independent Krylov sequences took part (the sketch counts as
    one). ``note``: why the runs stopped short of the tolerance when the products' rounding, not
    the budget, stopped them (:meth:`_Sequences.floor_note`); ``None`` otherwise.

    **Contract.** ``values`` are the ``k`` largest algebraic eigenvalues *counted with
    multiplicity*, as ``torch.linalg.eigvalsh(A).flip(0)[:k]`` lists them: an eigenvalue of
    multiplicity 3 fills three places.
    """

    values: tuple[float, ...]
    residuals: tuple[float, ...]
    methods: tuple[str, ...]
    n_matvecs: int
    converged: bool | None
    rtol: float | None = None
    sequences: int = 1
    note: str | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


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
    """Top-``k`` eigenvalues (counted with multiplicity): Rayleigh–Ritz on the sketch joined by
    Lanczos runs from independent starts.

    A small residual proves that *some* eigenvalue lies near a Ritz value, never that it is the
    largest one. A single Krylov sequence sees two close eigenvalues ``λ₁ > λ₂`` as one mixture
    ``a v₁ + b v₂`` of their eigenvectors until its polynomial resolves the gap ``g``: Ritz value
    ``λ₁ − b²g``, residual ``|ab|·g``. When its start had little weight on ``v₁`` (``|a| ≪ |b|``)
    the residual passes any test while the value is ``λ₂``. So the sketch's values are never
    returned alone unless the sketch spans the whole space (then they are exact).

    The sequences: the sketch — continued by Lanczos from its top Ritz vector (the sum of the
    top ``k``) once it needs refining — and Lanczos runs from fresh Rademacher starts drawn from
    ``generator`` (full reorthogonalisation). Every Krylov vector ``q``, with ``A q``, joins the
    sketch's subspace, and Rayleigh–Ritz on the union is reported: the ``i``-th Ritz value of a
    subspace is at most ``λ_i`` and grows with the subspace (Cauchy interlacing), so every value
    is at least what any sequence alone gives. The stepping and the meaning of ``converged`` are
    those of :class:`_Sequences`, with the residual test ``‖r_i‖ ≤ rtol/2 · |θ_i|``
    (:data:`_RESIDUAL_SHARE`). ``methods[i]`` is ``"lanczos"`` (Rayleigh–Ritz on the union) or
    ``"rayleigh_ritz"`` (the sketch's own value was larger, by rounding; or the sketch was the
    whole space, no matvecs).
    """
    _check_refine_args(op, sketch, k, rtol, max_matvecs)
    if sketch.rank >= op.dim:
        return sketch_top_eigenvalues(sketch, k, rtol=rtol)  # the whole space: exact

    def tolerance(values: tuple[float, ...], scale: float) -> list[float]:
        floor = 1e-12 * max(abs(values[0]), 1e-300)
        return [_RESIDUAL_SHARE * rtol * max(abs(v), floor) for v in values]

    return _Sequences(op, sketch, k, tolerance, generator, max_matvecs).estimate(rtol)


def krylov_top_eigenvalues(
    op: LinearOperator,
    k: int = 1,
    *,
    generator: torch.Generator,
    tol: float,
    max_matvecs: int = 200,
) -> RitzEstimate:
    """The ``k`` largest algebraic eigenvalues, counted with multiplicity, by Lanczos runs from
    independent Rademacher starts and Rayleigh–Ritz on the union of their Krylov spaces.

    Converged (see :class:`_Sequences`) when every top-``k`` residual is at most
    ``tol · max|θ|`` (the spectral scale, as in
    :func:`~deconcnn_curvature.linalg.lanczos.lanczos_top_eigenvalues`), at least two sequences
    reached the same top on their own, and each repeated value was seen by fewer sequences than
    took part. ``methods`` are all ``"lanczos"``. ``tol`` has no default here: the pyhessian
    backend's ``tol`` option declares it. Relative to the spectral scale, not to each value: the
    rounding of a float32 product is a share of ``‖A‖``, so that is the residual it can reach.
    """
    if not tol > 0:
        raise InvalidOptionError(f"tol must be > 0, got {tol}")
    empty = torch.empty(op.dim, 0, dtype=op.dtype, device=op.device)
    nothing = LowRankSketch(basis=empty, products=empty, n_matvecs=0, method="none")
    _check_refine_args(op, nothing, k, tol, max_matvecs)

    def tolerance(values: tuple[float, ...], scale: float) -> list[float]:
        return [tol * max(scale, 1e-30)] * len(values)

    return _Sequences(op, nothing, k, tolerance, generator, max_matvecs).estimate(tol)


def _check_refine_args(
    op: LinearOperator, sketch: LowRankSketch, k: int, rtol: float, max_matvecs: int
) -> None:
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


MULTIPLICITY = (
    "counted with multiplicity: the k largest eigenvalues as a dense eigvalsh lists them (a "
    "repeated eigenvalue fills as many places as its multiplicity); converged only once every "
    "repeated value but the last was seen by fewer independent Krylov sequences than took part"
)
"""The contract of every ``eigenvalues`` result, as its ``details["multiplicity"]`` states it."""

MIN_SEQUENCES = 2
"""Independent Krylov sequences that must reach the same top on their own before it is called
λ_max (with the sketch present, the sketch counts as one)."""


def copies_needed(values: tuple[float, ...], width: float) -> int:
    """Sequences needed to trust the multiplicities in ``values`` (descending, top ``k``).

    Each independent Krylov sequence adds at most one direction of an eigenspace to the union
    (its start's projection onto it), so a value seen ``c`` times is known to have multiplicity
    exactly ``c`` only once more than ``c`` sequences took part. The run of values equal to the
    ``k``-th (within ``width``) is exempt: further copies of it would fall beyond ``k``.
    """
    need, i = MIN_SEQUENCES, 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[i] - values[j + 1] <= width:
            j += 1
        if j + 1 < len(values):  # not the run that reaches the k-th value
            need = max(need, j - i + 2)
        i = j + 1
    return need


_STALLED = 0.1
"""A sequence's own Ritz pair has reached the products' rounding floor when Lanczos'
exact-arithmetic estimate ``|β s|`` is within the tolerance and below this share of the residual
measured from the stored products, while that residual still misses the tolerance: more steps of
the sequence only shrink the part of the residual it can reach (``|β s|``); the rest is the
rounding of the products (``A q`` computed in the operator's dtype is off by a share of ``‖A‖``)."""


class _Sequences:
    """Independent Krylov sequences feeding one Rayleigh–Ritz union; what ``converged`` means.

    Sequence 0 is the sketch (its own Ritz values until it is continued by Lanczos from its top
    Ritz vector) when there is one; the others start from fresh random vectors. One matvec per
    step, for one sequence: while the top ``k`` miss the test, the sequence nearest the top among
    those not yet converged on their own (a sequence converged on its own top ``k`` is never
    stepped again: it would only add rounding; when all have, another is started); then whichever
    lags the union's top, to confirm it.

    Each value ``θ_i`` of the union is certified by the smallest of its union residual and, for
    every own Ritz pair ``(t, r)`` of every sequence, ``r + |θ_i − t|`` (some eigenvalue lies
    within ``r`` of ``t``): a sequence's own basis is orthonormal, so its residuals carry the
    products' rounding once, while the union's coefficients amplify it where sequences overlap.
    Own residuals are measured from the stored products, never Lanczos' ``|β s|``.

    ``converged`` means, for the top ``k`` of the union:

    1. every residual meets ``tolerance`` (a bound on each value's distance to *an* eigenvalue);
    2. at least :data:`MIN_SEQUENCES` sequences have each converged on their own to every value
       of the union's top ``k`` (:meth:`confirms`: an own Ritz pair within the agreement width
       ``w_j = tolerance_j / share`` of ``θ_j``, with residual within ``w_j``): independent
       starts reached the same top of the spectrum. A residual cannot tell λ₂ from λ₁ (nor
       λ_{j+1} from λ_j); a sequence misses λ_j only if its start had almost no weight on it,
       and all of them doing so is the product of their (small, independent) chances;
    3. every repeated value but the last was seen by fewer sequences than took part
       (:func:`copies_needed`; more sequences are started until it holds).

    The runs stop when all hold, when the union spans the whole space (exact), after
    ``max_matvecs``, or when a sequence reached the rounding floor of the products above the
    tolerance (:data:`_STALLED`; not converged, :meth:`floor_note` says why).
    """

    def __init__(
        self,
        op: LinearOperator,
        sketch: LowRankSketch,
        k: int,
        tolerance: Callable[[tuple[float, ...], float], list[float]],
        generator: torch.Generator,
        max_matvecs: int,
    ) -> None:
        self.op, self.sketch, self.k, self.tolerance = op, sketch, k, tolerance
        self.generator, self.max_matvecs = generator, max_matvecs
        self.union = _Union(op, sketch, capacity=max_matvecs)
        self.own = sketch_top_eigenvalues(sketch, min(k, sketch.rank)) if sketch.rank else None
        self.eps = float(torch.finfo(op.dtype).eps)
        self.runs: list[_Run | None] = [None] * MIN_SEQUENCES
        self.before = op.n_matvecs
        self.methods: list[str] = []
        self.floor: float | None = None  # the residual share of max|θ| where rounding stopped it
        self.values, self.residuals = self.union_top()

    @property
    def used(self) -> int:
        return self.op.n_matvecs - self.before

    def union_top(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per index the largest of the union's, each sequence's own and the sketch's own
        Rayleigh–Ritz values (each at most λ_i, Cauchy interlacing on its subspace): in exact
        arithmetic the union's, but its coefficients amplify the products' rounding where
        sequences overlap (in float32 the union lost λ₂ and λ₃ of a distinct spectrum while
        every sequence held them). Residuals: the smallest certificate (class docstring)."""
        values, residuals = self.union.top(self.k)
        self.methods[:] = ["lanczos"] * len(values)
        if not values:
            return values, residuals
        vals, ress = list(values), list(residuals)
        owns = [self.own_pairs(i)[:2] for i in range(len(self.runs))]
        started = [o for o, run in zip(owns, self.runs, strict=True) if run is not None]
        for source, method in ((self.sketch_own(), "rayleigh_ritz"),
                               *((o, "lanczos") for o in started)):  # fmt: skip
            for i, (v, r) in enumerate(zip(*source, strict=True)):
                if v > vals[i] + 8 * self.eps * abs(v):  # beyond a few ulps of rounding
                    vals[i], ress[i], self.methods[i] = v, r, method
        for own_values, own_residuals in owns:
            for t, r in zip(own_values, own_residuals, strict=True):
                for j, v in enumerate(vals):
                    ress[j] = min(ress[j], r + abs(v - t))
        return tuple(vals), tuple(ress)

    def sketch_own(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return ((), ()) if self.own is None else (self.own.values, self.own.residuals)

    def own_pairs(self, i: int) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
        """Sequence ``i``'s own top-``k`` Ritz values, residuals and Lanczos estimates (the
        sketch's residuals are exact, so they are their own estimates; empty: not started)."""
        run = self.runs[i]
        if run is not None:
            return run.pairs(self.k)
        if i == 0 and self.own is not None:
            return self.own.values, self.own.residuals, self.own.residuals
        return (), (), ()

    def own_top(self, i: int) -> tuple[float, float]:
        """Sequence ``i``'s own top Ritz value and its residual (``-inf``: not started)."""
        values, residuals, _ = self.own_pairs(i)
        return (values[0], residuals[0]) if values else (-math.inf, math.inf)

    def settled(self, i: int) -> bool:
        """Whether sequence ``i`` has converged on its own top ``k`` (stepping it adds nothing);
        records the rounding floor when one of its pairs reached it above the tolerance."""
        values, residuals, estimates = self.own_pairs(i)
        if self.runs[i] is None or len(values) < self.k:
            return False
        tol = self.tolerance(values, self.union.scale)
        for r, e, t in zip(residuals, estimates, tol, strict=True):
            if r > t and e <= min(t, _STALLED * r):
                self.floor = max(self.floor or 0.0, r / max(self.union.scale, 1e-300))
        return self.floor is not None or all(r <= t for r, t in zip(residuals, tol, strict=True))

    def lagging(self) -> list[int] | None:
        """The sequences still to step (``[]``: converged); ``None`` while the union's residuals
        miss the test (then :meth:`refining` picks one)."""
        if not self.values:
            return None
        tol = self.tolerance(self.values, self.union.scale)
        width = tol[0] / _RESIDUAL_SHARE
        for _ in range(len(self.runs), copies_needed(self.values, width)):
            self.runs.append(None)
        if not all(r <= t for r, t in zip(self.residuals, tol, strict=True)):
            return None
        return [i for i in range(len(self.runs)) if not self.confirms(i, tol)]

    def confirms(self, i: int, tol: list[float]) -> bool:
        """Whether sequence ``i`` reached every value of the union's top ``k`` on its own: for
        each ``θ_j`` an own Ritz pair within the agreement width ``w_j = tol_j / share`` of it,
        with a residual at most ``w_j``. A residual alone cannot tell ``λ_{j+1}`` (or a mixture
        of the two) from a missed ``λ_j``; independent sequences converged on the same values
        all missed it only with the product of their small chances. (Each sees one direction of
        a repeated eigenvalue: one pair confirms every copy; :func:`copies_needed` counts them.)
        """
        values, residuals, _ = self.own_pairs(i)
        for v, t in zip(self.values, tol, strict=True):
            w = t / _RESIDUAL_SHARE
            if not any(abs(v - x) <= w and r <= w for x, r in zip(values, residuals, strict=True)):
                return False
        return True

    def refining(self) -> int:
        """The sequence to step while the top ``k`` miss the test: the one nearest its top among
        those not converged on their own (it is converging there); a new one when all have."""
        open_ = [i for i in range(len(self.runs)) if not self.settled(i)]
        if not open_:
            self.runs.append(None)
            return len(self.runs) - 1
        tops = [self.own_top(i)[0] for i in range(len(self.runs))]
        return max(open_, key=lambda i: (tops[i], -i))

    def run(self) -> bool:
        """Step until converged (``True``), out of matvecs or at the rounding floor (``False``)."""
        while True:
            lagging = self.lagging()
            if lagging == []:
                return True
            if self.union.whole:  # exact for exact products; rounded ones must meet the test
                tol = self.tolerance(self.values, self.union.scale)
                return all(r <= t for r, t in zip(self.residuals, tol, strict=True))
            if lagging is None:
                pick = self.refining()
            else:  # confirming: the one furthest from the union's top
                tops = [self.own_top(i)[0] for i in range(len(self.runs))]
                pick = min(lagging, key=lambda i: (tops[i], -i))
                self.settled(pick)  # a lagging sequence at the floor stops the runs too
            if self.used >= self.max_matvecs or self.floor is not None:
                return False
            run = self.sequence(pick)
            aq = self.op.matmat(run.q)
            run.step(aq, self.union.add(run.q, aq))
            self.values, self.residuals = self.union_top()

    def floor_note(self) -> str | None:
        """Why the runs stopped short of the tolerance when the rounding floor stopped them."""
        if self.floor is None:
            return None
        dtype = str(self.op.dtype).removeprefix("torch.")
        wider = "" if self.op.dtype == torch.float64 else (
            ", or measure in float64 (model.double() and float64 inputs)"
        )  # fmt: skip
        return (
            f"stopped at the rounding floor of {dtype} products: a Ritz residual stopped "
            f"decreasing at {self.floor:.1e} of the spectral scale max|θ|, above the tolerance "
            f"asked: a larger tolerance converges{wider}"
        )

    def sequence(self, pick: int) -> _Run:
        """The sequence ``pick``, started on first use."""
        run = self.runs[pick]
        if run is None:
            start = None
            if pick == 0 and self.sketch.rank:
                start = _ritz_pairs(self.sketch)[1][:, : self.k].sum(dim=1, keepdim=True)
            run = self.runs[pick] = _Run(self.op, self.generator, self.union, start=start)
        return run

    def estimate(self, rtol: float) -> RitzEstimate:
        done = self.run()
        if len(self.values) < self.k:
            raise InvalidOptionError(
                f"only {self.union.rank} directions were found within "
                f"max_matvecs={self.max_matvecs}, fewer than k={self.k}; raise max_matvecs"
            )
        return RitzEstimate(
            values=self.values,
            residuals=self.residuals,
            methods=tuple(self.methods),
            n_matvecs=self.used,
            converged=done,
            rtol=rtol,
            sequences=sum(
                run is not None or (i == 0 and self.own is not None)
                for i, run in enumerate(self.runs)
            ),
            note=None if done else self.floor_note(),
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
        self.scale = 0.0  # max |θ| over the union's Ritz values (the spectral scale seen)

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
        self.scale = float(theta.abs().max())
        g = self.coef @ u.flip(1)[:, :k]
        theta, res = self.rayleigh(g)
        order = torch.argsort(theta, descending=True)
        return tuple(float(theta[i]) for i in order), tuple(float(res[i]) for i in order)

    def rayleigh(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For the vectors ``y = raw @ g``: Rayleigh quotients and residual norms per unit ``y``,
        from the vectors and the stored products themselves (a Rayleigh quotient is never above
        λ₁, however ``g`` was rounded)."""
        y = self._raw_mul(g)
        ay = self._raw_mul(g, products=True)
        yy = (y * y).to(torch.float64).sum(dim=0)
        theta = (y * ay).to(torch.float64).sum(dim=0) / yy
        res = torch.linalg.vector_norm((ay - y * theta.to(y.dtype)).to(torch.float64), dim=0)
        return theta, res / yy.sqrt()


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
        self._pairs: tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]] | None = None

    def _fresh(self) -> torch.Tensor:
        w = rademacher(self.op.dim, 1, generator=self.generator, dtype=self.op.dtype,
                       device=self.op.device)  # fmt: skip
        for _ in range(2):
            w = self.union.deflate(w, self.columns)
        return w / torch.linalg.vector_norm(w)

    def step(self, aq: torch.Tensor, column: int) -> None:
        """Record ``A q`` for the current ``q`` (already in the union as ``column``), move on."""
        self.columns.append(column)
        self._pairs = None
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

    def pairs(self, k: int) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
        """This sequence's own top-``k`` Ritz values (descending; fewer while it has fewer
        vectors), their residuals ``‖(AL)u − θ Lu‖`` from the stored products, and Lanczos'
        exact-arithmetic estimates ``|β s|`` of them. Rayleigh–Ritz on the sequence's own
        orthonormal vectors ``L``: the products' rounding enters its residuals once."""
        if self._pairs is None:
            union, m = self.union, len(self.columns)
            at = torch.tensor([union.r + c for c in self.columns], device=union.coef.device)
            small = union.projected_raw[at][:, at]
            _, u = torch.linalg.eigh((small + small.T) / 2)
            g = torch.zeros(union.r + union.count, min(k, m), dtype=torch.float64,
                            device=union.coef.device)  # fmt: skip
            g[at] = u.flip(1)[:, : g.shape[1]]
            theta, res = union.rayleigh(g)
            estimates = ritz(LanczosState(union.new[:, :0], self.alphas, self.betas))[2]
            order = torch.argsort(theta, descending=True)
            est = estimates.flip(0)[: g.shape[1]]  # in the columns' order, as theta and res
            self._pairs = (
                tuple(float(theta[i]) for i in order),
                tuple(float(res[i]) for i in order),
                tuple(float(est[i]) for i in order),
            )
        return self._pairs
