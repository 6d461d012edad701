"""A Lightning DDP run (2 CPU processes, gloo) with two CurvatureMonitors, for test_lightning_ddp.

Usage: ``python lightning_ddp_driver.py OUT_DIR``. Lightning's DDP strategy re-runs this script for
rank 1, so everything here runs in both processes. Monitor ``good`` measures trace and λ_max with
``pyhessian`` at steps 0, 2 and 4; monitor ``failing`` uses a backend that raises on rank 1 only
(before any collective) at steps 2 and 4. Each rank writes ``rank<r>.json`` (what it logged, how
many measurements it took part in); rank 0 also saves the parameters at each measured step and the
curvature batch's indices, so the test can recompute every value in a single process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from deconcnn_curvature.backends.pyhessian import PyHessianBackend
from deconcnn_curvature.hookspecs import hookimpl
from deconcnn_curvature.monitor import CurvatureMonitor
from deconcnn_curvature.registry import Registry, set_registry

N_SAMPLES = 64
MEASURE_EVERY = 2
MAX_STEPS = 4
GOOD = dict(
    backend="pyhessian",
    quantities=("trace", "eigenvalues"),
    compute_every_n_steps=MEASURE_EVERY,
    compute_at_step_zero=True,
    num_hvps=10,
    hessian_batch_size=12,
    seed=3,
    jsonl="curvature.jsonl",
    backend_options={"tol": 1e-10, "max_hvps": 83},
)
FAILING = dict(
    backend="rank1_fails",
    quantities=("trace",),
    compute_every_n_steps=MEASURE_EVERY,
    num_hvps=10,
    hessian_batch_size=12,
    seed=4,
    jsonl="failing.jsonl",
    metric_keys={
        "trace": "failing/trace",
        "trace_stderr": "failing/trace_stderr",
        "n_hvp": "failing/n_hvp",
        "seconds": "failing/seconds",
    },
)


class Rank1Fails(PyHessianBackend):
    """PyHessian, except that rank 1 raises before taking part in any collective."""

    name = "rank1_fails"
    description = "test backend: fails on rank 1 only"

    def compute(self, problem, quantity, *, seed, options):  # type: ignore[no-untyped-def]
        if dist.is_initialized() and dist.get_rank() == 1:
            raise RuntimeError("injected: the backend broke on rank 1")
        return super().compute(problem, quantity, seed=seed, options=options)


class _Plugin:
    @hookimpl
    def register_backends(self, register: Any) -> None:
        register(Rank1Fails)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def make_dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_SAMPLES, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N_SAMPLES,), generator=g)
    return TensorDataset(x, y)


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()
        self.loss_fn = nn.CrossEntropyLoss()
        self.logged: list[tuple[int, str, float]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.3)

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if name.startswith(("curvature/", "failing/")):
            self.logged.append((self.trainer.global_step, name, float(value)))
        super().log(name, value, *args, **kwargs)


class SaveParams(pl.Callback):
    """Rank 0 saves the parameters at each measured step (after the monitors ran)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def _save(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        step = trainer.global_step
        if trainer.is_global_zero and step % MEASURE_EVERY == 0:
            path = self.out / f"params_step{step}.pt"
            if not path.exists():
                torch.save(
                    {k: v.detach().clone() for k, v in module.net.state_dict().items()}, path
                )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if trainer.global_step == 0:
            self._save(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        self._save(trainer, pl_module)


def main(out: Path) -> None:
    set_registry(Registry.build(extra_plugins=(_Plugin(),)))
    good, failing = CurvatureMonitor(**GOOD), CurvatureMonitor(**FAILING)
    module = Tiny()
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_steps=MAX_STEPS,
        logger=CSVLogger(save_dir=out, name="logs"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=[good, failing, SaveParams(out)],
    )
    trainer.fit(module, DataLoader(make_dataset(), batch_size=8, shuffle=False))
    log_dir = trainer.log_dir  # a collective: every rank asks
    rank = trainer.global_rank
    report = {
        "rank": rank,
        "world_size": trainer.world_size,
        "log_dir": log_dir,
        "logged": module.logged,
        "measurements": {"good": good.measurements, "failing": failing.measurements},
        "indices": good.curvature_indices,
        "failing_indices": failing.curvature_indices,
        "writers": {
            "good": getattr(good, "_writer", None) is not None,
            "failing": getattr(failing, "_writer", None) is not None,
        },
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    # Lightning leaves the process group up after fit; gloo's threads torn down at interpreter
    # exit sometimes abort ("terminate called without an active exception", exit code -6).
    # Close it in step on both ranks, as a script should.
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
