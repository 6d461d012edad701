"""curvature.png: each panel scaled to its points, wild intervals clipped and marked, the last value
in the panel, invisible bars said, failed records skipped, the training loss underneath.

The step-8 interval of the demo (-4,829 to 6,775) used to set the trace panel's y-range,
so the later values (287 ± 44) sat flattened at zero, and the λ_max panel promised error bars too
small to see.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")

from deconcnn_curvature.present import curvature_figure, plot_curvature
from deconcnn_curvature.training.run import read_training_loss


def _trace(step: int, value: float | None, lo: float, hi: float) -> dict[str, Any]:
    return {
        "step": step, "quantity": "trace", "value": value,
        "ci": None if value is None else [lo, hi], "stderr": None if value is None else 1.0,
        "error": None if value is not None else "BackendFailedError: boom",
    }  # fmt: skip


def _eig(step: int, value: float | None, residual: float = 1e-4) -> dict[str, Any]:
    return {
        "step": step, "quantity": "eigenvalues", "value": None if value is None else [value],
        "details": {"residuals": [residual]}, "error": None if value is not None else "boom",
    }  # fmt: skip


#: The demo's shape: a wild interval at step 8, then values near 287 ± 44 (linear range).
WILD = [
    _trace(0, 900.0, 700.0, 1100.0),
    _trace(8, 973.0, -4829.0, 6775.0),
    _trace(16, 450.0, 380.0, 520.0),
    _trace(24, 287.0, 243.0, 331.0),
    _eig(0, 60.0), _eig(8, 64.0), _eig(16, 70.0), _eig(24, 63.8, 9.1e-5),
]  # fmt: skip


def _markers(ax: Any, symbol: str) -> list[tuple[float, float]]:
    return [
        (float(x), float(y))
        for line in ax.get_lines()
        if line.get_marker() == symbol
        for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True)
    ]


def test_axis_limits_come_from_the_points_not_a_wild_interval() -> None:
    fig = curvature_figure(WILD)
    trace_ax, eig_ax = fig.axes
    y0, y1 = trace_ax.get_ylim()
    assert trace_ax.get_yscale() == "linear"
    assert 150 < y0 < 287 and 900 < y1 < 1400, (y0, y1)  # was about (-5400, 7400)
    assert _markers(trace_ax, "v") == [(8.0, y0)] and _markers(trace_ax, "^") == [(8.0, y1)]
    assert "interval beyond the axis" in trace_ax.get_title(loc="left")
    assert trace_ax.get_title(loc="right") == "step 24: 287 [243, 331]"
    assert "bars smaller than the markers" not in trace_ax.get_title(loc="left")
    # λ_max residuals (1e-4) are far below a marker: said, not promised.
    assert "; bars smaller than the markers" in eig_ax.get_title(loc="left")
    assert eig_ax.get_title(loc="right") == "step 24: 63.8 ± 9.1e-05"
    e0, e1 = eig_ax.get_ylim()
    assert 55 < e0 < 60 and 70 < e1 < 75


def test_narrow_intervals_widen_the_axis_instead_of_being_clipped() -> None:
    recs = [_trace(0, 100.0, 80.0, 125.0), _trace(8, 110.0, 100.0, 120.0)]
    ax = curvature_figure(recs).axes[0]
    y0, y1 = ax.get_ylim()
    assert y0 < 80 and y1 > 125
    assert not _markers(ax, "v") and not _markers(ax, "^")


def test_values_spanning_decades_get_a_log_axis() -> None:
    recs = [_trace(0, 7908.0, -3173.0, 18990.0), _trace(8, 402.0, 131.0, 674.0)]
    recs += [_trace(16, 248.0, 187.0, 308.0)]
    ax = curvature_figure(recs).axes[0]
    assert ax.get_yscale() == "log"
    y0, y1 = ax.get_ylim()
    assert 60 < y0 < 131 and 7908 < y1 < 30000  # 131: the lower end of a narrow bar
    assert _markers(ax, "v") == [(0.0, y0)]  # a negative lower end cannot be drawn on log
    signed = [_trace(0, -5.0, -6.0, -4.0), _trace(8, 20000.0, 19000.0, 21000.0)]
    assert curvature_figure(signed).axes[0].get_yscale() == "symlog"


def test_failed_records_are_skipped_and_marked() -> None:
    recs = [*WILD, _trace(32, None, 0, 0), _eig(32, None)]
    fig = curvature_figure(recs)
    trace_ax, _ = fig.axes
    assert "red: 1 failed" in trace_ax.get_title(loc="left")
    assert trace_ax.get_title(loc="right") == "step 24: 287 [243, 331]"  # last *measured*
    assert 900 < trace_ax.get_ylim()[1] < 1400
    only_failed = curvature_figure([_trace(0, None, 0, 0), _trace(8, None, 0, 0)])
    assert "red: 2 failed" in only_failed.axes[0].get_title(loc="left")


def test_the_training_loss_is_drawn_under_the_curvature_on_the_same_steps(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"timestamp": 0.0, "step": 0, "metrics": {"curvature/hutch_trace": 900.0}}]
    lines += [
        {"timestamp": 0.0, "step": s, "metrics": {"train/loss": 2.5 / s, "lr": 0.1}}
        for s in range(1, 25)
    ]
    metrics.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    loss = read_training_loss(metrics)
    assert loss[0] == (1, 2.5) and len(loss) == 24
    assert read_training_loss(tmp_path / "missing.jsonl") == []
    fig = curvature_figure(WILD, title="t", loss=loss)
    trace_ax, _, loss_ax = fig.axes
    assert loss_ax.get_ylabel() == "training loss"
    assert loss_ax.get_shared_x_axes().joined(loss_ax, trace_ax)
    assert list(loss_ax.get_lines()[0].get_xdata()) == list(range(1, 25))
    out = plot_curvature(WILD, tmp_path / "p" / "curvature.png", title="t", loss=loss)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_trace_falling_tenfold_gets_a_log_axis_so_the_late_trend_shows() -> None:
    """Positive values whose largest is more than 5 times their smallest: a log axis (on a
    linear one the late values, a tenth of the early ones, lie flat along the bottom)."""
    figure = curvature_figure

    falling = [_trace(s, v, 0.9 * v, 1.1 * v) for s, v in ((0, 3000.0), (8, 900.0), (16, 300.0))]
    ax = figure(falling).axes[0]
    assert ax.get_yscale() == "log"
    assert ax.get_ylabel() == "Hessian trace (log scale)"
    flat = [_trace(s, v, 0.9 * v, 1.1 * v) for s, v in ((0, 500.0), (8, 300.0), (16, 101.0))]
    assert figure(flat).axes[0].get_yscale() == "linear"  # 4.95 times: linear


def test_an_unconverged_lambda_max_is_hollow_with_a_legend_entry() -> None:
    figure = curvature_figure

    recs = [_eig(0, 60.0), _eig(8, 64.0), _eig(16, 70.0)]
    recs[1]["details"]["converged"] = False
    recs[0]["details"]["converged"] = True
    ax = figure(recs).axes[0]
    white = ("white", (1.0, 1.0, 1.0, 1.0))
    hollow = [
        line for line in ax.get_lines()
        if line.get_marker() == "o" and line.get_markerfacecolor() in white
    ]  # fmt: skip
    assert len(hollow) == 1 and list(hollow[0].get_xdata()) == [8]
    legend = ax.get_legend()
    assert legend is not None and "not converged (1)" in legend.get_texts()[0].get_text()
    # All converged (or no flag recorded): no hollow marker, no legend.
    recs[1]["details"]["converged"] = True
    assert figure(recs).axes[0].get_legend() is None


def test_the_lambda_max_bars_are_named_by_the_method_that_produced_them() -> None:
    """pyhessian's values come from Lanczos; hutchpp's from Rayleigh–Ritz on its sketch, refined
    by Lanczos: the note says which, never "Lanczos" for a sketch value."""
    figure = curvature_figure

    lanczos = [{**_eig(0, 60.0), "method": "lanczos"}]
    sketch = [{**_eig(0, 60.0), "method": "rayleigh_ritz+lanczos"}]
    note = figure(lanczos).axes[0].get_title(loc="left")
    assert "λ_max bars: Ritz residual (Lanczos)" in note
    note = figure(sketch).axes[0].get_title(loc="left")
    assert "Ritz residual (Hutch++ sketch + Lanczos)" in note
    bare = [{**_eig(0, 60.0), "details": {}}]
    assert "bars: none" in figure(bare).axes[0].get_title(loc="left")


def test_the_density_title_is_the_checkpoint_path_as_given() -> None:
    from deconcnn_curvature.present import density_title

    assert density_title(Path("runs/demo/last.ckpt")).endswith(": runs/demo/last.ckpt")
