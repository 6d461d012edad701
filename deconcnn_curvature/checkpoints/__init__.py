"""Turning a checkpoint file into a curvature problem: a model, a loss and batches of data.

* :mod:`~deconcnn_curvature.checkpoints.reading`: reading a file safely (``weights_only``, the
  classes a checkpoint may name without trust, the one-line refusals);
* :mod:`~deconcnn_curvature.checkpoints.loading`: the settings, the ``load_checkpoint`` hook
  call, and the built-in loader (model factory, weights, loss, data);
* :mod:`~deconcnn_curvature.checkpoints.data`: the batches to measure on (``--data``);
* :mod:`~deconcnn_curvature.checkpoints.cifar`: CIFAR-shaped data sets, torch only.

This package is also the built-in plugin ``builtin:checkpoints``: its :func:`load_checkpoint` is
the ``trylast`` implementation of the public hook.
"""

from __future__ import annotations

from deconcnn_curvature.checkpoints.data import DATA_SOURCES, DataSpec, build_batches
from deconcnn_curvature.checkpoints.loading import (
    DEFAULT_SETTINGS,
    LOSSES,
    LoadedCheckpoint,
    checkpoint_settings,
    import_factory,
    load_checkpoint,
    loaded_checkpoint,
    open_checkpoint,
    parse_key_values,
    parse_value,
    reference_checkpoint,
)
from deconcnn_curvature.checkpoints.reading import (
    ENV_CHECKPOINT_MAX_BYTES,
    TRUST_FLAG,
    CheckpointError,
    UntrustedCheckpointError,
    UntrustedCheckpointWarning,
    allowed_checkpoint_globals,
    archive_limit,
    check_resume_checkpoint,
    read_checkpoint,
)

__all__ = [
    "DATA_SOURCES",
    "DEFAULT_SETTINGS",
    "ENV_CHECKPOINT_MAX_BYTES",
    "LOSSES",
    "TRUST_FLAG",
    "CheckpointError",
    "DataSpec",
    "LoadedCheckpoint",
    "UntrustedCheckpointError",
    "UntrustedCheckpointWarning",
    "allowed_checkpoint_globals",
    "archive_limit",
    "build_batches",
    "check_resume_checkpoint",
    "checkpoint_settings",
    "import_factory",
    "load_checkpoint",
    "loaded_checkpoint",
    "open_checkpoint",
    "parse_key_values",
    "parse_value",
    "read_checkpoint",
    "reference_checkpoint",
]
