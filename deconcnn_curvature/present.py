"""The one presentation module: how results look in a terminal and in a figure.

Tables (:func:`_table`, :func:`_value_rows`, number formatting) and the spectral-density figure
(:func:`_density_figure`, :func:`_plot`) that ``deconcnn-curv estimate | compare | density``
print and save. Nothing here computes curvature; it formats results the library returned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from deconcnn_curvature.errors import ConfigurationError
from deconcnn_curvature.results import CurvatureResult, Density


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
