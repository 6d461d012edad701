"""Write deconCNN's ``metrics.jsonl``: one JSON object per line, per training step.

Each line is ``{"timestamp": <unix time, float>, "step": <trainer.global_step>, "metrics":
{name: float}}``. Epoch-level dumps lose values computed every few hundred steps (curvature);
this callback writes them at the step they were logged.

Which values go on a line: those in ``trainer.callback_metrics`` that were logged since the
previous line (a value Lightning still holds from an earlier step is not repeated). Training
lines carry everything logged during the step, except names starting with ``val_prefix``;
validation lines (written when a validation run ends, outside the sanity check) carry the names
that start with ``val_prefix``.

A metric with one of ``always_prefixes`` logged before a batch's optimiser step (in
``on_train_batch_start``, as the curvature of the initial model is) gets a line at the current
step, written before the backward pass, so step 0's curvature lands on step 0.

When a training line is written: the record of step ``s`` is collected after every callback's
``on_train_batch_end`` for that step has run (at the next batch, validation, epoch end or end of
training), so values other callbacks log in ``on_train_batch_end`` land on the right line whatever
the order of the callbacks. With ``every_n_steps > 1`` only every n-th step gets a line, except
that a step where a metric whose name starts with one of ``always_prefixes`` was logged (by
default ``curvature/``) always gets one.

Only global rank zero writes. The file is opened in append mode (a resumed run continues it) and
flushed after every line. Non-finite values are written as ``null`` so every line is strict JSON.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deconcnn_curvature.errors import ConfigurationError
from deconcnn_curvature.monitor.lightning_import import pl
from deconcnn_curvature.monitor.records import RecordWriter, read_jsonl, supersede_after

__all__ = ["MetricsJSONL", "read_metrics_jsonl"]


def _to_float(value: Any) -> float | None:
    """A scalar as a float (``None`` when not a finite scalar that JSON can hold)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            return None
        value = value.detach().to("cpu", torch.float64).item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _identity(value: Any) -> tuple[Any, ...]:
    """What tells a freshly logged value from one Lightning still holds from before.

    Lightning stores a new tensor (new storage) every time a metric is logged and hands out
    views of it until it is logged again; plain numbers are compared by value.
    """
    if isinstance(value, Tensor):
        return ("tensor", value.untyped_storage().data_ptr(), value.storage_offset())
    return ("value", value)


class MetricsJSONL(pl.Callback):
    """Lightning callback writing ``metrics.jsonl`` lines (see the module docstring).

    Args:
        path: The file to append to (its folder is created).
        every_n_steps: Write a training line every n optimiser steps; ``None`` follows the
            Trainer's ``log_every_n_steps``.
        val_prefix: Names starting with it are validation metrics (``"val/"``).
        always_prefixes: Metrics with these prefixes get a line at the step they were logged,
            whatever ``every_n_steps`` is.
        write_validation: Also write a line after each validation run.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        every_n_steps: int | None = 1,
        val_prefix: str = "val/",
        always_prefixes: Sequence[str] = ("curvature/",),
        write_validation: bool = True,
    ) -> None:
        super().__init__()
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool)
            or not isinstance(every_n_steps, int)
            or every_n_steps < 1
        ):
            raise ConfigurationError(
                f"every_n_steps must be an integer >= 1, or None to follow the Trainer's "
                f"log_every_n_steps; got {every_n_steps!r}."
            )
        if isinstance(always_prefixes, str):
            raise ConfigurationError(
                f"always_prefixes must be a list of prefixes such as ['curvature/']; got the "
                f"string {always_prefixes!r}."
            )
        self.path = Path(path)
        self.every_n_steps = every_n_steps
        self.val_prefix = str(val_prefix)
        self.always_prefixes = tuple(str(p) for p in always_prefixes)
        self.write_validation = bool(write_validation)
        self._writer = RecordWriter(self.path, fsync=False)
        self._seen: dict[str, tuple[Any, ...]] = {}
        self._keep: dict[str, Any] = {}
        self._pending_step: int | None = None
        self._last_step: int | None = None

    # ------------------------------------------------------------------ writing

    def write(self, step: int, metrics: Mapping[str, Any], timestamp: float | None = None) -> None:
        """Append one line now and flush (the hooks call this on global rank zero only)."""
        record = {
            "timestamp": time.time() if timestamp is None else float(timestamp),
            "step": int(step),
            "metrics": {str(k): _to_float(v) for k, v in metrics.items()},
        }
        self._writer.write(record)

    def close(self) -> None:
        """Close the file (a later :meth:`write` reopens it in append mode)."""
        self._writer.close()

    def _fresh(
        self, trainer: pl.Trainer, want_val: bool, only_always: bool = False
    ) -> dict[str, Any]:
        fresh: dict[str, Any] = {}
        for name, value in trainer.callback_metrics.items():
            if name.startswith(self.val_prefix) != want_val:
                continue
            if only_always and not name.startswith(self.always_prefixes):
                continue
            ident = _identity(value)
            if self._seen.get(name) == ident:
                continue
            self._seen[name] = ident
            self._keep[name] = value  # holding it keeps its storage from being reused
            fresh[name] = value
        return fresh

    def _cadence(self, trainer: pl.Trainer) -> int:
        return self.every_n_steps or max(1, int(trainer.log_every_n_steps))

    def _flush_pending(self, trainer: pl.Trainer) -> None:
        step, self._pending_step = self._pending_step, None
        if step is None:
            return
        fresh = self._fresh(trainer, want_val=False)
        on_cadence = step % self._cadence(trainer) == 0
        sporadic = any(name.startswith(self.always_prefixes) for name in fresh)
        if fresh and (on_cadence or sporadic):
            self.write(step, fresh)

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Forget what was seen before (a new fit or a resumed one)."""
        self._seen.clear()
        self._keep.clear()
        self._pending_step = None
        self._last_step = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remember the starting step, so a resumed run does not write it twice; lines past it
        (from a stretch of training the checkpoint does not contain) move to a side file."""
        self._last_step = trainer.global_step
        if trainer.is_global_zero and trainer.global_step > 0:
            self.close()  # the next write reopens the rewritten file
            moved, side = supersede_after(self.path, trainer.global_step)
            if moved:
                pl.utilities.rank_zero_warn(
                    f"MetricsJSONL: resumed at step {trainer.global_step}; {moved} lines written "
                    f"after it moved from {self.path} to {side}."
                )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Write the previous step's line (all its ``on_train_batch_end`` hooks have run)."""
        if trainer.is_global_zero:
            self._flush_pending(trainer)

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        """A measurement logged before this batch's optimiser step (in ``on_train_batch_start``,
        e.g. curvature of the initial model) belongs to the current step, not the next one:
        give it its own line now, before the update."""
        if not trainer.is_global_zero:
            return
        early = self._fresh(trainer, want_val=False, only_always=True)
        if early:
            self.write(trainer.global_step, early)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Mark this optimiser step for writing (skipped while gradients accumulate)."""
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        if step == self._last_step:  # no optimiser step happened (gradient accumulation)
            return
        self._last_step = step
        self._pending_step = step

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the pending training line before validation metrics change."""
        if trainer.is_global_zero and not trainer.sanity_checking:
            self._flush_pending(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the validation metrics of this run (never those of the sanity check)."""
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        if not self.write_validation:
            return
        fresh = self._fresh(trainer, want_val=True)
        if fresh:
            self.write(trainer.global_step, fresh)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the epoch's last training line."""
        if trainer.is_global_zero:
            self._flush_pending(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write anything left and flush."""
        if trainer.is_global_zero:
            self._flush_pending(trainer)
            self._writer.flush()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Keep what was logged up to a crash."""
        if trainer.is_global_zero:
            self._flush_pending(trainer)
        self.close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Close the file."""
        self.close()


def read_metrics_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` file back as a list of its records (blank lines skipped; a line
    torn by a crash is skipped with a warning naming the file and line)."""
    return read_jsonl(path)
