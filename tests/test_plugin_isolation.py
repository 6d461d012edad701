"""A plugin cannot take the registry down: ``sys.exit()`` or any other
``BaseException`` (but the user's ``KeyboardInterrupt``) at import or in its hook makes it a broken
plugin like any other, and a ``register_backends`` hook that returns something is reported.

Plugins are real (fake) installed distributions: a module plus ``*.dist-info`` with entry points,
found by ``importlib.metadata`` on ``sys.path``.
"""

from __future__ import annotations

import json
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import deconcnn_curvature as dcc
from deconcnn_curvature import registry
from deconcnn_curvature.checkpoints import open_checkpoint
from deconcnn_curvature.cli import cli
from deconcnn_curvature.errors import PluginError

DIST = "dcc-hostile-plugins"

GOOD = """
from deconcnn_curvature import Backend, CurvatureResult, hookimpl


class Fine(Backend):
    name = "still-fine"
    description = "keeps working whatever its neighbours do (test plugin)"
    quantities = frozenset({"trace"})
    exact = True

    def compute(self, problem, quantity, *, seed, options):
        return CurvatureResult(
            backend=self.name, quantity=quantity, value=1.0, stderr=0.0, n_hvp=0, seconds=0.0,
            seed=seed, device="cpu", exact=True, method="constant", dim=problem.dim,
        )


@hookimpl
def register_backends(register):
    register(Fine)
"""

HOSTILE = {
    "exit-at-import": "import sys\nsys.exit(3)\n",
    "exit-zero-at-import": "raise SystemExit(0)\n",
    "base-at-import": "class Odd(BaseException):\n    pass\n\nraise Odd('not an Exception')\n",
    "exit-in-hook": """
        import sys
        from deconcnn_curvature import hookimpl

        @hookimpl
        def register_backends(register):
            sys.exit("bye from the hook")
    """,
    "returns-class": GOOD.replace("still-fine", "returned-only").replace(
        "    register(Fine)", "    return Fine"
    ),
    "returns-list": """
        from deconcnn_curvature import hookimpl

        @hookimpl
        def register_backends(register):
            return [1, 2, 3]
    """,
    "exit-in-loader": """
        import sys
        from deconcnn_curvature import hookimpl

        @hookimpl
        def load_checkpoint(path):
            sys.exit(4)
    """,
}


def _install(root: Path, plugins: dict[str, str]) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:8]
    modules = {name: f"dcc_hostile_{name.replace('-', '_')}_{suffix}" for name in plugins}
    for name, source in plugins.items():
        (root / f"{modules[name]}.py").write_text(textwrap.dedent(source))
    info = root / f"{DIST.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 0.1\n")
    eps = "\n".join(f"{name} = {module}" for name, module in modules.items())
    (info / "entry_points.txt").write_text(f"[deconcnn_curvature]\n{eps}\n")
    return modules


@pytest.fixture
def hostile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    plugins = {"good": GOOD, **HOSTILE}
    modules = _install(tmp_path, plugins)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DECONCNN_CURVATURE_PLUGINS", ",".join(plugins))
    registry.reset_registry()
    yield tmp_path
    for module in modules.values():
        sys.modules.pop(module, None)


def _broken() -> dict[str, dict[str, str]]:
    return {b.name.split(":", 1)[1]: b.to_dict() for b in registry.get_registry().broken}


def test_exits_and_base_exceptions_make_a_plugin_broken_not_the_process(hostile: Path) -> None:
    names = {row["name"] for row in dcc.list_backends()}
    assert {"pyhessian", "hutchpp", "still-fine"} <= names
    broken = _broken()
    assert broken["exit-at-import"]["where"] == "import"
    assert "SystemExit: 3" in broken["exit-at-import"]["error"]
    assert broken["exit-zero-at-import"]["where"] == "import"
    assert "Odd: not an Exception" in broken["base-at-import"]["error"]
    assert broken["exit-in-hook"]["where"] == "register_backends"
    assert "SystemExit: bye from the hook" in broken["exit-in-hook"]["error"]


def test_a_register_backends_hook_returning_something_is_reported(hostile: Path) -> None:
    broken = _broken()
    returned = broken["returns-class"]
    assert returned["where"] == "register_backends"
    assert "returned <class" in returned["error"] and "Fine" in returned["error"]
    assert "must call register(BackendClass)" in returned["error"]
    assert "returned [1, 2, 3]" in broken["returns-list"]["error"]
    assert "returned-only" not in {row["name"] for row in dcc.list_backends()}


def test_list_backends_command_survives_and_lists_them(hostile: Path) -> None:
    result = CliRunner().invoke(cli, ["list-backends", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert "still-fine" in {row["name"] for row in data["backends"]}
    broken = {b["name"].split(":", 1)[1] for b in data["broken_plugins"]}
    expected = set(HOSTILE) - {"exit-in-loader"}  # that one's only hook is fine at load time
    assert expected <= broken
    table = CliRunner().invoke(cli, ["list-backends"])
    assert table.exit_code == 0 and "broken plugin" in table.output


def test_a_loader_calling_sys_exit_is_a_plugin_error(hostile: Path) -> None:
    path = hostile / "w.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(PluginError, match=r"inside a load_checkpoint hook .*SystemExit: 4"):
        open_checkpoint(path, {"data": "synthetic"}, manager=registry.get_registry().manager)


def test_keyboard_interrupt_still_stops_the_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    modules = _install(tmp_path, {"interrupt": "raise KeyboardInterrupt\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DECONCNN_CURVATURE_PLUGINS", "interrupt")
    registry.reset_registry()
    try:
        with pytest.raises(KeyboardInterrupt):
            dcc.list_backends()
    finally:
        sys.modules.pop(modules["interrupt"], None)
