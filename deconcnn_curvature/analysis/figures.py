"""The sweep figure of ``deconcnn-curv report --plot``: λ_max and the Hessian trace of every run
against step, on shared axes, each point's interval as a band, the λ_max plateau marked."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deconcnn_curvature.analysis.report import RunSummary, lambda_max_rows
from deconcnn_curvature.errors import ConfigurationError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["plot_sweep", "run_colours", "sweep_figure"]

#: Values spanning more than this ratio get a logarithmic axis.
_LOG_RATIO = 20.0
_LINESTYLES = ("-", "--", ":", "-.")


def run_colours(summaries: Sequence[RunSummary], by: str | None) -> tuple[list[str], list[str]]:
    """A colour (hex) and a line style per run: one colour per value of the ``by`` key (line
    styles tell its runs apart), else one colour per run. The report's table colours its rows
    with the same colours."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    if by is None:
        cmap = colormaps["tab10" if len(summaries) <= 10 else "tab20"]
        colours = [to_hex(cmap(i % cmap.N)) for i in range(len(summaries))]
        return colours, ["-"] * len(summaries)
    groups = list(dict.fromkeys(repr(s.group) for s in summaries))
    cmap = colormaps["tab10" if len(groups) <= 10 else "tab20"]
    colour_of = {g: to_hex(cmap(i % cmap.N)) for i, g in enumerate(groups)}
    seen: dict[str, int] = {}
    styles = []
    for s in summaries:
        key = repr(s.group)
        styles.append(_LINESTYLES[seen.get(key, 0) % len(_LINESTYLES)])
        seen[key] = seen.get(key, 0) + 1
    return [colour_of[repr(s.group)] for s in summaries], styles


def _trace_rows(rows: pd.DataFrame) -> pd.DataFrame:
    tr = rows[(rows["quantity"] == "trace") & rows["error"].isna() & rows["value"].notna()]
    return tr.sort_values("step", kind="stable")


def _band(ax: Any, steps: Any, lo: Any, hi: Any, colour: Any) -> None:
    ax.fill_between(steps, lo, hi, color=colour, alpha=0.15, linewidth=0)


def _log_if_wide(ax: Any, values: list[float]) -> None:
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > _LOG_RATIO:
        ax.set_yscale("log")


def _draw_run(axes: Any, s: RunSummary, rows: pd.DataFrame, colour: Any, style: str) -> list:
    """One run's lines, bands and plateau mark; returns the λ_max values drawn."""
    lam_ax, trace_ax = axes
    eig = lambda_max_rows(rows)
    drawn: list[float] = []
    if not eig.empty:
        steps = eig["step"].astype(float).to_numpy()
        value = eig["value"].astype(float).to_numpy()
        res = eig["residual"].astype(float).fillna(0.0).to_numpy()
        _band(lam_ax, steps, value - res, value + res, colour)
        lam_ax.plot(steps, value, style, color=colour, linewidth=1.2)
        drawn = value.tolist()
        p = s.plateau
        if p.found and p.step is not None:
            at = min(range(len(steps)), key=lambda i: abs(steps[i] - p.step))
            xerr = None
            if p.step_interval is not None:
                xerr = [[p.step - p.step_interval[0]], [p.step_interval[1] - p.step]]
            lam_ax.errorbar([p.step], [value[at]], xerr=xerr, fmt="D", color=colour,
                            markeredgecolor="black", markersize=6, capsize=4, zorder=5)  # fmt: skip
    tr = _trace_rows(rows)
    if not tr.empty:
        steps = tr["step"].astype(float).to_numpy()
        lo = tr["ci_low"].astype(float).fillna(tr["value"].astype(float)).to_numpy()
        hi = tr["ci_high"].astype(float).fillna(tr["value"].astype(float)).to_numpy()
        _band(trace_ax, steps, lo, hi, colour)
        trace_ax.plot(steps, tr["value"].astype(float), style, color=colour, linewidth=1.2)
    return drawn


def _label(s: RunSummary, by: str | None) -> str:
    """The legend entry: the ``by`` value, the run, and its plateau epoch (or none)."""
    name = s.run if by is None else f"{s.group}: {s.run}"
    p = s.plateau
    if not p.found:
        return f"{name} (no plateau)"
    if p.epoch_interval is None or p.epoch_interval[0] == p.epoch_interval[1]:
        return f"{name} (plateau: epoch {p.epoch})"
    low, high = p.epoch_interval
    return f"{name} (plateau: epoch {p.epoch} [{low:g}, {high:g}])"


#: More runs than this get a legend entry per ``by`` value instead of one per run.
LEGEND_RUNS = 24


def _legend(
    summaries: Sequence[RunSummary], colours: Sequence[str], styles: Sequence[str], by: str | None
) -> list[Any]:
    """A legend entry per run (with its plateau), or per ``by`` value for large sweeps."""
    from matplotlib.lines import Line2D

    if by is None or len(summaries) <= LEGEND_RUNS:
        return [
            Line2D([], [], color=c, linestyle=style, linewidth=1.5, label=_label(s, by))
            for s, c, style in zip(summaries, colours, styles, strict=True)
        ]
    groups: dict[str, tuple[str, int, int]] = {}
    for s, colour in zip(summaries, colours, strict=True):
        _, runs, found = groups.get(str(s.group), (colour, 0, 0))
        groups[str(s.group)] = (colour, runs + 1, found + s.plateau.found)
    return [
        Line2D([], [], color=c, linewidth=2, label=f"{g}: {n} runs, {k} with a plateau")
        for g, (c, n, k) in groups.items()
    ]


def _epoch_axis(ax: Any, summaries: Sequence[RunSummary]) -> None:
    """Epochs along the top of the λ_max panel when every run has the same steps per epoch (the
    panel's title says so)."""
    spe = {s.plateau.steps_per_epoch for s in summaries if s.plateau.steps_per_epoch}
    if len(spe) != 1:
        return
    (n,) = spe
    ax.secondary_xaxis("top", functions=(lambda x: x / n, lambda e: e * n))


def sweep_figure(
    summaries: Sequence[RunSummary], table: pd.DataFrame, by: str | None = None, title: str = ""
) -> Any:
    """The figure :func:`plot_sweep` saves (a matplotlib ``Figure``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    if table[table["error"].isna() & table["value"].notna()].empty:
        raise ConfigurationError("no usable trace or λ_max measurements to plot.")
    fig = Figure(figsize=(11, 7.5), dpi=120)
    fig.set_layout_engine("constrained")
    axes = fig.subplots(2, 1, sharex=True)
    colours, styles = run_colours(summaries, by)
    lam_values: list[float] = []
    for s, colour, style in zip(summaries, colours, styles, strict=True):
        lam_values += _draw_run(axes, s, table[table["run"] == s.run], colour, style)
    _log_if_wide(axes[0], lam_values)
    _log_if_wide(axes[1], _trace_rows(table)["value"].astype(float).tolist())
    axes[0].set_ylabel("λ_max")
    top = "; top axis: epoch" if len({s.plateau.steps_per_epoch for s in summaries}) == 1 else ""
    axes[0].set_title(f"λ_max (band: Lanczos residual); ◆ plateau, bar: its interval{top}",
                      loc="left", fontsize="small")  # fmt: skip
    axes[1].set_ylabel("Hessian trace")
    axes[1].set_title("trace (band: its confidence interval)", loc="left", fontsize="small")
    axes[1].set_xlabel("optimiser step")
    for ax in axes:
        ax.grid(alpha=0.3)
    _epoch_axis(axes[0], summaries)
    fig.legend(handles=_legend(summaries, colours, styles, by), loc="outside right upper",
               fontsize="small", title=by)  # fmt: skip
    found = sum(s.plateau.found for s in summaries)
    axes[0].set_title(f"plateau found in {found} of {len(summaries)} runs", loc="right",
                      fontsize="small")  # fmt: skip
    if title:
        fig.suptitle(title, fontsize="medium")
    return fig


def plot_sweep(
    summaries: Sequence[RunSummary],
    table: pd.DataFrame,
    path: str | os.PathLike[str],
    by: str | None = None,
    title: str = "",
) -> Path:
    """Draw every run's λ_max and trace against step (shared step axis), intervals as bands,
    each λ_max plateau as a diamond with its interval as a horizontal bar, coloured by the ``by``
    configuration key (runs of one value told apart by line style), and save it as a PNG."""
    fig = sweep_figure(summaries, table, by, title)
    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
    except OSError as exc:
        raise ConfigurationError(f"cannot write {out}: {exc.strerror}.") from None
    return out
