"""What the pyhessian ``tol`` costs and gives on a float32 ResNet: products, seconds, converged and
the error of λ_max against the same model in float64.

The float32 products of a ResNet's loss Hessian are rounded at 1e-5..1e-4 of ``‖H‖``, so no
residual measured from them gets below that: a ``tol`` under it can never be met. This script
measures, on one batch, the float64 reference (many products, ``tol=1e-10``) and, for each ``tol``,
the float32 run's products, seconds, ``converged``, residual (share of λ_max), relative error and
note. Second case: the top 3 of ``Flatten → Linear(3072, 64) → Tanh → Linear(64, 10)`` on 128
random images, the case where top-3 once never converged (float32, against float64).

    python benchmarks/eig_tolerance.py                       # runs/demo/last.ckpt if present
    python benchmarks/eig_tolerance.py --checkpoint PATH     # another checkpoint
    python benchmarks/eig_tolerance.py --quick               # seeded ResNet-18 at width 1/16

Without a checkpoint the model is ``resnet18_cifar(width_mult)`` with seeded initial weights
(BatchNorm in eval mode with its initial statistics) on seeded random images.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import deconcnn_curvature as dcc

ROOT = Path(__file__).resolve().parent.parent


def demo_problem(args: argparse.Namespace) -> tuple[nn.Module, Any, tuple[Any, Any], str]:
    """The model, loss, one batch and a description."""
    path = args.checkpoint
    if path is None and not args.quick and (ROOT / "runs" / "demo" / "last.ckpt").exists():
        path = ROOT / "runs" / "demo" / "last.ckpt"
    if path is not None:
        from deconcnn_curvature.checkpoints import open_checkpoint

        ck = open_checkpoint(path, {"batch_size": args.samples})
        x, y = ck.data[0]
        return ck.model, ck.loss_fn, (x, y), f"{path}: {ck.model_description}"
    from deconcnn_curvature.training.resnet_cifar import resnet18_cifar

    torch.manual_seed(0)
    model = resnet18_cifar(width_mult=args.width_mult)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.samples,), generator=g)
    return model, nn.CrossEntropyLoss(), (x, y), f"resnet18_cifar(width_mult={args.width_mult})"


def measure(model: nn.Module, loss_fn: Any, batch: Any, k: int, **options: Any) -> dict[str, Any]:
    start = time.perf_counter()
    r = dcc.estimate(model, loss_fn, batch, "eigenvalues", "pyhessian", k=k, **options)
    return {
        "values": list(r.value),
        "n_hvp": r.n_hvp,
        "seconds": time.perf_counter() - start,
        "converged": r.details["converged"],
        "residuals": r.details["residuals"],
        "sequences": r.details["sequences"],
        "note": r.details.get("note"),
    }


def compare(model: nn.Module, loss_fn: Any, batch: Any, k: int, args: Any) -> dict[str, Any]:
    """The float64 reference and the float32 runs at each tol (``None``: the default)."""
    x, y = batch
    ref = measure(copy.deepcopy(model).double(), loss_fn, (x.double(), y), k,
                  tol=1e-10, max_hvps=args.ref_hvps)  # fmt: skip
    runs = {}
    for tol in [None, *args.tols]:
        opts = {"max_hvps": args.max_hvps, **({} if tol is None else {"tol": tol})}
        run = measure(model, loss_fn, batch, k, **opts)
        top = max(abs(v) for v in run["values"])
        pairs = zip(run["values"], ref["values"], strict=True)
        run["rel_errors"] = [abs(a - b) / abs(b) for a, b in pairs]
        run["residual_share"] = [r / top for r in run["residuals"]]
        runs["default" if tol is None else f"{tol:g}"] = run
        print(f"  tol={'default' if tol is None else f'{tol:g}':<8} conv={run['converged']!s:<5} "
              f"HVPs={run['n_hvp']:>4} {run['seconds']:6.1f}s "
              f"rel err={max(run['rel_errors']):.1e} residual/θ={max(run['residual_share']):.1e}"
              + (f"\n    note: {run['note']}" if run["note"] else ""))  # fmt: skip
    return {"reference_float64": ref, "float32": runs}


def mlp_problem() -> tuple[nn.Module, Any, tuple[Any, Any]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 64), nn.Tanh(), nn.Linear(64, 10))
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    return model, nn.CrossEntropyLoss(), (x, y)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="seeded ResNet-18 at width 1/16")
    parser.add_argument("--width-mult", type=float, default=0.125)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--tols", type=float, nargs="*", default=[1e-3, 1e-4, 1e-5])
    parser.add_argument("--max-hvps", type=int, default=200)
    parser.add_argument("--ref-hvps", type=int, default=150)
    parser.add_argument("--no-mlp", action="store_true", help="skip the top-3 MLP case")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "eig_tolerance.json"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.width_mult, args.samples, args.tols = 0.0625, 16, [1e-3, 1e-5]
    torch.set_num_threads(1)
    model, loss_fn, batch, described = demo_problem(args)
    print(f"λ_max of {described}, {len(batch[1])} samples")
    payload: dict[str, Any] = {"model": described, "samples": len(batch[1]),
                               "lambda_max": compare(model, loss_fn, batch, 1, args)}  # fmt: skip
    if not args.no_mlp:
        print("top 3 of Linear(3072, 64) → Tanh → Linear(64, 10), 128 samples")
        payload["mlp_top3"] = compare(*mlp_problem(), 3, argparse.Namespace(**{
            **vars(args), "max_hvps": 400, "ref_hvps": 400}))  # fmt: skip
    payload.update({"torch": torch.__version__, "python": platform.python_version()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
