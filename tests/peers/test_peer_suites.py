"""The peers' own test problems (curvlinops' ``test/cases.py`` and ``test/kfac_cases.py``,
BackPACK's DiagHessian settings; rebuilt in :mod:`peers.peer_cases`) against dense Hessians.

For every measured case:

- BackPACK's trace and diagonal equal the dense ones (``assert_close``), or the backend refuses
  with the reason the case table states (and, for average pooling, float32 is exact);
- the trace intervals of ``pyhessian`` and ``hutchpp`` cover the exact trace on at least 2 of 4
  seeds (at the nominal 95 % level a miss on 3 or 4 seeds has probability 5e-4);
- every top-3 eigenvalue result marked converged equals the dense ``eigvalsh`` values (counted
  with multiplicity) within 1e-3·|λ_max|, and every result lies inside the spectrum;
- after each call the model is exactly as handed over (mode, parameters, ``requires_grad``,
  ``.grad``, buffers, RNG states).

Sum-reduced recipes are refused by every backend with the package's message (``backpack`` checks
the model's layers first, so a model it cannot handle is refused for that reason instead). The
dense reference itself is checked by finite differences on a few cases. One case per suite and
estimator runs in the quick tier; the rest is marked ``slow``.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any

import pytest
import torch
from peers.peer_cases import (
    ALL_CASES,
    BP_BCE,
    BP_MSE_ND,
    MEASURED,
    SUM_REDUCED,
    PeerCase,
    by_id,
)
from peers.reference import (
    assert_unchanged,
    dense,
    finite_difference_check,
    float32,
    in_flight,
    snapshot,
)

import deconcnn_curvature as dcc

QUICK = {"cl-mlp-ce", "cl-dict-mse", "kf-single-linear-3out-mse", "bp-pad-constant1-ce"}
SEEDS = (0, 1, 2, 3)
MIN_COVERED = 2
K = 3
EIG_RTOL = 1e-3
#: BackPACK refusals that need the model's output, so come after the loss's reduction is checked.
AT_COMPUTE = (BP_BCE, BP_MSE_ND)


#: Disagreements with the dense Hessian found by these tests on the current backends, each with
#: what was measured (docs/peers.md). Non-strict: a fix makes them pass.
KNOWN: dict[tuple[str, str, str], str] = {
    ("bp-ConvTranspose3d-2-3-2-2-2-0-1-True-2-as-mean", "pyhessian", "trace"): (
        "pyhessian's t-interval under-covers when one eigenvalue carries most of the trace "
        "(0.124 of 0.161, skewed probe values): 51 of seeds 0-59 cover at the nominal 95 %, "
        "1 of seeds 0-3"
    ),
}


def _cases(cases: list[PeerCase], quick: set[str] = QUICK) -> list[Any]:
    return [
        pytest.param(c.id, id=c.id, marks=() if c.id in quick else pytest.mark.slow) for c in cases
    ]


def _with_backends(cases: list[PeerCase], quantity: str) -> list[Any]:
    params = []
    for c in cases:
        for backend in ("pyhessian", "hutchpp"):
            marks = [] if c.id in QUICK else [pytest.mark.slow]
            reason = KNOWN.get((c.id, backend, quantity))
            if reason is not None:
                marks.append(pytest.mark.xfail(strict=False, reason=reason))
            params.append(pytest.param(c.id, backend, id=f"{c.id}-{backend}", marks=marks))
    return params


@functools.cache
def exact(case_id: str) -> torch.Tensor:
    return dense(by_id(case_id))


def measure(case: PeerCase, quantity: str, backend: str, **options: Any) -> dcc.CurvatureResult:
    """One call as a user makes it, on the model as a training loop holds it; the model must be
    exactly as before afterwards."""
    model, loss_fn, batches = case.make()
    in_flight(model)
    before = snapshot(model)
    try:
        return dcc.estimate(model, loss_fn, batches, quantity, backend=backend, **options)
    finally:  # refusals included
        assert_unchanged(model, before)


def test_every_peer_recipe_is_in_the_table() -> None:
    counts = Counter(c.source for c in ALL_CASES)
    assert counts == {
        "curvlinops cases.py": 21,
        "curvlinops kfac_cases.py": 30,
        "BackPACK DiagHessian": 87,
    }
    assert len({c.id for c in [*ALL_CASES, *MEASURED]}) == len(ALL_CASES) + len(MEASURED) - len(
        [c for c in MEASURED if c in ALL_CASES]
    )
    assert (len(SUM_REDUCED), len(MEASURED)) == (80, 117)


# -- the reference -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case_id", ["cl-mlp-bce-1out-soft", "kf-conv-reduce-mse", "bp-pad-constant1-ce", "cl-seq-ce"]
)
def test_dense_reference_matches_finite_differences(case_id: str) -> None:
    finite_difference_check(by_id(case_id), exact(case_id))


# -- sum-reduced losses ------------------------------------------------------------------------
@pytest.mark.parametrize("case_id", _cases(SUM_REDUCED, {c.id for c in SUM_REDUCED}))
def test_sum_reduced_recipe_is_refused_by_every_backend(case_id: str) -> None:
    case = by_id(case_id)
    reduction = r"has reduction='sum'; curvature is defined for the mean loss"
    for backend in ("pyhessian", "hutchpp", "backpack"):
        model, loss_fn, batches = case.make()
        before = snapshot(in_flight(model))
        static = case.backpack is not None and case.backpack not in AT_COMPUTE
        pattern = case.backpack if backend == "backpack" and static else reduction
        with pytest.raises(dcc.CurvatureError, match=pattern):
            dcc.estimate(model, loss_fn, batches, backend=backend, seed=0)
        assert_unchanged(model, before)


# -- BackPACK: exact, or refused with the reason ----------------------------------------------
@pytest.mark.parametrize("case_id", _cases(MEASURED))
def test_backpack_equals_the_dense_hessian_or_refuses_with_the_reason(case_id: str) -> None:
    case = by_id(case_id)
    h = exact(case_id)
    if case.backpack is not None:
        with pytest.raises(dcc.UnsupportedModelError, match=case.backpack) as err:
            measure(case, "trace", "backpack")
        assert "backend='pyhessian'" in str(err.value)
    else:
        scale = float(h.diagonal().abs().max())
        tr = measure(case, "trace", "backpack")
        torch.testing.assert_close(tr.value, float(h.trace()), rtol=1e-10, atol=1e-12 * scale)
        dg = measure(case, "diagonal", "backpack")
        got = torch.cat([d.reshape(-1) for d in dg.value.values()])
        torch.testing.assert_close(got, h.diagonal(), rtol=1e-9, atol=1e-12 * scale)
    if case.backpack_f32:
        model, loss_fn, batches = float32(case)
        r = dcc.estimate(model, loss_fn, batches, backend="backpack")
        torch.testing.assert_close(r.value, float(h.trace()), rtol=1e-4, atol=1e-6)


# -- stochastic trace: intervals cover the exact trace ----------------------------------------
@pytest.mark.parametrize(("case_id", "backend"), _with_backends(MEASURED, "trace"))
def test_trace_intervals_cover_the_exact_trace(case_id: str, backend: str) -> None:
    case = by_id(case_id)
    h = exact(case_id)
    true = float(h.trace())
    slack = 1e-9 * max(float(h.diagonal().abs().sum()), 1e-12)
    covered, shown = 0, []
    for seed in SEEDS:
        r = measure(case, "trace", backend, seed=seed)
        lo, hi = r.ci
        covered += lo - slack <= true <= hi + slack
        shown.append(f"seed {seed}: {r.value:.6g} [{lo:.6g}, {hi:.6g}]")
    assert covered >= MIN_COVERED, f"exact {true:.6g}; " + "; ".join(shown)


# -- top eigenvalues ----------------------------------------------------------------------------
def _close(got: list[float], want: list[float], tol: float) -> bool:
    return len(got) <= len(want) and all(abs(g - w) <= tol for g, w in zip(got, want, strict=False))


@pytest.mark.parametrize(("case_id", "backend"), _with_backends(MEASURED, "eigenvalues"))
def test_converged_top_eigenvalues_equal_the_dense_ones(case_id: str, backend: str) -> None:
    case = by_id(case_id)
    spectrum = torch.linalg.eigvalsh(exact(case_id)).flip(0)
    k = min(K, spectrum.numel())
    tol = EIG_RTOL * float(spectrum.abs().max()) + 1e-12
    r = measure(case, "eigenvalues", backend, seed=0, k=k)
    got = [float(v) for v in r.value]
    assert len(got) == k
    # Ritz values of a symmetric matrix lie inside its spectrum, converged or not.
    assert all(float(spectrum[-1]) - tol <= v <= float(spectrum[0]) + tol for v in got), got
    if not r.details["converged"]:
        return
    with_multiplicity = spectrum[:k].tolist()
    if _close(got, with_multiplicity, tol):
        return
    pytest.fail(f"converged {got} but dense top-{k} is {with_multiplicity}")
