"""Where a curvature measurement's error is, by size: the trace's error against the full training
set for several ``(samples, products)`` shapes of Hutch++, and the two-way interval's own split
of it (``stderr_probe``, ``stderr_data``), on the states of the time-budget benchmark's training
run (``small_cnn``, synthetic CIFAR-shaped data, 512 training images, 1600 steps).

It measures what the time budget's rule rests on (``docs/time-budget.md``): that data noise
dominates a 64-sample trace, and that Hutch++ below its shipped 10 products loses its deflation
(its probe variance grows far faster than ``1/m``). Per step and shape, ``--draws`` independent
draws (a random batch of the training set and fresh probes): the mean and median |relative
error| of the trace and the median ``stderr_probe`` and ``stderr_data`` relative to the
full-data trace (Hutch++, ``--ref-hvps`` products on all 512).

    python benchmarks/budget_noise.py            # steps 600 and 1200, 12 draws (~5 min CPU)
    python benchmarks/budget_noise.py --quick    # smoke run

Prints a table and writes ``--out`` (default ``benchmarks/results/budget_noise.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import time_budget  # the same training run and replay

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ((64, 10), (64, 5), (128, 5), (128, 10), (32, 10), (64, 20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="600,1200", help="training steps to measure at")
    parser.add_argument("--draws", type=int, default=12)
    parser.add_argument("--ref-hvps", type=int, default=150)
    parser.add_argument("--quick", action="store_true", help="smoke sizes")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/budget_noise.json")
    args = parser.parse_args()
    run = argparse.Namespace(population=512, noise=1.0, cadence=200, steps=1600)
    steps = {int(s) for s in args.steps.split(",")}
    shapes = SHAPES
    if args.quick:
        run.population, run.steps, steps, args.draws, args.ref_hvps = 64, 20, {10}, 2, 8
        shapes = ((32, 10), (32, 5))

    import torch

    import deconcnn_curvature as dcc

    torch.set_num_threads(1)
    replay = time_budget._replay(run, 0, steps, None)
    loader = replay["data"].train_dataloader()
    dataset = loader.dataset
    x, y = loader.collate_fn([dataset[i] for i in range(len(dataset))])
    model, loss = replay["module"].model, torch.nn.CrossEntropyLoss()
    out: dict[str, dict[str, dict[str, float]]] = {}
    for step, state in sorted(replay["states"].items()):
        model.load_state_dict(state)
        full = dcc.estimate(model, loss, (x, y), "trace", "hutchpp", seed=step,
                            num_hvps=args.ref_hvps, data_groups=1)  # fmt: skip
        ref = float(full.value)
        rows: dict[str, dict[str, float]] = {}
        for n, m in shapes:
            err, probe, data = [], [], []
            for r in range(args.draws):
                gen = torch.Generator().manual_seed(1000 * r + n)
                idx = torch.randperm(len(x), generator=gen)[:n]
                est = dcc.estimate(model, loss, (x[idx], y[idx]), "trace", "hutchpp", seed=r,
                                   num_hvps=m, data_groups=4)  # fmt: skip
                err.append(abs(float(est.value) - ref) / ref)
                probe.append(est.details["stderr_probe"] / ref)
                data.append(est.details["stderr_data"] / ref)
            rows[f"{n}x{m}"] = {
                "samples": n,
                "products": m,
                "err_mean": statistics.fmean(err),
                "err_median": statistics.median(err),
                "stderr_probe_median": statistics.median(probe),
                "stderr_data_median": statistics.median(data),
            }
        out[str(step)] = {"reference": {"trace": ref, "stderr": full.stderr}, "shapes": rows}
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "steps": out}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1, allow_nan=False))
    print("step  shape    |err| mean  median  stderr_probe  stderr_data  (of the full trace)")
    for step, row in out.items():
        for name, r in row["shapes"].items():
            print(
                f"{step:>5} {name:>7} {r['err_mean']:>10.1%} {r['err_median']:>7.1%} "
                f"{r['stderr_probe_median']:>13.1%} {r['stderr_data_median']:>12.1%}"
            )


if __name__ == "__main__":
    main()
