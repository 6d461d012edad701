"""Per-run summaries: which configuration keys tell runs apart, and the summary's numbers."""

from __future__ import annotations

from pathlib import Path

from analysis.run_folders import config, record, write_run

from deconcnn_curvature.analysis.report import distinguishing_keys, summarize_runs
from deconcnn_curvature.analysis.runs import load_runs, tidy_table


def test_distinguishing_keys_skip_identity_mirrors_and_foreign_runs(tmp_path: Path) -> None:
    for name, lr, seed in (("a", 0.1, 0), ("b", 0.2, 0), ("c", 0.1, 1)):
        write_run(tmp_path / name, [record(0, "trace", 1.0)], config(lr, seed, mirror={"s": seed}))
    write_run(tmp_path / "foreign", [record(0, "trace", 1.0)])  # no config.yaml
    runs = load_runs(tmp_path)
    # run_dir differs everywhere but names a place; mirror.s repeats seed's values
    assert distinguishing_keys(runs) == ["optim.lr", "seed"]


def test_summary_numbers(tmp_path: Path) -> None:
    recs = [
        record(0, "trace", 4.0, stderr=0.4, seconds=1.0, timestamp=100.0),
        record(0, "eigenvalues", [2.0], residuals=[1e-5], converged=True, seconds=1.0,
               timestamp=101.0),
        record(10, "trace", 6.0, stderr=0.6, seconds=1.0, timestamp=110.0),
        record(10, "eigenvalues", None, seconds=2.0, error="RuntimeError: boom", timestamp=111.0),
    ]  # fmt: skip
    write_run(tmp_path / "r", recs)
    runs = load_runs(tmp_path / "r")
    (s,) = summarize_runs(runs, tidy_table(runs))
    assert (s.trace, s.trace_stderr, s.trace_step) == (6.0, 0.6, 10)
    assert (s.lambda_max, s.lambda_max_step, s.lambda_max_points) == (2.0, 0, 1)
    assert (s.failed, s.first_error, s.converged_share) == (1, "RuntimeError: boom", 1.0)
    # 5 s measuring from the first start (99 s) to the last line (111 s)
    assert s.curvature_seconds == 5.0 and s.wall_seconds == 12.0
    assert s.curvature_share == 5.0 / 12.0 and s.few_points
