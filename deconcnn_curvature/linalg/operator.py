"""The linear-operator contract every estimator relies on, a dense implementation, and probes."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from deconcnn_curvature.errors import InvalidOptionError

__all__ = ["DenseOperator", "LinearOperator", "OperatorShape", "rademacher"]


@runtime_checkable
class OperatorShape(Protocol):
    """What every operator here states about itself: the ``dim`` of the vectors it multiplies,
    their ``dtype`` and ``device``, and ``n_matvecs``, the columns multiplied so far (one column =
    one HVP). :class:`LinearOperator` and
    :class:`~deconcnn_curvature.linalg.two_way.GroupedOperator` add how they multiply."""

    @property
    def dim(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def n_matvecs(self) -> int: ...


@runtime_checkable
class LinearOperator(OperatorShape, Protocol):
    """A symmetric ``dim × dim`` operator that multiplies blocks of column vectors.

    ``matmat(V)`` takes a ``(dim, k)`` tensor on ``device`` with ``dtype`` and returns ``A @ V`` of
    the same shape.
    """

    def matmat(self, v: torch.Tensor) -> torch.Tensor: ...


class DenseOperator:
    """A dense symmetric matrix as a :class:`LinearOperator` (for tests and benchmarks)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise InvalidOptionError(f"expected a square matrix, got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self._n = 0

    @property
    def dim(self) -> int:
        return self.matrix.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    @property
    def n_matvecs(self) -> int:
        return self._n

    def matmat(self, v: torch.Tensor) -> torch.Tensor:
        self._n += v.shape[1]
        return self.matrix @ v


def rademacher(
    dim: int,
    k: int,
    *,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """A ``(dim, k)`` block of independent ±1 entries drawn from ``generator`` only.

    Drawing from an explicit generator keeps the global RNG untouched and makes a seed reproduce
    the same probes on every device of the same type and on every rank of a process group.
    """
    bits = torch.randint(0, 2, (dim, k), generator=generator, device=device, dtype=torch.int8)
    return bits.to(dtype).mul_(2).sub_(1)


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A fresh generator on ``device`` seeded with ``seed`` (does not touch the global RNG)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen
