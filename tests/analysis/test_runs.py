"""read_runs: run folders into one table, one row per measurement, checked against the JSONL."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
from analysis.run_folders import config, record, trajectory_run, write_run

import deconcnn_curvature as dcc
from deconcnn_curvature.analysis.runs import (
    MEASUREMENT_COLUMNS,
    find_runs,
    read_runs,
    require_pandas,
    write_table,
)
from deconcnn_curvature.errors import ConfigurationError
from deconcnn_curvature.monitor.records import TornLineWarning, read_jsonl


def _mixed_run(folder: Path) -> Path:
    """k = 2 eigenvalues, a failed measurement, a NaN written as null, and a training loss."""
    recs = [
        record(0, "trace", 4.0, stderr=0.5, ci=(3.0, 5.0), seconds=0.2),
        record(0, "eigenvalues", [2.0, 1.5], residuals=[1e-4, 2e-4], converged=True, seconds=0.3),
        record(4, "trace", None, epoch=1, seconds=0.1, error="NonFiniteError: loss is nan"),
        record(4, "eigenvalues", None, epoch=1, seconds=0.1, error="NonFiniteError: loss is nan"),
        record(8, "trace", None, epoch=1, stderr=None, seconds=0.2),  # null without an error
        record(8, "eigenvalues", [3.0, 2.5], epoch=1, residuals=[1e-3], converged=False),
    ]
    cfg = config(0.05, 3, run="mine")  # `run` is also a column of the table
    return write_run(folder, recs, cfg, losses=[(1, 2.5), (4, 2.0), (6, 1.5)])


def test_one_row_per_measurement_with_the_records_values(tmp_path: Path) -> None:
    run = _mixed_run(tmp_path / "r")
    table = read_runs(run)
    assert list(table.columns[: len(MEASUREMENT_COLUMNS)]) == list(MEASUREMENT_COLUMNS)
    rows = [
        (r.step, r.quantity, None if pd.isna(r.index) else int(r.index),
         None if pd.isna(r.value) else r.value)
        for r in table.itertuples()
    ]  # fmt: skip
    assert rows == [
        (0, "trace", None, 4.0),
        (0, "eigenvalues", 1, 2.0),
        (0, "eigenvalues", 2, 1.5),
        (4, "trace", None, None),
        (4, "eigenvalues", 1, None),
        (8, "trace", None, None),
        (8, "eigenvalues", 1, 3.0),
        (8, "eigenvalues", 2, 2.5),
    ]
    first = table.iloc[0]
    assert (first.stderr, first.ci_low, first.ci_high, first.ci_level) == (0.5, 3.0, 5.0, 0.95)
    assert table["residual"].tolist()[1:3] == [1e-4, 2e-4]
    assert pd.isna(table["residual"].iloc[7])  # the record has one residual for two values
    assert table["converged"].tolist()[6:] == [False, False]
    assert table["n_hvp"].iloc[0] == 10 and table["seconds"].iloc[2] == 0.3
    # A failure is a row that says why; a null value without an error says so too.
    assert table["error"].iloc[3] == "NonFiniteError: loss is nan"
    assert table["error"].iloc[5].startswith("unusable record")
    assert table["error"].iloc[[0, 1, 2, 6, 7]].isna().all()
    # The training loss at the step or the nearest logged step before it; none before step 1.
    assert math.isnan(table["train_loss"].iloc[0])
    assert table["train_loss"].tolist()[3:] == [2.0, 2.0, 1.5, 1.5, 1.5]
    # The configuration, flattened to dotted keys, on every row; lists as JSON text.
    assert (table["optim.lr"] == 0.05).all() and (table["model.name"] == "small_cnn").all()
    assert table["data.crop_scale"].iloc[0] == "[0.08, 1.0]"
    assert table["run_dir"].iloc[0] == "/runs/lr0.05-s3"
    assert (table["config.run"] == "mine").all() and (table["run"] == "r").all()
    assert table["seed"].iloc[0] == 3
    assert str(table["step"].dtype) == "Int64" and str(table["converged"].dtype) == "boolean"


def test_values_match_every_record_of_the_file(tmp_path: Path) -> None:
    run = trajectory_run(tmp_path / "r", [1.0 + 0.5 * i for i in range(9)], cadence=2)
    table = read_runs(run)
    records = read_jsonl(run / "curvature.jsonl")
    eig = table[table["quantity"] == "eigenvalues"]
    assert eig["value"].tolist() == [r["value"][0] for r in records if r["quantity"] != "trace"]
    trace = table[table["quantity"] == "trace"]
    assert trace["value"].tolist() == [r["value"] for r in records if r["quantity"] == "trace"]
    assert trace["step"].tolist() == list(range(0, 17, 2))
    assert trace["epoch"].tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3]


def test_torn_line_is_skipped_with_the_readers_warning(tmp_path: Path) -> None:
    run = trajectory_run(tmp_path / "r", [1.0, 2.0, 3.0])
    with (run / "curvature.jsonl").open("a") as handle:
        handle.write('{"step": 3, "quantity": "tra')
    with pytest.warns(TornLineWarning, match="skipped line 7"):
        table = read_runs(run)
    assert len(table) == 6


def test_records_only_folder_of_another_training_app(tmp_path: Path) -> None:
    recs = [record(500, "eigenvalues", [12.0], residuals=[1e-5], converged=True)]
    run = write_run(tmp_path / "decon" / "lightning_logs" / "version_0", recs)
    table = read_runs(tmp_path / "decon")
    assert table.columns.tolist() == list(MEASUREMENT_COLUMNS)  # no config columns
    assert table["run"].tolist() == ["version_0"] and table["path"].iloc[0] == str(run)
    assert math.isnan(table["train_loss"].iloc[0])


def test_sweep_folders_globs_and_files(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for lr in (0.1, 0.2):
        for seed in (0, 1):
            trajectory_run(sweep / f"lr={lr}" / f"{seed}", [1.0, 2.0], lr=lr, seed=seed)
    (sweep / "notes").mkdir()
    table = read_runs(sweep)
    assert sorted(table["run"].unique()) == ["lr=0.1/0", "lr=0.1/1", "lr=0.2/0", "lr=0.2/1"]
    by_glob = read_runs(str(sweep / "lr=0.2" / "*"))
    assert sorted(by_glob["run"].unique()) == ["0", "1"]
    one = read_runs([sweep / "lr=0.1" / "0" / "curvature.jsonl", sweep / "lr=0.1" / "0"])
    assert one["run"].unique().tolist() == ["0"] and len(one) == 4  # named twice, read once
    assert dcc.read_runs is read_runs


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("missing", "{tmp}/missing: no such file or folder."),
        ("nothing*", "{tmp}/nothing*: the pattern matches nothing."),
        ("empty", "no runs found in {tmp}/empty: no curvature.jsonl there or in any folder below."),
        ("file.txt", "{tmp}/file.txt: not a run folder or its curvature.jsonl; name the folder."),
    ],
)
def test_bad_paths_say_what_is_wrong(tmp_path: Path, given: str, message: str) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ConfigurationError) as info:
        find_runs(str(tmp_path / given))
    assert str(info.value) == message.format(tmp=tmp_path)


def test_csv_and_parquet_round_trip(tmp_path: Path) -> None:
    table = read_runs(_mixed_run(tmp_path / "r"))
    back = pd.read_csv(write_table(table, tmp_path / "t.csv"))
    assert back.columns.tolist() == table.columns.tolist()
    assert back["value"].tolist()[:3] == [4.0, 2.0, 1.5]
    parquet = pd.read_parquet(write_table(table, tmp_path / "t.parquet"))
    pd.testing.assert_frame_equal(parquet, table, check_dtype=False)


def test_missing_pandas_and_pyarrow_name_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = read_runs(trajectory_run(tmp_path / "r", [1.0]))
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ConfigurationError, match=r"needs pyarrow.*: pip install pyarrow"):
        write_table(table, tmp_path / "t.parquet")
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ConfigurationError) as info:
        require_pandas()
    assert str(info.value) == (
        "reading run folders into a table needs pandas, which is not installed: "
        "pip install 'deconcnn-curvature[analysis]'"
    )


def test_importing_the_package_does_not_import_pandas() -> None:
    code = (
        "import sys, deconcnn_curvature as d; assert 'pandas' not in sys.modules; "
        "d.read_runs; assert 'pandas' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "ok\n"


def test_no_warning_on_a_clean_run(tmp_path: Path) -> None:
    run = trajectory_run(tmp_path / "r", [1.0, 2.0, 3.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_runs(run)


def test_hostile_lines_give_empty_cells_not_a_crash(tmp_path: Path) -> None:
    """Lines of the wrong shape (hand-edited, another tool's): JSON that is not a record is
    dropped, a field of the wrong type is an empty cell, an unusable value is an error row."""
    run = tmp_path / "r"
    run.mkdir()
    (run / "curvature.jsonl").write_text(
        '[1, 2]\n"text"\n{"step": "x", "quantity": "trace", "value": 1.0}\n'
        '{"step": 1, "epoch": "?", "quantity": "trace", "value": 2.0, "stderr": "bad", '
        '"seconds": "abc", "timestamp": "x", "ci": [1.0], "n_hvp": 2.5}\n'
        '{"step": 2, "quantity": "eigenvalues", "value": ["big"], "details": {"residuals": 3}}\n'
        '{"step": 3, "quantity": "density", "value": {"nodes": [1.0]}}\n'
    )
    table = read_runs(run)
    assert table["step"].tolist() == [1, 2]
    empty = ["value", "epoch", "stderr", "seconds", "timestamp", "ci_low", "n_hvp"]
    assert table[empty].iloc[0].isna().all()
    assert table["error"].iloc[0].startswith("unusable record")  # its stderr is not a number
    assert table["error"].iloc[1].startswith("unusable record") and pd.isna(table["value"].iloc[1])
