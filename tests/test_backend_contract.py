"""The backend contract: declared facts readable without instantiating, options validated.

Also checks every registered backend (built-in or not) against the contract, so a new backend
that forgets a declaration fails here.
"""

from __future__ import annotations

import json
import types

import pytest
import torch

import deconcnn_curvature as dcc
from deconcnn_curvature import registry
from deconcnn_curvature.backend import QUANTITIES, Availability, Option, describe
from deconcnn_curvature.backends.pyhessian import PyHessianBackend
from deconcnn_curvature.hookspecs import hookimpl
from deconcnn_curvature.registry import Registry


class NeedsMissing(dcc.Backend):
    """A backend whose dependency is not installed."""

    name = "needs-missing"
    description = "needs a module that is not installed"
    quantities = frozenset({"trace"})
    requires = ("deconcnn_no_such_module_xyz",)
    install_hint = "pip install 'deconcnn-curvature[nosuch]'"
    options = (Option("num_hvps", int, 10, "probes", min=2),)

    def __init__(self) -> None:  # listing or selecting must never build one
        raise AssertionError("instantiated")

    def compute(self, problem, quantity, *, seed, options):  # pragma: no cover
        raise AssertionError("computed")


@pytest.fixture
def with_missing(monkeypatch: pytest.MonkeyPatch) -> Registry:
    @hookimpl
    def register_backends(register):
        register(NeedsMissing)

    plugin = types.ModuleType("missing_plugin")
    plugin.register_backends = register_backends
    reg = Registry.build(extra_plugins=(plugin,))
    registry.set_registry(reg)
    return reg


def test_declared_attributes_are_readable_on_the_class() -> None:
    cls = PyHessianBackend
    assert cls.name == "pyhessian"
    assert cls.quantities == frozenset({"trace", "eigenvalues", "density"})
    assert cls.exact is False and cls.requires == ("pyhessian",)
    assert cls.install_hint == "pip install pyhessian==0.1"
    assert cls.supports_distributed is True
    assert cls.availability() == Availability(True)
    defaults = {o.name: o.default for o in cls.option_map().values()}
    assert defaults["num_hvps"] == 100 and defaults["k"] == 1 and defaults["eval_mode"] is True
    # eval_mode is the host's argument, declared once by the contract, not per backend.
    assert "eval_mode" not in {o.name for o in cls.options}
    assert cls.option_map()["k"].quantities == frozenset({"eigenvalues"})


def test_listing_never_instantiates(with_missing: Registry) -> None:
    rows = {r["name"]: r for r in dcc.list_backends()}
    assert "needs-missing" in rows and "pyhessian" in rows  # NeedsMissing() would have raised


def test_describe_is_json_serialisable() -> None:
    info = describe(PyHessianBackend)
    assert json.loads(json.dumps(info, allow_nan=False)) == info
    assert set(info) == {
        "name",
        "description",
        "quantities",
        "exact",
        "requires",
        "available",
        "reason",
        "install",
        "distributed",
        "options",
        "host_options",  # eval_mode: the host's, declared once by the contract
    }


def test_every_registered_backend_honours_the_contract() -> None:
    for row in dcc.list_backends():
        cls = dcc.get_backend(row["name"])
        assert json.dumps(row, allow_nan=False)
        assert cls.description, f"{cls.name} has no description"
        assert cls.quantities and all(isinstance(q, str) for q in cls.quantities)
        assert isinstance(cls.exact, bool) and isinstance(cls.supports_distributed, bool)
        names = [o.name for o in cls.options]
        assert len(names) == len(set(names)), f"{cls.name} declares an option twice"
        for opt in cls.options:
            assert opt.help and isinstance(opt, Option)
            assert opt.quantities <= cls.quantities, (cls.name, opt.name)
            if opt.default is not None:  # every default passes its own check
                assert opt.check(opt.default, cls.name) == opt.default, (cls.name, opt.name)
        for q in cls.quantities:
            resolved = cls.resolve_options(q, {})
            assert set(resolved) == {  # the backend's options and the host's (eval_mode)
                o.name for o in cls.option_map().values() if not o.quantities or q in o.quantities
            }
        if not row["available"]:
            assert row["reason"] and row["install"], f"{cls.name}: unavailable without a reason"


def test_unavailable_backend_is_listed_with_reason_and_install_hint(with_missing: Registry) -> None:
    row = next(r for r in dcc.list_backends() if r["name"] == "needs-missing")
    assert row["available"] is False
    assert row["reason"] == "missing module(s): deconcnn_no_such_module_xyz"
    assert row["install"] == "pip install 'deconcnn-curvature[nosuch]'"
    assert row["plugin"] == "missing_plugin"


def test_selecting_an_unavailable_backend_says_what_to_install(with_missing: Registry) -> None:
    from cases import get_case

    model, loss_fn, batch = get_case("mlp").make()
    for call in (
        lambda: dcc.resolve("trace", "needs-missing"),
        lambda: dcc.estimate(model, loss_fn, batch, "trace", backend="needs-missing"),
    ):
        with pytest.raises(dcc.BackendUnavailableError) as info:
            call()
        msg = str(info.value)
        assert "'needs-missing' is not available here" in msg
        assert "missing module(s): deconcnn_no_such_module_xyz" in msg
        assert "Install it with: pip install 'deconcnn-curvature[nosuch]'" in msg


def test_quantity_and_option_checks_come_before_availability(with_missing: Registry) -> None:
    with pytest.raises(dcc.UnsupportedQuantityError):
        dcc.resolve("density", "needs-missing")


def test_option_check_converts_and_bounds() -> None:
    opt = Option("x", float, 1.0, "a number", min=0, max=2, min_exclusive=True)
    assert opt.check(1, "b") == 1.0 and isinstance(opt.check(1, "b"), float)
    for bad, msg in [
        (0, "must be > 0"),
        (3, "must be <= 2"),
        ("1", "must be a number"),
        (True, "number"),
    ]:
        with pytest.raises(dcc.InvalidOptionError, match=msg):
            opt.check(bad, "b")
    choice = Option("mode", str, "a", "mode", choices=("a", "b"))
    with pytest.raises(dcc.InvalidOptionError, match="must be one of 'a', 'b'; got 'c'"):
        choice.check("c", "b")
    with pytest.raises(dcc.InvalidOptionError, match="of type str, got int"):
        choice.check(3, "b")
    assert Option("n", int, 1, "n").check(4.0, "b") == 4
    assert Option("n", int, None, "n", allow_none=True).check(None, "b") is None
    assert Option("n", int, 1, "n", quantities=frozenset({"trace"})).to_dict()["quantities"] == [
        "trace"
    ]


def test_options_take_numpy_scalars_and_refuse_non_finite_integers() -> None:
    import numpy as np

    n = Option("n", int, 1, "n", min=1)
    x = Option("x", float, 1.0, "x")
    assert n.check(np.int64(7), "b") == 7 and type(n.check(np.int64(7), "b")) is int
    assert x.check(np.float32(0.5), "b") == 0.5 and type(x.check(np.float32(0.5), "b")) is float
    for bad in (float("nan"), float("inf"), np.bool_(True), np.float64(2.5)):
        with pytest.raises(dcc.InvalidOptionError, match="must be an integer"):
            n.check(bad, "b")
    with pytest.raises(dcc.InvalidOptionError, match="must be finite"):
        x.check(np.float64("nan"), "b")
    case_model = torch.nn.Linear(3, 2).double()
    batch = (torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,)))
    a = dcc.estimate(case_model, torch.nn.CrossEntropyLoss(), batch, seed=np.int64(3), num_hvps=4)
    b = dcc.estimate(case_model, torch.nn.CrossEntropyLoss(), batch, seed=3, num_hvps=4)
    assert a.value == b.value and a.seed == 3


def test_quantities_table_names_the_standard_quantities() -> None:
    assert {"trace", "eigenvalues", "density"} <= set(QUANTITIES)
    assert dcc.QUANTITIES is QUANTITIES


def _host_named(option: str) -> type[dcc.Backend]:
    """A backend of the pre-redesign contract, which asked for ``eval_mode`` to be declared."""

    class HostNamed(dcc.Backend):
        name = "host-named"
        quantities = frozenset({"trace"})
        options = (
            Option("num_hvps", int, 10, "probes", min=2),
            Option(option, bool, True, "the host's argument, declared again"),
        )

        def compute(self, problem, quantity, *, seed, options):  # pragma: no cover
            raise AssertionError("never registered, never called")

    return HostNamed


@pytest.mark.parametrize(
    ("option", "fix"),
    [
        ("eval_mode", "problem.eval_mode"),
        ("seed", "as its `seed` argument"),
        ("distributed", "supports_distributed = True"),
    ],
)
def test_a_backend_option_named_like_a_host_argument_is_refused_at_registration(
    monkeypatch: pytest.MonkeyPatch, option: str, fix: str
) -> None:
    """The host applies eval_mode/seed/distributed and never passes them to compute()
    as options; a backend declaring one used to register and then silently never receive it
    (eval_mode), or crash the CLI (`-o seed=1`: estimate() got seed twice)."""
    cls = _host_named(option)

    @hookimpl
    def register_backends(register):
        register(cls)

    plugin = types.ModuleType("host_named_plugin")
    plugin.register_backends = register_backends
    reg = Registry.build(extra_plugins=(plugin,))
    registry.set_registry(reg)
    (broken,) = [b for b in reg.broken if b.name == "host_named_plugin"]
    assert broken.where == "register_backends"
    assert (
        f"PluginError: plugin 'host_named_plugin' registered backend 'host-named' declaring "
        f"option {option!r}, which is an argument of the host (estimate(..., {option}=...))"
    ) in broken.error
    assert fix in broken.error
    with pytest.raises(dcc.UnknownBackendError):
        dcc.get_backend("host-named")
    assert dcc.get_backend("pyhessian").name == "pyhessian"  # every other backend still works


def test_the_host_applies_eval_mode_and_the_backend_reads_it_from_the_problem(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[bool, bool, dict]] = []

    class Reads(dcc.Backend):
        name = "reads-mode"
        quantities = frozenset({"trace"})
        exact = True

        def compute(self, problem, quantity, *, seed, options):
            seen.append((problem.eval_mode, problem.model.training, dict(options)))
            return dcc.CurvatureResult(value=1.0, stderr=0.0, n_hvp=0, exact=True, method="one")

    class Plugin:
        @hookimpl
        def register_backends(self, register):
            register(Reads)

    registry.set_registry(Registry.build(extra_plugins=(Plugin(),)))
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Dropout(0.1))
    batch = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    for eval_mode in (True, False):
        dcc.estimate(model, torch.nn.CrossEntropyLoss(), batch, "trace", "reads-mode",
                     eval_mode=eval_mode)  # fmt: skip
    assert seen == [(True, False, {}), (False, True, {})]
    assert model.training


@pytest.mark.parametrize("name", ["seed", "distributed"])
def test_resolving_a_host_argument_as_an_option_names_the_argument(name: str) -> None:
    with pytest.raises(dcc.InvalidOptionError) as info:
        dcc.resolve("trace", "pyhessian", {name: 1})
    assert str(info.value) == (
        f"{name!r} is not an option of backend 'pyhessian' but an argument of the host: pass it "
        f"as estimate(..., {name}=...)."
    )
