"""Result types: small frozen dataclasses with a JSON-serialisable ``to_dict()``."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from deconcnn_curvature.errors import NonFiniteError, PluginError

__all__ = ["CurvatureResult", "Density", "usable_record", "validate_result"]


@dataclass(frozen=True)
class Density:
    """A spectral density from stochastic Lanczos quadrature.

    ``nodes`` are Ritz values (eigenvalue locations) and ``weights`` their quadrature weights,
    averaged over ``num_runs`` independent probes; the weights sum to 1. ``dim`` is the number of
    parameters, so ``dim * sum(w * node)`` is a Hutchinson estimate of the trace.
    """

    nodes: tuple[float, ...]
    weights: tuple[float, ...]
    dim: int
    num_runs: int
    lanczos_steps: int

    def trace_estimate(self) -> float:
        return self.dim * math.fsum(w * x for w, x in zip(self.weights, self.nodes, strict=True))

    def smoothed(self, grid: Any, sigma: float) -> Any:
        """Gaussian-smoothed density evaluated on ``grid`` (a 1-D numpy array); integrates to 1."""
        import numpy as np

        grid = np.asarray(grid, dtype=float)
        nodes = np.asarray(self.nodes)[:, None]
        weights = np.asarray(self.weights)[:, None]
        kernel = np.exp(-((grid[None, :] - nodes) ** 2) / (2 * sigma**2)) / (
            sigma * math.sqrt(2 * math.pi)
        )
        return (weights * kernel).sum(axis=0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": list(self.nodes),
            "weights": list(self.weights),
            "dim": self.dim,
            "num_runs": self.num_runs,
            "lanczos_steps": self.lanczos_steps,
        }


def plain(value: Any) -> Any:
    """Turn tensors, numpy scalars, tuples and nested dataclasses into JSON-friendly values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        to_dict = getattr(value, "to_dict", None)
        return to_dict() if callable(to_dict) else plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):  # torch.Tensor, numpy array/scalar
        return value.tolist()
    return value


@dataclass(frozen=True, kw_only=True)
class CurvatureResult:
    """One measurement of one quantity by one backend.

    ``value`` is a float for ``trace``, a list of floats (descending) for ``eigenvalues``, a
    :class:`Density` for ``density``, and a mapping of parameter name to tensor for ``diagonal``.
    ``stderr`` is the standard error of a stochastic estimate (0.0 for an exact one, ``None``
    where it has no meaning); ``ci`` is a two-sided interval at ``ci_level``. ``method`` names the
    algorithm that produced the number(s); ``details`` carries backend-specific extras (Ritz
    residuals, HVP timing) that are JSON-serialisable through :meth:`to_dict`.

    ``also`` holds the results of other quantities the same call measured from the same products
    (a backend declares them in :attr:`~deconcnn_curvature.backend.Backend.also_computes`, e.g.
    ``hutchpp``'s ``eigenvalues`` also returns the ``trace``): one call, several quantities.

    The host (:func:`deconcnn_curvature.estimate`) fills the fields it knows when a backend leaves
    them at their defaults: ``backend``, ``quantity``, ``seed``, ``device``, ``dim``, and always
    ``seconds``; a backend sets only what it measured.
    """

    value: Any
    stderr: float | None
    n_hvp: int
    exact: bool
    method: str
    backend: str = ""
    quantity: str = ""
    seconds: float = 0.0
    seed: int | None = None
    device: str = ""
    dim: int = 0
    ci: tuple[float, float] | None = None
    ci_level: float | None = None
    rtol: float | None = None
    target_met: bool | None = None
    layers: Mapping[str, float] | None = None
    peak_memory_bytes: int | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    also: Mapping[str, CurvatureResult] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary of every field."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


# --------------------------------------------------------------------------------------------
# the host checks every result a backend hands back before anyone uses it


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _shape_problem(quantity: str, value: Any, k: Any) -> str | None:
    """Why ``value`` is not what ``quantity`` returns (see :class:`CurvatureResult`), or None."""
    if quantity == "trace":
        return None if _real(value) else "a float"
    if quantity == "eigenvalues":
        if isinstance(value, str | bytes) or not isinstance(value, Sequence) or not value:
            return "a non-empty list of floats"
        if not all(_real(v) for v in value):
            return "a list of floats"
        if _real(k) and len(value) > k:
            return f"at most k={k} values"
        return None
    if quantity == "density":
        if not isinstance(value, Density):
            return "a deconcnn_curvature.results.Density"
        if not value.nodes or len(value.nodes) != len(value.weights):
            return "a Density with as many weights as nodes (at least one)"
        if not all(_real(v) for v in (*value.nodes, *value.weights)):
            return "a Density of floats"
        return None
    if quantity == "layer_trace":
        if not isinstance(value, Mapping) or not all(_real(v) for v in value.values()):
            return "a dict of parameter name to float"
        return None
    if quantity == "diagonal":
        import torch

        if not isinstance(value, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in value.values()
        ):
            return "a dict of parameter name to tensor"
        return None
    return None  # a plugin's own quantity: its shape is the plugin's contract


def _non_finite(quantity: str, value: Any) -> Any:
    """The first non-finite number in a (shape-checked) value, or None."""
    if isinstance(value, Density):
        numbers_ = [*value.nodes, *value.weights]
    elif isinstance(value, Mapping):
        numbers_ = []
        for v in value.values():
            if hasattr(v, "isfinite"):  # a tensor
                if not bool(v.isfinite().all()):
                    return v[~v.isfinite()].flatten()[0].item()
            elif _real(v):
                numbers_.append(v)
    elif isinstance(value, Sequence) and not isinstance(value, str | bytes):
        numbers_ = [v for v in value if _real(v)]
    else:
        numbers_ = [value] if _real(value) else []
    return next((v for v in numbers_ if not math.isfinite(v)), None)


def validate_result(
    result: Any,
    quantity: str,
    *,
    backend: str,
    plugin: str,
    options: Mapping[str, Any] | None = None,
    also: frozenset[str] = frozenset(),
) -> CurvatureResult:
    """Return ``result`` if it is a usable answer to ``quantity`` from ``backend`` (registered by
    ``plugin``); raise otherwise.

    Checked: the type (:class:`CurvatureResult`), its ``quantity``, the shape of ``value`` for
    the known quantities (a float for ``trace``, a non-empty list of at most ``k`` floats for
    ``eigenvalues``, a :class:`Density`, a dict of floats or tensors), and that ``value`` and
    ``stderr`` are finite (``stderr`` also >= 0), and so is every result in ``also``, which may
    hold only the quantities the backend declares there (``also``). A malformed result is a
    :class:`PluginError`; a non-finite
    number a :class:`NonFiniteError`; both name the backend and the plugin. Built-in backends
    raise on a diverged model before returning, so either means the backend is at fault.
    """
    who = f"backend {backend!r} (plugin {plugin!r})"
    if not isinstance(result, CurvatureResult):
        raise PluginError(
            f"{who} returned {type(result).__name__} for {quantity!r}, not a "
            "deconcnn_curvature.CurvatureResult; the result is refused (a bug in the plugin)."
        )
    if result.quantity != quantity:
        raise PluginError(
            f"{who} was asked for {quantity!r} but returned a result for "
            f"{result.quantity!r}; the result is refused (a bug in the plugin)."
        )
    expected = _shape_problem(quantity, result.value, (options or {}).get("k"))
    if expected is not None:
        raise PluginError(
            f"{who} returned {type(result.value).__name__} as the value of {quantity!r}; "
            f"{quantity} must be {expected}. The result is refused (a bug in the plugin)."
        )
    stderr = result.stderr
    if stderr is not None and not _real(stderr):
        raise PluginError(
            f"{who} returned a {type(stderr).__name__} as the standard error of {quantity!r}; "
            "it must be a float or None. The result is refused (a bug in the plugin)."
        )
    bad = _non_finite(quantity, result.value)
    what = quantity
    if bad is None and stderr is not None and not math.isfinite(stderr):
        bad, what = stderr, f"standard error of the {quantity}"
    if bad is not None:
        raise NonFiniteError(
            f"{who} returned a non-finite {what} ({bad}); refusing to report it. Check the "
            "model and data (diverged parameters, NaN inputs); if they are sound, the backend "
            "is at fault: report it to the plugin's authors."
        )
    if stderr is not None and stderr < 0:
        raise PluginError(
            f"{who} returned a negative standard error ({stderr}) for {quantity!r}; the result "
            "is refused (a bug in the plugin)."
        )
    extra = result.also or {}
    if not isinstance(extra, Mapping) or not set(extra) <= set(also):
        declared = ", ".join(sorted(also)) or "none"
        raise PluginError(
            f"{who} returned other quantities ({_short(extra)}) with {quantity!r} in `also`; it "
            f"declares {declared} there. The result is refused (a bug in the plugin)."
        )
    for name, other in extra.items():
        validate_result(other, name, backend=backend, plugin=plugin, options=options)
    return result


def _short(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, Mapping) else type(value).__name__


def _finite_number(value: Any) -> bool:
    return _real(value) and math.isfinite(value)


def usable_record(record: Mapping[str, Any]) -> bool:
    """Whether a ``curvature.jsonl`` record holds a measurement that summaries and plots may use:
    no ``error``, a finite ``value`` (a number, or a non-empty list of numbers for eigenvalues),
    and a finite ``stderr`` and ``ci`` where present. Records written before results were
    validated can hold ``null`` where a backend returned NaN, with no error; they are skipped."""
    if record.get("error") is not None:
        return False
    value = record.get("value")
    if isinstance(value, list):
        if not value or not all(_finite_number(v) for v in value):
            return False
    elif value is None or (record.get("quantity") == "trace" and not _finite_number(value)):
        return False
    stderr = record.get("stderr")
    if stderr is not None and not _finite_number(stderr):
        return False
    ci = record.get("ci")
    return ci is None or (isinstance(ci, list | tuple) and all(_finite_number(v) for v in ci))
