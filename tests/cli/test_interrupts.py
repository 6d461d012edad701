"""Ctrl-C or SIGTERM during ``deconcnn-curv compare`` / ``density``: one line saying so and the
shell's exit code for the signal (130 / 143), as ``estimate`` does; Click's "Aborted!" with exit
code 1 read as an ordinary failure to a script or a scheduler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from checkpoint_helpers import GENERIC_ARGS, save_state_dict
from click.testing import CliRunner

import deconcnn_curvature
from deconcnn_curvature.cli import cli
from deconcnn_curvature.cli.progress import Terminated


@pytest.fixture
def workdir(workdir: Path) -> Path:
    """The shared working folder (tests/conftest.py) with weights saved in ``w.pt``."""
    save_state_dict(workdir / "w.pt", seed=1)
    return workdir


@pytest.mark.parametrize("command", ["compare", "density"])
@pytest.mark.parametrize(("signal", "code"), [(KeyboardInterrupt, 130), (Terminated, 143)])
def test_an_interrupted_command_says_so_and_exits_with_the_signals_code(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, command: str, signal: type, code: int
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise signal

    monkeypatch.setattr(deconcnn_curvature, command, interrupted)
    result = CliRunner().invoke(cli, [command, "w.pt", *GENERIC_ARGS])
    name = "SIGTERM" if code == 143 else "SIGINT"
    assert result.exit_code == code, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"deconcnn-curv {command}: interrupted by {name} before it finished; nothing to show."
    )
    assert "Aborted!" not in result.output
