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
from deconcnn_curvature.backend import Backend, Plan, plan_calls
from deconcnn_curvature.checkpoints import (
    DEFAULT_SETTINGS,
    TRUST_FLAG,
    LoadedCheckpoint,
    UntrustedCheckpointWarning,
    checkpoint_settings,
    open_checkpoint,
    parse_key_values,
)
from deconcnn_curvature.checkpoints.data import DATA_SOURCES
from deconcnn_curvature.defaults import OFFLINE, declared, default
from deconcnn_curvature.errors import (
    ConfigurationError,
    UnknownBackendError,
    UnsupportedQuantityError,
)
from deconcnn_curvature.losses import DEFAULT_LOSS, LOSSES, ONE_HOT_LOSSES
from deconcnn_curvature.registry import ENV_BACKEND, get_registry

__all__ = ["resolve_device"]

F = Callable[..., Any]

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


class SeedType(click.ParamType):
    """A seed: an integer with 0 ≤ seed < 2**63 (said so, not as 0<=x<=9223372036854775807)."""

    name = "seed"

    def get_metavar(self, param: click.Parameter, *args: Any, **kwargs: Any) -> str:
        return "SEED"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            number = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not an integer; use 0 ≤ seed < 2**63.", param, ctx)
        if not 0 <= number < SEED_LIMIT:
            self.fail(f"{value} is not in 0 ≤ seed < 2**63.", param, ctx)
        return number


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


#: How the command line spells the router's settings in its messages.
LABELS: Mapping[str, str] = {"num_hvps": "--num-hvps", "rtol": "--rtol", "k": "-k"}


def cli_host_hint(name: str) -> str:
    """How a command-line user sets a host argument given as ``-o NAME=...``."""
    if name == "seed":
        return "use --seed"
    if name == "eval_mode":
        return "the command line measures in eval mode"
    return "the command line measures in one process"


def estimator_settings(params: dict[str, Any]) -> dict[str, Any]:
    """Take the estimator options (:func:`estimator_options`) out of a command's ``params``:
    ``num_hvps``, ``rtol``, ``k`` (``None``: not given) and the ``-o name=value`` options."""
    settings = {name: params.pop(name) for name in ("num_hvps", "rtol", "k")}
    settings["options"] = parse_key_values(params.pop("extra_options"), "-o/--option")
    return settings


def plan_options(
    cls: type[Backend], quantity: str, settings: Mapping[str, Any], *, strict: bool = True
) -> Plan:
    """The one call for ``cls`` and ``quantity`` from the command line's settings, routed by
    :func:`~deconcnn_curvature.backend.plan_calls` (``--num-hvps`` to the backend's budget
    option, ``-k`` to ``k``, ...). A setting the backend does not take for ``quantity`` is an
    error (``strict``) or, for ``compare``, named in :attr:`Plan.unused`."""
    return plan_calls(
        cls,
        [quantity],
        **settings,
        labels=LABELS,
        option_label="-o {}",
        host_hint=cli_host_hint,
        strict=strict,
    )


def load_options(func: F) -> F:
    """The options every checkpoint command shares (model, data, device, output)."""
    options = [
        click.argument("checkpoint", type=click.Path(path_type=Path)),
        *_model_and_data_options(),
        *_run_options(),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _model_and_data_options() -> list[Callable[[F], F]]:
    return [
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
            type=click.Choice(list(LOSSES)),
            help=f"Mean-reduced loss (default: {DEFAULT_LOSS}; "
            f"{' and '.join(sorted(ONE_HOT_LOSSES))} use one-hot targets).",
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
            help="Shape of one input for --data synthetic  [default: "
            + ",".join(map(str, default("input_shape", OFFLINE)))
            + "]",
        ),
        click.option(
            "--num-classes",
            type=click.IntRange(min=2),
            help="Classes of the data (default: the model's number of outputs).",
        ),
    ]


def _run_options() -> list[Callable[[F], F]]:
    return [
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=DEFAULT_SETTINGS["batch_size"],
            show_default=True,
            help="Samples per batch.",
        ),
        click.option(
            "--num-batches",
            type=click.IntRange(min=1),
            default=DEFAULT_SETTINGS["num_batches"],
            show_default=True,
            help="Batches averaged into the loss whose Hessian is measured.",
        ),
        click.option(
            "--seed",
            type=SeedType(),
            default=DEFAULT_SETTINGS["seed"],
            show_default=True,
            help="Seeds the probe vectors (and --data synthetic); 0 ≤ seed < 2**63.",
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


def _budget_default() -> str:
    """What ``--num-hvps`` defaults to, read from the built-in backends' declarations."""
    said = ", ".join(f"{name} {value}" for name, value in declared("num_hvps").items())
    return f"the backend's own: {said}"


def estimator_options(func: F) -> F:
    """``--num-hvps``, ``--rtol``, ``-k`` and ``-o NAME=VALUE``; each backend checks its own
    bounds (hutchpp needs at least 5 products) in one line."""
    options = [
        click.option(
            "--num-hvps",
            type=click.IntRange(min=1),
            show_default=_budget_default(),
            help="HVP budget of the trace, under the backend's own budget option (see "
            "`list-backends --json`); the most spent when --rtol is set.",
        ),
        click.option(
            "--rtol",
            type=click.FloatRange(min=0, min_open=True),
            show_default="off: spend the whole budget",
            help="Target relative error of the trace: stop once the confidence interval's "
            "half-width is at most rtol·|trace|.",
        ),
        click.option(
            "-k",
            "k",
            type=click.IntRange(min=1),
            show_default="1, the backend's own",
            help="Number of top eigenvalues (-q eigenvalues).",
        ),
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
