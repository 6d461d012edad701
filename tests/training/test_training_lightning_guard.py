"""The Lightning import guard explains a broken torchvision instead of a foreign traceback."""

from __future__ import annotations

import importlib
import importlib.util

import pytest

from deconcnn_curvature.errors import CurvatureError
from deconcnn_curvature.monitor import lightning_import


def test_broken_torchvision_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    real_import = importlib.import_module

    def find_spec(name: str, *args):
        return object() if name == "torchvision" else real_find_spec(name, *args)

    def import_module(name: str, *args):
        if name == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(importlib, "import_module", import_module)
    with pytest.raises(lightning_import.LightningUnavailableError) as info:
        lightning_import.check_lightning_importable()
    message = str(info.value)
    assert "torchvision::nms" in message and "pip uninstall -y torchvision" in message
    assert isinstance(info.value, CurvatureError) and isinstance(info.value, ImportError)


def test_missing_lightning_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "lightning" else real_find_spec(name, *a),
    )
    with pytest.raises(lightning_import.LightningUnavailableError, match=r"\[lightning\]"):
        lightning_import.check_lightning_importable()


def test_lazy_exports() -> None:
    import deconcnn_curvature.training as training

    assert (
        training.resnet18_cifar
        is importlib.import_module("deconcnn_curvature.training.resnet_cifar").resnet18_cifar
    )
    assert "ClassificationModule" in training.__all__ and "MetricsJSONL" in dir(training)
    with pytest.raises(AttributeError):
        training.nothing  # noqa: B018
