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
import os
import re
import resource
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import deconcnn_curvature as dcc
from deconcnn_curvature.backend import Backend
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
from deconcnn_curvature.data_sources import DATA_SOURCES
from deconcnn_curvature.errors import (
    BackendUnavailableError,
    ConfigurationError,
    CurvatureError,
    InvalidOptionError,
    UnknownBackendError,
    UnsupportedModelError,
    UnsupportedQuantityError,
)
from deconcnn_curvature.linalg.hutchinson import TraceProgress, trace_progress
from deconcnn_curvature.registry import ENV_BACKEND, default_backend_name, get_registry
from deconcnn_curvature.results import CurvatureResult, Density

__all__ = ["compare_cmd", "density_cmd", "estimate_cmd", "resolve_device"]

F = Callable[..., Any]

#: Command-line shortcuts → backend option names.
_FLAGS: Mapping[str, str] = {"num_hvps": "--num-hvps", "rtol": "--rtol", "k": "-k"}


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


def _backend_options(
    cls: type[Backend],
    quantity: str,
    named: Mapping[str, Any],
    extra: Mapping[str, Any],
    *,
    strict: bool = True,
) -> tuple[dict[str, Any], list[str]]:
    """Options for ``cls`` and ``quantity`` from the flags the user gave.

    A flag the backend does not declare for ``quantity`` is an error (``strict``) or, for
    ``compare``, dropped and named in the returned list.
    """
    declared = cls.option_map()
    applicable = sorted(o.name for o in cls.options if not o.quantities or quantity in o.quantities)
    opts: dict[str, Any] = {}
    dropped: list[str] = []
    given = [(name, _FLAGS[name], value) for name, value in named.items() if value is not None]
    given += [(name, f"-o {name}", value) for name, value in extra.items()]
    for name, flag, value in given:
        option = declared.get(name)
        if option is None or (option.quantities and quantity not in option.quantities):
            if not strict:
                dropped.append(flag)
                continue
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
            type=click.IntRange(min=0),
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


def _estimator_options(func: F) -> F:
    options = [
        click.option(
            "--num-hvps",
            type=click.IntRange(min=2),  # one probe has no standard error
            help="Probe budget of a stochastic trace (backend option num_hvps).",
        ),
        click.option(
            "--rtol",
            type=click.FloatRange(min=0, min_open=True),
            help="Stop a trace estimate once its interval half-width is at most rtol·|trace|.",
        ),
        click.option(
            "-k", "k", type=click.IntRange(min=1), help="Number of top eigenvalues (option k)."
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
# progress and memory


class _Progress:
    """A transient rich progress display on stderr; silent with --quiet or when stderr is not a
    terminal (pipes, CI logs, tests)."""

    def __init__(self, quiet: bool, total: int | None = None) -> None:
        self.console = Console(stderr=True)
        self.enabled = not quiet and self.console.is_terminal
        self.total = total
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}")]
            if self.total is not None:
                columns += [BarColumn(), MofNCompleteColumn()]
            columns.append(TimeElapsedColumn())
            self._progress = Progress(*columns, console=self.console, transient=True)
            self._progress.start()
            self._task = self._progress.add_task("loading the checkpoint", total=self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def step(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _PeakMemory:
    """Peak memory of one backend run.

    On CUDA the number comes from :func:`deconcnn_curvature.estimate` (``torch.cuda.
    max_memory_allocated`` above the allocation at the start). On the CPU: the process's resident
    set size above its level at the start, sampled every 2 ms from ``/proc/self/statm``; where
    that file does not exist, the rise of ``getrusage().ru_maxrss`` (the process's all-time peak,
    so it only counts what exceeds earlier peaks). In one process, memory an earlier backend freed
    but the allocator kept is reused without being counted again, so on the CPU the numbers of
    later backends are lower bounds; run ``compare --backends NAME`` once per backend for
    separate measurements.
    """

    INTERVAL = 0.002

    def __init__(self, device: torch.device) -> None:
        if device.type == "cuda":
            self.kind = "cuda_max_allocated"
        elif _rss_bytes() is not None:
            self.kind = "rss_sampled"
        else:
            self.kind = "ru_maxrss"
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _maxrss() -> int:
        value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(value) if sys.platform == "darwin" else int(value) * 1024

    def _sample(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            rss = _rss_bytes() or 0
            self._max = max(self._max, rss)

    def __enter__(self) -> _PeakMemory:
        if self.kind == "rss_sampled":
            self._base = self._max = _rss_bytes() or 0
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        elif self.kind == "ru_maxrss":
            self._base = self._maxrss()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, _rss_bytes() or 0)
            self.peak_bytes = self._max - self._base
        elif self.kind == "ru_maxrss":
            self.peak_bytes = self._maxrss() - self._base

    def explain(self) -> str:
        return {
            "cuda_max_allocated": "CUDA memory allocated above the level at the start "
            "(torch.cuda.max_memory_allocated)",
            "rss_sampled": "process resident memory above its level at the start of each "
            "backend, sampled every 2 ms",
            "ru_maxrss": "rise of the process's peak resident memory (getrusage ru_maxrss)",
        }[self.kind]


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
    names: list[str], quantity: str, named: Mapping[str, Any], extra: Mapping[str, Any]
) -> None:
    """Before any work: an option no compared backend takes for ``quantity`` is a typo, and a
    value every compared backend refuses is a mistake, not rows to discover after loading. A
    value only some refuse (``--num-hvps 3``: Hutch++ needs at least 5) gives those a row with
    the reason, as the help promises."""
    registry = get_registry()
    classes = [registry.get(name) for name in names]
    takes = {
        o.name
        for cls in classes
        for o in cls.options
        if not o.quantities or quantity in o.quantities
    }
    given = {name: _FLAGS[name] for name, value in named.items() if value is not None}
    given.update({name: f"-o {name}" for name in extra})
    unknown = [flag for name, flag in given.items() if name not in takes]
    if unknown:
        raise InvalidOptionError(
            f"{', '.join(unknown)}: no compared backend ({', '.join(names)}) takes this option "
            f"for {quantity!r}; their options are: {', '.join(sorted(takes)) or '(none)'}."
        )
    refused: list[str] = []
    for cls in classes:
        opts, _ = _backend_options(cls, quantity, named, extra, strict=False)
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


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.6g}"
    return str(value)


def _fmt_ci(result: CurvatureResult) -> str:
    if result.ci is None:
        return ""
    lo, hi = result.ci
    level = f" ({result.ci_level:.0%})" if result.ci_level is not None else ""
    return f"[{_fmt(lo)}, {_fmt(hi)}]{level}"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / 2**20:.1f} MiB"


def _value_rows(result: CurvatureResult) -> list[tuple[str, str, str, str]]:
    """(label, value, ± stderr, interval) rows for one result, whatever the quantity."""
    value = result.value
    q = result.quantity
    if isinstance(value, Density):
        lo, hi = min(value.nodes), max(value.nodes)
        rows = [
            (
                "density",
                f"{len(value.nodes)} nodes in [{_fmt(lo)}, {_fmt(hi)}]",
                "",
                f"{value.num_runs} runs x {value.lanczos_steps} steps",
            )
        ]
        return rows  # no trace: SLQ gives one probe per run (deconcnn-curv estimate -q trace)
    if isinstance(value, list | tuple):
        return [(f"λ{i + 1}", _fmt(float(v)), "", "") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        rows = []
        total = 0.0
        for name, v in value.items():
            if isinstance(v, torch.Tensor):
                total += float(v.sum())
                rows.append(
                    (
                        str(name),
                        f"sum {_fmt(float(v.sum()))}",
                        "",
                        f"min {_fmt(float(v.min()))}, max {_fmt(float(v.max()))}",
                    )
                )
            else:
                total += float(v)
                rows.append((str(name), _fmt(float(v)), "", ""))
        return [(f"{q} (total)", _fmt(total), _fmt(result.stderr), _fmt_ci(result)), *rows]
    return [(q, _fmt(value), _fmt(result.stderr), _fmt_ci(result))]


def _short_value(result: CurvatureResult) -> str:
    value = result.value
    if isinstance(value, Density):
        return f"SLQ, {len(value.nodes)} nodes"
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(float(v)) for v in value)
    if isinstance(value, Mapping):
        return _value_rows(result)[0][1]
    return _fmt(value)


def _table(title: str, columns: list[tuple[str, str]]) -> Table:
    """A table whose numeric columns never wrap; free-text columns ("note", "detail") fold."""
    table = Table(title=title)
    for name, justify in columns:
        free = name in ("note", "interval", "value / detail", "interval / detail")
        table.add_column(
            name,
            justify=justify,  # type: ignore[arg-type]
            no_wrap=not free,
            overflow="fold",
            min_width=len(name) if not free else 12,
        )
    return table


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
    num_hvps: int | None,
    rtol: float | None,
    k: int | None,
    extra_options: tuple[str, ...],
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
    settings = _settings(device=dev, **load)
    backend_name = backend or default_backend_name()
    cls, _ = dcc.resolve(quantity, backend_name, {})  # unknown / unsupported / unavailable
    named = {"num_hvps": num_hvps, "rtol": rtol, "k": k}
    opts, _ = _backend_options(cls, quantity, named, parse_key_values(extra_options, "-o/--option"))
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


def _classify(exc: BaseException) -> str:
    if isinstance(exc, BackendUnavailableError):
        return "unavailable"
    if isinstance(exc, UnsupportedQuantityError | UnsupportedModelError):
        return "unsupported"
    if isinstance(exc, InvalidOptionError):
        return "invalid option"
    return "failed"


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
    num_hvps: int | None,
    rtol: float | None,
    k: int | None,
    extra_options: tuple[str, ...],
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
    named = {"num_hvps": num_hvps, "rtol": rtol, "k": k}
    extra = parse_key_values(extra_options, "-o/--option")
    _check_compare_options(names, quantity, named, extra)

    rows: list[dict[str, Any]] = []
    memory_kind = _PeakMemory(dev).kind
    with _Progress(quiet, total=len(names)) as progress:
        progress.step(f"loading {checkpoint.name}")
        loaded = _load(checkpoint, settings, dev, trust)
        for name in names:
            progress.step(f"{name}: {quantity}")
            row: dict[str, Any] = {"backend": name, "status": "ok", "reason": None}
            try:
                cls = registry.get(name)
                opts, dropped = _backend_options(cls, quantity, named, extra, strict=False)
                if dropped:
                    row["ignored_options"] = dropped
                dcc.resolve(quantity, name, opts)
                meter = _PeakMemory(dev)
                with meter:
                    result = dcc.estimate(
                        loaded.model,
                        loaded.loss_fn,
                        loaded.data,
                        quantity,
                        name,
                        seed=settings["seed"],
                        **opts,
                    )
                row["result"] = result.to_dict()
                row["peak_memory_bytes"] = (
                    result.peak_memory_bytes if dev.type == "cuda" else meter.peak_bytes
                )
                row["_result"] = result
            except Exception as exc:  # one backend's failure is a row, not the end of the run
                row["status"] = _classify(exc)
                row["reason"] = (
                    str(exc) if isinstance(exc, CurvatureError) else f"{type(exc).__name__}: {exc}"
                )
            rows.append(row)
            progress.advance()

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
        mem_col = "peak CUDA" if dev.type == "cuda" else "peak RSS"
        table = _table(
            f"{quantity}: same model, data and seed ({settings['seed']})",
            [
                ("backend", "left"),
                ("value", "right"),
                ("± stderr", "right"),
                ("interval", "left"),
                ("HVPs", "right"),
                ("seconds", "right"),
                (mem_col, "right"),
                ("note", "left"),
            ],
        )
        failures: list[dict[str, Any]] = []
        for r in rows:
            if r["status"] != "ok":
                failures.append(r)
                table.add_row(
                    r["backend"], "—", "", "", "", "", "", f"{r['status']} [{len(failures)}]"
                )
                continue
            res: CurvatureResult = r["_result"]
            note = res.method + (" (exact)" if res.exact else "")
            if res.quantity == "eigenvalues" and (res.details or {}).get("converged") is False:
                note += "; NOT converged (raise -o max_hvps)"
            if r.get("ignored_options"):
                note += f"; ignored {', '.join(r['ignored_options'])}"
            table.add_row(
                r["backend"],
                _short_value(res),
                _fmt(res.stderr),
                _fmt_ci(res),
                str(res.n_hvp),
                f"{res.seconds:.2f}",
                _fmt_bytes(r["peak_memory_bytes"]),
                escape(note),
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


def _default_sigma(density: Density) -> float:
    lo, hi = min(density.nodes), max(density.nodes)
    spread = hi - lo
    return spread / 100 if spread > 0 else max(abs(hi), 1.0) * 1e-3


def _grid(density: Density, eigenvalues: list[float], sigma: float, points: int) -> Any:
    import numpy as np

    values = [*density.nodes, *eigenvalues]
    return np.linspace(min(values) - 5 * sigma, max(values) + 5 * sigma, points)


def _check_plot_path(path: Path) -> None:
    """Fail before any work if the plot cannot be written: folder, format, matplotlib."""
    if not path.parent.is_dir():
        what = "is not a folder" if path.parent.exists() else "does not exist"
        raise ConfigurationError(f"cannot write the plot to {path}: {path.parent} {what}.")
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as exc:
        raise ConfigurationError(
            f"--plot needs matplotlib, which cannot be imported ({exc}); install it with "
            "pip install matplotlib."
        ) from exc
    # pgf needs a LaTeX installation at save time: not offered.
    formats = {f for f in FigureCanvasBase.get_supported_filetypes() if f != "pgf"}
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        raise ConfigurationError(
            f"cannot write the plot to {path}: unknown image format {path.suffix or '(none)'!r}; "
            f"use one of {', '.join('.' + f for f in sorted(formats))}."
        )
    existed = path.exists()
    try:  # can we write there at all? (before minutes of work, not after)
        with path.open("ab"):
            pass
    except OSError as exc:
        raise ConfigurationError(f"cannot write the plot to {path}: {exc.strerror}.") from exc
    if not existed:
        path.unlink()


def _plot(
    path: Path,
    grid: Any,
    curve: Any,
    eigenvalues: list[float],
    *,
    log_scale: bool,
    title: str,
    subtitle: str,
    nodes: Sequence[float] = (),
    dim: int | None = None,
) -> None:
    fig = _density_figure(
        grid, curve, eigenvalues, log_scale=log_scale, title=title, subtitle=subtitle,
        nodes=nodes, dim=dim,
    )  # fmt: skip
    try:
        fig.savefig(path, dpi=120)
    except Exception as exc:  # any backend failure: the caller has already shown the results
        raise ConfigurationError(
            f"cannot write the plot to {path}: {type(exc).__name__}: {exc}"
        ) from exc


def _density_figure(
    grid: Any,
    curve: Any,
    eigenvalues: list[float],
    *,
    log_scale: bool,
    title: str,
    subtitle: str,
    nodes: Sequence[float] = (),
    dim: int | None = None,
) -> Any:
    """The smoothed density, with the top eigenvalues and the SLQ nodes as marks *beside* it.

    An outlying eigenvalue holds 1/dim of the mass: the smoothed curve shows nothing there (on a
    linear scale), so full-height lines at λ₂, λ₃ suggested mass the curve does not have. The
    eigenvalues are markers in a strip along the top edge, the SLQ nodes (Ritz values of the runs)
    a rug along the bottom, and the legend sits below the axes, off the curve.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.transforms import blended_transform_factory
    except ImportError as exc:
        raise ConfigurationError(
            f"--plot needs matplotlib, which cannot be imported ({exc}); install it with "
            "pip install matplotlib."
        ) from exc
    import numpy as np

    fig = Figure(figsize=(7.5, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if log_scale:
        floor = float(np.max(curve)) * 1e-6
        ax.semilogy(grid, np.maximum(curve, floor), color="tab:blue", lw=1.4, label="SLQ density")
        ax.set_ylim(bottom=floor)
    else:
        ax.plot(grid, curve, color="tab:blue", lw=1.4, label="SLQ density (smoothed)")
        ax.fill_between(grid, curve, alpha=0.15, color="tab:blue")
        ax.set_ylim(bottom=0, top=float(np.max(curve)) * 1.15)
    strip = blended_transform_factory(ax.transData, ax.transAxes)  # x: data, y: axes fraction
    if len(nodes):
        ax.plot(
            list(nodes), [0.0] * len(nodes), ls="none", marker="|", ms=9, mew=0.8, color="0.3",
            transform=strip, clip_on=False, label="SLQ nodes (Ritz values of the runs)",
        )  # fmt: skip
    if eigenvalues:
        share = f"; each holds 1/{dim} of the mass" if dim else ""
        ax.plot(
            eigenvalues, [1.0] * len(eigenvalues), ls="none", marker="v", ms=7, color="tab:red",
            transform=strip, clip_on=False,
            label=f"top-{len(eigenvalues)} eigenvalues (Lanczos{share})",
        )  # fmt: skip
        ax.annotate(
            f"λ1 = {eigenvalues[0]:.4g}",
            xy=(eigenvalues[0], 1.0),
            xycoords=strip,
            ha="right",
            va="top",
            color="tab:red",
            fontsize=9,
            xytext=(-6, -4),
            textcoords="offset points",
        )
    ax.set_xlabel("eigenvalue of the loss Hessian")
    ax.set_ylabel("density" + (" (log scale)" if log_scale else ""))
    ax.set_title(f"{title}\n{subtitle}", fontsize=10)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return fig


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
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Top eigenvalues to mark (0: none).",
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
    cls, _ = dcc.resolve("density", backend_name, {})
    if k > 0 and "eigenvalues" not in cls.quantities:
        raise UnsupportedQuantityError(
            f"backend {backend_name!r} computes no eigenvalues to mark; pass -k 0 or a backend "
            "that computes both density and eigenvalues."
        )
    extra = parse_key_values(extra_options, "-o/--option")
    density_opts: dict[str, Any] = {}
    eig_opts: dict[str, Any] = {"k": k} if k > 0 else {}
    for name, value in extra.items():
        routed = False
        for q, target in (("density", density_opts), ("eigenvalues", eig_opts)):
            if q == "eigenvalues" and k == 0:
                continue
            option = cls.option_map().get(name)
            if option is not None and (not option.quantities or q in option.quantities):
                target[name] = value
                routed = True
        if not routed:
            raise InvalidOptionError(
                f"-o {name} is not an option of backend {backend_name!r} for density or "
                "eigenvalues; see `deconcnn-curv list-backends --json`."
            )
    if "k" in extra:
        raise InvalidOptionError("use -k, not -o k=..., to choose how many eigenvalues to mark.")
    _, density_full = dcc.resolve("density", backend_name, density_opts)
    if k > 0:
        dcc.resolve("eigenvalues", backend_name, eig_opts)
    if plot_path is not None:
        _check_plot_path(plot_path.expanduser())

    with _Progress(quiet) as progress:
        progress.step(f"loading {checkpoint.name}")
        loaded = _load(checkpoint, settings, dev, trust)
        progress.step(f"density with {backend_name} on {dev}")
        dens = dcc.estimate(
            loaded.model,
            loaded.loss_fn,
            loaded.data,
            "density",
            backend_name,
            seed=settings["seed"],
            **density_opts,
        )
        eig: CurvatureResult | None = None
        if k > 0:
            progress.step(f"top-{k} eigenvalues with {backend_name} on {dev}")
            eig = dcc.estimate(
                loaded.model,
                loaded.loss_fn,
                loaded.data,
                "eigenvalues",
                backend_name,
                seed=settings["seed"],
                **eig_opts,
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
