"""The Lightning monitor's settings and helpers: :class:`MonitorSettings` (its constructor's
arguments, checked), argument validators, the loss and function settings a config may give as
names, the settings of a config's ``curvature`` group, and the monitor's seed mixer (defined in
:mod:`deconcnn_curvature._seeds`). What the settings select (the model, the loss, the curvature
batch) is found by :mod:`deconcnn_curvature.monitor.inputs`.

Apart from :mod:`deconcnn_curvature.monitor.callback` so that module holds the callback only.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from deconcnn_curvature._seeds import check_seed
from deconcnn_curvature._seeds import tagged_seed as mix_seed  # noqa: F401  (the monitor's mixer)
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
LOSS_ATTRS: tuple[str, ...] = ("loss_fn", "criterion")
#: Allowed values of ``batch_mode``.
BATCH_MODES: tuple[str, ...] = ("fixed", "refresh")
#: Allowed values of ``on_error``.
ON_ERROR: tuple[str, ...] = ("warn", "raise")
#: Metric names logged through ``pl_module.log`` (deconCNN's names for the trace and λ_max).
DEFAULT_METRIC_KEYS: Mapping[str, str] = {
    "trace": "curvature/hutch_trace",
    "trace_stderr": "curvature/hutch_trace_stderr",
    "eigenvalues": "curvature/lambda_max",
    "eigenvalues_converged": "curvature/lambda_max_converged",
    "n_hvp": "curvature/n_hvp",
    "seconds": "curvature/seconds",
}


# ------------------------------------------------------------------------------------- helpers


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
    """``data_groups``: at least 1, at most the curvature batch's samples."""
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


def short_repr(value: Any) -> str:
    """``repr`` of a loss on one line, shortened (a module's repr can span lines)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 80 else text[:77] + "..."


# ------------------------------------------------------------------------------ the settings


@dataclasses.dataclass(frozen=True)
class MonitorSettings:
    """``CurvatureMonitor``'s arguments, checked field by field when built: the monitor keeps each
    field as its attribute of the same name. Built from the constructor's raw arguments (the
    defaults are written once, in ``CurvatureMonitor.__init__``); a bad one raises
    :class:`~deconcnn_curvature.errors.ConfigurationError` with a one-line message naming it.
    Fields are checked in the order below and normalised (``quantities`` a tuple, ``rtol`` a
    float, ``metric_keys`` the full mapping with the defaults filled in, ``jsonl`` a ``Path``,
    ``loss_fn`` and ``batch_fn`` built from their names).

    ``num_samples`` is deconCNN's own name for ``num_hvps`` (its configs' ``curvature.num_samples``,
    which its users already write): it warns (``DeprecationWarning``, attributed to the code that
    built the monitor) and becomes ``num_hvps``.
    """

    backend: str | None
    quantities: tuple[str, ...]
    compute_every_n_steps: int
    compute_at_step_zero: bool
    num_hvps: int | None
    rtol: float | None
    k: int
    hessian_batch_size: int
    data_groups: int
    batch_mode: str
    seed: int
    on_error: str
    metric_keys: dict[str, str | None]
    jsonl: Path | None
    backend_options: dict[str, Any]
    loss_fn: Any
    model_attr: str | None
    batch_fn: Any
    enabled: bool
    log_metrics: bool
    num_samples: dataclasses.InitVar[int | None] = None

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # the checked value, in a frozen instance

    def __post_init__(self, num_samples: int | None) -> None:
        if num_samples is not None:
            if self.num_hvps is not None:
                raise ConfigurationError(
                    "CurvatureMonitor: num_samples is the deprecated name of num_hvps; give "
                    f"num_hvps alone (got num_hvps={self.num_hvps!r} and "
                    f"num_samples={num_samples!r})."
                )
            warnings.warn(
                "CurvatureMonitor: num_samples is deprecated and will be removed in the next "
                f"release; use num_hvps={num_samples!r} (in a config: curvature.num_hvps).",
                DeprecationWarning,
                stacklevel=4,  # past the dataclass's __init__ and the monitor's: its caller
            )
            self._set("num_hvps", num_samples)
        backend = self.backend
        if backend is not None and not isinstance(backend, str):
            raise ConfigurationError(
                f"CurvatureMonitor: backend must be a backend name or null; got {backend!r}."
            )
        self._set("quantities", _check_quantities(self.quantities))
        self._set(
            "compute_every_n_steps",
            _check_int("compute_every_n_steps", self.compute_every_n_steps, 1),
        )
        self._set(
            "compute_at_step_zero", _check_bool("compute_at_step_zero", self.compute_at_step_zero)
        )
        self._set("num_hvps", _check_int("num_hvps", self.num_hvps, 1, allow_none=True))
        self._set("rtol", _check_rtol(self.rtol))
        self._set("k", _check_int("k", self.k, 1))
        self._set(
            "hessian_batch_size", _check_int("hessian_batch_size", self.hessian_batch_size, 1)
        )
        self._set("data_groups", _check_data_groups(self.data_groups, self.hessian_batch_size))
        self._set("batch_mode", _check_choice("batch_mode", self.batch_mode, BATCH_MODES))
        self._set("seed", check_seed(self.seed, name="CurvatureMonitor: seed"))
        self._set("on_error", _check_choice("on_error", self.on_error, ON_ERROR))
        self._set("metric_keys", _check_metric_keys(self.metric_keys))
        self._set("jsonl", None if self.jsonl is None else Path(self.jsonl))
        self._set("backend_options", _as_mapping("backend_options", self.backend_options))
        self._set("loss_fn", _loss_from_setting(self.loss_fn))
        model_attr = self.model_attr
        if model_attr is not None and (not isinstance(model_attr, str) or not model_attr):
            raise ConfigurationError(
                f"CurvatureMonitor: model_attr must be an attribute name such as 'model' or "
                f"null; got {model_attr!r}."
            )
        self._set("batch_fn", _callable_from_setting("batch_fn", self.batch_fn))
        self._set("enabled", _check_bool("enabled", self.enabled))
        self._set("log_metrics", _check_bool("log_metrics", self.log_metrics))


def _check_quantities(quantities: Any) -> tuple[str, ...]:
    """``quantities``: a non-empty list without repeats and without ``"diagonal"`` (a string is a
    list of one)."""
    if isinstance(quantities, str):
        quantities = (quantities,)
    if not isinstance(quantities, Sequence) and not hasattr(quantities, "__iter__"):
        raise ConfigurationError(
            f"CurvatureMonitor: quantities must be a list such as ['trace', 'eigenvalues']; "
            f"got {quantities!r}."
        )
    quantities = tuple(str(q) for q in quantities)
    if not quantities:
        raise ConfigurationError(
            "CurvatureMonitor: quantities is empty; list at least one, e.g. ['trace']."
        )
    if len(set(quantities)) != len(quantities):
        raise ConfigurationError(
            f"CurvatureMonitor: quantities lists one quantity twice: {list(quantities)}."
        )
    if "diagonal" in quantities:
        raise ConfigurationError(
            "CurvatureMonitor: 'diagonal' has one number per parameter, too big for a per-step "
            "record; measure it after training with `deconcnn-curv estimate`, or monitor "
            "'layer_trace' instead."
        )
    return quantities


def _check_rtol(rtol: Any) -> float | None:
    if rtol is not None and (
        isinstance(rtol, bool)
        or not isinstance(rtol, int | float)
        or not math.isfinite(rtol)
        or rtol <= 0
    ):
        raise ConfigurationError(
            f"CurvatureMonitor: rtol must be a number > 0 or null; got {rtol!r}."
        )
    return None if rtol is None else float(rtol)


def _check_metric_keys(metric_keys: Any) -> dict[str, str | None]:
    """``metric_keys`` over :data:`DEFAULT_METRIC_KEYS`: known keys only, each name a non-empty
    string or ``None`` (not logged)."""
    keys = _as_mapping("metric_keys", metric_keys)
    unknown = sorted(set(keys) - set(DEFAULT_METRIC_KEYS))
    if unknown:
        raise ConfigurationError(
            f"CurvatureMonitor: unknown metric_keys {unknown}; the keys are "
            f"{', '.join(DEFAULT_METRIC_KEYS)}."
        )
    merged: dict[str, str | None] = {**DEFAULT_METRIC_KEYS, **keys}
    for name, key in merged.items():
        if key is not None and (not isinstance(key, str) or not key):
            raise ConfigurationError(
                f"CurvatureMonitor: metric_keys[{name!r}] must be a non-empty string or "
                f"null; got {key!r}."
            )
    return merged


# ------------------------------------------------------------------------------ config settings

#: Settings whose ``null`` in a config is a value, not "unset" (``jsonl: null``: no records file).
#: For every other setting ``null`` means the monitor's default, as ``curvature/base.yaml`` lists.
NULL_IS_A_VALUE: frozenset[str] = frozenset({"jsonl"})


def is_unset(key: str, value: Any) -> bool:
    """Whether a config's ``curvature.<key>`` leaves the monitor's default in place."""
    return value is None and key not in NULL_IS_A_VALUE


def _plain_settings(value: Any) -> dict[str, Any]:
    """A config's ``curvature`` group as a plain dict."""
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
    ``curvature`` group with ``overrides`` on top, unset ones (``null``, but for ``jsonl``:
    :func:`is_unset`) dropped so the signature's default applies, ``{_target_: ...}``
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
