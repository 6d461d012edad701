"""What the state guard's parameter check costs next to one Hessian-vector product.

Every measurement runs inside :func:`deconcnn_curvature.problem.preserve_state`, which now also
fingerprints the parameters before and after (:class:`~deconcnn_curvature.problem.
ParameterGuard`: version counters, storage addresses, exact bit-pattern checksums) and copies
them when they take at most ``PARAMETER_BACKUP_BYTES``. Per model (CIFAR-shaped batch, float32,
CPU unless --device) this times, as medians over --reps:

- ``hvp``: one product ``H v`` of the Hessian operator once its gradient graph is built (the
  cheapest product a measurement makes; the first one also runs forward and backward);
- ``guard``: ``ParameterGuard.take`` plus ``changed`` (what one measurement pays), with the copy;
- ``fingerprint``: the same without the copy (what a model over the copy limit pays).

Prints the ratios to one product and writes ``benchmarks/results/parameter_guard.json``.

    python benchmarks/parameter_guard.py [--batch 128] [--reps 20] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from deconcnn_curvature import problem as problem_module
from deconcnn_curvature.hvp import HessianOperator
from deconcnn_curvature.problem import ParameterGuard, build_problem, preserve_state
from deconcnn_curvature.training.resnet_cifar import resnet18_cifar, small_cnn


def _median_seconds(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _measure(name: str, model: nn.Module, batch: int, reps: int, device: torch.device) -> dict:
    model = model.to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    problem = build_problem(model, nn.CrossEntropyLoss(), (x, y))
    with preserve_state(model):
        op = HessianOperator(problem)
        v = torch.randn(problem.dim, 1, generator=gen).to(device)
        op.matmat(v)  # builds and keeps the gradient graph
        hvp = _median_seconds(lambda: op.matmat(v), reps, device)
        op.close()
    guard = _median_seconds(lambda: ParameterGuard.take(model).changed(model), reps, device)
    limit = problem_module.PARAMETER_BACKUP_BYTES
    problem_module.PARAMETER_BACKUP_BYTES = -1
    try:
        bare = _median_seconds(lambda: ParameterGuard.take(model).changed(model), reps, device)
    finally:
        problem_module.PARAMETER_BACKUP_BYTES = limit
    return {
        "model": name,
        "parameters": problem.dim,
        "hvp_s": hvp,
        "guard_s": guard,
        "fingerprint_s": bare,
        "guard_over_hvp": guard / hvp,
        "fingerprint_over_hvp": bare / hvp,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: results/)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    models = {
        "small_cnn": small_cnn(width=8),
        "small_cnn_w32": small_cnn(width=32),
        "resnet18_cifar_w0.25": resnet18_cifar(width_mult=0.25),
    }
    rows = [_measure(n, m, args.batch, args.reps, device) for n, m in models.items()]
    print(f"{'model':24} {'params':>9} {'HVP ms':>9} {'guard/HVP':>10} {'fingerprint/HVP':>16}")
    for r in rows:
        print(
            f"{r['model']:24} {r['parameters']:9d} {1e3 * r['hvp_s']:9.2f} "
            f"{r['guard_over_hvp']:10.4f} {r['fingerprint_over_hvp']:16.4f}"
        )
    out = args.out or Path(__file__).parent / "results" / "parameter_guard.json"
    out.parent.mkdir(exist_ok=True)
    payload = {"device": str(device), "batch": args.batch, "threads": args.threads, "rows": rows}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
