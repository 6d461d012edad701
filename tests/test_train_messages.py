"""What ``deconcnn-curv train`` says when a run cannot start, measures nothing, or resumes a folder
left in an odd state: one line, non-zero exit, a hint that works when copied."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_train_cli import TINY

from deconcnn_curvature.cli import cli
from deconcnn_curvature.monitor import read_curvature_jsonl
from deconcnn_curvature.training.run import compose_config, compose_run_config


def _train(*args: str) -> object:
    return CliRunner().invoke(cli, ["train", *args], catch_exceptions=False)


def _error_line(output: str) -> str:
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, output
    return errors[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("template") / "run"
    result = _train(*TINY, f"run_dir={run}")
    assert result.exit_code == 0, result.output
    return run


# ------------------------------------------------------------------ refused at setup, one line


def test_a_negative_seed_is_one_line(tmp_path: Path) -> None:
    result = _train(*TINY, "seed=-1", f"run_dir={tmp_path / 'r'}")
    assert result.exit_code == 1
    assert _error_line(result.output) == (
        "Error: seed must be a whole number from 0 to 4294967295; got -1 (e.g. seed=1)."
    )
    assert not (tmp_path / "r").exists()


@pytest.fixture
def read_only_folder(tmp_path: Path):
    """An existing folder this process cannot write into: a read-only tmpfs where it can mount
    one (root), else a folder without write permission."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip("root cannot mount a read-only file system here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_read_only_run_folder_is_one_line(read_only_folder: Path) -> None:
    result = _train(*TINY, f"run_dir={read_only_folder}")
    assert result.exit_code == 1
    assert _error_line(result.output) == (
        f"Error: run folder {read_only_folder} is not writable (read-only, or another user's); "
        "choose another run_dir= or name=, or make it writable."
    )


def test_k_above_the_parameter_count_is_refused_at_setup(tmp_path: Path) -> None:
    result = _train(*TINY, "curvature.k=100000", f"run_dir={tmp_path / 'r'}")
    assert result.exit_code == 1
    line = _error_line(result.output)
    assert "k=100000 top eigenvalues asked of a model with" in line
    n = int(line.split("model with ")[1].split()[0])
    assert line.endswith(f"k can be at most {n} (in a config: curvature.k={n}).")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ a run too short to measure


def test_a_run_shorter_than_the_cadence_says_so_at_setup_and_in_the_summary(
    tmp_path: Path,
) -> None:
    run = tmp_path / "r"
    short = [*TINY, "curvature.compute_every_n_steps=500", "curvature.compute_at_step_zero=false"]
    result = _train(*short, f"run_dir={run}")
    assert result.exit_code == 0, result.output
    assert (
        "deconcnn-curv train: warning: the run has 4 steps and curvature is measured every 500 "
        "(curvature.compute_every_n_steps), so nothing will be measured" in result.output
    )
    text = " ".join(result.output.split())
    assert "no measurement: the run had 4 steps, the cadence is 500" in text
    assert "curvature.enabled=false" not in text
    as_json = _train(*short, f"run_dir={tmp_path / 'j'}", "--json")
    assert json.loads(as_json.stdout)["curvature_note"].startswith("no measurement: the run had 4")


def test_the_unconverged_hint_is_an_override_that_works(finished_run: Path) -> None:
    from rich.console import Console

    from deconcnn_curvature.present import summary_table
    from deconcnn_curvature.training.run import RunResult

    eig = {"step": 4, "quantity": "eigenvalues", "value": [2.5], "n_hvp": 30, "seconds": 0.1,
           "details": {"residuals": [0.3], "converged": False}}  # fmt: skip
    result = RunResult(
        run_dir=finished_run, config_path=finished_run / "config.yaml",
        metrics_path=finished_run / "metrics.jsonl", curvature_path=None, checkpoint_path=None,
        plot_path=None, global_step=4, epochs=1, seconds=1.0, metrics={}, records=(eig,),
    )  # fmt: skip
    console = Console(record=True, width=300)
    console.print(summary_table(result))
    text = console.export_text()
    hint = "++curvature.backend_options.max_hvps=60"
    assert f"the solver stopped at its cap; raise it, e.g. with the override {hint}" in text
    # As copied: on a fresh run (backend_options null or set) and on a resume.
    assert compose_config([hint]).curvature.backend_options.max_hvps == 60
    assert compose_config([*TINY, hint]).curvature.backend_options.max_hvps == 60
    cfg, _ = compose_run_config([f"resume={finished_run / 'last.ckpt'}", hint])
    assert cfg.curvature.backend_options.max_hvps == 60
    assert cfg.callbacks.settings.backend_options.max_hvps == 60


# ------------------------------------------------------------------ folders left in odd states


def _killed_before_checkpoint(run: Path, last_step: int) -> None:
    """What a run killed before its first checkpoint leaves: its config and records, no
    last.ckpt."""
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    lines = [
        {"timestamp": 0.0, "step": s, "metrics": {"train/loss": 2.3}} for s in range(last_step + 1)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_a_folder_killed_before_anything_was_trained_restarts(tmp_path: Path) -> None:
    run = tmp_path / "r"
    _killed_before_checkpoint(run, last_step=0)
    result = _train(*TINY, f"run_dir={run}")
    assert result.exit_code == 0, result.output
    assert (
        f"{run} held a run stopped before its first checkpoint (nothing past step 0); starting "
        f"afresh there, its files moved to {tmp_path / 'r.1'}." in " ".join(result.output.split())
    )
    assert (run / "last.ckpt").is_file() and (tmp_path / "r.1" / "metrics.jsonl").is_file()


def test_a_folder_killed_after_some_steps_suggests_move_aside_not_a_missing_checkpoint(
    tmp_path: Path,
) -> None:
    run = tmp_path / "r"
    _killed_before_checkpoint(run, last_step=3)
    result = _train(*TINY, f"run_dir={run}")
    assert result.exit_code == 1
    line = _error_line(result.output)
    assert "last.ckpt" in line and f"resume={run / 'last.ckpt'}" not in line
    assert line.endswith(
        "move it aside with if_exists=move_aside (it has no last.ckpt to resume from)."
    )
    moved = _train(*TINY, f"run_dir={run}", "if_exists=move_aside")
    assert moved.exit_code == 0, moved.output


def test_an_edited_monitor_state_is_repaired_with_a_warning(
    finished_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    checkpoint = torch.load(run / "last.ckpt", weights_only=True)
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("CurvatureMonitor")]
    checkpoint["callbacks"][key]["last_step"] = 10**6
    torch.save(checkpoint, run / "last.ckpt")
    with pytest.warns(UserWarning, match=r"last measurement at step 1000000, after the checkpoint"):
        result = _train(f"resume={run / 'last.ckpt'}", "trainer.max_epochs=2")
    assert result.exit_code == 0, result.output
    steps = [r["step"] for r in read_curvature_jsonl(run / "curvature.jsonl")][::2]
    assert steps == [0, 2, 4, 6, 8]  # measuring went on after the resume


def test_a_misspelt_key_on_resume_is_refused_like_on_a_fresh_run(finished_run: Path) -> None:
    resume = f"resume={finished_run / 'last.ckpt'}"
    typo = _train(resume, "model.widht=8", "--cfg")
    assert typo.exit_code == 1
    assert _error_line(typo.output) == (
        "Error: bad configuration override: the run's config has no key model.widht; check the "
        "spelling (`deconcnn-curv train resume=... --cfg` shows the keys), or add it with "
        "+model.widht=..."
    )
    assert "num_hvp" in _error_line(_train(resume, "curvature.num_hvp=3", "--cfg").output)
    added = _train(resume, "+model.extra=1", "--cfg")
    assert added.exit_code == 0 and "extra: 1" in added.output
