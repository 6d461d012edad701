"""What the checkpoint commands (``estimate``, ``compare``, ``density``) share: their load
options (checkpoint, model, data, device, output), the estimator flags made from the backends'
option declarations, ``--backend``, and the two shared steps, the settings and the loaded
checkpoint (:func:`command_settings`, :func:`load_problem`). Parsing only: nothing here computes
or prints results.
"""

from __future__ import annotations

import contextlib
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click
import torch

from deconcnn_curvature._seeds import SEED_LIMIT
from deconcnn_curvature.backend import HOST_ARGUMENTS, Backend, Option
from deconcnn_curvature.checkpoints import (
    LOSSES,
    TRUST_FLAG,
    LoadedCheckpoint,
    UntrustedCheckpointWarning,
    checkpoint_settings,
    open_checkpoint,
    parse_key_values,
)
from deconcnn_curvature.checkpoints.data import DATA_SOURCES
from deconcnn_curvature.errors import (
    ConfigurationError,
    InvalidOptionError,
    UnknownBackendError,
    UnsupportedQuantityError,
)
from deconcnn_curvature.registry import ENV_BACKEND, Flag, builtin_flags, get_registry

__all__ = ["resolve_device"]

F = Callable[..., Any]

#: The estimator flags (``--num-hvps``, ``--rtol``, ``-k``), made from the built-in
#: backends' option declarations (:func:`deconcnn_curvature.registry.builtin_flags`): type, bounds
#: and help come from the :class:`Option`; each flag sets the selected backend's option
#: (:meth:`Flag.target`; ``--num-hvps`` its budget option). Any other option: ``-o name=value``.
FLAGS: Mapping[str, Flag] = builtin_flags()


# --------------------------------------------------------------------------------------------
# parsing


def resolve_device(text: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    value = text.strip().lower()
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", value)
    if match is None:
        raise ConfigurationError(f"--device must be auto, cpu, cuda or cuda:N, got {text!r}.")
    if not torch.cuda.is_available():
        raise ConfigurationError(
            f"--device {text}: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
            "use --device cpu or --device auto."
        )
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigurationError(
            f"--device {text}: only {count} CUDA device(s) are visible (cuda:0 to "
            f"cuda:{count - 1})."
        )
    return torch.device("cuda", index)


def _parse_shape(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        shape = tuple(int(part) for part in value.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise click.BadParameter(
            f"use positive integers separated by commas, e.g. 3,32,32 (got {value!r})."
        )
    return shape


def _param(flag: Flag) -> str:
    """The Python name under which Click passes a generated flag's value."""
    return f"flag_{flag.dest}"


def estimator_values(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Take the estimator options (:func:`estimator_options`) out of a command's ``params``:
    ``{flag: value}`` for the flags the user gave, and the ``-o name=value`` options."""
    values = {flag: params.pop(_param(spec)) for flag, spec in FLAGS.items()}
    extra = parse_key_values(params.pop("extra_options"), "-o/--option")
    return {flag: value for flag, value in values.items() if value is not None}, extra


def option_targets(
    cls: type[Backend], quantity: str, flags: Mapping[str, Any], extra: Mapping[str, Any]
) -> list[tuple[str, str, Any]]:
    """``(option name, how the user gave it, value)`` for ``cls`` and ``quantity``: each flag
    set on the option it maps to for this backend (``--num-hvps``: its budget option), each
    ``-o name=value`` on ``name``."""
    given = [(FLAGS[flag].target(cls, quantity), flag, value) for flag, value in flags.items()]
    return given + [(name, f"-o {name}", value) for name, value in extra.items()]


def host_argument(flag: str, name: str) -> str:
    """What ``-o seed=...`` (a host argument given as a backend option) is told."""
    fix = "use --seed" if name == "seed" else "the command line measures in one process"
    return f"{flag}: {name!r} is not a backend option but an argument of the host; {fix}."


def backend_options(
    cls: type[Backend],
    quantity: str,
    flags: Mapping[str, Any],
    extra: Mapping[str, Any],
    *,
    strict: bool = True,
) -> tuple[dict[str, Any], list[str]]:
    """Options for ``cls`` and ``quantity`` from the flags the user gave.

    A flag the backend does not declare for ``quantity`` is an error (``strict``) or, for
    ``compare``, dropped and named in the returned list.
    """
    applicable = sorted(n for n in cls.option_map() if cls.applies(n, quantity))
    opts: dict[str, Any] = {}
    dropped: list[str] = []
    for name, flag, value in option_targets(cls, quantity, flags, extra):
        if not cls.applies(name, quantity):
            if not strict:
                dropped.append(flag)
                continue
            if name in HOST_ARGUMENTS:
                raise InvalidOptionError(host_argument(flag, name))
            raise InvalidOptionError(
                f"{flag} does not apply to quantity {quantity!r} with backend {cls.name!r}; its "
                f"options for {quantity} are: {', '.join(applicable) or '(none)'} (set them with "
                "-o name=value). Drop the flag or choose another backend."
            )
        if name in opts:
            raise InvalidOptionError(f"option {name!r} is given twice ({flag} and its shortcut).")
        opts[name] = value
    return opts, dropped


def load_options(func: F) -> F:
    """The options every checkpoint command shares (model, data, device, output)."""
    options = [
        click.argument("checkpoint", type=click.Path(path_type=Path)),
        click.option(
            "--model",
            metavar="MODULE:FACTORY",
            help="Build the network with this callable (for checkpoints that do not describe "
            "their model, e.g. a plain state dict). The current directory is importable.",
        ),
        click.option(
            "--model-arg",
            "model_args",
            multiple=True,
            metavar="KEY=VALUE",
            help="Keyword argument of the --model factory (int, float, true/false or text); "
            "repeatable.",
        ),
        click.option(
            "--loss",
            type=click.Choice(sorted(LOSSES)),
            help="Mean-reduced loss (default: cross_entropy; mse uses one-hot targets).",
        ),
        click.option(
            "--data",
            type=click.Choice(DATA_SOURCES),
            help="synthetic: random N(0,1) inputs; synthetic-cifar: the reference run's "
            "synthetic images; cifar10: a local CIFAR-10 folder (--data-root). Default: the "
            "data the checkpoint records.",
        ),
        click.option(
            "--data-root",
            type=click.Path(path_type=Path, file_okay=False),
            help="Folder holding cifar-10-batches-py/ (or that folder itself).",
        ),
        click.option(
            "--input-shape",
            callback=_parse_shape,
            metavar="C,H,W",
            help="Shape of one input for --data synthetic  [default: 3,32,32]",
        ),
        click.option(
            "--num-classes",
            type=click.IntRange(min=2),
            help="Classes of the data (default: the model's number of outputs).",
        ),
        click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True),
        click.option(
            "--num-batches",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Batches averaged into the loss whose Hessian is measured.",
        ),
        click.option(
            "--seed",
            type=click.IntRange(min=0, max=SEED_LIMIT - 1),
            default=0,
            show_default=True,
            help="Seeds the probe vectors (and --data synthetic).",
        ),
        click.option(
            "--device",
            default="auto",
            show_default=True,
            metavar="auto|cpu|cuda|cuda:N",
            help="Where to compute; auto picks CUDA when a GPU is visible.",
        ),
        click.option(
            "--trust-checkpoint",
            "trust_checkpoint",
            is_flag=True,
            help="Unpickle the checkpoint in full (torch.load weights_only=False): code pickled "
            "in it runs. Only for files you trust; without it, a checkpoint holding more than "
            "tensors and plain values is refused.",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON."),
        click.option("--quiet", is_flag=True, help="No progress display, no notes."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _click_type(option: Option) -> Any:
    """The Click type of a declared option: its choices, or its type with its bounds."""
    if option.choices is not None and option.type is str:
        return click.Choice([str(c) for c in option.choices])
    bounded = option.min is not None or option.max is not None
    if option.type is int and bounded:
        return click.IntRange(option.min, option.max, min_open=option.min_exclusive)
    if option.type is float and bounded:
        return click.FloatRange(option.min, option.max, min_open=option.min_exclusive)
    known = {int: click.INT, float: click.FLOAT, bool: click.BOOL}
    return known.get(option.type, click.STRING)


def _flag_help(flag: Flag) -> str:
    option = flag.option
    if flag.budget:
        return f"HVP budget: sets the backend's budget option ({option.help})."
    return f"{option.help} (backend option {option.name})."


def _flag_option(flag: Flag) -> Callable[[F], F]:
    """The Click option of a generated flag: type, bounds and help from the declarations."""
    return click.option(
        flag.flag, _param(flag), type=_click_type(flag.option), help=_flag_help(flag)
    )


def estimator_options(func: F) -> F:
    options = [
        *(_flag_option(flag) for flag in FLAGS.values()),
        click.option(
            "-o",
            "--option",
            "extra_options",
            multiple=True,
            metavar="NAME=VALUE",
            help="Any other backend option (see `deconcnn-curv list-backends --json`); repeatable.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _backend_from_env(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """A name taken from $DECONCNN_CURVATURE_BACKEND that names no backend: Click's message
    names the variable, so the user knows where the bad value comes from."""
    source = ctx.get_parameter_source(param.name or "backend")
    if value is not None and source is click.core.ParameterSource.ENVIRONMENT:
        try:
            get_registry().get(value)
        except UnknownBackendError as exc:
            raise click.BadParameter(f"{exc} Unset or fix ${ENV_BACKEND}.") from exc
    return value


def backend_option(func: F) -> F:
    return click.option(
        "-b",
        "--backend",
        envvar=ENV_BACKEND,
        show_envvar=True,
        callback=_backend_from_env,
        help="Backend name (see `deconcnn-curv list-backends`); default: pyhessian.",
    )(func)


# --------------------------------------------------------------------------------------------
# shared steps


def command_settings(
    *,
    model: str | None,
    model_args: tuple[str, ...],
    loss: str | None,
    data: str | None,
    data_root: Path | None,
    input_shape: tuple[int, ...] | None,
    num_classes: int | None,
    batch_size: int,
    num_batches: int,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    return checkpoint_settings(
        model=model,
        model_args=parse_key_values(model_args, "--model-arg"),
        loss=loss,
        data=data,
        data_root=data_root,
        input_shape=input_shape,
        num_classes=num_classes,
        batch_size=batch_size,
        num_batches=num_batches,
        seed=seed,
        device=str(device),
    )


def load_problem(
    path: Path, settings: Mapping[str, Any], device: torch.device, trust: bool = False
) -> LoadedCheckpoint:
    if trust:  # the one-line warning; the library's own warning is not repeated
        click.echo(
            f"Warning: {TRUST_FLAG}: {path} is unpickled in full, so any code pickled in it "
            "runs; use this only for files from a source you trust.",
            err=True,
        )
    # A --model factory or a checkpoint loader that prints must not corrupt --json on stdout.
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrustedCheckpointWarning)
        loaded = open_checkpoint(path, settings, manager=get_registry().manager, trust=trust)
    try:
        loaded.model.to(device)
    except Exception as exc:
        raise ConfigurationError(
            f"cannot move the model to {device}: {type(exc).__name__}: {exc}"
        ) from exc
    return loaded


def check_quantity_known(quantity: str) -> None:
    registry = get_registry()
    if not registry.supporting(quantity):
        known = sorted({q for n in registry.names() for q in registry.entries[n].cls.quantities})
        raise UnsupportedQuantityError(
            f"unknown quantity {quantity!r}; registered backends compute: {', '.join(known)}."
        )
