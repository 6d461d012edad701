"""What the monitor measures, found without a training run (the callback's hooks
call these library functions; the real Trainer runs are in test_lightning_monitor.py)."""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from deconcnn_curvature.errors import ConfigurationError
from deconcnn_curvature.monitor.inputs import (
    auto_model_attr,
    build_batch,
    check_trial_loss,
    measured_loss,
    measured_model,
    what_is_measured,
)


class Wrapper(pl.LightningModule):
    """No forward of its own; one child holds every trainable parameter; a criterion attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 2)
        self.criterion = nn.CrossEntropyLoss()


class TwoNets(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)


def test_the_model_and_loss_are_found_and_said_without_a_trainer() -> None:
    module = Wrapper()
    assert auto_model_attr(module) == "net"
    assert measured_model(module, None) is module.net
    assert measured_loss(module, None) is module.criterion
    assert what_is_measured(module, None, None) == (
        "CurvatureMonitor: measuring loss CrossEntropyLoss() (Wrapper.criterion) of model "
        "Wrapper.net (model_attr='net', chosen automatically: Wrapper has no forward() and net "
        "holds all its trainable parameters; set model_attr to measure another submodule)"
    )
    with pytest.raises(ConfigurationError, match=r"2 submodules hold trainable parameters"):
        measured_model(TwoNets(), None)
    assert measured_model(TwoNets(), "head") is not None
    with pytest.raises(ConfigurationError, match=r"model_attr='tail' does not name a torch"):
        measured_model(TwoNets(), "tail")
    with pytest.raises(ConfigurationError, match=r"^CurvatureMonitor needs the training loss"):
        measured_loss(TwoNets(), None)


def test_the_trial_loss_names_what_to_set_and_leaves_the_model_as_it_was() -> None:
    module = Wrapper()
    module.train()
    batch = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    check_trial_loss(module, batch, None, None)  # a good batch passes
    assert module.training and all(p.grad is None for p in module.parameters())

    def per_sample(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return outputs.sum(dim=1)  # not reduced

    with pytest.raises(ConfigurationError) as caught:
        check_trial_loss(TwoNets(), batch, "head", per_sample)
    assert str(caught.value).startswith(
        "CurvatureMonitor: a trial measurement before training failed: loss_fn(model(inputs), "
        "targets) with model=TwoNets.head, loss_fn=<function "
    )
    assert "the loss is a tensor of shape (4,), not a scalar" in str(caught.value)
    assert (
        "Set model_attr='encoder' (the submodule mapping inputs to outputs; candidates: "
        "encoder, head)" in str(caught.value)
    )


class Augmented(Dataset[dict[str, Any]]):
    """Items drawn with the data set's own generator (as augmentation is)."""

    def __init__(self) -> None:
        self.rng = random.Random(0)

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": torch.tensor([float(i), self.rng.random()]), "y": i % 2}


def test_the_curvature_batch_is_collated_through_a_private_view() -> None:
    dataset = Augmented()
    loader = DataLoader(dataset, batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    state, global_state = dataset.rng.getstate(), torch.get_rng_state()
    x, y = build_batch(trainer, loader, [3, 1, 4], lambda b: (b["x"], b["y"]))
    assert x[:, 0].tolist() == [3.0, 1.0, 4.0] and y.tolist() == [1, 1, 0]
    fresh = random.Random(0)  # a copy of the data set's generator drew the augmentation
    assert x[:, 1].tolist() == pytest.approx([fresh.random() for _ in range(3)])
    assert dataset.rng.getstate() == state  # the training data set's generator never advanced
    assert torch.equal(torch.get_rng_state(), global_state)
    with pytest.raises(ConfigurationError, match=r"batches are dict with keys \['x', 'y'\]"):
        build_batch(trainer, loader, [0], None)
