"""Coverage of the full data set's trace by the data-aware interval and by the probe-only one.

A fixed data set of ``--population`` samples (8 Gaussian features, 4 classes labelled by a random
teacher network, float64) and a small MLP student (8 → 12 → 4, tanh, 160 parameters) trained on it
briefly (full-batch Adam, deterministic). The target is the trace of the Hessian of the mean loss
over the *whole* data set, exact: a dense Hessian by plain double backward (one row per
parameter).

Each of ``--draws`` draws takes a batch of ``--batch-sizes`` samples without replacement and
measures ``dcc.estimate(..., "trace", backend, num_hvps=--probes, data_groups=--groups,
population_size=--population)`` for each of ``--backends`` (``pyhessian``: Hutchinson;
``hutchpp``: Hutch++, whose data part adds the groups' ``tr(QᵀH_gQ)``). Two intervals per draw,
same probes and same value:

- ``data``: the reported interval (``ci``): probe noise and data noise, from the groups × probes
  quadratic forms (:mod:`deconcnn_curvature.linalg.two_way`);
- ``probe``: the interval the package reported before (``value ± t_{m−1} · stderr_probe``, m
  the Hutchinson or deflated probes), an interval for *this batch's* Hessian.

Reported per backend and batch size: the coverage of the full-data trace by each (nominal 95 %),
the mean of ``stderr``, ``stderr_probe`` and ``stderr_data``, the empirical standard deviation of
the values over draws, and the mean relative error.

    python benchmarks/data_noise.py            # 200 draws at 128 and 256 samples (~2 min)
    python benchmarks/data_noise.py --quick    # smoke run (a few seconds)

Prints a table and writes ``--out`` (default ``benchmarks/results/data_noise.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from scipy import stats
from torch import nn

import deconcnn_curvature as dcc

RESULTS = Path(__file__).resolve().parent / "results" / "data_noise.json"


def make_problem(
    population: int, seed: int = 0
) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """The data set, the trained student and its loss (all float64, deterministic)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(population, 8, generator=gen, dtype=torch.float64)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        probs = torch.softmax(teacher(x), dim=1)
    y = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(200):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model, loss_fn, x, y


def exact_trace(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The trace of the dense Hessian of the mean loss over (x, y), by plain double backward."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model(x), y)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)])
    rows = []
    for i in range(grad.numel()):
        row = torch.autograd.grad(grad[i], params, retain_graph=True)
        rows.append(torch.cat([r.reshape(-1) for r in row]))
    hessian = torch.stack(rows)
    torch.testing.assert_close(hessian, hessian.T)
    return float(torch.diagonal(hessian).sum())


def draw_intervals(
    model: nn.Module,
    loss_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    draws: int,
    probes: int,
    groups: int,
    population_size: int | None,
    backend: str = "pyhessian",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One record per draw: value, the data-aware interval and the probe-only one."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for d in range(draws):
        idx = torch.randperm(x.shape[0], generator=gen)[:batch_size]
        r = dcc.estimate(
            model,
            loss_fn,
            (x[idx], y[idx]),
            "trace",
            backend,
            seed=seed * 100_003 + d,
            num_hvps=probes,
            data_groups=groups,
            population_size=population_size,
        )
        sp = r.details["stderr_probe"]
        m = int(r.details.get("deflated_probes", probes))
        t_probe = float(stats.t.ppf(0.975, m - 1))
        out.append(
            {
                "value": r.value,
                "ci": list(r.ci),
                "probe_ci": [r.value - t_probe * sp, r.value + t_probe * sp],
                "stderr": r.stderr,
                "stderr_probe": sp,
                "stderr_data": r.details["stderr_data"],
            }
        )
    return out


def summarise(records: list[dict[str, Any]], truth: float) -> dict[str, Any]:
    def covers(ci: list[float]) -> bool:
        return ci[0] <= truth <= ci[1]

    n = len(records)
    values = [r["value"] for r in records]
    return {
        "draws": n,
        "coverage_data": sum(covers(r["ci"]) for r in records) / n,
        "coverage_probe": sum(covers(r["probe_ci"]) for r in records) / n,
        "mean_stderr": statistics.fmean(r["stderr"] for r in records),
        "mean_stderr_probe": statistics.fmean(r["stderr_probe"] for r in records),
        "mean_stderr_data": statistics.fmean(r["stderr_data"] for r in records),
        "sd_of_values": statistics.stdev(values) if n > 1 else math.nan,
        "mean_relative_error": statistics.fmean(abs(v - truth) / abs(truth) for v in values),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--population", type=int, default=2048, help="samples in the data set")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--probes", type=int, default=50, help="num_hvps per draw")
    ap.add_argument("--groups", type=int, default=4, help="data_groups per draw")
    ap.add_argument("--backends", nargs="+", default=["pyhessian", "hutchpp"])
    ap.add_argument("--no-fpc", action="store_true", help="no finite-population correction")
    ap.add_argument("--quick", action="store_true", help="smoke run: 10 draws, 20 probes")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON path")
    args = ap.parse_args(argv)
    if args.quick:
        args.draws, args.probes = 10, 20
    torch.set_num_threads(1)
    model, loss_fn, x, y = make_problem(args.population)
    truth = exact_trace(model, loss_fn, x, y)
    rows = []
    print(f"full-data trace (exact, {args.population} samples): {truth:.6g}")
    print(
        "backend    batch  draws  cover(data)  cover(probe)  stderr  s_probe  s_data  "
        "sd(values)  sec"
    )
    for backend, batch in ((b, n) for b in args.backends for n in args.batch_sizes):
        start = time.perf_counter()
        records = draw_intervals(
            model,
            loss_fn,
            x,
            y,
            batch_size=batch,
            draws=args.draws,
            probes=args.probes,
            groups=args.groups,
            population_size=None if args.no_fpc else args.population,
            backend=backend,
        )
        row = {"backend": backend, "batch_size": batch, **summarise(records, truth)}
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(
            f"{backend:9s}  {batch:5d}  {row['draws']:5d}  {row['coverage_data']:11.3f}  "
            f"{row['coverage_probe']:12.3f}  {row['mean_stderr']:6.4f}  "
            f"{row['mean_stderr_probe']:7.4f}  {row['mean_stderr_data']:6.4f}  "
            f"{row['sd_of_values']:10.4f}  {row['seconds']:4.1f}"
        )
    result = {
        "benchmark": "data_noise",
        "population": args.population,
        "probes": args.probes,
        "groups": args.groups,
        "finite_population_correction": not args.no_fpc,
        "ci_level": 0.95,
        "exact_trace": truth,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
