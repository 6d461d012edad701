"""Analysis of run folders (the ``analysis`` extra: pandas): the tidy table of every measurement
(:func:`read_runs`), the λ_max plateau with its interval (:func:`find_plateau`), and the per-run
summary rows ``deconcnn-curv report`` prints (:func:`summarize_runs`)."""

from __future__ import annotations

from deconcnn_curvature.analysis.plateau import Plateau, find_plateau
from deconcnn_curvature.analysis.report import RunSummary, cadence_for, summarize_runs
from deconcnn_curvature.analysis.runs import (
    MEASUREMENT_COLUMNS,
    RunData,
    find_runs,
    load_run,
    load_runs,
    read_runs,
    tidy_table,
    write_table,
)

__all__ = [
    "MEASUREMENT_COLUMNS",
    "Plateau",
    "RunData",
    "RunSummary",
    "cadence_for",
    "find_plateau",
    "find_runs",
    "load_run",
    "load_runs",
    "read_runs",
    "summarize_runs",
    "tidy_table",
    "write_table",
]
