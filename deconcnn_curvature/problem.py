"""A curvature problem (model + loss + data + trainable parameters) and the state guard.

The state guard is the one place where "nothing disturbs training" is enforced: every backend runs
inside :func:`preserve_state`, which restores module modes, every parameter's ``.grad`` (the same
tensor object, untouched), ``requires_grad`` flags, all buffers (e.g. BatchNorm running statistics)
and the global RNG states (torch CPU and CUDA, Python's ``random``, NumPy's legacy global state).
Inside it, every computation runs in full precision (outside the caller's autocast) and attention
through PyTorch's math kernel (:data:`SDPA_KERNEL`), the one with a double backward.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parameter import is_lazy

from deconcnn_curvature.errors import (
    BackendFailedError,
    InvalidOptionError,
    InvalidProblemError,
    NonFiniteError,
)

__all__ = [
    "PARAMETER_BACKUP_BYTES",
    "SDPA_KERNEL",
    "Batch",
    "CurvatureProblem",
    "LoadedCheckpoint",
    "ParameterGuard",
    "available_memory",
    "build_problem",
    "check_vector_memory",
    "global_rng_preserved",
    "kept_vectors",
    "parameters_changed_error",
    "preserve_state",
    "rebuild_like",
]

#: The scaled-dot-product-attention kernel every measurement runs with (recorded in each result's
#: ``details["sdpa_kernel"]``). The fused kernels (flash, memory-efficient, cuDNN, CPU flash) have
#: no double backward, so a Hessian-vector product through nn.MultiheadAttention or
#: nn.TransformerEncoderLayer fails with them; the math kernel computes the same function.
SDPA_KERNEL = "math"

Batch = tuple[Any, torch.Tensor]
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


def rebuild_like(template: Any, items: Any) -> Any:
    """A container of ``template``'s type holding ``items`` (a dict for a mapping, a list for a
    tuple or list): a ``UserDict``, an ``OrderedDict``, a named tuple are rebuilt as such; a
    mapping or sequence type whose constructor takes no such argument becomes a ``dict`` or a
    ``list`` of the same items."""
    if isinstance(template, Mapping):
        if type(template) is dict:
            return dict(items)
        try:
            return type(template)(items)
        except Exception:
            return dict(items)
    if isinstance(template, tuple) and hasattr(template, "_fields"):  # a named tuple
        return type(template)(*items)
    try:
        return type(template)(items)
    except Exception:
        return list(items)


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        # Asynchronous only host -> device; a device -> host copy must complete before use.
        return x.to(device, non_blocking=x.device.type == "cpu" and device.type == "cuda")
    if isinstance(x, tuple | list):
        return rebuild_like(x, [_to_device(v, device) for v in x])
    if isinstance(x, Mapping):
        return rebuild_like(x, {k: _to_device(v, device) for k, v in x.items()})
    return x


def _batch_size(inputs: Any, targets: Any) -> int:
    if isinstance(targets, torch.Tensor) and targets.ndim > 0:
        return int(targets.shape[0])
    if isinstance(inputs, torch.Tensor) and inputs.ndim > 0:
        return int(inputs.shape[0])
    raise InvalidProblemError(
        "cannot tell the batch size: targets (or inputs) must be a tensor whose first dimension "
        f"is the batch; got targets of type {type(targets).__name__}."
    )


def _is_single_batch(data: Any) -> bool:
    return (
        isinstance(data, tuple | list)
        and len(data) == 2
        and isinstance(data[1], torch.Tensor)
        and not (
            isinstance(data[0], tuple | list)
            and len(data[0]) == 2
            and isinstance(data[0][1], torch.Tensor)
        )
    )


def check_finite_loss(loss: torch.Tensor, where: str) -> None:
    """Refuse a non-finite loss value (on ``where``, e.g. ``"batch 0"``) with
    :class:`~deconcnn_curvature.errors.NonFiniteError`: its curvature is undefined. The Hessian
    operator and the BackPACK backend both check every batch's loss with it."""
    if not torch.isfinite(loss.detach()):
        raise NonFiniteError(
            f"the loss is {loss.item()} on {where}; curvature of a non-finite loss is undefined. "
            "Check the data and the model's parameters (diverged training?)."
        )


def check_mean_reduced(
    loss_fn: Any, *, name: str = "loss_fn", error: type[Exception] = InvalidProblemError
) -> None:
    """Refuse a loss whose ``reduction`` is not ``"mean"`` (a loss without the attribute is taken
    as mean-reduced): the curvature measured is that of the mean loss over samples. ``name`` is
    what the message calls the loss (``estimate()``'s argument, or the monitor's setting) and
    ``error`` what is raised; ``build_problem`` and the Lightning monitor both check with it."""
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction != "mean":
        raise error(
            f"{name} has reduction={reduction!r}; curvature is defined for the mean loss over "
            "samples, so pass a mean-reduced loss (e.g. nn.CrossEntropyLoss(reduction='mean'))."
        )


def _check_per_sample_mean(loss_fn: Any, batches: list[Batch]) -> None:
    """Several batches are combined by sample count, which is the loss over all samples only when
    each batch's loss is a mean over its samples. A class-weighted loss divides by the sum of
    the weights, and ignore_index targets drop out of the count: refuse those, with the fix."""
    weight = getattr(loss_fn, "weight", None)
    ignore = getattr(loss_fn, "ignore_index", None)
    ignored = isinstance(ignore, int) and any(
        isinstance(y, torch.Tensor) and not y.is_floating_point() and bool((y == ignore).any())
        for _, y in batches
    )
    if weight is not None or ignored:
        why = "class weights" if weight is not None else f"targets equal to ignore_index={ignore}"
        raise InvalidProblemError(
            f"{type(loss_fn).__name__} with {why} is not a mean over samples, so {len(batches)} "
            "batches cannot be combined by sample count into the loss over all of them; pass "
            "the data as one batch (torch.cat the inputs and the targets), or use an "
            "unweighted loss."
        )


@dataclass
class CurvatureProblem:
    """What a backend measures: the Hessian of the (sample-weighted) mean loss over ``batches``
    with respect to ``params`` (the trainable parameters, in ``model.named_parameters()`` order).
    """

    model: nn.Module
    loss_fn: LossFn
    batches: list[Batch]
    names: list[str]
    params: list[torch.Tensor]
    device: torch.device
    dtype: torch.dtype
    eval_mode: bool

    @property
    def num_samples(self) -> int:
        return sum(_batch_size(x, y) for x, y in self.batches)

    @property
    def dim(self) -> int:
        return sum(p.numel() for p in self.params)

    def slices(self) -> dict[str, slice]:
        """Name → slice of the flattened parameter vector."""
        out, start = {}, 0
        for name, p in zip(self.names, self.params, strict=True):
            out[name] = slice(start, start + p.numel())
            start += p.numel()
        return out

    def batch_weights(self) -> list[float]:
        sizes = [_batch_size(x, y) for x, y in self.batches]
        total = sum(sizes)
        return [s / total for s in sizes]


def build_problem(
    model: nn.Module,
    loss_fn: LossFn,
    data: Batch | Iterable[Batch],
    *,
    eval_mode: bool = True,
) -> CurvatureProblem:
    """Validate the inputs and collect trainable parameters and batches on the model's device.

    ``data`` is one ``(inputs, targets)`` batch or an iterable of them (a list, a DataLoader). The
    loss must be mean-reduced over the batch; batches are then weighted by size, so the Hessian is
    that of the mean loss over all samples. A batch's inputs are passed to the model as one
    object, ``model(inputs)``; one forward pass on the first batch (without a graph, under
    :func:`preserve_state`) refuses, with the fix, a ``forward`` of several arguments and
    outputs the loss cannot take (see :func:`_check_outputs`).
    """
    if not isinstance(model, nn.Module):
        raise InvalidProblemError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not callable(loss_fn):
        raise InvalidProblemError(
            f"loss_fn must be callable as loss_fn(outputs, targets), got {type(loss_fn).__name__}."
        )
    check_mean_reduced(loss_fn)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise InvalidProblemError(
            "the model has no trainable parameters (every parameter has requires_grad=False); "
            "unfreeze the parameters whose curvature you want to measure."
        )
    devices = {p.device for _, p in named}
    dtypes = {p.dtype for _, p in named}
    if len(devices) > 1 or len(dtypes) > 1:
        raise InvalidProblemError(
            "all trainable parameters must share one device and dtype; found devices "
            f"{sorted(map(str, devices))} and dtypes {sorted(map(str, dtypes))}."
        )
    device, dtype = devices.pop(), dtypes.pop()
    if not dtype.is_floating_point:
        raise InvalidProblemError(f"trainable parameters must be floating point, got {dtype}.")

    batches = _collect_batches(data, device)
    if len(batches) > 1:
        _check_per_sample_mean(loss_fn, batches)
    _check_outputs(model, loss_fn, batches[0], eval_mode=eval_mode)
    return CurvatureProblem(
        model=model,
        loss_fn=loss_fn,
        batches=batches,
        names=[n for n, _ in named],
        params=[p for _, p in named],
        device=device,
        dtype=dtype,
        eval_mode=eval_mode,
    )


#: Per quantity, the option that sets how many vectors of the parameters' size a measurement
#: keeps at once, when a backend declares it (the package's shared option names): a Lanczos
#: basis holds one vector per step, up to ``max_hvps`` steps for the top eigenvalues and
#: ``lanczos_steps`` per run for the density (runs one after the other).
KEPT_VECTOR_OPTIONS: Mapping[str, str] = {"eigenvalues": "max_hvps", "density": "lanczos_steps"}


def kept_vectors(
    backend: Any, quantity: str, options: Mapping[str, Any], dim: int
) -> tuple[int, str | None]:
    """How many vectors of ``dim`` elements a call of ``backend`` for ``quantity`` with
    ``options`` keeps at once, and the option that sets it (``None`` when none does).

    A backend may say it itself with a classmethod ``kept_vectors(quantity, options, dim) ->
    int``; otherwise the option of :data:`KEPT_VECTOR_OPTIONS` counts one vector per step (a
    Krylov basis never exceeds ``dim``), and a quantity without one keeps none worth counting."""
    own = getattr(backend, "kept_vectors", None)
    if callable(own):
        return int(own(quantity, options, dim)), None
    option = KEPT_VECTOR_OPTIONS.get(quantity)
    value = options.get(option) if option is not None else None
    if not isinstance(value, int) or isinstance(value, bool):
        return 0, None
    return min(value, dim), option


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device``: for CUDA, the free memory plus what
    PyTorch's allocator holds unused; for the CPU, the available memory (``psutil`` if installed,
    else ``MemAvailable`` of ``/proc/meminfo``, else the free pages); ``None`` when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    if device.type != "cpu":
        return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: float) -> str:
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 2**shift:
            return f"{n / 2**shift:.1f} {unit}"
    return f"{n:.0f} B"


def check_vector_memory(
    problem: CurvatureProblem,
    vectors: int,
    option: str | None,
    *,
    backend: str,
    quantity: str,
    available: int | None = None,
) -> None:
    """Refuse, before any product, a measurement whose ``vectors`` kept vectors of the parameters'
    size (see :func:`kept_vectors`) need more memory than ``available`` (default: what
    :func:`available_memory` says of the problem's device), in one line with the estimate
    (parameters × vectors × bytes per element) and the fix."""
    if vectors <= 0:
        return
    element = torch.empty((), dtype=problem.dtype).element_size()
    need = problem.dim * vectors * element
    if available is None:
        available = available_memory(problem.device)
    if available is None or need <= 0.9 * available:
        return
    fits = max(1, int(0.5 * available // (problem.dim * element)))
    lower = (
        f"lower option {option!r} ({vectors}; e.g. {option}={fits} fits)"
        if option is not None
        else "ask the backend for fewer products"
    )
    raise InvalidOptionError(
        f"{quantity!r} with backend {backend!r} would keep {vectors} vectors of the "
        f"{problem.dim:,} parameters in {str(problem.dtype).removeprefix('torch.')}: "
        f"{_gib(need)}, but {problem.device} has {_gib(available)} available; {lower}, or "
        "measure on a device with more memory (--device)."
    )


def _collect_batches(data: Any, device: torch.device) -> list[Batch]:
    """``data`` (one batch or an iterable of them) as a list of ``(inputs, targets)`` pairs on
    ``device``, each checked to be a non-empty pair."""
    if data is None:
        raise InvalidProblemError(
            "data is None; pass an (inputs, targets) batch or a list of them."
        )
    # Iterating a DataLoader draws from the global RNG (a shuffled loader's permutation, the
    # workers' base seed, a random sampler's seed) even when it does not shuffle: read the
    # batches inside the RNG guard, so that passing a loader leaves training bit-identical.
    with global_rng_preserved():
        raw: Sequence[Any] = [data] if _is_single_batch(data) else _iterate(data)
    batches: list[Batch] = []
    for i, batch in enumerate(raw):
        if not (isinstance(batch, tuple | list) and len(batch) == 2):
            # Only reached when data was read as a sequence of batches.
            hint = (
                " (data was read as a sequence of batches; for one batch whose inputs are "
                "themselves a pair, e.g. ((x1, x2), y), pass it as a list of one batch: "
                "[((x1, x2), y)])"
            )
            raise InvalidProblemError(
                f"batch {i} is a {type(batch).__name__}; each batch must be an (inputs, targets) "
                f"pair{hint}."
            )
        inputs, targets = batch
        n = _batch_size(inputs, targets)
        if n == 0:
            raise InvalidProblemError(f"batch {i} is empty; drop empty batches.")
        batches.append((_to_device(inputs, device), _to_device(targets, device)))
    if not batches:
        raise InvalidProblemError(
            "data holds no batches; pass at least one (inputs, targets) pair."
        )
    return batches


def _required_positional(model: nn.Module) -> list[str]:
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in sig.parameters.values() if p.kind in kinds and p.default is p.empty]


def _describe_output(out: Any) -> tuple[str, str]:
    """A short description of a non-tensor output, and how to pick its first tensor."""
    if isinstance(out, dict):
        keys = list(out)
        first = next((k for k in keys if isinstance(out[k], torch.Tensor)), keys[0] if keys else 0)
        shown = ", ".join(repr(k) for k in keys[:5]) + (", ..." if len(keys) > 5 else "")
        return f"a {type(out).__name__} with keys {shown}", f"[{first!r}]"
    if isinstance(out, tuple | list):
        parts = [
            f"Tensor{tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
            for v in out[:5]
        ]
        first = next((i for i, v in enumerate(out) if isinstance(v, torch.Tensor)), 0)
        shown = ", ".join(parts) + (", ..." if len(out) > 5 else "")
        return f"a {type(out).__name__} of {len(out)} ({shown})", f"[{first}]"
    return f"a {type(out).__name__}", ".logits"


def _functional_name(loss_fn: Any) -> str:
    names = {nn.CrossEntropyLoss: "cross_entropy", nn.MSELoss: "mse_loss", nn.NLLLoss: "nll_loss"}
    if type(loss_fn) in names:
        return f"F.{names[type(loss_fn)]}"
    module = getattr(loss_fn, "__module__", "") or ""
    if module.startswith("torch.nn.functional") and hasattr(loss_fn, "__name__"):
        return f"F.{loss_fn.__name__}"
    return "my_loss"


def _check_outputs(model: nn.Module, loss_fn: LossFn, batch: Batch, *, eval_mode: bool) -> None:
    """One forward pass on the first batch (under the state guard, without a graph), so that two
    mistakes are named with their fix before any Hessian-vector product: a ``forward`` of several
    arguments (a batch's inputs are passed as one object, ``model(inputs)``), and outputs the loss
    cannot take (a tuple or dict with a loss that wants a tensor). Any other failure of the
    forward is left to the backend, which reports it as it always has."""
    inputs, targets = batch
    owner = "the model's forward pass"
    with preserve_state(model, eval_mode=eval_mode, owner=owner), torch.no_grad():
        try:
            out = model(inputs)
        except TypeError as exc:
            required = _required_positional(model)
            if len(required) < 2:
                return
            got = (
                f"a {type(inputs).__name__} of {len(inputs)}"
                if isinstance(inputs, tuple | list)
                else f"a {type(inputs).__name__}"
            )
            raise InvalidProblemError(
                f"the model's forward takes {len(required)} arguments ({', '.join(required)}), "
                f"but a batch's inputs are passed to it as one object, model(inputs), here {got} "
                f"({type(exc).__name__}: {exc}); give the inputs as a tuple and measure a wrapper "
                "whose forward(inputs) returns net(*inputs), with the data as a list of batches "
                "[((x1, x2), y)] (see the README's Python section)."
            ) from exc
        except Exception:
            return
        if isinstance(out, torch.Tensor):
            return
        try:
            loss_fn(out, targets)
        except Exception as exc:
            what, pick = _describe_output(out)
            name = getattr(loss_fn, "__name__", None) or type(loss_fn).__name__
            raise InvalidProblemError(
                f"the model returns {what}, which loss_fn ({name}) cannot take "
                f"({type(exc).__name__}: {exc}); pass a loss that picks the logits, e.g. "
                f"loss_fn=lambda out, y: {_functional_name(loss_fn)}(out{pick}, y)."
            ) from exc


def _iterate(data: Any) -> list[Any]:
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise InvalidProblemError(
            f"data must be an (inputs, targets) batch or an iterable of batches, got "
            f"{type(data).__name__}."
        )
    return list(data)


@contextlib.contextmanager
def global_rng_preserved() -> Iterator[None]:
    """Restore the global torch (CPU and initialised CUDA), ``random`` and NumPy RNG states on
    exit: the one copy of this guard (:func:`preserve_state` and the Lightning monitor use it)."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    py = random.getstate()
    npy = np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
        np.random.set_state(npy)


#: Parameters of at most this many bytes in all are copied before a measurement, so that a
#: backend that changes them can be undone; larger models are only fingerprinted (a copy would
#: double their memory): a change is then reported, with the fix, but not undone.
PARAMETER_BACKUP_BYTES = 64 * 2**20

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bit_moments(x: torch.Tensor) -> torch.Tensor:
    """``[sum_i b_i, sum_i i * b_i]`` (int64, wrapping) over the bit patterns ``b_i`` of the
    elements of ``x`` in order: exact, so a change of any element shows in the first, and a
    permutation in the second. The moment is computed on an ``(rows, cols)`` view, with index
    vectors of length about ``sqrt(x.numel())``: two reductions, no full-size temporary."""
    flat = x.detach().reshape(-1)
    size = flat.element_size()
    bits = flat.view(_INT_OF_SIZE[size]) if size in _INT_OF_SIZE else flat.view(torch.uint8)
    n = bits.numel()
    cols = max(1, math.isqrt(n))
    rows = n // cols
    main = bits[: rows * cols].view(rows, cols)
    row_sums = main.sum(dim=1, dtype=torch.int64)
    col_sums = main.sum(dim=0, dtype=torch.int64)
    rest = bits[rows * cols :].to(torch.int64)
    index = partial(torch.arange, dtype=torch.int64, device=bits.device)
    total = row_sums.sum() + rest.sum()
    moment = (
        (row_sums * index(rows) * cols).sum()
        + (col_sums * index(cols)).sum()
        + (rest * index(rows * cols, n)).sum()
    )
    return torch.stack((total, moment))


def _value_checksums(params: list[torch.Tensor]) -> torch.Tensor:
    """Per parameter, its :func:`_bit_moments`: one read (two reductions) of the parameters,
    one transfer to the host, compared exactly."""
    if not params:
        return torch.zeros(0, 2, dtype=torch.int64)
    rows = []
    with torch.no_grad():
        for p in params:
            try:
                rows.append(_bit_moments(p))
            except (RuntimeError, NotImplementedError):  # sparse, quantized, meta: no bits
                rows.append(torch.zeros(2, dtype=torch.int64, device=p.device))
        return (
            torch.stack([r.cpu() for r in rows])
            if len({r.device for r in rows}) > 1
            else torch.stack(rows).cpu()
        )


@dataclass
class ParameterGuard:
    """Detects, and undoes where affordable, a change of a model's parameters by a
    computation that must leave them alone (a backend, a plugin, a model's own forward).

    Before: each parameter's tensor object, storage address, version counter (bumped by every
    in-place operation autograd sees) and value checksums (:func:`_value_checksums`: in-place
    changes through ``.data`` bypass the version counter; the checksums see them, and any
    permutation of the elements); a copy of the values when they take
    at most :data:`PARAMETER_BACKUP_BYTES`. :meth:`changed` names the parameters that differ;
    :meth:`restore` writes the copy back (``False`` when there is none). A lazy module's
    parameters, not yet materialised, are left out: the first forward pass creates them."""

    params: list[tuple[str, torch.nn.Parameter]]
    names: frozenset[str]
    addresses: list[tuple[int, int, torch.Size]]
    checksums: torch.Tensor
    backup: list[torch.Tensor] | None

    @classmethod
    def take(cls, model: nn.Module) -> ParameterGuard:
        named = list(model.named_parameters(remove_duplicate=True))
        params = [(n, p) for n, p in named if not is_lazy(p)]
        tensors = [p for _, p in params]
        size = sum(p.numel() * p.element_size() for p in tensors)
        with torch.no_grad():
            backup = (
                [p.detach().clone() for p in tensors] if size <= PARAMETER_BACKUP_BYTES else None
            )
        return cls(
            params=params,
            names=frozenset(n for n, _ in named),
            addresses=[(p.data_ptr(), p._version, p.shape) for p in tensors],
            checksums=_value_checksums(tensors),
            backup=backup,
        )

    def changed(self, model: nn.Module) -> list[str]:
        """Names of the parameters replaced, moved or changed in value since :meth:`take`."""
        now = dict(model.named_parameters(remove_duplicate=True))
        tensors = [p for _, p in self.params]
        addresses = [(p.data_ptr(), p._version, p.shape) for p in tensors]
        names = [
            n
            for (n, p), a, b in zip(self.params, addresses, self.addresses, strict=True)
            if now.get(n) is not p or a != b
        ]
        names += sorted(set(now) - self.names)  # parameters that were not there before
        if any(a[2] != b[2] for a, b in zip(addresses, self.addresses, strict=True)):
            return names  # a shape changed: no checksum to compare
        sums = _value_checksums(tensors)
        for (n, _), a, b in zip(self.params, sums, self.checksums, strict=True):
            if not torch.equal(a, b) and n not in names:
                names.append(n)
        return names

    def restore(self, model: nn.Module) -> bool:
        """Put back every parameter object and value from the copy; ``False`` without one."""
        if self.backup is None:
            return False
        with torch.no_grad():
            for (name, p), value in zip(self.params, self.backup, strict=True):
                owner, _, attr = name.rpartition(".")
                module = model.get_submodule(owner) if owner else model
                if module._parameters.get(attr) is not p:
                    module._parameters[attr] = p
                if p.shape != value.shape or p.dtype != value.dtype or p.device != value.device:
                    p.data = value
                else:
                    p.copy_(value)
        return True


def parameters_changed_error(owner: str, names: list[str], restored: bool) -> BackendFailedError:
    """The one-line failure of a measurement during which ``owner`` changed ``names``."""
    shown = ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
    if restored:
        after = "they have been restored, and the measurement is discarded"
    else:
        after = (
            f"they are NOT restored (no copy is kept of parameters over "
            f"{PARAMETER_BACKUP_BYTES // 2**20} MiB): reload the model from a checkpoint"
        )
    fix = (
        "measure with another backend, or fix or uninstall the plugin"
        if owner.startswith("backend")
        else "make the model's forward leave its parameters alone"
    )
    return BackendFailedError(
        f"{owner} changed the model's parameters ({shown}) while measuring; {after}. A "
        f"measurement must leave the model as it was: {fix}."
    )


@contextlib.contextmanager
def preserve_state(
    model: nn.Module, *, eval_mode: bool = True, owner: str = "the computation"
) -> Iterator[None]:
    """Run the body with ``model`` prepared for curvature and restore everything afterwards.

    Inside: every parameter's ``.grad`` is detached from it (set to ``None``) so nothing can
    accumulate into the training gradient; the model is in eval mode if ``eval_mode``; autograd is
    enabled, autocast is off and attention uses the math kernel (:data:`SDPA_KERNEL`). Afterwards,
    exactly as before: module modes, ``.grad`` objects, ``requires_grad`` flags, buffer values and
    identities, the global RNG states, and the caller's autocast and attention-kernel settings.

    The parameters must come out as they went in (:class:`ParameterGuard`): if ``owner`` (e.g.
    ``"backend 'x' (plugin y)"``) replaced or changed any of them, they are restored where a
    copy was affordable and :class:`~deconcnn_curvature.errors.BackendFailedError` names
    ``owner`` and the parameters (unless the body already raised: that error goes on).
    """
    if torch.is_inference_mode_enabled():
        raise InvalidProblemError(
            "curvature cannot be computed under torch.inference_mode() (Lightning runs validation "
            "and testing in it); compute it in a training hook, e.g. on_train_batch_end."
        )
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    grads = [p.grad for p in params]
    flags = [p.requires_grad for p in params]
    buffer_slots = [(m, dict(m._buffers)) for m in model.modules() if m._buffers]
    buffer_values = [
        (b, b.detach().clone())
        for _, slots in buffer_slots
        for b in slots.values()
        if b is not None
    ]
    guard = ParameterGuard.take(model)
    rng = contextlib.ExitStack()
    rng.enter_context(global_rng_preserved())
    failed = True
    try:
        for p in params:
            p.grad = None
        if eval_mode:
            model.eval()
        # Full precision even inside the caller's torch.autocast: a curvature measured in
        # bfloat16 would carry ~1e-3 errors under residuals that claim far better.
        with torch.enable_grad(), contextlib.ExitStack() as no_autocast:
            no_autocast.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():
                no_autocast.enter_context(torch.autocast("cuda", enabled=False))
            # The fused attention kernels have no double backward (HVPs would fail); the math
            # kernel has one, on CPU and CUDA. sdpa_kernel restores the caller's flags on exit.
            no_autocast.enter_context(sdpa_kernel(SDPBackend.MATH))
            yield
        failed = False
    finally:
        changed = guard.changed(model)
        restored = guard.restore(model) if changed else False
        with torch.no_grad():
            for module, slots in buffer_slots:
                for key, buf in slots.items():
                    module._buffers[key] = buf
            for buf, value in buffer_values:
                if buf.shape != value.shape or not torch.equal(buf, value):
                    buf.copy_(value)
        for p, g, f in zip(params, grads, flags, strict=True):
            p.requires_grad_(f)
            p.grad = g
        for m, training in modes:
            m.training = training
        rng.close()
    if changed and not failed:
        raise parameters_changed_error(owner, changed, restored)


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What a ``load_checkpoint`` hook returns: a curvature problem ready to measure.

    Defined here, with the problem it describes, so that the hook specification
    (:mod:`deconcnn_curvature.hookspecs`) need not import the checkpoint loaders;
    :mod:`deconcnn_curvature.checkpoints` re-exports it.

    ``model`` holds the checkpoint's weights (on the CPU or on ``settings["device"]``; the caller
    moves it to the chosen device). ``loss_fn`` is mean-reduced, ``loss_fn(model(x), y)``.
    ``data`` is a list of ``(inputs, targets)`` batches. ``loader`` names who understood the file
    (e.g. ``"builtin:reference"`` or a plugin's name); ``model_description`` and
    ``data_description`` are one line each for people; ``metadata`` holds JSON-serialisable facts
    such as ``epoch`` and ``global_step``.
    """

    model: nn.Module
    loss_fn: LossFn
    data: list[Batch]
    loader: str
    model_description: str
    data_description: str
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary (no tensors)."""
        return {
            "loader": self.loader,
            "model": self.model_description,
            "data": self.data_description,
            "num_batches": len(self.data),
            "metadata": dict(self.metadata),
        }
