"""What CurvatureMonitor adds to a training run's wall time, measured in one run.

The same short training run (CIFAR ResNet-18 at ``--width`` on synthetic CIFAR-shaped data,
batch 128, SGD + momentum, warm-up + cosine, deterministic, CPU, no validation) is timed with
monitoring off and with the monitor on for each registered, available backend, at a cadence of
``--every`` optimiser steps with deconCNN's budget by default (``--num-samples 50`` trace probes,
λ_max by the backend's defaults, ``--hessian-batch-size 128``). Rounds interleave the
configurations (off, backend A, backend B, ..., off, ...) so that drifts in machine load hit all of
them alike; each ratio is on/off within one round, and the table shows the median over rounds.
Wall time and process CPU time are both reported: on a shared machine the CPU-time ratio is the
more stable one (``--threads 1`` keeps idle worker threads from spinning).

Reported per backend:

- ``overhead``: (on − off) / off at the measured cadence;
- ``cost/meas``: the extra seconds per measurement (both quantities), and the same in training
  steps (extra seconds divided by the seconds of one training step with monitoring off);
- ``@500``: the overhead extrapolated to deconCNN's cadence (every 500 steps) — the cost in steps
  divided by 500 — to compare with the 5 % target;
- the monitor's own in-loop seconds per measurement (from its JSONL records), as a cross-check;
- a backend that refuses the model (BackPACK and residual sums) is reported with its reason.

Prints a table and writes ``benchmarks/results/monitor_overhead.json``.

    python benchmarks/monitor_overhead.py [--steps 100] [--every 50] [--rounds 2] [--threads 1]
    python benchmarks/monitor_overhead.py --quick     # smoke size: runs end to end in seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "monitor_overhead.json"
DECONCNN_CADENCE = 500
BATCH = 128


def _fit(args: argparse.Namespace, backend: str | None, workdir: Path) -> dict[str, Any]:
    """One training run; returns its wall time and (when monitored) the curvature records."""
    import lightning.pytorch as pl

    from deconcnn_curvature.monitor import CurvatureMonitor, read_curvature_jsonl
    from deconcnn_curvature.training import CIFARDataModule, ClassificationModule

    pl.seed_everything(0, verbose=False)
    data = CIFARDataModule(
        source="synthetic", batch_size=BATCH, num_train=args.steps * BATCH, num_val=BATCH
    )
    module = ClassificationModule(
        args.model,
        {"width_mult": args.width} if args.model == "resnet18_cifar" else {"norm_type": "none"},
        lr=0.1,
        warmup_epochs=0.1,
    )
    callbacks = []
    jsonl = workdir / f"{backend}-{time.monotonic_ns()}.jsonl"
    if backend is not None:
        supported = _quantities(backend)
        callbacks.append(
            CurvatureMonitor(
                backend=backend,
                quantities=supported,
                compute_every_n_steps=args.every,
                num_hvps=None if _exact(backend) else args.num_samples,
                hessian_batch_size=args.hessian_batch_size,
                jsonl=str(jsonl),
                log_metrics=False,
            )
        )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        deterministic=True,
        default_root_dir=workdir,
        callbacks=callbacks,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(module, datamodule=data)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    records = read_curvature_jsonl(jsonl) if jsonl.exists() else []
    return {"seconds": seconds, "cpu": cpu, "steps": int(trainer.global_step), "records": records}


def _quantities(backend: str) -> list[str]:
    import deconcnn_curvature as dcc

    declared = dcc.get_backend(backend).quantities
    return [q for q in ("trace", "eigenvalues") if q in declared]


def _exact(backend: str) -> bool:
    import deconcnn_curvature as dcc

    return bool(dcc.get_backend(backend).exact)


def _backends(wanted: list[str] | None) -> tuple[list[str], dict[str, str]]:
    import deconcnn_curvature as dcc

    usable, skipped = [], {}
    for info in dcc.list_backends():
        name = info["name"]
        if wanted and name not in wanted:
            continue
        if not info["available"]:
            skipped[name] = f"not available: {info['reason']}"
        elif not {"trace", "eigenvalues"} & set(info["quantities"]):
            skipped[name] = "computes neither trace nor eigenvalues"
        else:
            usable.append(name)
    return usable, skipped


QUICK = {
    "steps": 6,
    "every": 3,
    "rounds": 1,
    "num_samples": 6,
    "hessian_batch_size": 16,
    "threads": 1,
}


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps per run")
    parser.add_argument("--every", type=int, default=50, help="measurement cadence (steps)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--width", type=float, default=0.125, help="ResNet-18 width_mult")
    parser.add_argument(
        "--model", default="resnet18_cifar", choices=["resnet18_cifar", "small_cnn"]
    )
    parser.add_argument("--num-samples", type=int, default=50, help="trace probe budget")
    parser.add_argument(
        "--hessian-batch-size", type=int, default=BATCH, help="samples in the curvature batch"
    )
    parser.add_argument("--backends", nargs="*", default=None, help="default: all available")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's choice); 1 makes CPU-time ratios robust to other "
        "processes on a shared machine",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke-sized run in well under a minute (sets "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items())
        + "); its ratios are not meaningful",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON path")
    args = parser.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.steps < args.every:
        parser.error("--steps must be at least --every (no measurement would run)")
    return args


def _measure(
    args: argparse.Namespace, backends: list[str], skipped: dict[str, str]
) -> dict[str, list[dict[str, Any]]]:
    """Interleaved rounds of every configuration. A backend that refuses the model (the monitor
    stops the run at setup with a CurvatureError) is moved to ``skipped`` with its reason."""
    from deconcnn_curvature import CurvatureError

    configs: list[str | None] = [None, *backends]
    runs: dict[str, list[dict[str, Any]]] = {str(c): [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        args_warm = argparse.Namespace(**{**vars(args), "steps": 4})
        _fit(args_warm, None, workdir)  # one-time costs (allocator, first convolutions)
        for r in range(args.rounds):
            for config in configs:
                if config is not None and config in skipped:
                    continue
                try:
                    result = _fit(args, config, workdir)
                except CurvatureError as err:
                    skipped[str(config)] = f"refused: {err}"
                    print(f"round {r + 1}/{args.rounds} {config}: refused ({err})")
                    continue
                runs[str(config)].append(result)
                print(f"round {r + 1}/{args.rounds} {config or 'off'}: {result['seconds']:.1f} s")
    for name in skipped:
        backends_run = runs.pop(name, None)
        assert not backends_run, name  # refused at setup: no timing is mixed in
        if name in backends:
            backends.remove(name)
    return runs


def _row(
    backend: str, off: list[dict[str, Any]], on: list[dict[str, Any]], step: tuple[float, float]
) -> dict[str, Any]:
    """The JSON row of one backend: ratios per round and their medians."""
    step_seconds, step_cpu = step
    measurements = len({rec["step"] for rec in on[0]["records"]})
    n = max(1, measurements)
    pairs = list(zip(off, on, strict=True))
    ratios = [b["seconds"] / a["seconds"] for a, b in pairs]
    cpu_ratios = [b["cpu"] / a["cpu"] for a, b in pairs]
    per_meas = statistics.median(b["seconds"] - a["seconds"] for a, b in pairs) / n
    per_meas_cpu = statistics.median(b["cpu"] - a["cpu"] for a, b in pairs) / n
    in_loop = statistics.median(
        sum(rec["seconds"] or 0.0 for rec in run["records"]) / n for run in on
    )
    per_quantity = {}
    for quantity in _quantities(backend):
        recs = [r for run in on for r in run["records"] if r["quantity"] == quantity]
        done = [r for r in recs if r["value"] is not None]
        per_quantity[quantity] = {
            "n_hvp": [r["n_hvp"] for r in done],
            "seconds_median": statistics.median(r["seconds"] or 0.0 for r in recs)
            if recs
            else None,
        }
    return {
        "backend": backend,
        "quantities": _quantities(backend),
        "measurements_per_run": measurements,
        "ratio_on_off": statistics.median(ratios),
        "ratios_per_round": ratios,
        "cpu_ratio_on_off": statistics.median(cpu_ratios),
        "cpu_ratios_per_round": cpu_ratios,
        "overhead": statistics.median(ratios) - 1.0,
        "seconds_per_measurement": per_meas,
        "cpu_seconds_per_measurement": per_meas_cpu,
        "in_loop_seconds_per_measurement": in_loop,
        "cost_in_training_steps": per_meas / step_seconds,
        "cpu_cost_in_training_steps": per_meas_cpu / step_cpu,
        "overhead_at_500": per_meas / step_seconds / DECONCNN_CADENCE,
        "cpu_overhead_at_500": per_meas_cpu / step_cpu / DECONCNN_CADENCE,
        "per_quantity": per_quantity,
        "errors": sorted({rec["error"] for rec in on[0]["records"] if rec["error"]}),
    }


def _print_table(
    args: argparse.Namespace, rows: list[dict[str, Any]], skipped: dict[str, str]
) -> Any:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=(
            f"CurvatureMonitor overhead: {args.model}"
            + (f" (width {args.width:g})" if args.model == "resnet18_cifar" else "")
            + f", batch {BATCH}, {args.steps} steps, every {args.every} steps, "
            f"num_samples {args.num_samples}, curvature batch {args.hessian_batch_size}, "
            f"{args.rounds} rounds"
        )
    )
    columns = (
        "backend", "HVPs trace/λ", "on/off wall", "on/off CPU", "s/meas",
        "steps/meas (wall, CPU)", "@500 wall", "@500 CPU", "note",
    )  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col in ("backend", "note") else "right")
    for row in rows:
        hvps = "/".join(
            "—"
            if not row["per_quantity"].get(q, {}).get("n_hvp")
            else str(round(statistics.median(row["per_quantity"][q]["n_hvp"])))
            for q in ("trace", "eigenvalues")
        )
        note = ("failed: " + row["errors"][0][:60]) if row["errors"] else ""
        table.add_row(
            row["backend"],
            hvps,
            f"{row['ratio_on_off']:.3f}",
            f"{row['cpu_ratio_on_off']:.3f}",
            f"{row['seconds_per_measurement']:.2f}",
            f"{row['cost_in_training_steps']:.1f}, {row['cpu_cost_in_training_steps']:.1f}",
            f"{row['overhead_at_500']:.1%}",
            f"{row['cpu_overhead_at_500']:.1%}",
            note,
        )
    for name, reason in skipped.items():
        # The first clause of the reason (the JSON keeps all of it).
        table.add_row(name, "", "", "", "", "", "", "", reason.split("; ")[0])  # 9 columns
    console = Console(width=160)
    console.print(table)
    return console


def main() -> None:
    args = _parse_args()

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*CurvatureMonitor: measurement at step.*")
    backends, skipped = _backends(args.backends)
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.UTC)
    runs = _measure(args, backends, skipped)
    load_after = os.getloadavg()

    off = runs["None"]
    step_seconds = statistics.median(o["seconds"] / o["steps"] for o in off)
    step_cpu = statistics.median(o["cpu"] / o["steps"] for o in off)
    rows = [_row(b, off, runs[b], (step_seconds, step_cpu)) for b in backends]
    console = _print_table(args, rows, skipped)
    console.print(
        f"off: {statistics.median(o['seconds'] for o in off):.1f} s for {off[0]['steps']} steps "
        f"({step_seconds * 1000:.0f} ms/step, {step_cpu * 1000:.0f} ms CPU); "
        f"load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "settings": {
            **{k: v for k, v in vars(args).items() if k != "out"},
            "batch": BATCH,
            "deconcnn_cadence": DECONCNN_CADENCE,
        },
        "environment": {
            "date": started.isoformat(timespec="seconds"),
            "machine": platform.node(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "off_seconds": [o["seconds"] for o in off],
        "off_cpu_seconds": [o["cpu"] for o in off],
        "step_seconds": step_seconds,
        "step_cpu_seconds": step_cpu,
        "backends": rows,
        "skipped": skipped,
    }
    args.out.write_text(json.dumps(payload, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
