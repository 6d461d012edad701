"""Time per Hessian-vector product as a ratio to one gradient, measured in one run.

For each model, everything is timed in this one process, interleaved, as the median of ``--reps``
repetitions, in CPU seconds of the process (``time.process_time``: on a shared machine wall time
measures the other users' load as much as ours; with ``--threads 1`` CPU time is the work done):

- ``gradient``: one forward pass and one backward pass of the mean loss (the unit);
- ``graph``: the same with ``create_graph=True`` — what :class:`HessianOperator` builds once per
  batch before any product;
- ``hvp[pb]``: one product with :meth:`HessianOperator.matmat` on a block of ``--probes`` columns,
  multiplied ``pb`` at a time (``probe_batch=1``: PyHessian's sequential
  ``hessian_vector_product``; ``8``: one vectorised ``is_grads_batched`` call per 8 probes),
  divided by the number of columns: the marginal cost of one more HVP;
- ``estimate[pb]``: ``dcc.estimate(..., "trace", num_hvps=--probes, probe_batch=pb)`` end to end
  (graph build, probes, state guard) divided by the number of HVPs.

Models: ``cnn`` (tests/cases.py's tiny float64 CNN, 12 samples) and ``resnet`` (a small CIFAR
ResNet defined here: 3 stages of 16/32/64 channels with one BasicBlock each, BatchNorm, measured in
eval mode as ``estimate`` does by default; float32, a batch of ``--batch`` 3×32×32 images).

    python benchmarks/hvp_cost.py [--reps 5] [--probes 16] [--batch 32] [--threads 1]

Prints a table of ratios and writes ``benchmarks/results/hvp_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "hvp_cost.json"
PROBE_BATCHES = (1, 8)


class BasicBlock(nn.Module):
    """3×3 conv-BN-ReLU twice with an identity or 1×1 projection shortcut (He et al. 2016)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CIFAR-shaped ResNet small enough to time on a CPU (~0.08 M parameters)."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(cin, w, 1 if i == 0 else 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def _models(
    batch: int,
) -> dict[str, tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]]:
    sys.path.insert(0, str(ROOT / "tests"))
    from cases import get_case

    torch.manual_seed(0)
    resnet = SmallResNet()
    resnet.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            resnet(torch.randn(batch, 3, 32, 32))
    resnet.eval()
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    return {"cnn": get_case("cnn").make(), "resnet": (resnet, nn.CrossEntropyLoss(), (x, y))}


def _median_time(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def measure(
    name: str, model: nn.Module, loss_fn: nn.Module, batch: tuple, *, reps: int, probes: int
) -> dict[str, Any]:
    import deconcnn_curvature as dcc
    from deconcnn_curvature.hvp import HessianOperator
    from deconcnn_curvature.linalg.operator import make_generator, rademacher
    from deconcnn_curvature.problem import build_problem, preserve_state

    x, y = batch
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient() -> None:
        torch.autograd.grad(loss_fn(model(x), y), params)

    def graph() -> None:
        torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)

    problem = build_problem(model, loss_fn, batch)
    dim = problem.dim
    v = rademacher(
        dim, probes, generator=make_generator(0, "cpu"), dtype=problem.dtype, device="cpu"
    )
    row: dict[str, Any] = {"dim": dim, "batch": int(y.shape[0]), "dtype": str(problem.dtype)}
    with preserve_state(model):
        gradient(), graph()  # warm-up
        ops = {pb: HessianOperator(problem, probe_batch=pb) for pb in PROBE_BATCHES}
        products = {pb: op.matmat(v) for pb, op in ops.items()}  # warm-up, and a cross-check
        scale = float(products[1].abs().max())
        row["max_rel_diff_pb8_vs_pb1"] = float((products[8] - products[1]).abs().max()) / scale
        t_grad, t_graph, t_hvp = [], [], {pb: [] for pb in PROBE_BATCHES}
        for _ in range(reps):  # interleaved, so load changes hit every measurement alike
            t_grad.append(_median_time(gradient, 3))
            t_graph.append(_median_time(graph, 3))
            for pb, op in ops.items():
                t_hvp[pb].append(_median_time(lambda op=op: op.matmat(v), 1) / probes)
        for op in ops.values():
            op.close()
    grad_s = statistics.median(t_grad)
    row["gradient_s"] = grad_s
    row["graph_ratio"] = statistics.median(t_graph) / grad_s
    row["hvp_ratio"] = {str(pb): statistics.median(ts) / grad_s for pb, ts in t_hvp.items()}
    row["estimate_ratio"] = {}
    for pb in PROBE_BATCHES:

        def run(pb: int = pb) -> None:
            dcc.estimate(model, loss_fn, batch, "trace", seed=0, num_hvps=probes, probe_batch=pb)

        run()
        row["estimate_ratio"][str(pb)] = _median_time(run, reps) / probes / grad_s
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = {
        name: measure(name, *spec, reps=args.reps, probes=args.probes)
        for name, spec in _models(args.batch).items()
    }
    header = f"{'model':<8}{'dim':>8}{'grad ms':>9}{'graph':>8}" + "".join(
        f"{'hvp pb=' + str(pb):>10}{'est pb=' + str(pb):>10}" for pb in PROBE_BATCHES
    )
    print("time per HVP / time per gradient (CPU seconds, median)")
    print(header)
    for name, r in rows.items():
        cells = "".join(
            f"{r['hvp_ratio'][str(pb)]:>10.2f}{r['estimate_ratio'][str(pb)]:>10.2f}"
            for pb in PROBE_BATCHES
        )
        print(f"{name:<8}{r['dim']:>8}{1e3 * r['gradient_s']:>9.2f}{r['graph_ratio']:>8.2f}{cells}")
    out = {
        "benchmark": "hvp_cost",
        "unit": "ratio of CPU seconds per HVP to CPU seconds per gradient (forward + backward)",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "models": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
