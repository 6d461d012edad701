"""How often is λ_max wrong yet marked converged? hutchpp and pyhessian at their defaults.

A Ritz residual proves that *an* eigenvalue lies near the value, not that it is the largest: a
Krylov sequence whose start has little weight on the top eigenvector can converge to λ₂. This
script measures, on seeded tiny networks with close top gaps (where that happens), how many
``eigenvalues`` results with ``k=1`` are marked converged while naming another eigenvalue.

Networks: ``Linear(d, h) → Tanh → Linear(h, c)`` with ``d ∈ [3, 8]``, ``h ∈ [8, 24]``,
``c ∈ [3, 6]`` classes, ``n ∈ [6, 24]`` random samples, cross-entropy with label smoothing 0.1
(a few dozen to a few hundred parameters). A candidate is kept when its top relative gap
``(λ₁ − λ₂)/|λ₁|`` of the dense float64 Hessian (plain double backward) is below ``--max-gap``.
Each kept network is measured in float64 and in float32 (the same weights), each backend with
the seed of the network and its default options.

Wrong: the value is at least as near another eigenvalue as λ₁ (``|θ − λ₁| ≥ (λ₁ − λ₂)/2``).
Reported per backend and dtype: converged share, wrong-and-converged count, wrong count.

    python benchmarks/eig_wrong_converged.py            # 1000 networks (about 15-30 min, 1 core)
    python benchmarks/eig_wrong_converged.py --quick    # 50 networks
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("hutchpp", "pyhessian")
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def candidate(seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor, nn.Module]:
    """The seeded network, inputs, targets and loss (float64)."""
    g = torch.Generator().manual_seed(seed)

    def draw(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    d_in, hidden, classes, n = draw(3, 8), draw(8, 24), draw(3, 6), draw(6, 24)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))
    model = model.double()
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return model, x, y, nn.CrossEntropyLoss(label_smoothing=0.1)


def dense_hessian(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """The Hessian of the loss by plain double backward (one row per gradient entry)."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([t.reshape(-1) for t in grads])
    rows = []
    for i in range(flat.numel()):
        row = torch.autograd.grad(flat[i], params, retain_graph=True)
        rows.append(torch.cat([t.reshape(-1) for t in row]))
    return torch.stack(rows)


def measure(seed: int, spectrum: torch.Tensor, dtype_name: str) -> dict[str, Any]:
    import deconcnn_curvature as dcc

    model, x, y, loss_fn = candidate(seed)
    dtype = DTYPES[dtype_name]
    model, x = model.to(dtype), x.to(dtype)
    lam1, lam2 = float(spectrum[-1]), float(spectrum[-2])
    out: dict[str, Any] = {}
    for backend in BACKENDS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = dcc.estimate(model, loss_fn, (x, y), "eigenvalues", backend, seed=seed, k=1)
        value = float(r.value[0])
        out[backend] = {
            "value": value,
            "converged": bool(r.details.get("converged")),
            "wrong": abs(value - lam1) >= (lam1 - lam2) / 2,
            "rel_error": abs(value - lam1) / abs(lam1),
            "n_hvp": r.n_hvp,
        }
    return out


def collect(count: int, max_gap: float) -> tuple[list[tuple[int, torch.Tensor, int]], int]:
    """``count`` seeds whose dense spectrum has a top relative gap below ``max_gap``."""
    kept: list[tuple[int, torch.Tensor, int]] = []
    seed = 0
    while len(kept) < count:
        model, x, y, loss_fn = candidate(seed)
        spectrum = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, x, y))
        lam1, lam2 = float(spectrum[-1]), float(spectrum[-2])
        if lam1 > 0 and (lam1 - lam2) / lam1 < max_gap:
            kept.append((seed, spectrum, sum(p.numel() for p in model.parameters())))
        seed += 1
    return kept, seed


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    for backend in BACKENDS:
        for dtype_name in DTYPES:
            runs = [r[dtype_name][backend] for r in rows]
            conv = sum(x["converged"] for x in runs)
            table.append(
                {
                    "backend": backend,
                    "dtype": dtype_name,
                    "networks": len(runs),
                    "converged": conv,
                    "converged_share": conv / len(runs),
                    "wrong": sum(x["wrong"] for x in runs),
                    "wrong_and_converged": sum(x["wrong"] and x["converged"] for x in runs),
                    "worst_converged_rel_error": max(
                        (x["rel_error"] for x in runs if x["converged"]), default=0.0
                    ),
                    "mean_hvps": sum(x["n_hvp"] for x in runs) / len(runs),
                }
            )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="50 networks")
    parser.add_argument("--max-gap", type=float, default=0.1, help="top relative gap below this")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "eig_wrong_converged.json"
    )
    parser.add_argument("--label", default="", help="a note stored with the results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    count = 50 if args.quick else args.networks
    start = time.perf_counter()
    kept, tried = collect(count, args.max_gap)
    rows = []
    for seed, spectrum, n_params in kept:
        lam1, lam2 = float(spectrum[-1]), float(spectrum[-2])
        row = {"seed": seed, "params": n_params, "lambda1": lam1, "gap": (lam1 - lam2) / lam1}
        row.update({name: measure(seed, spectrum, name) for name in DTYPES})
        rows.append(row)
    table = summarise(rows)
    print(f"{len(kept)} networks (of {tried} candidates) with top gap < {args.max_gap:.0%}")
    print(f"{'backend':<10} {'dtype':<8} {'converged':>10} {'wrong':>6} {'wrong+conv':>11} "
          f"{'worst conv rel err':>19} {'HVPs':>6}")  # fmt: skip
    for t in table:
        print(
            f"{t['backend']:<10} {t['dtype']:<8} {t['converged_share']:>9.1%} {t['wrong']:>6} "
            f"{t['wrong_and_converged']:>11} {t['worst_converged_rel_error']:>19.2e} "
            f"{t['mean_hvps']:>6.1f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "label": args.label,
        "networks": len(kept),
        "candidates": tried,
        "max_gap": args.max_gap,
        "seconds": time.perf_counter() - start,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "table": table,
        "rows": rows,
    }
    args.out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
