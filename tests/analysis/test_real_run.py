"""A real ``deconcnn-curv train`` run folder read back: the table holds what the monitor wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from deconcnn_curvature.analysis.runs import read_runs
from deconcnn_curvature.cli import cli
from deconcnn_curvature.monitor.records import read_jsonl

TINY = [
    "model=small_cnn",
    "model.width=4",
    "data.num_train=64",
    "data.num_val=32",
    "data.batch_size=16",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "trainer.val_check_interval=1.0",
    "lrsched.warmup_epochs=0.5",
    "curvature.compute_every_n_steps=2",
    "curvature.compute_at_step_zero=true",
    "curvature.num_hvps=4",
    "curvature.hessian_batch_size=8",
    "plot=false",
]


@pytest.mark.slow
def test_a_trained_run_reads_back_record_for_record(tmp_path: Path) -> None:
    run = tmp_path / "lr0.05"
    result = CliRunner().invoke(
        cli, ["train", *TINY, "optim.lr=0.05", f"run_dir={run}"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    table = read_runs(run)
    records = read_jsonl(run / "curvature.jsonl")
    assert len(table) == len(records) == 10  # trace and λ_max at steps 0, 2, 4, 6, 8
    for row, rec in zip(table.itertuples(), records, strict=True):
        value = rec["value"][0] if rec["quantity"] == "eigenvalues" else rec["value"]
        assert (row.step, row.epoch, row.quantity, row.value) == (
            rec["step"], rec["epoch"], rec["quantity"], value
        )  # fmt: skip
        assert (row.n_hvp, row.seconds, row.backend) == (rec["n_hvp"], rec["seconds"], "pyhessian")
    assert (table["optim.lr"] == 0.05).all() and (table["model.width"] == 4).all()
    losses = {
        r["step"]: r["metrics"]["train/loss"]
        for r in read_jsonl(run / "metrics.jsonl")
        if "train/loss" in r["metrics"]
    }
    at_8 = table[table["step"] == 8]["train_loss"].iloc[0]
    assert at_8 == pytest.approx(losses[8])

    report = CliRunner().invoke(cli, ["report", str(run), "--json"], catch_exceptions=False)
    summary = json.loads(report.stdout)["runs"][0]
    assert summary["lambda_max"]["points"] == 5 and summary["failed"] == 0
    assert summary["plateau"]["reason"].startswith("too few points")
    assert 0 < summary["curvature_share"] < 1


@pytest.mark.slow
def test_the_monitor_under_another_training_app(tmp_path: Path) -> None:
    """A plain Lightning app (not ours) with the monitor measuring the top 2 eigenvalues: its
    log folder reads as a run with no configuration, one row per eigenvalue."""
    import lightning.pytorch as lightning
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from deconcnn_curvature import CurvatureMonitor

    class App(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
            self.loss_fn = nn.CrossEntropyLoss()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
            return self.loss_fn(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(24, 5, generator=g, dtype=torch.float64),
                         torch.randint(0, 3, (24,), generator=g))  # fmt: skip
    log = tmp_path / "logs" / "version_0"
    monitor = CurvatureMonitor(
        compute_every_n_steps=2, k=2, num_hvps=10, hessian_batch_size=8,
        jsonl=str(log / "curvature.jsonl"),
    )  # fmt: skip
    trainer = lightning.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[monitor],
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(App(), DataLoader(data, batch_size=8))
    table = read_runs(tmp_path / "logs")
    records = read_jsonl(log / "curvature.jsonl")
    assert table.columns.tolist()[-1] == "path"  # no configuration columns
    assert table["run"].unique().tolist() == ["version_0"]
    eig = table[table["quantity"] == "eigenvalues"]
    expected = [v for r in records if r["quantity"] == "eigenvalues" for v in r["value"]]
    assert eig["value"].tolist() == expected and eig["index"].tolist() == [1, 2] * 3
    assert (table[table["quantity"] == "trace"]["step"] == [2, 4, 6]).all()
