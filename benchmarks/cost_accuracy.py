"""deconCNN's accuracy against its cost: share of training time vs error of trace and λ_max.

For each backend (``--backends``), trace budget (``--num-hvps``, the monitor's ``num_samples``)
and curvature batch (``--batch-sizes``, ``hessian_batch_size``), with the monitor's other
defaults (``data_groups`` 4, λ_max with k = 1 by the backend's own defaults), this measures:

- **cost**: the share of training time at deconCNN's cadence (``--cadence`` 500 steps), from a
  ratio measured in one run: seconds of one measurement (trace + λ_max, exactly the calls the
  :class:`~deconcnn_curvature.lightning.CurvatureMonitor` makes) divided by the seconds of one
  training step (forward, backward, SGD step) of the same model on a batch of 128, the two
  timed in interleaved repetitions. Process CPU time with ``--threads 1`` is the primary figure
  (robust to other processes on a shared machine); wall time is reported too. A plain step
  without Lightning's own overhead is the denominator, so the share is if anything too high.
- **accuracy** against the full data set's values: ``--population`` synthetic CIFAR-shaped
  samples (the reference run's :class:`~deconcnn_curvature.training.data.SyntheticCIFAR` data),
  the trace by Hutch++ with ``--ref-hvps`` products on all of them (its own standard error
  reported) and λ_max by Lanczos to ``--ref-eig-rtol`` on all of them. Each of ``--draws``
  draws takes a curvature batch from the population without replacement (as the monitor does
  from the training set) and a fresh probe seed. Per setting: the share of draws whose trace is
  within ±5 % of the full-data trace, the coverage of the full-data trace by the reported
  interval (``ci``: probe and data noise), the share whose λ_max is within ±1 %.
- at several points of a real short training run of the reference ResNet (``resnet18_cifar``,
  ``--width`` 1/8, the package's training code, in-process, on the same synthetic data): after
  each of ``--checkpoints`` optimiser steps.

A setting meets deconCNN's accuracy when, pooled over checkpoints and draws, ≥ 90 % of traces
are within ±5 %, the interval covers ≥ 90 % of the time and ≥ 90 % of λ_max within ±1 %. The
cheapest setting that meets it is reported, or, when none does, the frontier (settings no other
is both cheaper and at least as accurate on every criterion).

Default sizes (chosen to fit ~20-25 min on a shared 2-core machine): 256 samples, checkpoints at
steps 0, 30, 100, one draw per checkpoint and setting (3 per setting), num_hvps 10, 20, 50 on 64
and 128 samples; the reference spends 90 products (60 Hutch++ + up to 30 Lanczos) per checkpoint.

    python benchmarks/cost_accuracy.py           # the default sizes (23 min on 2 shared cores)
    python benchmarks/cost_accuracy.py --quick   # smoke run (about a minute)

Prints a table and writes ``--out`` (default ``benchmarks/results/cost_accuracy.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import monitor_overhead as mo  # (the overhead benchmark's helpers and constants)

RESULTS = Path(__file__).resolve().parent / "results" / "cost_accuracy.json"
TRACE_TOL, LAMBDA_TOL, SHARE = 0.05, 0.01, 0.90


def _train_checkpoints(args: argparse.Namespace) -> dict[int, dict[str, Any]]:
    """Model weights after each of ``args.checkpoints`` steps of one real training run."""
    import lightning.pytorch as pl

    from deconcnn_curvature.training import CIFARDataModule, ClassificationModule

    wanted = sorted(set(args.checkpoints))
    saved: dict[int, dict[str, Any]] = {}

    class Keep(pl.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            if 0 in wanted:
                saved[0] = copy.deepcopy(pl_module.model.state_dict())

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *_: Any) -> None:
            if trainer.global_step in wanted:
                saved[trainer.global_step] = copy.deepcopy(pl_module.model.state_dict())

    pl.seed_everything(0, verbose=False)
    data = CIFARDataModule(
        source="synthetic", batch_size=mo.BATCH, num_train=args.population, num_val=mo.BATCH
    )
    module = ClassificationModule("resnet18_cifar", {"width_mult": args.width})
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        max_steps=max(max(wanted), 1),
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        deterministic=args.device != "cuda",
        default_root_dir=args.workdir,
        callbacks=[Keep()],
    )
    trainer.fit(module, datamodule=data)
    return {step: saved[step] for step in wanted}


def _population(args: argparse.Namespace) -> tuple[Any, Any]:
    """The training set, without augmentation, normalised as training sees it."""
    import torch

    from deconcnn_curvature.training.data import SyntheticCIFAR

    ds = SyntheticCIFAR(args.population, seed=0, split="train")
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(xs), torch.as_tensor(ys)


def _plan(backend: str, num_hvps: int, batch: int) -> tuple[list[tuple[str, dict]], Any]:
    """The monitor's own calls for this setting (trace + λ_max)."""
    from deconcnn_curvature.lightning import CurvatureMonitor

    mon = CurvatureMonitor(
        backend=backend,
        quantities=mo._quantities(backend),
        num_samples=num_hvps,
        hessian_batch_size=batch,
        jsonl=None,
        log_metrics=False,
    )
    mon.check_config()
    return mon._plan, mon


def _measure(
    model: Any, loss_fn: Any, batch: Any, backend: str, setting: Any, seed: int, cache: dict
) -> dict:
    """One monitor measurement: trace, its interval and λ_max, with wall and CPU seconds.

    A call identical to one already made on this batch (same backend, quantity, options and
    seed: pyhessian's λ_max does not depend on the trace budget) is taken from ``cache`` with
    the seconds it took, instead of being repeated."""
    from deconcnn_curvature import estimate

    plan, mon = setting
    out: dict[str, Any] = {}
    wall, cpu = 0.0, 0.0
    for quantity, opts in plan:
        key = (backend, quantity, repr(sorted(opts.items())), seed, len(batch[0]))
        if key not in cache:
            w, c = time.perf_counter(), time.process_time()
            res = estimate(model, loss_fn, batch, quantity, backend, seed=seed, **opts)
            cache[key] = (res, time.perf_counter() - w, time.process_time() - c)
        result, w, c = cache[key]
        wall, cpu = wall + w, cpu + c
        if quantity == "eigenvalues":
            out["lambda_max"] = float(result.value[0])
            out["n_hvp_eig"] = int(result.n_hvp)
            if mon._joint:
                result = mon._joint_trace(result)
        if result.quantity == "trace":
            out["trace"] = float(result.value)
            out["ci"] = list(result.ci) if result.ci is not None else None
            out["stderr"] = result.stderr
            out["n_hvp_trace"] = int(result.n_hvp)
    out["seconds"] = wall
    out["cpu_seconds"] = cpu
    return out


def _time_steps(model: Any, loss_fn: Any, x: Any, y: Any, reps: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of ``reps`` training steps on a copy of ``model``."""
    import torch

    net = copy.deepcopy(model).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    times = []
    for _ in range(reps + 1):  # the first one is a warm-up
        _sync(x)
        wall, cpu = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()
        _sync(x)
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return times[1:]


def _sync(tensor: Any) -> None:
    import torch

    if tensor.device.type == "cuda":
        torch.cuda.synchronize(tensor.device)


def _reference(model: Any, loss_fn: Any, x: Any, y: Any, args: argparse.Namespace) -> dict:
    """Full-data trace (Hutch++, many products, its stderr) and λ_max (Lanczos, tight tol)."""
    from deconcnn_curvature import estimate

    batches = [(x[i : i + mo.BATCH], y[i : i + mo.BATCH]) for i in range(0, len(x), mo.BATCH)]
    start = time.perf_counter()
    res = estimate(
        model,
        loss_fn,
        batches,
        "eigenvalues",
        "hutchpp",
        seed=987_654,
        num_hvps=args.ref_hvps,
        k=1,
        eig_rtol=args.ref_eig_rtol,
        max_hvps=args.ref_max_hvps,
        data_groups=1,
    )
    d = res.details
    trace = res.also["trace"]  # the trace of the same products (issue 14: CurvatureResult.also)
    return {
        "trace": float(trace.value),
        "trace_stderr": float(trace.stderr),
        "lambda_max": float(res.value[0]),
        "lambda_converged": d.get("converged"),
        "n_hvp": int(res.n_hvp),
        "seconds": time.perf_counter() - start,
    }


def _summary(rows: list[dict], ref: dict[int, dict]) -> dict[str, Any]:
    trace_err = [
        abs(r["trace"] - ref[r["ckpt"]]["trace"]) / abs(ref[r["ckpt"]]["trace"]) for r in rows
    ]
    lam_err = [
        abs(r["lambda_max"] - ref[r["ckpt"]]["lambda_max"]) / abs(ref[r["ckpt"]]["lambda_max"])
        for r in rows
    ]
    covered = [
        r["ci"] is not None and r["ci"][0] <= ref[r["ckpt"]]["trace"] <= r["ci"][1] for r in rows
    ]
    n = len(rows)
    out = {
        "draws": n,
        "trace_within_5pct": sum(e <= TRACE_TOL for e in trace_err) / n,
        "coverage": sum(covered) / n,
        "lambda_within_1pct": sum(e <= LAMBDA_TOL for e in lam_err) / n,
        "trace_rel_err_median": statistics.median(trace_err),
        "trace_rel_err_max": max(trace_err),
        "lambda_rel_err_median": statistics.median(lam_err),
        "lambda_rel_err_max": max(lam_err),
    }
    out["trace_met"] = out["trace_within_5pct"] >= SHARE and out["coverage"] >= SHARE
    out["lambda_met"] = out["lambda_within_1pct"] >= SHARE
    out["met"] = out["trace_met"] and out["lambda_met"]
    return out


def _frontier(settings: list[dict]) -> list[str]:
    """Settings that no other one beats: cheaper (CPU share) and at least as accurate."""

    def key(s: dict) -> tuple[float, float, float]:
        a = s["accuracy"]
        return (a["trace_within_5pct"], a["coverage"], a["lambda_within_1pct"])

    names = []
    for s in settings:
        dominated = any(
            o is not s
            and o["share"] <= s["share"]
            and all(a >= b for a, b in zip(key(o), key(s), strict=True))
            and (o["share"] < s["share"] or key(o) != key(s))
            for o in settings
        )
        if not dominated:
            names.append(s["name"])
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--population", type=int, default=256, help="synthetic samples")
    parser.add_argument("--width", type=float, default=0.125, help="ResNet-18 width_mult")
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[0, 30, 100])
    parser.add_argument("--backends", nargs="+", default=["pyhessian", "hutchpp"])
    parser.add_argument("--num-hvps", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--draws", type=int, default=1, help="draws per checkpoint and setting")
    parser.add_argument("--ref-hvps", type=int, default=60, help="full-data Hutch++ budget")
    parser.add_argument("--ref-eig-rtol", type=float, default=1e-4, help="full-data Lanczos tol")
    parser.add_argument("--ref-max-hvps", type=int, default=30, help="full-data Lanczos cap")
    parser.add_argument("--step-reps", type=int, default=3, help="training steps per draw")
    parser.add_argument("--cadence", type=int, default=mo.DECONCNN_CADENCE)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="smoke sizes (about a minute)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON path")
    args = parser.parse_args()
    if args.quick:
        args.population, args.checkpoints, args.num_hvps = 64, [0, 2], [6]
        args.batch_sizes, args.draws, args.ref_hvps, args.ref_max_hvps = [16], 1, 12, 12
        args.step_reps = 1

    import tempfile

    import torch
    from torch import nn

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if args.device not in ("cpu", "cuda") or (cuda and not torch.cuda.is_available()):
        parser.error(f"--device must be cpu or cuda (with a CUDA GPU); got {args.device!r}")
    for pattern in (
        r".*does not have many workers.*",
        r".*isinstance\(treespec, LeafSpec\).*",
        r".*max_warmup_fraction.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    backends, skipped = mo._backends(args.backends)
    load_before = os.getloadavg()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        args.workdir = tmp
        states = _train_checkpoints(args)
    del args.workdir
    print(f"trained: checkpoints {sorted(states)} in {time.perf_counter() - began:.0f} s")

    from deconcnn_curvature.training.resnet_cifar import build_model

    x_all, y_all = (t.to(args.device) for t in _population(args))
    loss_fn = nn.CrossEntropyLoss()
    settings = {
        f"{b} n={n} B={bs}": (b, n, bs, _plan(b, n, bs))
        for b in backends
        for bs in args.batch_sizes
        for n in args.num_hvps
    }
    ref: dict[int, dict] = {}
    rows: dict[str, list[dict]] = {name: [] for name in settings}
    steps: list[tuple[float, float]] = []
    gen = torch.Generator().manual_seed(2026)

    def finish(final: bool) -> None:
        """Summarise what has been measured; write the JSON (and, when final, print the table)."""
        step_wall = statistics.median(w for w, _ in steps)
        step_cpu = statistics.median(c for _, c in steps)
        out_settings = []
        for name, (backend, n, bs, _) in settings.items():
            rs = rows[name]
            wall = statistics.median(r["seconds"] for r in rs)
            cpu = statistics.median(r["cpu_seconds"] for r in rs)
            out_settings.append(
                {
                    "name": name,
                    "backend": backend,
                    "num_hvps": n,
                    "hessian_batch_size": bs,
                    "seconds_per_measurement": wall,
                    "cpu_seconds_per_measurement": cpu,
                    "cost_in_training_steps": cpu / step_cpu,
                    "wall_share": wall / step_wall / args.cadence,
                    "cpu_share": cpu / step_cpu / args.cadence,
                    # CPU time where the work runs on the CPU; wall time on a GPU
                    "share": (wall / step_wall if cuda else cpu / step_cpu) / args.cadence,
                    "n_hvp_eig_median": statistics.median(r["n_hvp_eig"] for r in rs),
                    "accuracy": _summary(rs, ref),
                    "per_checkpoint": {
                        str(c): _summary([r for r in rs if r["ckpt"] == c], ref) for c in ref
                    },
                    "draws": rs,
                }
            )
        frontier = _frontier(out_settings)
        met = sorted((s for s in out_settings if s["accuracy"]["met"]), key=lambda s: s["share"])
        chosen = met[0]["name"] if met else None

        def payload() -> dict[str, Any]:
            return {
                "settings": {
                    k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                },
                "criteria": {"trace_tol": TRACE_TOL, "lambda_tol": LAMBDA_TOL, "share": SHARE},
                "environment": {
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg(),
                },
                "step_seconds": step_wall,
                "step_cpu_seconds": step_cpu,
                "reference": {str(k): v for k, v in ref.items()},
                "results": out_settings,
                "frontier": frontier,
                "cheapest_meeting_accuracy": chosen,
                "skipped": skipped,
                "total_seconds": time.perf_counter() - began,
            }

        if not final:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(payload(), indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(
            title=(
                f"Cost vs accuracy: resnet18_cifar width {args.width:g}, population "
                f"{args.population}, checkpoints {args.checkpoints}, {args.draws} draws each, "
                f"every {args.cadence} steps"
            )
        )
        for col in (
            "setting",
            "s/meas",
            "steps/meas",
            f"@{args.cadence} CPU",
            f"@{args.cadence} wall",
            "trace ±5 %",
            "ci covers",
            "λ ±1 %",
            "λ err med",
            "met",
            "frontier",
        ):
            table.add_column(col, justify="left" if col == "setting" else "right")
        for s in out_settings:
            a = s["accuracy"]
            table.add_row(
                s["name"],
                f"{s['cpu_seconds_per_measurement']:.2f}",
                f"{s['cost_in_training_steps']:.1f}",
                f"{s['cpu_share']:.1%}",
                f"{s['wall_share']:.1%}",
                f"{a['trace_within_5pct']:.0%}",
                f"{a['coverage']:.0%}",
                f"{a['lambda_within_1pct']:.0%}",
                f"{a['lambda_rel_err_median']:.1%}",
                "yes" if a["met"] else "no",
                "*" if s["name"] in frontier else "",
            )
        console = Console(width=170)
        console.print(table)
        for s in out_settings:  # deconCNN's own settings: 50 products on 128 samples
            if s["num_hvps"] == 50 and s["hessian_batch_size"] == 128:
                console.print(
                    f"deconCNN's settings, {s['backend']}: {s['seconds_per_measurement']:.2f} s "
                    f"per measurement on {args.device} (target < 3 s), "
                    f"{s['share']:.1%} of training time every {args.cadence} steps"
                )
        for name, reason in skipped.items():
            console.print(f"{name}: {reason}")
        console.print(
            f"training step: {step_wall * 1000:.0f} ms wall, {step_cpu * 1000:.0f} ms CPU (batch "
            f"{mo.BATCH}); cheapest setting meeting the accuracy: {chosen or 'none'}; total "
            f"{time.perf_counter() - began:.0f} s; load average {load_before[0]:.1f} before, "
            f"{os.getloadavg()[0]:.1f} after"
        )
        args.out.write_text(json.dumps(payload(), indent=2))
        console.print(f"wrote {args.out}")

    for ckpt, state in states.items():
        model = build_model("resnet18_cifar", width_mult=args.width)
        model.load_state_dict(state)
        model.to(args.device)
        ref[ckpt] = _reference(model, loss_fn, x_all, y_all, args)
        print(f"step {ckpt}: full data {ref[ckpt]}")
        for draw in range(args.draws):
            perm = torch.randperm(args.population, generator=gen)
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
            x_step, y_step = x_all[perm[: mo.BATCH]], y_all[perm[: mo.BATCH]]
            cache: dict = {}
            steps += _time_steps(model, loss_fn, x_step, y_step, args.step_reps)
            for name, (backend, _n, bs, setting) in settings.items():
                idx = perm[:bs]
                batch = (x_all[idx], y_all[idx])
                row = _measure(model, loss_fn, batch, backend, setting, seed, cache)
                rows[name].append({"ckpt": ckpt, "draw": draw, **row})
            steps += _time_steps(model, loss_fn, x_step, y_step, args.step_reps)
            print(f"step {ckpt} draw {draw + 1}/{args.draws} ({time.perf_counter() - began:.0f} s)")
        finish(False)

    finish(True)


if __name__ == "__main__":
    main()
