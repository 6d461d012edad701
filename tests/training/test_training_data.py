"""Synthetic data, the CIFAR-10 pickle reader, augmentation and the data module."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from deconcnn_curvature.errors import ConfigurationError, CurvatureError
from deconcnn_curvature.training.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10_TEST_FILES,
    CIFAR10_TRAIN_FILES,
    CIFARDataModule,
    DatasetFormatError,
    DatasetNotFoundError,
    EpochShuffleSampler,
    ImageTensorDataset,
    RandomResizedCropFlip,
    SyntheticCIFAR,
    find_cifar10_folder,
    load_cifar10,
    normalize,
)

# --------------------------------------------------------------------------- synthetic data


def test_synthetic_shapes_and_dtypes() -> None:
    data = SyntheticCIFAR(20, num_classes=4, seed=3)
    assert len(data) == 20
    assert data.images.shape == (20, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.labels.dtype == torch.int64
    assert sorted(torch.bincount(data.labels).tolist()) == [5, 5, 5, 5]
    image, label = data[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert isinstance(label, int)
    small = SyntheticCIFAR(2, image_size=16)
    assert small[1][0].shape == (3, 16, 16)


def test_synthetic_is_determined_by_seed_and_split() -> None:
    a, b = SyntheticCIFAR(16, seed=1), SyntheticCIFAR(16, seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    other = SyntheticCIFAR(16, seed=2)
    assert not torch.equal(a.images, other.images)
    val = SyntheticCIFAR(16, seed=1, split="val")
    assert not torch.equal(a.images, val.images)
    assert torch.equal(a.prototypes, val.prototypes)


def test_synthetic_is_learnable_by_nearest_prototype() -> None:
    data = SyntheticCIFAR(200, seed=0)
    images = data.images.float() / 255
    dist = ((images[:, None] - data.prototypes[None]) ** 2).flatten(2).sum(-1)
    accuracy = (dist.argmin(1) == data.labels).float().mean()
    assert accuracy > 0.9


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 0}, "num_samples must be an integer >= 1"),
        ({"num_samples": 4, "num_classes": 1}, "num_classes must be an integer >= 2"),
        ({"num_samples": 4, "split": "dev"}, "split must be one of"),
        ({"num_samples": 4, "seed": -1}, "seed must be a non-negative integer"),
    ],
    ids=["empty", "one-class", "bad-split", "negative-seed"],
)
def test_synthetic_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        SyntheticCIFAR(**kwargs)


def test_normalisation_matches_cifar_statistics() -> None:
    data = SyntheticCIFAR(3, seed=0)
    raw = data.images[1].float() / 255
    expected = (raw - torch.tensor(CIFAR10_MEAN).view(3, 1, 1)) / torch.tensor(CIFAR10_STD).view(
        3, 1, 1
    )
    assert torch.allclose(data[1][0], expected)
    assert torch.allclose(normalize(raw), expected)
    unnormalised = SyntheticCIFAR(3, seed=0, mean=None)
    assert torch.equal(unnormalised[1][0], raw)


# --------------------------------------------------------------------------- CIFAR-10 reader


def _write_fake_cifar(folder: Path, per_batch: int = 4, names=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index, name in enumerate(names or CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        data[:, 0] = index  # marks the batch: red channel, top-left pixel
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        with (folder / name).open("wb") as handle:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, handle)


def test_cifar_reader_on_a_fake_folder(tmp_path: Path) -> None:
    _write_fake_cifar(tmp_path / "cifar-10-batches-py")
    images, labels = load_cifar10(tmp_path, train=True)
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (20,) and labels.dtype == torch.int64
    assert images[:, 0, 0, 0].tolist() == [i for i in range(5) for _ in range(4)]
    test_images, _ = load_cifar10(tmp_path / "cifar-10-batches-py", train=False)
    assert test_images.shape == (4, 3, 32, 32) and int(test_images[0, 0, 0, 0]) == 5
    # the channel layout: 1024 red, then green, then blue values, row-major
    with (tmp_path / "cifar-10-batches-py" / "test_batch").open("rb") as handle:
        raw = pickle.load(handle)[b"data"][0]
    assert torch.equal(test_images[0, 1].flatten(), torch.from_numpy(raw[1024:2048].copy()))


def test_cifar_reader_accepts_the_batches_folder_itself(tmp_path: Path) -> None:
    _write_fake_cifar(tmp_path)
    assert find_cifar10_folder(tmp_path) == tmp_path


def test_missing_cifar_folder_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="does not exist") as info:
        load_cifar10(tmp_path / "nowhere")
    assert isinstance(info.value, CurvatureError) and isinstance(info.value, FileNotFoundError)
    assert "cifar-10-batches-py" in str(info.value)


def test_missing_cifar_files_are_named(tmp_path: Path) -> None:
    _write_fake_cifar(tmp_path / "cifar-10-batches-py", names=("data_batch_1", "data_batch_2"))
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar10(tmp_path)
    message = str(info.value)
    assert "data_batch_3, data_batch_4, data_batch_5, test_batch" in message
    assert "data_batch_1," not in message.split("missing")[1].split(".")[0]
    assert "Expected the python-format CIFAR-10 batches" in message


def test_cifar_reader_refuses_pickles_that_are_not_arrays(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _write_fake_cifar(folder)
    with (folder / "test_batch").open("wb") as handle:
        pickle.dump({b"data": Path("x"), b"labels": []}, handle)
    with pytest.raises(DatasetFormatError, match="refusing to load"):
        load_cifar10(tmp_path, train=False)
    with (folder / "test_batch").open("wb") as handle:
        pickle.dump({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, handle)
    with pytest.raises(DatasetFormatError, match=r"shape \(N, 3072\)"):
        load_cifar10(tmp_path, train=False)


def test_data_module_reads_cifar_folder(tmp_path: Path) -> None:
    _write_fake_cifar(tmp_path / "cifar-10-batches-py")
    module = CIFARDataModule(source="cifar10", root=tmp_path, batch_size=8, num_train=12)
    module.prepare_data()
    module.setup("fit")
    assert len(module.train_dataset) == 12 and len(module.val_dataset) == 4
    images, labels = next(iter(module.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and labels.shape == (8,)
    too_many = CIFARDataModule(source="cifar10", root=tmp_path, num_val=5)
    with pytest.raises(ConfigurationError, match="num_val=5 but the CIFAR-10 split has only 4"):
        too_many.setup()


def test_data_module_without_cifar_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="needs root"):
        CIFARDataModule(source="cifar10")
    with pytest.raises(DatasetNotFoundError):
        CIFARDataModule(source="cifar10", root=tmp_path).prepare_data()


# --------------------------------------------------------------------------- augmentation


def test_augmentation_is_determined_by_the_generator() -> None:
    image = torch.rand(3, 32, 32)
    aug = RandomResizedCropFlip(32)
    first = aug(image, torch.Generator().manual_seed(5))
    again = aug(image, torch.Generator().manual_seed(5))
    other = aug(image, torch.Generator().manual_seed(6))
    assert first.shape == (3, 32, 32)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0


def test_augmentation_crop_boxes_respect_scale_and_image() -> None:
    aug = RandomResizedCropFlip(24, scale=(0.25, 0.5))
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = aug.crop_box(32, 40, gen)
        assert top >= 0 and left >= 0
        assert top + h <= 32 and left + w <= 40
        assert 0.2 <= h * w / (32 * 40) <= 0.56
    assert aug(torch.rand(3, 32, 40), gen).shape == (3, 24, 24)


def test_full_crop_without_flip_is_identity() -> None:
    image = torch.rand(3, 32, 32)
    aug = RandomResizedCropFlip(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0)
    assert torch.equal(aug(image, torch.Generator().manual_seed(0)), image)
    flip = RandomResizedCropFlip(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=1.0)
    assert torch.equal(flip(image, torch.Generator().manual_seed(0)), image.flip(-1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scale": (0.0, 1.0)}, "scale must be two numbers"),
        ({"scale": (0.9, 0.1)}, "scale must be two numbers"),
        ({"ratio": (2.0, 1.0)}, "ratio must be two numbers"),
        ({"flip_prob": 1.5}, "flip_prob must be in"),
        ({"size": 0}, "size must be an integer >= 1"),
    ],
    ids=["zero-scale", "reversed-scale", "reversed-ratio", "flip-prob", "size"],
)
def test_augmentation_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        RandomResizedCropFlip(**kwargs)


def test_dataset_augmentation_is_reproducible_and_per_worker() -> None:
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)

    def epoch(num_workers: int) -> torch.Tensor:
        # eight copies of one image: any two equal outputs would mean equal random draws
        data = ImageTensorDataset(
            image.expand(8, -1, -1, -1).clone(), torch.zeros(8), RandomResizedCropFlip(32)
        )
        loader = DataLoader(
            data, batch_size=4, num_workers=num_workers, generator=torch.Generator().manual_seed(0)
        )
        return torch.cat([x for x, _ in loader])

    single = epoch(0)
    assert torch.equal(single, epoch(0))
    with_workers = epoch(2)
    assert torch.equal(with_workers, epoch(2))
    # worker 0 draws for items 0-3, worker 1 for items 4-7: their streams differ
    assert not torch.equal(with_workers[0], with_workers[4])
    assert len({tuple(x.flatten()[:64].tolist()) for x in with_workers}) == 8


def test_dataset_generator_is_not_pickled() -> None:
    data = ImageTensorDataset(
        torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), RandomResizedCropFlip(4)
    )
    data[0]
    clone = pickle.loads(pickle.dumps(data))
    assert clone._generator is None and len(clone) == 2


def test_dataset_validates_its_tensors() -> None:
    with pytest.raises(ConfigurationError, match="uint8 tensor of shape"):
        ImageTensorDataset(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]))
    with pytest.raises(ConfigurationError, match="labels must have shape"):
        ImageTensorDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0]))


# --------------------------------------------------------------------------- data module


def test_data_module_shuffles_with_its_seed() -> None:
    def first_labels(seed: int) -> list[int]:
        module = CIFARDataModule(num_train=64, num_val=16, batch_size=16, seed=seed)
        module.setup("fit")
        return next(iter(module.train_dataloader()))[1].tolist()

    assert first_labels(0) == first_labels(0)
    assert first_labels(0) != first_labels(1)
    module = CIFARDataModule(num_train=64, num_val=16, batch_size=16, augment=False)
    loader = module.train_dataloader()
    epoch1 = torch.cat([y for _, y in loader])
    epoch2 = torch.cat([y for _, y in loader])
    assert not torch.equal(epoch1, epoch2)  # a new order every epoch
    val = torch.cat([x for x, _ in module.val_dataloader()])
    assert torch.equal(val, torch.cat([x for x, _ in module.val_dataloader()]))
    assert module.num_classes == 10


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": "imagenet"}, "source must be one of 'synthetic', 'cifar10'"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"num_workers": -1}, "num_workers must be an integer >= 0"),
        ({"num_train": 0}, "num_train must be an integer >= 1 or null"),
        ({"crop_scale": (0.5, 2.0)}, "scale must be two numbers"),
    ],
    ids=["source", "batch-size", "workers", "num-train", "crop-scale"],
)
def test_data_module_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        CIFARDataModule(**kwargs)


# --------------------------------------------------------------------------- epoch-keyed data


def test_epoch_sampler_order_is_a_function_of_seed_and_epoch() -> None:
    def order(seed: int, epoch: int) -> list[tuple[int, int]]:
        sampler = EpochShuffleSampler(20, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    first = order(0, 3)
    assert first == order(0, 3)
    assert sorted(i for _, i in first) == list(range(20)) and {e for e, _ in first} == {3}
    assert [i for _, i in first] != [i for _, i in order(0, 4)]
    assert [i for _, i in first] != [i for _, i in order(1, 3)]
    # Without set_epoch, each pass is the next epoch (a plain loop still reshuffles).
    sampler = EpochShuffleSampler(20, seed=0)
    passes = [list(sampler) for _ in range(4)]
    assert passes[3] == order(0, 3)
    assert list(EpochShuffleSampler(5, shuffle=False)) == [(0, i) for i in range(5)]


def test_training_batches_do_not_depend_on_workers() -> None:
    """Order and augmentation come from (seed, epoch, index): the same batches with 0 or 2
    workers, and epoch 1 of a fresh loader equals epoch 1 of a loader that ran epoch 0 first."""

    def batches(num_workers: int, epochs: list[int]) -> list[torch.Tensor]:
        module = CIFARDataModule(num_train=48, num_val=8, batch_size=16, num_workers=num_workers)
        loader = module.train_dataloader()
        out = []
        for epoch in epochs:
            loader.sampler.set_epoch(epoch)
            out.append(torch.cat([x for x, _ in loader]))
        return out

    in_process = batches(0, [0, 1])
    assert not torch.equal(in_process[0], in_process[1])
    with_workers = batches(2, [0, 1])
    for a, b in zip(in_process, with_workers, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(batches(0, [1])[0], in_process[1], rtol=0, atol=0)
