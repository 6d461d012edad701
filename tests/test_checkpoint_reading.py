"""Reading a checkpoint: hyper-parameters are never resolved against the environment, the zip
archive's sizes are checked before anything is inflated, and ``train resume=`` accepts and refuses
the same files as ``estimate``, for the same, true reasons."""

from __future__ import annotations

import collections
import os
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import save_state_dict
from click.testing import CliRunner, Result

from deconcnn_curvature.checkpoints import (
    ENV_CHECKPOINT_MAX_BYTES,
    CheckpointError,
    UntrustedCheckpointError,
    archive_limit,
    check_resume_checkpoint,
    open_checkpoint,
    read_checkpoint,
)
from deconcnn_curvature.cli import cli

SECRET = "hunter2-the-secret-value"


def run(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def _with_hparams(path: Path, hparams: dict, state: dict | None = None) -> Path:
    omegaconf = pytest.importorskip("omegaconf")
    if state is None:
        state = torch.load(save_state_dict(path.with_suffix(".w.pt")), weights_only=True)
    torch.save({"state_dict": state, "hyper_parameters": omegaconf.OmegaConf.create(hparams)}, path)
    return path


def _small_cnn_state() -> dict:
    from deconcnn_curvature.training.resnet_cifar import small_cnn

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return small_cnn(width=2).state_dict()


SMALL_CNN = [
    "--model",
    "deconcnn_curvature.training.resnet_cifar:small_cnn",
    "--model-arg",
    "width=2",
]


def test_an_environment_interpolation_in_hyper_parameters_never_reaches_the_output(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECRET", SECRET)
    env = "${oc.env:SECRET}"
    # an error path: the reference loader names the bad model argument
    bad_width = _with_hparams(
        workdir / "a.ckpt", {"model_name": "small_cnn", "model_kwargs": {"width": env}}
    )
    # an error path: the saved CIFAR folder does not exist
    cifar = _with_hparams(
        workdir / "b.ckpt",
        {"data": {"source": "cifar10", "root": f"/data/{env}"}},
        _small_cnn_state(),
    )
    # a success path: the data configuration (root included) is printed in --json
    synthetic = _with_hparams(
        workdir / "c.ckpt",
        {"seed": 3, "data": {"source": "synthetic", "seed": "${seed}", "root": env}},
        _small_cnn_state(),
    )
    outputs = [
        run("estimate", bad_width, "--json"),
        run("estimate", cifar, *SMALL_CNN, "--json"),
        run("estimate", synthetic, *SMALL_CNN, "--num-hvps", 4, "--batch-size", 4, "--json"),
    ]
    assert [r.exit_code for r in outputs] == [1, 1, 0], [r.output for r in outputs]
    for result in outputs:
        assert SECRET not in result.output
    assert "width must be an integer" in outputs[0].output and env in outputs[0].output
    assert env in outputs[2].output  # shown as the text it is
    assert '"seed": 3' in outputs[2].output  # a reference to another node still resolves
    assert os.environ["SECRET"] == SECRET


# --------------------------------------------------------------------------- zip sizes


def _deflated(path: Path, source: Path) -> Path:
    """``source`` (a torch.save archive) with its entries deflated: a valid checkpoint whose
    zeros inflate by a factor of about a thousand."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for member in src.infolist():
            dst.writestr(member.filename, src.read(member), zipfile.ZIP_DEFLATED)
    return path


def _zero_bomb(workdir: Path) -> Path:
    plain = workdir / "zeros.pt"
    torch.save({"state_dict": {"weight": torch.zeros(4 * 2**20 + 37)}}, plain)  # 16 MiB
    bomb = _deflated(workdir / "bomb.ckpt", plain)
    plain.unlink()
    assert bomb.stat().st_size < 100_000
    return bomb


def _understated(path: Path, bomb: Path) -> Path:
    """``bomb`` with its big entry's uncompressed size rewritten as 1 KiB in both headers."""
    with zipfile.ZipFile(bomb) as archive:
        big = max(archive.infolist(), key=lambda m: m.file_size)
    raw = bomb.read_bytes()
    size = struct.pack("<I", big.file_size)
    assert raw.count(size) == 2, "the size appears in the local and the central header"
    path.write_bytes(raw.replace(size, struct.pack("<I", 1024)))
    return path


def test_an_archive_declaring_far_more_than_its_size_is_refused_before_inflating(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_CHECKPOINT_MAX_BYTES, raising=False)
    bomb = _zero_bomb(workdir)
    contents, reason = read_checkpoint(bomb)
    assert contents is None
    assert "refused before inflating it: its zip entries declare 16.0 MiB" in reason
    assert ENV_CHECKPOINT_MAX_BYTES in reason and "\n" not in reason
    with pytest.raises(CheckpointError, match="refused before inflating"):
        open_checkpoint(bomb, {"model": "x:y", "data": "synthetic"})
    result = run("estimate", bomb, "--model", "x:y", "--data", "synthetic")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert [line for line in result.stderr.splitlines() if line.strip()] == [f"Error: {reason}"]
    # the same file, allowed explicitly: it is a valid checkpoint
    monkeypatch.setenv(ENV_CHECKPOINT_MAX_BYTES, str(32 * 2**20))
    contents, reason = read_checkpoint(bomb)
    assert reason is None and contents["state_dict"]["weight"].numel() == 4 * 2**20 + 37


def test_an_archive_whose_header_understates_an_entry_is_refused(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_CHECKPOINT_MAX_BYTES, raising=False)
    liar = _understated(workdir / "liar.ckpt", _zero_bomb(workdir))
    contents, reason = read_checkpoint(liar)
    assert contents is None
    assert "does not inflate as declared" in reason, reason


def test_a_checkpoint_written_by_torch_save_is_within_the_default_limit(workdir: Path) -> None:
    path = workdir / "big.pt"
    torch.save({"state_dict": {"weight": torch.randn(2**20)}}, path)
    contents, reason = read_checkpoint(path)
    assert reason is None and contents["state_dict"]["weight"].numel() == 2**20
    limit, origin = archive_limit(path.stat().st_size)
    assert limit == 5 * path.stat().st_size and origin.startswith("the default")


# --------------------------------------------------------------------------- train resume=


def _files(workdir: Path) -> dict[str, Path]:
    """Checkpoints of each kind a user may hand to both ``estimate`` and ``train resume=``."""
    omegaconf = pytest.importorskip("omegaconf")
    state = torch.load(save_state_dict(workdir / "w.pt"), weights_only=True)
    legacy = workdir / "legacy.ckpt"
    torch.save({"state_dict": state, "epoch": 1}, legacy, _use_new_zipfile_serialization=False)
    cfg = omegaconf.OmegaConf.create({"seed": 3, "copy": "${seed}", "model": {"layers": [1, 2]}})
    omegaconf.OmegaConf.set_cache(cfg, collections.defaultdict(dict, {"now": {("%Y",): "2026"}}))
    clean_omegaconf = workdir / "omegaconf.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": cfg}, clean_omegaconf)
    hostile = workdir / "hostile.ckpt"
    torch.save({"state_dict": state, "extra": _Exec("pass")}, hostile)
    text = workdir / "text.ckpt"
    text.write_text("not a checkpoint")
    return {
        "legacy": legacy,
        "omegaconf": clean_omegaconf,
        "hostile": hostile,
        "text": text,
        "bomb": _zero_bomb(workdir),
    }


class _Exec:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[object, ...]:
        return (exec, (self.code,))


def test_train_resume_accepts_and_refuses_the_files_estimate_does_for_the_same_reasons(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_CHECKPOINT_MAX_BYTES, raising=False)
    verdicts = {}
    for kind, path in _files(workdir).items():
        _, reason = read_checkpoint(path)
        error: CheckpointError | None = None
        try:
            check_resume_checkpoint(path)
        except CheckpointError as exc:
            error = exc
        resume = None if error is None else str(error)
        if resume is not None:
            assert resume.startswith(f"resume={path}") and "\n" not in resume
        verdicts[kind] = (reason is None, resume is None)
        if kind == "hostile":
            assert isinstance(error, UntrustedCheckpointError) and "(exec)" in str(resume)
            assert "--trust-checkpoint" not in resume  # train has no such flag
        elif kind == "text":
            assert "not a checkpoint written by torch.save or Lightning" in resume
            assert reason in resume
        elif kind == "bomb":
            assert "refused before inflating it" in resume
    assert verdicts == {
        "legacy": (True, True),
        "omegaconf": (True, True),
        "hostile": (False, False),
        "text": (False, False),
        "bomb": (False, False),
    }
