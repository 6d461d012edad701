"""The life of a ``deconcnn-curv train`` run folder: crashes mid-write, two runs at once, signals,
failed starts and resumes. Real tiny runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from test_train_cli import TINY

from deconcnn_curvature.cli import cli
from deconcnn_curvature.monitor import read_curvature_jsonl
from deconcnn_curvature.monitor.records import TornLineWarning, read_jsonl, supersede_after
from deconcnn_curvature.present import curvature_time
from deconcnn_curvature.registry import ENV_BACKEND
from deconcnn_curvature.training.metrics import read_metrics_jsonl
from deconcnn_curvature.training.run import (
    LOCK_NAME,
    RUN_DIR_ENV,
    RunResult,
    compose_config,
    secondary_rank,
)
from deconcnn_curvature.training.run_folder import make_run_dir


def _train(*args: str) -> object:
    return CliRunner().invoke(cli, ["train", *args], catch_exceptions=False)


def _tear_last_line(path: Path) -> str:
    """Cut the file in the middle of its last line, as a crash mid-write or a full disk does."""
    data = path.read_text()
    start = data.rstrip("\n").rfind("\n") + 1
    torn = data[start : start + (len(data) - start) // 2]
    path.write_text(data[:start] + torn)
    return torn


# ------------------------------------------------------------------ a torn last line


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


# ------------------------------------------------------------------ subprocess helpers


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for name in ("DECONCNN_CURVATURE_BACKEND", "LOCAL_RANK", "RANK", "WORLD_SIZE"):
        env.pop(name, None)
    return env


def _start(run: Path, *extra: str) -> subprocess.Popen[str]:
    """A real `deconcnn-curv train` process that trains for long enough to be interrupted."""
    return subprocess.Popen(
        [sys.executable, "-m", "deconcnn_curvature", "train", *TINY, *extra, f"run_dir={run}"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_training(proc: subprocess.Popen[str], run: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    metrics = run / "metrics.jsonl"
    while not (metrics.exists() and metrics.stat().st_size > 0):
        if proc.poll() is not None:
            pytest.fail(f"the run ended early: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run did not start training in time")
        time.sleep(0.1)


# ------------------------------------------------------------------ busy folders and signals


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_fails_and_sigterm_saves_a_resumable_run(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    first = _start(run, "trainer.max_epochs=500")
    try:
        _wait_training(first, run)
        second = subprocess.run(
            [sys.executable, "-m", "deconcnn_curvature", "train", *TINY, f"run_dir={run}"],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1, second.stderr
        assert "Traceback" not in second.stderr
        assert second.stderr.strip().splitlines()[-1] == (
            f"Error: run folder {run} is in use by another run (pid {first.pid}); wait for it "
            "to end, or choose another run_dir= or name=."
        )
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 143, err  # a scheduler must not count this run a success
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    command = f"deconcnn-curv train resume={run / 'last.ckpt'} run_dir={run}"
    assert last.startswith("Error: stopped by SIGTERM at step ") and last.endswith(command)
    step = int(last.split("at step ")[1].split(";")[0])
    checkpoint = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == step  # saved on the signal, not only at an epoch end

    # The printed command resumes the run (a few more epochs past the one it stopped in).
    epochs = checkpoint["epoch"] + 2
    resumed = _train(*command.split()[2:], f"trainer.max_epochs={epochs}", "--json")
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads(resumed.stdout)
    assert summary["start_step"] == step and summary["global_step"] == 4 * epochs
    steps = [r["step"] for r in read_curvature_jsonl(run / "curvature.jsonl")]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) * 2  # each step once


def test_a_lock_left_by_a_dead_process_does_not_block(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    holder = (
        "import fcntl, os, signal, sys; f = open(sys.argv[1], 'a+'); "
        "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); f.write(str(os.getpid())); f.flush(); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    subprocess.run([sys.executable, "-c", holder, str(run / LOCK_NAME)], check=False)
    assert (run / LOCK_NAME).read_text()  # the dead holder's pid is still written there
    result = _train(*TINY, f"run_dir={run}")
    assert result.exit_code == 0, result.output


def test_timestamped_folders_are_created_atomically(tmp_path: Path) -> None:
    stamp = tmp_path / "runs" / "20260101-120000"
    first, created = make_run_dir(stamp, timestamped=True)
    assert (first, created) == (stamp, True)
    # Another run took the same second's folder between the choice and the creation.
    second, _ = make_run_dir(stamp, timestamped=True)
    third, _ = make_run_dir(stamp, timestamped=True)
    assert (second.name, third.name) == ("20260101-120000-2", "20260101-120000-3")


# ------------------------------------------------------------------ bad values, failed starts


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "trainer.max_epochs=abc",
            "trainer.max_epochs must be an integer; got 'abc'. Fix the override, e.g. "
            "trainer.max_epochs=2.",
        ),
        pytest.param(
            "trainer.accelerator=gpu",
            "use trainer.accelerator=cpu or trainer.accelerator=auto on a machine without one.",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        ),
    ],
)
def test_trainer_settings_lightning_refuses_are_one_line(
    tmp_path: Path, override: str, message: str
) -> None:
    run = tmp_path / "r"
    result = _train(*TINY, f"run_dir={run}", override)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(error) == 1 and error[0].endswith(message)
    assert not run.exists()  # no folder holding only config.yaml


def test_a_run_folder_under_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    result = _train(*TINY, f"run_dir={tmp_path / 'file' / 'run'}")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip() == (
        f"Error: cannot create the run folder {tmp_path / 'file' / 'run'}: Not a directory; "
        "choose another run_dir= or name=."
    )


def test_a_run_that_fails_in_fit_before_training_leaves_no_folder(tmp_path: Path) -> None:
    empty = tmp_path / "cifar"
    empty.mkdir()
    run = tmp_path / "r"
    result = _train(*TINY, "data.source=cifar10", f"data.root={empty}", f"run_dir={run}")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "CIFAR-10" in result.output
    assert not run.exists()


# ------------------------------------------------------------------ resuming into a used folder


def test_resume_takes_the_runs_own_config_and_keeps_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _train(*TINY, f"run_dir={run}").exit_code == 0
    original = (run / "config.yaml").read_text()

    # The README's resume command: no model or data overrides, the run's config.yaml supplies
    # them (the defaults would build a full ResNet-18 on 50 000 images).
    resumed = _train(f"resume={run / 'last.ckpt'}", f"run_dir={run}", "trainer.max_epochs=2")
    assert resumed.exit_code == 0, resumed.output
    assert (
        f"resuming with the run's own configuration ({run / 'config.yaml'}) and this command's "
        "trainer.max_epochs=2." in resumed.output
    )
    assert (run / "config.yaml").read_text() == original  # kept
    beside = (run / "config.resume-1.yaml").read_text()
    assert "max_epochs: 2" in beside and "width: 4" in beside and "num_train: 64" in beside
    assert "since the resume at step 4" in resumed.output
    steps = [r["step"] for r in read_curvature_jsonl(run / "curvature.jsonl")][::2]
    assert steps == [0, 2, 4, 6, 8]

    # A curvature.* value reaches the callback's (resolved) copy of the group; a group choice is
    # Hydra's. (The copy is the callback's `settings` since each default is written once.)
    shown = _train(
        f"resume={run / 'last.ckpt'}",
        "curvature.compute_every_n_steps=4",
        "curvature=hutchpp",
        "curvature.k=2",
        "--cfg",
    )
    cfg = yaml.safe_load(shown.stdout)
    settings = cfg["callbacks"]["settings"]
    assert settings["compute_every_n_steps"] == cfg["curvature"]["compute_every_n_steps"] == 4
    assert settings["backend"] == cfg["curvature"]["backend"] == "hutchpp"
    assert settings["k"] == cfg["curvature"]["k"] == 2
    assert settings["num_hvps"] == cfg["curvature"]["num_hvps"] == 10  # curvature/hutchpp.yaml
    assert cfg["model"]["name"] == "small_cnn" and cfg["model"]["width"] == 4
    assert cfg["run_dir"] == str(run)

    # A checkpoint that does not fit the model this command builds: one line, nothing written.
    wrong = _train(
        f"resume={run / 'last.ckpt'}", f"run_dir={run}", "trainer.max_epochs=3", "model.width=8"
    )
    assert wrong.exit_code == 1 and "Traceback" not in wrong.output
    assert "the checkpoint does not fit the model of this config" in wrong.output
    assert len(wrong.output.strip().splitlines()) <= 3  # the resume note + the error
    assert not (run / "config.resume-2.yaml").exists()


def test_curvature_share_after_a_resume_counts_this_segment() -> None:
    records = [
        {"step": s, "quantity": "trace", "value": 1.0, "seconds": 10.0} for s in (0, 2, 4)
    ] + [{"step": s, "quantity": "trace", "value": 1.0, "seconds": 1.0} for s in (6, 8)]
    result = RunResult(
        run_dir=Path("r"),
        config_path=Path("r/config.resume-1.yaml"),
        metrics_path=Path("r/metrics.jsonl"),
        curvature_path=None,
        checkpoint_path=None,
        plot_path=None,
        global_step=8,
        epochs=2,
        seconds=4.0,
        metrics={},
        records=tuple(records),
        start_step=4,
    )
    # Before: 32 s of all segments over this segment's 4 s, "800 % of the wall time".
    assert curvature_time(result) == (
        "2.0 s since the resume at step 4 (50% of this segment's wall time)"
    )


@pytest.mark.slow
def test_the_demo_writes_runs_demo_and_a_second_demo_moves_the_first_aside(
    tmp_path: Path,
) -> None:
    assert compose_config(["+preset=demo"]).name == "demo"
    demo = [  # the demo at test size (its ResNet-18 at width 1/8, fewer images and probes)
        "+preset=demo",
        f"runs_root={tmp_path / 'runs'}",
        "data.num_train=32",
        "data.num_val=16",
        "data.batch_size=16",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "trainer.val_check_interval=1.0",
        "curvature.num_hvps=2",
        "curvature.hessian_batch_size=8",
        "+curvature.backend_options.max_hvps=3",
    ]
    first = _train(*demo)
    assert first.exit_code == 0, first.output
    folder = tmp_path / "runs" / "demo"
    assert (folder / "last.ckpt").is_file()
    before = (folder / "metrics.jsonl").read_text()

    second = _train(*demo)
    assert second.exit_code == 0, second.output
    aside = tmp_path / "runs" / "demo.1"
    assert f"{folder} held an earlier run; moved it to {aside} (nothing deleted)." in second.output
    assert (aside / "metrics.jsonl").read_text() == before
    assert sorted(p.name for p in aside.iterdir()) == [
        "config.yaml", "curvature.jsonl", "curvature.png", "last.ckpt", "metrics.jsonl",
    ]  # fmt: skip
    assert (folder / "last.ckpt").is_file()


def test_environment_backend_is_the_default_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_BACKEND, "hutchpp")
    result = _train("+preset=demo", "--cfg")
    assert result.exit_code == 0, result.output
    assert "curvature backend hutchpp (from $DECONCNN_CURVATURE_BACKEND)" in result.output
    assert "backend: hutchpp" in result.output
    named = _train("+preset=demo", "curvature.backend=pyhessian", "--cfg")
    assert "backend: pyhessian" in named.output and "backend: hutchpp" not in named.output
    monkeypatch.setenv(ENV_BACKEND, "hutchp")
    wrong = _train("+preset=demo", "--cfg")
    assert wrong.exit_code == 1 and "$DECONCNN_CURVATURE_BACKEND=hutchp names no" in wrong.output


def test_a_data_root_under_the_home_folder_is_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    result = _train("data=cifar10", "data.root=~/data/cifar", f"run_dir={tmp_path / 'r'}")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "LexerNoViableAlt" not in result.output
    assert f"CIFAR-10 folder {tmp_path / 'data' / 'cifar'} does not exist" in result.output
    assert not (tmp_path / "r").exists()


def test_help_readme_and_preset_agree_on_the_demos_duration() -> None:
    root = Path(__file__).resolve().parents[1]
    said = "a few minutes on 2 idle CPU cores"
    readme = " ".join((root / "README.md").read_text().split())
    preset = " ".join((root / "configs" / "preset" / "demo.yaml").read_text().split())
    assert said in _train("--help").output and said in readme and said in preset
    assert "about a minute" not in _train("--help").output + preset + readme


def test_only_the_first_rank_of_a_launcher_takes_the_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun/SLURM start every rank with the same run_dir=: ranks > 0 must not wait on (or
    fail at) the lock rank 0 holds."""
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", RUN_DIR_ENV):
        monkeypatch.delenv(name, raising=False)
    assert not secondary_rank()
    monkeypatch.setenv("RANK", "0")
    assert not secondary_rank()
    monkeypatch.setenv("RANK", "1")
    assert secondary_rank()
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert secondary_rank()


class _Payload:
    """Stands for an object whose unpickling would run code."""


def test_resume_of_a_checkpoint_holding_objects_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "global_step": 0, "payload": _Payload()}, bad)
    run = tmp_path / "r"
    result = _train(*TINY, f"resume={bad}", f"run_dir={run}")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "beyond tensors and plain values" in result.output  # one line, says why
    assert not run.exists()


# ------------------------------------------------------------------ a stop during a measurement


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "code", "how"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")]
)
def test_a_stop_abandons_a_measurement_in_progress_and_saves_the_run(
    tmp_path: Path, sig: signal.Signals, code: int, how: str
) -> None:
    """A measurement of ten million products (hours) is abandoned between two products: the
    process ends within seconds with the scheduler's exit code, last.ckpt saved after the step,
    and the measurement recorded as interrupted."""
    run = tmp_path / "run"
    proc = _start(run, "curvature.num_hvps=10000000", "curvature.compute_at_step_zero=false")
    try:
        _wait_training(proc, run)  # step 1 is done; step 2's measurement starts next
        time.sleep(2.0)
        sent = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert took < 15, f"{took:.1f} s after {how}"
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"Error: stopped by {how} at step 2; ")
    assert last.endswith(f"deconcnn-curv train resume={run / 'last.ckpt'} run_dir={run}")
    checkpoint = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2
    records = read_curvature_jsonl(run / "curvature.jsonl")
    assert [(r["step"], r["quantity"]) for r in records] == [(2, "trace"), (2, "eigenvalues")]
    assert all(r["value"] is None for r in records)
    assert all(r["error"].startswith("MeasurementInterrupted: ") for r in records)


def test_a_run_can_be_given_its_folder(tmp_path: Path) -> None:
    """One folder per job of a sweep: the folder given to run_training wins over the config's."""
    from deconcnn_curvature.training.run import compose_run_config, run_training

    cfg, _ = compose_run_config([*TINY, f"run_dir={tmp_path / 'named'}"])
    result = run_training(cfg, run_dir=tmp_path / "job-0")
    assert result.run_dir == tmp_path / "job-0" and (tmp_path / "job-0" / "last.ckpt").is_file()
    assert not (tmp_path / "named").exists()
