"""The public entry points: :func:`estimate`, :func:`list_backends`, :func:`get_backend`."""

from __future__ import annotations

import dataclasses
import numbers
import os
import secrets
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deconcnn_curvature.backend import QUANTITIES, Backend
from deconcnn_curvature.distributed import local_only, rank_agreement, world_size
from deconcnn_curvature.errors import (
    BackendFailedError,
    BackendUnavailableError,
    CurvatureError,
    InvalidOptionError,
    UnknownBackendError,
    UnsupportedQuantityError,
)
from deconcnn_curvature.problem import (
    SDPA_KERNEL,
    Batch,
    LossFn,
    build_problem,
    preserve_state,
)
from deconcnn_curvature.registry import ENV_BACKEND, default_backend_name, get_registry
from deconcnn_curvature.results import CurvatureResult, validate_result

__all__ = ["estimate", "get_backend", "list_backends", "resolve"]


def list_backends() -> list[dict[str, Any]]:
    """One dictionary per registered backend: ``name``, ``plugin``, ``available``, ``reason``,
    ``install``, ``quantities``, ``exact``, ``distributed``, ``options``, ``description``."""
    return get_registry().describe_all()


def get_backend(name: str | None = None) -> type[Backend]:
    """The backend class registered as ``name`` (default: the configured default backend)."""
    return get_registry().get(name or default_backend_name())


def resolve(
    quantity: str, backend: str | None = None, options: dict[str, Any] | None = None
) -> tuple[type[Backend], dict[str, Any]]:
    """Check that ``backend`` exists, is available and computes ``quantity``; validate options.

    Front ends call this at setup time to fail before any work. Returns the class and the
    complete option dictionary.
    """
    registry = get_registry()
    name = backend or default_backend_name()
    try:
        cls = registry.get(name)
    except UnknownBackendError as exc:
        if backend is None and os.environ.get(ENV_BACKEND):
            # The name came from the environment, not from the caller: say where to fix it.
            raise UnknownBackendError(
                f"{exc} (the name comes from ${ENV_BACKEND}; unset it or fix its value)"
            ) from exc
        raise
    if quantity not in cls.quantities and not registry.supporting(quantity):
        known = set(QUANTITIES).union(*(e.cls.quantities for e in registry.entries.values()))
        raise UnsupportedQuantityError(
            f"unknown quantity {quantity!r}; known quantities: {', '.join(sorted(known))}."
        )
    registry.check_quantity(cls, quantity)
    avail = cls.availability()
    if not avail.available:
        hint = f" Install it with: {avail.install}" if avail.install else ""
        raise BackendUnavailableError(
            f"backend {cls.name!r} is not available here ({avail.reason}).{hint}"
        )
    return cls, cls.resolve_options(quantity, options or {})


def _check_seed(seed: Any) -> int:
    if seed is None:
        return secrets.randbits(31)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
        raise InvalidOptionError(
            f"seed must be a non-negative integer or None (below 2**63), got {seed!r}."
        )
    return int(seed)


def _rank0_seed(agreement: Any, seed: int) -> int:
    """Rank 0's seed on every rank (two status exchanges of 32-bit halves, exact in float64).

    The products are all-reduced, so every rank must draw the same probes: with ``seed=None``
    each rank would otherwise draw its own random seed and the sum would mix different probes.
    """
    rank0 = dist.get_rank() == 0
    high = agreement.status(None, float(seed >> 32) if rank0 else 0.0)
    low = agreement.status(None, float(seed & 0xFFFFFFFF) if rank0 else 0.0)
    return (int(high) << 32) | int(low)


def estimate(
    model: nn.Module,
    loss_fn: LossFn,
    data: Batch | Iterable[Batch],
    quantity: str = "trace",
    backend: str | None = None,
    *,
    seed: int | None = 0,
    distributed: bool | None = None,
    **options: Any,
) -> CurvatureResult:
    """Measure ``quantity`` of the Hessian of ``loss_fn(model(x), y)`` with one backend.

    Args:
        model: the network; measured in eval mode unless ``eval_mode=False`` and left exactly as
            it was (modes, ``.grad``, ``requires_grad``, buffers, RNG states).
        loss_fn: mean-reduced loss ``loss_fn(outputs, targets) -> scalar``.
        data: one ``(inputs, targets)`` batch or an iterable of batches; with several, the Hessian
            is that of the mean loss over all samples.
        quantity: ``"trace"``, ``"eigenvalues"``, ``"density"`` or a backend-specific quantity.
        backend: a registered backend name; default ``$DECONCNN_CURVATURE_BACKEND`` or
            ``"pyhessian"``.
        seed: probes are drawn from a private generator seeded with this (``None``: a fresh random
            seed, recorded in the result). The global RNG is never consumed. Under a process
            group every rank uses rank 0's seed (the products of all ranks are summed, so the
            probes must be the same).
        distributed: under an initialised ``torch.distributed`` process group, ``None`` (the
            default) or ``True`` make this a collective call: every rank must call it with its
            shard of the data, and every rank gets the result on the union. ``False`` measures
            this process's data alone, with no collective, so one rank may call it while the
            others do not (calling the default on one rank only would wait for the others
            forever). Without a process group it makes no difference.
        **options: backend options (see ``deconcnn-curv list-backends --json``).
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise InvalidOptionError(
            f"distributed must be True, False or None (automatic), got {distributed!r}."
        )
    if distributed is False:
        with local_only():
            return estimate(model, loss_fn, data, quantity, backend, seed=seed, **options)
    cls, opts = resolve(quantity, backend, options)
    world = world_size()
    if world > 1 and not cls.supports_distributed:
        raise CurvatureError(
            f"backend {cls.name!r} does not support torch.distributed: under this process group "
            f"of {world} processes it would return a per-rank number. Use a backend that does "
            "(the 'distributed' column of `deconcnn-curv list-backends`), or pass "
            "distributed=False to measure each rank's own data alone."
        )
    # [issue 7] Under a process group every rank fails or none does (no rank left waiting in a
    # collective): see deconcnn_curvature.distributed.rank_agreement.
    with rank_agreement(_first_param_device(model), enabled=world > 1) as agreement:
        seed = _check_seed(seed)  # a bad seed on one rank fails every rank, no hang
        if agreement is not None:
            seed = _rank0_seed(agreement, seed)
        cls.validate_model(model)
        eval_mode = opts.get("eval_mode", True)
        problem = build_problem(model, loss_fn, data, eval_mode=eval_mode)
        cuda = problem.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(problem.device)
            base = torch.cuda.memory_allocated(problem.device)
        start = time.perf_counter()
        with preserve_state(model, eval_mode=eval_mode):
            try:
                result = cls().compute(problem, quantity, seed=seed, options=opts)
            except CurvatureError:
                raise
            except Exception as exc:
                raise BackendFailedError(
                    f"backend {cls.name!r} failed computing {quantity!r}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if cuda:
                torch.cuda.synchronize(problem.device)
    seconds = time.perf_counter() - start
    result = _validated(result, cls, quantity, opts)
    # Every backend ran inside preserve_state, so attention used the math kernel: say so.
    extra: dict[str, Any] = {
        "seconds": seconds,
        "details": {**result.details, "sdpa_kernel": SDPA_KERNEL},
    }
    if cuda:
        extra["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(problem.device) - base)
    return dataclasses.replace(result, **extra)


def _validated(result: Any, cls: type[Backend], quantity: str, opts: dict[str, Any]) -> Any:
    """[issue 10] Every result is checked (type, quantity, shape, finiteness) before anyone
    uses it: see :func:`deconcnn_curvature.results.validate_result`."""
    entry = get_registry().entries.get(cls.name)
    return validate_result(
        result,
        quantity,
        backend=cls.name,
        plugin=entry.plugin if entry is not None else "unregistered",
        options=opts,
        carries_trace=cls.eigenvalues_carry_trace,
    )


def _first_param_device(model: Any) -> torch.device | None:
    try:
        return next(iter(model.parameters())).device
    except Exception:  # not a module, or no parameters: build_problem says what is wrong
        return None
