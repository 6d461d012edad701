"""The YAML groups under configs/ build exactly what the training code takes."""

from __future__ import annotations

import inspect
from pathlib import Path

import lightning.pytorch as pl
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from deconcnn_curvature.training.data import CIFARDataModule
from deconcnn_curvature.training.module import ClassificationModule
from deconcnn_curvature.training.resnet_cifar import build_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _load(group: str, name: str):
    return OmegaConf.load(CONFIGS / group / f"{name}.yaml")


@pytest.mark.parametrize("name", ["resnet18_cifar", "small_cnn"])
def test_model_configs_build(name: str) -> None:
    cfg = OmegaConf.to_container(_load("model", name))
    model_name = cfg.pop("name")
    assert model_name == name
    build_model(model_name, **cfg)


def test_optim_and_lrsched_keys_are_module_arguments() -> None:
    accepted = set(inspect.signature(ClassificationModule).parameters)
    optim = OmegaConf.to_container(_load("optim", "sgd"))
    lrsched = OmegaConf.to_container(_load("lrsched", "cosine"))
    assert optim == {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False}
    assert lrsched["warmup_epochs"] == 5
    assert set(optim) | set(lrsched) <= accepted
    model = OmegaConf.to_container(_load("model", "resnet18_cifar"))
    ClassificationModule(model.pop("name"), {**model, "width_mult": 0.125}, **optim, **lrsched)


def test_data_configs_instantiate(tmp_path: Path) -> None:
    synthetic = _load("data", "synthetic")
    module = instantiate(synthetic, num_train=32, num_val=16)
    assert isinstance(module, CIFARDataModule) and module.source == "synthetic"
    cifar = _load("data", "cifar10")
    assert OmegaConf.is_missing(cifar, "root")
    module = instantiate(cifar, root=str(tmp_path))
    assert module.source == "cifar10" and module.num_train is None
    accepted = set(inspect.signature(CIFARDataModule).parameters)
    for cfg in (synthetic, cifar):
        assert set(cfg) - {"_target_"} <= accepted


def test_trainer_config_is_trainer_kwargs(tmp_path: Path) -> None:
    cfg = OmegaConf.to_container(_load("trainer", "default"))
    assert cfg["val_check_interval"] == 0.25 and cfg["precision"] == 32
    trainer = pl.Trainer(**cfg, logger=False, default_root_dir=tmp_path)
    assert trainer.max_epochs == 50
