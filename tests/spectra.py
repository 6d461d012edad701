"""Dense symmetric matrices with known spectra, for the estimators' tests."""

from __future__ import annotations

import torch

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def with_spectrum(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    n = eigs.numel()
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=F64))
    a = (u * eigs) @ u.T
    return (a + a.T) / 2


def spectrum(kind: str, n: int) -> torch.Tensor:
    g = gen(1234)
    if kind == "flat":  # indefinite, no structure to deflate
        return -1 + 2.5 * torch.rand(n, generator=g, dtype=F64)
    if kind == "outliers":  # ~10 large outliers over a small PSD bulk
        return torch.cat(
            [torch.linspace(10, 100, 10, dtype=F64), torch.rand(n - 10, generator=g, dtype=F64)]
        )
    if kind == "decaying":
        return 1 / torch.arange(1, n + 1, dtype=F64)
    if kind == "indefinite_outliers":
        bulk = 0.5 * torch.randn(n - 6, generator=g, dtype=F64)
        return torch.cat([torch.tensor([40.0, 25.0, 12.0, -30.0, -15.0, -8.0], dtype=F64), bulk])
    if kind == "rank_deficient":
        return torch.cat(
            [torch.tensor([5.0, 3.0, 2.0, -1.0, 0.5], dtype=F64), torch.zeros(n - 5, dtype=F64)]
        )
    raise ValueError(kind)
