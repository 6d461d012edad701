"""Result types: small frozen dataclasses with a JSON-serialisable ``to_dict()``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CurvatureResult", "Density"]


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


def _plain(value: Any) -> Any:
    """Turn tensors, numpy scalars, tuples and nested dataclasses into JSON-friendly values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        to_dict = getattr(value, "to_dict", None)
        return to_dict() if callable(to_dict) else _plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # torch.Tensor, numpy array/scalar
        return value.tolist()
    return value


@dataclass(frozen=True)
class CurvatureResult:
    """One measurement of one quantity by one backend.

    ``value`` is a float for ``trace``, a list of floats (descending) for ``eigenvalues``, a
    :class:`Density` for ``density``, and a mapping of parameter name to tensor for ``diagonal``.
    ``stderr`` is the standard error of a stochastic estimate (0.0 for an exact one, ``None``
    where it has no meaning); ``ci`` is a two-sided interval at ``ci_level``. ``method`` names the
    algorithm that produced the number(s); ``details`` carries backend-specific extras (Ritz
    residuals, HVP timing) that are JSON-serialisable through :meth:`to_dict`.
    """

    backend: str
    quantity: str
    value: Any
    stderr: float | None
    n_hvp: int
    seconds: float
    seed: int | None
    device: str
    exact: bool
    method: str
    dim: int
    ci: tuple[float, float] | None = None
    ci_level: float | None = None
    rtol: float | None = None
    target_met: bool | None = None
    layers: Mapping[str, float] | None = None
    peak_memory_bytes: int | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary of every field."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
