"""Opening a checkpoint never runs code from it unless the user says they trust
the file: ``weights_only=True`` everywhere (API, estimate/compare/density, ``train resume=``), an
explicit ``--trust-checkpoint`` / ``trust=True`` opt-in with a warning, and one read of the file.

The hostile checkpoint pickles ``builtins.exec`` with a line of code that appends to a marker
file: if the marker exists, code from the checkpoint ran (and the number of lines says how often).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from checkpoint_helpers import (
    GENERIC_ARGS,
    HELPER_MODULE,
    reference_checkpoint,
    save_state_dict,
)
from click.testing import CliRunner, Result

from deconcnn_curvature.checkpoints import (
    CheckpointError,
    UntrustedCheckpointError,
    UntrustedCheckpointWarning,
    check_resume_checkpoint,
    open_checkpoint,
    read_checkpoint,
)
from deconcnn_curvature.cli import cli

GENERIC = {"model": f"{HELPER_MODULE}:factory", "data": "synthetic", "input_shape": (12,)}


class _Payload:
    """Unpickling this runs ``exec(code)``: what a hostile checkpoint does."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (self.code,))


class _Explodes:
    """Unpickling this raises (after whatever came before it in the file has run)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (int, ("not a number",))


def _append(marker: Path) -> str:
    return f"open({str(marker)!r}, 'a').write('ran\\n')"


def hostile(path: Path, marker: Path, *, then_fail: bool = False) -> Path:
    """The helper model's weights plus an object whose unpickling appends to ``marker``."""
    save_state_dict(path)
    state = torch.load(path, weights_only=True)
    payload: Any = _Payload(_append(marker))
    torch.save(
        {"state_dict": state, "extra": [payload, _Explodes()] if then_fail else payload}, path
    )
    return path


def runs(marker: Path) -> int:
    return len(marker.read_text().splitlines()) if marker.exists() else 0


# --------------------------------------------------------------------------- library


def test_a_hostile_checkpoint_is_refused_and_its_code_never_runs(workdir: Path) -> None:
    marker = workdir / "marker"
    path = hostile(workdir / "evil.ckpt", marker)
    with pytest.raises(UntrustedCheckpointError) as info:
        open_checkpoint(path, GENERIC)
    message = str(info.value)
    assert "--trust-checkpoint" in message and "trust=True" in message
    assert "(exec)" in message and "\n" not in message
    contents, reason = read_checkpoint(path)
    assert contents is None and reason is not None and "--trust-checkpoint" in reason
    assert runs(marker) == 0


def test_trust_opens_it_once_with_a_warning(workdir: Path) -> None:
    marker = workdir / "marker"
    path = hostile(workdir / "evil.ckpt", marker)
    with pytest.warns(UntrustedCheckpointWarning, match="trust"):
        loaded = open_checkpoint(path, GENERIC, trust=True)
    assert loaded.loader == "builtin:factory"
    assert runs(marker) == 1


def test_a_failing_unpickling_is_not_retried(workdir: Path) -> None:
    """The payload ran, then unpickling raised: the file is not read a second time (it was, by
    the built-in loader asking torch again for the reason, so the payload ran twice)."""
    marker = workdir / "marker"
    path = hostile(workdir / "evil.ckpt", marker, then_fail=True)
    with (
        pytest.warns(UntrustedCheckpointWarning),
        pytest.raises(CheckpointError, match=r"is not a PyTorch checkpoint.*ValueError"),
    ):
        open_checkpoint(path, GENERIC, trust=True)
    assert runs(marker) == 1
    with pytest.raises(UntrustedCheckpointError):
        open_checkpoint(path, GENERIC)
    assert runs(marker) == 1


def test_plain_hyper_parameters_open_without_trust(workdir: Path) -> None:
    """Paths and numpy scalars in hyper-parameters are allow-listed (scoped, not globally)."""
    path = save_state_dict(workdir / "w.pt")
    state = torch.load(path, weights_only=True)
    hparams = {"root": pathlib.Path("/data/cifar"), "lr": np.float64(0.1), "n": np.int64(3)}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, path)
    contents, reason = read_checkpoint(path)
    assert reason is None
    assert contents["hyper_parameters"] == hparams
    assert open_checkpoint(path, GENERIC).loader == "builtin:factory"
    # the allow-list is scoped to our reads: torch's own default is unchanged afterwards
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)


@pytest.mark.slow
def test_reference_checkpoints_open_without_trust(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    loaded = open_checkpoint(
        reference_checkpoint(tmp_path), {"data": "synthetic-cifar", "batch_size": 4}
    )
    assert loaded.loader == "builtin:reference"


# --------------------------------------------------------------------------- command line


def run(*args: Any) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("command", ["estimate", "compare", "density"])
def test_the_commands_refuse_it_in_one_line(workdir: Path, command: str) -> None:
    marker = workdir / "marker"
    path = hostile(workdir / "evil.ckpt", marker)
    result = run(command, path, *GENERIC_ARGS)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "--trust-checkpoint" in lines[0]
    assert runs(marker) == 0


def test_trust_checkpoint_runs_it_once_and_warns(workdir: Path) -> None:
    marker = workdir / "marker"
    path = hostile(workdir / "evil.ckpt", marker)
    result = run("estimate", path, *GENERIC_ARGS, "--num-hvps", 4, "--json", "--trust-checkpoint")
    assert result.exit_code == 0, result.output
    warning = [line for line in result.stderr.splitlines() if "--trust-checkpoint" in line]
    assert len(warning) == 1 and warning[0].startswith("Warning: ")
    assert result.stdout.lstrip().startswith("{")  # --json stays clean
    assert runs(marker) == 1


@pytest.mark.slow
def test_a_real_subprocess_exits_1_without_traceback(workdir: Path) -> None:
    marker = workdir / "marker"
    path = hostile(workdir / "evil.ckpt", marker)
    proc = subprocess.run(
        [sys.executable, "-m", "deconcnn_curvature", "estimate", str(path), *GENERIC_ARGS],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=workdir,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "--trust-checkpoint" in proc.stderr
    assert runs(marker) == 0


# --------------------------------------------------------------------------- training resume


def test_resume_refuses_a_hostile_checkpoint_without_running_it(workdir: Path) -> None:
    marker = workdir / "marker"
    path = hostile(workdir / "evil.ckpt", marker)
    with pytest.raises(UntrustedCheckpointError, match=r"resume=.*\(exec\)") as info:
        check_resume_checkpoint(path)
    assert "\n" not in str(info.value)
    assert runs(marker) == 0
    check_resume_checkpoint(save_state_dict(workdir / "w.pt"))  # plain weights pass
    hparams = {"root": pathlib.Path("/data"), "lr": np.float64(0.1)}
    torch.save({"hyper_parameters": hparams, "state_dict": {}}, workdir / "h.ckpt")
    check_resume_checkpoint(workdir / "h.ckpt")  # so do the allow-listed hyper-parameters
    (workdir / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"not a checkpoint written by torch\.save"):
        check_resume_checkpoint(workdir / "text.ckpt")


@pytest.mark.slow
def test_train_resume_of_a_hostile_checkpoint_is_one_line(workdir: Path) -> None:
    pytest.importorskip("lightning")
    pytest.importorskip("hydra")
    marker = workdir / "marker"
    path = hostile(workdir / "evil.ckpt", marker)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deconcnn_curvature",
            "train",
            "+preset=demo",
            f"resume={path}",
            f"run_dir={workdir / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=workdir,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "UnpicklingError" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("Error: resume=") and "could run code" in lines[-1]
    assert runs(marker) == 0
    assert not (workdir / "run").exists()


def test_a_file_that_is_no_pickle_gets_a_one_line_reason(workdir: Path) -> None:
    """Not a refusal (nothing to trust): torch's weights-only error, without its advice text."""
    path = workdir / "run.json"
    path.write_text('{"weight": [[1.0, 2.0]]}')
    contents, reason = read_checkpoint(path)
    assert contents is None and reason == "UnpicklingError: Unsupported operand 123"
    with pytest.raises(CheckpointError, match=r"truncated \(UnpicklingError: Unsupported operand"):
        open_checkpoint(path, GENERIC)


# --------------------------------------------------------------------------- Hydra configs


def _hydra_style_checkpoint(path: Path) -> Path:
    """A real Lightning checkpoint of a module that called ``save_hyperparameters(cfg)`` with an
    OmegaConf config (nested dicts, lists, an interpolation, a path, None, and the root resolver
    cache Hydra fills for ``${now:...}``); its ``net`` is the helper model of ``w.pt``."""
    import lightning.pytorch as pl
    from checkpoint_helpers import helper_model
    from omegaconf import OmegaConf

    class HydraModule(pl.LightningModule):
        def __init__(self, cfg: Any) -> None:
            super().__init__()
            self.save_hyperparameters(cfg)
            self.net = helper_model(0)

    cfg = OmegaConf.create(
        {
            "seed": 3,
            "copy_of_seed": "${seed}",
            "model": {"hidden": 5, "layers": [12, {"width": 0.5}], "root": pathlib.Path("/d")},
            "tags": ["a", "b"],
            "nothing": None,
        }
    )
    OmegaConf.set_cache(cfg, defaultdict(dict, {"now": {("%Y",): "2026"}}))
    trainer = pl.Trainer(logger=False, accelerator="cpu", enable_progress_bar=False)
    trainer.strategy.connect(HydraModule(cfg))
    trainer.save_checkpoint(path)
    return path


def test_a_hydra_config_in_hyper_parameters_opens_without_trust(workdir: Path) -> None:
    pytest.importorskip("lightning")
    omegaconf = pytest.importorskip("omegaconf")
    path = _hydra_style_checkpoint(workdir / "app_hp.ckpt")
    contents, reason = read_checkpoint(path)
    assert reason is None, reason
    hparams = contents["hyper_parameters"]
    assert isinstance(hparams, omegaconf.DictConfig)
    assert hparams.copy_of_seed == 3 and hparams.model.layers[1].width == 0.5
    assert hparams.model.root == pathlib.Path("/d") and list(hparams.tags) == ["a", "b"]
    cache = omegaconf.OmegaConf.get_cache(hparams)
    assert isinstance(cache, defaultdict) and cache == {"now": {("%Y",): "2026"}}
    # the same weights, no hyper-parameters: the same measurement
    plain = save_state_dict(workdir / "w.pt")
    outputs = []
    for ckpt in (path, plain):
        result = run("estimate", ckpt, *GENERIC_ARGS, "--num-hvps", 4, "--json")
        assert result.exit_code == 0, result.output
        measured = json.loads(result.stdout)["result"]
        outputs.append(
            {k: v for k, v in measured.items() if k not in ("seconds", "peak_memory_bytes")}
        )
    assert outputs[0] == outputs[1] and outputs[0]["value"] > 0


def test_a_hydra_config_holding_code_is_still_refused(workdir: Path) -> None:
    omegaconf = pytest.importorskip("omegaconf")
    marker = workdir / "marker"
    cfg = omegaconf.OmegaConf.create({"data": {"source": "synthetic"}, "x": 1})
    cfg._get_node("x").__dict__["_val"] = _Payload(_append(marker))  # what no API would store
    state = torch.load(save_state_dict(workdir / "w.pt"), weights_only=True)
    torch.save({"state_dict": state, "hyper_parameters": cfg}, workdir / "evil.ckpt")
    with pytest.raises(UntrustedCheckpointError, match=r"\(exec\)"):
        open_checkpoint(workdir / "evil.ckpt", GENERIC)
    with pytest.raises(UntrustedCheckpointError, match=r"resume=.*\(exec\)"):
        check_resume_checkpoint(workdir / "evil.ckpt")
    assert runs(marker) == 0
