"""``deconcnn-curv list-backends``, ``--version`` and Click's usage errors, through CliRunner."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
from click.testing import CliRunner

import deconcnn_curvature as dcc
from deconcnn_curvature import registry
from deconcnn_curvature.cli import cli
from deconcnn_curvature.hookspecs import hookimpl
from deconcnn_curvature.registry import Registry


def _invoke(*args: str):
    return CliRunner().invoke(cli, list(args), prog_name="deconcnn-curv")


def _rows(output: str) -> dict[str, str]:
    """Table body rows keyed by backend name (the first cell, without '(default)')."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 5 and cells[0] and cells[0] != "name":
            rows[cells[0].removesuffix(" (default)")] = line
    return rows


def test_table_lists_pyhessian_as_the_default() -> None:
    result = _invoke("list-backends")
    assert result.exit_code == 0, result.output
    assert "deconcnn-curvature backends" in result.output
    for header in ("name", "plugin", "quantities", "kind", "available"):
        assert header in result.output
    row = _rows(result.output)["pyhessian"]
    assert "pyhessian (default)" in row
    assert "builtin:pyhessian" in row and "density, eigenvalues, trace" in row
    assert "stochastic" in row and "yes" in row
    assert "broken plugin" not in result.output


def test_json_parses_and_lists_pyhessian_available() -> None:
    result = _invoke("list-backends", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["default"] == "pyhessian" and out["broken_plugins"] == []
    rows = {r["name"]: r for r in out["backends"]}
    assert rows["pyhessian"]["available"] is True
    assert rows["pyhessian"]["plugin"] == "builtin:pyhessian"
    assert out["backends"] == dcc.list_backends()


def test_env_var_changes_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    class Other(dcc.Backend):
        name = "other"
        description = "a second backend"
        quantities = frozenset({"trace"})
        exact = True

        def compute(self, problem, quantity, *, seed, options):  # pragma: no cover
            raise NotImplementedError

    @hookimpl
    def register_backends(register):
        register(Other)

    plugin = types.ModuleType("other_plugin")
    plugin.register_backends = register_backends
    registry.set_registry(Registry.build(extra_plugins=(plugin,)))
    monkeypatch.setenv("DECONCNN_CURVATURE_BACKEND", "other")

    table = _invoke("list-backends")
    rows = _rows(table.output)
    assert "other (default)" in rows["other"] and "exact" in rows["other"]
    assert "(default)" not in rows["pyhessian"]
    assert json.loads(_invoke("list-backends", "--json").output)["default"] == "other"


def test_unavailable_backend_row_says_why_and_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Missing(dcc.Backend):
        name = "missing"
        description = "needs a module that is not installed"
        quantities = frozenset({"trace"})
        requires = ("deconcnn_no_such_module_xyz",)
        install_hint = "pip install 'nosuch[extra]'"

        def compute(self, problem, quantity, *, seed, options):  # pragma: no cover
            raise NotImplementedError

    @hookimpl
    def register_backends(register):
        register(Missing)

    plugin = types.ModuleType("missing_plugin")
    plugin.register_backends = register_backends
    registry.set_registry(Registry.build(extra_plugins=(plugin,)))
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps cells to the terminal width
    result = _invoke("list-backends")
    row = _rows(result.output)["missing"]
    # Brackets (extras) are text, not rich markup: the command survives intact, in the table and
    # on a line of its own that a narrow terminal does not wrap.
    assert (
        "no: missing module(s): deconcnn_no_such_module_xyz (install: pip install "
        "'nosuch[extra]')" in row
    )
    assert "to use missing: pip install 'nosuch[extra]'" in result.output


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag: str) -> None:
    result = _invoke(flag)
    assert result.exit_code == 0
    assert result.output == f"deconcnn-curv, version {dcc.__version__}\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["list-backend"], "No such command 'list-backend'"),
        (["list-backends", "--jsn"], "No such option '--jsn'. Did you mean '--json'?"),
        (["--nope"], "No such option '--nope'."),
        (["list-backends", "extra"], "Got unexpected extra argument (extra)"),
    ],
    ids=["command", "option", "group-option", "argument"],
)
def test_usage_errors_exit_2(args: list[str], message: str) -> None:
    result = _invoke(*args)
    assert result.exit_code == 2
    assert "Usage: deconcnn-curv" in result.output
    assert f"Error: {message}" in result.output


def test_help_lists_the_command() -> None:
    result = _invoke("--help")
    assert result.exit_code == 0 and "list-backends" in result.output


@pytest.mark.slow
def test_console_script_runs_in_a_fresh_process() -> None:
    env = {"DECONCNN_CURVATURE_PLUGINS": "", "PATH": ""}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from deconcnn_curvature.cli import main; main()",
            "list-backends",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)["backends"]}
    assert rows["pyhessian"]["available"] is True
