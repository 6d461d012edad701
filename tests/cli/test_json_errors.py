"""With ``--json`` a failing command still prints JSON on stdout, ``{"error": {"type",
"message"}}``, with the one-line message on stderr and the exit code as without ``--json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from checkpoint_helpers import GENERIC_ARGS, save_state_dict
from click.testing import CliRunner, Result

from deconcnn_curvature.cli import cli


def run(*args: Any) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], env={"COLUMNS": "200"})


def _error(result: Result) -> dict[str, str]:
    out = json.loads(result.stdout)
    assert set(out) == {"error"} and set(out["error"]) == {"type", "message"}
    assert result.stderr.strip().splitlines()[-1] == f"Error: {out['error']['message']}"
    return out["error"]


@pytest.mark.parametrize("command", ["estimate", "compare", "density"])
def test_a_package_error_is_a_json_object_with_exit_code_1(workdir: Path, command: str) -> None:
    result = run(command, workdir / "missing.ckpt", "--json")
    assert result.exit_code == 1 and "Traceback" not in result.output
    error = _error(result)
    assert error["type"] == "CheckpointError" and "missing.ckpt does not exist" in error["message"]


def test_an_option_error_names_the_package_error_type(workdir: Path) -> None:
    path = save_state_dict(workdir / "w.pt")
    result = run("estimate", path, *GENERIC_ARGS, "-b", "hutchpp", "--num-hvps", 3, "--json")
    assert result.exit_code == 1
    assert _error(result) == {
        "type": "InvalidOptionError",
        "message": "option 'num_hvps' of backend 'hutchpp' must be >= 5, got 3.",
    }


@pytest.mark.parametrize(
    "args",
    [
        ["estimate", "w.pt", "--seed", "-1"],
        ["estimate", "w.pt", "-q", "density"],
        ["density", "w.pt", "--grid-points", "1"],
        ["train", "-x"],
    ],
)
def test_a_usage_error_is_a_json_object_with_exit_code_2(workdir: Path, args: list[str]) -> None:
    result = run(*args, "--json")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert _error(result)["type"] in ("BadParameter", "UsageError")


def test_without_json_stdout_stays_empty(workdir: Path) -> None:
    result = run("estimate", workdir / "missing.ckpt")
    assert result.exit_code == 1 and result.stdout == ""
