"""The default backend: PyHessian's Hessian-vector products, with its measured defects fixed.

PyHessian 0.1's ``hessian`` class is *not* used: its constructor switches the model to eval mode
for good, writes graph-carrying tensors into every ``.grad`` (``backward(create_graph=True)``) and
hard-codes ``'cuda'``. We build the same gradient graph without touching ``.grad`` and multiply
through ``pyhessian.utils.hessian_vector_product`` (see :mod:`deconcnn_curvature.hvp`). The
estimators replace PyHessian's:

- ``trace``: Hutchinson with the full probe budget, a mean with its standard error and Student-t
  interval; ``rtol`` is an error bound (interval half-width ≤ rtol·|trace|), not PyHessian's
  "the running mean moved less than tol" (which stops after two probes on a negative trace).
- ``eigenvalues``: Lanczos with full reorthogonalisation for the **largest algebraic** eigenvalues
  (PyHessian's power iteration finds the largest magnitude, to 0.5–4.5 % at its defaults), counted
  with multiplicity: runs from independent random starts joined by Rayleigh–Ritz, converged only
  when two of them reached the same top on their own and every repeated value was seen by fewer
  runs than took part (:func:`~deconcnn_curvature.linalg.ritz.krylov_top_eigenvalues`).
- ``density``: stochastic Lanczos quadrature with ``torch.linalg.eigh`` (PyHessian's calls the
  removed ``torch.eig``). It reports no trace: ``dim · Σ w θ`` is the mean of one Hutchinson
  sample ``zᵀHz`` per run (``details["probe_quadratic_forms"]``), each costing ``lanczos_steps``
  HVPs, so at a few runs its spread is unknowable and at enough runs it costs ~``lanczos_steps``
  times the ``trace`` quantity for the same error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deconcnn_curvature.backend import Backend, Option
from deconcnn_curvature.backends.common import (
    COMMON_OPTIONS,
    PYHESSIAN_INSTALL,
    PYHESSIAN_REQUIRES,
    TOP_K_OPTION,
    check_finite,
    ci_level_option,
    krylov_setup,
)
from deconcnn_curvature.backends.groups import (
    DATA_GROUP_OPTIONS,
    DataGroupsMixin,
    check_population,
    grouped_problem,
)
from deconcnn_curvature.backends.progress import listener
from deconcnn_curvature.hookspecs import hookimpl
from deconcnn_curvature.linalg.hutchinson import hutchinson
from deconcnn_curvature.linalg.ritz import MULTIPLICITY, krylov_top_eigenvalues
from deconcnn_curvature.linalg.slq import slq_density
from deconcnn_curvature.linalg.two_way import grouped_hutchinson
from deconcnn_curvature.problem import CurvatureProblem
from deconcnn_curvature.results import CurvatureResult

__all__ = ["SLQ_TRACE_NOTE", "PyHessianBackend", "register_backends"]

#: What a density result says about the trace (it gives none).
SLQ_TRACE_NOTE = (
    "not estimated from SLQ: each run is a single probe zᵀHz costing lanczos_steps HVPs; "
    "measure the trace with quantity='trace' (deconcnn-curv estimate -q trace)"
)

_T = frozenset({"trace"})
_E = frozenset({"eigenvalues"})
_D = frozenset({"density"})


def _hutchinson_args(
    op: Any, generator: Any, problem: CurvatureProblem, options: Mapping[str, Any]
) -> dict[str, Any]:
    """The trace options as the arguments of :func:`hutchinson` and :func:`grouped_hutchinson`
    (the same probes, budget and stop rule with or without data groups)."""
    return {
        "num_matvecs": options["num_hvps"],
        "generator": generator,
        "block_size": op.probe_batch,
        "rtol": options["rtol"],
        "min_matvecs": options["min_hvps"],
        "ci_level": options["ci_level"],
        "layer_slices": problem.slices(),
        "on_product": listener(),
    }


class PyHessianBackend(DataGroupsMixin, Backend):
    name = "pyhessian"
    description = "PyHessian HVPs; Hutchinson trace, Lanczos eigenvalues, SLQ density (default)"
    quantities = frozenset({"trace", "eigenvalues", "density"})
    exact = False
    requires = PYHESSIAN_REQUIRES
    install_hint = PYHESSIAN_INSTALL
    supports_distributed = True
    options = (
        Option(
            "num_hvps",
            int,
            100,
            "Hutchinson probe budget (the cap when rtol is set)",
            min=2,
            quantities=_T,
            budget=True,
        ),
        Option(
            "rtol",
            float,
            None,
            "stop when the confidence-interval half-width is at most rtol·|trace|",
            min=0,
            min_exclusive=True,
            allow_none=True,
            quantities=_T,
        ),
        Option(
            "min_hvps", int, 10, "probes before the rtol rule is consulted", min=2, quantities=_T
        ),
        ci_level_option(_T),
        TOP_K_OPTION,
        # 1e-3, PyHessian's own eigenvalue tol: float32 products of a ResNet stop the residual
        # at 1e-5..1e-4 of max|θ| (their rounding), so 1e-5 spent the whole max_hvps unconverged
        # and 1e-4 sits at the floor; at 1e-3 the demo checkpoint converged in 10 products, the
        # value 3.3e-6 from the float64 reference as at 1e-5 (benchmarks/eig_tolerance.py).
        Option(
            "tol",
            float,
            1e-3,
            "converged when each top-k Ritz residual is at most tol·max|θ| (spectral scale) and "
            "two independent Lanczos runs reached the same λ_max on their own; a tol below the "
            "rounding floor of the products stops early, unconverged, with a note",
            min=0,
            min_exclusive=True,
            quantities=_E,
        ),
        Option("max_hvps", int, 200, "Lanczos step (HVP) cap", min=1, quantities=_E),
        Option("lanczos_steps", int, 80, "Lanczos steps per SLQ run", min=1, quantities=_D),
        Option("num_runs", int, 3, "independent SLQ probe vectors", min=1, quantities=_D),
        *DATA_GROUP_OPTIONS,
        *COMMON_OPTIONS,
    )

    def compute(
        self,
        problem: CurvatureProblem,
        quantity: str,
        *,
        seed: int,
        options: Mapping[str, Any],
    ) -> CurvatureResult:
        if quantity == "trace":
            groups = grouped_problem(problem, options["data_groups"])
            if groups is not None:
                return self._grouped_trace(groups, seed, options, split=groups is not problem)
        op, gen, common = krylov_setup(self.name, problem, quantity, seed, options)
        try:
            if quantity == "trace":
                est = hutchinson(op, **_hutchinson_args(op, gen, problem, options))
                return _trace_result(est, op.n_matvecs, options, common)
            if quantity == "eigenvalues":
                eig = krylov_top_eigenvalues(
                    op,
                    options["k"],
                    generator=gen,
                    tol=options["tol"],
                    max_matvecs=options["max_hvps"],
                )
                check_finite(eig.values, "eigenvalues")
                return CurvatureResult(
                    value=list(eig.values),
                    stderr=None,
                    n_hvp=op.n_matvecs,
                    exact=False,
                    method="lanczos",
                    details={
                        "residuals": list(eig.residuals),
                        "converged": eig.converged,
                        "sequences": eig.sequences,
                        "target": "largest algebraic",
                        "multiplicity": MULTIPLICITY,
                        **({} if eig.note is None else {"note": eig.note}),
                    },
                    **common,
                )
            if quantity == "density":
                density, quad = slq_density(
                    op,
                    num_steps=options["lanczos_steps"],
                    num_runs=options["num_runs"],
                    generator=gen,
                )
                check_finite([*density.nodes, *density.weights], "density")
                # No trace: each run is one Hutchinson sample zᵀHz bought with lanczos_steps
                # HVPs, and a handful of them gave intervals that missed the trace.
                return CurvatureResult(
                    value=density,
                    stderr=None,
                    n_hvp=op.n_matvecs,
                    exact=False,
                    method="slq",
                    details={"probe_quadratic_forms": list(quad), "trace": SLQ_TRACE_NOTE},
                    **common,
                )
            raise AssertionError(f"unhandled quantity {quantity!r}")  # registry checked it
        finally:
            op.close()

    def _grouped_trace(
        self, problem: CurvatureProblem, seed: int, options: Mapping[str, Any], *, split: bool
    ) -> CurvatureResult:
        """Hutchinson with the data-noise interval: the same probes and value as the
        plain trace, products made per group (:mod:`deconcnn_curvature.linalg.two_way`). A
        batch split into groups keeps every group's graph: together they hold what the one
        batch's graph held, and a rebuild per product would cost a forward-backward each."""
        check_population(problem, options["population_size"])
        opts = {**options, "retain_graphs": options["retain_graphs"] or split}
        op, gen, common = krylov_setup(self.name, problem, "trace", seed, opts)
        try:
            est = grouped_hutchinson(
                op,
                **_hutchinson_args(op, gen, problem, options),
                population_size=options["population_size"],
            )
        finally:
            op.close()
        details = {**est.details, "data_split": "one batch split" if split else "batches"}
        return _trace_result(est, op.n_matvecs, options, common, details)


@hookimpl
def register_backends(register: Any) -> None:
    register(PyHessianBackend)


def _trace_result(
    est: Any,
    n_hvp: int,
    options: Mapping[str, Any],
    common: Mapping[str, Any],
    details: dict[str, Any] | None = None,
) -> CurvatureResult:
    """The result of a Hutchinson trace, probe-only or with data groups (one place for both)."""
    check_finite([est.value, est.stderr], "trace")
    extra = {} if details is None else {"details": details}
    return CurvatureResult(
        value=est.value,
        stderr=est.stderr,
        n_hvp=n_hvp,
        exact=False,
        method="hutchinson",
        ci=est.ci,
        ci_level=est.ci_level,
        rtol=options["rtol"],
        target_met=est.target_met,
        layers=est.layers,
        **extra,
        **common,
    )
