"""``deconcnn-curv estimate | compare | density``: curvature of a saved checkpoint.

Each command loads the checkpoint once through :func:`deconcnn_curvature.checkpoints.
open_checkpoint` (plugins' ``load_checkpoint`` hooks first, then the built-in loaders), moves the
model to ``--device`` and calls :func:`deconcnn_curvature.estimate`; nothing here computes
curvature itself. Package errors become one ``Error: ...`` line and exit code 1; Click's own
checks (out-of-range numbers, unknown choices) exit with 2.
"""

from __future__ import annotations

import contextlib
import math
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import click
import torch
from rich.console import Console
from rich.markup import escape

import deconcnn_curvature as dcc
from deconcnn_curvature._seeds import SEED_LIMIT
from deconcnn_curvature.api import density_options
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
from deconcnn_curvature.cli import cli, console, print_json, user_errors
from deconcnn_curvature.cli._memory import _PeakMemory, _Progress
from deconcnn_curvature.data_sources import DATA_SOURCES
from deconcnn_curvature.errors import (
    ConfigurationError,
    InvalidOptionError,
    UnknownBackendError,
    UnsupportedQuantityError,
)
from deconcnn_curvature.linalg.hutchinson import TraceProgress, trace_progress
from deconcnn_curvature.present import (
    _check_plot_path,
    _compare_table,
    _default_sigma,
    _fmt,
    _fmt_bytes,
    _grid,
    _plot,
    _table,
    _value_rows,
)
from deconcnn_curvature.registry import (
    ENV_BACKEND,
    Flag,
    builtin_flags,
    default_backend_name,
    get_registry,
)
from deconcnn_curvature.results import CurvatureResult, Density

__all__ = ["compare_cmd", "density_cmd", "estimate_cmd", "resolve_device"]

F = Callable[..., Any]

#: [issue 14] The estimator flags (``--num-hvps``, ``--rtol``, ``-k``), made from the built-in
#: backends' option declarations (:func:`deconcnn_curvature.registry.builtin_flags`): type, bounds
#: and help come from the :class:`Option`; each flag sets the selected backend's option
#: (:meth:`Flag.target`; ``--num-hvps`` its budget option). Any other option: ``-o name=value``.
_FLAGS: Mapping[str, Flag] = builtin_flags()


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


def _estimator_values(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Take the estimator options (:func:`_estimator_options`) out of a command's ``params``:
    ``{flag: value}`` for the flags the user gave, and the ``-o name=value`` options."""
    values = {flag: params.pop(_param(spec)) for flag, spec in _FLAGS.items()}
    extra = parse_key_values(params.pop("extra_options"), "-o/--option")
    return {flag: value for flag, value in values.items() if value is not None}, extra


def _targets(
    cls: type[Backend], quantity: str, flags: Mapping[str, Any], extra: Mapping[str, Any]
) -> list[tuple[str, str, Any]]:
    """``(option name, how the user gave it, value)`` for ``cls`` and ``quantity``: each flag
    set on the option it maps to for this backend (``--num-hvps``: its budget option), each
    ``-o name=value`` on ``name``."""
    given = [(_FLAGS[flag].target(cls, quantity), flag, value) for flag, value in flags.items()]
    return given + [(name, f"-o {name}", value) for name, value in extra.items()]


def _host_argument(flag: str, name: str) -> str:
    """What ``-o seed=...`` (a host argument given as a backend option) is told."""
    fix = "use --seed" if name == "seed" else "the command line measures in one process"
    return f"{flag}: {name!r} is not a backend option but an argument of the host; {fix}."


def _backend_options(
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
    for name, flag, value in _targets(cls, quantity, flags, extra):
        if not cls.applies(name, quantity):
            if not strict:
                dropped.append(flag)
                continue
            if name in HOST_ARGUMENTS:
                raise InvalidOptionError(_host_argument(flag, name))
            raise InvalidOptionError(
                f"{flag} does not apply to quantity {quantity!r} with backend {cls.name!r}; its "
                f"options for {quantity} are: {', '.join(applicable) or '(none)'} (set them with "
                "-o name=value). Drop the flag or choose another backend."
            )
        if name in opts:
            raise InvalidOptionError(f"option {name!r} is given twice ({flag} and its shortcut).")
        opts[name] = value
    return opts, dropped


def _load_options(func: F) -> F:
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


def _estimator_options(func: F) -> F:
    options = [
        *(_flag_option(flag) for flag in _FLAGS.values()),
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


def _backend_option(func: F) -> F:
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


def _settings(
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


def _load(
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


def _check_compare_options(
    names: list[str], quantity: str, flags: Mapping[str, Any], extra: Mapping[str, Any]
) -> None:
    """Before any work: an option no compared backend takes for ``quantity`` is a typo, and a
    value every compared backend refuses is a mistake, not rows to discover after loading. A
    value only some refuse (``--num-hvps 3``: Hutch++ needs at least 5) gives those a row with
    the reason, as the help promises."""
    registry = get_registry()
    classes = [registry.get(name) for name in names]
    takes = {  # the backends' options and the host's (eval_mode)
        name for cls in classes for name in cls.option_map() if cls.applies(name, quantity)
    }
    if any(cls.budget_option(quantity) for cls in classes):
        takes.add("num_hvps")  # --num-hvps: each backend's declared budget option
    taken = {
        label
        for cls in classes
        for name, label, _ in _targets(cls, quantity, flags, extra)
        if cls.applies(name, quantity)
    }
    unknown = [label for _, label, _ in _targets(classes[0], quantity, flags, extra)]
    unknown = [label for label in unknown if label not in taken]
    host = [name for name in extra if name in HOST_ARGUMENTS and f"-o {name}" in unknown]
    if host:
        raise InvalidOptionError(_host_argument(f"-o {host[0]}", host[0]))
    if unknown:
        raise InvalidOptionError(
            f"{', '.join(unknown)}: no compared backend ({', '.join(names)}) takes this option "
            f"for {quantity!r}; their options are: {', '.join(sorted(takes)) or '(none)'}."
        )
    refused: list[str] = []
    for cls in classes:
        opts, _ = _backend_options(cls, quantity, flags, extra, strict=False)
        try:
            cls.resolve_options(quantity, opts)
        except InvalidOptionError as exc:
            refused.append(f"{cls.name}: {exc}")
    if refused and len(refused) == len(classes):
        raise InvalidOptionError("no compared backend accepts these options: " + " ".join(refused))


def _check_quantity_known(quantity: str) -> None:
    registry = get_registry()
    if not registry.supporting(quantity):
        known = sorted({q for n in registry.names() for q in registry.entries[n].cls.quantities})
        raise UnsupportedQuantityError(
            f"unknown quantity {quantity!r}; registered backends compute: {', '.join(known)}."
        )


def _header(out: Console, path: Path, loaded: LoadedCheckpoint, device: torch.device) -> None:
    meta = loaded.metadata
    when = ", ".join(f"{k} {meta[k]}" for k in ("epoch", "global_step") if k in meta)
    out.print(f"[bold]checkpoint[/bold] {escape(str(path))}" + (f" ({when})" if when else ""))
    out.print(f"[bold]model[/bold]      {escape(loaded.model_description)}")
    out.print(f"[bold]data[/bold]       {escape(loaded.data_description)}")
    out.print(f"[bold]device[/bold]     {device}")


# --------------------------------------------------------------------------------------------
# estimate


@cli.command("estimate")
@_load_options
@_backend_option
@click.option(
    "-q",
    "--quantity",
    default="trace",
    show_default=True,
    help="trace, eigenvalues, density, layer_trace, diagonal (what the backend computes).",
)
@_estimator_options
@user_errors
def estimate_cmd(
    checkpoint: Path,
    backend: str | None,
    quantity: str,
    as_json: bool,
    quiet: bool,
    device: str,
    **load: Any,
) -> None:
    """Measure one curvature quantity of a saved CHECKPOINT with one backend.

    \b
    deconcnn-curv estimate runs/demo/last.ckpt -q eigenvalues -k 3
    deconcnn-curv estimate weights.pt --model mypkg.nets:small_cnn --model-arg width=8 \\
        --data cifar10 --data-root ~/data --num-hvps 200 --json
    """
    dev = resolve_device(device)
    trust = load.pop("trust_checkpoint")
    flags, extra = _estimator_values(load)
    settings = _settings(device=dev, **load)
    backend_name = backend or default_backend_name()
    cls, _ = dcc.resolve(quantity, backend_name, {})  # unknown / unsupported / unavailable
    opts, _ = _backend_options(cls, quantity, flags, extra)
    _, full = dcc.resolve(quantity, backend_name, opts)  # option values

    running = _RunningTrace(f"{quantity} with {backend_name} on {dev}")
    try:
        with _signals_interrupt(), _Progress(quiet) as progress:
            progress.step(f"loading {checkpoint.name}")
            loaded = _load(checkpoint, settings, dev, trust)
            running.progress = progress
            progress.step(running.label)
            with trace_progress(running.update):
                result = dcc.estimate(
                    loaded.model,
                    loaded.loss_fn,
                    loaded.data,
                    quantity,
                    backend_name,
                    seed=settings["seed"],
                    **opts,
                )
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM through _signals_interrupt
        _print_partial(exc, running, quantity, backend_name, settings, as_json, checkpoint, dev)
        raise click.exceptions.Exit(_exit_code(exc)) from None

    if as_json:
        print_json(
            {
                "checkpoint": str(checkpoint),
                "loaded": loaded.describe(),
                "device": str(dev),
                "options": full,
                "result": result.to_dict(),
            }
        )
        return
    out = console()
    if not quiet:
        _header(out, checkpoint, loaded, dev)
    seed = "" if result.seed is None else f", seed {result.seed}"
    table = _table(
        f"{quantity} — backend {backend_name} ({result.method}{seed})",
        [
            ("quantity", "left"),
            ("value", "right"),
            ("± stderr", "right"),
            ("interval / detail", "left"),
            ("HVPs", "right"),
            ("seconds", "right"),
            ("device", "left"),
        ],
    )
    for i, (label, value, stderr, interval) in enumerate(_value_rows(result)):
        first = i == 0
        table.add_row(
            label,
            value,
            stderr,
            interval,
            str(result.n_hvp) if first else "",
            f"{result.seconds:.2f}" if first else "",
            result.device if first else "",
        )
    out.print(table)
    _warn_unconverged(out, result)
    if result.rtol is not None:  # part of the result, so shown even with --quiet
        met = "met" if result.target_met else "NOT met (probe budget exhausted)"
        out.print(f"rtol {result.rtol:g}: {met} after {result.n_hvp} HVPs")
    if result.peak_memory_bytes is not None and not quiet:
        out.print(f"peak CUDA memory {_fmt_bytes(result.peak_memory_bytes)}")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every ``finally`` runs (the model's state is restored)."""


_SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


def _exit_code(exc: BaseException) -> int:
    """128 + the signal number, as shells report a process killed by it: 130 or 143."""
    return 128 + int(signal.SIGTERM if isinstance(exc, _Terminated) else signal.SIGINT)


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`_Terminated` while the block runs (SIGINT already raises
    ``KeyboardInterrupt``); the previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _RunningTrace:
    """Receives the estimator's :class:`TraceProgress` reports: shows products done / budget and
    an ETA on the progress display, and keeps the last report for a partial result."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.last: TraceProgress | None = None
        self.progress: _Progress | None = None
        self._first: tuple[float, int] | None = None
        self._shown = 0.0

    def update(self, report: TraceProgress) -> None:
        self.last = report
        now = time.monotonic()
        if self._first is None:
            self._first = (now, report.n_matvecs)
        if self.progress is None or not self.progress.enabled or now - self._shown < 0.1:
            return
        self._shown = now
        started, done0 = self._first
        rate = (report.n_matvecs - done0) / (now - started) if now > started else 0.0
        left = report.budget - report.n_matvecs
        eta = f"ETA {_fmt_seconds(left / rate)}" if rate > 0 else "ETA —"
        self.progress.step(
            f"{self.label}: {report.n_matvecs}/{report.budget} products, {eta}, "
            f"{report.method} so far {_fmt(report.value)} ± {_fmt(report.stderr)}"
        )


def _fmt_seconds(value: float) -> str:
    seconds = round(value)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _print_partial(
    exc: BaseException,
    running: _RunningTrace,
    quantity: str,
    backend: str,
    settings: Mapping[str, Any],
    as_json: bool,
    checkpoint: Path,
    device: torch.device,
) -> None:
    """What an interrupted ``estimate`` leaves: the trace from the products already made,
    marked PARTIAL (stdout), or one line saying there is none (stderr)."""
    name = "SIGTERM" if isinstance(exc, _Terminated) else "SIGINT"
    report = running.last if quantity == "trace" else None
    usable = report is not None and math.isfinite(report.value)
    if as_json:
        partial: dict[str, Any] | None = None
        if usable:
            assert report is not None
            finite_se = math.isfinite(report.stderr)
            partial = {
                "backend": backend,
                "quantity": quantity,
                "value": report.value,
                "stderr": report.stderr if finite_se else None,
                "n_hvp": report.n_matvecs,
                "budget": report.budget,
                "probes": report.n_probes,
                "method": report.method,
                "seed": settings["seed"],
            }
        print_json(
            {
                "partial": True,
                "interrupted_by": name,
                "checkpoint": str(checkpoint),
                "device": str(device),
                "result": partial,
            }
        )
        return
    if not usable:
        what = "any trace product finished" if quantity == "trace" else "a result"
        click.echo(f"Interrupted by {name} before {what}: no estimate to show.", err=True)
        return
    assert report is not None
    click.echo(
        f"PARTIAL {quantity} (interrupted by {name} after {report.n_matvecs}/{report.budget} "
        f"products): {_fmt(report.value)} ± {_fmt(report.stderr)} ({report.method}, backend "
        f"{backend}, seed {settings['seed']}, {report.n_probes} probes). Not the requested "
        "estimate: its error bar is wider; rerun to finish, or lower --num-hvps."
    )


def _warn_unconverged(out: Any, result: CurvatureResult | None) -> None:
    """Eigenvalues whose Lanczos/Ritz residuals missed the tolerance are not shown as plain
    numbers without saying so (part of the result: printed even with --quiet)."""
    if result is None or result.quantity != "eigenvalues":
        return
    details = result.details or {}
    if details.get("converged") is False:
        residuals = [float(r) for r in details.get("residuals") or []]
        worst = f" (largest residual {max(residuals):.3g})" if residuals else ""
        out.print(
            f"eigenvalues NOT converged{worst} after {result.n_hvp} HVPs: they are estimates "
            "only; raise -o max_hvps.",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


# --------------------------------------------------------------------------------------------
# compare


@cli.command("compare")
@_load_options
@click.option(
    "--backends",
    metavar="NAME[,NAME...]",
    help="Comma-separated backends (default: every registered backend that computes the quantity).",
)
@click.option("-q", "--quantity", default="trace", show_default=True)
@_estimator_options
@user_errors
def compare_cmd(
    checkpoint: Path,
    backends: str | None,
    quantity: str,
    as_json: bool,
    quiet: bool,
    device: str,
    **load: Any,
) -> None:
    """Run several backends on the same CHECKPOINT, batch and seed, side by side.

    A backend that cannot run here (not installed, cannot handle this model or quantity, refuses
    an option value, or fails) gets a row with the reason; the command fails only if no backend
    produced a value. Without --backends every registered backend that computes the quantity
    runs ($DECONCNN_CURVATURE_BACKEND sets the backend of estimate and density, not this list).
    Peak memory is CUDA memory on a GPU, the process's resident memory otherwise.
    """
    dev = resolve_device(device)
    trust = load.pop("trust_checkpoint")
    flags, extra = _estimator_values(load)
    settings = _settings(device=dev, **load)
    registry = get_registry()
    _check_quantity_known(quantity)
    if backends is None:
        names = registry.supporting(quantity)
    else:
        names = list(dict.fromkeys(n.strip() for n in backends.split(",") if n.strip()))
        if not names:
            raise ConfigurationError("--backends is empty; name at least one backend.")
        for name in names:
            registry.get(name)  # unknown names are a typo: fail before any work
    _check_compare_options(names, quantity, flags, extra)

    memory_kind = _PeakMemory(dev).kind
    meters: dict[str, _PeakMemory] = {}
    dropped: dict[str, list[str]] = {}

    def options_for(cls: type[Backend]) -> dict[str, Any]:
        opts, dropped[cls.name] = _backend_options(cls, quantity, flags, extra, strict=False)
        return opts

    def started(progress: _Progress, name: str) -> None:
        if name != names[0]:
            progress.advance()  # the previous backend is done
        progress.step(f"{name}: {quantity}")

    def measure(name: str) -> _PeakMemory:
        meters[name] = _PeakMemory(dev)
        return meters[name]

    with _Progress(quiet, total=len(names)) as progress:
        progress.step(f"loading {checkpoint.name}")
        loaded = _load(checkpoint, settings, dev, trust)
        found = dcc.compare(
            loaded.model,
            loaded.loss_fn,
            loaded.data,
            quantity,
            names,
            seed=settings["seed"],
            options=options_for,
            before=lambda name: started(progress, name),
            measure=measure,
        )
        if found:
            progress.advance()
    rows: list[dict[str, Any]] = []
    for found_row in found:
        name = found_row["backend"]
        row: dict[str, Any] = {k: found_row[k] for k in ("backend", "status", "reason")}
        if dropped.get(name):
            row["ignored_options"] = dropped[name]
        result = found_row["result"]
        if result is not None:
            row["result"] = result.to_dict()
            row["peak_memory_bytes"] = (
                result.peak_memory_bytes if dev.type == "cuda" else meters[name].peak_bytes
            )
            row["_result"] = result
        rows.append(row)

    ok = [r for r in rows if r["status"] == "ok"]
    explain = _PeakMemory(dev).explain()
    if as_json:
        print_json(
            {
                "checkpoint": str(checkpoint),
                "loaded": loaded.describe(),
                "device": str(dev),
                "quantity": quantity,
                "seed": settings["seed"],
                "memory": {"kind": memory_kind, "meaning": explain},
                "rows": [{k: v for k, v in r.items() if k != "_result"} for r in rows],
            }
        )
    else:
        out = console()
        if not quiet:
            _header(out, checkpoint, loaded, dev)
        table, failures = _compare_table(
            rows,
            f"{quantity}: same model, data and seed ({settings['seed']})",
            "peak CUDA" if dev.type == "cuda" else "peak RSS",
        )
        out.print(table)
        # Reasons are whole sentences with a fix; they read better below the table than folded
        # into a narrow column.
        for i, r in enumerate(failures, 1):
            out.print(
                f"[{i}] {r['backend']} {r['status']}: {r['reason']}", markup=False, highlight=False
            )
        if not quiet:
            out.print(f"peak memory: {explain}")
    if not ok:
        raise click.ClickException(
            f"no backend could compute {quantity!r} for this checkpoint (reasons above)."
        )


# --------------------------------------------------------------------------------------------
# density


def _num_samples(loaded: LoadedCheckpoint) -> int:
    return sum(int(y.shape[0]) if isinstance(y, torch.Tensor) else len(y) for _, y in loaded.data)


@cli.command("density")
@_load_options
@_backend_option
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write a plot of the density to this image file (.png, .pdf, .svg).",
)
@click.option("--log-scale", is_flag=True, help="Logarithmic density axis.")
@click.option(
    "--sigma",
    type=click.FloatRange(min=0, min_open=True),
    help="Width of the Gaussian smoothing (default: 1/100 of the spectrum's span).",
)
@click.option(
    "--grid-points", type=click.IntRange(min=10, max=100_000), default=1000, show_default=True
)
@click.option(
    "-k",
    "k",
    type=click.IntRange(min=0, max=_FLAGS["-k"].option.max),
    default=5,
    show_default=True,
    help=f"Top eigenvalues to mark, 0: none ({_FLAGS['-k'].option.help}; backend option k).",
)
@click.option(
    "-o",
    "--option",
    "extra_options",
    multiple=True,
    metavar="NAME=VALUE",
    help="Backend option for the density or the eigenvalues, e.g. -o lanczos_steps=120.",
)
@user_errors
def density_cmd(
    checkpoint: Path,
    backend: str | None,
    plot_path: Path | None,
    log_scale: bool,
    sigma: float | None,
    grid_points: int,
    k: int,
    extra_options: tuple[str, ...],
    as_json: bool,
    quiet: bool,
    device: str,
    **load: Any,
) -> None:
    """Spectral density of the Hessian (stochastic Lanczos quadrature) of a CHECKPOINT, with its
    top eigenvalues, as a table, a plot (--plot) or JSON.

    The density is smoothed with a Gaussian of width --sigma (Ghorbani, Krishnan & Xiao, ICML
    2019); the top-k eigenvalues come from the same backend (Lanczos for pyhessian).
    """
    dev = resolve_device(device)
    trust = load.pop("trust_checkpoint")
    settings = _settings(device=dev, **load)
    backend_name = backend or default_backend_name()
    extra = parse_key_values(extra_options, "-o/--option")
    _, density_opts, _ = density_options(backend_name, k, extra, label=lambda name: f"-o {name}")
    _, density_full = dcc.resolve("density", backend_name, density_opts)
    if plot_path is not None:
        _check_plot_path(plot_path.expanduser())

    with _Progress(quiet) as progress:
        progress.step(f"loading {checkpoint.name}")
        loaded = _load(checkpoint, settings, dev, trust)
        steps = {
            "density": f"density with {backend_name} on {dev}",
            "eigenvalues": f"top-{k} eigenvalues with {backend_name} on {dev}",
        }
        dens, eig = dcc.density(
            loaded.model,
            loaded.loss_fn,
            loaded.data,
            backend_name,
            k=k,
            seed=settings["seed"],
            options=extra,
            before=lambda q: progress.step(steps[q]),
        )

    density: Density = dens.value
    eigenvalues = [float(v) for v in eig.value] if eig is not None else []
    width = sigma if sigma is not None else _default_sigma(density)
    # The computed numbers are always shown; a smoothing width that cannot work, or a plot that
    # cannot be written, is reported after them (exit 1), never instead of them.
    problem, grid, curve = _smooth(density, eigenvalues, width, grid_points)
    plot_problem = None
    if plot_path is not None and problem is None:
        try:
            _plot(
                plot_path.expanduser(),
                grid,
                curve,
                eigenvalues,
                log_scale=log_scale,
                nodes=density.nodes,
                dim=density.dim,
                title=f"Hessian spectral density: {checkpoint.name}",
                subtitle=(
                    f"{backend_name} SLQ, {density.num_runs} runs x {density.lanczos_steps} "
                    f"steps, σ = {width:.3g}; {_num_samples(loaded)} samples of "
                    f"{loaded.data_description.split(':')[0]}"
                ),
            )
        except ConfigurationError as exc:
            plot_problem = str(exc)
    failure = problem or plot_problem
    try:
        _show_density(
            as_json, quiet, checkpoint, loaded, dev, density_full, dens, eig, backend_name,
            settings, width, grid, curve, None if failure else plot_path,
        )  # fmt: skip
    finally:
        if failure:
            raise ConfigurationError(failure)


def _smooth(
    density: Density, eigenvalues: list[float], width: float, points: int
) -> tuple[str | None, Any, Any]:
    """The smoothed curve on its grid, or why ``width`` cannot give one (then ``None``s)."""
    import numpy as np

    nodes = [*density.nodes, *eigenvalues]
    span = max(nodes) - min(nodes)
    fix = (
        f"use a σ near the default (1/100 of the eigenvalue span {span:.3g}), or leave --sigma out"
    )
    with np.errstate(all="ignore"):
        try:
            grid = _grid(density, eigenvalues, width, points)
            curve = density.smoothed(grid, width)
        except (OverflowError, FloatingPointError, ValueError):
            return f"--sigma {width:g} is out of range for this spectrum; {fix}.", None, None
        if not (np.isfinite(grid).all() and np.isfinite(curve).all()):
            return f"--sigma {width:g} is out of range for this spectrum; {fix}.", None, None
    spacing = float(grid[1] - grid[0])
    if width < 2 * spacing:
        return (
            f"--sigma {width:g} is below twice the grid spacing {spacing:.3g}: the smoothed "
            f"curve would miss most of the density's mass; raise --sigma or --grid-points "
            f"(or {fix}).",
            None,
            None,
        )
    return None, grid, curve


def _show_density(
    as_json: bool,
    quiet: bool,
    checkpoint: Path,
    loaded: LoadedCheckpoint,
    dev: Any,
    density_full: dict[str, Any],
    dens: CurvatureResult,
    eig: CurvatureResult | None,
    backend_name: str,
    settings: dict[str, Any],
    width: float,
    grid: Any,
    curve: Any,
    plot_path: Path | None,
) -> None:
    if as_json:
        print_json(
            {
                "checkpoint": str(checkpoint),
                "loaded": loaded.describe(),
                "device": str(dev),
                "options": density_full,
                "density": dens.to_dict(),
                "eigenvalues": None if eig is None else eig.to_dict(),
                "smoothed": None
                if curve is None
                else {
                    "sigma": width,
                    "grid": [float(x) for x in grid],
                    "density": [float(y) for y in curve],
                },
                "plot": None if plot_path is None else str(plot_path),
            }
        )
        return
    out = console()
    if not quiet:
        _header(out, checkpoint, loaded, dev)
    table = _table(
        f"spectral density — backend {backend_name}, seed {settings['seed']}",
        [
            ("quantity", "left"),
            ("value / detail", "right"),
            ("± stderr", "right"),
            ("note", "left"),
            ("HVPs", "right"),
            ("seconds", "right"),
        ],
    )
    for res in (dens, eig):
        if res is None:
            continue
        for i, (label, value, stderr, detail) in enumerate(_value_rows(res)):
            table.add_row(
                label,
                value,
                stderr,
                detail,
                str(res.n_hvp) if i == 0 else "",
                f"{res.seconds:.2f}" if i == 0 else "",
            )
    out.print(table)
    _warn_unconverged(out, eig)
    out.print(
        "no trace from SLQ (one probe per run, its spread unknowable at a few runs); for the "
        f"trace: deconcnn-curv estimate {escape(checkpoint.name)} -q trace"
    )
    if plot_path is not None:
        out.print(f"plot written to {escape(str(plot_path))} (σ = {width:.3g})")
