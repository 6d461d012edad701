"""Trace accuracy against the exact trace, per HVP budget, and the cost of one HVP — in one run.

Accuracy (``--seeds`` seeded runs per cell, budgets 10, 30 and 100 HVPs):

- ``hutchinson``: ``dcc.estimate(..., backend="pyhessian", num_hvps=b)`` (Hutchinson, 1989);
- ``hutch++``: ``dcc.estimate(..., backend="hutchpp", num_hvps=b)`` (Meyer, Musco, Musco &
  Woodruff, SOSA 2021, with the adaptive split of :mod:`deconcnn_curvature.linalg.hutchpp`);
- ``raw pyhessian``: ``pyhessian.hessian(model, criterion, data=(x, y), cuda=False).trace()`` with
  its defaults (``maxIter=100, tol=1e-3``), on a deep copy (it sets eval mode for good and writes
  graph-carrying ``.grad``), seeded through the global RNG it draws from; it returns the list of
  its samples, so its HVP count is ``len(samples)`` and its "interval" is a Student-t interval
  computed here from those samples (PyHessian reports none).

on three problems with an exact trace:

- ``cnn_init``: a tiny CNN (conv 3→8, ReLU, avg-pool, linear 72→10; 954 parameters, float64) at
  initialisation on a fixed synthetic 10-class data set of 256 images 3×8×8 — a flat, indefinite
  spectrum;
- ``cnn_trained``: the same network trained here to near convergence (full-batch SGD with
  momentum and weight decay, 1500 steps, deterministic, a few seconds) — nine outliers, one per
  class but one, over a small bulk, the shape of trained-network spectra;
- ``dense_outliers``: a 1000×1000 matrix with 10 eigenvalues spread over 10–100 and a bulk uniform
  on [0, 1], multiplied directly (estimators of :mod:`deconcnn_curvature.linalg`).

The exact traces and spectra of the networks come from dense Hessians (``torch.func.hessian``).
Reported per cell: mean and median relative error ``|est − tr| / |tr|``, the coverage of the
nominal 95 % interval, the mean HVPs used. On ``cnn_trained`` also ``quantity="eigenvalues"`` with
the backend's defaults (Hutch++ + Rayleigh–Ritz, Lanczos only where needed): how often the trace
from the same call is within 5 % and λ_max within 1 %, with how many HVPs.

Cost (CPU seconds of this process, ``--threads`` torch threads, minimum over interleaved rounds —
wall time on a shared machine measures other users' load): one gradient (forward + backward of the
mean loss, the unit), the gradient graph built once per batch, one HVP through
:class:`~deconcnn_curvature.hvp.HessianOperator` with ``probe_batch`` 1 (PyHessian's sequential
product) and 4/8 (vectorised, ``is_grads_batched``), the end-to-end ``dcc.estimate(...,
backend="hutchpp", num_hvps=30)`` per HVP, and raw PyHessian's ``trace`` per HVP (graph reused);
on the tiny CNN (float32, 256 images) and on deconCNN's ``resnet18_cifar(width_mult=0.125)``
(float32, 128 CIFAR-shaped images, eval mode; with BatchNorm, and in the full run also with
``norm_type="none"``).

The accuracy cells run in ``--jobs`` single-threaded processes; the cost section runs alone
afterwards. Everything is seeded: two runs print the same accuracy numbers.

    python benchmarks/trace_accuracy.py            # full run (~10 min on 2 cores)
    python benchmarks/trace_accuracy.py --quick    # smoke run (~1 min)

Prints the tables and writes ``benchmarks/results/trace_accuracy.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from scipy import stats
from torch import nn
from torch.func import functional_call, hessian

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "trace_accuracy.json"
BUDGETS = (10, 30, 100)
LEVEL = 0.95
N_SAMPLES, N_CLASSES = 256, 10

Batch = tuple[torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------------------- cases


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, N_CLASSES),
    )


def synthetic_data(dtype: torch.dtype) -> Batch:
    """256 images 3×8×8: class mean (one random image per class) plus unit Gaussian noise."""
    g = torch.Generator().manual_seed(1)
    means = torch.randn(N_CLASSES, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.arange(N_SAMPLES) % N_CLASSES
    x = means[y] + torch.randn(N_SAMPLES, 3, 8, 8, generator=g, dtype=torch.float64)
    return x.to(dtype), y


def init_cnn(dtype: torch.dtype) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return tiny_cnn().to(dtype).eval()


def train_cnn(model: nn.Module, batch: Batch, steps: int = 1500) -> dict[str, float]:
    """Full-batch SGD (lr 0.2, momentum 0.9, weight decay 5e-3): deterministic, seconds."""
    x, y = batch
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    model.eval()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        out = model(x)
        return {
            "steps": steps,
            "train_loss": float(loss_fn(out, y)),
            "train_accuracy": float((out.argmax(1) == y).double().mean()),
        }


def dense_hessian(model: nn.Module, loss_fn: nn.Module, batch: Batch) -> torch.Tensor:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    x, y = batch

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, sizes)
        ps = {n: t.view(s) for (n, _), t, s in zip(named, parts, shapes, strict=True)}
        return loss_fn(functional_call(model, ps, (x,)), y)

    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    h = hessian(loss_of)(flat)
    return (h + h.T) / 2


def dense_outliers(n: int = 1000) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    eigs = torch.cat(
        [
            torch.linspace(10, 100, 10, dtype=torch.float64),
            torch.rand(n - 10, generator=g, dtype=torch.float64),
        ]
    )
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = (u * eigs) @ u.T
    return (a + a.T) / 2


def spectrum_summary(h: torch.Tensor) -> dict[str, float]:
    e = torch.linalg.eigvalsh(h)
    fro = float(e.square().sum())
    top10 = float(e.abs().sort().values[-10:].square().sum())
    return {
        "dim": int(h.shape[0]),
        "trace": float(h.trace()),
        "lambda_max": float(e[-1]),
        "lambda_min": float(e[0]),
        "lambda_11": float(e[-11]),
        "top10_frobenius_share": top10 / fro,
        "negative_share": float(e[e < 0].abs().sum() / e.abs().sum()),
    }


# ------------------------------------------------------------------------------------- accuracy


def _cell(values: list[float], cis: list[tuple[float, float]], n_hvp: list[int], exact: float):
    errs = [abs(v - exact) / abs(exact) for v in values]
    covered = [lo <= exact <= hi for lo, hi in cis]
    return {
        "runs": len(values),
        "mean_rel_error": statistics.fmean(errs),
        "median_rel_error": statistics.median(errs),
        "max_rel_error": max(errs),
        "coverage": sum(covered) / len(covered),
        "mean_n_hvp": statistics.fmean(n_hvp),
        "min_n_hvp": min(n_hvp),
        "max_n_hvp": max(n_hvp),
    }


def accuracy_network(
    model: nn.Module, batch: Batch, exact: float, seeds: int
) -> dict[str, dict[str, Any]]:
    import deconcnn_curvature as dcc

    loss_fn = nn.CrossEntropyLoss()
    out: dict[str, dict[str, Any]] = {}
    for method, backend in (("hutchinson", "pyhessian"), ("hutch++", "hutchpp")):
        for b in BUDGETS:
            rs = [
                dcc.estimate(model, loss_fn, batch, "trace", backend, seed=s, num_hvps=b)
                for s in range(seeds)
            ]
            out[f"{method}/{b}"] = _cell(
                [r.value for r in rs], [r.ci for r in rs], [r.n_hvp for r in rs], exact
            )
    return out


def accuracy_dense(a: torch.Tensor, exact: float, seeds: int) -> dict[str, dict[str, Any]]:
    from deconcnn_curvature.linalg import DenseOperator, hutchinson, hutchpp
    from deconcnn_curvature.linalg.operator import make_generator

    out: dict[str, dict[str, Any]] = {}
    for method, fn in (("hutchinson", hutchinson), ("hutch++", hutchpp)):
        for b in BUDGETS:
            es = [fn(DenseOperator(a), b, generator=make_generator(s, "cpu")) for s in range(seeds)]
            out[f"{method}/{b}"] = _cell(
                [e.value for e in es], [e.ci for e in es], [e.n_matvecs for e in es], exact
            )
    return out


def raw_pyhessian(model: nn.Module, batch: Batch, exact: float, seeds: int) -> dict[str, Any]:
    """PyHessian 0.1's own ``trace()`` at its defaults, one fresh ``hessian`` object per seed."""
    from pyhessian import hessian as PyHessian

    values, cis, n_hvp = [], [], []
    for s in range(seeds):
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its create_graph backward warns about a leak
            torch.manual_seed(s)
            samples = PyHessian(copy.deepcopy(model), nn.CrossEntropyLoss(), data=batch, cuda=False)
            samples = samples.trace()
        m = len(samples)
        mean = statistics.fmean(samples)
        if m > 1:
            half = float(stats.t.ppf(0.5 + LEVEL / 2, m - 1)) * statistics.stdev(samples)
            cis.append((mean - half / math.sqrt(m), mean + half / math.sqrt(m)))
        else:
            cis.append((-math.inf, math.inf))
        values.append(mean)
        n_hvp.append(m)
    return _cell(values, cis, n_hvp, exact)


def eigen_from_one_call(
    model: nn.Module, batch: Batch, exact: dict[str, float], seeds: int
) -> dict[str, Any]:
    """``quantity="eigenvalues"`` on hutchpp at its defaults: λ_max and the trace from one call."""
    import deconcnn_curvature as dcc

    rs = [
        dcc.estimate(model, nn.CrossEntropyLoss(), batch, "eigenvalues", "hutchpp", seed=s)
        for s in range(seeds)
    ]
    lam_err = [abs(r.value[0] - exact["lambda_max"]) / exact["lambda_max"] for r in rs]
    tr_err = [abs(r.also["trace"].value - exact["trace"]) / abs(exact["trace"]) for r in rs]
    both = [t <= 0.05 and e <= 0.01 for t, e in zip(tr_err, lam_err, strict=True)]
    return {
        "runs": len(rs),
        "defaults": {
            k: dcc.get_backend("hutchpp").option_map()[k].default
            for k in ("num_hvps", "eig_rtol", "max_hvps")
        },
        "lambda_max_mean_rel_error": statistics.fmean(lam_err),
        "lambda_max_max_rel_error": max(lam_err),
        "trace_mean_rel_error": statistics.fmean(tr_err),
        "share_trace_5pct_and_lambda_1pct": sum(both) / len(both),
        "mean_n_hvp": statistics.fmean(r.n_hvp for r in rs),
        "max_n_hvp": max(r.n_hvp for r in rs),
        "share_lanczos_refined": sum("lanczos" in r.details["methods"] for r in rs) / len(rs),
    }


def _network_job(
    model: nn.Module, batch: Batch, case: dict[str, Any], seeds: int, threads: int
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    out = accuracy_network(model, batch, case["trace"], seeds)
    out["raw_pyhessian"] = raw_pyhessian(model, batch, case["trace"], seeds)
    if "training" in case:
        out["eigenvalues_one_call"] = eigen_from_one_call(model, batch, case, seeds)
    return out


def _dense_job(a: torch.Tensor, case: dict[str, Any], seeds: int, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    return accuracy_dense(a, case["trace"], seeds)


# ----------------------------------------------------------------------------------------- cost


def _cpu(fn: Callable[[], Any]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def cost(
    name: str,
    model: nn.Module,
    batch: Batch,
    *,
    rounds: int,
    probes: int,
    batches: tuple[int, ...],
    estimate_hvps: int = 30,
) -> dict[str, Any]:
    from pyhessian import hessian as PyHessian

    import deconcnn_curvature as dcc
    from deconcnn_curvature.hvp import HessianOperator
    from deconcnn_curvature.linalg.operator import make_generator, rademacher
    from deconcnn_curvature.problem import build_problem, preserve_state

    loss_fn = nn.CrossEntropyLoss()
    x, y = batch
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    problem = build_problem(model, loss_fn, batch)
    v = rademacher(
        problem.dim, probes, generator=make_generator(0, "cpu"), dtype=problem.dtype, device="cpu"
    )

    def gradient() -> None:
        torch.autograd.grad(loss_fn(model(x), y), params)

    def graph() -> None:
        torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)

    t: dict[str, list[float]] = {"gradient": [], "graph": []}
    with preserve_state(model):
        ops = {pb: HessianOperator(problem, probe_batch=pb) for pb in batches}
        ref = ops[1].matmat(v)  # warm-up, and the batched products checked against it
        diff = {
            pb: float((op.matmat(v) - ref).abs().max() / ref.abs().max())
            for pb, op in ops.items()
            if pb != 1
        }
        gradient()
        for _ in range(rounds):  # interleaved: load changes hit every measurement alike
            t["gradient"].append(min(_cpu(gradient) for _ in range(3)))
            t["graph"].append(_cpu(graph))
            for pb, op in ops.items():
                t.setdefault(f"hvp/{pb}", []).append(_cpu(lambda op=op: op.matmat(v)) / probes)
        for op in ops.values():
            op.close()

    def estimate(pb: int) -> None:
        dcc.estimate(
            model,
            loss_fn,
            batch,
            "trace",
            "hutchpp",
            seed=0,
            num_hvps=estimate_hvps,
            probe_batch=pb,
        )

    pyh_iters = max(probes // 2, 4)

    def raw() -> None:
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            h = PyHessian(copy.deepcopy(model), loss_fn, data=batch, cuda=False)
            t.setdefault("raw_pyhessian_hvp", []).append(
                _cpu(lambda: h.trace(maxIter=pyh_iters, tol=-math.inf)) / pyh_iters
            )

    for _ in range(max(1, rounds // 2)):
        for pb in (1, max(batches)):
            t.setdefault(f"estimate/{pb}", []).append(
                _cpu(lambda pb=pb: estimate(pb)) / estimate_hvps
            )
        raw()
    grad = min(t["gradient"])
    return {
        "model": name,
        "dim": problem.dim,
        "batch": int(y.shape[0]),
        "dtype": str(problem.dtype),
        "estimate_hvps": estimate_hvps,
        "gradient_cpu_s": grad,
        "ratio": {k: min(vs) / grad for k, vs in t.items() if k != "gradient"},
        "batched_vs_sequential_max_rel_diff": diff,
    }


# ----------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few seeds and rounds")
    parser.add_argument("--seeds", type=int, default=None, help="runs per cell (default 100)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--jobs", type=int, default=2, help="processes for the accuracy cells (default 2)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    seeds = args.seeds or (8 if args.quick else 100)
    rounds = 2 if args.quick else 5
    torch.set_num_threads(args.threads)
    began = time.perf_counter()

    # -- problems and their exact traces
    batch64 = synthetic_data(torch.float64)
    cnn0 = init_cnn(torch.float64)
    cnn1 = copy.deepcopy(cnn0)
    tic = time.perf_counter()
    training = train_cnn(cnn1, batch64)
    training["seconds"] = time.perf_counter() - tic
    loss_fn = nn.CrossEntropyLoss()
    cases: dict[str, dict[str, Any]] = {
        "cnn_init": spectrum_summary(dense_hessian(cnn0, loss_fn, batch64)),
        "cnn_trained": {
            **spectrum_summary(dense_hessian(cnn1, loss_fn, batch64)),
            "training": training,
        },
    }
    dense = dense_outliers()
    cases["dense_outliers"] = spectrum_summary(dense)
    print(f"problems ready in {time.perf_counter() - began:.0f} s", flush=True)

    # -- accuracy
    jobs = {
        "cnn_init": (_network_job, (cnn0, batch64, cases["cnn_init"], seeds, args.threads)),
        "cnn_trained": (_network_job, (cnn1, batch64, cases["cnn_trained"], seeds, args.threads)),
        "dense_outliers": (_dense_job, (dense, cases["dense_outliers"], seeds, args.threads)),
    }
    # Independent cells, one single-threaded process each (spawned: no forked OpenMP state).
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {name: pool.submit(fn, *job_args) for name, (fn, job_args) in jobs.items()}
        accuracy = {name: f.result() for name, f in futures.items()}
    eigen = accuracy["cnn_trained"].pop("eigenvalues_one_call")
    print(f"accuracy done at {time.perf_counter() - began:.0f} s", flush=True)

    # -- cost

    x32, y32 = synthetic_data(torch.float32)
    costs = [
        cost(
            "tiny_cnn",
            init_cnn(torch.float32),
            (x32, y32),
            rounds=rounds * 4,
            probes=16,
            batches=(1, 4, 8),
        )
    ]
    for norm_type in ("batchnorm",) if args.quick else ("batchnorm", "none"):
        resnet, cifar = _resnet(norm_type)
        costs.append(
            cost(
                f"resnet18_cifar(width_mult=0.125, norm_type={norm_type!r})",
                resnet,
                cifar,
                rounds=rounds,
                probes=4 if args.quick else 8,
                batches=(1, 4) if args.quick else (1, 4, 8),
                estimate_hvps=10 if args.quick else 30,
            )
        )
    seconds = time.perf_counter() - began

    targets = _targets(accuracy, costs)
    _print(cases, accuracy, eigen, costs, targets)
    out = {
        "benchmark": "trace_accuracy",
        "settings": {
            "quick": args.quick,
            "seeds": seeds,
            "rounds": rounds,
            "threads": args.threads,
            "jobs": args.jobs,
            "budgets": list(BUDGETS),
            "ci_level": LEVEL,
        },
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "seconds": seconds,
        "cases": cases,
        "accuracy": accuracy,
        "eigenvalues_one_call": eigen,
        "cost": costs,
        "targets": targets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out} ({seconds:.0f} s)")


def _resnet(norm_type: str) -> tuple[nn.Module, Batch]:
    """deconCNN's CIFAR ResNet-18 at 1/8 width (8/16/32/64 channels), 128 images, eval mode."""
    from deconcnn_curvature.training.resnet_cifar import resnet18_cifar

    with torch.random.fork_rng():
        torch.manual_seed(0)
        resnet = resnet18_cifar(width_mult=0.125, norm_type=norm_type)
        resnet.train()
        with torch.no_grad():  # non-trivial BatchNorm running statistics
            for _ in range(2):
                resnet(torch.randn(128, 3, 32, 32))
        resnet.eval()
        return resnet, (torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,)))


def _targets(accuracy: dict[str, Any], costs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def ratio(case: str) -> float:
        a = accuracy[case]
        return a["hutch++/30"]["mean_rel_error"] / a["hutchinson/30"]["mean_rel_error"]

    def coverage(method: str) -> float:
        return min(
            cell["coverage"]
            for cells in accuracy.values()
            for key, cell in cells.items()
            if key.startswith(method + "/")
        )

    cov, cov_hutchinson = coverage("hutch++"), coverage("hutchinson")
    resnet = costs[1]["ratio"]  # the BatchNorm ResNet
    per_hvp = min(v for k, v in resnet.items() if k.startswith("hvp/"))
    return [
        {
            "target": "hutch++/hutchinson mean rel. error, cnn_trained, 30 HVPs <= 1/3",
            "measured": ratio("cnn_trained"),
            "met": ratio("cnn_trained") <= 1 / 3,
        },
        {
            "target": "hutch++/hutchinson mean rel. error, cnn_init (flat), 30 HVPs <= 1.25",
            "measured": ratio("cnn_init"),
            "met": ratio("cnn_init") <= 1.25,
        },
        {
            "target": "hutch++ 95 % interval coverage >= 0.90 in every cell",
            "measured": cov,
            "met": cov >= 0.90,
        },
        {
            "target": "(for reference) Hutchinson 95 % interval coverage >= 0.90 in every cell",
            "measured": cov_hutchinson,
            "met": cov_hutchinson >= 0.90,
        },
        {
            "target": "time per HVP <= 2.0 gradients on the small ResNet (CPU, best probe_batch)",
            "measured": per_hvp,
            "met": per_hvp <= 2.0,
        },
    ]


def _print(cases, accuracy, eigen, costs, targets) -> None:
    print("\nproblems (exact, from dense Hessians)")
    print(f"{'case':<16}{'dim':>6}{'trace':>11}{'λ_max':>10}{'λ_11':>9}{'top10 ‖·‖²_F':>14}")
    for name, c in cases.items():
        print(
            f"{name:<16}{c['dim']:>6}{c['trace']:>11.4g}{c['lambda_max']:>10.4g}"
            f"{c['lambda_11']:>9.3g}{c['top10_frobenius_share']:>14.2f}"
        )
    print("\nmean relative error of the trace | coverage of the 95 % interval (per cell)")
    print(f"{'case':<16}{'HVPs':>5}{'Hutchinson':>18}{'Hutch++':>18}{'ratio':>8}")
    for name, cells in accuracy.items():
        for b in BUDGETS:
            h, p = cells[f"hutchinson/{b}"], cells[f"hutch++/{b}"]
            print(
                f"{name:<16}{b:>5}{h['mean_rel_error']:>11.4f} |{h['coverage']:>5.2f}"
                f"{p['mean_rel_error']:>11.4f} |{p['coverage']:>5.2f}"
                f"{p['mean_rel_error'] / h['mean_rel_error']:>8.2f}"
            )
        raw = cells.get("raw_pyhessian")
        if raw:
            print(
                f"{name:<16}{'raw pyhessian .trace() defaults':>34}: "
                f"error {raw['mean_rel_error']:.4f}"
                f" (max {raw['max_rel_error']:.3f}), HVPs {raw['mean_n_hvp']:.1f} "
                f"[{raw['min_n_hvp']}-{raw['max_n_hvp']}], t-interval coverage "
                f"{raw['coverage']:.2f}"
            )
    print(
        f"\ncnn_trained, quantity='eigenvalues' at defaults {eigen['defaults']}: trace within 5 % "
        f"and λ_max within 1 % in {100 * eigen['share_trace_5pct_and_lambda_1pct']:.0f} % of "
        f"{eigen['runs']} runs; λ_max error mean {eigen['lambda_max_mean_rel_error']:.1e} max "
        f"{eigen['lambda_max_max_rel_error']:.1e}; HVPs mean {eigen['mean_n_hvp']:.1f} max "
        f"{eigen['max_n_hvp']}; Lanczos refined {100 * eigen['share_lanczos_refined']:.0f} %"
    )
    print("\ntime / one gradient (CPU seconds, min over interleaved rounds; pb = probe_batch)")
    keys = sorted({k for c in costs for k in c["ratio"]}, key=_cost_order)
    labels = [k.replace("hvp/", "hvp pb").replace("estimate/", "est pb") for k in keys]
    labels = [lb.replace("raw_pyhessian_hvp", "raw pyh") for lb in labels]
    print(f"{'model':<18}{'dim':>8}{'grad ms':>9}" + "".join(f"{lb:>9}" for lb in labels))
    for c in costs:
        cells = "".join(f"{c['ratio'][k]:>9.2f}" if k in c["ratio"] else f"{'-':>9}" for k in keys)
        name = c["model"].replace("resnet18_cifar(width_mult=0.125, norm_type=", "resnet18/8 ")
        name = name.replace("'batchnorm')", "BN").replace("'none')", "no-norm")
        print(f"{name:<18}{c['dim']:>8}{1e3 * c['gradient_cpu_s']:>9.2f}{cells}")
    print(
        "  hvp: one HessianOperator product (graph reused); est: dcc.estimate(..., 'hutchpp', "
        "num_hvps=30, 10 with --quick) end to end per HVP; raw pyh: pyhessian's trace() per HVP"
    )
    print("\ntargets")
    for t in targets:
        print(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['measured']:.3f}")


def _cost_order(key: str) -> tuple[int, int]:
    kind, _, pb = key.partition("/")
    order = ["graph", "hvp", "estimate", "raw_pyhessian_hvp"].index(kind)
    return order, int(pb) if pb else 0


if __name__ == "__main__":
    main()
