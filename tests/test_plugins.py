"""Third-party plugins through real entry-point metadata, the env-var filter, broken plugins.

Each test builds its plugin manager afresh (tests/conftest.py resets the registry). A plugin
"distribution" is written into ``tmp_path``: a module plus ``<name>.dist-info/`` with METADATA and
entry_points.txt, found by ``importlib.metadata`` once ``tmp_path`` is on ``sys.path`` — the same
path an installed wheel takes.
"""

from __future__ import annotations

import json
import textwrap
import types
import uuid
from pathlib import Path

import pytest
from cases import get_case
from click.testing import CliRunner

import deconcnn_curvature as dcc
from deconcnn_curvature import registry
from deconcnn_curvature.cli import cli
from deconcnn_curvature.hookspecs import hookimpl
from deconcnn_curvature.plugins import BUILTIN_PLUGINS, load_plugins
from deconcnn_curvature.registry import Registry, get_registry

#: A backend computing the exact trace from a dense Hessian (tiny models only).
EXACT_TRACE_PLUGIN = """
import torch
from deconcnn_curvature import Backend, CurvatureResult, hookimpl
from deconcnn_curvature.hvp import HessianOperator


class DenseTrace(Backend):
    name = "{backend}"
    description = "exact trace from the dense Hessian (test plugin)"
    quantities = frozenset({{"trace"}})
    exact = True

    def compute(self, problem, quantity, *, seed, options):
        op = HessianOperator(problem)
        eye = torch.eye(op.dim, dtype=op.dtype, device=op.device)
        value = float(torch.diagonal(op.matmat(eye)).sum())
        return CurvatureResult(
            backend=self.name, quantity=quantity, value=value, stderr=0.0, n_hvp=op.n_matvecs,
            seconds=0.0, seed=seed, device=str(problem.device), exact=True, method="dense",
            dim=problem.dim,
        )


@hookimpl
def register_backends(register):
    register(DenseTrace)
"""


def write_distribution(
    root: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]
) -> None:
    """Write an installed-looking distribution into ``root`` (a directory on sys.path)."""
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    eps = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[deconcnn_curvature]\n{eps}\n")


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """One distribution with a working plugin, one whose import fails, one whose hook raises."""
    good, bad_import, bad_hook = _unique("dcc_good"), _unique("dcc_badimp"), _unique("dcc_badhook")
    write_distribution(
        tmp_path,
        "dcc-test-plugins",
        {"exact-trace": good, "broken-import": bad_import, "broken-hook": bad_hook},
        {
            good: EXACT_TRACE_PLUGIN.format(backend="dense-trace"),
            bad_import: "import a_module_that_does_not_exist_anywhere\n",
            bad_hook: """
                from deconcnn_curvature import hookimpl

                @hookimpl
                def register_backends(register):
                    raise RuntimeError("hook exploded on purpose")
            """,
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return {"good": good, "bad_import": bad_import, "bad_hook": bad_hook}


def _use(monkeypatch: pytest.MonkeyPatch, plugins: str | None) -> Registry:
    if plugins is None:
        monkeypatch.delenv("DECONCNN_CURVATURE_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("DECONCNN_CURVATURE_PLUGINS", plugins)
    registry.reset_registry()
    return get_registry()


def _install(monkeypatch: pytest.MonkeyPatch, *extra: object) -> Registry:
    """Make a registry built with in-process ``extra`` plugins the process-wide one."""
    reg = Registry.build(extra_plugins=extra)
    registry.set_registry(reg)
    return reg


def _module(name: str, **attrs: object) -> types.ModuleType:
    mod = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(mod, key, value)
    return mod


def _backend(name: str, quantities: frozenset[str] = frozenset({"trace"})) -> type[dcc.Backend]:
    def compute(self, problem, quantity, *, seed, options):
        return dcc.CurvatureResult(
            backend=self.name,
            quantity=quantity,
            value=float(len(name)),
            stderr=0.0,
            n_hvp=0,
            seconds=0.0,
            seed=seed,
            device="cpu",
            exact=True,
            method="constant",
            dim=problem.dim,
        )

    return type(
        f"B_{name}", (dcc.Backend,), {"name": name, "quantities": quantities, "compute": compute}
    )


def _registering(name: str, *classes: object) -> types.ModuleType:
    @hookimpl
    def register_backends(register):
        for cls in classes:
            register(cls)

    return _module(name, register_backends=register_backends)


# -- entry points -------------------------------------------------------------------------------
def test_third_party_backend_via_entry_point_is_listed_and_usable(
    third_party: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = _use(monkeypatch, "exact-trace")
    assert "dense-trace" in reg.names() and "pyhessian" in reg.names()
    row = next(r for r in dcc.list_backends() if r["name"] == "dense-trace")
    assert row["plugin"] == "dcc-test-plugins:exact-trace"
    assert row["available"] is True and row["exact"] is True and row["quantities"] == ["trace"]
    assert reg.broken == []  # the broken entry points were not selected

    case = get_case("cnn")
    model, loss_fn, batch = case.make()
    r = dcc.estimate(model, loss_fn, batch, "trace", backend="dense-trace")
    assert r.backend == "dense-trace" and r.exact and r.n_hvp == case.exact.shape[0]
    assert r.value == pytest.approx(float(case.exact.trace()), rel=1e-10)


def test_unset_env_var_loads_every_entry_point_and_reports_the_broken_ones(
    third_party: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = _use(monkeypatch, None)
    assert "dense-trace" in reg.names()
    broken = {b.name: b for b in reg.broken}
    imp = broken["dcc-test-plugins:broken-import"]
    assert imp.where == "import" and "ModuleNotFoundError" in imp.error
    assert "a_module_that_does_not_exist_anywhere" in imp.error
    hook = broken["dcc-test-plugins:broken-hook"]
    assert hook.where == "register_backends"
    assert "RuntimeError: hook exploded on purpose" in hook.error

    # Everything else keeps working.
    model, loss_fn, batch = get_case("mlp").make()
    assert dcc.estimate(model, loss_fn, batch, "trace", num_hvps=4).backend == "pyhessian"
    assert dcc.estimate(model, loss_fn, batch, backend="dense-trace").exact

    result = CliRunner().invoke(cli, ["list-backends", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    reported = {b["name"]: b for b in out["broken_plugins"]}
    assert (
        "a_module_that_does_not_exist_anywhere"
        in reported["dcc-test-plugins:broken-import"]["error"]
    )
    assert "hook exploded" in reported["dcc-test-plugins:broken-hook"]["error"]
    assert {r["name"]: r["available"] for r in out["backends"]}["pyhessian"] is True

    table = CliRunner().invoke(cli, ["list-backends"])
    assert table.exit_code == 0
    flat = " ".join(table.output.split())  # rich wraps long lines
    assert "broken plugin dcc-test-plugins:broken-hook (register_backends)" in flat
    assert "hook exploded on purpose" in flat


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        ("", set()),
        ("exact-trace", {"dcc-test-plugins:exact-trace"}),
        (
            " exact-trace , broken-hook ",
            {"dcc-test-plugins:exact-trace", "dcc-test-plugins:broken-hook"},
        ),
        ("not-installed", set()),
    ],
    ids=["empty-none", "one", "list", "unknown-name"],
)
def test_env_var_selects_entry_points(
    third_party: dict[str, str], monkeypatch: pytest.MonkeyPatch, selection: str, expected: set[str]
) -> None:
    reg = _use(monkeypatch, selection)
    plugin_names = {n for n, _ in reg.manager.list_name_plugin() if not n.startswith("builtin:")}
    assert plugin_names == expected
    assert ("dense-trace" in reg.names()) == ("dcc-test-plugins:exact-trace" in expected)
    # Built-ins always load.
    assert {f"builtin:{m.rsplit('.', 1)[1]}" for m in BUILTIN_PLUGINS} <= {
        n for n, _ in reg.manager.list_name_plugin()
    }


# -- duplicates ---------------------------------------------------------------------------------
def test_duplicate_backend_names_fail_when_selected_naming_both_plugins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = _registering("plugin_one", _backend("twin"), _backend("solo-one"))
    # The second plugin registers the clash first, then another backend that must still land.
    second = _registering("plugin_two", _backend("twin"), _backend("solo-two"))
    reg = _install(monkeypatch, first, second)

    with pytest.raises(dcc.DuplicateBackendError) as info:
        dcc.get_backend("twin")
    msg = str(info.value)
    assert "'twin'" in msg and "'plugin_one'" in msg and "'plugin_two'" in msg
    assert isinstance(info.value, dcc.PluginError)
    model, loss_fn, batch = get_case("mlp").make()
    with pytest.raises(dcc.DuplicateBackendError, match="plugin_one"):
        dcc.estimate(model, loss_fn, batch, backend="twin")

    for name in ("solo-one", "solo-two"):
        assert dcc.estimate(model, loss_fn, batch, backend=name).value == len(name)
    assert dcc.estimate(model, loss_fn, batch, backend="pyhessian", num_hvps=3).n_hvp == 3
    row = next(r for r in dcc.list_backends() if r["name"] == "twin")
    assert (
        row["available"] is False
        and "plugin_one" in row["reason"]
        and "plugin_two" in row["reason"]
    )
    assert any(b.name == "plugin_two" and "'twin'" in b.error for b in reg.broken)


def test_a_plugin_reusing_a_builtin_name_makes_it_ambiguous(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _install(monkeypatch, _registering("impostor", _backend("pyhessian")))
    with pytest.raises(
        dcc.DuplicateBackendError, match=r"several plugins \('builtin:pyhessian', 'impostor'\)"
    ):
        dcc.get_backend("pyhessian")


# -- invalid plugins ----------------------------------------------------------------------------
def test_misspelt_hook_is_caught_by_check_pending_and_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    @hookimpl
    def register_backend(register):  # missing the final "s"
        register(_backend("never"))

    reg = _install(monkeypatch, _module("typo_plugin", register_backend=register_backend))
    (broken,) = [b for b in reg.broken if b.name == "typo_plugin"]
    assert broken.where == "check"
    assert "register_backend" in broken.error and "unknown hook" in broken.error
    assert "never" not in reg.names()
    assert "typo_plugin" not in {n for n, _ in reg.manager.list_name_plugin()}
    assert dcc.get_backend("pyhessian").name == "pyhessian"


def test_hook_with_an_argument_the_spec_lacks_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    @hookimpl
    def register_backends(register, colour):
        raise AssertionError("never called")

    reg = _install(monkeypatch, _module("extra_arg", register_backends=register_backends))
    (broken,) = [b for b in reg.broken if b.name == "extra_arg"]
    assert "colour" in broken.error


class _Abstract(dcc.Backend):
    name = "abstract"
    quantities = frozenset({"trace"})


class _Nameless(dcc.Backend):
    quantities = frozenset({"trace"})

    def compute(self, problem, quantity, *, seed, options):  # pragma: no cover
        raise NotImplementedError


class _NoQuantities(dcc.Backend):
    name = "no-quantities"
    quantities = frozenset()

    def compute(self, problem, quantity, *, seed, options):  # pragma: no cover
        raise NotImplementedError


@pytest.mark.parametrize(
    ("registered", "pattern"),
    [
        (object, "not a subclass of deconcnn_curvature.Backend"),
        ("pyhessian", "not a subclass of deconcnn_curvature.Backend"),
        (_Abstract, r"backend 'abstract' \(_Abstract\) without implementing: compute"),
        (_Nameless, r"_Nameless with invalid name None"),
        (_NoQuantities, r"without a non-empty set of quantity names"),
    ],
    ids=["object", "string", "abstract", "nameless", "no-quantities"],
)
def test_registering_an_invalid_class_is_a_recorded_plugin_error(
    monkeypatch: pytest.MonkeyPatch, registered: object, pattern: str
) -> None:
    seen: list[BaseException] = []

    @hookimpl
    def register_backends(register):
        try:
            register(registered)
        except dcc.PluginError as exc:  # the plugin sees the error at the call...
            seen.append(exc)
            raise

    reg = _install(monkeypatch, _module("invalid_plugin", register_backends=register_backends))
    assert len(seen) == 1
    (broken,) = [b for b in reg.broken if b.name == "invalid_plugin"]
    assert broken.where == "register_backends"
    assert "PluginError" in broken.error and __import__("re").search(pattern, broken.error)
    assert "'invalid_plugin'" in broken.error  # ...and the report names the plugin
    assert dcc.get_backend("pyhessian").name == "pyhessian"


def test_bad_backend_names_are_refused() -> None:
    reg = Registry()
    for bad in ("Upper", "1st", "has space", ""):
        with pytest.raises(dcc.PluginError, match="invalid name"):
            reg._register(_backend(bad), "p")
    reg._register(_backend("ok_name-2"), "p")
    assert reg.names() == ["ok_name-2"]


# -- the manager itself -------------------------------------------------------------------------
def test_load_plugins_registers_builtins_first_and_traces_on_request(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    loaded = load_plugins()
    names = [n for n, _ in loaded.manager.list_name_plugin()]
    assert names[: len(BUILTIN_PLUGINS)] == [
        f"builtin:{m.rsplit('.', 1)[1]}" for m in BUILTIN_PLUGINS
    ]
    assert loaded.broken == []

    monkeypatch.setenv("DECONCNN_CURVATURE_TRACE", "1")
    registry.reset_registry()
    get_registry().manager.hook.register_backends(register=lambda cls: None)
    assert "register_backends" in capsys.readouterr().err


def test_load_checkpoint_hook_is_first_result(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[str] = []

    @hookimpl
    def load_checkpoint(path, checkpoint, settings):
        calls.append("mine")
        return ("loaded", path) if settings.get("mine") else None

    reg = _install(monkeypatch, _module("ckpt_plugin", load_checkpoint=load_checkpoint))
    assert not [b for b in reg.broken if b.name == "ckpt_plugin"]
    hook = reg.manager.hook.load_checkpoint
    assert hook(path=tmp_path, checkpoint=None, settings={"mine": True}) == ("loaded", tmp_path)
    assert calls == ["mine"]
