"""``deconcnn-curv train -m``: a grid through Hydra's own multirun, each job a real run folder.

The multi-job tests run real Hydra (its basic sweeper and launcher) and real Lightning Trainers
at tiny sizes; the fast ones check what is refused before any job runs and how the outcome files
are read back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from deconcnn_curvature.cli import cli
from deconcnn_curvature.training.sweep import (
    JOB_FILE,
    SweepResult,
    check_sweep,
    read_jobs,
    summary_lines,
)

TINY = [
    "model=small_cnn",
    "model.width=4",
    "data.num_train=64",
    "data.num_val=32",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.val_check_interval=1.0",
    "lrsched.warmup_epochs=0.5",
    "curvature.compute_every_n_steps=2",
    "curvature.compute_at_step_zero=true",
    "curvature.num_hvps=4",
    "curvature.hessian_batch_size=8",
    "plot=false",
]


def _train(*args: str) -> object:
    return CliRunner().invoke(cli, ["train", *args], catch_exceptions=False)


# ------------------------------------------------------------ refused before any job runs


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optim.lr=[0.1"], "Error: bad override 'optim.lr=[0.1': no viable"),
        (["optim.lrx=0.1,0.2"], "Error: bad configuration override: Could not override"),
        (["model=small_cnn,no_such_model"], "Error: bad configuration override: In 'train'"),
        (["curvature.num_hvp=3,4"], "Error: CurvatureMonitor: unknown setting 'num_hvp'"),
        (["run_dir=x", "seed=0,1"], "Error: run_dir= cannot be given to a sweep (-m)"),
        (["resume=x/last.ckpt", "seed=0,1"], "Error: resume= cannot be given to a sweep (-m)"),
        (["trainer.devices=2", "seed=0,1"], "Error: trainer.devices=2: a sweep job runs on one"),
    ],
)
def test_bad_sweep_input_is_one_line_before_any_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: list[str], expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    result = _train("-m", *TINY, *overrides)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), result.output
    assert not (tmp_path / "runs").exists()  # no sweep folder, no job


def test_check_sweep_composes_every_value_and_counts_the_jobs() -> None:
    cfg, jobs = check_sweep(["model=small_cnn,resnet18_cifar", "optim.lr=0.05,0.1", "seed=0,1,2"])
    assert jobs == 12 and cfg.model.name == "small_cnn" and cfg.optim.lr == 0.05 and cfg.seed == 0
    assert cfg.curvature.compute_every_n_steps == 500  # the monitor's defaults filled in
    assert check_sweep(["seed=range(0,3)", "optim.lr=0.1"])[1] == 3


def test_cfg_with_multirun_prints_the_first_jobs_configuration() -> None:
    result = CliRunner().invoke(cli, ["train", "-m", "--cfg", "optim.lr=0.02,0.1", "seed=3,4"])
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.stdout)
    assert cfg["optim"]["lr"] == 0.02 and cfg["seed"] == 3


# ------------------------------------------------------------ reading the outcome back


def _job(folder: Path, number: int, status: str, sweep_id: str, **extra: object) -> None:
    folder.mkdir(parents=True)
    overrides = [f"seed={number}", "trainer.max_epochs=1"]
    data = {"overrides": overrides, "number": number, "sweep_id": sweep_id, "status": status}
    (folder / JOB_FILE).write_text(json.dumps({**data, **extra}))


def test_the_summary_names_each_job_and_the_exit_code_says_if_one_failed(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    _job(sweep / "10", 10, "completed", "this", global_step=8, seconds=2.5)
    _job(sweep / "2", 2, "failed", "this", message="trainer.max_epochs must be an integer")
    _job(sweep / "3", 3, "running", "this")  # killed: never wrote its outcome
    _job(sweep / "0.1", 0, "failed", "an earlier sweep")  # moved aside by an earlier run
    jobs = read_jobs(sweep, "this")
    assert [(j.folder.name, j.status) for j in jobs] == [
        ("2", "failed"),
        ("3", "unfinished"),
        ("10", "completed"),
    ]
    result = SweepResult(sweep, jobs, expected=4)
    assert result.missing == 1 and result.exit_code == 1
    lines = summary_lines(result)
    assert lines[0] == f"sweep {sweep}: 3 jobs, 1 failed, 1 unfinished, 1 completed"
    assert lines[1].split(maxsplit=3) == [
        str(sweep / "2"), "failed", "seed=2", "trainer.max_epochs must be an integer"
    ]  # fmt: skip
    assert lines[3].split() == [
        str(sweep / "10"),
        "completed",
        "seed=10",
        "8",
        "steps,",
        "2.5",
        "s",
    ]
    assert "1 of 4 jobs left no folder (never started)" in lines[4]
    assert any("to resume: completed jobs are skipped" in line for line in lines)
    assert SweepResult(sweep, jobs[2:], expected=1).exit_code == 0
    assert SweepResult(sweep, (), expected=None).exit_code == 1  # nothing ran is no success


# ------------------------------------------------------------ real sweeps


def _folders(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name))


def _check_jobs(sweep: Path, grid: list[tuple[float, int]]) -> None:
    """One run folder per job, numbered in Hydra's order, each with its own configuration."""
    folders = _folders(sweep)
    assert [p.name for p in folders] == [str(i) for i in range(len(grid))]
    for folder, (lr, seed) in zip(folders, grid, strict=True):
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert (config["optim"]["lr"], config["seed"]) == (lr, seed)
        assert config["model"]["width"] == 4 and config["run_dir"] == str(folder)
        records = [json.loads(line) for line in (folder / "curvature.jsonl").open()]
        assert [r["step"] for r in records if r["quantity"] == "trace"] == [0, 2, 4]
        assert (folder / "last.ckpt").is_file() and (folder / "metrics.jsonl").is_file()
        outcome = json.loads((folder / JOB_FILE).read_text())
        assert outcome["status"] == "completed" and outcome["global_step"] == 4


@pytest.mark.slow
def test_a_two_by_two_grid_gives_four_run_folders_the_report_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = _train("-m", *TINY, "optim.lr=0.05,0.1", "seed=0,1")
    assert result.exit_code == 0, result.output
    (sweep,) = (tmp_path / "runs" / "sweeps").iterdir()  # runs/sweeps/<timestamp>
    grid = [(0.05, 0), (0.05, 1), (0.1, 0), (0.1, 1)]
    _check_jobs(sweep, grid)
    shown = f"runs/sweeps/{sweep.name}"
    summary = result.stdout.strip().splitlines()[-6:]
    assert summary[0] == f"sweep {shown}: 4 jobs, 4 completed"
    for line, (i, (lr, seed)) in zip(summary[1:5], enumerate(grid), strict=True):
        assert line.split()[:4] == [f"{shown}/{i}", "completed", f"optim.lr={lr}", f"seed={seed}"]
    assert summary[5] == f"Read them together: deconcnn-curv report {shown}"

    report = CliRunner().invoke(cli, ["report", shown, "--by", "optim.lr", "--json"])
    assert report.exit_code == 0, report.output
    runs = json.loads(report.stdout)["runs"]
    assert sorted(r["run"] for r in runs) == ["0", "1", "2", "3"]
    assert all(r["lambda_max"]["points"] == 3 and r["failed"] == 0 for r in runs)


@pytest.mark.slow
def test_multirun_long_form_and_a_failing_job_is_named_and_fails_the_sweep(
    tmp_path: Path,
) -> None:
    sweep = tmp_path / "sweep"
    args = [*TINY, "optim.lr=0.05,0.1", "seed=0", "curvature.backend=pyhessian,no_such_backend"]
    result = _train("--multirun", *args, f"hydra.sweep.dir={sweep}")
    assert result.exit_code == 1, result.output
    folders = _folders(sweep)
    assert len(folders) == 4
    outcomes = [json.loads((p / JOB_FILE).read_text()) for p in folders]
    assert [o["status"] for o in outcomes] == ["completed", "failed", "completed", "failed"]
    assert "no_such_backend" in outcomes[1]["message"]
    for folder in (folders[0], folders[2]):
        assert (folder / "curvature.jsonl").is_file()
    assert not (folders[1] / "curvature.jsonl").exists()  # refused before training
    lines = result.stdout.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith(f"sweep {sweep}:"))
    assert lines[header] == f"sweep {sweep}: 4 jobs, 2 completed, 2 failed"
    failed = lines[header + 2].split()
    assert failed[:4] == [
        str(folders[1]),
        "failed",
        "optim.lr=0.05",
        "curvature.backend=no_such_backend",
    ]

    # The same command again: the completed jobs are not run again, the failed ones are.
    again = _train("--multirun", *args, f"hydra.sweep.dir={sweep}")
    assert again.exit_code == 1, again.output
    outcomes = [json.loads((p / JOB_FILE).read_text()) for p in folders]
    assert [o["status"] for o in outcomes] == ["completed", "failed", "completed", "failed"]
    assert outcomes[0]["message"].startswith("completed by an earlier run of this sweep")
