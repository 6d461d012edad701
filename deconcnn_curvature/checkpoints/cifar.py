"""CIFAR-shaped data without torchvision: a synthetic stand-in and a CIFAR-10 reader.

* :class:`SyntheticCIFAR` makes a learnable, seed-determined data set of CIFAR-shaped images
  (class-dependent smooth colour patterns plus noise), for demos and tests without a download.
* :func:`load_cifar10` reads the python-format CIFAR-10 batches (``data_batch_1`` ...
  ``data_batch_5``, ``test_batch``) from a local folder, with a restricted unpickler.
* :class:`~deconcnn_curvature.training.datamodule.CIFARDataModule` (the reference run's; it needs
  Lightning, this module does not) wraps either source for Lightning, with seeded shuffling and
  seeded, per-worker augmentation (:mod:`deconcnn_curvature.training.augment`), and normalises
  with the CIFAR-10 channel mean and std.

This module is part of the core (torch only): the command line's ``--data synthetic-cifar`` and
``--data cifar10`` (:mod:`deconcnn_curvature.checkpoints.data`) and the reference training run
(:mod:`deconcnn_curvature.training.data`, which re-exports it) share it.

Images are stored as ``uint8`` tensors ``(N, 3, H, W)``; each item comes out as a normalised
``float32`` tensor ``(3, H, W)`` and an ``int`` label, so any consumer of a loader (the training
loop, a curvature measurement) sees the same inputs.

Reproducibility: the training loader of the data module draws its order and its augmentation from
:class:`~deconcnn_curvature.training.augment.EpochShuffleSampler`, which yields ``(epoch, index)``
pairs: the order is a function of ``(seed, epoch)`` and each image's augmentation of
``(seed, epoch, index)``. The same configuration gives the same batches on every run, for any
``num_workers``, and a run resumed at an epoch boundary sees exactly the data an uninterrupted run
would (Lightning calls ``set_epoch`` at every epoch start). Indexing a data set with a plain
``int`` draws augmentation from a per-process stream seeded by ``seed`` (and the worker's seed
inside a DataLoader worker).
"""

from __future__ import annotations

import codecs
import math
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info

from deconcnn_curvature._seeds import check_seed as _check_seed
from deconcnn_curvature._seeds import integer_seed as _mix_seed
from deconcnn_curvature.errors import ConfigurationError, CurvatureError

__all__ = [
    "CIFAR10_FOLDER_NAME",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_TEST_FILES",
    "CIFAR10_TRAIN_FILES",
    "DATA_SOURCES",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "ImageTensorDataset",
    "SyntheticCIFAR",
    "check_count",
    "find_cifar10_folder",
    "load_cifar10",
    "normalize",
]

#: Per-channel mean of the CIFAR-10 training images (RGB, pixel values scaled to [0, 1]).
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
#: Per-channel standard deviation of the CIFAR-10 training images (RGB, scaled to [0, 1]).
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

#: Name of the folder the official ``cifar-10-python.tar.gz`` archive extracts to.
CIFAR10_FOLDER_NAME = "cifar-10-batches-py"
#: Training batch files of the python-format CIFAR-10 (10 000 images each).
CIFAR10_TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
#: Test batch file of the python-format CIFAR-10 (10 000 images).
CIFAR10_TEST_FILES: tuple[str, ...] = ("test_batch",)

#: Allowed values of :class:`CIFARDataModule`'s ``source``.
DATA_SOURCES: tuple[str, ...] = ("synthetic", "cifar10")

_CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


class DatasetNotFoundError(CurvatureError, FileNotFoundError):
    """A data folder, or a file it must contain, is missing."""


class DatasetFormatError(CurvatureError, ValueError):
    """A data file exists but does not hold what its format promises."""


# --------------------------------------------------------------------------------------------
# counts


def check_count(name: str, value: int | None, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        hint = " or null (all)" if allow_none else ""
        raise ConfigurationError(f"{name} must be an integer >= 1{hint}; got {value!r}.")
    return value


# --------------------------------------------------------------------------------------------
# normalisation


def normalize(
    images: Tensor,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> Tensor:
    """Return ``(images - mean) / std`` per channel, for ``(..., C, H, W)`` images in [0, 1]."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images - mean_t) / std_t


# --------------------------------------------------------------------------------------------
# data sets

Transform = Callable[[Tensor, torch.Generator], Tensor]


class ImageTensorDataset(Dataset[tuple[Tensor, int]]):
    """Images held in memory as ``uint8`` ``(N, C, H, W)`` with ``int64`` labels ``(N,)``.

    ``dataset[i]`` returns ``(image, label)``: the image scaled to [0, 1], passed through
    ``transform(image, generator)`` if one is given, then normalised with ``mean``/``std``.

    Args:
        images: ``uint8`` tensor ``(N, C, H, W)``.
        labels: Integer tensor ``(N,)``.
        transform: Random augmentation called as ``transform(image, generator)``, e.g. a
            :class:`~deconcnn_curvature.training.augment.RandomResizedCropFlip`; ``None`` for
            none (validation).
        mean: Per-channel mean used to normalise; ``None`` leaves images in [0, 1].
        std: Per-channel std used to normalise (ignored when ``mean`` is ``None``).
        seed: Seeds the augmentation generator (combined with the worker seed in a worker).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        transform: Transform | None = None,
        mean: Sequence[float] | None = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        seed: int = 0,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ConfigurationError(
                f"images must be a uint8 tensor of shape (N, C, H, W); got dtype {images.dtype} "
                f"and shape {tuple(images.shape)}."
            )
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ConfigurationError(
                f"labels must have shape ({images.shape[0]},) to match the images; got "
                f"{tuple(labels.shape)}."
            )
        self.images = images
        self.labels = labels.to(torch.int64)
        self.transform = transform
        self.mean = None if mean is None else tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.seed = _check_seed(seed)
        self._generator: torch.Generator | None = None
        self._generator_owner: tuple[int, int | None] | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_generator"] = None
        state["_generator_owner"] = None
        return state

    def augmentation_generator(self) -> torch.Generator:
        """The generator augmentation draws from in this process (one per DataLoader worker).

        In the main process it is seeded from ``seed``; in a worker from ``seed`` and the worker's
        ``torch.utils.data.get_worker_info().seed``, so workers never share a stream.
        """
        info = get_worker_info()
        owner = (os.getpid(), None if info is None else info.id)
        if self._generator is None or self._generator_owner != owner:
            seed = self.seed if info is None else _mix_seed(self.seed, info.seed)
            self._generator = torch.Generator().manual_seed(seed)
            self._generator_owner = owner
        return self._generator

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[Tensor, int]:
        epoch = None
        if isinstance(index, tuple):  # (epoch, index) from an EpochShuffleSampler
            epoch, index = index
        image = self.images[index].to(torch.float32).div_(255.0)
        if self.transform is not None:
            if epoch is None:
                generator = self.augmentation_generator()
            else:
                seed = _mix_seed(self.seed, int(epoch), int(index))
                generator = torch.Generator().manual_seed(seed)
            image = self.transform(image, generator)
        if self.mean is not None:
            image = normalize(image, self.mean, self.std)
        return image, int(self.labels[index])


class SyntheticCIFAR(ImageTensorDataset):
    """A learnable, CIFAR-shaped synthetic data set, fully determined by ``seed`` and ``split``.

    Each class has a prototype: a smooth random colour pattern (a 4x4 random field upsampled to
    ``image_size``) blended with a class colour. An image is its class prototype plus Gaussian
    pixel noise (std ``noise_std``), clipped to [0, 1] and stored as ``uint8``. Labels are
    balanced (``i % num_classes``) and shuffled. The ``"train"`` and ``"val"`` splits of one seed
    share the prototypes and differ in noise and order, so a model trained on one generalises
    to the other, and a short run shows a falling loss.

    Args:
        num_samples: Number of images.
        num_classes: Number of classes (at least 2).
        seed: Determines prototypes, noise and labels.
        image_size: Height and width of the images.
        split: ``"train"``, ``"val"`` or ``"test"``; different splits draw different samples.
        noise_std: Standard deviation of the pixel noise, on the [0, 1] scale.
        transform: Augmentation, as in :class:`ImageTensorDataset`.
        mean: Normalisation mean (``None`` keeps [0, 1] images).
        std: Normalisation std.
    """

    SPLITS: tuple[str, ...] = ("train", "val", "test")
    _CHUNK = 4096

    def __init__(
        self,
        num_samples: int,
        num_classes: int = 10,
        seed: int = 0,
        image_size: int = 32,
        *,
        split: str = "train",
        noise_std: float = 0.25,
        transform: Transform | None = None,
        mean: Sequence[float] | None = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        check_count("num_samples", num_samples)
        check_count("image_size", image_size)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigurationError(f"num_classes must be an integer >= 2; got {num_classes!r}.")
        if split not in self.SPLITS:
            raise ConfigurationError(
                f"split must be one of {', '.join(map(repr, self.SPLITS))}; got {split!r}."
            )
        if not math.isfinite(noise_std) or noise_std < 0:
            raise ConfigurationError(f"noise_std must be a finite number >= 0; got {noise_std!r}.")
        seed = _check_seed(seed)
        self.num_classes = num_classes
        self.image_size = image_size
        self.split = split
        self.noise_std = float(noise_std)

        proto_gen = torch.Generator().manual_seed(_mix_seed(seed, 0))
        field = torch.rand(num_classes, 3, 4, 4, generator=proto_gen)
        pattern = F.interpolate(
            field, size=(image_size, image_size), mode="bilinear", align_corners=False
        )
        colour = torch.rand(num_classes, 3, 1, 1, generator=proto_gen)
        self.prototypes = 0.5 * pattern + 0.5 * colour

        sample_gen = torch.Generator().manual_seed(_mix_seed(seed, 1 + self.SPLITS.index(split)))
        labels = torch.arange(num_samples) % num_classes
        labels = labels[torch.randperm(num_samples, generator=sample_gen)]
        images = torch.empty(num_samples, 3, image_size, image_size, dtype=torch.uint8)
        for start in range(0, num_samples, self._CHUNK):
            stop = min(start + self._CHUNK, num_samples)
            noise = torch.randn(stop - start, 3, image_size, image_size, generator=sample_gen)
            chunk = self.prototypes[labels[start:stop]] + self.noise_std * noise
            images[start:stop] = chunk.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
        super().__init__(images, labels, transform=transform, mean=mean, std=std, seed=seed)


# --------------------------------------------------------------------------------------------
# CIFAR-10 python batches


def _layout_help(root: Path) -> str:
    return (
        f"Expected the python-format CIFAR-10 batches ({', '.join(CIFAR10_TRAIN_FILES)}, "
        f"{', '.join(CIFAR10_TEST_FILES)}) either in {root / CIFAR10_FOLDER_NAME} or directly in "
        f"{root}. Download {_CIFAR10_URL} and extract it there (tar -xzf cifar-10-python.tar.gz "
        f"-C {root}), or use the synthetic data (data=synthetic)."
    )


def find_cifar10_folder(root: str | os.PathLike[str]) -> Path:
    """Return the folder that holds the CIFAR-10 batch files.

    ``root`` may be that folder itself or its parent holding ``cifar-10-batches-py/``.

    Raises:
        DatasetNotFoundError: if ``root`` does not exist or either candidate folder lacks batch
            files; the message names the missing files and the expected layout.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"CIFAR-10 folder {root} does not exist (or is not a folder). {_layout_help(root)}"
        )
    wanted = CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES
    candidates = [root / CIFAR10_FOLDER_NAME, root]
    best: tuple[Path, list[str]] | None = None
    for folder in candidates:
        if not folder.is_dir():
            continue
        missing = [name for name in wanted if not (folder / name).is_file()]
        if not missing:
            return folder
        if best is None or len(missing) < len(best[1]):
            best = (folder, missing)
    assert best is not None  # root itself is a directory
    folder, missing = best
    raise DatasetNotFoundError(
        f"CIFAR-10 files missing in {folder}: {', '.join(missing)}. {_layout_help(root)}"
    )


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays: a data file cannot run code when loaded."""

    _ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): np.zeros(1).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.zeros(1).__reduce__()[0],
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR-10 batch holds only numpy arrays"
            ) from None


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as handle:
            raw = _BatchUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise DatasetFormatError(
            f"{path} is not a python-format CIFAR-10 batch ({exc}). Re-extract "
            f"cifar-10-python.tar.gz from {_CIFAR10_URL}."
        ) from exc
    if not isinstance(raw, dict):
        raise DatasetFormatError(f"{path} should hold a dict; found {type(raw).__name__}.")
    entries = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
    if "data" not in entries or "labels" not in entries:
        raise DatasetFormatError(
            f"{path} should have keys 'data' and 'labels'; found {sorted(map(str, entries))}."
        )
    data = np.asarray(entries["data"])
    labels = np.asarray(entries["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetFormatError(
            f"{path}: 'data' should be uint8 of shape (N, 3072); got {data.dtype} {data.shape}."
        )
    if labels.shape != (data.shape[0],):
        raise DatasetFormatError(
            f"{path}: 'labels' should hold {data.shape[0]} integers; got shape {labels.shape}."
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetFormatError(
            f"{path}: labels must lie in 0..9; found {int(labels.min())}..{int(labels.max())}."
        )
    return data, labels


def load_cifar10(root: str | os.PathLike[str], train: bool = True) -> tuple[Tensor, Tensor]:
    """Read CIFAR-10 from its python-format batches.

    Args:
        root: The ``cifar-10-batches-py`` folder or the folder that contains it.
        train: The 50 000 training images (``data_batch_1..5``) or the 10 000 test images
            (``test_batch``).

    Returns:
        ``(images, labels)``: ``uint8`` ``(N, 3, 32, 32)`` in RGB order, and ``int64`` ``(N,)``.

    Raises:
        DatasetNotFoundError: the folder or a batch file is missing.
        DatasetFormatError: a file is not a CIFAR-10 batch (only numpy arrays are unpickled).
    """
    folder = find_cifar10_folder(root)
    names = CIFAR10_TRAIN_FILES if train else CIFAR10_TEST_FILES
    parts = [_read_batch(folder / name) for name in names]
    data = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(np.ascontiguousarray(data)), torch.from_numpy(labels)
