"""CIFAR ResNet-18 and the model registry: shapes, 8-channel floor, parameter scaling, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deconcnn_curvature.errors import ConfigurationError
from deconcnn_curvature.training.resnet_cifar import (
    MIN_CHANNELS,
    available_models,
    build_model,
    resnet18_cifar,
    scaled_channels,
    small_cnn,
)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _conv_widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("norm_type", ["batchnorm", "none"])
@pytest.mark.parametrize("width_mult", [0.125, 0.25])
def test_output_shape(width_mult: float, norm_type: str) -> None:
    torch.manual_seed(0)
    model = resnet18_cifar(width_mult=width_mult, norm_type=norm_type, num_classes=7)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_full_width_matches_the_known_parameter_count() -> None:
    assert _count(resnet18_cifar()) == 11_173_962


def test_stage_widths_and_min_channels() -> None:
    widths = _conv_widths(resnet18_cifar(width_mult=0.125))
    assert set(widths) == {8, 16, 32, 64}
    tiny = _conv_widths(resnet18_cifar(width_mult=0.01))
    assert set(tiny) == {MIN_CHANNELS}
    assert scaled_channels(64, 0.0625) == MIN_CHANNELS
    assert scaled_channels(512, 0.25) == 128


def test_structure_for_hook_based_tools() -> None:
    model = resnet18_cifar(width_mult=0.125)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 1 + 8 * 2  # stem + two per block, each its own module
    assert len({id(m) for m in relus}) == len(relus)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    stem = model.conv1
    assert (stem.kernel_size, stem.stride) == ((3, 3), (1, 1))
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
    assert isinstance(model.fc, nn.Linear)


def test_norm_none_uses_identity_and_biased_convs() -> None:
    model = resnet18_cifar(width_mult=0.125, norm_type="none")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is not None for c in convs)
    bn = resnet18_cifar(width_mult=0.125, norm_type="batchnorm")
    assert all(m.bias is None for m in bn.modules() if isinstance(m, nn.Conv2d))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 1 + 8 * 2 + 3


def test_parameter_count_scales_about_quadratically() -> None:
    quarter, half = _count(resnet18_cifar(0.25)), _count(resnet18_cifar(0.5))
    assert 3.5 < half / quarter < 4.1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width_mult": 0}, "width_mult must be a finite number > 0"),
        ({"width_mult": -1.0}, "width_mult must be a finite number > 0"),
        ({"width_mult": "1"}, "width_mult must be a positive number"),
        ({"width_mult": float("nan")}, "width_mult"),
        ({"norm_type": "layernorm"}, "norm_type must be one of 'batchnorm', 'none'"),
        ({"num_classes": 0}, "num_classes must be an integer >= 1"),
    ],
    ids=["zero-width", "negative-width", "string-width", "nan-width", "bad-norm", "no-classes"],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        resnet18_cifar(**kwargs)


def test_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        resnet18_cifar(norm_type="group")


def test_build_model_registry() -> None:
    assert {"resnet18_cifar", "small_cnn"} <= set(available_models())
    model = build_model("resnet18_cifar", width_mult=0.125, norm_type="none")
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert small_cnn(num_classes=3)(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    with pytest.raises(ConfigurationError, match=r"unknown model name 'resnet50'.*resnet18_cifar"):
        build_model("resnet50")
    with pytest.raises(ConfigurationError, match="does not take depth; it takes width_mult"):
        build_model("resnet18_cifar", depth=18)


def test_global_pool_backward_is_deterministic_on_cuda() -> None:
    """AdaptiveAvgPool2d(1) must run as a mean: its own CUDA backward refuses deterministic mode."""
    model = resnet18_cifar(width_mult=0.125)
    seen, stack, names = set(), [model(torch.randn(2, 3, 32, 32)).grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(child for child, _ in node.next_functions)
    assert "MeanBackward1" in names
    assert not any("AdaptiveAvgPool" in name for name in names)
