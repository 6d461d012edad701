"""MetricsJSONL: deconCNN's metrics.jsonl lines, per step, fresh values only, on the right step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest

from deconcnn_curvature.errors import ConfigurationError
from deconcnn_curvature.training.data import CIFARDataModule
from deconcnn_curvature.training.metrics import MetricsJSONL, read_metrics_jsonl
from deconcnn_curvature.training.module import ClassificationModule


class _FakeCurvature(pl.Callback):
    """Logs ``curvature/lambda_max = global_step`` every ``every`` steps from on_train_batch_end."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            pl_module.log("curvature/lambda_max", float(trainer.global_step), on_step=True)


def _fit(tmp_path: Path, callbacks: list, max_epochs: int = 1, **kwargs) -> pl.Trainer:
    pl.seed_everything(0)
    module = ClassificationModule("small_cnn", {}, lr=0.05)
    data = CIFARDataModule(num_train=128, num_val=32, batch_size=16, augment=False)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kwargs,
    )
    trainer.fit(module, data)
    return trainer


def test_every_step_line_format(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.jsonl"
    _fit(tmp_path, [MetricsJSONL(path)], val_check_interval=0.5, num_sanity_val_steps=1)
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert set(records[0]) == {"timestamp", "step", "metrics"}
    train = [r for r in records if "train/loss" in r["metrics"]]
    val = [r for r in records if "val/loss" in r["metrics"]]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert [r["step"] for r in val] == [4, 8]  # two validations, none for the sanity check
    for record in train:
        assert set(record["metrics"]) == {"train/loss", "train/acc", "lr"}
        assert all(isinstance(v, float) and math.isfinite(v) for v in record["metrics"].values())
        assert isinstance(record["timestamp"], float)
    assert set(val[0]["metrics"]) == {"val/loss", "val/acc"}
    assert records == read_metrics_jsonl(path)
    timestamps = [r["timestamp"] for r in records]
    assert timestamps == sorted(timestamps)


@pytest.mark.parametrize("order", ["writer-first", "writer-last"])
def test_sporadic_metrics_land_on_their_step(tmp_path: Path, order: str) -> None:
    path = tmp_path / "metrics.jsonl"
    writer, curvature = MetricsJSONL(path, every_n_steps=4), _FakeCurvature(every=3)
    callbacks = [writer, curvature] if order == "writer-first" else [curvature, writer]
    _fit(tmp_path, callbacks, max_epochs=2, limit_val_batches=0)
    records = read_metrics_jsonl(path)
    curvature_steps = [r["step"] for r in records if "curvature/lambda_max" in r["metrics"]]
    assert curvature_steps == [3, 6, 9, 12, 15]
    for record in records:
        if "curvature/lambda_max" in record["metrics"]:
            assert record["metrics"]["curvature/lambda_max"] == record["step"]
    train_steps = [r["step"] for r in records]
    assert train_steps == sorted(set(train_steps))
    assert {4, 8, 12, 16} <= set(train_steps)
    assert not {1, 2, 5, 7} & set(train_steps)


def test_cadence_follows_trainer_when_none(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    _fit(
        tmp_path, [MetricsJSONL(path, every_n_steps=None)], log_every_n_steps=3, limit_val_batches=0
    )
    assert [r["step"] for r in read_metrics_jsonl(path)] == [3, 6]


def test_gradient_accumulation_writes_once_per_optimizer_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    _fit(tmp_path, [MetricsJSONL(path)], accumulate_grad_batches=2, limit_val_batches=0)
    assert [r["step"] for r in read_metrics_jsonl(path)] == [1, 2, 3, 4]


def test_write_is_strict_json_and_appends(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "metrics.jsonl"
    writer = MetricsJSONL(path)
    writer.write(3, {"a": 1, "b": float("nan"), "c": float("inf")}, timestamp=1.5)
    writer.close()
    MetricsJSONL(path).write(4, {"a": 2.0})
    records = read_metrics_jsonl(path)
    assert records[0] == {"timestamp": 1.5, "step": 3, "metrics": {"a": 1.0, "b": None, "c": None}}
    assert records[1]["step"] == 4 and len(records) == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps must be an integer >= 1, or None"),
        ({"always_prefixes": "curvature/"}, "always_prefixes must be a list"),
    ],
    ids=["cadence", "prefixes"],
)
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        MetricsJSONL(tmp_path / "m.jsonl", **kwargs)
