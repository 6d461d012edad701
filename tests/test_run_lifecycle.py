"""The life of a ``deconcnn-curv train`` run folder: crashes mid-write, two runs at once, signals,
failed starts and resumes (issue 10 items 2, 3, 5, 7, 8; issue 12 item 3). Real tiny runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_train_cli import TINY

from deconcnn_curvature._records import TornLineWarning, read_jsonl, supersede_after
from deconcnn_curvature.cli import cli
from deconcnn_curvature.lightning import read_curvature_jsonl
from deconcnn_curvature.training.metrics import read_metrics_jsonl


def _train(*args: str) -> object:
    return CliRunner().invoke(cli, ["train", *args], catch_exceptions=False)


def _tear_last_line(path: Path) -> str:
    """Cut the file in the middle of its last line, as a crash mid-write or a full disk does."""
    data = path.read_text()
    start = data.rstrip("\n").rfind("\n") + 1
    torn = data[start : start + (len(data) - start) // 2]
    path.write_text(data[:start] + torn)
    return torn


# ------------------------------------------------------------------ item 2: torn last line


def test_readers_skip_a_torn_line_and_name_it(tmp_path: Path) -> None:
    path = tmp_path / "curvature.jsonl"
    path.write_text('{"step": 0, "value": 1.0}\n{"step": 2, "value": 2.0}\n{"step": 4, "va')
    with pytest.warns(TornLineWarning, match=r"jsonl: skipped line 3, which is not JSON"):
        assert read_curvature_jsonl(path) == [{"step": 0, "value": 1.0}, {"step": 2, "value": 2.0}]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "metrics": {}}\n{"st')
    with pytest.warns(TornLineWarning, match="line 2"):
        assert read_metrics_jsonl(metrics) == [{"step": 1, "metrics": {}}]


def test_supersede_moves_a_torn_line_and_keeps_a_record_that_lacks_only_its_newline(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"step": 0}\n{"step": 2}')  # complete, only the newline was lost
    assert supersede_after(path, 2) == (0, None)
    assert path.read_text() == '{"step": 0}\n{"step": 2}\n'
    path.write_text('{"step": 0}\n{"step": 2}\n{"step": 4, "val')
    with pytest.warns(TornLineWarning, match="line 3 was torn"):
        moved = supersede_after(path, 2)
    assert moved == (0, None)  # the torn tail was moved by the repair, no record after step 2
    assert path.read_text() == '{"step": 0}\n{"step": 2}\n'
    assert (tmp_path / "c.superseded.jsonl").read_text() == '{"step": 4, "val\n'


def test_resume_after_a_torn_last_line_loses_nothing_valid(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _train(*TINY, f"run_dir={run}").exit_code == 0
    curvature, metrics = run / "curvature.jsonl", run / "metrics.jsonl"
    kept_curvature = curvature.read_text().splitlines(keepends=True)[:-1]
    kept_metrics = metrics.read_text().splitlines(keepends=True)[:-1]
    torn_curvature = _tear_last_line(curvature)
    torn_metrics = _tear_last_line(metrics)

    with pytest.warns(TornLineWarning) as caught:
        resumed = _train(
            *TINY, f"run_dir={run}", f"resume={run / 'last.ckpt'}", "trainer.max_epochs=2"
        )
    assert resumed.exit_code == 0, resumed.output
    messages = " ".join(str(w.message) for w in caught)
    assert "curvature.jsonl: line 6 was torn" in messages and "metrics.jsonl" in messages

    # Every line of both files is a record again; the valid ones before the tear come first,
    # unchanged, and the resumed run's records follow on lines of their own.
    lines = curvature.read_text().splitlines(keepends=True)
    assert lines[: len(kept_curvature)] == kept_curvature
    records = [json.loads(line) for line in lines]
    assert [(r["step"], r["quantity"]) for r in records] == [
        (0, "trace"), (0, "eigenvalues"), (2, "trace"), (2, "eigenvalues"), (4, "trace"),
        (6, "trace"), (6, "eigenvalues"), (8, "trace"), (8, "eigenvalues"),
    ]  # fmt: skip
    metric_lines = metrics.read_text().splitlines(keepends=True)
    assert metric_lines[: len(kept_metrics)] == kept_metrics
    assert all(json.loads(line)["step"] >= 0 for line in metric_lines)
    assert max(json.loads(line)["step"] for line in metric_lines) == 8
    # The torn fragments are kept, each on a line of its own, in the side files.
    assert (run / "curvature.superseded.jsonl").read_text() == torn_curvature + "\n"
    assert (run / "metrics.superseded.jsonl").read_text() == torn_metrics + "\n"
    # The summary and the plot were made from the repaired file.
    assert "8 ok, 0 failed" not in resumed.output  # 9 records: 9 ok
    assert "9 ok, 0 failed" in resumed.output and (run / "curvature.png").is_file()
    assert read_jsonl(curvature) == records
