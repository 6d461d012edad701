"""CurvatureMonitor inside real Lightning Trainers (CPU, tiny models, a few steps each).

What is proven here: training is bit-identical with monitoring on and off; failures are isolated,
recorded once per reason and never logged as 0.0; bad configuration fails before the first
training step; a resumed run writes the same records as an uninterrupted one; measurements land
on exactly the configured steps; the values are those of ``dcc.estimate`` on the same batch and
parameters, and λ_max matches the dense Hessian.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from cases import dense_hessian
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import deconcnn_curvature as dcc
from deconcnn_curvature import registry as registry_module
from deconcnn_curvature.backend import Backend, Option
from deconcnn_curvature.errors import (
    BackendFailedError,
    ConfigurationError,
    UnknownBackendError,
    UnsupportedModelError,
    UnsupportedQuantityError,
)
from deconcnn_curvature.hookspecs import hookimpl
from deconcnn_curvature.monitor import (
    CurvatureMonitor,
    read_curvature_jsonl,
)
from deconcnn_curvature.monitor.records import RecordWriter
from deconcnn_curvature.monitor.settings import MonitorSettings
from deconcnn_curvature.registry import Registry
from deconcnn_curvature.results import CurvatureResult

# ------------------------------------------------------------------------------------ fixtures


class Tiny(pl.LightningModule):
    """A float64 MLP classifier trained with SGD + momentum; counts its training steps."""

    def __init__(self, lr: float = 0.2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        self.loss_fn = nn.CrossEntropyLoss()
        self.lr = lr
        self.steps_run = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps_run += 1
        x, y = batch
        return self.loss_fn(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def tiny_data(n: int = 32, batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    loader_gen = torch.Generator().manual_seed(2)
    return DataLoader(
        TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=loader_gen
    )


def make_trainer(root: Path, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    settings: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        deterministic=True,
        default_root_dir=root,
        callbacks=callbacks,
    )
    settings.update(kwargs)
    return pl.Trainer(**settings)


def fit_tiny(
    root: Path, monitor: CurvatureMonitor | None, **kwargs: Any
) -> tuple[Tiny, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    module = Tiny()
    loader_kwargs = kwargs.pop("loader", {})
    trainer = make_trainer(root, [monitor] if monitor else [], **kwargs)
    trainer.fit(module, tiny_data(**loader_kwargs))
    return module, trainer


def records(path: Path) -> list[dict[str, Any]]:
    return read_curvature_jsonl(path) if path.exists() else []


def comparable(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records without wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in ("timestamp", "seconds")} for r in recs]


def use_plugin(monkeypatch: pytest.MonkeyPatch, plugin: object) -> None:
    """Make the process registry the built-ins plus ``plugin``."""
    registry_module.set_registry(Registry.build(extra_plugins=(plugin,)))


_TRACE = frozenset({"trace"})


class _FlakyBackend(Backend):
    """Raises for its first ``fail_calls`` computations, then returns 1.0 / [2.0]."""

    name = "flaky"
    description = "test backend"
    quantities = frozenset({"trace", "eigenvalues"})
    options = (Option("num_hvps", int, 4, "budget", min=1, quantities=_TRACE),)
    fail_calls = 10**9
    calls = 0

    def compute(self, problem, quantity, *, seed, options):  # type: ignore[no-untyped-def]
        type(self).calls += 1
        if type(self).calls <= type(self).fail_calls:
            raise RuntimeError("kaboom: the backend broke")
        value: Any = 1.0 if quantity == "trace" else [2.0]
        return CurvatureResult(
            backend=self.name,
            quantity=quantity,
            value=value,
            stderr=0.5 if quantity == "trace" else None,
            n_hvp=options.get("num_hvps", 3),
            seconds=0.0,
            seed=seed,
            device="cpu",
            exact=False,
            method="test",
            dim=problem.dim,
        )


class _PickyBackend(_FlakyBackend):
    """Refuses every model with a Tanh layer (an 'unsupported model')."""

    name = "picky"
    fail_calls = 0

    @classmethod
    def validate_model(cls, model: Any) -> None:
        if any(isinstance(m, nn.Tanh) for m in model.modules()):
            raise UnsupportedModelError("picky cannot handle nn.Tanh layers; use ReLU.")


class _TraceOnlyBackend(_FlakyBackend):
    name = "traceonly"
    quantities = frozenset({"trace"})
    fail_calls = 0


class _TestPlugin:
    def __init__(self, *backends: type[Backend]) -> None:
        self.backends = backends

    @hookimpl
    def register_backends(self, register: Any) -> None:
        for cls in self.backends:
            register(cls)


# ------------------------------------------------------------------------------------ identity


def _state(module: pl.LightningModule, trainer: pl.Trainer) -> dict[str, Any]:
    return {
        "params": {n: p.detach().clone() for n, p in module.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in module.named_buffers()},
        "optim": trainer.optimizers[0].state_dict(),
        "sched": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
        "rng": torch.get_rng_state(),
    }


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, Mapping):
        assert set(a) == set(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("batch_mode", ["fixed", "refresh"])
def test_training_is_bit_identical_with_monitor_on_and_off(tmp_path: Path, batch_mode: str) -> None:
    """The deconCNN-shaped pieces (augmented synthetic CIFAR, BatchNorm CNN, warm-up + cosine
    SGD): monitoring on vs off gives bitwise equal parameters, buffers, optimiser and scheduler
    state and global RNG state."""
    from deconcnn_curvature.training import CIFARDataModule, ClassificationModule

    def run(monitor: CurvatureMonitor | None, root: Path) -> dict[str, Any]:
        pl.seed_everything(0, verbose=False)
        data = CIFARDataModule(source="synthetic", batch_size=16, num_train=64, num_val=16)
        module = ClassificationModule(
            "small_cnn", {"width": 4, "norm_type": "batchnorm"}, lr=0.1, warmup_epochs=1
        )
        trainer = make_trainer(root, [monitor] if monitor else [], max_epochs=2)
        trainer.fit(module, datamodule=data)
        assert trainer.global_step == 8
        return _state(module, trainer)

    off = run(None, tmp_path / "off")
    monitor = CurvatureMonitor(
        compute_every_n_steps=2,
        compute_at_step_zero=True,
        num_hvps=6,
        hessian_batch_size=8,
        batch_mode=batch_mode,
        backend_options={"max_hvps": 6},
    )
    on = run(monitor, tmp_path / "on")
    recs = records(tmp_path / "on" / "curvature.jsonl")
    assert [r["step"] for r in recs if r["quantity"] == "trace"] == [0, 2, 4, 6, 8]
    assert all(r["error"] is None and r["value"] is not None for r in recs)
    _assert_same(off, on)


# ------------------------------------------------------------------------------------ cadence


def test_measurements_land_on_the_cadence(tmp_path: Path) -> None:
    monitor = CurvatureMonitor(
        compute_every_n_steps=3,
        num_hvps=4,
        hessian_batch_size=8,
        backend_options={"max_hvps": 4},
    )
    fit_tiny(tmp_path, monitor, max_steps=10)
    recs = records(tmp_path / "curvature.jsonl")
    assert [(r["step"], r["quantity"]) for r in recs] == [
        (s, q) for s in (3, 6, 9) for q in ("trace", "eigenvalues")
    ]
    assert monitor.measurements == 3


def test_step_zero_and_gradient_accumulation(tmp_path: Path) -> None:
    """With accumulation, global_step moves once per window: one measurement per cadence step."""
    monitor = CurvatureMonitor(
        quantities=["trace"],
        compute_every_n_steps=2,
        compute_at_step_zero=True,
        num_hvps=3,
        hessian_batch_size=4,
    )
    module, trainer = fit_tiny(tmp_path, monitor, max_steps=6, accumulate_grad_batches=2)
    assert module.steps_run == 12 and trainer.global_step == 6
    recs = records(tmp_path / "curvature.jsonl")
    assert [r["step"] for r in recs] == [0, 2, 4, 6]
    # 4 batches = 2 optimiser steps per epoch; step 2 follows the last batch of epoch 0.
    assert [r["epoch"] for r in recs] == [0, 0, 1, 2]


# ------------------------------------------------------------------------------------ records


def test_record_content_and_logged_metrics(tmp_path: Path) -> None:
    from deconcnn_curvature.training import MetricsJSONL, read_metrics_jsonl

    monitor = CurvatureMonitor(
        compute_every_n_steps=4,
        num_hvps=7,
        k=2,
        hessian_batch_size=16,
        backend_options={"max_hvps": 60},
        seed=5,
    )
    metrics = MetricsJSONL(tmp_path / "metrics.jsonl")
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, [monitor, metrics], max_steps=8)
    trainer.fit(Tiny(), tiny_data())
    recs = records(tmp_path / "curvature.jsonl")
    assert len(recs) == 4
    trace, eig = recs[2], recs[3]
    assert trace["quantity"] == "trace" and eig["quantity"] == "eigenvalues"
    for rec in (trace, eig):
        assert rec["step"] == 8 and rec["epoch"] == 1 and rec["backend"] == "pyhessian"
        assert rec["error"] is None and rec["batch_size"] == 16 and rec["batch_mode"] == "fixed"
        assert rec["seed"] == monitor.probe_seed(8, rec["quantity"])
        assert rec["seconds"] > 0
    assert trace["n_hvp"] == 7  # the budget is spent exactly, never capped
    assert isinstance(trace["value"], float) and trace["stderr"] > 0
    assert trace["ci"][0] < trace["value"] < trace["ci"][1] and trace["ci_level"] == 0.95
    assert trace["method"] == "hutchinson" and trace["exact"] is False
    assert len(eig["value"]) == 2 and eig["value"][0] >= eig["value"][1]
    assert eig["method"] == "lanczos" and eig["details"]["converged"] is True

    logged = trainer.callback_metrics
    assert float(logged["curvature/hutch_trace"]) == pytest.approx(trace["value"], rel=1e-6)
    assert float(logged["curvature/hutch_trace_stderr"]) == pytest.approx(trace["stderr"], rel=1e-6)
    assert float(logged["curvature/lambda_max"]) == pytest.approx(eig["value"][0], rel=1e-6)
    assert float(logged["curvature/lambda_max_2"]) == pytest.approx(eig["value"][1], rel=1e-6)
    assert float(logged["curvature/n_hvp"]) == trace["n_hvp"] + eig["n_hvp"]
    assert float(logged["curvature/seconds"]) >= trace["seconds"] + eig["seconds"]

    # deconCNN's metrics.jsonl gets the values on the line of the step they were measured at.
    lines = {r["step"]: r["metrics"] for r in read_metrics_jsonl(tmp_path / "metrics.jsonl")}
    assert lines[4]["curvature/hutch_trace"] == pytest.approx(recs[0]["value"], rel=1e-6)
    assert lines[8]["curvature/lambda_max"] == pytest.approx(eig["value"][0], rel=1e-6)
    assert not any("curvature/hutch_trace" in lines[s] for s in lines if s not in (4, 8))


@pytest.mark.parametrize(("max_hvps", "expected"), [(1, 0.0), (60, 1.0)])
def test_lambda_max_converged_is_logged(tmp_path: Path, max_hvps: int, expected: float) -> None:
    # Guard: convergence was only in the JSONL details; a capped λ_max looked like any other.
    monitor = CurvatureMonitor(
        quantities="eigenvalues",
        compute_every_n_steps=2,
        hessian_batch_size=8,
        backend_options={"max_hvps": max_hvps},
    )
    if expected:
        _, trainer = fit_tiny(tmp_path, monitor, max_steps=2)
    else:
        with pytest.warns(
            UserWarning,
            match="did not converge within 1 products.*curvature/lambda_max_converged is 0",
        ):
            _, trainer = fit_tiny(tmp_path, monitor, max_steps=2)
    (eig,) = records(tmp_path / "curvature.jsonl")
    assert eig["details"]["converged"] is bool(expected)
    assert float(trainer.callback_metrics["curvature/lambda_max_converged"]) == expected
    renamed = CurvatureMonitor(metric_keys={"eigenvalues_converged": None})
    assert renamed.metric_keys["eigenvalues_converged"] is None


def test_custom_metric_keys_and_paths(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "curv.jsonl"
    monitor = CurvatureMonitor(
        quantities="trace",
        compute_every_n_steps=2,
        num_hvps=3,
        hessian_batch_size=4,
        metric_keys={"trace": "hess/tr", "trace_stderr": None, "seconds": None},
        jsonl=str(target),
    )
    _, trainer = fit_tiny(tmp_path, monitor, max_steps=2)
    assert set(trainer.callback_metrics) == {"hess/tr", "curvature/n_hvp"}
    assert len(records(target)) == 1


def test_disabled_monitor_does_nothing(tmp_path: Path) -> None:
    monitor = CurvatureMonitor(backend="no-such-backend", enabled=False, compute_every_n_steps=1)
    _, trainer = fit_tiny(tmp_path, monitor, max_steps=3)
    assert not (tmp_path / "curvature.jsonl").exists() and not trainer.callback_metrics


def test_a_disabled_monitor_says_so_once_at_setup(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each shipped curvature/<backend>.yaml has enabled: false; a project that drops the files
    in and forgets curvature.enabled=true used to train with no curvature and no word about it."""
    monitor = CurvatureMonitor(enabled=False, compute_every_n_steps=1)
    with caplog.at_level("INFO"):
        fit_tiny(tmp_path, monitor, max_steps=2)
    said = [r.getMessage() for r in caplog.records if "CurvatureMonitor" in r.getMessage()]
    assert said == [
        "CurvatureMonitor: disabled (enabled=false), nothing is measured; set enabled=true "
        "(in a config: curvature.enabled=true) to measure."
    ]


def test_the_start_up_lines_name_the_budget_and_host_arguments_apart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The line for eigenvalues said ``budget {'k': 1}`` (k is no budget) and listed the host's
    eval_mode among the backend's "all options"."""
    monitor = CurvatureMonitor(
        backend="pyhessian", compute_every_n_steps=100, num_hvps=5, hessian_batch_size=8
    )
    with caplog.at_level("INFO"):
        fit_tiny(tmp_path, monitor, max_steps=1)
    said = [r.getMessage() for r in caplog.records if " by backend 'pyhessian'" in r.getMessage()]
    assert len(said) == 2, said
    trace, eigenvalues = sorted(said, key=lambda line: "eigenvalues" in line)
    assert "; budget num_hvps=5; options {'num_hvps': 5, " in trace
    assert "budget" not in eigenvalues and "; options {'k': 1, " in eigenvalues
    for line in said:
        assert line.endswith("; host arguments {'eval_mode': True}")
        assert "all options" not in line and line.count("eval_mode") == 1


def test_record_writer_is_strict_json_and_readable_before_close(tmp_path: Path) -> None:
    writer = RecordWriter(tmp_path / "sub" / "c.jsonl")
    writer.write({"value": float("nan"), "ci": (1.0, float("inf")), "t": torch.tensor(2.5)})
    line = (tmp_path / "sub" / "c.jsonl").read_text()  # flushed before close
    assert json.loads(line) == {"value": None, "ci": [1.0, None], "t": 2.5}
    writer.close()
    writer.write({"step": 2})  # reopens in append mode
    writer.close()
    assert [r.get("step") for r in read_curvature_jsonl(tmp_path / "sub" / "c.jsonl")] == [None, 2]


# ------------------------------------------------------------------------------------ values


def test_values_match_estimate_and_the_dense_hessian(tmp_path: Path) -> None:
    """The last measurement (step 6) is taken on the final parameters: recompute it with
    dcc.estimate on the same batch and seeds, and check λ_max against the dense Hessian."""
    monitor = CurvatureMonitor(
        compute_every_n_steps=3,
        num_hvps=40,
        hessian_batch_size=12,
        backend_options={"tol": 1e-10, "max_hvps": 83},
    )
    module, trainer = fit_tiny(tmp_path, monitor, max_steps=6)
    trace, eig = records(tmp_path / "curvature.jsonl")[2:]
    assert trace["step"] == eig["step"] == 6

    dataset = trainer.train_dataloader.dataset
    indices = monitor.curvature_indices
    assert indices == monitor.batch_indices(6, len(dataset)) and len(set(indices)) == 12
    x = torch.stack([dataset[i][0] for i in indices])
    y = torch.stack([dataset[i][1] for i in indices])
    again = dcc.estimate(
        module,
        module.loss_fn,
        (x, y),
        "trace",
        seed=monitor.probe_seed(6, "trace"),
        num_hvps=40,
        data_groups=4,  # the monitor's default: an interval for the data set's trace
    )
    assert again.value == trace["value"] and again.stderr == trace["stderr"]
    top = dcc.estimate(
        module,
        module.loss_fn,
        (x, y),
        "eigenvalues",
        seed=monitor.probe_seed(6, "eigenvalues"),
        tol=1e-10,
        max_hvps=83,
    )
    assert top.value == eig["value"]

    module.eval()
    exact = dense_hessian(module, module.loss_fn, [(x, y)])
    torch.testing.assert_close(
        torch.tensor(eig["value"][0], dtype=torch.float64),
        torch.linalg.eigvalsh(exact).max(),
        rtol=1e-7,
        atol=1e-9,
    )
    exact_trace = float(torch.trace(exact))
    assert abs(trace["value"] - exact_trace) <= 5 * trace["stderr"]


def test_hutchpp_measures_trace_and_eigenvalues_in_one_call(tmp_path: Path) -> None:
    """hutchpp's eigenvalues carry the trace of the same sketch: the monitor makes one call of
    num_hvps products per measurement (not a trace run plus an eigenvalue run), and both
    records are those of dcc.estimate on the same batch, seed and parameters; checked against
    the dense Hessian."""
    monitor = CurvatureMonitor(
        backend="hutchpp",
        compute_every_n_steps=3,
        num_hvps=30,
        k=2,
        hessian_batch_size=12,
        log_metrics=True,
    )
    logged: list[dict[str, float]] = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    pl.seed_everything(0, verbose=False)
    module = Tiny()
    trainer = make_trainer(tmp_path, [monitor, Spy()], max_steps=6)
    trainer.fit(module, tiny_data())
    recs = records(tmp_path / "curvature.jsonl")
    assert [(r["step"], r["quantity"]) for r in recs] == [
        (s, q) for s in (3, 6) for q in ("trace", "eigenvalues")
    ]
    trace, eig = recs[2:]
    assert trace["details"]["measured_with"] == "eigenvalues" and trace["seconds"] == 0.0
    assert trace["seed"] == eig["seed"] == monitor.probe_seed(6, "eigenvalues")
    assert trace["n_hvp"] == 30 and eig["n_hvp"] >= 30  # the sketch, plus any Lanczos refinement
    assert logged[-1]["curvature/n_hvp"] == eig["n_hvp"]  # one call: nothing counted twice
    # logged through Lightning, which keeps float32
    assert logged[-1]["curvature/hutch_trace"] == pytest.approx(trace["value"], rel=1e-6)

    dataset = trainer.train_dataloader.dataset
    x = torch.stack([dataset[i][0] for i in monitor.curvature_indices])
    y = torch.stack([dataset[i][1] for i in monitor.curvature_indices])
    again = dcc.estimate(
        module,
        module.loss_fn,
        (x, y),
        "eigenvalues",
        "hutchpp",
        seed=eig["seed"],
        num_hvps=30,
        k=2,
        data_groups=4,  # the monitor's default
    )
    assert again.value == eig["value"]
    assert again.also["trace"].value == trace["value"]
    assert again.also["trace"].stderr == trace["stderr"]

    module.eval()
    exact = dense_hessian(module, module.loss_fn, [(x, y)])
    top = torch.linalg.eigvalsh(exact).flip(0)[:2]
    torch.testing.assert_close(
        torch.tensor(eig["value"], dtype=torch.float64), top, rtol=1e-3, atol=1e-8
    )
    assert abs(trace["value"] - float(torch.trace(exact))) <= 5 * trace["stderr"]


# ------------------------------------------------------------------------------------ failures


def test_failures_are_isolated_recorded_once_and_never_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flaky = type("Flaky", (_FlakyBackend,), {"fail_calls": 4, "calls": 0})
    use_plugin(monkeypatch, _TestPlugin(flaky))
    monitor = CurvatureMonitor(
        backend="flaky", compute_every_n_steps=2, num_hvps=5, hessian_batch_size=4
    )
    with pytest.warns(UserWarning, match="kaboom") as caught:
        module, trainer = fit_tiny(tmp_path, monitor, max_steps=6)
    assert trainer.global_step == 6 and module.steps_run == 6
    # Once per distinct reason: the trace's and the eigenvalues' errors, not once per failure.
    kaboom = [str(w.message) for w in caught if "kaboom" in str(w.message)]
    assert len(kaboom) == 2  # 4 failures, 2 distinct reasons (one per quantity)
    assert any("computing 'trace'" in m for m in kaboom)
    assert any("computing 'eigenvalues'" in m for m in kaboom)
    recs = records(tmp_path / "curvature.jsonl")
    assert [r["step"] for r in recs] == [2, 2, 4, 4, 6, 6]
    for rec in recs[:4]:
        assert rec["value"] is None and rec["stderr"] is None and rec["n_hvp"] is None
        assert (
            rec["error"]
            == "BackendFailedError: backend 'flaky' failed computing "
            + repr(rec["quantity"])
            + ": RuntimeError: kaboom: the backend broke"
        )
    assert recs[4]["value"] == 1.0 and recs[5]["value"] == [2.0] and recs[4]["error"] is None
    assert float(trainer.callback_metrics["curvature/hutch_trace"]) == 1.0  # from step 6 only


def test_a_model_the_backend_refuses_fails_before_the_first_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backend.validate_model runs at setup: a whole run of null records is never the outcome."""
    use_plugin(monkeypatch, _TestPlugin(_PickyBackend))
    monitor = CurvatureMonitor(
        backend="picky", compute_every_n_steps=2, num_hvps=5, hessian_batch_size=4
    )
    pl.seed_everything(0, verbose=False)
    module = Tiny()
    trainer = make_trainer(tmp_path, [monitor], max_steps=6)
    with pytest.raises(UnsupportedModelError, match=r"picky cannot handle nn\.Tanh"):
        trainer.fit(module, tiny_data())
    assert module.steps_run == 0
    assert not (tmp_path / "curvature.jsonl").exists()


class DictBatches(Tiny):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps_run += 1
        return self.loss_fn(self(batch["x"]), batch["y"])


def dict_data() -> DataLoader:
    loader = tiny_data()
    x, y = loader.dataset.tensors
    items = [{"x": x[i], "y": y[i]} for i in range(len(y))]
    return DataLoader(items, batch_size=8)  # type: ignore[arg-type]


def test_a_loader_of_dicts_needs_batch_fn_and_says_so_before_training(tmp_path: Path) -> None:
    monitor = CurvatureMonitor(compute_every_n_steps=2, num_hvps=5, hessian_batch_size=4)
    pl.seed_everything(0, verbose=False)
    module = DictBatches()
    with pytest.raises(ConfigurationError, match=r"dict with keys \['x', 'y'\].*batch_fn") as info:
        make_trainer(tmp_path, [monitor], max_steps=4).fit(module, dict_data())
    assert module.steps_run == 0
    # A config cannot hold a lambda: the message names the config form too.
    assert "curvature.batch_fn=package.module:function" in str(info.value)

    mapped = CurvatureMonitor(
        compute_every_n_steps=2,
        num_hvps=5,
        hessian_batch_size=4,
        batch_fn=lambda b: (b["x"], b["y"]),
        jsonl=str(tmp_path / "mapped.jsonl"),
    )
    pl.seed_everything(0, verbose=False)
    module = DictBatches()
    make_trainer(tmp_path, [mapped], max_steps=4).fit(module, dict_data())
    recs = records(tmp_path / "mapped.jsonl")
    assert [(r["step"], r["error"]) for r in recs] == [(s, None) for s in (2, 2, 4, 4)]
    x = torch.stack([dict_data().dataset[i]["x"] for i in mapped.curvature_indices])
    y = torch.stack([dict_data().dataset[i]["y"] for i in mapped.curvature_indices])
    again = dcc.estimate(
        module,
        module.loss_fn,
        (x, y),
        "trace",
        seed=mapped.probe_seed(4, "trace"),
        num_hvps=5,
        data_groups=4,  # the monitor's default
    )
    assert again.value == recs[2]["value"]


class Float32Tiny(Tiny):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def test_true_precision_casts_the_curvature_batch_like_training_inputs(tmp_path: Path) -> None:
    """precision='64-true' runs the model in float64 and Lightning casts training inputs; the
    monitor's own batch (float32 data here) is cast the same way instead of failing."""
    monitor = CurvatureMonitor(compute_every_n_steps=2, num_hvps=5, hessian_batch_size=4)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
    pl.seed_everything(0, verbose=False)
    module = Float32Tiny()
    trainer = make_trainer(tmp_path, [monitor], max_steps=4, precision="64-true")
    trainer.fit(module, DataLoader(data, batch_size=8))
    recs = records(tmp_path / "curvature.jsonl")
    assert [(r["step"], r["error"]) for r in recs] == [(s, None) for s in (2, 2, 4, 4)]
    assert all(r["value"] is not None for r in recs)


def test_on_error_raise_stops_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flaky = type("Flaky", (_FlakyBackend,), {"calls": 0})
    use_plugin(monkeypatch, _TestPlugin(flaky))
    monitor = CurvatureMonitor(
        backend="flaky",
        quantities=["trace"],
        compute_every_n_steps=2,
        num_hvps=5,
        hessian_batch_size=4,
        on_error="raise",
    )
    pl.seed_everything(0, verbose=False)
    module = Tiny()
    trainer = make_trainer(tmp_path, [monitor], max_steps=6)
    with pytest.raises(BackendFailedError, match="kaboom"):
        trainer.fit(module, tiny_data())
    assert trainer.global_step == 2 and module.steps_run == 2
    (rec,) = records(tmp_path / "curvature.jsonl")
    assert rec["value"] is None and "kaboom" in rec["error"]


# ------------------------------------------------------------------------------------ fail fast


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"compute_every_n_steps": 0}, "compute_every_n_steps must be an integer >= 1"),
        ({"compute_every_n_steps": -5}, "compute_every_n_steps"),
        ({"num_hvps": 0}, "num_hvps must be an integer >= 1"),
        ({"hessian_batch_size": 0}, "hessian_batch_size"),
        ({"rtol": 0.0}, "rtol must be a number > 0"),
        ({"k": 0}, "k must be"),
        ({"batch_mode": "sometimes"}, "batch_mode must be one of 'fixed', 'refresh'"),
        ({"on_error": "ignore"}, "on_error must be one of 'warn', 'raise'"),
        ({"quantities": []}, "quantities is empty"),
        ({"quantities": ["diagonal"]}, "too big"),
        ({"metric_keys": {"lambda": "x"}}, "unknown metric_keys"),
        ({"seed": -1}, "seed must be"),
        ({"enabled": "false"}, "enabled must be true or false; got 'false'"),
        ({"compute_at_step_zero": 1}, "compute_at_step_zero must be true or false"),
        ({"log_metrics": None}, "log_metrics must be true or false"),
        ({"batch_fn": "x"}, "batch_fn must be a callable"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        CurvatureMonitor(**kwargs)


def test_the_monitors_arguments_are_checked_in_one_place() -> None:
    """MonitorSettings checks every argument of the signature (num_samples, the alias, becomes
    num_hvps); the monitor keeps each checked field as its attribute of the same name."""
    params = [p for p in inspect.signature(CurvatureMonitor.__init__).parameters if p != "self"]
    fields = [f.name for f in dataclasses.fields(MonitorSettings)]
    assert params == [*fields, "num_samples"]
    kwargs: dict[str, Any] = {
        "quantities": "trace",
        "rtol": 1,
        "metric_keys": {"seconds": None},
        "jsonl": "c.jsonl",
        "loss_fn": "mse",
        "batch_fn": "json:loads",
    }
    monitor = CurvatureMonitor(**kwargs)
    signature = inspect.signature(CurvatureMonitor.__init__)
    settings = MonitorSettings(
        **{n: p.default for n, p in signature.parameters.items() if n != "self"} | kwargs
    )
    for name in fields:
        value = getattr(monitor, name)
        if name != "loss_fn":  # built anew from its name each time
            assert value == getattr(settings, name), name
    assert monitor.quantities == ("trace",) and monitor.rtol == 1.0 and type(monitor.rtol) is float
    assert monitor.metric_keys["seconds"] is None and monitor.jsonl == Path("c.jsonl")
    assert isinstance(monitor.loss_fn, nn.MSELoss) and monitor.batch_fn is json.loads
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.k = 2  # type: ignore[misc]


def test_the_num_samples_warning_points_at_the_line_that_built_the_monitor() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1  # type: ignore[union-attr]
        CurvatureMonitor(num_samples=3)
    (warning,) = caught
    assert warning.category is DeprecationWarning
    assert (warning.filename, warning.lineno) == (__file__, line)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"backend": "pyhesian"}, UnknownBackendError, "Did you mean 'pyhessian'"),
        ({"backend": "traceonly"}, UnsupportedQuantityError, "cannot compute quantity"),
        ({"backend_options": {"nope": 1}}, ConfigurationError, "options.nope: unknown option"),
        ({"backend_options": {"num_runs": 2}}, ConfigurationError, "applies to density only"),
        ({"backend_options": {"tol": -1.0}}, dcc.InvalidOptionError, "'tol'"),
        ({"hessian_batch_size": 33}, ConfigurationError, "only 32 samples"),
        ({"model_attr": "missing"}, ConfigurationError, "does not name a torch.nn.Module"),
    ],
)
def test_bad_configuration_fails_before_the_first_training_step(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kwargs: dict[str, Any],
    error: type[Exception],
    match: str,
) -> None:
    use_plugin(monkeypatch, _TestPlugin(_TraceOnlyBackend))
    monitor = CurvatureMonitor(compute_every_n_steps=1, **kwargs)
    module = Tiny()
    trainer = make_trainer(tmp_path, [monitor], max_steps=3)
    with pytest.raises(error, match=match):
        trainer.fit(module, tiny_data())
    assert module.steps_run == 0 and trainer.global_step == 0


def test_missing_loss_fails_fast(tmp_path: Path) -> None:
    module = Tiny()
    del module.loss_fn
    module.training_step = lambda batch, i: nn.functional.cross_entropy(module(batch[0]), batch[1])
    trainer = make_trainer(tmp_path, [CurvatureMonitor()], max_steps=1)
    with pytest.raises(ConfigurationError, match="needs the training loss"):
        trainer.fit(module, tiny_data())


def test_a_sum_reduced_loss_is_refused_by_the_same_rule_as_estimate(tmp_path: Path) -> None:
    """One mean-reduction rule (problem.check_mean_reduced): the monitor refuses before the first
    step with estimate()'s sentence, naming the monitor where estimate() names its argument."""
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    module = Tiny()
    x, y = next(iter(tiny_data()))
    with pytest.raises(dcc.InvalidProblemError) as direct:
        dcc.estimate(module.net, loss_fn, (x, y), "trace")
    assert str(direct.value).startswith("loss_fn has reduction='sum'; ")
    trainer = make_trainer(tmp_path, [CurvatureMonitor(loss_fn=loss_fn)], max_steps=1)
    with pytest.raises(ConfigurationError) as hooked:
        trainer.fit(module, tiny_data())
    expected = "CurvatureMonitor: the loss" + str(direct.value).removeprefix("loss_fn")
    assert str(hooked.value) == expected
    assert module.steps_run == 0


def test_loggers_get_each_measurement_once_at_its_step(tmp_path: Path) -> None:
    """A real CSVLogger whose cadence does not match the monitor's: every measurement reaches it
    once, on the step it was measured at (step 0 included), never a stale repeat."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    monitor = CurvatureMonitor(
        quantities=["trace"],
        compute_every_n_steps=3,
        compute_at_step_zero=True,
        num_hvps=2,
        hessian_batch_size=8,
    )
    logger = CSVLogger(tmp_path, name="csv")
    fit_tiny(tmp_path, monitor, max_steps=7, logger=logger, log_every_n_steps=2)
    recs = records(Path(logger.log_dir) / "curvature.jsonl")
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("curvature/hutch_trace")]
    assert [int(r["step"]) for r in rows] == [r["step"] for r in recs] == [0, 3, 6]
    for row, rec in zip(rows, recs, strict=True):
        assert float(row["curvature/hutch_trace"]) == pytest.approx(rec["value"], rel=1e-6)


# ------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("batch_mode", ["fixed", "refresh"])
def test_resume_writes_the_same_records(tmp_path: Path, batch_mode: str) -> None:
    def monitor() -> CurvatureMonitor:
        return CurvatureMonitor(
            compute_every_n_steps=3,
            compute_at_step_zero=True,
            num_hvps=4,
            hessian_batch_size=8,
            batch_mode=batch_mode,
            backend_options={"max_hvps": 5},
            seed=3,
        )

    whole = monitor()
    fit_tiny(tmp_path / "whole", whole, max_epochs=4)  # 4 steps per epoch: 16 steps

    pl.seed_everything(0, verbose=False)
    first = monitor()
    trainer = make_trainer(tmp_path / "parts", [first], max_epochs=2)
    trainer.fit(Tiny(), tiny_data())
    ckpt = tmp_path / "parts" / "epoch2.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=False)["callbacks"][first.state_key]["last_step"] == 6

    pl.seed_everything(123, verbose=False)  # a resumed run must not depend on the global seed
    second = monitor()
    trainer = make_trainer(tmp_path / "parts", [second], max_epochs=4)
    trainer.fit(Tiny(), tiny_data(), ckpt_path=ckpt)
    assert trainer.global_step == 16

    expected = comparable(records(tmp_path / "whole" / "curvature.jsonl"))
    assert [r["step"] for r in expected][::2] == [0, 3, 6, 9, 12, 15]
    assert comparable(records(tmp_path / "parts" / "curvature.jsonl")) == expected
    assert second.curvature_indices == whole.curvature_indices
    assert second.measurements == whole.measurements == 6


def test_resuming_with_another_seed_keeps_the_checkpoints_batch_and_says_so(
    tmp_path: Path,
) -> None:
    def monitor(seed: int) -> CurvatureMonitor:
        return CurvatureMonitor(
            quantities=["trace"],
            compute_every_n_steps=2,
            num_hvps=2,
            hessian_batch_size=8,
            seed=seed,
            jsonl=str(tmp_path / "c.jsonl"),
        )

    first = monitor(0)
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, [first], max_steps=4)
    trainer.fit(Tiny(), tiny_data())
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    resumed = monitor(1)
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, [resumed], max_steps=6)
    with pytest.warns(UserWarning, match="measured with seed=0, this monitor has seed=1"):
        trainer.fit(Tiny(), tiny_data(), ckpt_path=tmp_path / "c.ckpt")
    assert resumed.seed == 0 and resumed.curvature_indices == first.curvature_indices
    assert resumed.measurements == 3
    steps = [r["step"] for r in records(tmp_path / "c.jsonl")]
    assert steps == [2, 4, 6]


def test_a_run_folder_moved_elsewhere_resumes_with_its_monitor_state(tmp_path: Path) -> None:
    """deconcnn-curv train gives the monitor an absolute records path; the state key held it, so
    a run folder moved (scratch to project space, renamed) resumed without the monitor's state
    (count, seed, batch) and Lightning told the user to add the callback they had added."""

    def monitor(folder: Path, seed: int) -> CurvatureMonitor:
        return CurvatureMonitor(
            quantities=["trace"], compute_every_n_steps=2, num_hvps=2, hessian_batch_size=8,
            seed=seed, jsonl=str(folder / "curvature.jsonl"),
        )  # fmt: skip

    first = monitor(tmp_path / "scratch", 0)
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path / "scratch", [first], max_steps=4)
    trainer.fit(Tiny(), tiny_data())
    trainer.save_checkpoint(tmp_path / "scratch" / "last.ckpt")
    (tmp_path / "scratch").rename(tmp_path / "project")

    resumed = monitor(tmp_path / "project", 1)
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path / "project", [resumed], max_steps=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Tiny(), tiny_data(), ckpt_path=tmp_path / "project" / "last.ckpt")
    said = [str(w.message) for w in caught]
    assert any("measured with seed=0, this monitor has seed=1" in m for m in said), said
    assert not any("callbacks used to create the checkpoint" in m for m in said), said
    assert resumed.seed == 0 and resumed.curvature_indices == first.curvature_indices
    assert resumed.measurements == 3
    assert [r["step"] for r in records(tmp_path / "project" / "curvature.jsonl")] == [2, 4, 6]


def test_resuming_from_an_older_checkpoint_keeps_each_step_once(tmp_path: Path) -> None:
    """A run measured steps 2, 4, 6 but its checkpoint is from step 4 (it crashed, say): the
    resumed run re-measures step 6; the stale step-6 records move to a side file, the main file
    holds each step once, and the re-measured values equal the originals (same seed, batch and
    training)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from deconcnn_curvature.training.metrics import MetricsJSONL, read_metrics_jsonl

    def callbacks() -> list[pl.Callback]:
        return [
            CurvatureMonitor(
                quantities=["trace"],
                compute_every_n_steps=2,
                num_hvps=2,
                hessian_batch_size=8,
                jsonl=str(tmp_path / "c.jsonl"),
            ),
            MetricsJSONL(tmp_path / "metrics.jsonl"),
        ]

    keep = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=4, save_top_k=-1)
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, [*callbacks(), keep], max_steps=6, enable_checkpointing=True)
    trainer.fit(Tiny(), tiny_data())
    original = records(tmp_path / "c.jsonl")
    assert [r["step"] for r in original] == [2, 4, 6]
    (checkpoint,) = sorted((tmp_path / "ck").glob("*step=4*.ckpt"))

    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, callbacks(), max_steps=6)
    with pytest.warns(UserWarning, match="resumed at step 4; 1 records measured after it"):
        trainer.fit(Tiny(), tiny_data(), ckpt_path=checkpoint)
    again = records(tmp_path / "c.jsonl")
    assert [r["step"] for r in again] == [2, 4, 6]
    assert comparable(again) == comparable(original)
    assert [r["step"] for r in records(tmp_path / "c.superseded.jsonl")] == [6]
    steps = [line["step"] for line in read_metrics_jsonl(tmp_path / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    assert (tmp_path / "metrics.superseded.jsonl").is_file()


def test_an_unreachable_rtol_is_reported_once(tmp_path: Path) -> None:
    monitor = CurvatureMonitor(
        quantities=["trace"],
        compute_every_n_steps=2,
        num_hvps=4,
        rtol=1e-9,
        hessian_batch_size=8,
    )
    with pytest.warns(UserWarning, match="missed rtol=1e-09 within its budget of 4") as caught:
        fit_tiny(tmp_path, monitor, max_steps=6)
    assert sum("missed rtol" in str(w.message) for w in caught) == 1
    recs = records(tmp_path / "curvature.jsonl")
    assert [r["target_met"] for r in recs] == [False, False, False]
    assert all(r["n_hvp"] == 4 and r["value"] is not None for r in recs)


def test_unconverged_eigenvalues_are_reported_once_with_what_to_do(tmp_path: Path) -> None:
    monitor = CurvatureMonitor(
        quantities="eigenvalues",
        compute_every_n_steps=2,
        hessian_batch_size=8,
        backend_options={"max_hvps": 2},
    )
    with pytest.warns(UserWarning, match="did not converge within 2 products") as caught:
        fit_tiny(tmp_path, monitor, max_steps=6)
    said = [str(w.message) for w in caught if "did not converge" in str(w.message)]
    assert len(said) == 1 and "raise the backend's max_hvps" in said[0]
    recs = records(tmp_path / "curvature.jsonl")
    assert [r["details"]["converged"] for r in recs] == [False, False, False]
    assert all(r["value"] is not None for r in recs)  # logged, marked, never dropped


def test_two_monitors_keep_separate_state(tmp_path: Path) -> None:
    a = CurvatureMonitor(
        quantities=["trace"],
        compute_every_n_steps=2,
        num_hvps=2,
        jsonl="a",
        hessian_batch_size=8,
    )
    b = CurvatureMonitor(
        quantities=["trace"],
        compute_every_n_steps=3,
        num_hvps=2,
        jsonl="b",
        hessian_batch_size=8,
    )
    assert a.state_key != b.state_key
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, [a, b], max_steps=4)
    trainer.fit(Tiny(), tiny_data())
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    saved = torch.load(tmp_path / "c.ckpt", weights_only=False)["callbacks"]
    assert saved[a.state_key]["count"] == 2 and saved[b.state_key]["count"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = CurvatureMonitor(
            quantities=["trace"], compute_every_n_steps=2, num_hvps=2, hessian_batch_size=8
        )
        c.load_state_dict(saved[a.state_key])
    assert c.measurements == 2 and c.curvature_indices == a.curvature_indices


# ------------------------------------------------------------------- modules of other shapes


class NoForward(pl.LightningModule):
    """The common shape of other people's modules: the network in ``self.net``, no ``forward``,
    the loss called inline (``self.loss``, an attribute the monitor does not read)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)
        ).double()
        self.loss = nn.CrossEntropyLoss()
        self.steps_run = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps_run += 1
        x, y = batch
        return self.loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


class TwoNets(NoForward):
    """No forward and two submodules with parameters: which one is the model is ambiguous."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 3).double()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps_run += 1
        x, y = batch
        return self.loss(self.head(self.net(x)), y)


def test_a_module_without_forward_is_measured_through_its_only_model_child(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Today every record of such a run is null ('missing the required forward
    function'); the monitor now measures pl_module.net, found by itself, and says so."""
    monitor = CurvatureMonitor(
        compute_every_n_steps=2,
        num_hvps=5,
        hessian_batch_size=8,
        loss_fn=nn.CrossEntropyLoss(),
    )
    pl.seed_everything(0, verbose=False)
    module = NoForward()
    with caplog.at_level("INFO"):
        make_trainer(tmp_path, [monitor], max_steps=4).fit(module, tiny_data())
    startup = [r.getMessage() for r in caplog.records if "measuring loss" in r.getMessage()]
    assert len(startup) == 1
    assert "of model NoForward.net (model_attr='net', chosen automatically" in startup[0]
    assert "CrossEntropyLoss() (loss_fn)" in startup[0]
    recs = records(tmp_path / "curvature.jsonl")
    assert [(r["step"], r["quantity"], r["error"]) for r in recs] == [
        (s, q, None) for s in (2, 4) for q in ("trace", "eigenvalues")
    ]
    x, y = tiny_data().dataset[monitor.curvature_indices]
    again = dcc.estimate(
        module.net, nn.CrossEntropyLoss(), (x, y), "trace", seed=monitor.probe_seed(4, "trace"),
        num_hvps=5, data_groups=4,  # the monitor's default
    )  # fmt: skip
    assert again.value == recs[2]["value"]


def test_an_ambiguous_module_fails_before_the_first_step_naming_model_attr(
    tmp_path: Path,
) -> None:
    monitor = CurvatureMonitor(compute_every_n_steps=2, num_hvps=5, hessian_batch_size=8,
                               loss_fn=nn.CrossEntropyLoss())  # fmt: skip
    module = TwoNets()
    trainer = make_trainer(tmp_path, [monitor], max_steps=4)
    with pytest.raises(ConfigurationError, match=r"2 submodules .*\(net, head\).*model_attr='net'"):
        trainer.fit(module, tiny_data())
    assert module.steps_run == 0 and trainer.global_step == 0
    assert not (tmp_path / "curvature.jsonl").exists()

    named = CurvatureMonitor(compute_every_n_steps=2, num_hvps=5, hessian_batch_size=8,
                             loss_fn=nn.CrossEntropyLoss(), model_attr="net")  # fmt: skip
    make_trainer(tmp_path, [named], max_steps=2).fit(TwoNets(), tiny_data())
    assert [r["error"] for r in records(tmp_path / "curvature.jsonl")] == [None, None]


class DictOutput(Tiny):
    """A forward that returns a dict: the loss cannot take it."""

    def forward(self, x: torch.Tensor) -> Any:  # type: ignore[override]
        return {"logits": self.net(x)}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps_run += 1
        return self.loss_fn(self(batch[0])["logits"], batch[1])


@pytest.mark.parametrize(
    ("module_cls", "kwargs", "match"),
    [
        (NoForward, {}, r"needs the training loss.*criterion.*cross_entropy"),
        (DictOutput, {}, r"trial measurement .*model=DictOutput.*TypeError.*model_attr='net'"),
        (NoForward, {"loss_fn": "bce_with_logits"}, r"loss_fn=BCEWithLogitsLoss\(\).*batch_fn="),
        (NoForward, {"loss_fn": "cross_entropy", "batch_fn": lambda b: (b[1], b[0])}, r"Error"),
        (
            NoForward,
            {"loss_fn": "cross_entropy", "batch_fn": lambda b: (b["x"], b["y"])},
            r"building the curvature batch .*TypeError.*batch_fn=",
        ),
        (NoForward, {"loss_fn": lambda out, y: out.detach().sum() * 0}, "does not depend"),
        (
            NoForward,
            {"loss_fn": nn.CrossEntropyLoss(), "model_attr": "net.4"},
            r"model=NoForward.net.4.*shape",
        ),
    ],
)
def test_a_measurement_that_cannot_work_stops_the_run_before_step_one(
    tmp_path: Path, module_cls: type[pl.LightningModule], kwargs: dict[str, Any], match: str
) -> None:
    """One forward + loss on the curvature batch at the start of training: whatever would make
    every measurement fail raises a ConfigurationError saying what to set, before step 1."""
    monitor = CurvatureMonitor(compute_every_n_steps=2, num_hvps=5, hessian_batch_size=8,
                               **kwargs)  # fmt: skip
    module = module_cls()
    trainer = make_trainer(tmp_path, [monitor], max_steps=4)
    with pytest.raises(ConfigurationError, match=match) as info:
        trainer.fit(module, tiny_data())
    assert "\n" not in str(info.value)
    assert module.steps_run == 0 and trainer.global_step == 0  # type: ignore[attr-defined]
    assert not (tmp_path / "curvature.jsonl").exists()


def test_training_a_module_without_forward_is_bit_identical_with_monitor_on_and_off(
    tmp_path: Path,
) -> None:
    """The trial forward (BatchNorm, dropout) and the measurements leave training untouched."""

    def run(monitor: CurvatureMonitor | None, root: Path) -> dict[str, Any]:
        pl.seed_everything(0, verbose=False)
        module = NoForward()
        trainer = make_trainer(root, [monitor] if monitor else [], max_steps=6)
        trainer.fit(module, tiny_data(shuffle=True))
        return _state(module, trainer)

    off = run(None, tmp_path / "off")
    monitor = CurvatureMonitor(
        compute_every_n_steps=3,
        compute_at_step_zero=True,
        num_hvps=4,
        hessian_batch_size=8,
        loss_fn="cross_entropy",
    )
    on = run(monitor, tmp_path / "on")
    assert [r["error"] for r in records(tmp_path / "on" / "curvature.jsonl")] == [None] * 6
    _assert_same(off, on)


class WithCriterion(NoForward):
    def __init__(self) -> None:
        super().__init__()
        self.criterion = nn.CrossEntropyLoss()


def test_the_loss_is_read_from_a_criterion_attribute_or_a_short_name(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    from_attr = CurvatureMonitor(quantities=["trace"], compute_every_n_steps=2, num_hvps=3,
                                 hessian_batch_size=8, jsonl="attr.jsonl")  # fmt: skip
    make_trainer(tmp_path, [from_attr], max_steps=2).fit(WithCriterion(), tiny_data())
    pl.seed_everything(0, verbose=False)
    by_name = CurvatureMonitor(quantities=["trace"], compute_every_n_steps=2, num_hvps=3,
                               hessian_batch_size=8, jsonl="name.jsonl",
                               loss_fn="cross_entropy")  # fmt: skip
    make_trainer(tmp_path, [by_name], max_steps=2).fit(NoForward(), tiny_data())
    a, b = records(tmp_path / "attr.jsonl"), records(tmp_path / "name.jsonl")
    assert a[0]["error"] is None and a[0]["value"] == b[0]["value"]
    assert isinstance(CurvatureMonitor(loss_fn="MSE").loss_fn, nn.MSELoss)
    with pytest.raises(ConfigurationError, match=r"unknown loss_fn name 'hinge'.*cross_entropy"):
        CurvatureMonitor(loss_fn="hinge")


def test_batch_fn_may_be_an_import_path() -> None:
    monitor = CurvatureMonitor(batch_fn="operator:itemgetter")
    assert monitor.batch_fn is __import__("operator").itemgetter
    assert CurvatureMonitor(batch_fn="os.path.basename").batch_fn is __import__("os").path.basename
    with pytest.raises(ConfigurationError, match="does not name an importable function"):
        CurvatureMonitor(batch_fn="no_such_package.fn")


def test_a_failed_joint_call_records_every_quantity_it_was_to_measure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hutchpp measures trace and eigenvalues in one call; when that call fails, the records
    still hold one line per monitored quantity (the trace's too), as a success does, in the
    same order, so a reader never finds a step with no trace line at all."""
    from deconcnn_curvature.backends.hutchpp import HutchppBackend

    compute = HutchppBackend.compute
    calls: list[str] = []

    def first_fails(self, problem, quantity, *, seed, options):  # type: ignore[no-untyped-def]
        calls.append(quantity)
        if len(calls) == 1:
            raise RuntimeError("kaboom: the first measurement broke")
        return compute(self, problem, quantity, seed=seed, options=options)

    monkeypatch.setattr(HutchppBackend, "compute", first_fails)
    monitor = CurvatureMonitor(
        backend="hutchpp", compute_every_n_steps=2, num_hvps=8, hessian_batch_size=8
    )
    with pytest.warns(UserWarning, match="kaboom"):
        fit_tiny(tmp_path, monitor, max_steps=4)
    assert calls == ["eigenvalues", "eigenvalues"]  # one call per measurement
    recs = records(tmp_path / "curvature.jsonl")
    assert [(r["step"], r["quantity"]) for r in recs] == [
        (2, "trace"), (2, "eigenvalues"), (4, "trace"), (4, "eigenvalues"),
    ]  # fmt: skip
    for failed in recs[:2]:
        assert failed["value"] is None and failed["n_hvp"] is None
        assert failed["error"] == (
            "BackendFailedError: backend 'hutchpp' failed computing 'eigenvalues': "
            "RuntimeError: kaboom: the first measurement broke"
        )
    assert all(r["error"] is None and r["value"] is not None for r in recs[2:])
    assert recs[2]["details"]["measured_with"] == "eigenvalues"
