"""Progress display and peak-memory sampling for the checkpoint commands."""

from __future__ import annotations

import os
import resource
import sys
import threading
from typing import Any

import torch
from rich.console import Console


class ProgressDisplay:
    """A transient rich progress display on stderr; silent with --quiet or when stderr is not a
    terminal (pipes, CI logs, tests)."""

    def __init__(self, quiet: bool, total: int | None = None) -> None:
        self.console = Console(stderr=True)
        self.enabled = not quiet and self.console.is_terminal
        self.total = total
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> ProgressDisplay:
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


class PeakMemory:
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

    def __enter__(self) -> PeakMemory:
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
