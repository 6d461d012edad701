"""The one presentation module: how results look in a terminal and in a figure.

Tables (:func:`_table`, :func:`_value_rows`, number formatting) and the spectral-density figure
(:func:`_density_figure`, :func:`plot_density`) that ``deconcnn-curv estimate | compare | density``
print and save, and what each of those commands shows (:func:`show_estimate`,
:func:`show_compare`, :func:`show_density`, :func:`density_json`, the checkpoint header, the
smoothed density :func:`smooth`); the curvature-against-step figure (:func:`plot_curvature`)
and the run summary (:func:`summary_table`, of a ``training.run.RunResult``) that
``deconcnn-curv train`` shows.
Nothing here computes curvature; it formats results the library returned.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deconcnn_curvature.errors import ConfigurationError
from deconcnn_curvature.results import CurvatureResult, Density, usable_record

if TYPE_CHECKING:
    from deconcnn_curvature.checkpoints import LoadedCheckpoint


def format_value(value: Any) -> str:
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
    return f"[{format_value(lo)}, {format_value(hi)}]{level}"


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
                f"{len(value.nodes)} nodes in [{format_value(lo)}, {format_value(hi)}]",
                "",
                f"{value.num_runs} runs x {value.lanczos_steps} steps",
            )
        ]
        return rows  # no trace: SLQ gives one probe per run (deconcnn-curv estimate -q trace)
    if isinstance(value, list | tuple):
        return [(f"λ{i + 1}", format_value(float(v)), "", "") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        rows = []
        total = 0.0
        for name, v in value.items():
            if isinstance(v, torch.Tensor):
                total += float(v.sum())
                rows.append(
                    (
                        str(name),
                        f"sum {format_value(float(v.sum()))}",
                        "",
                        f"min {format_value(float(v.min()))}, max {format_value(float(v.max()))}",
                    )
                )
            else:
                total += float(v)
                rows.append((str(name), format_value(float(v)), "", ""))
        return [
            (f"{q} (total)", format_value(total), format_value(result.stderr), _fmt_ci(result)),
            *rows,
        ]
    return [(q, format_value(value), format_value(result.stderr), _fmt_ci(result))]


def _short_value(result: CurvatureResult) -> str:
    value = result.value
    if isinstance(value, Density):
        return f"SLQ, {len(value.nodes)} nodes"
    if isinstance(value, list | tuple):
        return ", ".join(format_value(float(v)) for v in value)
    if isinstance(value, Mapping):
        return _value_rows(result)[0][1]
    return format_value(value)


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


def default_sigma(density: Density) -> float:
    lo, hi = min(density.nodes), max(density.nodes)
    spread = hi - lo
    return spread / 100 if spread > 0 else max(abs(hi), 1.0) * 1e-3


def _grid(density: Density, eigenvalues: list[float], sigma: float, points: int) -> Any:
    import numpy as np

    values = [*density.nodes, *eigenvalues]
    return np.linspace(min(values) - 5 * sigma, max(values) + 5 * sigma, points)


def check_plot_path(path: Path) -> None:
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


def density_title(checkpoint: str | os.PathLike[str]) -> str:
    """The density plot's title: the checkpoint's path as the user gave it (``runs/a/last.ckpt``,
    not ``last.ckpt``: every run folder holds a ``last.ckpt``)."""
    return f"Hessian spectral density: {os.fspath(checkpoint)}"


def plot_density(
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


def _compare_table(
    rows: Sequence[Mapping[str, Any]], title: str, mem_col: str
) -> tuple[Table, list[Mapping[str, Any]]]:
    """The side-by-side table of ``deconcnn-curv compare`` (one row per backend; a backend that
    did not run gets its status and a footnote number) and the rows that failed, in footnote
    order."""
    from rich.markup import escape

    table = _table(
        title,
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
    failures: list[Mapping[str, Any]] = []
    for r in rows:
        if r["status"] != "ok":
            failures.append(r)
            table.add_row(r["backend"], "—", "", "", "", "", "", f"{r['status']} [{len(failures)}]")
            continue
        res: CurvatureResult = r["_result"]
        note = res.method + (" (exact)" if res.exact else "")
        if res.quantity == "eigenvalues" and (res.details or {}).get("converged") is False:
            note += f"; NOT converged ({unconverged_advice(res.details)})"
        if r.get("ignored_options"):
            note += f"; ignored {', '.join(r['ignored_options'])}"
        table.add_row(
            r["backend"],
            _short_value(res),
            format_value(res.stderr),
            _fmt_ci(res),
            str(res.n_hvp),
            f"{res.seconds:.2f}",
            _fmt_bytes(r["peak_memory_bytes"]),
            escape(note),
        )
    return table, failures


# --------------------------------------------------------------------------------------------
# the checkpoint commands (deconcnn-curv estimate | compare | density)


def print_header(out: Console, path: Path, loaded: LoadedCheckpoint, device: torch.device) -> None:
    meta = loaded.metadata
    when = ", ".join(f"{k} {meta[k]}" for k in ("epoch", "global_step") if k in meta)
    out.print(f"[bold]checkpoint[/bold] {escape(str(path))}" + (f" ({when})" if when else ""))
    out.print(f"[bold]model[/bold]      {escape(loaded.model_description)}")
    out.print(f"[bold]data[/bold]       {escape(loaded.data_description)}")
    out.print(f"[bold]device[/bold]     {device}")


def unconverged_advice(
    details: Mapping[str, Any] | None, more_products: str = "raise -o max_hvps"
) -> str:
    """What to do about unconverged eigenvalues: the solver's own ``note`` where it stopped at
    the rounding floor of the products (more products would not help), else ``more_products``
    (how this front end raises the backend's max_hvps)."""
    note = (details or {}).get("note")
    return str(note) if note else more_products


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
            f"only; {unconverged_advice(details)}.",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


def smooth(
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


def density_json(
    checkpoint: Path,
    loaded: LoadedCheckpoint,
    dev: Any,
    density_full: dict[str, Any],
    dens: CurvatureResult,
    eig: CurvatureResult | None,
    width: float,
    grid: Any,
    curve: Any,
    plot_path: Path | None,
) -> dict[str, Any]:
    """``deconcnn-curv density --json``: the results, the smoothed curve and the plot's path."""
    return {
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


def show_density(
    out: Console,
    checkpoint: Path,
    dens: CurvatureResult,
    eig: CurvatureResult | None,
    backend_name: str,
    seed: int,
    width: float,
    plot_path: Path | None,
) -> None:
    """``deconcnn-curv density``'s table of the density and the eigenvalues, and its notes."""
    table = _table(
        f"spectral density — backend {backend_name}, seed {seed}",
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
        f"trace: deconcnn-curv estimate {escape(str(checkpoint))} -q trace"
    )
    if plot_path is not None:
        out.print(f"plot written to {escape(str(plot_path))} (σ = {width:.3g})")


def show_estimate(
    out: Console, result: CurvatureResult, quantity: str, backend_name: str, quiet: bool
) -> None:
    """``deconcnn-curv estimate``'s table of one result, and what the result says about itself
    (unconverged eigenvalues, whether rtol was met: shown even with --quiet)."""
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


def show_compare(
    out: Console,
    rows: Sequence[Mapping[str, Any]],
    title: str,
    memory_column: str,
    memory_note: str | None,
) -> None:
    """``deconcnn-curv compare``'s table, each failure's reason below it, and (unless None) what
    the peak-memory column measures."""
    table, failures = _compare_table(rows, title, memory_column)
    out.print(table)
    # Reasons are whole sentences with a fix; they read better below the table than folded
    # into a narrow column.
    for i, r in enumerate(failures, 1):
        out.print(
            f"[{i}] {r['backend']} {r['status']}: {r['reason']}", markup=False, highlight=False
        )
    if memory_note is not None:
        out.print(f"peak memory: {memory_note}")


# --------------------------------------------------------------------------------------------
# a training run: the curvature figure and the summary table (deconcnn-curv train)


def _series(
    records: Sequence[Mapping[str, Any]], quantity: str
) -> tuple[list[int], list[float], list[float], list[float], list[int], list[bool]]:
    """Steps, values, lower/upper error-bar lengths and converged flags of ``quantity`` (a flag
    is ``False`` only where the record's ``details["converged"]`` says so); failed steps apart."""
    steps, values, low, high, failed, converged = [], [], [], [], [], []
    for rec in records:
        if rec.get("quantity") != quantity:
            continue
        value = rec.get("value")
        if value is None:
            failed.append(int(rec["step"]))
            continue
        if quantity == "eigenvalues":
            value = value[0]
            residuals = (rec.get("details") or {}).get("residuals") or []
            err = abs(float(residuals[0])) if residuals else 0.0
            lo = hi = err
        else:
            ci = rec.get("ci")
            stderr = rec.get("stderr")
            if ci is not None:
                lo, hi = value - ci[0], ci[1] - value
            elif stderr is not None:
                lo = hi = 1.96 * float(stderr)
            else:
                lo = hi = 0.0
        steps.append(int(rec["step"]))
        values.append(float(value))
        low.append(max(0.0, float(lo)))
        high.append(max(0.0, float(hi)))
        converged.append((rec.get("details") or {}).get("converged") is not False)
    return steps, values, low, high, failed, converged


#: How each eigenvalue method of a record's ``method`` ("rayleigh_ritz+lanczos") is named.
_EIGEN_METHODS = {"lanczos": "Lanczos", "rayleigh_ritz": "Hutch++ sketch"}


def _eigen_bar_label(records: Sequence[Mapping[str, Any]]) -> str:
    """What the λ_max error bars are, from the records themselves: each value's Ritz residual
    ``‖Hv − θv‖`` (some eigenvalue lies within it), named with the methods that produced the
    values (Lanczos for pyhessian; the Hutch++ sketch, refined by Lanczos, for hutchpp)."""
    eig = [r for r in records if r.get("quantity") == "eigenvalues" and r.get("value") is not None]
    if not any((r.get("details") or {}).get("residuals") for r in eig):
        return "none (no residuals recorded)"
    names: list[str] = []
    for rec in eig:
        for part in str(rec.get("method") or "").split("+"):
            name = _EIGEN_METHODS.get(part, part)
            if name and name not in names:
                names.append(name)
    return "Ritz residual" + (f" ({' + '.join(names)})" if names else "")


#: Positive values whose largest is more than this many times their smallest get a logarithmic
#: axis (so a late trend stays visible under early values ten times larger); values of both signs
#: spanning 100 times this in magnitude get a symmetric-log one.
_LOG_RATIO = 5.0
#: An error bar may widen the axis by this fraction of the points' span (or twice the median bar,
#: if more); a longer one is clipped at the edge and marked with an arrow.
_BAR_ROOM = 0.3


def _scale_and_limits(
    values: Sequence[float], bar_ends: Sequence[float] = ()
) -> tuple[str, float, float]:
    """The y-axis for ``values``: ``"log"`` when all are positive and span more than
    :data:`_LOG_RATIO`, ``"symlog"`` when they change sign and span decades in magnitude,
    else ``"linear"``. The limits come from the points (padded); an error-bar end widens them only
    within :data:`_BAR_ROOM` of the points' span or twice the median bar, so one wild interval
    cannot flatten the rest. ``bar_ends``: the lower ends, then the upper ends, of ``values``."""
    lo, hi = min(values), max(values)
    nonzero = [abs(v) for v in values if v != 0.0]
    spread = max(nonzero) / min(nonzero) if nonzero else 1.0
    if lo > 0 and spread > _LOG_RATIO:
        scale = "log"
    elif lo < 0 < hi and spread > 100 * _LOG_RATIO:
        scale = "symlog"
    else:
        scale = "linear"
    if scale == "log":
        fwd, back = math.log10, lambda t: 10.0**t
        ends = [e for e in bar_ends if e > 0 and math.isfinite(e)]
    else:
        fwd, back = float, float
        ends = [e for e in bar_ends if math.isfinite(e)]
    t0, t1 = fwd(lo), fwd(hi)
    span = t1 - t0 if t1 > t0 else 0.2 * max(abs(t1), 1e-12)
    # Room for bars: a share of the points' span, or twice the median bar (robust to a wild one).
    pairs = zip(bar_ends, [*values, *values], strict=False)
    usable = [(e, v) for e, v in pairs if math.isfinite(e) and (scale != "log" or e > 0)]
    lengths = sorted(abs(fwd(e) - fwd(v)) for e, v in usable)
    median = lengths[len(lengths) // 2] if lengths else 0.0
    room = max(_BAR_ROOM * span, 2.0 * median)
    t0 = min([t0, *(fwd(e) for e in ends if t0 - room <= fwd(e) < t0)])
    t1 = max([t1, *(fwd(e) for e in ends if t1 < fwd(e) <= t1 + room)])
    pad = 0.06 * (t1 - t0 if t1 > t0 else span)
    return scale, back(t0 - pad), back(t1 + pad)


def _mark_unconverged(
    ax: Any, steps: Sequence[int], values: Sequence[float], converged: Sequence[bool], size: float
) -> None:
    """Draw the values whose solver stopped unconverged as hollow markers, with a legend entry:
    such a value is the top Ritz value, a lower bound of λ_max, not λ_max."""
    points = [(s, v) for s, v, ok in zip(steps, values, converged, strict=True) if not ok]
    if not points:
        return
    xs, ys = zip(*points, strict=True)
    ax.plot(
        xs, ys, linestyle="none", marker="o", markersize=size * 1.8, markerfacecolor="white",
        markeredgecolor="tab:blue", markeredgewidth=1.5, zorder=3,
        label=f"not converged ({len(points)}): a lower bound of λ_max",
    )  # fmt: skip
    ax.legend(loc="best", fontsize="small", framealpha=0.8)


_MARKER = 4.0  # marker size in points of the curvature panels

#: A drawn curvature panel: its axes, its notes (completed after layout), steps, values, upper bars.
_Drawn = tuple[Any, list[str], list[int], list[float], list[float]]


def _clip_marks(ax: Any, steps: Sequence[int], values: Sequence[float], low: Sequence[float],
                high: Sequence[float], limits: tuple[float, float]) -> bool:  # fmt: skip
    """Mark intervals beyond the axis with an arrow at the edge; whether there were any."""
    y0, y1 = limits
    up = [(s, y1) for s, v, h in zip(steps, values, high, strict=True) if v + h > y1]
    down = [(s, y0) for s, v, d in zip(steps, values, low, strict=True) if v - d < y0]
    for pts, sym in ((up, "^"), (down, "v")):
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, linestyle="none", marker=sym, color="tab:orange", markersize=7,
                    clip_on=False)  # fmt: skip
    return bool(up or down)


def _curvature_panel(
    ax: Any, records: Sequence[Mapping[str, Any]], quantity: str, label: str, bars: str
) -> _Drawn | None:
    """One quantity's panel: points with error bars on an axis scaled to them, failed steps as
    red lines, unconverged values hollow, the last value written at the right."""
    steps, values, low, high, failed, converged = _series(records, quantity)
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    notes = [f"{label} bars: {bars}"]
    for step in failed:
        ax.axvline(step, color="tab:red", linestyle=":")
    if failed:
        notes.append(f"red: {len(failed)} failed")
    if not steps:
        ax.text(0.5, 0.5, "every measurement failed", transform=ax.transAxes, ha="center")
        ax.set_title("; ".join(notes), loc="left", fontsize="small")
        return None
    ends = [v - d for v, d in zip(values, low, strict=True)]
    ends += [v + d for v, d in zip(values, high, strict=True)]
    scale, y0, y1 = _scale_and_limits(values, ends)
    if scale == "symlog":
        ax.set_yscale("symlog", linthresh=min(abs(v) for v in values if v != 0.0))
    else:
        ax.set_yscale(scale)
    ax.set_ylim(y0, y1)
    ax.errorbar(
        steps, values, yerr=[low, high], fmt="o-", markersize=_MARKER, capsize=3,
        linewidth=1.2, color="tab:blue",
    )  # fmt: skip
    _mark_unconverged(ax, steps, values, converged, _MARKER)
    if _clip_marks(ax, steps, values, low, high, (y0, y1)):
        notes.append("▲▼ interval beyond the axis")
    if scale != "linear":
        ax.set_ylabel(f"{label} ({scale} scale)")
    v, lo, hi = values[-1], low[-1], high[-1]
    if quantity == "trace":
        text = f"step {steps[-1]}: {v:.4g} [{v - lo:.4g}, {v + hi:.4g}]"
    else:
        text = f"step {steps[-1]}: {v:.4g} ± {hi:.2g}"
    ax.set_title(text, loc="right", fontsize="small")
    return ax, notes, steps, values, high


def _loss_panel(ax: Any, loss: Sequence[tuple[int, float]]) -> None:
    loss_steps, loss_values = zip(*loss, strict=True)
    ax.plot(loss_steps, loss_values, color="tab:green", linewidth=1.0)
    scale, y0, y1 = _scale_and_limits(loss_values)
    ax.set_yscale("log" if scale == "log" else "linear")
    ax.set_ylim(y0, y1)
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.set_title("training loss (train/loss, metrics.jsonl)", loc="left", fontsize="small")
    ax.set_title(f"step {loss_steps[-1]}: {loss_values[-1]:.4g}", loc="right", fontsize="small")


def _note_hidden_bars(fig: Any, drawn: Sequence[_Drawn]) -> None:
    """A bar shorter than the marker's radius on screen cannot be seen: say so in the note."""
    fig.draw_without_rendering()
    radius = _MARKER / 2 * fig.dpi / 72
    for ax, notes, steps, values, high in drawn:
        pixels = [
            abs(ax.transData.transform((s, v + h))[1] - ax.transData.transform((s, v))[1])
            for s, v, h in zip(steps, values, high, strict=True)
        ]
        hidden = sum(p < radius for p in pixels)
        if hidden == len(pixels):
            notes.insert(1, "bars smaller than the markers")
        elif hidden:
            notes.insert(1, f"{hidden}/{len(pixels)} bars smaller than the markers")
        ax.set_title("; ".join(notes), loc="left", fontsize="small")


def curvature_figure(
    records: Sequence[Mapping[str, Any]],
    title: str = "",
    loss: Sequence[tuple[int, float]] = (),
) -> Any:
    """The figure :func:`plot_curvature` saves (a matplotlib ``Figure``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    panels = [
        ("trace", "Hessian trace", "95 % confidence interval"),
        ("eigenvalues", "λ_max", _eigen_bar_label(records)),
    ]
    present = [p for p in panels if any(r.get("quantity") == p[0] for r in records)]
    if not present:
        raise ConfigurationError("no trace or eigenvalue records to plot.")
    rows = len(present) + (1 if loss else 0)
    heights = [3] * len(present) + ([2] if loss else [])
    fig = Figure(figsize=(8, 1.0 + 2.6 * len(present) + (1.8 if loss else 0)), dpi=120)
    fig.set_layout_engine("constrained")
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False, height_ratios=heights)[:, 0]
    drawn = [
        d
        for ax, (quantity, label, bars) in zip(axes, present, strict=False)
        if (d := _curvature_panel(ax, records, quantity, label, bars)) is not None
    ]
    if loss:
        _loss_panel(axes[-1], loss)
    axes[-1].set_xlabel("optimiser step")
    if title:
        fig.suptitle(title, fontsize="medium")
    _note_hidden_bars(fig, drawn)
    return fig


def plot_curvature(
    records: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    title: str = "",
    loss: Sequence[tuple[int, float]] = (),
) -> Path:
    """Draw the trace (error bars: its confidence interval) and λ_max (error bars: the Ritz
    residual, which bounds the distance to an eigenvalue; the panel names the method; a value
    whose solver did not converge is a hollow marker with a legend entry) against step, and the
    training ``loss`` (``(step, value)`` pairs, e.g. :func:`read_training_loss`) under them on the
    same axis. Each panel is scaled to its points (a log axis where positive values span more than
    :data:`_LOG_RATIO` times); an interval
    reaching beyond the axis is clipped and marked with an arrow at the edge; the last value and
    its interval are written in the panel; failed measurements (``value`` null) are skipped and
    marked with a red line. Writes a PNG with matplotlib's Agg backend and returns its path."""
    fig = curvature_figure(records, title, loss)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def _fmt_run(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def curvature_time(result: Any) -> str:
    """Time spent measuring, as a share of the wall time of the same stretch of training: after a
    resume, the records of this segment (steps past the checkpoint's) over its wall time."""
    recs = [
        r for r in result.records if int(r["step"]) > result.start_step or not result.start_step
    ]
    spent = sum(float(r.get("seconds") or 0.0) for r in recs)
    share = spent / result.seconds if result.seconds > 0 else float("nan")
    if result.start_step:
        return (
            f"{spent:.1f} s since the resume at step {result.start_step} "
            f"({share:.0%} of this segment's wall time)"
        )
    return f"{spent:.1f} s ({share:.0%} of the wall time)"


def budget_share(records: Sequence[Mapping[str, Any]]) -> str | None:
    """A time-budgeted run's achieved share of training time against its target, from the
    records (``budget`` field: the monitor's own clock); ``None`` for a run without a budget."""
    budgeted = [r for r in records if r.get("budget")]
    if not budgeted:
        return None
    last = budgeted[-1]["budget"]
    spent = float(last.get("spent_seconds") or 0.0) + sum(
        float(r.get("seconds") or 0.0) for r in budgeted if r["step"] == budgeted[-1]["step"]
    )
    train = float(last.get("train_seconds") or 0.0)
    share = f"{spent / train:.1%}" if train > 0 else "n/a"
    target = []
    if last.get("max_overhead") is not None:
        target.append(f"{last['max_overhead']:.1%} of training time")
    if last.get("max_seconds") is not None:
        target.append(f"{last['max_seconds']:g} s per measurement")
    skipped = len({r["step"] for r in budgeted if r.get("skipped")})
    measured = len({r["step"] for r in budgeted if r.get("value") is not None})
    return (
        f"{share} of training time measuring (target: {' and '.join(target)}); "
        f"{measured} step{'' if measured == 1 else 's'} measured, {skipped} skipped to stay "
        "within it"
    )


def _unconverged_mark(rec: Mapping[str, Any]) -> str:
    return ", UNCONVERGED" if (rec.get("details") or {}).get("converged") is False else ""


def _unconverged_row(table: Table, eigs: list[Mapping[str, Any]]) -> None:
    """Say how many λ_max values stopped at the solver's cap (``details["converged"]`` false)."""
    bad = [r for r in eigs if (r.get("details") or {}).get("converged") is False]
    if bad:
        table.add_row(
            "λ_max unconverged",
            f"{len(bad)} of {len(eigs)} measurements (first at step {bad[0]['step']}): the "
            "solver stopped at its cap; raise it, e.g. with the override "
            f"++curvature.backend_options.max_hvps={2 * int(bad[0].get('n_hvp') or 50)}",
        )


def summary_table(result: Any) -> Table:
    """A rich table of the run: where its files are, final metrics, the curvature measured."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"deconcnn-curv train: {result.run_dir}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    minutes = result.seconds / 60
    table.add_row("steps / epochs", f"{result.global_step} / {result.epochs}")
    table.add_row("training wall time", f"{result.seconds:.1f} s ({minutes:.1f} min)")
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        if key in result.metrics:
            table.add_row(key, _fmt_run(result.metrics[key]))
    recs = list(result.records)
    if recs:
        ok = [r for r in recs if usable_record(r)]  # failed or unusable: skipped
        failed = [r for r in recs if not usable_record(r) and not r.get("skipped")]
        steps = sorted({int(r["step"]) for r in recs})
        table.add_row(
            "curvature records",
            f"{len(ok)} ok, {len(failed)} failed, at {len(steps)} steps ({steps[0]}…{steps[-1]})",
        )
        table.add_row("curvature time", curvature_time(result))
        budget = budget_share(recs)
        if budget is not None:
            table.add_row("curvature budget", budget)
        last_trace = next((r for r in reversed(ok) if r["quantity"] == "trace"), None)
        if last_trace is not None:
            table.add_row(
                f"trace @ step {last_trace['step']}",
                f"{_fmt_run(last_trace['value'])} ± {_fmt_run(last_trace.get('stderr'), 2)} "
                f"({last_trace.get('n_hvp')} HVPs, {last_trace.get('backend')})",
            )
        last_eig = next((r for r in reversed(ok) if r["quantity"] == "eigenvalues"), None)
        if last_eig is not None:
            residuals = (last_eig.get("details") or {}).get("residuals") or [None]
            table.add_row(
                f"λ_max @ step {last_eig['step']}",
                f"{_fmt_run(last_eig['value'][0])} (residual {_fmt_run(residuals[0], 2)}, "
                f"{last_eig.get('n_hvp')} HVPs{_unconverged_mark(last_eig)})",
            )
            _unconverged_row(table, [r for r in ok if r["quantity"] == "eigenvalues"])
        if failed:
            table.add_row("first failure", escape(str(failed[0].get("error"))))
    else:
        note = getattr(result, "curvature_note", None)
        table.add_row("curvature", note or "off (curvature.enabled=false)")
    for label, path in (
        ("config", result.config_path),
        ("metrics", result.metrics_path),
        ("curvature file", result.curvature_path),
        ("checkpoint", result.checkpoint_path),
        ("plot", result.plot_path),
    ):
        if path is not None:
            table.add_row(label, escape(str(path)))
    return table


# --------------------------------------------------------------------------------------------
# a sweep of runs: the report table (deconcnn-curv report)
def _fmt_interval(value: float | None, interval: Sequence[float] | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if interval is None:
        return f"{value:.{digits}g}"
    return f"{value:.{digits}g} [{interval[0]:.{digits}g}, {interval[1]:.{digits}g}]"


def _plateau_cells(plateau: Any) -> tuple[str, str]:
    """The plateau's epoch and step cells: value [interval], or why there is none."""
    if not plateau.found:
        why = "too few points" if (plateau.reason or "").startswith("too few") else "never flat"
        return f"none ({why})", "—"
    return (
        _fmt_interval(plateau.epoch, plateau.epoch_interval),
        _fmt_interval(plateau.step, plateau.step_interval, digits=6),
    )


def report_table(
    summaries: Sequence[Any],
    keys: Sequence[str],
    colours: Sequence[str] = (),
    title: str = "deconcnn-curv report",
) -> Table:
    """A row per run (``analysis.report.RunSummary``): the configuration ``keys`` that tell the
    runs apart, the last trace ± stderr and λ_max, the converged share of λ_max, failed
    measurements, the λ_max plateau epoch and step with their intervals, the λ_max points (marked
    when under the plateau guide's minimum) and the share of wall time spent measuring. Each
    run's name takes its colour from ``colours`` (hex, the figure's)."""
    measured = ["trace (last)", "λ_max (last)", "converged", "failed", "plateau epoch [95 %]",
                "plateau step [95 %]", "λ_max points", "curvature time"]  # fmt: skip
    columns = [("run", "left"), *((k, "right") for k in [*keys, *measured])]
    table = _table(title, columns)
    for i, s in enumerate(summaries):
        name = escape(s.run) if i >= len(colours) else f"[{colours[i]}]{escape(s.run)}[/]"
        trace = "—" if s.trace is None else f"{s.trace:.4g} ± {_fmt_run(s.trace_stderr, 2)}"
        conv = "—" if s.converged_share is None else f"{s.converged_share:.0%}"
        points = f"{s.lambda_max_points}" + (" [yellow](< 100)[/]" if s.few_points else "")
        share = "—" if s.curvature_share is None else f"{s.curvature_share:.0%}"
        failed = f"[red]{s.failed}[/]" if s.failed else "0"
        epoch, step = _plateau_cells(s.plateau)
        values = [escape(str(s.config.get(k, "—"))) for k in keys]
        table.add_row(name, *values, trace, _fmt_run(s.lambda_max), conv, failed, epoch, step,
                      points, share)  # fmt: skip
    return table
