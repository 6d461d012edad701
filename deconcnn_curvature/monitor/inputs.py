"""What the Lightning monitor measures, found from the ``LightningModule`` and the training
loader: the model (``model_attr``, or the module's only model child), the loss (``loss_fn``, or
the module's ``loss_fn``/``criterion``), the start-up line that says so, the trial loss on the
curvature batch, and the curvature batch itself, read through a private view of the training data
set and collated as training does.

Apart from :mod:`deconcnn_curvature.monitor.callback` so that the callback's hooks only call
these functions, which need no running ``Trainer`` to test.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from deconcnn_curvature.errors import ConfigurationError
from deconcnn_curvature.monitor.lightning_import import pl
from deconcnn_curvature.monitor.settings import LOSS_ATTRS, LOSS_NAMES, short_repr
from deconcnn_curvature.problem import (
    _to_device,
    check_mean_reduced,
    global_rng_preserved,
    preserve_state,
)

# ------------------------------------------------------------------------------------- model


def has_own_forward(module: nn.Module) -> bool:
    """``module`` defines ``forward`` (``LightningModule`` and ``nn.Module`` do not)."""
    forward = getattr(type(module), "forward", None)
    return forward not in (pl.LightningModule.forward, nn.Module.forward, None)


def trainable_children(module: nn.Module) -> list[str]:
    """Names of the direct submodules that hold trainable parameters."""
    return [
        name
        for name, child in module.named_children()
        if any(p.requires_grad for p in child.parameters())
    ]


def auto_model_attr(pl_module: nn.Module) -> str | None:
    """The submodule to measure when ``model_attr`` is not given: ``None`` (the module itself)
    when it has a ``forward``; else its only child, provided that child holds every trainable
    parameter. Anything else is ambiguous and raises, naming ``model_attr``."""
    if has_own_forward(pl_module):
        return None
    owner = type(pl_module).__name__
    children = trainable_children(pl_module)
    direct = [n for n, p in pl_module.named_parameters(recurse=False) if p.requires_grad]
    if len(children) == 1 and not direct:
        return children[0]
    if not children:
        found = "no submodule holds trainable parameters"
    elif direct:
        found = f"it also holds trainable parameters of its own ({', '.join(direct)})"
    else:
        found = f"{len(children)} submodules hold trainable parameters ({', '.join(children)})"
    example = children[0] if children else "model"
    raise ConfigurationError(
        f"CurvatureMonitor: {owner} has no forward() of its own and the model to measure is "
        f"ambiguous: {found}. Set model_attr to the submodule that maps a batch's inputs to "
        f"the loss's inputs, e.g. model_attr={example!r} (in a config: "
        f"curvature.model_attr={example}), or give {owner} a forward()."
    )


def measured_model(pl_module: nn.Module, model_attr: str | None) -> nn.Module:
    """The module to measure: ``pl_module.<model_attr>`` (dotted path), or without it
    ``pl_module`` or its only model child (:func:`auto_model_attr`)."""
    model: Any = pl_module
    if model_attr is None:
        found = auto_model_attr(pl_module)  # a module without forward: its one model child
        return pl_module if found is None else getattr(pl_module, found)
    if model_attr is not None:
        for part in model_attr.split("."):
            model = getattr(model, part, None)
        if not isinstance(model, nn.Module):
            raise ConfigurationError(
                f"CurvatureMonitor: model_attr={model_attr!r} does not name a "
                f"torch.nn.Module on {type(pl_module).__name__}; got "
                f"{type(model).__name__}."
            )
    return model


def measured_loss(pl_module: nn.Module, loss_fn: Any) -> Callable[..., torch.Tensor]:
    """The loss to measure: ``loss_fn`` (the checked setting), else the module's ``loss_fn`` or
    ``criterion`` attribute; it must be mean-reduced."""
    for attr in LOSS_ATTRS if loss_fn is None else ():
        loss_fn = getattr(pl_module, attr, None)
        if callable(loss_fn):
            break
    if not callable(loss_fn):
        raise ConfigurationError(
            f"CurvatureMonitor needs the training loss: give {type(pl_module).__name__} a "
            "mean-reduced `loss_fn` or `criterion` attribute (e.g. self.loss_fn = "
            "nn.CrossEntropyLoss()), or pass loss_fn=... to the monitor (a loss object or "
            f"one of {', '.join(LOSS_NAMES)}; in a config: curvature.loss_fn=cross_entropy)."
        )
    check_mean_reduced(loss_fn, name="CurvatureMonitor: the loss", error=ConfigurationError)
    return loss_fn


def what_is_measured(pl_module: nn.Module, model_attr: str | None, loss_fn: Any) -> str:
    """The start-up line saying which module and loss are measured and where they came from
    (raises, naming ``model_attr``, when the module to measure is ambiguous)."""
    owner = type(pl_module).__name__
    if model_attr is not None:
        measured_model(pl_module, model_attr)
        model = f"{owner}.{model_attr} (model_attr)"
    else:
        found = auto_model_attr(pl_module)
        model = (
            f"{owner} (its forward)"
            if found is None
            else f"{owner}.{found} (model_attr={found!r}, chosen automatically: {owner} has "
            f"no forward() and {found} holds all its trainable parameters; set model_attr "
            "to measure another submodule)"
        )
    loss = measured_loss(pl_module, loss_fn)
    source = (
        "loss_fn"
        if loss_fn is not None
        else next((f"{owner}.{a}" for a in LOSS_ATTRS if getattr(pl_module, a, None) is loss), "?")
    )
    return f"CurvatureMonitor: measuring loss {short_repr(loss)} ({source}) of model {model}"


def check_trial_loss(
    pl_module: pl.LightningModule, batch: Any, model_attr: str | None, loss_fn: Any
) -> None:
    """Compute the loss once on the curvature ``batch`` as a measurement does, under the state
    guard (training is untouched). A module without ``forward``, a loss that does not take
    the model's outputs, a batch the model cannot read fail here, before the first step,
    with what to set, instead of as a run of ``null`` records."""
    model = measured_model(pl_module, model_attr)
    loss_fn = measured_loss(pl_module, loss_fn)
    inputs, targets = batch
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device if params else pl_module.device
    try:
        with preserve_state(model):
            loss = loss_fn(model(_to_device(inputs, device)), _to_device(targets, device))
            if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
                what = type(loss).__name__
                if isinstance(loss, torch.Tensor):
                    what = f"a tensor of shape {tuple(loss.shape)}"
                problem = f"the loss is {what}, not a scalar (a mean-reduced loss is)"
            elif not loss.requires_grad:
                problem = "the loss does not depend on the measured model's parameters"
            else:
                problem = None
            del loss
    except Exception as exc:
        problem = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        if len(problem) > 400:
            problem = problem[:400] + " ..."
    if problem is None:
        return
    owner = type(pl_module).__name__
    name = owner if model_attr is None else f"{owner}.{model_attr}"
    if model_attr is None and model is not pl_module:
        name = f"{owner}.{auto_model_attr(pl_module)}"
    children = trainable_children(pl_module)
    example = children[0] if children else "net"
    raise ConfigurationError(
        f"CurvatureMonitor: a trial measurement before training failed: loss_fn(model(inputs), "
        f"targets) with model={name}, loss_fn={short_repr(loss_fn)} on the curvature batch: "
        f"{problem}. Set model_attr={example!r} (the submodule mapping inputs to outputs"
        f"{'; candidates: ' + ', '.join(children) if children else ''}), loss_fn=... (a loss "
        f"object or {', '.join(LOSS_NAMES)}) or batch_fn=... (a training batch -> (inputs, "
        "targets)), whichever is wrong (in a config: curvature.model_attr=..., "
        "curvature.loss_fn=..., curvature.batch_fn=...)."
    )


# ------------------------------------------------------------------------------------- batch


def _private_rng(value: Any) -> Any:
    """A copy of a random generator with the same state (``value`` itself if it is none)."""
    if isinstance(value, torch.Generator):
        clone = torch.Generator(device=value.device)
        clone.set_state(value.get_state())
        return clone
    if isinstance(value, random.Random | np.random.Generator | np.random.RandomState):
        return copy.deepcopy(value)
    return value


def _private_view(dataset: Any, depth: int = 0) -> Any:
    """A shallow copy of ``dataset`` that shares its data but not its random generators.

    Reading items through it draws augmentation from copies of the data set's generators (the
    copy goes through ``__getstate__`` when the class defines one, which is how a data set drops
    per-process generators), so the training data set's own streams never advance. Wrapped data
    sets (``Subset``, ``ConcatDataset``) are copied the same way, a few levels deep.
    """
    try:
        clone = copy.copy(dataset)
    except Exception:  # an uncopyable data set: read it in place, under the global RNG guard
        return dataset
    attrs = getattr(clone, "__dict__", None)
    if isinstance(attrs, dict) and depth < 4:
        for name, value in list(attrs.items()):
            if isinstance(value, torch.utils.data.Dataset):
                attrs[name] = _private_view(value, depth + 1)
            elif (
                isinstance(value, list | tuple)
                and value
                and all(isinstance(v, torch.utils.data.Dataset) for v in value)
            ):
                attrs[name] = type(value)(_private_view(v, depth + 1) for v in value)
            else:
                attrs[name] = _private_rng(value)
    return clone


def train_loader(trainer: pl.Trainer) -> DataLoader:
    """The training ``DataLoader``, whose map-style data set the curvature batch is drawn from."""
    loader = trainer.train_dataloader
    if not isinstance(loader, DataLoader):
        raise ConfigurationError(
            "CurvatureMonitor draws its batch from the training DataLoader's data set, but "
            f"the training data is a {type(loader).__name__}; use a single torch DataLoader."
        )
    dataset = loader.dataset
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        raise ConfigurationError(
            "CurvatureMonitor needs a map-style training data set (with __len__ and "
            f"__getitem__) to draw a reproducible batch from; got {type(dataset).__name__}."
        )
    return loader


def build_batch(trainer: pl.Trainer, loader: DataLoader, indices: list[int], batch_fn: Any) -> Any:
    """This rank's share of ``indices``, collated as the training loader does, mapped by
    ``batch_fn`` and converted as Lightning converts training inputs (``*-true``
    precisions cast them to the model's dtype)."""
    local = indices[trainer.global_rank :: trainer.world_size]
    view = _private_view(loader.dataset)
    with global_rng_preserved():
        batch = loader.collate_fn([view[i] for i in local])
    if batch_fn is not None:
        batch = batch_fn(batch)
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        what, pair = type(batch).__name__, ("x", "y")
        if isinstance(batch, Mapping):
            what += f" with keys {sorted(map(str, batch))}"
            pair = tuple(map(str, batch))[:2] if len(batch) == 2 else pair
        raise ConfigurationError(
            f"CurvatureMonitor: the training loader's batches are {what}, not an (inputs, "
            "targets) pair; pass batch_fn=... mapping a batch to one, e.g. "
            f"batch_fn=lambda b: (b[{pair[0]!r}], b[{pair[1]!r}]), or in a config the import "
            "path of such a function: curvature.batch_fn=package.module:function."
        )
    return trainer.precision_plugin.convert_input(tuple(batch))
