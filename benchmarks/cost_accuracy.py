"""deconCNN's accuracy against its cost: share of training time vs error of trace and λ_max.

For each setting (``--settings backend:num_hvps:hessian_batch_size ...``, or ``--grid`` for every
``--backends`` x ``--num-hvps`` x ``--batch-sizes``), with the monitor's other defaults
(``data_groups`` 4, λ_max with k = 1 by the backend's own defaults), this measures:

- **cost**: the share of training time at deconCNN's cadence (``--cadence`` 500 steps), from a
  ratio measured in one run: seconds of one measurement (trace + λ_max, exactly the calls the
  :class:`~deconcnn_curvature.monitor.CurvatureMonitor` makes) divided by the seconds of one
  training step (forward, backward, SGD step) of the same model on a batch of 128, the two
  timed in interleaved repetitions. Process CPU time with ``--threads 1`` is the primary figure
  (robust to other processes on a shared machine); wall time is reported too. A plain step
  without Lightning's own overhead is the denominator, so the share is if anything too high.
- **accuracy** against the full data set's values: ``--population`` synthetic CIFAR-shaped
  samples (the reference run's :class:`~deconcnn_curvature.training.data.SyntheticCIFAR` data),
  the trace by Hutch++ with ``--ref-hvps`` products on all of them and λ_max by Lanczos to
  ``--ref-eig-rtol`` on all of them. Each of ``--draws`` rounds takes, at every checkpoint, a
  curvature batch from the population without replacement (as the monitor does from the
  training set) and a fresh probe seed. Per setting: the share of draws whose trace is within
  ±5 % of the full-data trace, the coverage of the full-data trace by the reported interval
  (``ci``: probe and data noise), the share whose λ_max is within ±1 %.
- at several points of a real short training run of the reference ResNet (``resnet18_cifar``,
  ``--width`` 1/8, the package's training code, in-process, on the same synthetic data): after
  each of ``--checkpoints`` optimiser steps.

The reference is itself an estimate, so every share is a range: draws *surely* within ±5 % for
every full-data trace in its 95 % interval (Hutch++ value ± 1.96 stderr) to draws *possibly*
within for one of them; likewise for coverage (the reported interval contains the whole
reference interval / overlaps it) and λ_max (± the Lanczos residual bound, which places an
eigenvalue of the full-data Hessian that close). A checkpoint whose reference half-width is
≥ 5 % of its trace cannot judge "±5 %" (``trace_decidable`` false; ``accuracy_decidable`` pools
the others). Each end has its 95 % Wilson bound (``wilson95``). A criterion ("≥ 90 % of
draws") is ``met`` when the surely-share reaches 90 %, ``not met`` when the possibly-share
misses it, else ``undecided``; ``shown`` when the Wilson bound also clears 90 % (beyond the
noise of the draws). A setting meets deconCNN's accuracy when all three are met, pooled over
checkpoints and draws; the cheapest one that does is reported and, in any case, the frontier
(settings no other is both cheaper and at least as accurate at both ends of every range).

Defaults (about 40 min of one core, 58 on 2 shared): 512 samples, checkpoints at steps 0, 100,
300, 10 draws per checkpoint and setting, the settings ``DEFAULT_SETTINGS`` (the shipped
``curvature=hutchpp``, its cheaper and larger-batch neighbours, deconCNN's own); the reference
spends 120 Hutch++ products + up to 40 Lanczos products per checkpoint on one 512-sample batch.

    python benchmarks/cost_accuracy.py           # the default sizes
    python benchmarks/cost_accuracy.py --quick   # smoke run (about half a minute)

Prints a table and writes ``--out`` (default ``benchmarks/results/cost_accuracy.json``), after
every round of draws too (a run stopped early leaves its pooled partial results).
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
#: the shipped curvature=hutchpp default, its cheaper and larger-batch neighbours, deconCNN's own
DEFAULT_SETTINGS = ("hutchpp:10:64", "hutchpp:20:64", "hutchpp:20:128", "pyhessian:50:128")


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
    from deconcnn_curvature.monitor import CurvatureMonitor

    mon = CurvatureMonitor(
        backend=backend,
        quantities=mo._quantities(backend),
        num_hvps=num_hvps,
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

    size = args.ref_batch or len(x)  # one batch: the graph is built once, not per product
    batches = [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]
    start, cpu = time.perf_counter(), time.process_time()
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
    cpu = time.process_time() - cpu
    d = res.details
    residuals = d.get("residuals") or [d.get("lambda_max_residual")]
    trace = res.also["trace"]  # the trace of the same products (CurvatureResult.also)
    return {
        "trace": float(trace.value),
        "trace_stderr": float(trace.stderr),
        "lambda_max": float(res.value[0]),
        # an eigenvalue of the full-data Hessian lies within this residual bound of the value
        "lambda_halfwidth": float(residuals[0]) if residuals[0] is not None else 0.0,
        "lambda_converged": d.get("converged"),
        "n_hvp": int(res.n_hvp),
        "seconds": time.perf_counter() - start,
        "cpu_seconds": cpu,
    }


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95 % for z = 1.96) of a binomial share ``k / n``."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _within(value: float, ref: float, half: float, tol: float) -> tuple[bool, bool]:
    """(surely, possibly) ``|value - true| <= tol·|true|`` for a true value in ``ref ± half``.

    Checked on a fine grid over the reference's interval (and at ``value`` when it lies in it):
    surely when it holds at every point, possibly when at one."""
    pts = [ref - half + 2 * half * i / 400 for i in range(401)]
    if ref - half <= value <= ref + half:
        pts.append(value)
    ok = [abs(value - t) <= tol * abs(t) for t in pts]
    return all(ok), any(ok)


def _covers(ci: list[float] | None, ref: float, half: float) -> tuple[bool, bool]:
    """(surely, possibly) the interval ``ci`` covers a true value in ``ref ± half``."""
    if ci is None:
        return False, False
    return ci[0] <= ref - half and ref + half <= ci[1], ci[0] <= ref + half and ref - half <= ci[1]


def _share(flags: list[tuple[bool, bool]]) -> dict[str, Any]:
    """A share as a range over the reference's uncertainty, each end with its Wilson bound, and
    a verdict on "≥ 90 %": ``met`` when even the surely-met share reaches it, ``not met`` when
    even the possibly-met share misses it, else ``undecided``; ``shown`` when the Wilson bound
    on the right side of that end also clears 90 % (the verdict holds beyond the draw noise)."""
    n = len(flags)
    surely, possibly = sum(a for a, _ in flags), sum(b for _, b in flags)
    lo, hi = wilson(surely, n)[0], wilson(possibly, n)[1]
    if n and surely / n >= SHARE:
        verdict, shown = "met", lo >= SHARE
    elif n and possibly / n < SHARE:
        verdict, shown = "not met", hi < SHARE
    else:
        verdict, shown = "undecided", False
    return {
        "n": n,
        "surely": surely,
        "possibly": possibly,
        "share": [surely / n, possibly / n] if n else [0.0, 1.0],
        "wilson95": [lo, hi],
        "verdict": verdict,
        "shown": shown,
    }


def _summary(rows: list[dict], ref: dict[int, dict]) -> dict[str, Any]:
    """Accuracy of ``rows`` (draws) against the full-data values, the reference's own
    uncertainty included: its trace ± 1.96 stderr, its λ_max ± the Lanczos residual bound."""
    if not rows:
        return {"draws": 0, "met": False}
    trace_err, lam_err, t_flags, c_flags, l_flags = [], [], [], [], []
    for r in rows:
        f = ref[r["ckpt"]]
        t_half, l_half = 1.96 * f["trace_stderr"], f["lambda_halfwidth"]
        trace_err.append(abs(r["trace"] - f["trace"]) / abs(f["trace"]))
        lam_err.append(abs(r["lambda_max"] - f["lambda_max"]) / abs(f["lambda_max"]))
        t_flags.append(_within(r["trace"], f["trace"], t_half, TRACE_TOL))
        c_flags.append(_covers(r["ci"], f["trace"], t_half))
        l_flags.append(_within(r["lambda_max"], f["lambda_max"], l_half, LAMBDA_TOL))
    out: dict[str, Any] = {
        "draws": len(rows),
        "trace_within_5pct": _share(t_flags),
        "coverage": _share(c_flags),
        "lambda_within_1pct": _share(l_flags),
        "trace_rel_err_median": statistics.median(trace_err),
        "trace_rel_err_max": max(trace_err),
        "lambda_rel_err_median": statistics.median(lam_err),
        "lambda_rel_err_max": max(lam_err),
    }
    verdicts = [out[k]["verdict"] for k in ("trace_within_5pct", "coverage", "lambda_within_1pct")]
    out["trace_met"] = out["trace_within_5pct"]["verdict"] == out["coverage"]["verdict"] == "met"
    out["lambda_met"] = out["lambda_within_1pct"]["verdict"] == "met"
    out["met"] = out["trace_met"] and out["lambda_met"]
    out["verdict"] = "met" if out["met"] else "not met" if "not met" in verdicts else "undecided"
    return out


def _frontier(settings: list[dict]) -> list[str]:
    """Settings that no other one beats: cheaper (share of training time) and at least as
    accurate on every criterion, at both ends of its range."""

    def key(s: dict) -> list[float]:
        a = s["accuracy"]
        return [
            v
            for c in ("trace_within_5pct", "coverage", "lambda_within_1pct")
            for v in a[c]["share"]
        ]

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


def _fmt_share(share: dict[str, Any]) -> str:
    """``12-14/24 [31-78 %]``: surely-possibly met of n, with the Wilson bounds of those."""
    k = f"{share['surely']}" + (
        f"-{share['possibly']}" if share["possibly"] != share["surely"] else ""
    )
    lo, hi = share["wilson95"]
    return f"{k}/{share['n']} [{lo:.0%}-{hi:.0%}]"


def _parse_setting(text: str) -> tuple[str, int, int]:
    """``backend:num_hvps:hessian_batch_size`` -> a tuple (argparse type)."""
    parts = text.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise argparse.ArgumentTypeError(
            f"a setting is backend:num_hvps:hessian_batch_size, e.g. hutchpp:20:64; got {text!r}"
        )
    return parts[0], int(parts[1]), int(parts[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--population", type=int, default=512, help="synthetic samples")
    parser.add_argument("--width", type=float, default=0.125, help="ResNet-18 width_mult")
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[0, 100, 300])
    parser.add_argument(
        "--settings",
        type=_parse_setting,
        nargs="+",
        default=[_parse_setting(s) for s in DEFAULT_SETTINGS],
        metavar="BACKEND:NUM_HVPS:BATCH",
        help=f"settings measured (default: {' '.join(DEFAULT_SETTINGS)})",
    )
    parser.add_argument(
        "--grid",
        action="store_true",
        help="measure every --backends x --num-hvps x --batch-sizes instead of --settings",
    )
    parser.add_argument("--backends", nargs="+", default=["pyhessian", "hutchpp"])
    parser.add_argument("--num-hvps", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--draws", type=int, default=10, help="draws per checkpoint and setting")
    parser.add_argument("--ref-hvps", type=int, default=120, help="full-data Hutch++ budget")
    parser.add_argument("--ref-eig-rtol", type=float, default=1e-4, help="full-data Lanczos tol")
    parser.add_argument("--ref-max-hvps", type=int, default=40, help="full-data Lanczos cap")
    parser.add_argument(
        "--ref-batch", type=int, default=0, help="samples per reference batch (0: all at once)"
    )
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
        args.step_reps, args.grid = 1, True

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
    if args.grid:
        args.settings = [
            (b, n, bs) for b in args.backends for bs in args.batch_sizes for n in args.num_hvps
        ]
    settings = {
        f"{b} n={n} B={bs}": (b, n, bs, _plan(b, n, bs))
        for b, n, bs in args.settings
        if b in backends
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
                    # pooled over the checkpoints whose reference trace can judge ±5 %
                    "accuracy_decidable": _summary(
                        [r for r in rs if ref[r["ckpt"]]["trace_decidable"]], ref
                    ),
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
            "trace err med",
            "λ err med",
            "verdict",
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
                *(
                    _fmt_share(a[c])
                    for c in ("trace_within_5pct", "coverage", "lambda_within_1pct")
                ),
                f"{a['trace_rel_err_median']:.1%}",
                f"{a['lambda_rel_err_median']:.1%}",
                a["verdict"],
                "*" if s["name"] in frontier else "",
            )
        console = Console(width=200)
        console.print(table)
        console.print(
            "shares: k/n surely met (reference's uncertainty included) - k/n possibly met "
            "[95 % Wilson bounds of those two]"
        )
        for c, f in ref.items():
            console.print(
                f"step {c}: full-data trace {f['trace']:.4g} ± {1.96 * f['trace_stderr']:.3g} "
                f"(95 %, {f['trace_halfwidth_rel']:.1%}: "
                f"{'judges' if f['trace_decidable'] else 'cannot judge'} ±5 %), λ_max "
                f"{f['lambda_max']:.4g} ± {f['lambda_halfwidth']:.2g} (residual), "
                f"{f['cpu_seconds']:.0f} s CPU"
            )
        for s in out_settings:
            d = s["accuracy_decidable"]
            if d["draws"]:
                console.print(
                    f"{s['name']} at decidable steps: trace ±5 % "
                    f"{_fmt_share(d['trace_within_5pct'])}, covers {_fmt_share(d['coverage'])}"
                )
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

    models = {}
    for ckpt, state in states.items():  # the full-data values first, then rounds of draws
        model = build_model("resnet18_cifar", width_mult=args.width)
        model.load_state_dict(state)
        models[ckpt] = model.to(args.device)
        ref[ckpt] = _reference(model, loss_fn, x_all, y_all, args)
        half = 1.96 * ref[ckpt]["trace_stderr"] / abs(ref[ckpt]["trace"])
        ref[ckpt]["trace_halfwidth_rel"] = half
        ref[ckpt]["trace_decidable"] = half < TRACE_TOL
        print(f"step {ckpt}: full data {ref[ckpt]} ({time.perf_counter() - began:.0f} s)")
    for draw in range(args.draws):  # each round: one draw at every checkpoint
        for ckpt, model in models.items():
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
