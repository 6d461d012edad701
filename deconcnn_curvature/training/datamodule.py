"""The Lightning data module of the reference run: CIFAR-10 or its synthetic stand-in.

It needs the ``lightning`` extra; the data sets it wraps (re-exported by
:mod:`deconcnn_curvature.training.data`, they live in :mod:`deconcnn_curvature.checkpoints.cifar`)
and the augmentation (:mod:`deconcnn_curvature.training.augment`) need only torch. It imports them
from where they live, not from ``training.data``, which names this class on demand
(``deconcnn_curvature.training.data.CIFARDataModule``, the configs' target): one direction only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor
from torch.utils.data import DataLoader

from deconcnn_curvature._seeds import check_seed as _check_seed
from deconcnn_curvature._seeds import integer_seed as _mix_seed
from deconcnn_curvature.checkpoints.cifar import (
    DATA_SOURCES,
    ImageTensorDataset,
    SyntheticCIFAR,
    check_count,
    find_cifar10_folder,
    load_cifar10,
)
from deconcnn_curvature.errors import ConfigurationError
from deconcnn_curvature.monitor.lightning_import import pl
from deconcnn_curvature.training.augment import EpochShuffleSampler, RandomResizedCropFlip

__all__ = ["CIFARDataModule"]


class CIFARDataModule(pl.LightningDataModule):
    """CIFAR-10 or its synthetic stand-in, augmented and normalised, for a Lightning ``Trainer``.

    Args:
        source: ``"synthetic"`` (:class:`SyntheticCIFAR`, no download) or ``"cifar10"`` (the
            python batches under ``root``, see :func:`load_cifar10`).
        root: Folder of the CIFAR-10 batches; required for ``source="cifar10"``.
        batch_size: Images per batch for every loader.
        num_workers: DataLoader worker processes (0 loads in the training process).
        num_train: Training images: the first ``num_train`` of CIFAR-10's training images or that
            many synthetic ones; ``None`` means all of CIFAR-10 (50 000), or 50 000 synthetic.
        num_val: Validation images, taken from CIFAR-10's test split the same way; ``None``
            means all of it (10 000), or 10 000 synthetic.
        augment: Random resized crop + horizontal flip on training images.
        seed: Seeds the shuffling order, the augmentation and the synthetic data.
        crop_scale: ``scale`` of the random resized crop (fraction of the image area).
        flip_prob: Probability of a horizontal flip.
        pin_memory: Passed to the DataLoaders (useful with a GPU).
        drop_last: Drop the last, smaller training batch.
        synthetic_noise_std: Pixel noise of the synthetic images (harder data when larger).

    Validation uses CIFAR-10's test batch (the deconCNN convention: no separate validation set).
    ``test_dataloader`` returns the same data as ``val_dataloader``.
    """

    def __init__(
        self,
        source: str = "synthetic",
        root: str | os.PathLike[str] | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        num_train: int | None = None,
        num_val: int | None = None,
        augment: bool = True,
        seed: int = 0,
        crop_scale: Sequence[float] = (0.08, 1.0),
        flip_prob: float = 0.5,
        pin_memory: bool = False,
        drop_last: bool = False,
        synthetic_noise_std: float = 0.25,
    ) -> None:
        super().__init__()
        if source not in DATA_SOURCES:
            raise ConfigurationError(
                f"source must be one of {', '.join(map(repr, DATA_SOURCES))}; got {source!r}."
            )
        if source == "cifar10" and root is None:
            raise ConfigurationError(
                "source='cifar10' needs root, the folder holding cifar-10-batches-py (set "
                "data.root=/path/to/folder), or use source='synthetic'."
            )
        check_count("batch_size", batch_size)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigurationError(f"num_workers must be an integer >= 0; got {num_workers!r}.")
        check_count("num_train", num_train, allow_none=True)
        check_count("num_val", num_val, allow_none=True)
        self.source = source
        self.root = None if root is None else Path(root)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.num_train = num_train
        self.num_val = num_val
        self.augment = bool(augment)
        self.seed = _check_seed(seed)
        self.pin_memory = bool(pin_memory)
        self.drop_last = bool(drop_last)
        self.synthetic_noise_std = float(synthetic_noise_std)
        # Built now so that a bad crop_scale / flip_prob fails at construction, not mid-run.
        self.train_transform: RandomResizedCropFlip | None = (
            RandomResizedCropFlip(32, scale=tuple(crop_scale), flip_prob=flip_prob)
            if self.augment
            else None
        )
        self.train_dataset: ImageTensorDataset | None = None
        self.val_dataset: ImageTensorDataset | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes (10)."""
        return 10

    def prepare_data(self) -> None:
        """Check that the CIFAR-10 files are there (never downloads)."""
        if self.source == "cifar10":
            assert self.root is not None
            find_cifar10_folder(self.root)

    def setup(self, stage: str | None = None) -> None:
        """Build the data sets (once; later calls are no-ops)."""
        if self.train_dataset is not None and self.val_dataset is not None:
            return
        if self.source == "synthetic":
            num_train = 50_000 if self.num_train is None else self.num_train
            num_val = 10_000 if self.num_val is None else self.num_val
            self.train_dataset = SyntheticCIFAR(
                num_train,
                seed=self.seed,
                split="train",
                noise_std=self.synthetic_noise_std,
                transform=self.train_transform,
            )
            self.val_dataset = SyntheticCIFAR(
                num_val, seed=self.seed, split="val", noise_std=self.synthetic_noise_std
            )
            return
        assert self.root is not None
        train_x, train_y = load_cifar10(self.root, train=True)
        val_x, val_y = load_cifar10(self.root, train=False)
        num_train = len(train_y) if self.num_train is None else self.num_train
        num_val = len(val_y) if self.num_val is None else self.num_val
        for name, wanted, have in (
            ("num_train", num_train, len(train_y)),
            ("num_val", num_val, len(val_y)),
        ):
            if wanted > have:
                raise ConfigurationError(
                    f"{name}={wanted} but the CIFAR-10 split has only {have} images; use a "
                    f"smaller {name} or null for all."
                )
        self.train_dataset = ImageTensorDataset(
            train_x[:num_train], train_y[:num_train], self.train_transform, seed=self.seed
        )
        self.val_dataset = ImageTensorDataset(val_x[:num_val], val_y[:num_val], seed=self.seed)

    def _ready(self) -> tuple[ImageTensorDataset, ImageTensorDataset]:
        if self.train_dataset is None or self.val_dataset is None:
            self.setup()
        assert self.train_dataset is not None and self.val_dataset is not None
        return self.train_dataset, self.val_dataset

    def train_dataloader(self) -> DataLoader[tuple[Tensor, int]]:
        """Shuffled, augmented training batches: order and augmentation are functions of ``seed``
        and the epoch (see :class:`~deconcnn_curvature.training.data.EpochShuffleSampler`), so a
        run resumed at an epoch boundary continues exactly as an uninterrupted one."""
        train, _ = self._ready()
        return DataLoader(
            train,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(train), seed=_mix_seed(self.seed, 7)),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            drop_last=self.drop_last,
        )

    def val_dataloader(self) -> DataLoader[tuple[Tensor, int]]:
        """Validation batches in a fixed order, without augmentation."""
        _, val = self._ready()
        return DataLoader(
            val,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def test_dataloader(self) -> DataLoader[tuple[Tensor, int]]:
        """The validation data (CIFAR-10's test batch)."""
        return self.val_dataloader()
