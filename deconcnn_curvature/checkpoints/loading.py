"""Turning a checkpoint file into a curvature problem: a model, a loss and batches of data.

:func:`open_checkpoint` reads the file once (``torch.load`` on the CPU, ``weights_only=True``
unless the caller trusts the file: see :func:`read_checkpoint`) and asks the
``load_checkpoint`` hook (:mod:`deconcnn_curvature.hookspecs`) for a :class:`LoadedCheckpoint`.
Plugins are asked first. Two loaders are built in, both registered through that public hook:

1. **Checkpoints of the reference training run** (:class:`deconcnn_curvature.training.module.
   ClassificationModule`, written by Lightning): :mod:`deconcnn_curvature.training.reference`,
   a built-in plugin that lives with the training run (this module never imports it). The model
   is rebuilt from the saved ``hyper_parameters`` (``model_name``, ``model_kwargs``), torch only.
2. **Anything else with a model factory** (``model="package.module:factory"`` plus
   ``model_args``), this module's own implementation, registered ``trylast``: a plain state dict,
   or a checkpoint holding one under ``state_dict`` (Lightning) or ``model_state_dict``. Prefixes
   such as ``model.`` or ``net.`` (the LightningModule attribute holding the network) or
   ``module.`` (DistributedDataParallel) are stripped when the keys then fit the model exactly.

Both finish with :func:`loaded_checkpoint`: the loss is cross-entropy unless ``loss`` is set, and
the data come from the saved data configuration (``datamodule_hyper_parameters``, which Lightning
writes when the data module saves its hyper-parameters, a ``data`` entry of the module's
hyper-parameters, or the ``data`` section of the ``config.yaml`` that ``deconcnn-curv train``
writes next to ``last.ckpt``) unless ``data`` is set.

``settings`` (see :data:`DEFAULT_SETTINGS`) carry the command line's choices: data source and
shape, batch size and count, seed, model factory and arguments, loss.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from deconcnn_curvature._seeds import check_seed
from deconcnn_curvature.checkpoints.data import DATA_SOURCES, DataSpec, build_batches
from deconcnn_curvature.checkpoints.reading import (
    CheckpointError,
    UntrustedCheckpointError,
    describe_error,
    read_torch_file,
)
from deconcnn_curvature.errors import ConfigurationError, CurvatureError, PluginError
from deconcnn_curvature.hookspecs import hookimpl
from deconcnn_curvature.plugins import reraise_interrupt
from deconcnn_curvature.problem import LoadedCheckpoint, preserve_state

__all__ = [
    "DEFAULT_SETTINGS",
    "LOSSES",
    "LoadedCheckpoint",
    "call_repr",
    "checkpoint_settings",
    "import_factory",
    "load_checkpoint",
    "load_weights",
    "loaded_checkpoint",
    "open_checkpoint",
    "parse_key_values",
    "parse_value",
    "reference_checkpoint",
]

#: Loss names accepted by ``--loss`` → mean-reduced loss classes.
LOSSES: Mapping[str, Callable[[], nn.Module]] = MappingProxyType(
    {"cross_entropy": nn.CrossEntropyLoss, "mse": nn.MSELoss}
)

#: Every setting the loaders receive, with its default. ``None`` means "not given": the loader
#: decides (from the checkpoint where it can, otherwise the documented fallback).
DEFAULT_SETTINGS: Mapping[str, Any] = MappingProxyType(
    {
        "batch_size": 128,
        "num_batches": 1,
        "data": None,  # one of checkpoints.data.DATA_SOURCES
        "data_root": None,  # CIFAR-10 folder
        "seed": 0,
        "model": None,  # "package.module:factory"
        "model_args": {},
        "loss": None,  # a key of LOSSES
        "device": "cpu",
        "input_shape": None,  # tuple of ints; default (3, 32, 32)
        "num_classes": None,  # default: the model's number of outputs
    }
)

_DATA_HINT = (
    "--data synthetic-cifar (the reference run's synthetic images), --data cifar10 --data-root "
    "DIR, or --data synthetic (random inputs)"
)


# --------------------------------------------------------------------------------------------
# settings and small parsers


def parse_value(text: str) -> int | float | bool | str:
    """``"3"`` → 3, ``"0.5"`` → 0.5, ``"true"``/``"false"`` (any case) → bool, else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def parse_key_values(items: Any, what: str = "--model-arg") -> dict[str, Any]:
    """Parse ``["width=4", "norm_type=none"]`` into ``{"width": 4, "norm_type": "none"}``."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ConfigurationError(
                f"{what} must look like key=value with a Python identifier as key, got {item!r}."
            )
        if key in out:
            raise ConfigurationError(f"{what} {key!r} is given twice.")
        out[key] = parse_value(value)
    return out


def checkpoint_settings(**given: Any) -> dict[str, Any]:
    """:data:`DEFAULT_SETTINGS` updated with ``given``, validated (raises ConfigurationError)."""
    unknown = sorted(set(given) - set(DEFAULT_SETTINGS))
    if unknown:
        raise ConfigurationError(
            f"unknown checkpoint setting(s) {', '.join(unknown)}; known: "
            f"{', '.join(DEFAULT_SETTINGS)}."
        )
    s = {**DEFAULT_SETTINGS, **given}
    s["model_args"] = dict(s["model_args"] or {})
    for name in ("batch_size", "num_batches"):
        if isinstance(s[name], bool) or not isinstance(s[name], int) or s[name] < 1:
            raise ConfigurationError(f"{name} must be an integer >= 1, got {s[name]!r}.")
    s["seed"] = check_seed(s["seed"])
    if s["data"] is not None and s["data"] not in DATA_SOURCES:
        raise ConfigurationError(
            f"unknown data source {s['data']!r}; use one of {', '.join(DATA_SOURCES)}."
        )
    if s["loss"] is not None and s["loss"] not in LOSSES:
        raise ConfigurationError(f"unknown loss {s['loss']!r}; use one of {', '.join(LOSSES)}.")
    if s["input_shape"] is not None:
        s["input_shape"] = tuple(s["input_shape"])
    if s["data_root"] is not None:
        s["data_root"] = Path(s["data_root"])
    return s


#: Why open_checkpoint could not read the file it hands to the hook (the built-in loader's
#: message says it without reading the file again).
_READ_FAILURE: contextvars.ContextVar[tuple[Path, str] | None] = contextvars.ContextVar(
    "deconcnn_curvature_read_failure", default=None
)


def _hook_caller(manager: Any) -> Any:
    if manager is None:
        from deconcnn_curvature.registry import get_registry

        manager = get_registry().manager
    return manager.hook.load_checkpoint


def open_checkpoint(
    path: str | os.PathLike[str],
    settings: Mapping[str, Any] | None = None,
    *,
    manager: Any = None,
    trust: bool = False,
) -> LoadedCheckpoint:
    """Read ``path`` and turn it into a :class:`LoadedCheckpoint` through the ``load_checkpoint``
    hook (plugins first, the built-in loaders last).

    ``settings`` are completed with :func:`checkpoint_settings`; ``manager`` is a pluggy plugin
    manager (default: the registry's). The file is read once, as :func:`read_checkpoint` says:
    a checkpoint pickling objects beyond tensors and plain values raises
    :class:`UntrustedCheckpointError` unless ``trust=True``. Every failure is a
    :class:`CurvatureError` whose message says what to change.
    """
    path = Path(path).expanduser()
    resolved = checkpoint_settings(**dict(settings or {}))
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist.")
    checkpoint, failure = read_torch_file(path, trust)
    if failure is not None and failure.refused:
        raise UntrustedCheckpointError(failure.reason)
    if failure is not None and failure.oversized:
        raise CheckpointError(failure.reason)
    hook = _hook_caller(manager)
    token = _READ_FAILURE.set((path, failure.reason) if failure is not None else None)
    try:
        loaded = hook(path=path, checkpoint=checkpoint, settings=MappingProxyType(resolved))
    except CurvatureError:
        raise
    except BaseException as exc:  # a plugin's sys.exit() too; never the user's Ctrl-C
        reraise_interrupt(exc)
        implementers = [impl.plugin_name for impl in hook.get_hookimpls()]
        raise PluginError(
            f"loading {path} failed inside a load_checkpoint hook (implemented by "
            f"{', '.join(implementers)}): {describe_error(exc)}"
        ) from exc
    finally:
        _READ_FAILURE.reset(token)
    if not isinstance(loaded, LoadedCheckpoint):
        raise PluginError(
            f"a load_checkpoint hook returned {type(loaded).__name__} for {path}; it must return "
            "a deconcnn_curvature.checkpoints.LoadedCheckpoint or None."
        )
    return loaded


# --------------------------------------------------------------------------------------------
# models


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    # Like `python -m` and uvicorn: a module in the current directory can be named directly.
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def import_factory(spec: str) -> Callable[..., Any]:
    """Import ``"package.module:factory"`` (the current directory is searched too)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name.strip() or not attr.strip():
        raise ConfigurationError(
            f"--model must look like package.module:factory (a module path, a colon, a callable "
            f"that returns the torch.nn.Module), got {spec!r}."
        )
    try:
        with _cwd_on_path():
            obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigurationError(
            f"--model {spec}: cannot import module {module_name!r} ({describe_error(exc)}); "
            "check the name, and that it is installed or in the current directory."
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigurationError(
                f"--model {spec}: module {module_name!r} has no attribute {attr!r}."
            ) from None
    if not callable(obj):
        raise ConfigurationError(f"--model {spec}: {attr!r} is not callable.")
    return obj


def call_repr(name: str, kwargs: Mapping[str, Any]) -> str:
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"


def _build_from_factory(spec: str, kwargs: Mapping[str, Any]) -> nn.Module:
    factory = import_factory(spec)
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise CheckpointError(
            f"{call_repr(spec, kwargs)} failed: {describe_error(exc)}; fix --model-arg."
        ) from exc
    if not isinstance(model, nn.Module):
        raise CheckpointError(
            f"{call_repr(spec, kwargs)} returned {type(model).__name__}, not a torch.nn.Module."
        )
    return model


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _find_state_dict(checkpoint: Mapping[str, Any], path: Path) -> tuple[Mapping[str, Any], str]:
    if _is_state_dict(checkpoint):
        return checkpoint, "state dict"
    for key in ("state_dict", "model_state_dict"):
        if _is_state_dict(checkpoint.get(key)):
            return checkpoint[key], f"{key!r} entry"
    keys = ", ".join(map(str, list(checkpoint)[:8])) or "(none)"
    raise CheckpointError(
        f"{path} holds no state dict: expected a mapping of parameter names to tensors, or a "
        f"checkpoint with one under 'state_dict' (Lightning) or 'model_state_dict'; its top-level "
        f"keys are: {keys}."
    )


_PREFIXES = ("", "model.", "module.", "model.module.", "_orig_mod.", "model._orig_mod.")


def _submodule_prefixes(state: Mapping[str, Any]) -> tuple[str, ...]:
    """``"net."`` and the like: the first name of the keys, tried after :data:`_PREFIXES`, for a
    LightningModule that holds the network ``--model`` builds as ``self.net`` (the weights load
    only if the stripped keys are exactly the model's)."""
    firsts = {str(k).partition(".")[0] + "." for k in state if "." in str(k)}
    return tuple(sorted(firsts - set(_PREFIXES)))


def _few(names: Any, n: int = 4) -> str:
    names = sorted(names)
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def load_weights(
    model: nn.Module, state: Mapping[str, Any], where: str, prefixes: tuple[str, ...], fix: str
) -> str:
    """Load ``state`` into ``model`` strictly, after stripping the first prefix that fits."""
    expected = model.state_dict()
    best: tuple[int, str, dict[str, Any]] | None = None
    for prefix in prefixes:
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if set(sub) == set(expected):
            wrong = [
                f"{k} {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                for k, v in sub.items()
                if tuple(v.shape) != tuple(expected[k].shape)
            ]
            if wrong:
                raise CheckpointError(
                    f"the weights in {where} do not fit the model: shape mismatch for "
                    f"{_few(wrong, 3)}; {fix}."
                )
            try:
                model.load_state_dict(sub, strict=True)
            except Exception as exc:
                raise CheckpointError(
                    f"loading the weights of {where} failed: {describe_error(exc)}; {fix}."
                ) from exc
            return prefix
        overlap = len(set(sub) & set(expected))
        if best is None or overlap > best[0]:
            best = (overlap, prefix, sub)
    assert best is not None
    _, prefix, sub = best
    missing, unexpected = set(expected) - set(sub), set(sub) - set(expected)
    parts = []
    if missing:
        parts.append(f"missing {_few(missing)}")
    if unexpected:
        parts.append(f"unexpected {_few(unexpected)}")
    stripped = f" (after stripping prefix {prefix!r})" if prefix else ""
    raise CheckpointError(
        f"the weights in {where} do not fit the model{stripped}: {'; '.join(parts)}; {fix}."
    )


# --------------------------------------------------------------------------------------------
# data


def _is_data_config(candidate: Any) -> bool:
    return isinstance(candidate, Mapping) and candidate.get("source") in ("synthetic", "cifar10")


def _saved_data_config(checkpoint: Mapping[str, Any], path: Path) -> Mapping[str, Any] | None:
    """The data configuration of the run that wrote ``path``, if anything records it.

    Looked for, in order: ``datamodule_hyper_parameters`` (Lightning writes it when the data
    module saved its hyper-parameters), a ``data`` entry of the module's hyper-parameters, and the
    ``data`` section of a ``config.yaml`` next to the checkpoint (the run folder of
    ``deconcnn-curv train``).
    """
    hparams = checkpoint.get("hyper_parameters")
    for candidate in (
        checkpoint.get("datamodule_hyper_parameters"),
        hparams.get("data") if isinstance(hparams, Mapping) else None,
    ):
        if _is_data_config(candidate):
            return candidate
    config = path.parent / "config.yaml"
    if not config.is_file():
        return None
    try:
        import yaml
    except ImportError:  # PyYAML comes with the lightning extra; without it, ask for --data
        return None
    try:
        data = (yaml.safe_load(config.read_text()) or {}).get("data")
    except Exception as exc:
        raise CheckpointError(
            f"cannot read the run configuration {config} ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())}); fix it, or pass --data to say which data to "
            "measure on."
        ) from exc
    return data if _is_data_config(data) else None


def _data_spec(
    settings: Mapping[str, Any],
    saved: Mapping[str, Any] | None,
    num_classes: int,
    loss: str,
) -> DataSpec:
    source = settings["data"]
    seed = settings["seed"]
    root = settings["data_root"]
    noise_std = 0.25
    if saved is not None:
        saved_source = "synthetic-cifar" if saved["source"] == "synthetic" else "cifar10"
        if source is None or source == saved_source:
            source = saved_source
            if source == "synthetic-cifar":
                seed = int(saved.get("seed", 0))
                noise_std = float(saved.get("synthetic_noise_std", noise_std))
            if root is None and saved.get("root") is not None:
                root = Path(saved["root"])
    if source is None:
        raise CheckpointError(f"nothing says which data to measure on; pass {_DATA_HINT}.")
    shape = settings["input_shape"] or (3, 32, 32)
    return DataSpec(
        source=source,
        batch_size=settings["batch_size"],
        num_batches=settings["num_batches"],
        input_shape=tuple(shape),
        num_classes=num_classes,
        seed=seed,
        root=root,
        noise_std=noise_std,
        one_hot=loss == "mse",
    )


def _output_width(model: nn.Module, input_shape: tuple[int, ...], what: str) -> int:
    """Logits per sample, from one forward pass on two zero inputs (eval mode, state restored);
    turns a shape mistake into an error naming the option that fixes it."""
    inputs = torch.zeros(2, *input_shape)
    try:
        with preserve_state(model), torch.no_grad():
            out = model(inputs)
    except Exception as exc:
        raise CheckpointError(
            f"{what} fails on inputs of shape {','.join(map(str, input_shape))}: "
            f"{describe_error(exc)}; pass --input-shape (e.g. 3,32,32) matching the model."
        ) from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        got = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CheckpointError(
            f"{what} returns {got} per sample; a classifier must return one row of logits per "
            "sample, shape (batch, classes)."
        )
    return int(out.shape[1])


# --------------------------------------------------------------------------------------------
# the built-in loader


def _not_rebuildable(path: Path, checkpoint: Mapping[str, Any]) -> CheckpointError:
    hparams = checkpoint.get("hyper_parameters")
    if isinstance(hparams, Mapping):
        what = (
            "a Lightning checkpoint whose hyper_parameters ("
            + (", ".join(map(str, hparams)) or "none")
            + ") do not name a model of the reference run (model_name, model_kwargs)"
        )
    elif _is_state_dict(checkpoint):
        what = f"a bare state dict ({len(checkpoint)} tensors) with no model description"
    else:
        keys = ", ".join(map(str, list(checkpoint)[:8])) or "none"
        what = f"a checkpoint (top-level keys: {keys}) without a model description"
    return CheckpointError(
        f"cannot rebuild the model of {path}: it is {what}. Pass --model package.module:factory "
        "(and --model-arg key=value for its arguments) to name the network."
    )


def reference_checkpoint(checkpoint: Any) -> bool:
    """Whether ``checkpoint`` looks like one of the reference run's Lightning checkpoints
    (``hyper_parameters.model_name`` and a ``state_dict``)."""
    if not isinstance(checkpoint, Mapping):
        return False
    hparams = checkpoint.get("hyper_parameters")
    return (
        isinstance(hparams, Mapping)
        and isinstance(hparams.get("model_name"), str)
        and isinstance(checkpoint.get("state_dict"), Mapping)
    )


@hookimpl(trylast=True)
def load_checkpoint(
    path: Path, checkpoint: Mapping[str, Any] | None, settings: Mapping[str, Any]
) -> LoadedCheckpoint:
    """The built-in fallback loader: any state dict with ``--model``. Registered last, so every
    plugin (the reference run's loader, ``deconcnn_curvature.training.reference``, included) is
    asked first; never returns ``None``."""
    if checkpoint is None:
        failure = _READ_FAILURE.get()
        reason = failure[1] if failure is not None and failure[0] == path else "unreadable"
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint, or it is truncated ({reason}); pass a file "
            "written by torch.save or a Lightning checkpoint (.ckpt)."
        )
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(checkpoint).__name__}, not a checkpoint; expected a state "
            "dict or a Lightning checkpoint (a dict with 'state_dict')."
        )
    model_spec: str | None = settings["model"]
    if model_spec is None:
        raise _not_rebuildable(path, checkpoint)
    model_args: Mapping[str, Any] = settings["model_args"]
    model = _build_from_factory(model_spec, model_args)
    state, kind = _find_state_dict(checkpoint, path)
    load_weights(
        model,
        state,
        f"{path} ({kind})",
        (*_PREFIXES, *_submodule_prefixes(state)),
        f"check --model {model_spec} and --model-arg",
    )
    return loaded_checkpoint(
        path,
        checkpoint,
        settings,
        model=model,
        description=call_repr(model_spec, model_args),
        loader="builtin:factory",
    )


def loaded_checkpoint(
    path: Path,
    checkpoint: Mapping[str, Any],
    settings: Mapping[str, Any],
    *,
    model: nn.Module,
    description: str,
    loader: str,
) -> LoadedCheckpoint:
    """Complete a loader's work once it has the model with the checkpoint's weights: check the
    model is a classifier of the expected width, pick the loss (``settings["loss"]``, default
    cross-entropy) and build the data (``settings["data"]``, else the data configuration saved
    with the checkpoint)."""
    num_classes = settings["num_classes"]
    metadata: dict[str, Any] = {
        k: checkpoint[k]
        for k in ("epoch", "global_step", "pytorch-lightning_version")
        if isinstance(checkpoint.get(k), int | str)
    }
    loss_name = settings["loss"] or "cross_entropy"
    what = f"the model {description}"
    shape = tuple(settings["input_shape"] or (3, 32, 32))
    width = _output_width(model, shape, what)
    if width < 2:
        raise CheckpointError(
            f"{what} returns {width} output per sample; the command line measures classifiers "
            "(cross-entropy or MSE on one-hot targets over at least 2 classes). For another "
            "model or loss, call deconcnn_curvature.estimate(model, loss_fn, data) from Python."
        )
    if num_classes is not None and num_classes != width:
        raise CheckpointError(
            f"{what} returns {width} logits per sample, but the data should have {num_classes} "
            f"classes; pass --num-classes {width} (or drop it)."
        )
    try:
        saved = _saved_data_config(checkpoint, path)
    except CheckpointError:
        if settings["data"] is None:
            raise
        saved = None  # --data says what to measure on; the unreadable config is not needed
    spec = _data_spec(settings, saved, width, loss_name)
    return LoadedCheckpoint(
        model=model,
        loss_fn=LOSSES[loss_name](),
        data=build_batches(spec),
        loader=loader,
        model_description=description,
        data_description=spec.describe(),
        metadata={**metadata, "loss": loss_name, "data": spec.to_dict()},
    )
