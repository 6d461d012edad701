"""The reference run's torch-only training data pieces: the Inception-style random resized crop
(Szegedy et al., "Going Deeper with Convolutions", CVPR 2015) plus a horizontal flip, written with
torch ops and driven by an explicit ``torch.Generator``, and the sampler that makes an epoch's
order and augmentation a function of ``(seed, epoch)`` only.

The data sets they feed (:class:`~deconcnn_curvature.checkpoints.cifar.ImageTensorDataset` and
its synthetic and CIFAR-10 sources) live in the core, which the command line shares.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Sampler

from deconcnn_curvature._seeds import check_seed
from deconcnn_curvature._seeds import integer_seed as mix_seed
from deconcnn_curvature.checkpoints.cifar import check_count
from deconcnn_curvature.errors import ConfigurationError

__all__ = ["EpochShuffleSampler", "RandomResizedCropFlip"]


class RandomResizedCropFlip:
    """Random resized crop followed by a random horizontal flip, for one ``(C, H, W)`` image.

    The crop covers a fraction of the image area drawn uniformly from ``scale`` with an aspect
    ratio drawn log-uniformly from ``ratio`` (up to 10 tries, then the largest centred crop
    within ``ratio``), and is resized to ``size x size`` with bilinear interpolation, the recipe
    of Szegedy et al. (2015) that torchvision's ``RandomResizedCrop`` also follows. Every random
    number comes from the generator passed to :meth:`__call__`, so the result is a function of
    the image and the generator's state.

    Args:
        size: Output height and width.
        scale: Range of the crop's fraction of the image area, ``0 < low <= high <= 1``.
        ratio: Range of the crop's width/height, ``0 < low <= high``.
        flip_prob: Probability of a horizontal flip, in [0, 1].
    """

    def __init__(
        self,
        size: int = 32,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        flip_prob: float = 0.5,
    ) -> None:
        check_count("size", size)
        scale = tuple(float(s) for s in scale)
        ratio = tuple(float(r) for r in ratio)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigurationError(
                f"scale must be two numbers (low, high) with 0 < low <= high <= 1, e.g. "
                f"(0.08, 1.0); got {scale!r}."
            )
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ConfigurationError(
                f"ratio must be two numbers (low, high) with 0 < low <= high, e.g. (0.75, 1.333); "
                f"got {ratio!r}."
            )
        if not 0.0 <= float(flip_prob) <= 1.0:
            raise ConfigurationError(f"flip_prob must be in [0, 1]; got {flip_prob!r}.")
        self.size = size
        self.scale: tuple[float, float] = (scale[0], scale[1])
        self.ratio: tuple[float, float] = (ratio[0], ratio[1])
        self.flip_prob = float(flip_prob)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"flip_prob={self.flip_prob})"
        )

    @staticmethod
    def _uniform(low: float, high: float, generator: torch.Generator) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    def crop_box(
        self, height: int, width: int, generator: torch.Generator
    ) -> tuple[int, int, int, int]:
        """Draw ``(top, left, crop_height, crop_width)`` inside a ``height x width`` image."""
        area = height * width
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * self._uniform(self.scale[0], self.scale[1], generator)
            aspect = math.exp(self._uniform(log_low, log_high, generator))
            crop_w = round(math.sqrt(target_area * aspect))
            crop_h = round(math.sqrt(target_area / aspect))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = int(torch.randint(0, height - crop_h + 1, (), generator=generator))
                left = int(torch.randint(0, width - crop_w + 1, (), generator=generator))
                return top, left, crop_h, crop_w
        # Fallback: the whole image, trimmed to the allowed aspect ratios, centred.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            crop_w, crop_h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            crop_h, crop_w = height, round(height * self.ratio[1])
        else:
            crop_w, crop_h = width, height
        return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w

    def __call__(self, image: Tensor, generator: torch.Generator) -> Tensor:
        """Crop, resize and maybe flip one float image ``(C, H, W)``; return ``(C, size, size)``."""
        if image.dim() != 3:
            raise ConfigurationError(
                f"RandomResizedCropFlip takes one image of shape (C, H, W); got shape "
                f"{tuple(image.shape)}."
            )
        if not image.is_floating_point():
            image = image.float()
        top, left, crop_h, crop_w = self.crop_box(image.shape[-2], image.shape[-1], generator)
        crop = image[:, top : top + crop_h, left : left + crop_w]
        if (crop_h, crop_w) != (self.size, self.size):
            crop = F.interpolate(
                crop.unsqueeze(0), size=(self.size, self.size), mode="bilinear", align_corners=False
            ).squeeze(0)
        if float(torch.rand((), generator=generator)) < self.flip_prob:
            crop = crop.flip(-1)
        return crop.contiguous()


class EpochShuffleSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` for every index of a data set of ``num_samples`` items: a
    permutation determined by ``(seed, epoch)`` (or ascending order with ``shuffle=False``).

    :class:`ImageTensorDataset` seeds each item's augmentation from the pair, so the data of an
    epoch depends only on the seed and the epoch number: not on worker processes, not on how many
    epochs this process has already iterated. Lightning calls :meth:`set_epoch` at the start of
    every epoch (a resumed run included); a loop that never calls it gets the next epoch number
    on each pass, so repeated passes still see new orders.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True) -> None:
        check_count("num_samples", num_samples)
        self.num_samples = int(num_samples)
        self.seed = check_seed(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass that of ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = range(self.num_samples)
        return iter([(epoch, i) for i in order])
