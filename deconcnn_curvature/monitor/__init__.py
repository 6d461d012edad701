"""The Lightning callback that measures curvature during training, and its parts.

* :mod:`~deconcnn_curvature.monitor.callback`: :class:`CurvatureMonitor` (needs Lightning);
* :mod:`~deconcnn_curvature.monitor.settings`: checking the callback's settings and options;
* :mod:`~deconcnn_curvature.monitor.inputs`: the model, the loss and the curvature batch;
* :mod:`~deconcnn_curvature.monitor.records`: the JSONL records files (torch and Lightning free);
* :mod:`~deconcnn_curvature.monitor.lightning_import`: importing Lightning with a clear error.

The callback's names are imported on first use, so ``deconcnn_curvature.monitor.records`` (and
this package) import without Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deconcnn_curvature.monitor.callback import (
        BATCH_MODES,
        DEFAULT_METRIC_KEYS,
        LOSS_NAMES,
        ON_ERROR,
        CurvatureMonitor,
        read_curvature_jsonl,
    )

__all__ = [
    "BATCH_MODES",
    "DEFAULT_METRIC_KEYS",
    "LOSS_NAMES",
    "ON_ERROR",
    "CurvatureMonitor",
    "read_curvature_jsonl",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.callback"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
