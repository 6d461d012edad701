"""Eigenvalues by Rayleigh–Ritz on the Hutch++ sketch and its Lanczos refinement, on dense
matrices with known spectra (:mod:`deconcnn_curvature.linalg.ritz`)."""

from __future__ import annotations

import math

import pytest
import torch
from spectra import F64
from spectra import gen as _gen
from spectra import spectrum as _spectrum
from spectra import with_spectrum as _with_spectrum

from deconcnn_curvature.linalg.hutchpp import LowRankSketch, hutchpp_with_sketch
from deconcnn_curvature.linalg.operator import DenseOperator, make_generator
from deconcnn_curvature.linalg.ritz import (
    MIN_SEQUENCES,
    copies_needed,
    krylov_top_eigenvalues,
    refined_top_eigenvalues,
    sketch_top_eigenvalues,
)

# ------------------------------------------------------------------------------------------------
# Eigenvalues from the sketch


def test_sketch_ritz_values_and_residuals_are_exact_and_free():
    eigs = _spectrum("outliers", 400)
    a = _with_spectrum(eigs)
    op = DenseOperator(a)
    res = hutchpp_with_sketch(op, 30, generator=make_generator(0, "cpu"))
    q, aq = res.sketch.basis, res.sketch.products
    torch.testing.assert_close(q.T @ q, torch.eye(q.shape[1], dtype=F64), atol=1e-10, rtol=0)
    torch.testing.assert_close(aq, a @ q)
    spent = op.n_matvecs
    ritz = sketch_top_eigenvalues(res.sketch, 3, rtol=1e-3)
    assert op.n_matvecs == spent and ritz.n_matvecs == 0
    assert ritz.methods == ("rayleigh_ritz",) * 3
    top = torch.sort(eigs, descending=True).values
    theta, u = torch.linalg.eigh(q.T @ a @ q)
    for i in range(3):
        y = q @ u[:, -1 - i]
        torch.testing.assert_close(
            torch.tensor(ritz.residuals[i], dtype=F64),
            torch.linalg.vector_norm(a @ y - theta[-1 - i] * y),
        )
        assert ritz.values[i] <= float(top[i]) + 1e-9  # Cauchy interlacing
        assert abs(ritz.values[i] - float(top[i])) <= ritz.residuals[i] + 1e-9
    assert ritz.converged is True
    assert abs(ritz.values[0] - float(top[0])) <= 1e-6 * float(top[0])


def test_refinement_improves_on_a_rough_sketch():
    eigs = _spectrum("flat", 300)
    a = _with_spectrum(eigs)
    op = DenseOperator(a)
    res = hutchpp_with_sketch(op, 20, generator=make_generator(0, "cpu"), sketch_fraction=2 / 3)
    before = op.n_matvecs
    rough = sketch_top_eigenvalues(res.sketch, rtol=1e-4)
    assert rough.converged is False
    ref = refined_top_eigenvalues(
        op, res.sketch, rtol=1e-4, generator=make_generator(1, "cpu"), max_matvecs=80
    )
    assert ref.n_matvecs == op.n_matvecs - before > 0
    assert ref.methods == ("lanczos",)
    assert ref.residuals[0] < rough.residuals[0]
    assert abs(ref.values[0] - float(eigs.max())) <= ref.residuals[0] + 1e-9


def test_a_converged_sketch_is_still_checked_by_an_independent_run():
    # Behaviour changed: a sketch whose residual meets rtol used to be returned with no
    # matvecs, which passed λ₂ off as λ_max. Now an independent Lanczos run must agree first.
    eigs = _spectrum("outliers", 300)
    op = DenseOperator(_with_spectrum(eigs))
    easy = hutchpp_with_sketch(op, 30, generator=make_generator(0, "cpu"))
    assert sketch_top_eigenvalues(easy.sketch, rtol=1e-2).converged is True
    before = op.n_matvecs
    ref = refined_top_eigenvalues(op, easy.sketch, rtol=1e-2, generator=make_generator(0, "cpu"))
    assert ref.converged is True and ref.methods == ("lanczos",)
    assert ref.n_matvecs == op.n_matvecs - before > 0
    assert abs(ref.values[0] - float(eigs.max())) <= 1e-2 * float(eigs.max())
    # Only a sketch that spans the whole space is exact and needs no check.
    small = _with_spectrum(_spectrum("outliers", 20))
    whole = hutchpp_with_sketch(DenseOperator(small), 30, generator=make_generator(0, "cpu"))
    op2 = DenseOperator(small)
    exact = refined_top_eigenvalues(
        op2, whole.sketch, rtol=1e-9, generator=make_generator(0, "cpu")
    )
    assert exact.n_matvecs == op2.n_matvecs == 0 and exact.methods == ("rayleigh_ritz",)
    assert exact.values[0] == pytest.approx(float(torch.linalg.eigvalsh(small)[-1]), rel=1e-12)


def test_trace_within_5_percent_and_lambda_max_within_1_percent_in_40_matvecs():
    eigs = _spectrum("outliers", 600)
    a, exact, lam = _with_spectrum(eigs), float(eigs.sum()), float(eigs.max())
    for seed in range(20):
        op = DenseOperator(a)
        res = hutchpp_with_sketch(op, 30, generator=make_generator(seed, "cpu"))
        top = refined_top_eigenvalues(
            op, res.sketch, rtol=1e-2, generator=make_generator(seed, "cpu"), max_matvecs=10
        )
        assert op.n_matvecs <= 40
        assert abs(res.trace.value - exact) <= 0.05 * exact
        assert abs(top.values[0] - lam) <= 0.01 * lam


def _close_gap_case(seed: int) -> tuple[torch.Tensor, float, float]:
    """A symmetric matrix whose top two eigenvalues are 1 and 1 − gap (gap 0.1 %–5 %, log-uniform)
    over one of four bulks (uniform, narrow, a few mid outliers, large negative eigenvalues)."""
    g = _gen(10_000 + seed)
    n = int(torch.randint(40, 200, (1,), generator=g))
    gap = math.exp(math.log(1e-3) + math.log(50) * float(torch.rand(1, generator=g)))
    kind = seed % 4
    if kind == 0:
        bulk = 0.9 * torch.rand(n - 2, generator=g, dtype=F64) - 0.2
    elif kind == 1:
        bulk = 0.05 * torch.randn(n - 2, generator=g, dtype=F64)
    elif kind == 2:
        mid = 0.5 * torch.rand(5, generator=g, dtype=F64) + 0.3
        bulk = torch.cat([mid, 0.02 * torch.randn(n - 7, generator=g, dtype=F64)])
    else:
        neg = -1.5 * torch.rand(3, generator=g, dtype=F64)
        bulk = torch.cat([neg, 0.1 * torch.randn(n - 5, generator=g, dtype=F64)])
    eigs = torch.cat([torch.tensor([1.0, 1.0 - gap], dtype=F64), bulk])
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    a = (u * eigs) @ u.T
    return (a + a.T) / 2, 1.0, gap


@pytest.mark.slow
def test_close_gaps_never_pass_the_second_eigenvalue_off_as_converged_lambda_max():
    # Guarded: Rayleigh–Ritz on the sketch (or Lanczos from its top Ritz vector) converged to λ₂
    # with a small residual and was reported as λ_max: 29 of these 500 seeds before the fix.
    rtol, wrong, converged, gaps_resolved = 1e-3, [], 0, 0
    for seed in range(500):
        a, top, gap = _close_gap_case(seed)
        op = DenseOperator(a)
        gen = make_generator(seed, "cpu")
        sketch = hutchpp_with_sketch(op, 30, generator=gen).sketch
        est = refined_top_eigenvalues(op, sketch, rtol=rtol, generator=gen, max_matvecs=40)
        assert est.values[0] <= top + 1e-12  # a Ritz value never exceeds λ_max
        if est.converged:
            converged += 1
            if abs(est.values[0] - top) > rtol * top:
                wrong.append((seed, gap, est.values[0], est.residuals[0]))
            gaps_resolved += gap > rtol
    assert wrong == []
    assert converged >= 490, converged  # the check is not passed by never converging
    assert gaps_resolved >= 400


@pytest.mark.slow
def test_close_gaps_below_the_top_never_pass_lambda_j_plus_1_off_as_converged_lambda_j() -> None:
    """Top-3 of 300 spectra whose top four are 0-5 % apart, at a loose tol 1e-2: every value
    called converged is the j-th largest within 10 x tol of the scale. Guarded: only λ₁ needed
    two sequences' agreement, and 4 of these 300 reported λ₄ (or a λ₃/λ₄ mixture) as a
    converged λ₃ (seed 56: 8.94 for 9.29)."""
    tol, k, wrong, converged = 1e-2, 3, [], 0
    for seed in range(300):
        g = _gen(seed)
        head = [10.0]
        for gap in (torch.rand(k, generator=g, dtype=F64) * 0.05).tolist():
            head.append(head[-1] * (1 - gap))
        rest = 8 * torch.rand(120 - len(head), generator=g, dtype=F64)
        eigs = torch.cat([torch.tensor(head, dtype=F64), rest])
        exact = eigs.sort(descending=True).values[:k]
        est = krylov_top_eigenvalues(
            DenseOperator(_with_spectrum(eigs, seed)),
            k,
            generator=make_generator(seed, "cpu"),
            tol=tol,
            max_matvecs=200,
        )
        if est.converged:
            converged += 1
            err = max(abs(v - float(e)) for v, e in zip(est.values, exact, strict=True))
            if err > tol * 10.0:
                wrong.append((seed, est.values, exact.tolist()))
    assert wrong == []
    assert converged >= 290, converged  # the check is not passed by never converging


def test_refinement_on_close_gaps_within_a_small_cap_is_honest():
    # With only 20 extra matvecs some runs stop unconverged; none is wrong and converged, and the
    # unconverged values are still lower bounds on λ_max.
    for seed in range(0, 200, 3):
        a, top, _ = _close_gap_case(seed)
        op = DenseOperator(a)
        gen = make_generator(seed, "cpu")
        sketch = hutchpp_with_sketch(op, 30, generator=gen).sketch
        est = refined_top_eigenvalues(op, sketch, rtol=1e-3, generator=gen, max_matvecs=20)
        assert est.n_matvecs <= 20 and est.values[0] <= top + 1e-12
        if est.converged:
            assert abs(est.values[0] - top) <= 1e-3 * top, seed


def test_refinement_stays_accurate_when_the_union_nears_the_whole_space():
    # Products of the union's basis come from the operator's own products, never from earlier
    # derived ones (which compounded rounding to a value of 1e14 on this 55-dimensional case).
    a, top, _ = _close_gap_case(349)
    assert a.shape[0] == 55
    op = DenseOperator(a)
    gen = make_generator(349, "cpu")
    sketch = hutchpp_with_sketch(op, 30, generator=gen).sketch
    est = refined_top_eigenvalues(op, sketch, rtol=1e-3, generator=gen, max_matvecs=40)
    assert est.converged is True and abs(est.values[0] - top) <= 1e-9


def test_float32_refinement_is_a_lower_bound_and_converges():
    eigs = _spectrum("outliers", 200)
    a = _with_spectrum(eigs).to(torch.float32)
    op = DenseOperator(a)
    gen = make_generator(0, "cpu")
    sketch = hutchpp_with_sketch(op, 30, generator=gen).sketch
    est = refined_top_eigenvalues(op, sketch, 2, rtol=1e-3, generator=gen, max_matvecs=40)
    top = torch.sort(eigs, descending=True).values[:2]
    assert est.converged is True
    torch.testing.assert_close(torch.tensor(est.values, dtype=F64), top, rtol=1e-3, atol=0)
    for seed in range(10):  # never below the sketch's own value, even after float32 rounding
        gen = make_generator(seed, "cpu")
        sketch = hutchpp_with_sketch(op, 30, generator=gen).sketch
        own = sketch_top_eigenvalues(sketch, 2)
        est = refined_top_eigenvalues(op, sketch, 2, rtol=1e-3, generator=gen, max_matvecs=40)
        ulps = 8 * float(torch.finfo(torch.float32).eps)
        assert all(e >= o - ulps * abs(o) for e, o in zip(est.values, own.values, strict=True))


def test_k_larger_than_the_sketch_is_rejected():
    sketch = LowRankSketch(
        basis=torch.eye(5, 2, dtype=F64),
        products=torch.eye(5, 2, dtype=F64),
        n_matvecs=2,
        method="x",
    )
    with pytest.raises(ValueError, match="rank of the sketch"):
        sketch_top_eigenvalues(sketch, 3)


def test_sketch_eigenvalues_converge_relative_to_each_value() -> None:
    # The Hutch++ routines call the shared rule (ritz_converged) with a floor of 1e-12·|θ_1|: a
    # small second value must meet rtol against its own size, not against θ_1.
    a = torch.diag(torch.tensor([5.0, 0.01, 1.0], dtype=torch.float64))
    q2 = torch.tensor([0.0, 1.0, 0.01], dtype=torch.float64)
    basis = torch.stack([torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), q2 / q2.norm()], 1)
    sketch = LowRankSketch(basis=basis, products=a @ basis, n_matvecs=2, method="test")
    one = sketch_top_eigenvalues(sketch, 1, rtol=0.01)
    two = sketch_top_eigenvalues(sketch, 2, rtol=0.01)
    assert one.converged is True and one.values[0] == pytest.approx(5.0, rel=1e-15)
    assert two.converged is False
    assert 0.01 * 5.0 > two.residuals[1] > 0.01 * abs(two.values[1])


# ------------------------------------------------------------------------------------------------
# Repeated eigenvalues: counted with multiplicity, and converged only once that is known


def test_copies_needed_asks_for_one_more_sequence_than_copies_seen() -> None:
    assert copies_needed((5.0,), 1e-6) == MIN_SEQUENCES
    assert copies_needed((5.0, 4.0, 3.0), 1e-6) == MIN_SEQUENCES
    assert copies_needed((5.0, 5.0, 4.0), 1e-6) == 3  # two copies seen: is there a third?
    assert copies_needed((5.0, 5.0, 5.0), 1e-6) == MIN_SEQUENCES  # the k-th run: exempt
    assert copies_needed((6.0, 5.0, 5.0, 5.0, 4.0), 1e-6) == 4
    assert copies_needed((5.0, 5.0 - 1e-9, 4.0), 1e-6) == 3  # within the width: one value


def _repeated(n: int = 120, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    top = torch.tensor([9.0, 9.0, 9.0, 7.0, 7.0, 5.0], dtype=F64)
    eigs = torch.cat([top, torch.rand(n - 6, generator=g, dtype=F64)])
    return _with_spectrum(eigs, seed), eigs.sort(descending=True).values


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 2, 3, 5, 6])
def test_repeated_eigenvalues_come_with_their_multiplicity(seed: int, k: int) -> None:
    a, eigs = _repeated(seed=seed)
    expected = eigs[:k]
    gen = make_generator(seed, "cpu")
    plain = krylov_top_eigenvalues(DenseOperator(a), k, generator=gen, tol=1e-8, max_matvecs=300)
    run = hutchpp_with_sketch(DenseOperator(a), 30, generator=gen)
    refined = refined_top_eigenvalues(
        DenseOperator(a), run.sketch, k, rtol=1e-6, generator=gen, max_matvecs=300
    )
    for est in (plain, refined):
        assert est.converged is True
        torch.testing.assert_close(torch.tensor(est.values, dtype=F64), expected, rtol=1e-6, atol=0)
        assert est.sequences >= copies_needed(est.values, 1e-6)


def test_a_cap_too_small_to_see_every_copy_is_not_called_converged() -> None:
    a, eigs = _repeated()
    for cap in (10, 20, 30, 40):
        est = krylov_top_eigenvalues(
            DenseOperator(a), 4, generator=make_generator(1, "cpu"), tol=1e-8, max_matvecs=cap
        )
        right = torch.allclose(torch.tensor(est.values, dtype=F64), eigs[:4], rtol=1e-6, atol=0)
        assert right or est.converged is False, (cap, est)


# ------------------------------------------------------------------------------------------------
# Products with rounding (a float32 network's Hessian-vector products, emulated in float64)


class _RoundedOperator(DenseOperator):
    """A dense matrix whose every product is off by ``noise · ‖A‖₂ · ‖v‖`` in a random direction,
    as a float32 product of a real network is off by a share of ``‖H‖``: no residual measured from
    these products gets much below ``noise · ‖A‖₂``."""

    def __init__(self, matrix: torch.Tensor, noise: float, seed: int = 0) -> None:
        super().__init__(matrix)
        self.noise = noise * float(torch.linalg.matrix_norm(matrix, 2))
        self.g = _gen(seed)

    def matmat(self, v: torch.Tensor) -> torch.Tensor:
        e = torch.randn(v.shape, generator=self.g, dtype=v.dtype)
        e = e / torch.linalg.vector_norm(e, dim=0) * torch.linalg.vector_norm(v, dim=0)
        return super().matmat(v) + self.noise * e


def _distinct(n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    eigs = torch.cat([torch.tensor([10.0, 8.0, 7.0, 6.5], dtype=F64),
                      3 * torch.rand(n - 4, generator=_gen(5), dtype=F64)])  # fmt: skip
    return _with_spectrum(eigs, 3), eigs.sort(descending=True).values


@pytest.mark.parametrize("seed", range(3))
def test_top3_with_rounded_products_converges_without_stepping_a_converged_sequence(
    seed: int,
) -> None:
    """With products rounded at 1e-5 of ‖A‖, the union's residuals for values 2..k grow as
    sequences overlap; the sequences' own pairs still certify them, so a tol above the rounding
    converges well inside the cap (it once spent the whole cap, stepping a converged sequence)."""
    a, eigs = _distinct()
    op = _RoundedOperator(a, 1e-5, seed)
    est = krylov_top_eigenvalues(op, 3, generator=make_generator(seed, "cpu"), tol=1e-4,
                                 max_matvecs=400)  # fmt: skip
    assert est.converged is True and est.note is None
    assert est.n_matvecs <= 150, est
    assert est.sequences >= MIN_SEQUENCES
    torch.testing.assert_close(torch.tensor(est.values, dtype=F64), eigs[:3], rtol=0, atol=1e-3)


@pytest.mark.parametrize("k", [1, 3])
def test_a_tol_below_the_rounding_of_the_products_stops_early_and_says_so(k: int) -> None:
    """Residuals stop decreasing at the products' rounding (1e-5 of ‖A‖): a tol of 1e-8 can never
    be met, so the runs stop once Lanczos' own estimate shows it, unconverged, with a note; the
    values are still within their residuals of the true ones."""
    a, eigs = _distinct()
    op = _RoundedOperator(a, 1e-5)
    est = krylov_top_eigenvalues(op, k, generator=make_generator(0, "cpu"), tol=1e-8,
                                 max_matvecs=300)  # fmt: skip
    assert est.converged is False
    assert est.n_matvecs < 100, est
    assert est.note is not None and "rounding floor" in est.note and "float64" in est.note
    floor = float(est.note.split("decreasing at ")[1].split(" ")[0])
    assert 1e-6 <= floor <= 1e-3, est.note
    for value, residual, exact in zip(est.values, est.residuals, eigs[:k], strict=True):
        assert abs(value - float(exact)) <= residual + 1e-12
    exact_products = krylov_top_eigenvalues(
        DenseOperator(a), k, generator=make_generator(0, "cpu"), tol=1e-8, max_matvecs=300
    )
    assert exact_products.converged is True and exact_products.note is None


def test_the_refined_sketch_stops_at_the_rounding_floor_too() -> None:
    """The Hutch++ refinement shares the stopping rule: rtol 1e-9 under products rounded at 1e-5
    of ‖A‖ stops well inside the cap with the note; rtol 1e-3 converges to the true top."""
    a, eigs = _distinct()
    gen = make_generator(0, "cpu")
    op = _RoundedOperator(a, 1e-5)
    sketch = hutchpp_with_sketch(op, 30, generator=gen).sketch
    stuck = refined_top_eigenvalues(op, sketch, 2, rtol=1e-9, generator=gen, max_matvecs=300)
    assert stuck.converged is False and stuck.n_matvecs < 100, stuck
    assert stuck.note is not None and "rounding floor" in stuck.note
    fine = refined_top_eigenvalues(op, sketch, 2, rtol=1e-3, generator=gen, max_matvecs=300)
    assert fine.converged is True and fine.note is None
    torch.testing.assert_close(torch.tensor(fine.values, dtype=F64), eigs[:2], rtol=1e-3, atol=0)
