"""CIFAR-shaped networks in the shape deconCNN trains, written here so torchvision is never needed.

:func:`resnet18_cifar` is the usual CIFAR variant of ResNet-18 (He, Zhang, Ren, Sun, "Deep Residual
Learning for Image Recognition", CVPR 2016): a 3x3 stride-1 stem with no max-pool, four stages of
two :class:`BasicBlock` each with 64/128/256/512 channels, global average pooling and one linear
layer. Channel counts are multiplied by ``width_mult`` and rounded, never below 8 per layer.

Every non-linearity is its own ``nn.ReLU`` module (never ``F.relu``) and no module is reused
inside a forward pass, so hook-based tools (BackPACK, activation monitors) see each of them.
The residual sum itself is a tensor ``+``, which BackPACK's ``DiagHessian``/``HMP`` refuse; use a
plain network such as :func:`small_cnn` with those extensions.

:func:`build_model` looks a factory up by name, the way a config names a model.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from deconcnn_curvature.errors import ConfigurationError

__all__ = [
    "MIN_CHANNELS",
    "NORM_TYPES",
    "BasicBlock",
    "ResNetCIFAR",
    "available_models",
    "build_model",
    "resnet18_cifar",
    "scaled_channels",
    "small_cnn",
]

#: Allowed values of ``norm_type``.
NORM_TYPES: tuple[str, ...] = ("batchnorm", "none")

#: No layer of a width-scaled network gets fewer channels than this.
MIN_CHANNELS = 8

_RESNET18_STAGE_CHANNELS = (64, 128, 256, 512)
_RESNET18_BLOCKS_PER_STAGE = (2, 2, 2, 2)


def _check_width_mult(width_mult: float) -> float:
    if isinstance(width_mult, bool) or not isinstance(width_mult, int | float):
        raise ConfigurationError(
            f"width_mult must be a positive number (e.g. 1.0, 0.5, 0.125); got "
            f"{width_mult!r} of type {type(width_mult).__name__}."
        )
    if not math.isfinite(width_mult) or width_mult <= 0:
        raise ConfigurationError(
            f"width_mult must be a finite number > 0 (e.g. 1.0, 0.5, 0.125); got {width_mult!r}."
        )
    return float(width_mult)


def _check_norm_type(norm_type: str) -> str:
    if norm_type not in NORM_TYPES:
        raise ConfigurationError(
            f"norm_type must be one of {', '.join(repr(n) for n in NORM_TYPES)}; got {norm_type!r}."
        )
    return norm_type


def _check_positive_int(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    return value


def scaled_channels(base: int, width_mult: float) -> int:
    """Return ``round(base * width_mult)``, but at least :data:`MIN_CHANNELS`.

    >>> scaled_channels(64, 0.125), scaled_channels(64, 0.0625), scaled_channels(512, 0.25)
    (8, 8, 128)
    """
    width_mult = _check_width_mult(width_mult)
    return max(MIN_CHANNELS, round(base * width_mult))


def _norm(norm_type: str, channels: int) -> nn.Module:
    if norm_type == "batchnorm":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def _conv3x3(in_channels: int, out_channels: int, stride: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (a 1x1 projection when the shape changes).

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output.
        stride: Stride of the first convolution (2 halves the resolution).
        norm_type: ``"batchnorm"`` or ``"none"``; with ``"none"`` the norms are ``nn.Identity``
            and the convolutions carry a bias.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm_type: str) -> None:
        super().__init__()
        norm_type = _check_norm_type(norm_type)
        bias = norm_type == "none"
        self.conv1 = _conv3x3(in_channels, out_channels, stride, bias)
        self.bn1 = _norm(norm_type, out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(out_channels, out_channels, 1, bias)
        self.bn2 = _norm(norm_type, out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias),
                _norm(norm_type, out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """Return ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """CIFAR ResNet: 3x3 stem (stride 1, no max-pool), stages of :class:`BasicBlock`, pool, linear.

    Use :func:`resnet18_cifar` rather than this class directly.

    Args:
        stage_channels: Output channels of each stage (already width-scaled); the stem has as
            many channels as the first stage.
        blocks_per_stage: Number of blocks in each stage; every stage after the first halves the
            resolution in its first block.
        norm_type: ``"batchnorm"`` or ``"none"``.
        num_classes: Size of the output.
        in_channels: Channels of the input images.
    """

    def __init__(
        self,
        stage_channels: tuple[int, ...],
        blocks_per_stage: tuple[int, ...],
        norm_type: str = "batchnorm",
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        norm_type = _check_norm_type(norm_type)
        if len(stage_channels) != len(blocks_per_stage) or not stage_channels:
            raise ConfigurationError(
                "stage_channels and blocks_per_stage must be non-empty and of equal length; got "
                f"{stage_channels!r} and {blocks_per_stage!r}."
            )
        bias = norm_type == "none"
        self.norm_type = norm_type
        self.conv1 = _conv3x3(in_channels, stage_channels[0], 1, bias)
        self.bn1 = _norm(norm_type, stage_channels[0])
        self.relu = nn.ReLU()
        current = stage_channels[0]
        self._stage_names: tuple[str, ...] = ()
        for index, (channels, blocks) in enumerate(
            zip(stage_channels, blocks_per_stage, strict=True), start=1
        ):
            layers = []
            for block in range(blocks):
                stride = 2 if index > 1 and block == 0 else 1
                layers.append(BasicBlock(current, channels, stride, norm_type))
                current = channels
            self.add_module(f"layer{index}", nn.Sequential(*layers))
            self._stage_names += (f"layer{index}",)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(current, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits, shape ``(batch, num_classes)``."""
        out = self.relu(self.bn1(self.conv1(x)))
        for stage in self._stage_names:
            out = getattr(self, stage)(out)
        return self.fc(self.flatten(self.avgpool(out)))


def resnet18_cifar(
    width_mult: float = 1.0, norm_type: str = "batchnorm", num_classes: int = 10
) -> nn.Module:
    """Build the CIFAR ResNet-18 (about 11.2 M parameters at ``width_mult=1``, 10 classes).

    Args:
        width_mult: Multiplies the 64/128/256/512 channels of the four stages; each layer is
            rounded and kept at :data:`MIN_CHANNELS` (8) or more. ``0.125`` gives 8/16/32/64.
        norm_type: ``"batchnorm"`` (BatchNorm2d after every convolution, convolutions without
            bias) or ``"none"`` (``nn.Identity`` in place of each norm, convolutions with bias).
        num_classes: Number of output logits.

    Raises:
        ConfigurationError: (a ``ValueError``) for a non-positive ``width_mult``, an unknown
            ``norm_type`` or ``num_classes < 1``.
    """
    width_mult = _check_width_mult(width_mult)
    norm_type = _check_norm_type(norm_type)
    num_classes = _check_positive_int("num_classes", num_classes)
    channels = tuple(scaled_channels(c, width_mult) for c in _RESNET18_STAGE_CHANNELS)
    return ResNetCIFAR(channels, _RESNET18_BLOCKS_PER_STAGE, norm_type, num_classes)


def small_cnn(
    num_classes: int = 10, width: int = 8, norm_type: str = "none", in_channels: int = 3
) -> nn.Module:
    """A tiny plain CNN (conv-relu-pool, conv-relu, global pool, linear) for fast tests and demos.

    It has no residual sum, so every BackPACK extension supports it when ``norm_type="none"``.

    Args:
        num_classes: Number of output logits.
        width: Channels of the first convolution (the second has twice as many).
        norm_type: ``"batchnorm"`` or ``"none"``.
        in_channels: Channels of the input images.
    """
    num_classes = _check_positive_int("num_classes", num_classes)
    width = _check_positive_int("width", width)
    in_channels = _check_positive_int("in_channels", in_channels)
    norm_type = _check_norm_type(norm_type)
    bias = norm_type == "none"
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=bias),
        _norm(norm_type, width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=bias),
        _norm(norm_type, 2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(2 * width, num_classes),
    )


_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18_cifar": resnet18_cifar,
    "small_cnn": small_cnn,
}


def available_models() -> tuple[str, ...]:
    """Names :func:`build_model` accepts, sorted."""
    return tuple(sorted(_MODELS))


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by name, e.g. ``build_model("resnet18_cifar", width_mult=0.25)``.

    Raises:
        ConfigurationError: for an unknown name (the message lists the known ones) or a keyword
            the factory does not take (the message lists the ones it does).
    """
    if name not in _MODELS:
        raise ConfigurationError(
            f"unknown model name {name!r}; known models: {', '.join(available_models())}."
        )
    factory = _MODELS[name]
    accepted = tuple(inspect.signature(factory).parameters)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigurationError(
            f"model {name!r} does not take {', '.join(unknown)}; it takes {', '.join(accepted)}."
        )
    return factory(**kwargs)
