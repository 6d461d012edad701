"""The monitor's data groups: the logged trace stderr is the total (probe and data
noise), its parts are in the JSONL record, and bad settings fail before training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_lightning_monitor import Tiny, fit_tiny, make_trainer, records, tiny_data

import deconcnn_curvature as dcc
from deconcnn_curvature.errors import ConfigurationError
from deconcnn_curvature.monitor import CurvatureMonitor


def test_logged_stderr_is_the_total_and_the_record_has_its_parts(tmp_path: Path) -> None:
    monitor = CurvatureMonitor(
        quantities="trace", compute_every_n_steps=4, num_hvps=12, hessian_batch_size=24
    )
    assert monitor.data_groups == 4
    module, trainer = fit_tiny(tmp_path, monitor, max_steps=4)
    (rec,) = records(tmp_path / "curvature.jsonl")
    d = rec["details"]
    assert d["data_groups"] == 4 and d["data_samples"] == 24
    assert rec["stderr"] ** 2 == pytest.approx(d["stderr_probe"] ** 2 + d["stderr_data"] ** 2)
    logged = trainer.callback_metrics
    assert float(logged["curvature/hutch_trace_stderr"]) == pytest.approx(rec["stderr"], rel=1e-6)
    # The probe part is what the monitor logged before: Hutchinson on the whole batch.
    dataset = trainer.train_dataloader.dataset
    x = torch.stack([dataset[i][0] for i in monitor.curvature_indices])
    y = torch.stack([dataset[i][1] for i in monitor.curvature_indices])
    seed = monitor.probe_seed(4, "trace")
    before = dcc.estimate(module, module.loss_fn, (x, y), "trace", seed=seed, num_hvps=12)
    assert d["stderr_probe"] == pytest.approx(before.stderr, rel=1e-9)
    assert rec["value"] == pytest.approx(before.value, rel=1e-12)


def test_data_groups_1_logs_the_probe_only_stderr(tmp_path: Path) -> None:
    monitor = CurvatureMonitor(
        quantities="trace",
        compute_every_n_steps=4,
        num_hvps=6,
        hessian_batch_size=8,
        data_groups=1,
    )
    fit_tiny(tmp_path, monitor, max_steps=4)
    (rec,) = records(tmp_path / "curvature.jsonl")
    assert "stderr_data" not in (rec["details"] or {})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"data_groups": 0}, "data_groups must be an integer >= 1"),
        ({"data_groups": 9, "hessian_batch_size": 8}, "data_groups=9 exceeds hessian_batch_size=8"),
    ],
)
def test_bad_data_groups_fail_at_construction(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        CurvatureMonitor(**kwargs)


def test_train_mode_measurement_with_groups_fails_before_the_first_step(tmp_path: Path) -> None:
    monitor = CurvatureMonitor(compute_every_n_steps=1, backend_options={"eval_mode": False})
    module = Tiny()
    trainer = make_trainer(tmp_path, [monitor], max_steps=2)
    with pytest.raises(dcc.InvalidOptionError, match="pass data_groups=1 with eval_mode=false"):
        trainer.fit(module, tiny_data())
    assert module.steps_run == 0


def test_hutchpp_monitor_logs_the_total_from_its_one_call(tmp_path: Path) -> None:
    monitor = CurvatureMonitor(
        backend="hutchpp", compute_every_n_steps=4, num_hvps=12, hessian_batch_size=24
    )
    _, trainer = fit_tiny(tmp_path, monitor, max_steps=4)
    trace, eig = records(tmp_path / "curvature.jsonl")
    assert trace["quantity"] == "trace" and eig["quantity"] == "eigenvalues"
    d = trace["details"]
    assert d["measured_with"] == "eigenvalues" and d["data_groups"] == 4
    assert trace["stderr"] ** 2 == pytest.approx(d["stderr_probe"] ** 2 + d["stderr_data"] ** 2)
    logged = float(trainer.callback_metrics["curvature/hutch_trace_stderr"])
    assert logged == pytest.approx(trace["stderr"], rel=1e-6)
