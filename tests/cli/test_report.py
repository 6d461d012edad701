"""``deconcnn-curv report``: a row per run, exact output, exports, the figure, one-line errors."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
from analysis.run_folders import record, trajectory_run, write_run
from click.testing import CliRunner

from deconcnn_curvature.analysis.runs import read_runs
from deconcnn_curvature.cli import cli


def _report(*args: str) -> object:
    return CliRunner().invoke(cli, ["report", *args], catch_exceptions=False)


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Two runs over 12 epochs of 4 steps, measured every step: one whose λ_max saturates (a
    plateau), one growing 20 % per epoch (never flat)."""
    root = tmp_path / "sweep"
    trajectory_run(root / "lr0.1", [10 * (1 - 0.8 * math.exp(-i / 8)) for i in range(49)], lr=0.1)
    trajectory_run(root / "lr0.2", [1.2 ** (i / 4) for i in range(49)], lr=0.2, seed=1)
    return root


EXPECTED = """\
                                                               deconcnn-curv report: 2 runs                                                                
┏━━━━━━━┳━━━━━━━━━━┳━━━━━━┳━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━┳━━━━━━━━━━━┳━━━━━━━━┳━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━┓
┃ run   ┃ optim.lr ┃ seed ┃ trace (last) ┃ λ_max (last) ┃ converged ┃ failed ┃ plateau epoch [95 %] ┃ plateau step [95 %] ┃ λ_max points ┃ curvature time ┃
┡━━━━━━━╇━━━━━━━━━━╇━━━━━━╇━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━╇━━━━━━━━━━━╇━━━━━━━━╇━━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━┩
│ lr0.1 │      0.1 │    0 │     49.9 ± 5 │         9.98 │      100% │      0 │             5 [5, 5] │         20 [20, 20] │   49 (< 100) │            51% │
│ lr0.2 │      0.2 │    1 │  44.58 ± 4.5 │        8.916 │      100% │      0 │    none (never flat) │                   — │   49 (< 100) │            51% │
└───────┴──────────┴──────┴──────────────┴──────────────┴───────────┴────────┴──────────────────────┴─────────────────────┴──────────────┴────────────────┘
plateau: λ_max smoothed by an EWMA (alpha 0.3), on the epoch grid, the first epoch from which it changes by less than 5% per epoch for 3 epochs; interval: 95 % parametric bootstrap (1000 draws, seed 0) from each point's recorded uncertainty.
2 of 2 runs have fewer than 100 λ_max points, the plateau guide's minimum:
  2 runs (lr0.1, lr0.2): 49 points over 48 steps; too short even at every step: train longer
"""  # noqa: E501, W291


def test_table_is_exactly_this(sweep: Path) -> None:
    result = _report(str(sweep))
    assert result.exit_code == 0, result.output
    assert result.stdout == EXPECTED
    assert result.stderr == ""


def test_json_carries_the_same_numbers(sweep: Path) -> None:
    result = _report(str(sweep), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["keys"] == ["optim.lr", "seed"] and data["by"] is None
    first, second = data["runs"]
    assert first["config"] == {"optim.lr": 0.1, "seed": 0}
    assert first["plateau"]["epoch"] == 5 and first["plateau"]["step"] == 20
    assert first["plateau"]["epoch_interval"] == [5.0, 5.0]
    assert first["lambda_max"] == {
        "value": 10 * (1 - 0.8 * math.exp(-48 / 8)), "residual": 1e-5, "step": 48,
        "points": 49, "enough_for_plateau": False, "converged_share": 1.0,
    }  # fmt: skip
    assert first["trace"]["value"] == 5 * first["lambda_max"]["value"]
    # 49 measurements of 0.5 s over the 48 s between the first start and the last line
    assert first["curvature_seconds"] == 24.5 and first["wall_seconds"] == 48.25
    assert second["plateau"]["found"] is False
    assert second["plateau"]["reason"].startswith("never flat")


def test_by_groups_and_orders_the_rows(tmp_path: Path) -> None:
    for lr, seed in ((0.2, 0), (0.1, 0), (0.2, 1), (0.1, 1)):
        trajectory_run(tmp_path / f"lr{lr}-s{seed}", [1.0, 2.0, 3.0], lr=lr, seed=seed)
    result = _report(str(tmp_path), "--by", "optim.lr", "--json")
    runs = json.loads(result.stdout)["runs"]
    assert [(r["run"], r["group"]) for r in runs] == [
        ("lr0.1-s0", 0.1), ("lr0.1-s1", 0.1), ("lr0.2-s0", 0.2), ("lr0.2-s1", 0.2)
    ]  # fmt: skip
    table = _report(str(tmp_path), "--by", "optim.lr").stdout
    assert table.index("lr0.1-s1") < table.index("lr0.2-s0")
    assert "too few points" in table


def test_exports_and_plot(sweep: Path, tmp_path: Path) -> None:
    csv, parquet, png = tmp_path / "t.csv", tmp_path / "t.parquet", tmp_path / "f.png"
    result = _report(str(sweep), "--csv", str(csv), "--parquet", str(parquet), "--plot", str(png),
                     "--by", "optim.lr")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith(f"table: {csv}\ntable: {parquet}\nplot: {png}\n")
    table = read_runs(sweep)
    written = pd.read_csv(csv)
    assert written.columns.tolist() == table.columns.tolist() and len(written) == 196
    assert written["value"].tolist() == table["value"].tolist()
    pd.testing.assert_frame_equal(pd.read_parquet(parquet), table, check_dtype=False)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failures_and_torn_lines_are_reported(tmp_path: Path) -> None:
    recs = [
        record(0, "eigenvalues", [1.0], residuals=[1e-5], converged=True),
        record(2, "eigenvalues", None, error="NonFiniteError: loss is nan"),
        record(4, "eigenvalues", [1.1], epoch=1, residuals=[1e-5], converged=False),
    ]
    run = write_run(tmp_path / "r", recs)
    with (run / "curvature.jsonl").open("a") as handle:
        handle.write('{"torn')
    result = _report(str(run), "--json")
    assert result.exit_code == 0
    assert result.stderr == (
        f"warning: {run / 'curvature.jsonl'}: skipped line 4, which is not JSON (6 characters; "
        "a write cut short by a crash or a full disk).\n"
    )
    data = json.loads(result.stdout)["runs"][0]
    assert (data["failed"], data["first_error"]) == (1, "NonFiniteError: loss is nan")
    assert data["lambda_max"]["converged_share"] == 0.5 and data["config"] == {}
    assert data["plateau"]["reason"].startswith("too few points: 2 point(s)")
    text = _report(str(run)).stdout
    assert "r: 1 failed; first: NonFiniteError: loss is nan\n" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}/none"], "Error: {tmp}/none: no such file or folder.\n"),
        (
            ["{tmp}/empty"],
            "Error: no runs found in {tmp}/empty: no curvature.jsonl there or in "
            "any folder below.\n",
        ),
        (
            ["{sweep}", "--by", "optim.momentum_typo"],
            "Error: --by optim.momentum_typo: no run's "
            "config.yaml has that key; keys that differ between these runs: optim.lr, seed.\n",
        ),
        (
            ["{sweep}", "--plot", "{tmp}/f.xyz"],
            "Error: cannot write the plot to {tmp}/f.xyz: "
            "unknown image format '.xyz'; use one of .avif, .eps, .gif, .jpeg, .jpg, .pdf, .png, "
            ".ps, .raw, .rgba, .svg, .svgz, .tif, .tiff, .webp.\n",
        ),
        (
            ["{sweep}/lr0.1/config.yaml"],
            "Error: {sweep}/lr0.1/config.yaml: not a run folder or "
            "its curvature.jsonl; name the folder.\n",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_1(
    sweep: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "empty").mkdir()
    fill = {"tmp": tmp_path, "sweep": sweep}
    result = _report(*(a.format(**fill) for a in args))
    assert result.exit_code == 1
    assert result.stdout == ""
    if "image format" in message:  # matplotlib's list of formats differs between releases
        assert result.stderr.startswith(message.format(**fill).split("; use")[0])
    else:
        assert result.stderr == message.format(**fill)


def test_missing_extras_name_the_install(sweep: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    result = _report(str(sweep), "--parquet", "t.parquet")
    assert (result.exit_code, result.stderr) == (
        1, "Error: writing Parquet needs pyarrow, which is not installed: pip install pyarrow "
        "(or write CSV).\n",
    )  # fmt: skip
    monkeypatch.setitem(sys.modules, "pandas", None)
    result = _report(str(sweep))
    assert (result.exit_code, result.stderr) == (
        1, "Error: reading run folders into a table needs pandas, which is not installed: "
        "pip install 'deconcnn-curvature[analysis]'\n",
    )  # fmt: skip


def test_no_runs_argument_is_a_usage_error() -> None:
    result = _report()
    assert result.exit_code == 2 and "Missing argument 'RUN_OR_GLOB...'" in result.stderr


def test_a_run_that_has_not_measured_yet(tmp_path: Path) -> None:
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "curvature.jsonl").touch()
    result = _report(str(tmp_path / "new"))
    assert result.exit_code == 0
    row = "│ new │            — │            — │         — │      0 │ none (too few points) │"
    assert row in result.stdout
    assert result.stdout.endswith("  new: no λ_max measured (yet)\n")
    plot = _report(str(tmp_path / "new"), "--plot", str(tmp_path / "f.png"))
    assert (plot.exit_code, plot.stderr) == (
        1, "Error: no usable trace or λ_max measurements to plot.\n"
    )  # fmt: skip


def test_cadence_advice_for_a_run_long_enough(tmp_path: Path) -> None:
    """300 steps measured every 10: 31 points; every 3 steps would give 100 (without step 0)."""
    trajectory_run(tmp_path / "long", [1.0 + 0.01 * i for i in range(31)], cadence=10)
    result = _report(str(tmp_path / "long"))
    assert result.stdout.endswith(
        "  long: 31 points over 300 steps; compute_every_n_steps=3 would give 100\n"
    )
