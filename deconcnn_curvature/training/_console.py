"""What the reference run shows on the console: epochs counted from 1, no Lightning advertising.

Lightning's rich progress bar labels the training bar ``Epoch {current_epoch}/{max_epochs - 1}``:
both numbers count from 0, so the last epoch of a 2-epoch run reads ``Epoch 1/1``, which a reader
takes for "one epoch of one". :func:`progress_bar` returns a bar that says ``Epoch 2/2`` there.
Lightning also prints a tip advertising a cloud logger whenever a ``Trainer`` is built without
one; :func:`no_logger_tip` drops that one message (nothing else) while the ``Trainer`` is built.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

__all__ = ["no_logger_tip", "progress_bar"]

#: The logger Lightning's ``rank_zero_info`` writes to.
_RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"


class _DropLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("💡 Tip:") and "litlogger" in message)


@contextlib.contextmanager
def no_logger_tip() -> Iterator[None]:
    """Drop Lightning's litlogger tip from the messages logged inside the block."""
    log = logging.getLogger(_RANK_ZERO_LOGGER)
    tip = _DropLoggerTip()
    log.addFilter(tip)
    try:
        yield
    finally:
        log.removeFilter(tip)


def epoch_label(current_epoch: int, max_epochs: int | None) -> str:
    """``Epoch <n>/<total>`` counted from 1 (``max_epochs`` ``None`` or -1: no total)."""
    label = f"Epoch {current_epoch + 1}"
    return label if max_epochs is None or max_epochs < 0 else f"{label}/{max_epochs}"


def progress_bar() -> Any:
    """Lightning's ``RichProgressBar`` (``TQDMProgressBar`` without rich) with the training bar
    labelled by :func:`epoch_label`, through its public ``progress`` and
    ``train_progress_bar_id`` attributes after each hook that (re)labels it."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    try:
        import rich  # noqa: F401
    except ImportError:  # pragma: no cover - rich comes with the lightning extra
        return TQDMProgressBar()

    class EpochsFromOne(RichProgressBar):
        def _relabel(self, trainer: Any) -> None:
            task = self.train_progress_bar_id
            if self.progress is None or task is None:
                return
            label = epoch_label(trainer.current_epoch, trainer.max_epochs)
            label = f"{label:{len(self.validation_description)}}"  # as Lightning pads it
            if self.theme.description:
                label = f"[{self.theme.description}]{label}"
            self.progress.update(task, description=label)

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            super().on_train_epoch_start(trainer, pl_module)
            self._relabel(trainer)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            super().on_train_batch_end(trainer, pl_module, *args)
            self._relabel(trainer)  # a bar re-created mid-epoch (resume) is labelled again

    return EpochsFromOne()
