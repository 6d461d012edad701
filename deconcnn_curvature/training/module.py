"""The deconCNN-shaped classification ``LightningModule``: SGD + momentum, warm-up + cosine.

:class:`ClassificationModule` is built from plain arguments (a model name and its keyword
arguments, the optimiser's numbers), saves them as hyper-parameters, and so can be rebuilt from a
checkpoint with ``ClassificationModule.load_from_checkpoint(path)``. The model is ``self.model``
and the loss is ``self.loss_fn`` (``nn.CrossEntropyLoss()``, mean over the batch): the two things
a curvature measurement needs besides a batch.

The learning rate follows :class:`WarmupCosine` and is stepped after every optimiser step
(``interval="step"``): linear warm-up from ``lr / warmup_steps`` to ``lr``, then a half cosine
down to ``min_lr_ratio * lr`` at the end of the schedule (Loshchilov & Hutter, "SGDR", ICLR 2017;
warm-up as in Goyal et al., "Accurate, Large Minibatch SGD", 2017).

Resuming (``trainer.fit(..., ckpt_path=...)``) restores the schedule saved in the checkpoint
(its warm-up and total steps travel in the ``LambdaLR`` state), so a resumed run continues the
same curve; to train a run in pieces, give ``epochs`` (the full length) rather than relying on
each piece's ``max_epochs``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from deconcnn_curvature.errors import ConfigurationError
from deconcnn_curvature.monitor.lightning_import import pl
from deconcnn_curvature.training.resnet_cifar import build_model

__all__ = ["ClassificationModule", "WarmupCosine", "warmup_cosine_factor"]


def warmup_cosine_factor(
    step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0
) -> float:
    """Multiplier of the base learning rate after ``step`` optimiser steps.

    Linear warm-up ``(step + 1) / warmup_steps`` for ``step < warmup_steps``, then
    ``min_ratio + (1 - min_ratio) * (1 + cos(pi * t)) / 2`` with ``t`` going from 0 to 1 over
    the remaining ``total_steps - warmup_steps`` steps, and ``min_ratio`` after the end.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Picklable ``lr_lambda`` for ``torch.optim.lr_scheduler.LambdaLR`` (see
    :func:`warmup_cosine_factor`); its fields go into the scheduler's ``state_dict``."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> None:
        if warmup_steps < 0 or total_steps < 1:
            raise ConfigurationError(
                f"need warmup_steps >= 0 and total_steps >= 1; got {warmup_steps} and "
                f"{total_steps}."
            )
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        return warmup_cosine_factor(step, self.warmup_steps, self.total_steps, self.min_ratio)

    def __repr__(self) -> str:
        return (
            f"WarmupCosine(warmup_steps={self.warmup_steps}, total_steps={self.total_steps}, "
            f"min_ratio={self.min_ratio})"
        )


def _check_number(name: str, value: float, low: float, high: float | None = None) -> float:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if ok and value >= low and (high is None or value < high):
        return float(value)
    where = f">= {low}" if high is None else f"in [{low}, {high})"
    raise ConfigurationError(f"{name} must be a finite number {where}; got {value!r}.")


def _plain_kwargs(model_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, Mapping) and not hasattr(model_kwargs, "items"):
        raise ConfigurationError(
            f"model_kwargs must be a mapping such as {{'width_mult': 0.25}}; got "
            f"{type(model_kwargs).__name__}."
        )
    # An OmegaConf DictConfig becomes a plain dict, so checkpoints hold only builtins.
    return {str(key): value for key, value in model_kwargs.items()}


class ClassificationModule(pl.LightningModule):
    """Image classification with SGD (momentum, weight decay) and a warm-up + cosine schedule.

    Args:
        model_name: A name :func:`~deconcnn_curvature.training.resnet_cifar.build_model` knows,
            e.g. ``"resnet18_cifar"``.
        model_kwargs: Keyword arguments of that factory, e.g. ``{"width_mult": 0.25,
            "norm_type": "batchnorm"}``.
        lr: Peak learning rate (reached at the end of the warm-up).
        momentum: SGD momentum, in [0, 1).
        weight_decay: L2 penalty SGD applies to every parameter.
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        epochs: Length of the cosine schedule in epochs; ``None`` uses the whole fit
            (``trainer.estimated_stepping_batches``, i.e. ``max_epochs`` or ``max_steps``). Set
            it larger than ``max_epochs`` to run only the start of a longer schedule.
        warmup_epochs: Linear warm-up length in epochs (deconCNN: 5 of 50).
        max_warmup_fraction: The warm-up never exceeds this fraction of the schedule, so short
            runs scale it down (with the default 0.1, a 1-epoch run warms up for 0.1 epoch, a
            50-epoch run for the full 5).
        min_lr_ratio: Learning rate at the end of the schedule, as a fraction of ``lr``.

    Logged (``on_step`` for training, per epoch for validation/test): ``train/loss``,
    ``train/acc``, ``lr`` (the rate used by the step), ``val/loss``, ``val/acc``, ``test/loss``,
    ``test/acc``.
    """

    def __init__(
        self,
        model_name: str = "resnet18_cifar",
        model_kwargs: Mapping[str, Any] | None = None,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        epochs: int | None = None,
        warmup_epochs: float = 5.0,
        max_warmup_fraction: float = 0.1,
        min_lr_ratio: float = 0.0,
    ) -> None:
        super().__init__()
        kwargs = _plain_kwargs(model_kwargs)
        lr = _check_number("lr", lr, 0.0)
        if lr <= 0:
            raise ConfigurationError(f"lr must be > 0; got {lr!r}.")
        momentum = _check_number("momentum", momentum, 0.0, 1.0)
        weight_decay = _check_number("weight_decay", weight_decay, 0.0)
        if nesterov and momentum == 0:
            raise ConfigurationError("nesterov=True needs momentum > 0; got momentum=0.")
        if epochs is not None and (
            isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1
        ):
            raise ConfigurationError(f"epochs must be an integer >= 1 or None; got {epochs!r}.")
        warmup_epochs = _check_number("warmup_epochs", warmup_epochs, 0.0)
        max_warmup_fraction = _check_number("max_warmup_fraction", max_warmup_fraction, 0.0, 1.0)
        min_lr_ratio = _check_number("min_lr_ratio", min_lr_ratio, 0.0, 1.0 + 1e-12)
        self.save_hyperparameters(
            {
                "model_name": model_name,
                "model_kwargs": kwargs,
                "lr": lr,
                "momentum": momentum,
                "weight_decay": weight_decay,
                "nesterov": bool(nesterov),
                "epochs": epochs,
                "warmup_epochs": warmup_epochs,
                "max_warmup_fraction": max_warmup_fraction,
                "min_lr_ratio": min_lr_ratio,
            }
        )
        self.model = build_model(model_name, **kwargs)
        self.loss_fn = nn.CrossEntropyLoss()
        #: Warm-up and total optimiser steps of the schedule, set by ``configure_optimizers``.
        self.schedule: WarmupCosine | None = None

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the model."""
        return self.model(x)

    def _shared_step(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        inputs, targets = batch
        logits = self.model(inputs)
        loss = self.loss_fn(logits, targets)
        acc = (logits.detach().argmax(dim=1) == targets).float().mean()
        return loss, acc

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on one batch; logs ``train/loss``, ``train/acc`` and ``lr`` every step."""
        loss, acc = self._shared_step(batch)
        size = batch[1].shape[0]
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, batch_size=size)
        self.log("train/acc", acc, on_step=True, on_epoch=False, batch_size=size)
        optimizer = self.optimizers()
        if isinstance(optimizer, list):  # only when no optimiser is configured
            optimizer = optimizer[0]
        lr = float(optimizer.param_groups[0]["lr"])
        self.log("lr", lr, on_step=True, on_epoch=False, batch_size=size)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Logs ``val/loss`` and ``val/acc``, averaged over the validation set."""
        loss, acc = self._shared_step(batch)
        size = batch[1].shape[0]
        self.log("val/loss", loss, on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
        self.log("val/acc", acc, on_step=False, on_epoch=True, batch_size=size, sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Logs ``test/loss`` and ``test/acc``, averaged over the test set."""
        loss, acc = self._shared_step(batch)
        size = batch[1].shape[0]
        self.log("test/loss", loss, on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
        self.log("test/acc", acc, on_step=False, on_epoch=True, batch_size=size, sync_dist=True)

    def schedule_steps(self) -> tuple[int, int]:
        """``(warmup_steps, total_steps)`` for the attached trainer (optimiser steps)."""
        trainer = self.trainer
        fit_steps = trainer.estimated_stepping_batches
        if not math.isfinite(fit_steps):
            raise ConfigurationError(
                "the learning-rate schedule needs a finite run: set trainer max_epochs or "
                "max_steps (and use a data loader with a length)."
            )
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            # With max_epochs=-1 and max_steps set, Lightning sizes the fit from max_steps alone and
            # has not loaded the training data yet; warm-up in epochs still needs its length.
            batches = _loader_batches(trainer)
        accumulate = max(1, int(trainer.accumulate_grad_batches))
        if not math.isfinite(batches) or batches < 1:
            raise ConfigurationError(
                f"cannot size the schedule: the training loader has {batches} batches."
            )
        steps_per_epoch = max(1, math.ceil(int(batches) / accumulate))
        epochs = self.hparams["epochs"]
        total = int(fit_steps) if epochs is None else int(epochs) * steps_per_epoch
        total = max(1, total)
        warmup = round(self.hparams["warmup_epochs"] * steps_per_epoch)
        warmup = min(warmup, math.floor(self.hparams["max_warmup_fraction"] * total))
        return max(0, warmup), total

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD with momentum and a per-step :class:`WarmupCosine` ``LambdaLR``."""
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=self.hparams["lr"],
            momentum=self.hparams["momentum"],
            weight_decay=self.hparams["weight_decay"],
            nesterov=self.hparams["nesterov"],
        )
        warmup, total = self.schedule_steps()
        self.schedule = WarmupCosine(warmup, total, self.hparams["min_lr_ratio"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }


def _loader_batches(trainer: pl.Trainer) -> float:
    """Batches per epoch from the datamodule's training loader, with ``limit_train_batches``
    applied as Lightning does; ``inf`` when that cannot be known."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None:
        return math.inf
    try:
        batches = len(datamodule.train_dataloader())
    except TypeError:  # an iterable loader without a length
        return math.inf
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        return float(min(batches, limit))
    if limit is not None:
        return float(int(batches * float(limit)))
    return float(batches)
