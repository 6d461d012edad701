"""Rank programs for the raw ``torch.distributed`` tests, and the launcher that runs them.

The tests start ``world_size`` fresh Python processes running this file (``python _ranks.py
<scenario> <rank> <world_size> <store file> <out dir>``); each joins a gloo process group through a
file store, runs the scenario and writes ``rank<r>.json``. :func:`launch` waits with a deadline and
*fails* (killing the processes) when it passes, so a hang is a test failure, never a stuck CI job.

The data are one seeded float64 problem split unevenly: rank 0 holds 5 samples in one batch,
rank 1 holds 11 samples in two batches (4 + 7); :func:`union_batch` is their concatenation, on
which a single process computes the reference values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
N_SAMPLES = 16
#: Per rank, the sample ranges of its local batches (uneven on purpose).
SHARDS: dict[int, list[tuple[int, int]]] = {0: [(0, 5)], 1: [(5, 9), (9, 16)]}
#: Quantity → options, small enough for CI and tight enough that Lanczos converges fully.
OPTIONS: dict[str, dict[str, Any]] = {
    "trace": {"num_hvps": 12},
    "eigenvalues": {"k": 2, "tol": 1e-10, "max_hvps": 83},
    "density": {"lanczos_steps": 12, "num_runs": 2},
}
SEED = 1234


def make_model() -> nn.Module:
    """A float64 MLP (83 parameters), identical in every process."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N_SAMPLES, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N_SAMPLES,), generator=g)
    return x, y


def local_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = make_data()
    return [(x[a:b], y[a:b]) for a, b in SHARDS[rank]]


def union_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' samples as one batch (rank order)."""
    x, y = make_data()
    idx = [i for r in sorted(SHARDS) for a, b in SHARDS[r] for i in range(a, b)]
    return x[idx], y[idx]


def loss_fn() -> nn.Module:
    return nn.CrossEntropyLoss()


# ----------------------------------------------------------------------------- test backends


def _plugin_backends() -> tuple[type, ...]:
    """Backends registered in the rank processes: one without distributed support, two that fail
    on rank 1 only (before any collective, and between two of the operator's products)."""
    import torch.distributed as dist

    from deconcnn_curvature.backend import Backend
    from deconcnn_curvature.backends.pyhessian import PyHessianBackend
    from deconcnn_curvature.hvp import HessianOperator
    from deconcnn_curvature.linalg.operator import make_generator, rademacher
    from deconcnn_curvature.results import CurvatureResult

    class NoDistBackend(Backend):
        name = "nodist"
        description = "test backend without distributed support"
        quantities = frozenset({"trace"})
        supports_distributed = False

        def compute(self, problem, quantity, *, seed, options):  # type: ignore[no-untyped-def]
            raise AssertionError("a refused backend must never compute")

    class EarlyFailBackend(PyHessianBackend):
        name = "early_fail"
        description = "fails on rank 1 before any collective"

        def compute(self, problem, quantity, *, seed, options):  # type: ignore[no-untyped-def]
            if dist.get_rank() == 1:
                raise RuntimeError("injected: early failure on rank 1")
            return super().compute(problem, quantity, seed=seed, options=options)

    class MidFailBackend(PyHessianBackend):
        name = "mid_fail"
        description = "fails on rank 1 between two products, outside the operator"

        def compute(self, problem, quantity, *, seed, options):  # type: ignore[no-untyped-def]
            op = HessianOperator(problem, distributed=True)
            gen = make_generator(seed, problem.device)
            total = 0.0
            for step in range(4):
                z = rademacher(op.dim, 1, generator=gen, dtype=op.dtype, device=op.device)
                total += float((z * op.matmat(z)).sum())
                if step == 1 and dist.get_rank() == 1:
                    raise RuntimeError("injected: failure between products on rank 1")
            return CurvatureResult(
                backend=self.name,
                quantity=quantity,
                value=total / 4,
                stderr=None,
                n_hvp=op.n_matvecs,
                seconds=0.0,
                seed=seed,
                device=str(problem.device),
                exact=False,
                method="test",
                dim=problem.dim,
            )

    return NoDistBackend, EarlyFailBackend, MidFailBackend


def _use_test_backends() -> None:
    from deconcnn_curvature.hookspecs import hookimpl
    from deconcnn_curvature.registry import Registry, set_registry

    backends = _plugin_backends()

    class Plugin:
        @hookimpl
        def register_backends(self, register: Any) -> None:
            for cls in backends:
                register(cls)

    set_registry(Registry.build(extra_plugins=(Plugin(),)))


# ----------------------------------------------------------------------------- scenarios


def distributed_backends() -> list[str]:
    """Built-in backends under test: pyhessian, and hutchpp once it is registered."""
    import deconcnn_curvature as dcc

    names = {b["name"]: b for b in dcc.list_backends()}
    return [n for n in ("pyhessian", "hutchpp") if n in names and names[n]["distributed"]]


def measure(backend: str, quantity: str, data: Any, **extra: Any) -> dict[str, Any]:
    """One estimate as a JSON-ready dictionary (floats survive JSON exactly)."""
    import deconcnn_curvature as dcc

    opts = {k: v for k, v in OPTIONS[quantity].items() if k in _option_names(backend)}
    result = dcc.estimate(
        make_model(), loss_fn(), data, quantity, backend, seed=SEED, **opts, **extra
    )
    out = result.to_dict()
    out.pop("seconds", None)
    return out


def _option_names(backend: str) -> set[str]:
    import deconcnn_curvature as dcc

    return {o.name for o in dcc.get_backend(backend).options}


def plan() -> list[tuple[str, str, dict[str, Any]]]:
    """(backend, quantity, extra options) measured by the numerics scenario."""
    import deconcnn_curvature as dcc

    out = []
    for name in distributed_backends():
        quantities = dcc.get_backend(name).quantities
        for quantity in ("trace", "eigenvalues", "density"):
            if quantity in quantities:
                out.append((name, quantity, {}))
        if "trace" in quantities and "probe_batch" in _option_names(name):
            out.append((name, "trace", {"probe_batch": 4}))
    return out


def scenario_numerics(rank: int) -> dict[str, Any]:
    batches = local_batches(rank)
    results = {}
    for backend, quantity, extra in plan():
        key = f"{backend}/{quantity}/{json.dumps(extra, sort_keys=True)}"
        results[key] = measure(backend, quantity, batches, **extra)
    return {"results": results}


def _outcome(fn: Callable[[], Any]) -> dict[str, Any]:
    try:
        value = fn()
    except Exception as exc:
        return {"raised": type(exc).__name__, "message": str(exc)}
    return {"raised": None, "value": value}


def scenario_failures(rank: int) -> dict[str, Any]:
    import deconcnn_curvature as dcc

    _use_test_backends()
    batches = local_batches(rank)
    out: dict[str, Any] = {}

    class RaisingLoss(nn.Module):
        reduction = "mean"

        def __init__(self, from_call: int) -> None:
            super().__init__()
            self.calls = 0
            self.from_call = from_call

        def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if rank == 1 and self.calls >= self.from_call:
                raise RuntimeError(f"injected: loss failed on rank 1 at call {self.calls}")
            return nn.functional.cross_entropy(out, y)

    def run(quantity: str, data: Any, backend: str = "pyhessian", loss: Any = None) -> Any:
        opts = {k: v for k, v in OPTIONS[quantity].items() if k in _option_names(backend)}
        return dcc.estimate(
            make_model(), loss or loss_fn(), data, quantity, backend, seed=SEED, **opts
        ).value

    nan_batches = [(x.clone(), y) for x, y in batches]
    if rank == 1:
        nan_batches[0][0][0, 0] = float("nan")
    # Rank 1 holds two batches, so without retain_graphs every product rebuilds both graphs: the
    # loss's 5th call is inside the 3rd Lanczos product.
    cases: dict[str, Callable[[], Any]] = {
        "refuse": lambda: run("trace", batches, backend="nodist"),
        "loss_raises_at_join": lambda: run("eigenvalues", batches, loss=RaisingLoss(1)),
        "loss_raises_mid_lanczos": lambda: run("eigenvalues", batches, loss=RaisingLoss(5)),
        "nan_on_one_rank": lambda: run("trace", nan_batches),
        "bad_data_on_one_rank": lambda: run("trace", [] if rank == 1 else batches),
        "backend_fails_early": lambda: run("trace", batches, backend="early_fail"),
        "backend_fails_between_products": lambda: run("trace", batches, backend="mid_fail"),
        # The process group is still in lockstep after all of that:
        "after": lambda: measure("pyhessian", "eigenvalues", batches),
    }
    for name, fn in cases.items():
        out[name] = _outcome(fn)
    return out


LOCAL_PLAN = (
    ("pyhessian", "trace"),
    ("pyhessian", "eigenvalues"),
    ("hutchpp", "trace"),
    ("backpack", "trace"),
)


def scenario_local(rank: int) -> dict[str, Any]:
    """Rank 0 alone measures its own shard (``distributed=False``); rank 1 makes no call at all
    until the final barrier. Without the opt-out rank 0 would wait for rank 1 forever."""
    if rank != 0:
        return {}
    batches = local_batches(0)
    out: dict[str, Any] = {}
    for backend, quantity in LOCAL_PLAN:
        out[f"{backend}/{quantity}"] = _outcome(
            lambda b=backend, q=quantity: measure(b, q, batches, distributed=False)
        )
    nan_batches = [(x.clone(), y) for x, y in batches]
    nan_batches[0][0][0, 0] = float("nan")
    out["nan"] = _outcome(lambda: measure("pyhessian", "trace", nan_batches, distributed=False))
    return out


def scenario_seedless(rank: int) -> dict[str, Any]:
    """seed=None on every rank (and, on rank 1, a different explicit seed): rank 0's seed is
    used everywhere, so the summed products come from one set of probes."""
    import deconcnn_curvature as dcc

    out: dict[str, Any] = {}
    for backend in distributed_backends():
        for name, seed in (("none", None), ("differ", 11 if rank == 0 else 99)):
            result = dcc.estimate(
                make_model(), loss_fn(), local_batches(rank), "trace", backend, seed=seed,
                num_hvps=12,
            )  # fmt: skip
            out[f"{backend}/{name}"] = {"value": result.value, "seed": result.seed}
    return out


SCENARIOS: dict[str, Callable[[int], dict[str, Any]]] = {
    "numerics": scenario_numerics,
    "failures": scenario_failures,
    "local": scenario_local,
    "seedless": scenario_seedless,
}


def main(argv: list[str]) -> int:
    scenario, rank, world, store, out_dir = argv
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=int(rank), world_size=int(world)
    )
    try:
        payload = SCENARIOS[scenario](int(rank))
    except Exception:
        payload = {"crashed": traceback.format_exc()}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(payload))
    dist.barrier()
    dist.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------- launcher


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    )
    env["DECONCNN_CURVATURE_PLUGINS"] = ""
    env.pop("DECONCNN_CURVATURE_BACKEND", None)
    return env


def launch(scenario: str, tmp_path: Path, world_size: int = 2, timeout: float = 60.0) -> list[Any]:
    """Run ``scenario`` on ``world_size`` ranks; return each rank's JSON. Fails on a hang."""
    store = tmp_path / f"{scenario}.store"
    out_dir = tmp_path / scenario
    out_dir.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, scenario, str(r), str(world_size), str(store), str(out_dir)],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world_size)
    ]
    deadline = time.monotonic() + timeout
    logs = []
    try:
        for r, proc in enumerate(procs):
            try:
                log, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"scenario {scenario!r}: rank {r} still running after {timeout:.0f} s — a "
                    "hang (deadlock in a collective?)"
                ) from None
            logs.append(log)
            assert proc.returncode == 0, f"rank {r} exited with {proc.returncode}:\n{log}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    payloads = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world_size)]
    for r, payload in enumerate(payloads):
        assert "crashed" not in payload, f"rank {r} crashed:\n{payload['crashed']}\n{logs[r]}"
    return payloads


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
