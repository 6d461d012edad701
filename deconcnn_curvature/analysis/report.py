"""One summary row per run (what ``deconcnn-curv report`` shows), from the tidy table.

:func:`summarize_runs` takes runs read by :func:`~deconcnn_curvature.analysis.runs.load_runs` and
their table (:func:`~deconcnn_curvature.analysis.runs.tidy_table`) and returns a
:class:`RunSummary` per run: the configuration values that tell the runs apart, the last trace and
λ_max, how many λ_max values converged, failed measurements, the λ_max plateau with its interval
(:func:`~deconcnn_curvature.analysis.plateau.find_plateau`), the number of λ_max points (the
plateau guide asks for :data:`MIN_PLATEAU_POINTS`) and the share of wall time spent measuring.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deconcnn_curvature.analysis.plateau import Plateau, find_plateau, point_sigmas
from deconcnn_curvature.analysis.runs import MEASUREMENT_COLUMNS, RunData
from deconcnn_curvature.errors import ConfigurationError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "IDENTITY_KEYS",
    "MIN_PLATEAU_POINTS",
    "RunSummary",
    "cadence_for",
    "check_by_key",
    "distinguishing_keys",
    "lambda_max_rows",
    "run_plateau",
    "summarize_runs",
]

#: The λ_max points per run deconCNN's plateau guide asks for.
MIN_PLATEAU_POINTS = 100
#: Configuration keys that name or place a run rather than configure it: never "distinguishing".
IDENTITY_KEYS = frozenset({"name", "run_dir", "runs_root", "resume", "if_exists", "plot"})


def cadence_for(points: int, total_steps: int, at_step_zero: bool = False) -> int:
    """The largest ``compute_every_n_steps`` that gives at least ``points`` measurements in a
    run of ``total_steps`` optimiser steps (the monitor measures at every multiple of the cadence,
    and at step 0 with ``compute_at_step_zero``). 0 when even every step is too few."""
    needed = points - (1 if at_step_zero else 0)
    if needed <= 0:
        return max(total_steps, 1)
    return total_steps // needed


@dataclass(frozen=True)
class RunSummary:
    """One run's row of the report. ``config``: the values of the keys that tell the runs apart
    (:func:`distinguishing_keys`, and the ``by`` key)."""

    run: str
    path: str
    config: Mapping[str, Any]
    records: int
    failed: int
    last_step: int | None
    trace: float | None
    trace_stderr: float | None
    trace_step: int | None
    lambda_max: float | None
    lambda_max_residual: float | None
    lambda_max_step: int | None
    lambda_max_points: int
    converged_share: float | None
    plateau: Plateau
    curvature_seconds: float
    wall_seconds: float | None
    first_error: str | None = None
    group: Any = field(default=None)

    @property
    def curvature_share(self) -> float | None:
        if not self.wall_seconds:
            return None
        return self.curvature_seconds / self.wall_seconds

    @property
    def few_points(self) -> bool:
        return self.lambda_max_points < MIN_PLATEAU_POINTS

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "path": self.path,
            "config": dict(self.config),
            "group": self.group,
            "records": self.records,
            "failed": self.failed,
            "first_error": self.first_error,
            "last_step": self.last_step,
            "trace": {"value": self.trace, "stderr": self.trace_stderr, "step": self.trace_step},
            "lambda_max": {
                "value": self.lambda_max,
                "residual": self.lambda_max_residual,
                "step": self.lambda_max_step,
                "points": self.lambda_max_points,
                "enough_for_plateau": not self.few_points,
                "converged_share": self.converged_share,
            },
            "plateau": self.plateau.to_dict(),
            "curvature_seconds": self.curvature_seconds,
            "wall_seconds": self.wall_seconds,
            "curvature_share": self.curvature_share,
        }


def config_columns(table: pd.DataFrame) -> list[str]:
    """The configuration columns of a tidy table (everything after the measurement columns)."""
    return [c for c in table.columns if c not in MEASUREMENT_COLUMNS]


def distinguishing_keys(runs: Sequence[RunData]) -> list[str]:
    """Configuration keys whose values differ between the runs (in the order of the first run
    holding them), leaving out :data:`IDENTITY_KEYS` and a key whose values repeat an earlier
    key's in every run (``callbacks.settings.num_hvps`` mirrors ``curvature.num_hvps``). Runs
    without a ``config.yaml`` (the monitor under another app) are left out of the comparison."""
    configured = [run for run in runs if run.config]  # a records-only folder has none
    keys: dict[str, None] = {}
    for run in configured:
        keys.update(dict.fromkeys(run.config))
    out = []
    seen: set[tuple[str, ...]] = set()
    for key in keys:
        if key in IDENTITY_KEYS:
            continue
        values = tuple(repr(run.config.get(key)) for run in configured)
        if len(set(values)) > 1 and values not in seen:
            seen.add(values)
            out.append(key)
    return out


def check_by_key(runs: Sequence[RunData], key: str) -> None:
    """Refuse a ``--by`` key no run's configuration holds, naming the keys that differ."""
    if any(key in run.config for run in runs):
        return
    differ = distinguishing_keys(runs)
    hint = (
        f"keys that differ between these runs: {', '.join(differ)}"
        if differ
        else "these runs do not differ in any configuration key"
        if any(run.config for run in runs)
        else "these runs have no config.yaml"
    )
    raise ConfigurationError(f"--by {key}: no run's config.yaml has that key; {hint}.")


def lambda_max_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The usable λ_max rows of one run's table (``index`` 1, no error), in step order."""
    eig = rows[(rows["quantity"] == "eigenvalues") & (rows["index"] == 1)]
    return eig[eig["error"].isna() & eig["value"].notna()].sort_values("step", kind="stable")


def _floats(series: Any) -> list[float | None]:
    return [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
            for v in series.astype("float64").tolist()]  # fmt: skip


def run_plateau(rows: pd.DataFrame, **rule: Any) -> Plateau:
    """:func:`find_plateau` on one run's usable λ_max rows, each point's uncertainty from its
    record (:func:`point_sigmas`). ``rule``: the plateau rule's keyword arguments."""
    eig = lambda_max_rows(rows)
    sigmas = point_sigmas(
        _floats(eig["stderr"]),
        _floats(eig["ci_low"]),
        _floats(eig["ci_high"]),
        _floats(eig["ci_level"]),
        _floats(eig["residual"]),
    )
    epochs = [-1 if v is None else int(v) for v in _floats(eig["epoch"])]
    return find_plateau(
        [int(s) for s in eig["step"]], epochs, eig["value"].astype(float).tolist(), sigmas, **rule
    )


def _last(rows: pd.DataFrame) -> tuple[float | None, float | None, int | None]:
    if rows.empty:
        return None, None, None
    last = rows.iloc[-1]
    return float(last["value"]), _floats(rows["stderr"].iloc[-1:])[0], int(last["step"])


def _summary(
    run: RunData, rows: pd.DataFrame, keys: Sequence[str], group: Any, rule: Mapping[str, Any]
) -> RunSummary:
    ok = rows[rows["error"].isna() & rows["value"].notna()]
    trace = ok[ok["quantity"] == "trace"].sort_values("step", kind="stable")
    eig = lambda_max_rows(rows)
    trace_value, trace_se, trace_step = _last(trace)
    lam, _, lam_step = _last(eig)
    residual = _floats(eig["residual"])[-1] if not eig.empty else None
    failed_rows = rows[rows["error"].notna()].drop_duplicates(["step", "quantity"])
    converged = eig["converged"].dropna()
    return RunSummary(
        run=run.name,
        path=str(run.path),
        config={key: run.config.get(key) for key in keys},
        records=len(run.records),
        failed=len(failed_rows),
        first_error=None if failed_rows.empty else str(failed_rows.iloc[0]["error"]),
        last_step=int(rows["step"].max()) if not rows.empty else None,
        trace=trace_value,
        trace_stderr=trace_se,
        trace_step=trace_step,
        lambda_max=lam,
        lambda_max_residual=residual,
        lambda_max_step=lam_step,
        lambda_max_points=len(eig),
        converged_share=float(converged.astype(bool).mean()) if len(converged) else None,
        plateau=run_plateau(rows, **rule),
        curvature_seconds=run.curvature_seconds,
        wall_seconds=run.wall_seconds,
        group=group,
    )


def summarize_runs(
    runs: Sequence[RunData], table: pd.DataFrame, by: str | None = None, **rule: Any
) -> list[RunSummary]:
    """A :class:`RunSummary` per run (sorted by the ``by`` key's value when given, which must be
    a configuration key of some run: :func:`check_by_key`). ``rule``: keyword arguments of
    :func:`~deconcnn_curvature.analysis.plateau.find_plateau` (``threshold``, ``n_boot``...)."""
    if by is not None:
        check_by_key(runs, by)
    keys = distinguishing_keys(runs)
    if by is not None and by not in keys:
        keys.insert(0, by)
    out = []
    for run in runs:
        rows = table[table["run"] == run.name]
        group = run.config.get(by) if by is not None else None
        out.append(_summary(run, rows, keys, group, rule))
    if by is not None:
        out.sort(key=lambda s: (s.group is None, _sort_key(s.group)))
    return out


def _sort_key(value: Any) -> tuple[int, Any]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, value)
    return (1, str(value))
