"""The public entry points: :func:`estimate`, :func:`list_backends`, :func:`get_backend`."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deconcnn_curvature._seeds import check_seed
from deconcnn_curvature.backend import QUANTITIES, Backend, Plan, plan_calls
from deconcnn_curvature.defaults import OFFLINE, default
from deconcnn_curvature.distributed import local_only, rank_agreement, world_size
from deconcnn_curvature.errors import (
    BackendFailedError,
    BackendUnavailableError,
    CurvatureError,
    InvalidOptionError,
    UnknownBackendError,
    UnsupportedModelError,
    UnsupportedQuantityError,
)
from deconcnn_curvature.problem import (
    SDPA_KERNEL,
    Batch,
    LossFn,
    build_problem,
    check_vector_memory,
    kept_vectors,
    preserve_state,
)
from deconcnn_curvature.registry import ENV_BACKEND, default_backend_name, get_registry
from deconcnn_curvature.results import CurvatureResult, validate_result

__all__ = ["compare", "density", "estimate", "get_backend", "list_backends", "resolve"]


def list_backends() -> list[dict[str, Any]]:
    """One dictionary per registered backend: ``name``, ``plugin``, ``available``, ``reason``,
    ``install``, ``quantities``, ``exact``, ``distributed``, ``description``, ``options`` (the
    declarations, each with its ``budget`` mark) and ``host_arguments`` (the host's:
    ``eval_mode``, ``seed``, ``distributed``, passed as arguments of :func:`estimate`)."""
    return get_registry().describe_all()


def get_backend(name: str | None = None) -> type[Backend]:
    """The backend class registered as ``name`` (default: the configured default backend)."""
    return get_registry().get(name or default_backend_name())


def _lookup(quantity: str, backend: str | None) -> type[Backend]:
    """The backend class for ``backend`` (default: the configured one), checked to exist, to
    compute ``quantity`` and to be available here."""
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
    return cls


def _check_eval_mode(eval_mode: Any) -> bool:
    if not isinstance(eval_mode, bool):
        raise InvalidOptionError(f"eval_mode must be true or false, got {eval_mode!r}.")
    return eval_mode


def resolve(
    quantity: str,
    backend: str | None = None,
    options: Mapping[str, Any] | None = None,
    *,
    eval_mode: bool = default("eval_mode", OFFLINE),
) -> tuple[type[Backend], dict[str, Any]]:
    """Check that ``backend`` exists, is available and computes ``quantity``; route and validate
    ``options`` (:func:`~deconcnn_curvature.backend.plan_calls`) and check them with the host's
    ``eval_mode`` (:meth:`~deconcnn_curvature.backend.Backend.check_call`).

    Front ends call this at setup time to fail before any work. Returns the class and the
    complete option dictionary (the backend's options; the host's arguments are apart).
    """
    cls = _lookup(quantity, backend)
    plan = plan_calls(cls, [quantity], options=options or {})
    resolved = plan.resolve()[quantity]
    cls.check_call(quantity, resolved, eval_mode=_check_eval_mode(eval_mode))
    return cls, resolved


def _check_seed(seed: Any) -> int:
    if seed is None:
        return secrets.randbits(31)
    return check_seed(seed, error=InvalidOptionError, or_none=True)


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
    seed: int | None = default("seed", OFFLINE),
    eval_mode: bool = default("eval_mode", OFFLINE),
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
        eval_mode: measure the model in eval mode (``True``, BatchNorm with running statistics,
            Dropout off) or in the mode it was handed over in (``False``). Like ``seed`` and
            ``distributed`` an argument of the host, not of the backend.
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
            return estimate(
                model, loss_fn, data, quantity, backend, seed=seed, eval_mode=eval_mode, **options
            )
    cls, opts = resolve(quantity, backend, options, eval_mode=eval_mode)
    world = world_size()
    if world > 1 and not cls.supports_distributed:
        raise CurvatureError(
            f"backend {cls.name!r} does not support torch.distributed: under this process group "
            f"of {world} processes it would return a per-rank number. Use a backend that does "
            "(the 'distributed' column of `deconcnn-curv list-backends`), or pass "
            "distributed=False to measure each rank's own data alone."
        )
    # Under a process group every rank fails or none does (no rank left waiting in a
    # collective): see deconcnn_curvature.distributed.rank_agreement.
    with rank_agreement(_first_param_device(model), enabled=world > 1) as agreement:
        seed = _check_seed(seed)  # a bad seed on one rank fails every rank, no hang
        if agreement is not None:
            seed = _rank0_seed(agreement, seed)
        cls.validate_model(model)
        problem = build_problem(model, loss_fn, data, eval_mode=eval_mode)
        vectors, option = kept_vectors(cls, quantity, opts, problem.dim)
        check_vector_memory(problem, vectors, option, backend=cls.name, quantity=quantity)
        result, seconds, peak = _compute(cls, problem, model, quantity, seed, eval_mode, opts)
    result = _validated(_host_filled(result, cls, quantity, seed, problem), cls, quantity, opts)
    # Every backend ran inside preserve_state, so attention used the math kernel: say so.
    extra: dict[str, Any] = {
        "seconds": seconds,
        "details": {**result.details, "sdpa_kernel": SDPA_KERNEL},
    }
    if peak is not None:
        extra["peak_memory_bytes"] = peak
    return dataclasses.replace(result, **extra)


def _compute(
    cls: type[Backend],
    problem: Any,
    model: nn.Module,
    quantity: str,
    seed: int,
    eval_mode: bool,
    opts: Mapping[str, Any],
) -> tuple[Any, float, int | None]:
    """The backend's call under the state guard: its result, its seconds and, on CUDA, the
    peak memory it added. A non-package exception is the backend's failure, said so."""
    cuda = problem.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(problem.device)
        base = torch.cuda.memory_allocated(problem.device)
    start = time.perf_counter()
    with preserve_state(model, eval_mode=eval_mode, owner=_backend_owner(cls)):
        try:
            result = cls().compute(problem, quantity, seed=seed, options=opts)
        except CurvatureError:
            raise
        except Exception as exc:
            raise BackendFailedError(
                f"backend {cls.name!r} failed computing {quantity!r}: {type(exc).__name__}: {exc}"
            ) from exc
        if cuda:
            torch.cuda.synchronize(problem.device)
    seconds = time.perf_counter() - start
    peak = int(torch.cuda.max_memory_allocated(problem.device) - base) if cuda else None
    return result, seconds, peak


def _backend_owner(cls: type[Backend]) -> str:
    """How the state guard names the backend (and its plugin) if it changes the model."""
    entry = get_registry().entries.get(cls.name)
    return f"backend {cls.name!r} (plugin {entry.plugin if entry else 'unregistered'})"


def _host_filled(result: Any, cls: type[Backend], quantity: str, seed: int, problem: Any) -> Any:
    """Fill the fields the host knows and a backend left at their defaults:
    ``backend``, ``quantity``, ``seed`` (a stochastic backend's), ``device``, ``dim``; likewise in
    each result of ``also`` (whose ``seconds`` stay 0.0: the call's time is the main result's)."""
    if not isinstance(result, CurvatureResult):
        return result  # refused by validate_result, with the plugin named

    def fill(r: Any, q: str) -> Any:
        if not isinstance(r, CurvatureResult):
            return r
        known = {
            "backend": r.backend or cls.name,
            "quantity": r.quantity or q,
            "seed": seed if r.seed is None and not cls.exact else r.seed,
            "device": r.device or str(problem.device),
            "dim": r.dim or problem.dim,
        }
        return dataclasses.replace(r, **known)

    also = result.also
    if isinstance(also, dict) and also:
        also = {q: fill(r, q) for q, r in also.items()}
    return dataclasses.replace(fill(result, quantity), also=also)


def _validated(result: Any, cls: type[Backend], quantity: str, opts: dict[str, Any]) -> Any:
    """Every result is checked (type, quantity, shape, finiteness) before anyone
    uses it: see :func:`deconcnn_curvature.results.validate_result`."""
    entry = get_registry().entries.get(cls.name)
    return validate_result(
        result,
        quantity,
        backend=cls.name,
        plugin=entry.plugin if entry is not None else "unregistered",
        options=opts,
        also=frozenset(cls.also_computes.get(quantity, ())),
    )


def _first_param_device(model: Any) -> torch.device | None:
    try:
        return next(iter(model.parameters())).device
    except Exception:  # not a module, or no parameters: build_problem says what is wrong
        return None


def comparison_status(exc: BaseException) -> str:
    """The status of a :func:`compare` row whose backend raised ``exc``."""
    if isinstance(exc, BackendUnavailableError):
        return "unavailable"
    if isinstance(exc, UnsupportedQuantityError | UnsupportedModelError):
        return "unsupported"
    if isinstance(exc, InvalidOptionError):
        return "invalid option"
    return "failed"


def compare(
    model: nn.Module,
    loss_fn: LossFn,
    data: Batch | Iterable[Batch],
    quantity: str = "trace",
    backends: Sequence[str] | None = None,
    *,
    seed: int | None = default("seed", OFFLINE),
    eval_mode: bool = default("eval_mode", OFFLINE),
    options: Mapping[str, Any] | Callable[[type[Backend]], Mapping[str, Any]] | None = None,
    before: Callable[[str], None] | None = None,
    measure: Callable[[str], contextlib.AbstractContextManager[Any]] | None = None,
) -> list[dict[str, Any]]:
    """Measure ``quantity`` with several backends on the same model, data and seed.

    ``backends``: names (default: every registered backend that computes ``quantity``);
    ``seed`` and ``eval_mode`` as in :func:`estimate`.
    ``options``: a mapping (each backend gets the options it takes for ``quantity``; the others
    are named in its row's ``ignored_options``), or a function of the backend class giving its
    options. ``before(name)`` is called as each backend starts; ``measure(name)`` gives a context
    manager entered around its :func:`estimate` call (a memory meter, say).

    One row per backend, in order: ``backend``, ``status`` (``"ok"``, ``"unavailable"``,
    ``"unsupported"``, ``"invalid option"`` or ``"failed"``), ``reason`` (``None`` or the error
    message), ``result`` (the :class:`CurvatureResult`, or ``None``) and ``ignored_options``. A
    backend that cannot run is a row with its reason, never an exception.
    """
    registry = get_registry()
    names = registry.supporting(quantity) if backends is None else list(backends)
    rows: list[dict[str, Any]] = []
    for name in names:
        if before is not None:
            before(name)
        row: dict[str, Any] = {
            "backend": name,
            "status": "ok",
            "reason": None,
            "result": None,
            "ignored_options": [],
        }
        try:
            cls = registry.get(name)
            if callable(options):
                opts = dict(options(cls))
            else:
                plan = plan_calls(cls, [quantity], options=options or {}, strict=False)
                row["ignored_options"] = [u.setting for u in plan.unused]
                opts = dict(plan.calls[0].options)
            resolve(quantity, name, opts, eval_mode=eval_mode)
            with measure(name) if measure is not None else contextlib.nullcontext():
                row["result"] = estimate(
                    model, loss_fn, data, quantity, name, seed=seed, eval_mode=eval_mode, **opts
                )
        except Exception as exc:  # one backend's failure is a row, not the end of the run
            row["status"] = comparison_status(exc)
            row["reason"] = (
                str(exc) if isinstance(exc, CurvatureError) else f"{type(exc).__name__}: {exc}"
            )
        rows.append(row)
    return rows


def density(
    model: nn.Module,
    loss_fn: LossFn,
    data: Batch | Iterable[Batch],
    backend: str | None = None,
    *,
    k: int = 1,
    seed: int | None = default("seed", OFFLINE),
    eval_mode: bool = default("eval_mode", OFFLINE),
    options: Mapping[str, Any] | None = None,
    before: Callable[[str], None] | None = None,
) -> tuple[CurvatureResult, CurvatureResult | None]:
    """The spectral density (stochastic Lanczos quadrature) and the top ``k`` eigenvalues (none
    when ``k == 0``) from one backend, same data and seed. ``options`` are routed to the
    quantities they apply to (:func:`density_plan`, checked before any work); ``before(q)`` is
    called as each quantity starts."""
    plan = density_plan(backend, k, options, eval_mode=eval_mode)
    results: dict[str, CurvatureResult] = {}
    for call in plan.calls:
        if before is not None:
            before(call.quantity)
        results[call.quantity] = estimate(
            model, loss_fn, data, call.quantity, plan.backend.name, seed=seed,
            eval_mode=eval_mode, **call.options,
        )  # fmt: skip
    return results["density"], results.get("eigenvalues")


def density_plan(
    backend: str | None,
    k: int,
    options: Mapping[str, Any] | None = None,
    *,
    eval_mode: bool = default("eval_mode", OFFLINE),
    **labels: Any,
) -> Plan:
    """The calls of :func:`density`, checked before any work: the backend computes the density
    (and the eigenvalues when ``k > 0``); each option goes to the quantities it applies to
    (:func:`~deconcnn_curvature.backend.plan_calls`; ``labels`` are its ``labels`` and
    ``option_label``, how a front end spells them in messages)."""
    cls = _lookup("density", backend)
    if k > 0 and "eigenvalues" not in cls.quantities:
        raise UnsupportedQuantityError(
            f"backend {cls.name!r} computes no eigenvalues to mark; ask for k=0 or a backend "
            "that computes both density and eigenvalues."
        )
    quantities = ["density", "eigenvalues"] if k > 0 else ["density"]
    plan = plan_calls(cls, quantities, k=k if k > 0 else None, options=options or {}, **labels)
    for quantity, resolved in plan.resolve().items():
        cls.check_call(quantity, resolved, eval_mode=_check_eval_mode(eval_mode))
    return plan
