"""The time budget inside real Lightning Trainers: records carry the sizes chosen and the budget
they were sized for, the monitor's measuring time stays near its share of the training time, a
budget too small skips (recorded, never over), and without a budget the records are today's."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from deconcnn_curvature.errors import ConfigurationError
from deconcnn_curvature.monitor import CurvatureMonitor, read_curvature_jsonl
from deconcnn_curvature.present import budget_share


class Slow(pl.LightningModule):
    """A float64 MLP whose training step also sleeps ``pause`` seconds, so that training time
    is known and dominates however loaded the machine is."""

    def __init__(self, pause: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        self.loss_fn = nn.CrossEntropyLoss()
        self.pause = pause

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.pause:
            time.sleep(self.pause)
        x, y = batch
        return self.loss_fn(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(root: Path, monitor: CurvatureMonitor, steps: int, pause: float = 0.0) -> None:
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (256,), generator=g)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
        callbacks=[monitor],
    )
    trainer.fit(Slow(pause), DataLoader(TensorDataset(x, y), batch_size=16))


def test_records_carry_the_chosen_sizes_and_the_share_tracks_the_target(tmp_path: Path) -> None:
    """Steps of ≥ 20 ms (a sleep); 25 % of training time for curvature. The monitor's own
    account (measuring seconds over training seconds, both wall clock) ends within [0.3, 1.4]
    of the target: below, the budget went unspent; above, it overspent beyond one
    measurement's slack."""
    path = tmp_path / "c.jsonl"
    target = 0.25
    monitor = CurvatureMonitor(
        backend="pyhessian", compute_every_n_steps=4, max_overhead=target, jsonl=path
    )
    fit(tmp_path, monitor, steps=120, pause=0.02)
    recs = read_curvature_jsonl(path)
    assert recs and all(r["budget"]["max_overhead"] == target for r in recs)
    measured = [r for r in recs if r["value"] is not None]
    traces = [r for r in measured if r["quantity"] == "trace"]
    assert len(traces) >= 2
    for r in traces:
        b = r["budget"]
        assert r["batch_size"] == b["samples"] >= 8  # 2 per data group, 4 groups
        assert r["n_hvp"] == b["products"] >= 2  # the trace spent exactly what was chosen
        assert b["max_seconds"] is None and b["seconds"] > 0
        assert r["details"]["data_groups"] == 4
    assert traces[0]["budget"]["rule"].startswith("first")
    later = ("balanced", "fixed shape, kept", "fixed shape, scaled")
    assert all(r["budget"]["rule"] in later for r in traces[1:])
    summary = monitor.budget_summary()
    assert summary is not None and summary["measured"] == len(traces)
    assert 0.3 * target <= summary["share"] <= 1.4 * target, summary
    spent = sum(r["seconds"] for r in measured)
    assert spent <= summary["curvature_seconds"]  # the account holds every measurement
    # The run summary's row (deconcnn-curv train): achieved share against the target.
    line = budget_share(recs)
    assert line is not None and "(target: 25.0% of training time)" in line
    shown = float(line.split("%")[0]) / 100
    assert 0.3 * target <= shown <= 1.4 * target, line


def test_a_budget_too_small_skips_with_a_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c.jsonl"
    monitor = CurvatureMonitor(
        backend="pyhessian",
        compute_every_n_steps=2,
        max_seconds=1e-4,
        max_overhead=0.5,
        jsonl=path,
    )
    with caplog.at_level("INFO"):
        fit(tmp_path, monitor, steps=12)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert (
        "time budget: measuring takes at most 50.0% of the training time and 0.0001 s per "
        "measurement (the tighter wins)" in said
    )
    recs = read_curvature_jsonl(path)
    skipped = [r for r in recs if r.get("skipped")]
    measured_steps = {r["step"] for r in recs if r["value"] is not None}
    # At most the first (no cost known yet) is measured; every later step is skipped.
    assert len(measured_steps) <= 1 and len({r["step"] for r in skipped}) >= 5
    for r in skipped:
        assert r["value"] is None and r["error"] is None
        assert r["budget"]["max_seconds"] == 1e-4 and r["budget"]["rule"] == "skip"
    assert "not measured" in said


def _sizes(recs: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(r["step"], r["quantity"], r["batch_size"], r["n_hvp"], r["value"]) for r in recs]


def test_without_a_budget_the_records_are_todays(tmp_path: Path) -> None:
    """No budget: fixed sizes, no ``budget`` field, nothing in the checkpoint state, and the same
    records (sizes and values) as a monitor built with the budget settings explicitly unset."""
    runs = []
    for name, extra in (("plain", {}), ("unset", {"max_overhead": None, "max_seconds": None})):
        path = tmp_path / f"{name}.jsonl"
        monitor = CurvatureMonitor(
            backend="pyhessian",
            compute_every_n_steps=3,
            num_hvps=6,
            hessian_batch_size=24,
            jsonl=path,
            **extra,
        )
        fit(tmp_path / name, monitor, steps=9)
        assert monitor.budget_summary() is None and "budget" not in monitor.state_dict()
        runs.append(read_curvature_jsonl(path))
    plain, unset = runs
    assert _sizes(plain) == _sizes(unset)
    assert all("budget" not in r and "skipped" not in r for r in plain)
    assert {(r["batch_size"], r["n_hvp"]) for r in plain if r["quantity"] == "trace"} == {(24, 6)}
    assert budget_share(plain) is None  # no budget row in the run summary


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_overhead": 0}, "max_overhead must be a number > 0"),
        ({"max_overhead": 5}, r"<= 1 \(a share"),
        ({"max_overhead": "5%"}, "max_overhead must be"),
        ({"max_seconds": -1.0}, "max_seconds must be a number > 0"),
        ({"max_overhead": 0.05, "data_groups": 1}, "needs data_groups >= 2"),
    ],
)
def test_bad_budgets_fail_at_construction(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        CurvatureMonitor(**kwargs)


def test_a_budget_needs_a_trace_to_size(tmp_path: Path) -> None:
    monitor = CurvatureMonitor(
        backend="pyhessian",
        quantities=["eigenvalues"],
        max_overhead=0.1,
        jsonl=tmp_path / "c.jsonl",
    )
    with pytest.raises(ConfigurationError, match="no monitored quantity measures one"):
        fit(tmp_path, monitor, steps=1)


def test_hutchpp_spends_the_chosen_products_in_its_joint_call(tmp_path: Path) -> None:
    """Hutch++ measures trace and λ_max in one call: the chosen products are its sketch's, the
    trace record says so, and the first size is the fixed shape (64 samples x 10 products),
    which fits 30 s."""
    path = tmp_path / "c.jsonl"
    monitor = CurvatureMonitor(
        backend="hutchpp", compute_every_n_steps=2, max_seconds=30.0, jsonl=path
    )
    fit(tmp_path, monitor, steps=6)
    traces = [r for r in read_curvature_jsonl(path) if r["quantity"] == "trace"]
    assert [r["step"] for r in traces] == [2, 4, 6]
    assert (traces[0]["batch_size"], traces[0]["budget"]["products"]) == (64, 10)
    assert traces[0]["budget"]["rule"] == "first: fixed shape, cost from the steps"
    for r in traces:
        assert r["value"] is not None and r["details"]["measured_with"] == "eigenvalues"
        # At most as many products as parameters (83): Hutch++ is exact there.
        assert r["n_hvp"] == r["budget"]["products"] <= 83
        assert r["batch_size"] == r["budget"]["samples"]
        assert r["budget"]["seconds"] == 30.0 and r["budget"]["max_overhead"] is None


def test_the_summary_row_counts_steps_in_words() -> None:
    """One step measured and two skipped: "1 step measured, 2 skipped" (the row of a short
    demo run once read "1 steps measured")."""

    def rec(step: int, value: float | None, spent: float) -> dict:
        budget = {"max_overhead": 0.05, "max_seconds": None, "train_seconds": 100.0}
        budget["spent_seconds"] = spent
        skipped = None if value is not None else "the smallest measurement exceeds the budget"
        return {"step": step, "value": value, "seconds": 1.0, "budget": budget, "skipped": skipped}

    line = budget_share([rec(8, 2.0, 0.5), rec(16, None, 1.5), rec(24, None, 1.5)])
    assert line is not None and line.endswith("1 step measured, 2 skipped to stay within it")
    assert line.startswith("2.5% of training time measuring (target: 5.0% of training time)")
