"""Cost of one Hessian-vector product by every path, as a ratio to one gradient, in one run.

For each model, in this one process, every path multiplies the same ``--probes`` Rademacher probes
on the same batch; the repetitions of all paths are interleaved (round 1 of every path, then round
2, ...) so that load from other users of the machine hits all of them alike, and each figure is
the median over ``--reps`` rounds of (seconds for ``--probes`` products) / ``--probes``, divided by
the median seconds of one gradient (forward + backward of the mean loss) measured in the same
rounds. Seconds are the process's CPU time on the CPU (``time.process_time``; run with
``--threads 1`` on a shared machine), wall time after ``torch.cuda.synchronize`` on CUDA.

Paths (rows):

- ``double_backward``: :class:`~deconcnn_curvature.hvp.HessianOperator` with its gradient graph
  built once and reused, one probe per autograd call (PyHessian's ``hessian_vector_product``) —
  the package's default;
- ``double_backward_batched``: the same graph, ``--block`` probes per call
  (``torch.autograd.grad(..., is_grads_batched=True)``, i.e. ``probe_batch=--block``);
- ``forward_over_reverse``: ``hvp_path="forward_over_reverse"``: ``torch.func.jvp`` over
  ``torch.func.grad`` through ``functional_call``, one probe per call, no graph kept;
- ``forward_over_reverse_vmap``: the same mapped over ``--block`` probes with ``torch.func.vmap``;
- ``compiled[...]``: ``torch.compile`` of the fastest ``torch.func`` path (the double backward
  cannot be captured: ``torch.autograd.grad`` on a retained graph is a graph break) — a failure is
  a row with its reason; the compile time is reported apart and excluded from the ratio;
- ``curvlinops``: ``curvlinops.HessianLinearOperator(...) @ v`` (skipped when
  ``curvlinops-for-pytorch`` is not installed: ``pip install -c constraints curvlinops-for-pytorch``
  with torch pinned);
- ``pyhessian_raw``: PyHessian 0.1's own ``hessian(...)`` object and
  ``pyhessian.utils.hessian_vector_product`` on its graph (on a copy of the model: PyHessian
  writes graph-carrying ``.grad``).

Memory (``--memory``, CPU: peak resident memory above the level before the call, sampled every
millisecond, each measurement in a fresh process; CUDA: ``torch.cuda.max_memory_allocated``): a
Hutch++ trace of ``--memory-hvps`` products (``dcc.estimate(..., "hutchpp")``) per path against
raw PyHessian's ``trace(maxIter=--memory-hvps)`` on the same batch.

Models: ``resnet`` = ``resnet18_cifar(width_mult=--width)`` (BatchNorm, measured in eval mode with
non-trivial running statistics) on a batch of ``--batch`` 3×32×32 images, and ``cnn`` =
``small_cnn(width=8)`` on the same batch; float32.

    python benchmarks/hvp_paths.py [--device cpu|cuda] [--reps 7] [--probes 8] [--batch 128]
        [--width 0.125] [--threads 1] [--block 8] [--no-compile] [--memory] [--quick]
        [--out benchmarks/results/hvp_paths.json]

``--quick`` is a smoke run (batch 16, 2 probes, 2 rounds, the tiny CNN only).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "hvp_paths.json"
sys.path.insert(0, str(ROOT))

import deconcnn_curvature as dcc  # noqa: E402
from deconcnn_curvature.hvp import HessianOperator  # noqa: E402
from deconcnn_curvature.linalg.operator import make_generator, rademacher  # noqa: E402
from deconcnn_curvature.problem import build_problem, preserve_state  # noqa: E402
from deconcnn_curvature.training.resnet_cifar import resnet18_cifar, small_cnn  # noqa: E402


def _models(args: argparse.Namespace) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    out: dict[str, nn.Module] = {"cnn": small_cnn(width=8)}
    if not args.quick:
        out = {"resnet": resnet18_cifar(width_mult=args.width), **out}
    for model in out.values():
        model.to(args.device).train()
        with torch.no_grad():  # non-trivial BatchNorm running statistics
            for _ in range(2):
                model(torch.randn(args.batch, 3, 32, 32, device=args.device))
        model.eval()
    return out


class _Clock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            return time.perf_counter() - start
        start = time.process_time()
        fn()
        return time.process_time() - start


def _flat_params(params: list[torch.Tensor], v: torch.Tensor) -> list[torch.Tensor]:
    out, i = [], 0
    for p in params:
        out.append(v[i : i + p.numel()].view_as(p))
        i += p.numel()
    return out


def _paths(
    model: nn.Module,
    loss_fn: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    v: torch.Tensor,
    args: argparse.Namespace,
) -> tuple[dict[str, Callable[[], torch.Tensor]], dict[str, str], list[Callable[[], None]]]:
    """Each path as a function multiplying the block ``v`` (dim × probes); rows that cannot run
    are returned with their reason; closers free what the paths hold."""
    x, y = batch
    problem = build_problem(model, loss_fn, batch)
    fns: dict[str, Callable[[], torch.Tensor]] = {}
    failed: dict[str, str] = {}
    closers: list[Callable[[], None]] = []
    for name, path, pb in (
        ("double_backward", "double_backward", 1),
        ("double_backward_batched", "double_backward", args.block),
        ("forward_over_reverse", "forward_over_reverse", 1),
        ("forward_over_reverse_vmap", "forward_over_reverse", args.block),
    ):
        op = HessianOperator(problem, probe_batch=pb, hvp_path=path)
        fns[name] = lambda op=op: op.matmat(v)
        closers.append(op.close)

    if not args.no_compile:
        _add_compiled(problem, v, args, fns, failed)

    try:
        from curvlinops import HessianLinearOperator
    except ImportError as exc:
        failed["curvlinops"] = f"skipped: curvlinops-for-pytorch is not installed ({exc})"
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        try:
            hop = HessianLinearOperator(
                model, loss_fn, params, [(x, y)], progressbar=False, check_deterministic=False
            )

            def curv() -> torch.Tensor:
                return torch.stack([hop @ v[:, j] for j in range(v.shape[1])], dim=1)

            fns["curvlinops"] = curv
        except Exception as exc:  # a row with its reason, never a crash of the whole benchmark
            failed["curvlinops"] = f"{type(exc).__name__}: {exc}"

    try:
        from pyhessian import hessian
        from pyhessian.utils import hessian_vector_product

        twin = copy.deepcopy(model)
        h = hessian(twin, loss_fn, data=(x, y), cuda=x.device.type == "cuda")

        def raw() -> torch.Tensor:
            cols = []
            for j in range(v.shape[1]):
                hv = hessian_vector_product(h.gradsH, h.params, _flat_params(h.params, v[:, j]))
                cols.append(torch.cat([t.reshape(-1) for t in hv]))
            return torch.stack(cols, dim=1)

        fns["pyhessian_raw"] = raw
        closers.append(lambda: h.__dict__.clear())
    except Exception as exc:
        failed["pyhessian_raw"] = f"{type(exc).__name__}: {exc}"
    return fns, failed, closers


def _add_compiled(
    problem: Any,
    v: torch.Tensor,
    args: argparse.Namespace,
    fns: dict[str, Callable[[], torch.Tensor]],
    failed: dict[str, str],
) -> None:
    """``torch.compile`` of forward-over-reverse (vmapped over the block, the torch.func path that
    can be captured whole); its compile seconds go in the row's note."""
    model, loss_fn = problem.model, problem.loss_fn
    (x, y) = problem.batches[0]
    names = list(problem.names)
    primals = {n: p.detach() for n, p in zip(names, problem.params, strict=True)}
    shapes = [p.shape for p in problem.params]
    sizes = [p.numel() for p in problem.params]

    def loss_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_fn(torch.func.functional_call(model, params, (x,), strict=False), y)

    def hvp_block(block: torch.Tensor) -> torch.Tensor:
        k = block.shape[1]
        tangents = {
            n: t.T.reshape(k, *s)
            for n, t, s in zip(names, torch.split(block, sizes), shapes, strict=True)
        }

        def one(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return torch.func.jvp(torch.func.grad(loss_of), (primals,), (t,))[1]

        hv = torch.func.vmap(one)(tangents)
        return torch.cat([hv[n].reshape(k, -1) for n in names], dim=1).T

    name = "compiled[forward_over_reverse_vmap]"
    try:
        compiled = torch.compile(hvp_block, dynamic=False)
        start = time.perf_counter()
        with preserve_state(model):
            got = compiled(v)
        seconds = time.perf_counter() - start
        fns[name] = lambda: compiled(v)
        failed[f"{name}:compile_seconds"] = f"{seconds:.1f} (first call, excluded from the ratio)"
        del got
    except Exception as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        failed[name] = reason[:300]
        traceback.print_exc(limit=2)


def measure(name: str, model: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    loss_fn = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    v = rademacher(
        dim, args.probes, generator=make_generator(0, device), dtype=torch.float32, device=device
    )
    clock = _Clock(device)

    def gradient() -> None:
        torch.autograd.grad(loss_fn(model(x), y), params)

    def graph() -> None:
        torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)

    row: dict[str, Any] = {"dim": dim, "batch": args.batch, "probes": args.probes}
    with preserve_state(model):
        fns, notes, closers = _paths(model, loss_fn, (x, y), v, args)
        gradient(), graph()
        reference = fns["double_backward"]()
        scale = float(reference.abs().max())
        row["max_rel_diff_vs_double_backward"] = {}
        for path, fn in list(fns.items()):  # warm-up, and a cross-check of every product
            try:
                got = fn()
                row["max_rel_diff_vs_double_backward"][path] = (
                    float((got - reference).abs().max()) / scale
                )
            except Exception as exc:
                notes[path] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                del fns[path]
        times: dict[str, list[float]] = {k: [] for k in ("gradient", "graph", *fns)}
        for _ in range(args.reps):  # interleaved rounds
            times["gradient"].append(clock(gradient))
            times["graph"].append(clock(graph))
            for path, fn in fns.items():
                times[path].append(clock(fn) / args.probes)
        for close in closers:
            close()
    grad_s = statistics.median(times["gradient"])
    row["gradient_seconds"] = grad_s
    row["ratio"] = {k: statistics.median(ts) / grad_s for k, ts in times.items()}
    row["rounds"] = {k: [t / grad_s for t in ts] for k, ts in times.items()}
    row["notes"] = notes
    return row


_MEMORY_SCRIPT = r"""
import json, os, sys, threading
import torch
from torch import nn
torch.set_num_threads(int(sys.argv[5]))
which, model_name, batch, hvps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if which.startswith("hutchpp:"):
    os.environ["DECONCNN_CURVATURE_HVP_PATH"] = which.split(":", 1)[1]
import deconcnn_curvature as dcc
from pyhessian import hessian
from deconcnn_curvature.training.resnet_cifar import resnet18_cifar, small_cnn

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

torch.manual_seed(0)
model = (resnet18_cifar(width_mult=float(sys.argv[6])) if model_name == "resnet"
         else small_cnn(width=8)).eval()
g = torch.Generator().manual_seed(1)
x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
base = rss(); peak = [base]; stop = threading.Event()
def sample():
    while not stop.wait(0.001):
        peak[0] = max(peak[0], rss())
t = threading.Thread(target=sample, daemon=True); t.start()
if which == "pyhessian_raw":
    hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False).trace(maxIter=hvps, tol=0.0)
else:
    dcc.estimate(model, nn.CrossEntropyLoss(), (x, y), "trace", "hutchpp", seed=0,
                 num_hvps=hvps)
stop.set(); t.join()
print(json.dumps(max(peak[0], rss()) - base))
"""


def memory(name: str, model: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of one Hutch++ trace per path against raw PyHessian's trace."""
    out: dict[str, Any] = {"hvps": args.memory_hvps, "unit": "bytes"}
    whos = ("hutchpp:double_backward", "hutchpp:forward_over_reverse", "pyhessian_raw")
    if args.device == "cpu":
        out["kind"] = "peak RSS above the start, fresh process each, sampled every 1 ms"
        env = {**os.environ, "DECONCNN_CURVATURE_PLUGINS": "", "OMP_NUM_THREADS": "1"}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        for who in whos:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    _MEMORY_SCRIPT,
                    who,
                    name,
                    str(args.batch),
                    str(args.memory_hvps),
                    str(args.threads),
                    str(args.width),
                ],
                capture_output=True,
                text=True,
                env=env,
                timeout=900,
            )
            if proc.returncode != 0:
                out[who] = None
                out[f"{who}:error"] = proc.stderr.strip().splitlines()[-1:]
            else:
                out[who] = int(proc.stdout.strip().splitlines()[-1])
    else:
        from pyhessian import hessian

        out["kind"] = "torch.cuda.max_memory_allocated above the start, same process"
        g = torch.Generator(device="cpu").manual_seed(1)
        x = torch.randn(args.batch, 3, 32, 32, generator=g).to(args.device)
        y = torch.randint(0, 10, (args.batch,), generator=g).to(args.device)
        for who in whos:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            if who == "pyhessian_raw":
                twin = copy.deepcopy(model)
                hessian(twin, nn.CrossEntropyLoss(), data=(x, y), cuda=True).trace(
                    maxIter=args.memory_hvps, tol=0.0
                )
                del twin
            else:
                os.environ["DECONCNN_CURVATURE_HVP_PATH"] = who.split(":", 1)[1]
                try:
                    dcc.estimate(
                        model, nn.CrossEntropyLoss(), (x, y), "trace", "hutchpp", seed=0,
                        num_hvps=args.memory_hvps,
                    )  # fmt: skip
                finally:
                    os.environ.pop("DECONCNN_CURVATURE_HVP_PATH", None)
            torch.cuda.synchronize()
            out[who] = int(torch.cuda.max_memory_allocated() - base)
    raw = out.get("pyhessian_raw")
    out["ratio_to_pyhessian"] = {who: out[who] / raw for who in whos[:-1] if out.get(who) and raw}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--memory-hvps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="smoke sizes, tiny CNN only")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON path")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.probes, args.reps, args.block = 16, 2, 2, 2
        args.memory_hvps = min(args.memory_hvps, 6)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch")
    torch.set_num_threads(args.threads)

    models = _models(args)
    rows = {name: measure(name, model, args) for name, model in models.items()}
    mem = {name: memory(name, m, args) for name, m in models.items()} if args.memory else {}

    print(f"time per HVP / time per gradient ({args.device}, median of {args.reps} rounds)")
    for name, r in rows.items():
        print(
            f"\n{name}  dim={r['dim']}  batch={r['batch']}  gradient={r['gradient_seconds']:.4f}s"
        )
        for path, ratio in sorted(r["ratio"].items(), key=lambda kv: kv[1]):
            diff = r["max_rel_diff_vs_double_backward"].get(path)
            extra = f"   max rel diff {diff:.1e}" if diff is not None else ""
            print(f"  {path:<38}{ratio:>7.2f}{extra}")
        for path, note in r["notes"].items():
            print(f"  {path:<38} {note}")
    for name, m in mem.items():
        print(f"\nmemory {name} ({m['kind']}, {m['hvps']} HVPs):")
        for who in ("hutchpp:double_backward", "hutchpp:forward_over_reverse", "pyhessian_raw"):
            value = m.get(who)
            text = (
                f"{value / 2**20:8.1f} MiB"
                if value is not None
                else f"failed {m.get(who + ':error')}"
            )
            print(f"  {who:<32}{text}")
        for who, ratio in m["ratio_to_pyhessian"].items():
            print(f"  {who} / pyhessian_raw = {ratio:.2f}")
    out = {
        "benchmark": "hvp_paths",
        "device": args.device,
        "unit": "seconds per HVP / seconds per gradient (median over interleaved rounds)",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cuda_device": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "models": rows,
        "memory": mem,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
