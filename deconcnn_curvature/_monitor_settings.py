"""The Lightning monitor's settings and helpers: argument validators, the loss and function
settings a config may give as names, the module introspection that finds the model to measure,
the monitor's seed mixer (defined in :mod:`deconcnn_curvature._seeds`) and the private views of
a dataset the curvature batch is drawn from.

Split from :mod:`deconcnn_curvature.lightning` (issue 14) so that module holds the callback only.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from deconcnn_curvature._seeds import tagged_seed as _mix_seed  # noqa: F401  (the monitor's mixer)
from deconcnn_curvature.errors import ConfigurationError

#: Short loss names ``loss_fn`` accepts (e.g. from a config: ``curvature.loss_fn=cross_entropy``);
#: each builds the mean-reduced torch loss.
LOSS_NAMES: Mapping[str, Callable[[], nn.Module]] = {
    "cross_entropy": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
    "nll": nn.NLLLoss,
    "bce_with_logits": nn.BCEWithLogitsLoss,
}
#: Attributes of the LightningModule read as the loss when ``loss_fn`` is not given, in order.
_LOSS_ATTRS: tuple[str, ...] = ("loss_fn", "criterion")


# ------------------------------------------------------------------------------------- helpers


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


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = " or null" if allow_none else ""
        raise ConfigurationError(
            f"CurvatureMonitor: {name} must be an integer >= {minimum}{extra}; got {value!r}."
        )
    return int(value)


def _check_bool(name: str, value: Any) -> bool:
    # bool("false") is True: a string from a config must not pass for a flag.
    if not isinstance(value, bool):
        raise ConfigurationError(f"CurvatureMonitor: {name} must be true or false; got {value!r}.")
    return value


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigurationError(
            f"CurvatureMonitor: {name} must be one of {', '.join(map(repr, choices))}; got "
            f"{value!r}."
        )
    return str(value)


def _check_data_groups(value: Any, batch_size: int) -> int:
    """``data_groups`` (issue 13): at least 1, at most the curvature batch's samples."""
    groups = _check_int("data_groups", value, 1)
    if groups > batch_size:
        raise ConfigurationError(
            f"CurvatureMonitor: data_groups={groups} exceeds hessian_batch_size={batch_size}; "
            "each group needs at least one sample: lower data_groups (1: probe noise only)."
        )
    return groups


def _as_mapping(name: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) and not hasattr(value, "items"):
        raise ConfigurationError(
            f"CurvatureMonitor: {name} must be a mapping (e.g. {{'probe_batch': 4}}); got "
            f"{type(value).__name__}."
        )
    return {str(k): v for k, v in value.items()}


def _loss_from_setting(value: Any) -> Any:
    """``loss_fn`` as given: a callable, a short name from :data:`LOSS_NAMES`, or ``None``."""
    if isinstance(value, str):
        factory = LOSS_NAMES.get(value.strip().lower())
        if factory is None:
            raise ConfigurationError(
                f"CurvatureMonitor: unknown loss_fn name {value!r}; the names are "
                f"{', '.join(LOSS_NAMES)}, or give a loss object (in a config: "
                "loss_fn: {_target_: torch.nn.CrossEntropyLoss})."
            )
        return factory()
    if value is not None and not callable(value):
        raise ConfigurationError(
            f"CurvatureMonitor: loss_fn must be callable as loss_fn(outputs, targets) or one of "
            f"{', '.join(LOSS_NAMES)}; got {type(value).__name__}."
        )
    return value


def _callable_from_setting(name: str, value: Any) -> Any:
    """A callable, or a string ``"package.module:function"`` (``.function`` also works) naming one,
    so a config can give ``batch_fn`` as text."""
    if isinstance(value, str) and ("." in value or ":" in value):
        path = value.strip()
        module_name, sep, attr = path.partition(":")
        if not sep:
            module_name, _, attr = path.rpartition(".")
        try:
            found = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigurationError(
                f"CurvatureMonitor: {name}={value!r} does not name an importable function "
                f"('package.module:function'): {type(exc).__name__}: {exc}"
            ) from None
        value = found
    if value is not None and not callable(value):
        raise ConfigurationError(
            f"CurvatureMonitor: {name} must be a callable mapping a collated training batch to "
            f"(inputs, targets), or its import path 'package.module:function'; got "
            f"{type(value).__name__}."
        )
    return value


def _short_repr(value: Any) -> str:
    """``repr`` of a loss on one line, shortened (a module's repr can span lines)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 80 else text[:77] + "..."


# ------------------------------------------------------------------------------ config settings

#: OmegaConf's "no value" marker, read as unset (the monitor's own default applies) for configs
#: written before ``curvature/base.yaml`` switched to ``null``: ``???`` means "must be given" to
#: Hydra, so a project's own ``to_container(cfg, throw_on_missing=True)`` failed on it.
UNSET = "???"
#: Settings whose ``null`` in a config is a value, not "unset" (``jsonl: null``: no records file).
#: For every other setting ``null`` means the monitor's default, as ``curvature/base.yaml`` lists.
NULL_IS_A_VALUE: frozenset[str] = frozenset({"jsonl"})


def is_unset(key: str, value: Any) -> bool:
    """Whether a config's ``curvature.<key>`` leaves the monitor's default in place."""
    if isinstance(value, str):
        return value == UNSET
    return value is None and key not in NULL_IS_A_VALUE


def _plain_settings(value: Any) -> dict[str, Any]:
    """A config's ``curvature`` group as a plain dict, unset settings kept as ``"???"``."""
    if value is None:
        return {}
    if type(value).__module__.startswith("omegaconf"):  # a DictConfig given directly
        from omegaconf import OmegaConf

        value = OmegaConf.to_container(value, resolve=True, throw_on_missing=False)
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            "CurvatureMonitor.from_config: settings must be a mapping of monitor settings (a "
            f"config's `curvature` group); got {type(value).__name__}."
        )
    return {str(k): v for k, v in value.items()}


def _built(value: Any) -> Any:
    """A ``{_target_: ...}`` setting (``loss_fn: {_target_: torch.nn.CrossEntropyLoss}``) built by
    Hydra, as Hydra's own recursive instantiation would; anything else as given."""
    if isinstance(value, Mapping) and "_target_" in value:
        from hydra.utils import instantiate

        return instantiate(dict(value), _convert_="all")
    return value


def settings_kwargs(
    accepted: Sequence[str], settings: Any, overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """The keyword arguments ``CurvatureMonitor.from_config`` passes on: the settings of a config's
    ``curvature`` group with ``overrides`` on top, unset ones (``null``, but for ``jsonl``; or
    ``???``: :func:`is_unset`) dropped so the signature's default applies, ``{_target_: ...}``
    values built. An unknown key is a
    :class:`~deconcnn_curvature.errors.ConfigurationError` naming it and the valid ones."""
    merged = {**_plain_settings(settings), **{str(k): v for k, v in overrides.items()}}
    unknown = sorted(set(merged) - set(accepted))
    if unknown:
        close = difflib.get_close_matches(unknown[0], accepted, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigurationError(
            f"CurvatureMonitor: unknown setting {', '.join(map(repr, unknown))} (e.g. "
            f"curvature.{unknown[0]}); {hint}the settings are {', '.join(accepted)} "
            "(configs/curvature/base.yaml)."
        )
    return {k: _built(v) for k, v in merged.items() if not is_unset(k, v)}
