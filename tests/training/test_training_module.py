"""ClassificationModule: the schedule, a real Trainer fit on synthetic data, checkpoints, resume."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from deconcnn_curvature.errors import ConfigurationError
from deconcnn_curvature.training.data import CIFARDataModule
from deconcnn_curvature.training.module import (
    ClassificationModule,
    WarmupCosine,
    warmup_cosine_factor,
)

TINY = {"width_mult": 0.125, "norm_type": "batchnorm"}


def _data(**kwargs) -> CIFARDataModule:
    options = {"num_train": 256, "num_val": 64, "batch_size": 32, "seed": 0}
    options.update(kwargs)
    return CIFARDataModule(**options)


def _trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    options = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "deterministic": True,
        "default_root_dir": tmp_path,
        "num_sanity_val_steps": 0,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


# --------------------------------------------------------------------------- schedule


def test_warmup_cosine_factor_values() -> None:
    factors = [warmup_cosine_factor(s, 4, 12) for s in range(14)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0
    assert factors[8] == pytest.approx(0.5)
    assert factors[12] == pytest.approx(0.0) and factors[13] == pytest.approx(0.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))
    assert warmup_cosine_factor(0, 0, 10) == 1.0
    assert warmup_cosine_factor(10, 0, 10, min_ratio=0.1) == pytest.approx(0.1)
    schedule = WarmupCosine(2, 10)
    assert schedule(1) == 1.0 and "warmup_steps=2" in repr(schedule)


def test_module_exposes_model_and_loss() -> None:
    module = ClassificationModule("resnet18_cifar", TINY)
    assert isinstance(module.loss_fn, nn.CrossEntropyLoss)
    assert module.loss_fn.reduction == "mean"
    assert module(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert module.hparams["model_kwargs"] == TINY


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, "lr must be > 0"),
        ({"momentum": 1.0}, r"momentum must be a finite number in \[0.0, 1.0\)"),
        ({"weight_decay": -1e-4}, "weight_decay must be a finite number >= 0"),
        ({"momentum": 0.0, "nesterov": True}, "nesterov=True needs momentum > 0"),
        ({"epochs": 0}, "epochs must be an integer >= 1 or None"),
        ({"warmup_epochs": -1}, "warmup_epochs"),
        ({"model_name": "vgg"}, "unknown model name 'vgg'"),
        ({"model_kwargs": {"width_mult": 0}}, "width_mult must be a finite number > 0"),
        ({"model_kwargs": [1]}, "model_kwargs must be a mapping"),
    ],
    ids=["lr", "momentum", "wd", "nesterov", "epochs", "warmup", "model", "width", "kwargs"],
)
def test_module_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    options = {"model_kwargs": TINY}
    options.update(kwargs)
    with pytest.raises(ConfigurationError, match=match):
        ClassificationModule(**options)


def test_short_runs_scale_the_warmup(tmp_path: Path) -> None:
    module = ClassificationModule("small_cnn", {}, warmup_epochs=5)
    trainer = _trainer(tmp_path, max_epochs=2, limit_train_batches=4, limit_val_batches=0)
    trainer.fit(module, _data(augment=False))
    assert module.schedule is not None
    assert module.schedule.total_steps == 8
    assert module.schedule.warmup_steps == 0  # 10 % of 8 steps rounds down to none
    long = ClassificationModule("small_cnn", {}, warmup_epochs=5, epochs=50)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=4, limit_val_batches=0)
    trainer.fit(long, _data(augment=False))
    assert long.schedule is not None
    assert (long.schedule.warmup_steps, long.schedule.total_steps) == (20, 200)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 5 / 20)


# --------------------------------------------------------------------------- real fits


def test_fit_on_synthetic_data_lowers_the_loss(tmp_path: Path) -> None:
    pl.seed_everything(0, workers=True)
    module = ClassificationModule("resnet18_cifar", TINY, lr=0.05, warmup_epochs=0)
    losses: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[Record()], limit_val_batches=2)
    trainer.fit(module, _data(augment=False))
    assert len(losses) == 16 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    metrics = trainer.callback_metrics
    for name in ("train/loss", "train/acc", "val/loss", "val/acc", "lr"):
        assert name in metrics and math.isfinite(float(metrics[name]))
    assert float(metrics["lr"]) < 0.05  # the cosine has decayed


def test_fit_is_reproducible(tmp_path: Path) -> None:
    def run() -> dict[str, torch.Tensor]:
        pl.seed_everything(0, workers=True)
        module = ClassificationModule("resnet18_cifar", TINY, lr=0.05)
        _trainer(tmp_path, limit_train_batches=3, limit_val_batches=0).fit(module, _data())
        return {k: v.clone() for k, v in module.state_dict().items()}

    first, second = run(), run()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_checkpoint_rebuilds_the_model_and_resumes(tmp_path: Path) -> None:
    pl.seed_everything(0, workers=True)
    # epochs=2: the schedule spans two epochs, of which the first run trains one
    module = ClassificationModule("resnet18_cifar", TINY, lr=0.05, weight_decay=1e-4, epochs=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(
        tmp_path,
        enable_checkpointing=True,
        callbacks=[checkpoint],
        limit_train_batches=3,
        limit_val_batches=1,
    )
    trainer.fit(module, _data())
    path = tmp_path / "ckpt" / "last.ckpt"
    assert path.is_file()

    restored = ClassificationModule.load_from_checkpoint(path)
    assert restored.hparams["model_kwargs"] == TINY
    assert restored.hparams["weight_decay"] == 1e-4
    for (name, a), b in zip(
        module.state_dict().items(), restored.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    module.eval()
    restored.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(module(x), restored(x))

    assert module.schedule is not None and module.schedule.total_steps == 6
    assert restored.hparams["epochs"] == 2

    resumed = ClassificationModule.load_from_checkpoint(path)
    trainer = _trainer(tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(resumed, _data(), ckpt_path=path)
    assert trainer.global_step == 6
    assert resumed.schedule is not None and resumed.schedule.total_steps == 6
    # the last of the six steps ran at the end of the cosine
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 6
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_resuming_at_an_epoch_boundary_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """Real Trainer runs: two epochs straight, and one epoch, a checkpoint, then a resumed second
    epoch, end with bit-identical weights (data order and augmentation are keyed by epoch)."""

    def module() -> ClassificationModule:
        torch.manual_seed(0)
        return ClassificationModule("small_cnn", {}, lr=0.05, epochs=2, warmup_epochs=0)

    def data() -> CIFARDataModule:
        return _data(num_train=96, num_val=16)  # augmented

    straight = module()
    _trainer(tmp_path / "a", max_epochs=2, limit_val_batches=0).fit(straight, data())

    first = module()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    trainer = _trainer(
        tmp_path / "b",
        max_epochs=1,
        limit_val_batches=0,
        enable_checkpointing=True,
        callbacks=[checkpoint],
    )
    trainer.fit(first, data())
    resumed = module()
    trainer = _trainer(tmp_path / "b", max_epochs=2, limit_val_batches=0)
    trainer.fit(resumed, data(), ckpt_path=tmp_path / "b" / "last.ckpt")
    assert trainer.global_step == 6
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    # the resumed epoch did train: the weights moved on from the checkpoint
    assert not torch.equal(next(first.parameters()), next(resumed.parameters()))


def test_max_steps_run_sizes_its_warmup_in_epochs(tmp_path: Path) -> None:
    """max_epochs=-1 with max_steps: Lightning has not loaded the data when the optimiser is built,
    yet warm-up is given in epochs (256 samples / 32 = 8 batches per epoch)."""
    module = ClassificationModule("small_cnn", {}, warmup_epochs=1, max_warmup_fraction=0.5)
    trainer = _trainer(tmp_path, max_epochs=-1, max_steps=20, limit_val_batches=0)
    trainer.fit(module, _data(augment=False))
    assert module.schedule is not None
    assert (module.schedule.warmup_steps, module.schedule.total_steps) == (8, 20)
    assert trainer.global_step == 20
    limited = ClassificationModule("small_cnn", {}, warmup_epochs=1, max_warmup_fraction=0.5)
    trainer = _trainer(
        tmp_path, max_epochs=-1, max_steps=12, limit_train_batches=3, limit_val_batches=0
    )
    trainer.fit(limited, _data(augment=False))
    assert limited.schedule is not None
    assert (limited.schedule.warmup_steps, limited.schedule.total_steps) == (3, 12)


def test_unsized_run_is_refused(tmp_path: Path) -> None:
    module = ClassificationModule("small_cnn", {})
    trainer = _trainer(tmp_path, max_epochs=-1, max_steps=-1, limit_val_batches=0)
    with pytest.raises(ConfigurationError, match="needs a finite run"):
        trainer.fit(module, _data(augment=False))
