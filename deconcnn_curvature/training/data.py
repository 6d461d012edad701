"""The reference run's data: the core's torch-only data sets
(:mod:`deconcnn_curvature.checkpoints.cifar`, shared with the command line's data sources), the
training run's augmentation and sampler (:mod:`deconcnn_curvature.training.augment`), plus the
Lightning data module.

``deconcnn_curvature.training.data.CIFARDataModule`` (the name the configs use) is imported only
when asked for, so the data sets need no Lightning.
"""

from __future__ import annotations

from typing import Any

from deconcnn_curvature.checkpoints.cifar import *  # noqa: F403  (this module re-exports them)
from deconcnn_curvature.checkpoints.cifar import __all__ as _cifar_all
from deconcnn_curvature.training.augment import EpochShuffleSampler, RandomResizedCropFlip

__all__ = [*_cifar_all, "EpochShuffleSampler", "RandomResizedCropFlip"]  # and CIFARDataModule


def __getattr__(name: str) -> Any:
    if name == "CIFARDataModule":
        from deconcnn_curvature.training.datamodule import CIFARDataModule

        return CIFARDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
