"""What the exact BackPACK trace costs next to the stochastic backends, measured in one run.

For each model (CIFAR-shaped batch of 128, float32, CPU) and each method, a fresh Python process
measures time (CPU seconds of the process, robust to other users' load) and peak resident
memory (over the process's size before its first forward pass), so one method's peak cannot hide
another's:

- ``gradient``: one forward + backward of the mean loss (the unit of memory; the unit of time is
  a gradient timed in each method's own process, five times before and five times after it);
- ``backpack``: the exact trace, ``dcc.estimate(..., backend="backpack")`` (DiagHessian);
- ``pyhessian``: Hutchinson with 30 HVPs, and the HVPs it would need for a 95 % interval
  half-width of 5 % of the exact trace (projected from the measured per-probe variance);
- ``hutchpp``: Hutch++ with 30 HVPs (and with ``rtol=0.05`` when the backend offers it), if the
  ``hutchpp`` backend is registered;
- ``hmp``: Hutchinson on BackPACK's block-diagonal Hessian-matrix product (``HMP``), the
  candidate "stochastic mode" of the backpack backend: one extended backward, then 30 probes.

Models: ``plain_cnn`` (conv-relu-maxpool ×2, flatten, linear; no normalisation, no residual) and
``small_cnn`` (deconCNN's ``small_cnn`` with ``norm_type: none``: Identity, ReLU, MaxPool,
AdaptiveAvgPool). ``resnet18_cifar`` is not measured: BackPACK refuses its residual sums.

Prints a table of ratios to one gradient and writes ``benchmarks/results/backpack_cost.json``.

    python benchmarks/backpack_cost.py [--batch 128] [--reps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "backpack_cost.json"
METHODS = ("gradient", "backpack", "pyhessian", "hutchpp", "hmp")
MODELS = ("plain_cnn", "small_cnn")
PROBES = 30
TARGET = 0.05  # relative half-width of a 95 % interval
Z95 = 1.959964


def _clock() -> float:
    """CPU seconds of this process (all threads). Wall time on a shared machine measures the other
    users' load as much as ours; CPU time is the work done, and ratios of it stay put."""
    return time.process_time()


def _rss_now_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _build(name: str, batch: int) -> tuple[Any, Any, tuple[Any, Any]]:
    import torch
    from torch import nn

    from deconcnn_curvature.training.resnet_cifar import small_cnn

    torch.manual_seed(0)
    if name == "plain_cnn":
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 8 * 8, 10),
        )
    elif name == "small_cnn":
        model = small_cnn(num_classes=10, width=8, norm_type="none")
    else:
        raise SystemExit(f"unknown model {name!r}")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return model.eval(), nn.CrossEntropyLoss(), (x, y)


def _hmp_trace(model: Any, loss_fn: Any, batch: tuple[Any, Any], probes: int) -> float:
    """Hutchinson on BackPACK's HMP (block-diagonal Hessian: same trace as the full Hessian)."""
    import copy

    import torch
    from backpack import backpack, extend
    from backpack.extensions import HMP

    m = extend(copy.deepcopy(model))
    lf = extend(copy.deepcopy(loss_fn))
    with backpack(HMP()):
        lf(m(batch[0]), batch[1]).backward()
    gen = torch.Generator().manual_seed(0)
    total = 0.0
    for p in m.parameters():
        v = torch.randint(0, 2, (probes, *p.shape), generator=gen).to(p.dtype) * 2 - 1
        hv = p.hmp(v)
        total += float((v * hv).sum()) / probes
    return total


def _child(model_name: str, method: str, batch: int, reps: int, threads: int) -> dict[str, Any]:
    import warnings

    import torch

    import deconcnn_curvature as dcc

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.set_num_threads(threads)  # 1 by default: spinning worker threads inflate CPU time
    model, loss_fn, data = _build(model_name, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    for optional in ("backpack", "pyhessian"):  # imports are not the method's memory
        with contextlib.suppress(ImportError):
            __import__(optional)
    # Baseline before any forward pass: every method's peak then includes its own activations
    # (the warm-up gradient's are in the allocator's pages, so measuring after it would hide them).
    base = _rss_now_kb()
    torch.autograd.grad(loss_fn(model(data[0]), data[1]), params)  # warm-up, untimed
    out: dict[str, Any] = {"model": model_name, "method": method}
    times: list[float] = []

    def gradient_times(n: int) -> list[float]:
        ts = []
        for _ in range(n):
            t = _clock()
            torch.autograd.grad(loss_fn(model(data[0]), data[1]), params)
            ts.append(_clock() - t)
        return ts

    # The unit of time is measured in the same process, right before and after the method, so
    # that the ratio survives a machine whose load changes between processes.
    unit = gradient_times(5)
    try:
        if method == "gradient":
            times = gradient_times(max(reps, 5))
        elif method == "backpack":
            dcc.estimate(model, loss_fn, data, "trace", backend="backpack")  # warm-up
            for _ in range(reps):
                t = _clock()
                r = dcc.estimate(model, loss_fn, data, "trace", backend="backpack")
                times.append(_clock() - t)
            out["value"] = r.value
        elif method == "pyhessian":
            t = _clock()
            r = dcc.estimate(
                model, loss_fn, data, "trace", backend="pyhessian", seed=0, num_hvps=PROBES
            )
            times.append(_clock() - t)
            out.update(value=r.value, stderr=r.stderr, n_hvp=r.n_hvp)
        elif method == "hutchpp":
            names = {row["name"]: row for row in dcc.list_backends()}
            if "hutchpp" not in names or not names["hutchpp"]["available"]:
                raise RuntimeError("backend 'hutchpp' is not registered or not available here")
            opts = {o["name"] for o in names["hutchpp"]["options"]}
            budget = next(n for n in ("num_hvps", "num_matvecs", "num_probes") if n in opts)
            t = _clock()
            r = dcc.estimate(
                model, loss_fn, data, "trace", backend="hutchpp", seed=0, **{budget: PROBES}
            )
            times.append(_clock() - t)
            out.update(value=r.value, stderr=r.stderr, n_hvp=r.n_hvp)
            if "rtol" in opts:
                t = _clock()
                r2 = dcc.estimate(
                    model,
                    loss_fn,
                    data,
                    "trace",
                    backend="hutchpp",
                    seed=0,
                    rtol=TARGET,
                    **{budget: 2000},
                )
                rtol_seconds = _clock() - t
                out.update(
                    rtol_value=r2.value,
                    rtol_n_hvp=r2.n_hvp,
                    rtol_seconds=rtol_seconds,
                    rtol_target_met=r2.target_met,
                )
        elif method == "hmp":
            t = _clock()
            out["value"] = _hmp_trace(model, loss_fn, data, PROBES)
            times.append(_clock() - t)
        else:
            raise SystemExit(f"unknown method {method!r}")
    except Exception as exc:  # report, don't hide: the row says why there is no number
        out["error"] = f"{type(exc).__name__}: {exc}"[:300]
    unit += gradient_times(5)
    out["gradient_seconds"] = statistics.median(unit)
    if times:
        out["seconds"] = statistics.median(times)
        out["reps"] = len(times)
    out["peak_rss_over_base_mb"] = max(0, _peak_kb() - base) / 1024
    return out


def _run_child(model: str, method: str, batch: int, reps: int, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", model, method, "--batch", str(batch)]
    cmd += ["--reps", str(reps), "--threads", str(threads)]
    env = {
        **os.environ,
        "DECONCNN_CURVATURE_PLUGINS": os.environ.get("DECONCNN_CURVATURE_PLUGINS", ""),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        return {"model": model, "method": method, "error": proc.stderr.strip()[-300:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    for model in MODELS:
        by = {r["method"]: r for r in rows if r["model"] == model}
        grad = by["gradient"]
        g_m = grad.get("peak_rss_over_base_mb") or float("nan")
        exact = by["backpack"].get("value")
        for method in METHODS:
            r = by[method]
            row: dict[str, Any] = {"model": model, "method": method}
            if "error" in r and "seconds" not in r:
                row["note"] = r["error"]
                table.append(row)
                continue
            g_t = r["gradient_seconds"]  # this process's own gradient
            row["time_x_gradient"] = r["seconds"] / g_t
            row["peak_mem_mb"] = r["peak_rss_over_base_mb"]
            row["peak_mem_x_gradient"] = r["peak_rss_over_base_mb"] / g_m if g_m else None
            if exact is not None and "value" in r and method != "gradient":
                row["rel_error"] = abs(r["value"] - exact) / abs(exact)
            if method == "pyhessian" and r.get("stderr") and exact:
                sd = r["stderr"] * math.sqrt(r["n_hvp"])  # per-probe standard deviation
                need = math.ceil((Z95 * sd / (TARGET * abs(exact))) ** 2)
                per_hvp = r["seconds"] / r["n_hvp"]
                row["hvps_for_5pct"] = need
                row["time_for_5pct_x_gradient"] = need * per_hvp / g_t
                row["note"] = (
                    f"stderr at {r['n_hvp']} HVPs: {r['stderr'] / abs(exact):.1%} of trace"
                )
            if method == "hutchpp" and "rtol_n_hvp" in r:
                row["hvps_for_5pct"] = r["rtol_n_hvp"]
                row["time_for_5pct_x_gradient"] = r["rtol_seconds"] / g_t
            if method == "backpack":
                row["time_for_5pct_x_gradient"] = row["time_x_gradient"]
                row["note"] = "exact"
            if "error" in r:
                row["note"] = r["error"]
            table.append(row)
    return table


def _print(table: list[dict[str, Any]], grads: dict[str, float]) -> None:
    head = (
        f"{'model':10} {'method':10} {'time/grad':>10} {'to 5%/grad':>11} {'HVPs 5%':>8} "
        f"{'rel err':>8} {'peak MB':>8}  note"
    )
    print(head)
    print("-" * len(head))

    def f(v: Any, spec: str) -> str:
        width = int(spec.split(".")[0].rstrip("df"))
        return format(v, spec) if isinstance(v, int | float) else "-".rjust(width)

    for r in table:
        print(
            f"{r['model']:10} {r['method']:10} {f(r.get('time_x_gradient'), '10.1f')} "
            f"{f(r.get('time_for_5pct_x_gradient'), '11.1f')} {f(r.get('hvps_for_5pct'), '8d')} "
            f"{f(r.get('rel_error'), '8.3f')} {f(r.get('peak_mem_mb'), '8.1f')}  "
            f"{r.get('note', '')[:90]}"
        )
    for model, t in grads.items():
        print(f"one gradient on {model}: {t * 1e3:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "METHOD"))
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON path")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], args.batch, args.reps, args.threads)))
        return
    rows = []
    for model in MODELS:
        for method in METHODS:
            print(f".. {model} / {method}", file=sys.stderr, flush=True)
            rows.append(_run_child(model, method, args.batch, args.reps, args.threads))
    table = _summarise(rows)
    grads = {
        r["model"]: r["gradient_seconds"]
        for r in rows
        if r["method"] == "gradient" and "gradient_seconds" in r
    }
    _print(table, grads)
    import torch

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "batch": args.batch,
                "probes": PROBES,
                "target_rel_halfwidth_95": TARGET,
                "torch": torch.__version__,
                "threads": args.threads,
                "clock": "process CPU seconds",
                "machine": platform.processor() or platform.machine(),
                "load_average": os.getloadavg(),
                "rows": rows,
                "table": table,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
