"""Batches for measuring a checkpoint: random inputs of any shape, the reference run's synthetic
CIFAR images, or a local CIFAR-10 folder.

Three sources, named as on the command line (``deconcnn-curv estimate --data ...``):

``synthetic``
    Standard-normal inputs of any shape with uniformly drawn class labels, seeded. Needs nothing
    but torch; for smoke tests and timings (the curvature of a loss on noise says little about
    training).
``synthetic-cifar``
    :class:`deconcnn_curvature.checkpoints.cifar.SyntheticCIFAR`, the learnable stand-in data the
    reference run trains on (split ``"train"``, no augmentation). Its class patterns depend on
    its seed, so use the training run's data seed.
``cifar10``
    The first ``batch_size * num_batches`` images of CIFAR-10's training batches, read from a
    local folder by :func:`deconcnn_curvature.checkpoints.cifar.load_cifar10` and normalised with
    the CIFAR-10 channel statistics, without augmentation.

The last two reuse the training package's data sets and reader, which need only torch (no
Lightning). Batches always live on the CPU; the curvature problem moves them to the model's
device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deconcnn_curvature._seeds import check_seed
from deconcnn_curvature.checkpoints import cifar
from deconcnn_curvature.errors import ConfigurationError, CurvatureError

__all__ = ["DATA_SOURCES", "DataSpec", "build_batches"]

#: Allowed data sources (``--data``).
DATA_SOURCES: tuple[str, ...] = ("synthetic", "synthetic-cifar", "cifar10")

_CIFAR_SHAPE = (3, 32, 32)
_CIFAR_TRAIN_SIZE = 50_000


@dataclass(frozen=True)
class DataSpec:
    """What to build: ``num_batches`` batches of ``batch_size`` samples from ``source``.

    ``one_hot`` turns class labels into float one-hot targets (for a mean-squared-error loss).
    ``seed`` seeds the ``synthetic`` inputs and labels and the ``synthetic-cifar`` images (use the
    training run's data seed there). ``root`` is the CIFAR-10 folder; ``noise_std`` the pixel
    noise of ``synthetic-cifar``.
    """

    source: str
    batch_size: int = 128
    num_batches: int = 1
    input_shape: tuple[int, ...] = _CIFAR_SHAPE
    num_classes: int = 10
    seed: int = 0
    root: Path | None = None
    noise_std: float = 0.25
    one_hot: bool = False

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ConfigurationError(
                f"unknown data source {self.source!r}; use one of {', '.join(DATA_SOURCES)}."
            )
        for name in ("batch_size", "num_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be an integer >= 1, got {value!r}.")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise ConfigurationError(f"num_classes must be an integer, got {self.num_classes!r}.")
        if self.num_classes < 2:
            raise ConfigurationError(f"num_classes must be >= 2, got {self.num_classes}.")
        if not self.input_shape or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in self.input_shape
        ):
            raise ConfigurationError(
                "input_shape must be one or more positive integers (e.g. 3,32,32), got "
                f"{self.input_shape!r}."
            )
        check_seed(self.seed)
        if not math.isfinite(self.noise_std) or self.noise_std < 0:
            raise ConfigurationError(f"noise_std must be a number >= 0, got {self.noise_std!r}.")

    @property
    def num_samples(self) -> int:
        return self.batch_size * self.num_batches

    def describe(self) -> str:
        """One line for people, e.g. ``cifar10 (/data), 2 batches x 128``."""
        shape = "x".join(map(str, self.input_shape))
        where = {
            "synthetic": (
                f"random N(0,1) inputs {shape}, {self.num_classes} classes, seed {self.seed}"
            ),
            "synthetic-cifar": f"reference-run synthetic CIFAR, seed {self.seed}",
            "cifar10": f"CIFAR-10 training images from {self.root}",
        }[self.source]
        targets = ", one-hot targets" if self.one_hot else ""
        return f"{self.source}: {where}{targets}; {self.num_batches} x {self.batch_size} samples"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "batch_size": self.batch_size,
            "num_batches": self.num_batches,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "seed": self.seed,
            "root": None if self.root is None else str(self.root),
            "one_hot": self.one_hot,
        }


def _split(spec: DataSpec, x: torch.Tensor, labels: torch.Tensor) -> list[tuple[Any, Any]]:
    targets: torch.Tensor = labels
    if spec.one_hot:
        targets = torch.nn.functional.one_hot(labels, spec.num_classes).to(x.dtype)
    return [
        (x[i : i + spec.batch_size], targets[i : i + spec.batch_size])
        for i in range(0, spec.num_samples, spec.batch_size)
    ]


def _as_flags(message: str) -> str:
    """A data-loading message for this command line: ``data=synthetic`` (the ``train``
    override) becomes the ``--data`` flags that do the same here."""
    return message.replace(
        "(data=synthetic)",
        "(--data synthetic-cifar: the reference run's synthetic images; or --data synthetic)",
    )


def _require_cifar_shape(spec: DataSpec, shape: tuple[int, ...]) -> None:
    if spec.input_shape != shape:
        raise ConfigurationError(
            f"--data {spec.source} makes images of shape {','.join(map(str, shape))}, but the "
            f"input shape asked for is {','.join(map(str, spec.input_shape))}; drop --input-shape "
            "or use --data synthetic for other shapes."
        )


def build_batches(spec: DataSpec) -> list[tuple[Any, Any]]:
    """Build the batches ``spec`` describes (on the CPU, ``float32`` inputs)."""
    if spec.source == "synthetic":
        gen = torch.Generator().manual_seed(spec.seed)
        x = torch.randn(spec.num_samples, *spec.input_shape, generator=gen)
        labels = torch.randint(0, spec.num_classes, (spec.num_samples,), generator=gen)
        return _split(spec, x, labels)

    if spec.source == "synthetic-cifar":
        size = spec.input_shape[-1]
        _require_cifar_shape(spec, (3, size, size))
        data = cifar
        dataset = data.SyntheticCIFAR(
            spec.num_samples,
            num_classes=spec.num_classes,
            seed=spec.seed,
            image_size=size,
            split="train",
            noise_std=spec.noise_std,
        )
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        return _split(spec, images, dataset.labels.clone())

    # cifar10
    if spec.root is None:
        raise ConfigurationError(
            "--data cifar10 needs --data-root DIR, the folder holding cifar-10-batches-py/ (or "
            "that folder itself)."
        )
    _require_cifar_shape(spec, _CIFAR_SHAPE)
    if spec.num_classes != 10:
        raise ConfigurationError(
            f"CIFAR-10 has 10 classes, but --num-classes is {spec.num_classes}; drop it."
        )
    if spec.num_samples > _CIFAR_TRAIN_SIZE:
        raise ConfigurationError(
            f"batch_size x num_batches = {spec.num_samples} exceeds the {_CIFAR_TRAIN_SIZE} "
            "CIFAR-10 training images; lower --batch-size or --num-batches."
        )
    data = cifar
    try:
        images, labels = data.load_cifar10(spec.root, train=True)
    except CurvatureError as exc:
        # The loader's advice names the `train` override (data=synthetic); here it is a flag.
        raise type(exc)(_as_flags(str(exc))) from None
    if spec.num_samples > len(labels):
        raise ConfigurationError(
            f"batch_size x num_batches = {spec.num_samples} exceeds the {len(labels)} training "
            f"images found under {spec.root}; lower --batch-size or --num-batches."
        )
    x = data.normalize(images[: spec.num_samples].to(torch.float32).div_(255.0))
    return _split(spec, x, labels[: spec.num_samples].clone())
