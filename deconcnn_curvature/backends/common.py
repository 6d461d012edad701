"""Options and helpers shared by the backends built on :mod:`deconcnn_curvature.hvp`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from deconcnn_curvature.backend import Option
from deconcnn_curvature.errors import InvalidOptionError, NonFiniteError
from deconcnn_curvature.hvp import HessianOperator
from deconcnn_curvature.linalg.operator import make_generator
from deconcnn_curvature.problem import CurvatureProblem

__all__ = [
    "COMMON_OPTIONS",
    "PYHESSIAN_INSTALL",
    "PYHESSIAN_REQUIRES",
    "TOP_K_OPTION",
    "check_finite",
    "check_k",
    "ci_level_option",
    "default_probe_batch",
    "krylov_setup",
]

#: The ``k`` of ``eigenvalues``, shared by the Krylov backends.
TOP_K_OPTION = Option(
    "k",
    int,
    1,
    "number of top (largest algebraic) eigenvalues, counted with multiplicity (a repeated "
    "eigenvalue fills as many places as its multiplicity)",
    min=1,
    quantities=frozenset({"eigenvalues"}),
)

#: What the backends that compute with PyHessian's HVPs require, and how to install it.
PYHESSIAN_REQUIRES: tuple[str, ...] = ("pyhessian",)
PYHESSIAN_INSTALL = "pip install pyhessian==0.1"


def ci_level_option(quantities: frozenset[str] = frozenset()) -> Option:
    """The confidence level of a trace interval (one rule for every stochastic trace backend)."""
    return Option(
        "ci_level",
        float,
        0.95,
        "confidence level of the reported interval",
        min=0.5,
        max=0.9999,
        quantities=quantities,
    )


COMMON_OPTIONS: tuple[Option, ...] = (
    Option(
        "probe_batch",
        int,
        None,
        "probes multiplied per autograd call: 1 = PyHessian's sequential HVP, >1 = vectorised; "
        "default: 1 on CPU, 8 on CUDA",
        min=1,
        allow_none=True,
    ),
    Option(
        "retain_graphs",
        bool,
        False,
        "with several batches, keep every batch's gradient graph in memory instead of rebuilding",
    ),
)


def default_probe_batch(value: int | None, device: torch.device) -> int:
    if value is not None:
        return value
    return 8 if device.type == "cuda" else 1


def check_finite(values: Iterable[float], what: str) -> None:
    for v in values:
        if not math.isfinite(v):
            raise NonFiniteError(
                f"the {what} came out as {v}: a Hessian-vector product was not finite. Check the "
                "model and data (diverged parameters, NaN inputs, a loss that overflows)."
            )


def check_k(k: int, max_hvps: int, dim: int) -> None:
    """Before any HVP: k beyond the dimension, or more eigenvalues than the Lanczos steps
    allowed, cannot be answered (the latter used to surface as a BackendFailedError)."""
    if k > dim:
        raise InvalidOptionError(
            f"option 'k' ({k}) exceeds the number of trainable parameters ({dim}); pass k <= {dim}."
        )
    if max_hvps < k:
        raise InvalidOptionError(
            f"option 'max_hvps' ({max_hvps}) is smaller than k ({k}): Lanczos needs at least k "
            f"steps to find k eigenvalues; pass max_hvps >= {k}."
        )


def krylov_setup(
    name: str, problem: CurvatureProblem, quantity: str, seed: int, options: Mapping[str, Any]
) -> tuple[HessianOperator, torch.Generator, dict[str, Any]]:
    """What the HVP backends start from: the checks of ``k``, the (distributed) Hessian
    operator, the seeded probe generator, and the result fields every quantity shares."""
    if quantity == "eigenvalues":
        check_k(options["k"], options["max_hvps"], problem.dim)
    op = HessianOperator(
        problem,
        probe_batch=default_probe_batch(options["probe_batch"], problem.device),
        retain_graphs=options["retain_graphs"],
        distributed=True,
    )
    common = {
        "backend": name,
        "quantity": quantity,
        "seed": seed,
        "device": str(problem.device),
        "dim": problem.dim,
        "seconds": 0.0,
    }
    return op, make_generator(seed, problem.device), common
