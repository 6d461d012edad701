"""The reference run's checkpoint loader: a built-in plugin of the ``load_checkpoint`` hook.

``deconcnn-curv estimate/compare/density`` measure a ``last.ckpt`` of ``deconcnn-curv train``
(a :class:`~deconcnn_curvature.training.module.ClassificationModule` saved by Lightning) without
``--model``: this loader rebuilds the network from the checkpoint's ``hyper_parameters``
(``model_name``, ``model_kwargs``) with
:func:`deconcnn_curvature.training.resnet_cifar.build_model`, which needs only torch. It lives
here, with the training run, and reaches the core only through the public hook, exactly as a
third-party plugin would; the core never imports it (``deconcnn_curvature.plugins`` registers it
by name, like the built-in backends).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from deconcnn_curvature.checkpoints.loading import (
    call_repr,
    load_weights,
    loaded_checkpoint,
    reference_checkpoint,
)
from deconcnn_curvature.checkpoints.reading import CheckpointError
from deconcnn_curvature.errors import ConfigurationError, CurvatureError
from deconcnn_curvature.hookspecs import hookimpl
from deconcnn_curvature.problem import LoadedCheckpoint

__all__ = ["load_checkpoint"]

_REFERENCE = "reference run (ClassificationModule)"


def _reference_model(hparams: Mapping[str, Any], path: Path) -> tuple[nn.Module, str]:
    from deconcnn_curvature.training.resnet_cifar import build_model

    name = hparams["model_name"]
    kwargs = dict(hparams.get("model_kwargs") or {})
    try:
        model = build_model(name, **kwargs)
    except CurvatureError as exc:
        raise CheckpointError(
            f"cannot rebuild the model of {path} from its hyper-parameters: {exc} Pass "
            "--model package.module:factory (and --model-arg key=value) to build it yourself."
        ) from exc
    return model, call_repr(str(name), kwargs)


@hookimpl
def load_checkpoint(
    path: Path, checkpoint: Mapping[str, Any] | None, settings: Mapping[str, Any]
) -> LoadedCheckpoint | None:
    """Load a reference-run checkpoint; ``None`` for any other file, or when ``--model`` names
    the network (the built-in factory loader then rebuilds it)."""
    if settings["model"] is not None or not reference_checkpoint(checkpoint):
        return None
    assert isinstance(checkpoint, Mapping)
    if settings["model_args"]:
        raise ConfigurationError(
            "--model-arg needs --model: the reference run's model is rebuilt from the "
            "checkpoint's own hyper-parameters."
        )
    model, description = _reference_model(checkpoint["hyper_parameters"], path)
    load_weights(
        model,
        checkpoint["state_dict"],
        f"{path} ('state_dict' entry)",
        ("model.",),
        "the checkpoint does not match its own hyper-parameters; pass --model to rebuild it",
    )
    return loaded_checkpoint(
        path,
        checkpoint,
        settings,
        model=model,
        description=f"{_REFERENCE}: {description}",
        loader="builtin:reference",
    )
