"""Options and helpers shared by the backends built on :mod:`deconcnn_curvature.hvp`."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from deconcnn_curvature.backend import Option
from deconcnn_curvature.errors import NonFiniteError

__all__ = ["COMMON_OPTIONS", "TOP_K_OPTION", "check_finite", "default_probe_batch"]

#: The ``k`` of ``eigenvalues``, shared by the Krylov backends.
TOP_K_OPTION = Option(
    "k",
    int,
    1,
    "number of top (largest algebraic) eigenvalues; distinct values: a repeated eigenvalue is "
    "reported once (single-vector Krylov)",
    min=1,
    quantities=frozenset({"eigenvalues"}),
)

COMMON_OPTIONS: tuple[Option, ...] = (
    Option(
        "eval_mode",
        bool,
        True,
        "measure the model in eval mode (BatchNorm uses running statistics, Dropout off); "
        "false measures it in the mode it was handed over in",
    ),
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
