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
from deconcnn_curvature.backend import QUANTITIES, Backend
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
    declarations, each with its ``budget`` mark and the command-line ``flag`` that sets it, or
    None) and ``host_options`` (the host's, e.g. ``eval_mode``)."""
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
    seed: int | None = 0,
    eval_mode: bool = True,
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
    cls, opts = resolve(quantity, backend, {**options, "eval_mode": eval_mode})
    # The host's arguments are applied here; the backend gets its own options only.
    eval_mode = opts.pop("eval_mode", eval_mode)
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
                    f"backend {cls.name!r} failed computing {quantity!r}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if cuda:
                torch.cuda.synchronize(problem.device)
    seconds = time.perf_counter() - start
    result = _validated(_host_filled(result, cls, quantity, seed, problem), cls, quantity, opts)
    # Every backend ran inside preserve_state, so attention used the math kernel: say so.
    extra: dict[str, Any] = {
        "seconds": seconds,
        "details": {**result.details, "sdpa_kernel": SDPA_KERNEL},
    }
    if cuda:
        extra["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(problem.device) - base)
    return dataclasses.replace(result, **extra)


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
    seed: int | None = 0,
    options: Mapping[str, Any] | Callable[[type[Backend]], Mapping[str, Any]] | None = None,
    before: Callable[[str], None] | None = None,
    measure: Callable[[str], contextlib.AbstractContextManager[Any]] | None = None,
) -> list[dict[str, Any]]:
    """Measure ``quantity`` with several backends on the same model, data and seed.

    ``backends``: names (default: every registered backend that computes ``quantity``).
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
                opts = {}
                for key, value in (options or {}).items():
                    if not cls.applies(key, quantity):
                        row["ignored_options"].append(key)
                    else:
                        opts[key] = value
            resolve(quantity, name, opts)
            with measure(name) if measure is not None else contextlib.nullcontext():
                row["result"] = estimate(model, loss_fn, data, quantity, name, seed=seed, **opts)
        except Exception as exc:  # one backend's failure is a row, not the end of the run
            row["status"] = comparison_status(exc)
            row["reason"] = (
                str(exc) if isinstance(exc, CurvatureError) else f"{type(exc).__name__}: {exc}"
            )
        rows.append(row)
    return rows


def density_options(
    backend: str | None,
    k: int,
    options: Mapping[str, Any] | None = None,
    *,
    label: Callable[[str], str] = lambda name: f"option {name!r}",
) -> tuple[type[Backend], dict[str, Any], dict[str, Any]]:
    """Check a :func:`density` call before any work: the backend computes the density (and the
    eigenvalues when ``k > 0``); each option goes to the quantities it applies to. Returns the
    backend class and the density's and the eigenvalues' options. ``label`` names an option in
    the messages (the CLI says ``-o name``)."""
    cls, _ = resolve("density", backend, {})
    name = cls.name
    if k > 0 and "eigenvalues" not in cls.quantities:
        raise UnsupportedQuantityError(
            f"backend {name!r} computes no eigenvalues to mark; pass -k 0 or a backend "
            "that computes both density and eigenvalues."
        )
    density_opts: dict[str, Any] = {}
    eig_opts: dict[str, Any] = {"k": k} if k > 0 else {}
    for key, value in (options or {}).items():
        routed = False
        for q, target in (("density", density_opts), ("eigenvalues", eig_opts)):
            if q == "eigenvalues" and k == 0:
                continue
            if cls.applies(key, q):
                target[key] = value
                routed = True
        if not routed:
            raise InvalidOptionError(
                f"{label(key)} is not an option of backend {name!r} for density or "
                "eigenvalues; see `deconcnn-curv list-backends --json`."
            )
    if "k" in (options or {}):
        raise InvalidOptionError("use -k, not -o k=..., to choose how many eigenvalues to mark.")
    resolve("density", name, density_opts)
    if k > 0:
        resolve("eigenvalues", name, eig_opts)
    return cls, density_opts, eig_opts


def density(
    model: nn.Module,
    loss_fn: LossFn,
    data: Batch | Iterable[Batch],
    backend: str | None = None,
    *,
    k: int = 1,
    seed: int | None = 0,
    options: Mapping[str, Any] | None = None,
    before: Callable[[str], None] | None = None,
) -> tuple[CurvatureResult, CurvatureResult | None]:
    """The spectral density (stochastic Lanczos quadrature) and the top ``k`` eigenvalues (none
    when ``k == 0``) from one backend, same data and seed. ``options`` are routed to the
    quantities they apply to (:func:`density_options`, checked before any work); ``before(q)``
    is called as each quantity starts."""
    cls, density_opts, eig_opts = density_options(backend, k, options)
    if before is not None:
        before("density")
    dens = estimate(model, loss_fn, data, "density", cls.name, seed=seed, **density_opts)
    eig = None
    if k > 0:
        if before is not None:
            before("eigenvalues")
        eig = estimate(model, loss_fn, data, "eigenvalues", cls.name, seed=seed, **eig_opts)
    return dens, eig
