"""A run folder on a real cluster: hostile config files and links, saves cut short by kill -9 or a
full disk, file systems without locks. Real tiny runs through the CLI, or the folder functions
themselves where a fault has to be injected."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from test_train_cli import TINY

from deconcnn_curvature.cli import cli
from deconcnn_curvature.training import run_folder
from deconcnn_curvature.training.run_folder import (
    LOCK_NAME,
    CheckpointWriteError,
    LockFallbackWarning,
    RunLock,
)


def _train(*args: str) -> object:
    return CliRunner().invoke(cli, ["train", *args], catch_exceptions=False)


def _error_line(output: str) -> str:
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, output
    return errors[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished tiny run (4 steps, last.ckpt at step 4), copied by the tests that need one."""
    run = tmp_path_factory.mktemp("template") / "run"
    result = _train(*TINY, f"run_dir={run}")
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture
def run(finished_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    (copy / LOCK_NAME).unlink(missing_ok=True)
    return copy


# ------------------------------------------------------------------ a resumed config runs no code


def _plant_target(run: Path, node: dict) -> None:
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"] = node
    (run / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.mark.parametrize(
    "node",
    [
        {"_target_": "shutil.copyfile", "src": "SRC", "dst": "DST"},
        {"_target_": "torch.load", "f": "SRC", "weights_only": False},
        {"_target_": "numpy.load", "file": "SRC", "allow_pickle": True},
    ],
    ids=["copyfile", "torch.load", "numpy.load"],
)
def test_a_resume_refuses_a_target_no_config_names(run: Path, tmp_path: Path, node: dict) -> None:
    src, dst = tmp_path / "secret", tmp_path / "copied"
    src.write_text("payload")
    node = {k: str(src) if v == "SRC" else str(dst) if v == "DST" else v for k, v in node.items()}
    _plant_target(run, node)
    result = _train(f"resume={run / 'last.ckpt'}", "trainer.max_epochs=2")
    assert result.exit_code == 1
    line = _error_line(result.output)
    assert f"data._target_={node['_target_']} is not built by this package's configs" in line
    assert "--trust-config" in line
    assert not dst.exists()  # nothing ran
    assert not (run / "config.resume-1.yaml").exists()


def test_trust_config_and_the_users_config_dir_allow_their_targets(
    run: Path, tmp_path: Path
) -> None:
    node = {"_target_": "mypkg.data.MyData", "size": 3}
    _plant_target(run, node)
    refused = _train(f"resume={run / 'last.ckpt'}", "--cfg")
    assert refused.exit_code == 1 and "data._target_=mypkg.data.MyData" in refused.output
    trusted = _train(f"resume={run / 'last.ckpt'}", "--cfg", "--trust-config")
    assert trusted.exit_code == 0, trusted.output
    assert "mypkg.data.MyData" in trusted.output

    # The user's own config folder naming the class: their code, built without the flag.
    mine = tmp_path / "configs"
    shutil.copytree(Path(__file__).resolve().parents[1] / "configs", mine)
    (mine / "data" / "mine.yaml").write_text("_target_: mypkg.data.MyData\nsize: 3\n")
    own = _train(f"resume={run / 'last.ckpt'}", "--cfg", "--config-dir", str(mine))
    assert own.exit_code == 0, own.output


# ------------------------------------------------------------------ checkpoints survive


def _io_save(path: Path, value: float) -> None:
    run_folder.atomic_checkpoint_io().save_checkpoint({"global_step": value}, path)


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.ckpt"
    _io_save(path, 4)
    good = path.read_bytes()

    def full_disk(obj: object, handle: object, *args: object, **kwargs: object) -> None:
        handle.write(b"PK\x03\x04 half a checkpoint")  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as caught:
        _io_save(path, 8)
    assert str(caught.value) == (
        f"could not write the checkpoint {path} (No space left on device); the previous one is "
        "intact."
    )
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary left


def test_kill_9_in_the_middle_of_a_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """A process killed while it writes a checkpoint (here: after half of it), with $TMPDIR on
    another folder: last.ckpt is the earlier one, whole, and nothing was written to $TMPDIR."""
    path, tmpdir = tmp_path / "run" / "last.ckpt", tmp_path / "tmpdir"
    path.parent.mkdir()
    tmpdir.mkdir()
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from deconcnn_curvature.training import run_folder
        io = run_folder.atomic_checkpoint_io()
        io.save_checkpoint({{"global_step": 4, "w": torch.ones(1000)}}, {str(path)!r})
        real = torch.save
        def killed(obj, handle, *a, **k):
            handle.write(b"x" * 5000)
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = killed
        io.save_checkpoint({{"global_step": 8, "w": torch.zeros(1000)}}, {str(path)!r})
        """
    )
    env = dict(os.environ, TMPDIR=str(tmpdir), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, check=False, timeout=120)
    assert proc.returncode == -9
    saved = torch.load(path, weights_only=True)
    assert saved["global_step"] == 4 and torch.equal(saved["w"], torch.ones(1000))
    assert list(tmpdir.iterdir()) == []


def test_a_full_disk_at_a_save_during_training_is_one_line_and_keeps_last_ckpt(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(obj: object, handle: object, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    result = _train(f"resume={run / 'last.ckpt'}", "trainer.max_epochs=2")
    monkeypatch.undo()
    assert result.exit_code == 1
    line = _error_line(result.output)
    assert "No space left on device" in line and "last.ckpt holds step 4" in line
    assert f"resume={run / 'last.ckpt'} run_dir={run}" in line
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 4


def test_a_full_disk_while_writing_records_is_one_line_with_the_state_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deconcnn_curvature.monitor import records as _records

    real = _records.RecordWriter.write
    calls = {"n": 0}

    def fill_up(self: _records.RecordWriter, record: dict) -> None:
        calls["n"] += 1
        if self.path.name == "curvature.jsonl" and calls["n"] > 6:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        real(self, record)

    monkeypatch.setattr(_records.RecordWriter, "write", fill_up)
    run = tmp_path / "run"
    result = _train(*TINY, f"run_dir={run}")
    monkeypatch.undo()
    assert result.exit_code == 1
    line = _error_line(result.output)
    assert line.startswith("Error: training stopped at step ")
    assert f"({run / 'curvature.jsonl'}): No space left on device" in line
    step = torch.load(run / "last.ckpt", weights_only=True)["global_step"]
    assert f"last.ckpt holds step {step}" in line and step > 0


# ------------------------------------------------------------------ no flock


def _no_flock(monkeypatch: pytest.MonkeyPatch, code: int = errno.ENOLCK) -> None:
    import fcntl

    def refuse(fd: int, operation: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", refuse)


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_file_system_without_flock_trains_with_a_lock_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    _no_flock(monkeypatch, code)
    run = tmp_path / "run"
    with pytest.warns(LockFallbackWarning, match="its file system has no file locks"):
        result = _train(*TINY, f"run_dir={run}")
    assert result.exit_code == 0, result.output
    assert (run / "last.ckpt").is_file() and not (run / LOCK_NAME).exists()  # released


def test_the_lock_file_names_its_holder_and_is_taken_over_when_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_flock(monkeypatch)
    host = socket.gethostname()
    lock = tmp_path / LOCK_NAME
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{sleeper.pid}@{host}\n")
        with pytest.warns(LockFallbackWarning), pytest.raises(Exception) as busy:
            RunLock(tmp_path)
        assert str(busy.value) == (
            f"run folder {tmp_path} is in use by another run (pid {sleeper.pid}); wait for it to "
            "end, or choose another run_dir= or name=."
        )
    finally:
        sleeper.kill()
        sleeper.wait()
    lock.write_text(f"{sleeper.pid}@{host}\n")  # that process is gone: a stale lock
    with pytest.warns(LockFallbackWarning):
        held = RunLock(tmp_path)
    assert lock.read_text() == f"{os.getpid()}@{host}\n"
    held.close()
    assert not lock.exists()

    lock.write_text("1234@another-node\n")
    with pytest.warns(LockFallbackWarning), pytest.raises(Exception) as remote:
        RunLock(tmp_path)
    assert "(pid 1234 on host another-node; remove" in str(remote.value)


# ------------------------------------------------------------------ links are never written through


@pytest.mark.parametrize(
    "name",
    ["config.yaml", "curvature.png", LOCK_NAME, "metrics.jsonl", "curvature.jsonl", "last.ckpt"],
)
def test_a_link_in_a_fresh_run_folder_is_refused_and_its_target_untouched(
    tmp_path: Path, name: str
) -> None:
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(outside)
    result = _train(*TINY, f"run_dir={run}")
    assert result.exit_code == 1
    assert _error_line(result.output) == (
        f"Error: run folder {run}: {name} is a symbolic link (to {outside}); a run never writes "
        "through a link. Remove the link, or choose another run_dir= or name=."
    )
    assert outside.read_text() == "keep me"


@pytest.mark.parametrize(
    "name", ["curvature.superseded.jsonl", "metrics.superseded.jsonl", "curvature.jsonl.tmp"]
)
def test_a_link_in_a_resumed_run_folder_is_refused_and_its_target_untouched(
    run: Path, tmp_path: Path, name: str
) -> None:
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    (run / name).symlink_to(outside)
    result = _train(f"resume={run / 'last.ckpt'}", "trainer.max_epochs=2")
    assert result.exit_code == 1
    assert f"{name} is a symbolic link" in _error_line(result.output)
    assert outside.read_text() == "keep me"


def test_a_dangling_link_is_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).symlink_to(tmp_path / "nowhere")
    result = _train(*TINY, f"run_dir={run}")
    assert result.exit_code == 1 and f"{LOCK_NAME} is a symbolic link" in result.output
    assert not (tmp_path / "nowhere").exists()


def test_whole_file_writes_replace_a_link_and_records_refuse_one(tmp_path: Path) -> None:
    from deconcnn_curvature.monitor.records import LinkedFileError, RecordWriter, supersede_after

    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    link = tmp_path / "config.yaml"
    link.symlink_to(outside)
    run_folder.write_atomically(link, "a: 1\n")  # the name now holds the file, not a link
    assert not link.is_symlink() and link.read_text() == "a: 1\n"
    assert outside.read_text() == "keep me"

    records = tmp_path / "curvature.jsonl"
    records.symlink_to(outside)
    with pytest.raises(LinkedFileError, match="is a symbolic link"):
        RecordWriter(records).write({"step": 0})
    with pytest.raises(LinkedFileError):
        supersede_after(records, 0)
    assert outside.read_text() == "keep me"


def test_the_no_flock_warning_is_one_line_on_the_console(tmp_path: Path) -> None:
    run = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import errno, fcntl, os, sys
        def refuse(fd, operation):
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        fcntl.flock = refuse
        from deconcnn_curvature.cli import cli
        cli(["train", *{TINY!r}, "run_dir={run}"])
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "file locks" in line]
    assert lines == [
        f"deconcnn-curv train: warning: run folder {run}: its file system has no file locks "
        f"(No locks available); using {LOCK_NAME} created exclusively (holding pid and host) "
        "instead."
    ]
    assert "LockFallbackWarning" not in proc.stderr
