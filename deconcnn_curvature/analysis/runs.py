"""Run folders into one tidy table: :func:`read_runs`, one row per measurement.

A *run folder* is a folder holding a ``curvature.jsonl`` (what ``deconcnn-curv train`` writes, next
to ``config.yaml`` and ``metrics.jsonl``; or only the records file, written by
:class:`~deconcnn_curvature.monitor.CurvatureMonitor` under someone else's training app). A
*sweep folder* is any folder with run folders somewhere below it. :func:`find_runs` turns paths,
globs and sweep folders into run folders; :func:`load_run` reads one; :func:`read_runs` builds the
table. The records are read with the package's own reader (:func:`read_jsonl`), so a line torn by a
crash is skipped with a warning, as everywhere else.

pandas is the ``analysis`` extra: without it, :func:`require_pandas` says how to install it.
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deconcnn_curvature.errors import ConfigurationError
from deconcnn_curvature.monitor.records import read_jsonl
from deconcnn_curvature.results import usable_record

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "MEASUREMENT_COLUMNS",
    "RECORDS_FILE",
    "RunData",
    "check_parquet",
    "find_runs",
    "load_run",
    "load_runs",
    "read_runs",
    "require_pandas",
    "tidy_table",
    "write_table",
]

#: The records file that makes a folder a run folder.
RECORDS_FILE = "curvature.jsonl"
#: The training metrics file of a ``deconcnn-curv train`` run (deconCNN's format).
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
#: The metric of ``metrics.jsonl`` joined to each measurement as ``train_loss``.
LOSS_KEY = "train/loss"

#: The measurement columns of :func:`read_runs`, in order; the run's configuration follows as
#: dotted keys (``optim.lr``). A configuration key equal to one of these gets a ``config.`` prefix.
MEASUREMENT_COLUMNS: tuple[str, ...] = (
    "run",
    "step",
    "epoch",
    "quantity",
    "index",
    "value",
    "stderr",
    "ci_low",
    "ci_high",
    "ci_level",
    "residual",
    "converged",
    "target_met",
    "n_hvp",
    "seconds",
    "backend",
    "method",
    "error",
    "timestamp",
    "train_loss",
    "path",
)

_GLOB_CHARS = frozenset("*?[")
PANDAS_HINT = "pip install 'deconcnn-curvature[analysis]'"


def require_pandas() -> Any:
    """The ``pandas`` module, or a :class:`ConfigurationError` naming the extra to install."""
    try:
        import pandas
    except ImportError:
        raise ConfigurationError(
            f"reading run folders into a table needs pandas, which is not installed: {PANDAS_HINT}"
        ) from None
    return pandas


@dataclass(frozen=True)
class RunData:
    """One run folder as read from disk."""

    path: Path
    name: str
    records: Sequence[Mapping[str, Any]]
    config: Mapping[str, Any] = field(default_factory=dict)
    #: ``(step, value)`` of the training loss from ``metrics.jsonl``, in step order.
    loss: Sequence[tuple[int, float]] = ()
    #: Every ``timestamp`` of both files (seconds since the epoch), for the wall time.
    timestamps: Sequence[float] = ()

    @property
    def wall_seconds(self) -> float | None:
        """Wall time the records span: from the start of the first measurement (or first metrics
        line) to the last line written. ``None`` with fewer than two timestamps. A resumed run's
        pause between segments is counted in."""
        ends = [float(r["timestamp"]) for r in self.records if _number(r.get("timestamp"))]
        starts = [
            float(r["timestamp"]) - _seconds(r) for r in self.records if _number(r.get("timestamp"))
        ]
        stamps = [*self.timestamps, *starts, *ends]
        if len(stamps) < 2:
            return None
        span = max(stamps) - min(stamps)
        return span if span > 0 else None

    @property
    def curvature_seconds(self) -> float:
        """Seconds spent measuring (the records' ``seconds``, summed once per record)."""
        return math.fsum(_seconds(r) for r in self.records)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _seconds(record: Mapping[str, Any]) -> float:
    """A record's measuring time; 0 where it has none (a hand-edited or foreign line)."""
    seconds = record.get("seconds")
    return float(seconds) if _number(seconds) else 0.0


def _as_list(paths_or_globs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list:
    if isinstance(paths_or_globs, str | os.PathLike):
        return [paths_or_globs]
    return list(paths_or_globs)


def _runs_below(folder: Path) -> list[Path]:
    """Run folders at or below ``folder`` (every folder holding a records file)."""
    if (folder / RECORDS_FILE).is_file():
        return [folder]
    found: list[Path] = []

    def unreadable(exc: OSError) -> None:
        raise ConfigurationError(f"cannot read folder {exc.filename}: {exc.strerror}.")

    for root, dirs, files in os.walk(folder, onerror=unreadable):
        dirs.sort()
        if RECORDS_FILE in files:
            found.append(Path(root))
    return found


def find_runs(
    paths_or_globs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
) -> list[Path]:
    """The run folders named by ``paths_or_globs``: run folders, their ``curvature.jsonl``,
    sweep folders (searched recursively) and glob patterns (``runs/lr*``, ``sweep/**``), in
    order, each once. Raises :class:`ConfigurationError` for a path that does not exist, a glob
    that matches nothing, or when no run folder is found at all."""
    items = _as_list(paths_or_globs)
    if not items:
        raise ConfigurationError(
            "no run folders given; name a run folder, a sweep folder or a glob."
        )
    runs: list[Path] = []
    for item in items:
        text = os.fspath(item)
        if not Path(text).exists() and _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            if not matches:
                raise ConfigurationError(f"{text}: the pattern matches nothing.")
            paths = [Path(m) for m in matches]
        else:
            paths = [Path(text).expanduser()]
        for path in paths:
            if not path.exists():
                raise ConfigurationError(f"{path}: no such file or folder.")
            if path.is_file():
                if path.name != RECORDS_FILE:
                    if len(paths) > 1:
                        continue  # a glob also matching other files of a run folder
                    raise ConfigurationError(
                        f"{path}: not a run folder or its {RECORDS_FILE}; name the folder."
                    )
                path = path.parent
            runs.extend(_runs_below(path))
    unique = list(dict.fromkeys(p.resolve() for p in runs))
    if not unique:
        shown = ", ".join(os.fspath(i) for i in items)
        raise ConfigurationError(
            f"no runs found in {shown}: no {RECORDS_FILE} there or in any folder below."
        )
    return unique


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested mapping; lists become JSON text (one scalar per cell)."""
    out: dict[str, Any] = {}
    if isinstance(node, Mapping):
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    key = prefix[:-1]
    out[key] = json.dumps(node) if isinstance(node, list | tuple) else node
    return out


def _read_config(path: Path) -> dict[str, Any]:
    """The flattened ``config.yaml`` of a run folder; ``{}`` when there is none."""
    import yaml

    file = path / CONFIG_FILE
    if not file.is_file():
        return {}
    try:
        loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigurationError(f"{file}: not a readable YAML file ({first}).") from None
    return _flatten(loaded) if isinstance(loaded, Mapping) else {}


def _read_metrics(path: Path, loss_key: str) -> tuple[list[tuple[int, float]], list[float]]:
    file = path / METRICS_FILE
    if not file.is_file():
        return [], []
    loss: list[tuple[int, float]] = []
    stamps: list[float] = []
    for row in _read_records(file):
        if _number(row.get("timestamp")):
            stamps.append(float(row["timestamp"]))
        metrics = row.get("metrics")
        value = metrics.get(loss_key) if isinstance(metrics, Mapping) else None
        if _number(value) and _number(row.get("step")):
            loss.append((int(row["step"]), float(value)))
    loss.sort(key=lambda pair: pair[0])
    return loss, stamps


def _read_records(file: Path) -> list[dict[str, Any]]:
    try:
        rows = read_jsonl(file)
    except OSError as exc:
        raise ConfigurationError(f"cannot read {file}: {exc.strerror}.") from None
    return [r for r in rows if isinstance(r, dict)]


def load_run(
    path: str | os.PathLike[str], name: str | None = None, loss_key: str = LOSS_KEY
) -> RunData:
    """Read one run folder: its records, flattened configuration and training loss."""
    folder = Path(path)
    records = [r for r in _read_records(folder / RECORDS_FILE) if _number(r.get("step"))]
    loss, stamps = _read_metrics(folder, loss_key)
    return RunData(
        path=folder,
        name=name or folder.name,
        records=records,
        config=_read_config(folder),
        loss=loss,
        timestamps=stamps,
    )


def _names(folders: Sequence[Path]) -> list[str]:
    """Short names: each folder relative to the folder all of them share."""
    if len(folders) == 1:
        return [folders[0].name]
    common = Path(os.path.commonpath(folders))
    return [p.relative_to(common).as_posix() for p in folders]


def load_runs(
    paths_or_globs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    loss_key: str = LOSS_KEY,
) -> list[RunData]:
    """:func:`find_runs`, then :func:`load_run` on each (named relative to their shared folder)."""
    folders = find_runs(paths_or_globs)
    return [load_run(p, n, loss_key) for p, n in zip(folders, _names(folders), strict=True)]


def _num(value: Any) -> float | None:
    return float(value) if _number(value) else None


def _int(value: Any) -> int | None:
    return int(value) if _number(value) and float(value).is_integer() else None


def _flag(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _measurement_rows(run: RunData) -> list[dict[str, Any]]:
    """One row per scalar measurement of ``run``: a trace, or each eigenvalue of a record.
    Every field is taken only when it has the type the monitor writes (a hand-edited or foreign
    line with a string for a number gives an empty cell, and an unusable value an ``error``)."""
    rows = []
    for rec in run.records:
        quantity = rec.get("quantity")
        if quantity not in ("trace", "eigenvalues"):
            continue  # density and layer traces are not scalars: read them with read_jsonl
        details = rec.get("details") if isinstance(rec.get("details"), Mapping) else {}
        error = _text(rec.get("error"))
        if error is None and not usable_record(rec):
            error = "unusable record: value null or non-finite without an error"
        ci = rec.get("ci") if isinstance(rec.get("ci"), list | tuple) else ()
        base = {
            "run": run.name, "step": int(rec["step"]), "epoch": _int(rec.get("epoch")),
            "quantity": quantity, "stderr": _num(rec.get("stderr")),
            "ci_level": _num(rec.get("ci_level")), "target_met": _flag(rec.get("target_met")),
            "n_hvp": _int(rec.get("n_hvp")), "seconds": _num(rec.get("seconds")),
            "backend": _text(rec.get("backend")), "method": _text(rec.get("method")),
            "error": error, "timestamp": _num(rec.get("timestamp")), "path": str(run.path),
        }  # fmt: skip
        value = rec.get("value") if error is None else None
        if quantity == "trace":
            low, high = (_num(ci[0]), _num(ci[1])) if len(ci) == 2 else (None, None)
            rows.append({**base, "value": _num(value), "ci_low": low, "ci_high": high})
            continue
        values = value if isinstance(value, list) and value else [None]
        residuals = details.get("residuals")
        residuals = residuals if isinstance(residuals, list) else []
        for i, eig in enumerate(values):
            rows.append({
                **base, "index": i + 1, "value": _num(eig),
                "residual": _num(residuals[i]) if i < len(residuals) else None,
                "converged": _flag(details.get("converged")),
            })  # fmt: skip
    return rows


def tidy_table(runs: Sequence[RunData]) -> pd.DataFrame:
    """The table of :func:`read_runs` from runs already read (:func:`load_runs`)."""
    pd = require_pandas()
    frames = []
    for run in runs:
        frame = pd.DataFrame(_measurement_rows(run), columns=list(MEASUREMENT_COLUMNS))
        frame = _join_loss(pd, frame, run.loss)
        for key, value in run.config.items():
            column = f"config.{key}" if key in MEASUREMENT_COLUMNS else key
            frame[column] = value
        frames.append(frame)
    if not frames:
        frames = [pd.DataFrame(columns=list(MEASUREMENT_COLUMNS))]
    table = pd.concat(frames, ignore_index=True, sort=False)
    return _typed(pd, table)


def _join_loss(pd: Any, frame: Any, loss: Sequence[tuple[int, float]]) -> Any:
    """``train_loss``: the loss logged at the measurement's step or the nearest step before."""
    if frame.empty or not loss:
        return frame
    lhs = frame.drop(columns="train_loss").reset_index(names="_row")
    lhs["step"] = lhs["step"].astype("int64")
    lhs = lhs.sort_values("step", kind="stable")
    rhs = pd.DataFrame(loss, columns=["step", "train_loss"]).astype({"step": "int64"})
    rhs = rhs.drop_duplicates("step", keep="last")
    joined = pd.merge_asof(lhs, rhs, on="step", direction="backward")
    joined = joined.sort_values("_row").drop(columns="_row").reset_index(drop=True)
    return joined[list(frame.columns)]


def _typed(pd: Any, table: Any) -> Any:
    """Nullable dtypes: integers stay integers and booleans booleans next to missing values."""
    kinds = {
        "step": "Int64", "epoch": "Int64", "index": "Int64", "n_hvp": "Int64",
        "converged": "boolean", "target_met": "boolean",
        "value": "float64", "stderr": "float64", "ci_low": "float64", "ci_high": "float64",
        "ci_level": "float64", "residual": "float64", "seconds": "float64",
        "timestamp": "float64", "train_loss": "float64",
        "run": "string", "quantity": "string", "backend": "string", "method": "string",
        "error": "string", "path": "string",
    }  # fmt: skip
    present = {k: v for k, v in kinds.items() if k in table.columns}
    return table.astype(present)


def read_runs(
    paths_or_globs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    loss_key: str = LOSS_KEY,
) -> pd.DataFrame:
    """Every curvature measurement of the runs named, as one pandas DataFrame.

    ``paths_or_globs``: run folders, their ``curvature.jsonl``, sweep folders (searched
    recursively for run folders) or glob patterns, or a list of them.

    One row per measurement and scalar: a trace record gives one row; an eigenvalues record one
    row per eigenvalue, ``index`` 1 for λ_max (λ₁), 2 for λ₂, ... (``<NA>`` for the trace).
    Columns (:data:`MEASUREMENT_COLUMNS`): ``run`` (the folder relative to the folder the runs
    share), ``step``, ``epoch``, ``quantity`` (``trace`` | ``eigenvalues``), ``index``,
    ``value``, ``stderr``, ``ci_low``/``ci_high``/``ci_level`` (the trace's interval),
    ``residual`` (the Lanczos residual norm of that eigenvalue, which bounds its distance to an
    eigenvalue of the measured Hessian), ``converged`` (eigenvalues), ``target_met`` (an
    ``rtol`` trace), ``n_hvp``, ``seconds``, ``backend``, ``method``, ``error``, ``timestamp``,
    ``train_loss`` (``loss_key`` from ``metrics.jsonl`` at that step or the nearest before),
    ``path`` (the run folder); then the run's ``config.yaml`` flattened to dotted keys
    (``optim.lr``; lists as JSON text; empty for a folder without one).

    A failed measurement is a row with ``value`` missing and ``error`` saying why, never a bare
    NaN. ``n_hvp`` and ``seconds`` belong to the record: with ``k > 1`` they repeat on each
    eigenvalue's row (sum them over ``index <= 1`` rows). Density records are left out (not
    scalars). Lines torn by a crash are skipped with a ``TornLineWarning``.
    """
    require_pandas()
    return tidy_table(load_runs(paths_or_globs, loss_key))


def write_table(table: pd.DataFrame, path: str | os.PathLike[str], fmt: str | None = None) -> Path:
    """Write the tidy table as ``fmt`` (``"csv"`` or ``"parquet"``; by default Parquet when
    ``path`` ends in ``.parquet``, else CSV). Parquet needs pyarrow: without it a
    :class:`ConfigurationError` says ``pip install pyarrow``."""
    out = Path(path)
    fmt = fmt or ("parquet" if out.suffix.lower() == ".parquet" else "csv")
    if fmt not in ("csv", "parquet"):
        raise ConfigurationError(f"table format must be csv or parquet; got {fmt!r}.")
    if fmt == "parquet":
        check_parquet()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "parquet":
            table.to_parquet(out, index=False)
        else:
            table.to_csv(out, index=False)
    except OSError as exc:
        raise ConfigurationError(f"cannot write {out}: {exc.strerror}.") from None
    return out


def check_parquet() -> None:
    """Raise a one-line :class:`ConfigurationError` when pyarrow (Parquet) is not installed."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            "writing Parquet needs pyarrow, which is not installed: pip install pyarrow "
            "(or write CSV)."
        ) from None
