"""The ``hutchpp`` backend: Hutch++ on PyHessian's Hessian-vector products.

Meyer, R. A., Musco, C., Musco, C. & Woodruff, D. P. (2021). *Hutch++: Optimal stochastic trace
estimation.* SOSA, 142–155. Persson, D., Cortinovis, A. & Kressner, D. (2022). *Improved variants
of the Hutch++ algorithm for trace estimation.* SIAM J. Matrix Anal. Appl. 43(3), 1162–1185.

The operator is the one the ``pyhessian`` backend multiplies by
(:class:`~deconcnn_curvature.hvp.HessianOperator`: one gradient graph per batch, products through
``pyhessian.utils.hessian_vector_product`` or its vectorised equivalent), so both backends measure
the same matrix; only the estimators differ (:mod:`deconcnn_curvature.linalg.hutchpp`,
:mod:`deconcnn_curvature.linalg.ritz`).

One Hutch++ run of ``num_hvps`` products answers every quantity:

- ``trace``: ``tr(QᵀHQ)`` exactly on a low-rank subspace ``Q`` plus Hutchinson on the deflated
  rest, with a standard error and a Student-t interval from the deflated probes; ``layers`` are
  the per-parameter traces of the same products (they sum to the total). ``details`` also carry
  ``lambda_max`` — the top Rayleigh–Ritz value of ``QᵀHQ``, free, with its residual bound — so a
  monitor gets both numbers from one call of ``num_hvps`` products.
- ``layer_trace``: the same per-parameter traces as the value (dict name → float), their standard
  errors in ``details["layer_stderr"]``.
- ``eigenvalues``: the ``k`` largest algebraic eigenvalues, counted with multiplicity, by
  Rayleigh–Ritz on ``Q`` joined by Lanczos sequences (the sketch continued from its top Ritz
  vector, and others from independent random starts), at most ``max_hvps`` more products
  (:func:`~deconcnn_curvature.linalg.ritz.refined_top_eigenvalues`). A small residual alone does
  not prove a Ritz value is the *top* eigenvalue (on close gaps the sketch's value was λ₂), so
  ``details["converged"]`` needs residuals at most ``eig_rtol/2 · |θ|``, independent sequences
  each converged on their own to the same λ_max within ``eig_rtol``, and every repeated value
  seen by fewer sequences than took part. ``details["methods"]`` says which method produced each
  value, and ``also["trace"]`` (a result with its stderr and interval) is the trace from the same
  run.

``probe_batch > 1`` multiplies the deflated probes in blocks through the vectorised product (and
the published split's sketch in one block); the Krylov steps of the adaptive split are one column
each, since each depends on the last. On CPU the sequential product is the default: batching was
no faster on a CIFAR ResNet (benchmarks/trace_accuracy.py).

Under ``torch.distributed`` every product is all-reduced (see :mod:`deconcnn_curvature.hvp`), and
every branch the estimator takes depends only on those reduced products and on the seeded probes,
so all ranks stay in lockstep and return bit-identical numbers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

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
    DataGroupsMixin,
    check_population,
    data_group_options,
    grouped_problem,
)
from deconcnn_curvature.backends.progress import listener
from deconcnn_curvature.errors import BackendFailedError
from deconcnn_curvature.hookspecs import hookimpl
from deconcnn_curvature.linalg.hutchinson import TraceEstimate
from deconcnn_curvature.linalg.hutchpp import (
    MIN_DEFLATED_PROBES,
    HutchppResult,
    hutchpp_with_sketch,
)
from deconcnn_curvature.linalg.probes import rtol_met
from deconcnn_curvature.linalg.ritz import (
    MULTIPLICITY,
    RitzEstimate,
    refined_top_eigenvalues,
    sketch_top_eigenvalues,
)
from deconcnn_curvature.linalg.two_way import GroupRecorder, hutchpp_forms, two_way_trace
from deconcnn_curvature.problem import CurvatureProblem
from deconcnn_curvature.results import CurvatureResult

__all__ = ["DEFAULT_NUM_HVPS", "MIN_NUM_HVPS", "HutchppBackend", "register_backends"]

#: Fewest products a Hutch++ run accepts: 2 for the low-rank part, 3 deflated probes.
MIN_NUM_HVPS = 2 + MIN_DEFLATED_PROBES
#: Default budget. 30 products leave room for ≤ 10 Lanczos refinements within deconCNN's ~40, and
#: put the trace within 5 % on a trained network (benchmarks/trace_accuracy.py).
DEFAULT_NUM_HVPS = 30

#: Default cap on the eigenvalue refinement: a random-start Lanczos run needs 10–17 products to
#: reach λ_max within 1e-3 on a small float64 CNN, on top of the sketch's own refinement; 50
#: converged on every seed measured (tests/backends/test_hutchpp.py).
DEFAULT_MAX_REFINE_HVPS = 50

_E = frozenset({"eigenvalues"})


class HutchppBackend(DataGroupsMixin, Backend):
    name = "hutchpp"
    description = (
        "Hutch++ on PyHessian HVPs: trace with error bars and rtol mode, per-layer traces, "
        "top eigenvalues from the same sketch"
    )
    quantities = frozenset({"trace", "layer_trace", "eigenvalues"})
    also_computes: ClassVar[Mapping[str, frozenset[str]]] = {"eigenvalues": frozenset({"trace"})}
    exact = False
    requires = PYHESSIAN_REQUIRES
    install_hint = PYHESSIAN_INSTALL
    supports_distributed = True
    options = (
        Option(
            "num_hvps",
            int,
            DEFAULT_NUM_HVPS,
            f"Hutch++ budget in HVPs, spent exactly (the cap when rtol is set); at least "
            f"{MIN_NUM_HVPS}: 2 for the low-rank part, {MIN_DEFLATED_PROBES} deflated probes",
            min=MIN_NUM_HVPS,
            budget=True,
        ),
        Option(
            "rtol",
            float,
            None,
            "target-error mode: stop when the confidence-interval half-width is at most "
            "rtol·|trace| (num_hvps is then the cap; target_met says whether it was reached)",
            min=0,
            min_exclusive=True,
            allow_none=True,
        ),
        Option(
            "min_hvps",
            int,
            10,
            "deflated probes before the rtol rule is consulted",
            min=2,
        ),
        Option(
            "sketch_fraction",
            float,
            None,
            "share of num_hvps spent on the low-rank part: null = adaptive (grows it only while "
            "that lowers the variance); 0.667 = Hutch++ as published",
            min=0,
            max=0.99,
            min_exclusive=True,
            allow_none=True,
        ),
        ci_level_option(),
        TOP_K_OPTION,
        Option(
            "eig_rtol",
            float,
            1e-3,
            "converged when each residual bound is at most eig_rtol/2·|value| and two "
            "independent Lanczos sequences agree on λ_max within eig_rtol·|λ_max|",
            min=0,
            min_exclusive=True,
            quantities=_E,
        ),
        Option(
            "max_hvps",
            int,
            DEFAULT_MAX_REFINE_HVPS,
            "most extra HVPs the Lanczos refinement and its independent check may spend (on "
            "top of num_hvps); it stops earlier once converged; each keeps two parameter-sized "
            "vectors until the call ends",
            min=1,
            quantities=_E,
        ),
        *data_group_options(frozenset({"trace", "layer_trace", "eigenvalues"})),
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
        # Data groups: the same products, made per group through a recorder.
        groups = grouped_problem(problem, options["data_groups"])
        split = groups is not None and groups is not problem
        if groups is not None:
            check_population(groups, options["population_size"])
            # A split batch keeps every group's graph: together they hold the batch's.
            options = {**options, "retain_graphs": options["retain_graphs"] or split}
            problem = groups
        op, gen, common = krylov_setup(self.name, problem, quantity, seed, options)
        recorder = GroupRecorder(op) if groups is not None else None
        try:
            run = hutchpp_with_sketch(
                op if recorder is None else recorder,
                options["num_hvps"],
                generator=gen,
                sketch_fraction=options["sketch_fraction"],
                rtol=options["rtol"],
                min_samples=options["min_hvps"],
                ci_level=options["ci_level"],
                layer_slices=problem.slices(),
                block_size=op.probe_batch,
                on_product=listener(),
            )
            est = run.trace
            if recorder is not None:
                est = _with_data_interval(run, recorder, options, split=split)
                run = dataclasses.replace(run, trace=est)
            layers = dict(est.layers or {})
            check_finite([est.value, est.stderr, *layers.values()], "trace")
            details = _trace_details(run, op.probe_batch)
            details.update({k: est.details[k] for k in _DATA_KEYS if k in est.details})
            # What a trace run reports, as the trace or as the per-layer traces.
            run_fields = {
                "n_hvp": op.n_matvecs,
                "exact": bool(est.details["exact"]),
                "method": "hutch++",
                "ci_level": est.ci_level,
                "rtol": options["rtol"],
                "target_met": est.target_met,
                "layers": layers,
                "details": details,
                **common,
            }
            if quantity == "trace":
                if run.sketch.rank:
                    top = sketch_top_eigenvalues(run.sketch, 1)
                    check_finite(top.values, "top Rayleigh-Ritz value")
                    details["lambda_max"] = top.values[0]
                    details["lambda_max_residual"] = top.residuals[0]
                    details["lambda_max_method"] = "rayleigh_ritz"
                return CurvatureResult(value=est.value, stderr=est.stderr, ci=est.ci, **run_fields)
            if quantity == "layer_trace":
                details["trace"] = est.value
                details["trace_stderr"] = est.stderr
                details["trace_ci"] = est.ci
                return CurvatureResult(value=layers, stderr=None, **run_fields)
            if quantity == "eigenvalues":
                return _eigenvalues(op, gen, run, options, details, common)
            raise AssertionError(f"unhandled quantity {quantity!r}")  # registry checked it
        finally:
            op.close()


def _eigenvalues(
    op: Any,
    gen: Any,
    run: HutchppResult,
    options: Mapping[str, Any],
    trace_details: dict[str, Any],
    common: Mapping[str, Any],
) -> CurvatureResult:
    """The refined top eigenvalues from the run's sketch, with the run's trace in ``also``."""
    est = run.trace
    eig = refined_top_eigenvalues(
        op,
        run.sketch,
        options["k"],
        rtol=options["eig_rtol"],
        generator=gen,
        max_matvecs=options["max_hvps"],
    )
    check_finite(eig.values, "eigenvalues")
    return CurvatureResult(
        value=list(eig.values),
        stderr=None,
        n_hvp=op.n_matvecs,
        # Rayleigh–Ritz on a subspace that spans every parameter is the spectrum.
        exact=bool(est.details["exact"]) and eig.n_matvecs == 0,
        method=_method(eig),
        details={
            "residuals": list(eig.residuals),
            "methods": list(eig.methods),
            "converged": eig.converged,
            "eig_rtol": options["eig_rtol"],
            "refinement_hvps": eig.n_matvecs,
            "target": "largest algebraic",
            "multiplicity": MULTIPLICITY,
            "sequences": eig.sequences,
            **({} if eig.note is None else {"note": eig.note}),  # stopped at the rounding floor
        },
        # The trace of the same sketch: its products are part of this call's n_hvp.
        also={
            "trace": CurvatureResult(
                value=est.value,
                stderr=est.stderr,
                n_hvp=est.n_matvecs,
                exact=False,
                method="hutch++",
                ci=est.ci,
                ci_level=est.ci_level,
                rtol=options["rtol"],
                target_met=est.target_met,
                details=trace_details,
            )
        },
        **common,
    )


_DATA_KEYS = (
    "stderr_probe",
    "stderr_data",
    "data_groups",
    "data_samples",
    "population_size",
    "dof",
    "interval",
    "data_split",
)


def _with_data_interval(
    run: HutchppResult, recorder: GroupRecorder, options: Mapping[str, Any], *, split: bool
) -> TraceEstimate:
    """The Hutch++ trace with the two-way interval of its per-group parts
    (:func:`~deconcnn_curvature.linalg.two_way.hutchpp_forms`): ``tr(QᵀH_gQ)`` plus the groups'
    deflated quadratic forms, ``Q`` taken as given. The value is unchanged; with ``rtol``,
    ``target_met`` is re-read on the wider interval."""
    est = run.trace
    d = est.details
    forms = hutchpp_forms(
        recorder, run.sketch.basis, int(d["sketch_matvecs"]), int(d["deflated_probes"])
    )
    if forms is None:  # the sketch spanned everything: the trace is exact for this batch
        return est
    tw = two_way_trace(
        forms,
        recorder.group_sizes,
        population_size=options["population_size"],
        ci_level=est.ci_level,
    )
    if not math.isclose(tw.value, est.value, rel_tol=1e-5, abs_tol=1e-6 * (1 + abs(est.value))):
        raise BackendFailedError(
            f"the per-group Hutch++ parts average to {tw.value}, not to the trace {est.value}; "
            "measure with data_groups=1."
        )
    target_met = est.target_met
    if options["rtol"] is not None:
        target_met = rtol_met(est.value, (tw.ci[1] - tw.ci[0]) / 2, options["rtol"])
    details = {**d, **tw.details(), "data_split": "one batch split" if split else "batches"}
    return dataclasses.replace(
        est, stderr=tw.stderr, ci=tw.ci, target_met=target_met, details=details
    )


def _trace_details(run: HutchppResult, probe_batch: int) -> dict[str, Any]:
    d = dict(run.trace.details)
    return {
        "split": d["split"],
        "steps": d.get("steps"),
        "scouts": d.get("scouts"),
        "sketch_rank": d["sketch_rank"],
        "sketch_hvps": d["sketch_matvecs"],
        "deflated_probes": d["deflated_probes"],
        "exact_part": d["exact_part"],
        "deflated_estimate": d["deflated_estimate"],
        "deflated_stderr": d["deflated_stderr"],
        "layer_stderr": dict(d.get("layer_stderr", {})),
        "probe_batch": probe_batch,
    }


def _method(eig: RitzEstimate) -> str:
    kinds = sorted(set(eig.methods), key=("rayleigh_ritz", "lanczos").index)
    return "+".join(kinds)


@hookimpl
def register_backends(register: Any) -> None:
    register(HutchppBackend)
