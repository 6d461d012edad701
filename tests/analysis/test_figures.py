"""The sweep figure: a line and a band per run on both panels, plateaus marked, colours by key."""

from __future__ import annotations

import math
from pathlib import Path

from analysis.run_folders import trajectory_run

from deconcnn_curvature.analysis.figures import run_colours, sweep_figure
from deconcnn_curvature.analysis.report import summarize_runs
from deconcnn_curvature.analysis.runs import load_runs, tidy_table


def _sweep(tmp_path: Path) -> tuple[list, object]:
    for lr, seed in ((0.1, 0), (0.1, 1), (0.2, 0)):
        lams = [10 * (1 - 0.8 * math.exp(-i / (8 * lr * 10))) for i in range(49)]
        trajectory_run(tmp_path / f"lr{lr}-s{seed}", lams, lr=lr, seed=seed)
    trajectory_run(tmp_path / "grows", [1.2 ** (i / 4) for i in range(49)], lr=0.3)
    runs = load_runs(tmp_path)
    table = tidy_table(runs)
    return summarize_runs(runs, table, "optim.lr"), table


def test_lines_bands_and_plateau_marks(tmp_path: Path) -> None:
    summaries, table = _sweep(tmp_path)
    fig = sweep_figure(summaries, table, by="optim.lr")
    lam_ax, trace_ax = fig.axes[:2]
    found = [s for s in summaries if s.plateau.found]
    assert len(found) == 3 and not summaries[-1].plateau.found
    # a line per run, plus one diamond per found plateau (errorbar's marker line)
    diamonds = [ln for ln in lam_ax.lines if ln.get_marker() == "D"]
    assert len(diamonds) == len(found)
    assert sorted(d.get_xdata()[0] for d in diamonds) == sorted(s.plateau.step for s in found)
    curves = [ln for ln in lam_ax.lines if ln.get_linestyle() != "None"]  # not markers or caps
    assert len(curves) == len(summaries) == len(trace_ax.lines)
    assert [c.get_linestyle() for c in curves] == ["-", "--", "-", "-"]
    assert len(lam_ax.collections) >= len(summaries) and len(trace_ax.collections) == 4
    assert lam_ax.get_title(loc="right") == "plateau found in 3 of 4 runs"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "0.1: lr0.1-s0 (plateau: epoch 5)", "0.1: lr0.1-s1 (plateau: epoch 5)",
        "0.2: lr0.2-s0 (plateau: epoch 7)", "0.3: grows (no plateau)",
    ]  # fmt: skip


def test_colours_follow_the_by_key(tmp_path: Path) -> None:
    summaries, _ = _sweep(tmp_path)
    colours, styles = run_colours(summaries, "optim.lr")
    assert colours[0] == colours[1] != colours[2] != colours[3]
    assert styles[:3] == ["-", "--", "-"]
    plain, _ = run_colours(summaries, None)
    assert len(set(plain)) == 4


def test_a_large_sweep_gets_a_legend_entry_per_group(tmp_path: Path) -> None:
    for i in range(26):
        trajectory_run(tmp_path / f"r{i:02d}", [1.0, 2.0, 3.0], lr=0.1 if i < 20 else 0.2, seed=i)
    runs = load_runs(tmp_path)
    table = tidy_table(runs)
    fig = sweep_figure(summarize_runs(runs, table, "optim.lr"), table, by="optim.lr")
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "0.1: 20 runs, 0 with a plateau", "0.2: 6 runs, 0 with a plateau"
    ]  # fmt: skip
