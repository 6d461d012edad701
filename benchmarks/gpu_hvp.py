"""HVP cost and memory on one device: sequential vs batched probes, and ours vs raw PyHessian.

Measured in one run on the CIFAR ResNet-18 (``deconcnn_curvature.training.resnet_cifar``, width 1.0,
batch 128, float32, eval mode — BatchNorm on running statistics, as ``estimate`` measures it):

* gradient time (forward + ``autograd.grad``) — the unit of every ratio;
* our Hessian-vector product per probe with the gradient graph reused, ``probe_batch=1``
  (PyHessian's sequential product) and ``probe_batch=8`` (one vectorised call for 8 probes);
* raw ``pyhessian.hessian``'s own product per probe on the same batch;
* peak CUDA memory above the resident model and batch of an 8-probe Hutchinson trace: ours
  (``dcc.estimate``, both probe batches) vs ``pyhessian.hessian(...).trace(maxIter=8)``;
* the same 8-probe trace end to end, ours vs PyHessian (time);
* one CurvatureMonitor measurement at its defaults (trace with 50 probes + λ_max by Lanczos) in
  training steps (forward, backward, SGD step on the same batch), and the resulting overhead at
  deconCNN's cadence of one measurement every 500 steps (``benchmarks/monitor_overhead.py`` times
  whole Lightning runs, on CPU).

Prints a table of ratios and writes JSON to ``--out`` (default ``$OUT/gpu_hvp.json`` when ``$OUT``
is set, else ``benchmarks/results/gpu_hvp.json``). ``--quick`` shrinks everything for a CPU smoke
run (``--device cpu --quick`` checks the script's logic in seconds). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import deconcnn_curvature as dcc  # noqa: E402
from deconcnn_curvature.hvp import HessianOperator  # noqa: E402
from deconcnn_curvature.linalg.operator import make_generator, rademacher  # noqa: E402
from deconcnn_curvature.problem import build_problem, preserve_state  # noqa: E402

PROBES = 8


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    warmup = 1 if repeats == 1 else 2
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_model(width: float, quick: bool) -> tuple[nn.Module, str]:
    try:
        from deconcnn_curvature.training.resnet_cifar import resnet18_cifar
    except ImportError:  # the reference training pieces are not installed: a stand-in
        model = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
        )  # fmt: skip
        return model, "small_cnn_standin"
    return resnet18_cifar(width_mult=0.125 if quick else width), "resnet18_cifar"


def _memory_run(device: torch.device, fn: Callable[[], Any]) -> int | None:
    """Peak CUDA memory allocated by ``fn`` above what was resident before it."""
    if device.type != "cuda":
        fn()
        return None
    gc.collect()
    torch.cuda.empty_cache()
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch.cuda.is_available() is False")
        torch.cuda.set_device(device)  # PyHessian hard-codes 'cuda' (the current device)
    torch.manual_seed(0)
    model, model_name = build_model(args.width, args.quick)
    model = model.to(device).eval()
    batch = 2 if args.quick else args.batch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    loss_fn = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    repeats = 1 if args.quick else args.repeats

    def gradient() -> None:
        torch.autograd.grad(loss_fn(model(x), y), params)

    times: dict[str, float] = {"gradient": median_seconds(gradient, device, repeats)}

    problem = build_problem(model, loss_fn, (x, y))
    gen = make_generator(0, device)
    v = rademacher(dim, PROBES, generator=gen, dtype=problem.dtype, device=device)
    with preserve_state(model):

        def build_graph() -> None:
            HessianOperator(problem, probe_batch=1).close()

        times["graph_build"] = median_seconds(build_graph, device, repeats)
        for pb in (1, PROBES):
            op = HessianOperator(problem, probe_batch=pb)
            per_block = median_seconds(lambda op=op: op.matmat(v), device, repeats)
            times[f"hvp_per_probe_pb{pb}"] = per_block / PROBES
            op.close()
            del op

    import pyhessian
    from pyhessian.utils import hessian_vector_product

    use_cuda = device.type == "cuda"
    raw = pyhessian.hessian(model, loss_fn, data=(x, y), cuda=use_cuda)
    vs = [
        t.view_as(p)
        for t, p in zip(torch.split(v[:, 0], [p.numel() for p in params]), params, strict=True)
    ]

    def raw_product(raw: Any = raw, vs: list[torch.Tensor] = vs) -> None:
        hessian_vector_product(raw.gradsH, raw.params, vs)

    times["pyhessian_hvp_per_probe"] = median_seconds(raw_product, device, repeats)
    del raw, vs
    model.zero_grad(set_to_none=True)  # PyHessian leaves graph-carrying .grad tensors behind

    memory: dict[str, int | None] = {}
    end_to_end: dict[str, float] = {}
    for pb in (1, PROBES):

        def ours_trace(pb: int = pb) -> None:
            r = dcc.estimate(
                model, loss_fn, (x, y), "trace", seed=0, num_hvps=PROBES, probe_batch=pb
            )
            assert r.n_hvp == PROBES and (device.type != "cuda" or r.peak_memory_bytes)

        start = time.perf_counter()
        memory[f"ours_trace_pb{pb}"] = _memory_run(device, ours_trace)
        end_to_end[f"ours_trace_pb{pb}"] = time.perf_counter() - start

    def pyhessian_trace() -> None:
        h = pyhessian.hessian(model, loss_fn, data=(x, y), cuda=use_cuda)
        h.trace(maxIter=PROBES, tol=float("-inf"))
        del h

    start = time.perf_counter()
    memory["pyhessian_trace"] = _memory_run(device, pyhessian_trace)
    end_to_end["pyhessian_trace"] = time.perf_counter() - start
    model.zero_grad(set_to_none=True)

    # One CurvatureMonitor measurement with its defaults (trace with 50 probes + λ_max), against
    # a training step (forward, backward, SGD with momentum) on the same batch: the overhead a
    # deconCNN run pays at its cadence of one measurement every 500 steps.
    trained = copy.deepcopy(model).train()
    opt = torch.optim.SGD(trained.parameters(), lr=0.01, momentum=0.9)

    def train_step(net: nn.Module = trained, opt: torch.optim.Optimizer = opt) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()

    times["train_step"] = median_seconds(train_step, device, repeats)
    del train_step, trained, opt
    budget = {"trace": {"num_hvps": 4 if args.quick else 50}, "eigenvalues": {}}
    if args.quick:
        budget["eigenvalues"] = {"max_hvps": 5}
    monitor: dict[str, float] = {}
    for quantity, opts in budget.items():
        _sync(device)
        start = time.perf_counter()
        r = dcc.estimate(model, loss_fn, (x, y), quantity, seed=0, **opts)
        _sync(device)
        monitor[f"{quantity}_seconds"] = time.perf_counter() - start
        monitor[f"{quantity}_n_hvp"] = r.n_hvp
    measurement = monitor["trace_seconds"] + monitor["eigenvalues_seconds"]
    monitor["measurement_seconds"] = measurement
    monitor["measurement_in_train_steps"] = measurement / times["train_step"]
    monitor["overhead_every_500_steps"] = measurement / (500 * times["train_step"])

    grad = times["gradient"]
    ratios = {
        "hvp_pb1_over_gradient": times["hvp_per_probe_pb1"] / grad,
        f"hvp_pb{PROBES}_over_gradient": times[f"hvp_per_probe_pb{PROBES}"] / grad,
        f"speedup_pb{PROBES}_vs_pb1": times["hvp_per_probe_pb1"]
        / times[f"hvp_per_probe_pb{PROBES}"],
        "pyhessian_hvp_over_gradient": times["pyhessian_hvp_per_probe"] / grad,
        "graph_build_over_gradient": times["graph_build"] / grad,
        "monitor_overhead_every_500_steps": monitor["overhead_every_500_steps"],
        "trace8_ours_pb1_over_pyhessian": end_to_end["ours_trace_pb1"]
        / end_to_end["pyhessian_trace"],
        f"trace8_ours_pb{PROBES}_over_pyhessian": end_to_end[f"ours_trace_pb{PROBES}"]
        / end_to_end["pyhessian_trace"],
    }
    if memory["pyhessian_trace"]:
        for pb in (1, PROBES):
            ours = memory[f"ours_trace_pb{pb}"]
            ratios[f"peak_memory_ours_pb{pb}_over_pyhessian"] = (ours or 0) / memory[
                "pyhessian_trace"
            ]
    return {
        "benchmark": "gpu_hvp",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if use_cuda else platform.processor(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "model": model_name,
        "width_mult": 0.125 if args.quick else args.width,
        "batch": batch,
        "dtype": str(problem.dtype),
        "params": dim,
        "probes": PROBES,
        "repeats": repeats,
        "quick": args.quick,
        "seconds": times,
        "end_to_end_trace8_seconds": end_to_end,
        "peak_memory_bytes": memory,
        "monitor_measurement": monitor,
        "ratios": ratios,
    }


def print_table(report: dict[str, Any]) -> None:
    print(
        f"\n{report['model']} (width {report['width_mult']}, batch {report['batch']}, "
        f"{report['params']:,} parameters) on {report['device']} ({report['device_name']})"
    )
    print(f"{'quantity':<42} {'value':>14}")
    for key, value in report["seconds"].items():
        print(f"{key + ' [ms]':<42} {value * 1e3:>14.3f}")
    for key, value in report["end_to_end_trace8_seconds"].items():
        print(f"{'trace8 ' + key + ' [ms]':<42} {value * 1e3:>14.3f}")
    for key, value in report["peak_memory_bytes"].items():
        shown = "n/a (CPU)" if value is None else f"{value / 2**20:.1f}"
        print(f"{'peak ' + key + ' [MiB]':<42} {shown:>14}")
    for key, value in report["monitor_measurement"].items():
        print(f"{'monitor ' + key:<42} {value:>14.4g}")
    for key, value in report["ratios"].items():
        print(f"{key:<42} {value:>14.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--width", type=float, default=1.0, help="ResNet-18 width_mult")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a CPU smoke run")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)
    report = run(args)
    print_table(report)
    out = args.out
    if out is None:
        folder = (
            Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
        )
        out = folder / "gpu_hvp.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
