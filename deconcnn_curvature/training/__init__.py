"""deconCNN-shaped reference training pieces: CIFAR ResNet-18, CIFAR data, a Lightning module, and
a ``metrics.jsonl`` writer.

The model factories (:mod:`.resnet_cifar`) and the data sets (:mod:`.data`) need only torch;
everything else needs the ``lightning`` extra (``pip install 'deconcnn-curvature[lightning]'``).
Names are imported on first use, so ``from deconcnn_curvature.training import resnet18_cifar``
never imports Lightning.

>>> from deconcnn_curvature.training import CIFARDataModule, ClassificationModule, MetricsJSONL
>>> module = ClassificationModule("resnet18_cifar", {"width_mult": 0.25}, lr=0.1)
>>> data = CIFARDataModule(source="synthetic", batch_size=128)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deconcnn_curvature.monitor.lightning_import import LightningUnavailableError
    from deconcnn_curvature.training.data import (
        CIFAR10_MEAN,
        CIFAR10_STD,
        DatasetFormatError,
        DatasetNotFoundError,
        ImageTensorDataset,
        RandomResizedCropFlip,
        SyntheticCIFAR,
        find_cifar10_folder,
        load_cifar10,
        normalize,
    )
    from deconcnn_curvature.training.datamodule import CIFARDataModule
    from deconcnn_curvature.training.metrics import MetricsJSONL, read_metrics_jsonl
    from deconcnn_curvature.training.module import (
        ClassificationModule,
        WarmupCosine,
        warmup_cosine_factor,
    )
    from deconcnn_curvature.training.resnet_cifar import (
        available_models,
        build_model,
        resnet18_cifar,
        small_cnn,
    )

_EXPORTS: dict[str, str] = {
    "available_models": "resnet_cifar",
    "build_model": "resnet_cifar",
    "resnet18_cifar": "resnet_cifar",
    "small_cnn": "resnet_cifar",
    "CIFAR10_MEAN": "data",
    "CIFAR10_STD": "data",
    "CIFARDataModule": "datamodule",
    "DatasetFormatError": "data",
    "DatasetNotFoundError": "data",
    "ImageTensorDataset": "data",
    "RandomResizedCropFlip": "data",
    "SyntheticCIFAR": "data",
    "find_cifar10_folder": "data",
    "load_cifar10": "data",
    "normalize": "data",
    "ClassificationModule": "module",
    "WarmupCosine": "module",
    "warmup_cosine_factor": "module",
    "MetricsJSONL": "metrics",
    "read_metrics_jsonl": "metrics",
    "LightningUnavailableError": ".monitor.lightning_import",  # the core module
}

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFARDataModule",
    "ClassificationModule",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "ImageTensorDataset",
    "LightningUnavailableError",
    "MetricsJSONL",
    "RandomResizedCropFlip",
    "SyntheticCIFAR",
    "WarmupCosine",
    "available_models",
    "build_model",
    "find_cifar10_folder",
    "load_cifar10",
    "normalize",
    "read_metrics_jsonl",
    "resnet18_cifar",
    "small_cnn",
    "warmup_cosine_factor",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
