"""A running ``estimate``'s progress and what an interrupted one leaves.

:class:`RunningTrace` receives the estimator's progress reports (products done, ETA, the value so
far); :func:`signals_interrupt` turns SIGTERM into ``KeyboardInterrupt`` so the model's state is
restored; :func:`print_partial` shows the trace from the products already made, marked PARTIAL.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import click
import torch

from deconcnn_curvature.cli import print_json
from deconcnn_curvature.cli.memory import ProgressDisplay
from deconcnn_curvature.linalg.probes import TraceProgress
from deconcnn_curvature.present import format_value


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every ``finally`` runs (the model's state is restored)."""


def exit_code(exc: BaseException) -> int:
    """128 + the signal number, as shells report a process killed by it: 130 or 143."""
    return 128 + int(signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` while the block runs (SIGINT already raises
    ``KeyboardInterrupt``); the previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def interruptible(command: str) -> Iterator[None]:
    """Ctrl-C or SIGTERM while the block runs ends ``deconcnn-curv COMMAND`` with one line and
    exit code 130 / 143 (Click's own answer, "Aborted!" and 1, reads as an ordinary failure)."""
    try:
        with signals_interrupt():
            yield
    except KeyboardInterrupt as exc:
        name = "SIGTERM" if isinstance(exc, Terminated) else "SIGINT"
        click.echo(
            f"deconcnn-curv {command}: interrupted by {name} before it finished; nothing to show.",
            err=True,
        )
        raise click.exceptions.Exit(exit_code(exc)) from None


class RunningTrace:
    """Receives the estimator's :class:`TraceProgress` reports: shows products done / budget and
    an ETA on the progress display, and keeps the last report for a partial result."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.last: TraceProgress | None = None
        self.progress: ProgressDisplay | None = None
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
            f"{report.method} so far {format_value(report.value)} ± {format_value(report.stderr)}"
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


def print_partial(
    exc: BaseException,
    running: RunningTrace,
    quantity: str,
    backend: str,
    settings: Mapping[str, Any],
    as_json: bool,
    checkpoint: Path,
    device: torch.device,
) -> None:
    """What an interrupted ``estimate`` leaves: the trace from the products already made,
    marked PARTIAL (stdout), or one line saying there is none (stderr)."""
    name = "SIGTERM" if isinstance(exc, Terminated) else "SIGINT"
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
        f"products): {format_value(report.value)} ± {format_value(report.stderr)} "
        f"({report.method}, backend {backend}, seed {settings['seed']}, {report.n_probes} "
        "probes). Not the requested estimate: its error bar is wider; rerun to finish, or lower "
        "--num-hvps."
    )
