"""One option model, owned by the backend contract."""

from __future__ import annotations

import pytest

from deconcnn_curvature.api import get_backend, list_backends
from deconcnn_curvature.errors import InvalidOptionError
from deconcnn_curvature.monitor import CurvatureMonitor


def test_budget_option_is_declared_by_the_backend() -> None:
    assert get_backend("pyhessian").budget_option("trace") == "num_hvps"
    assert get_backend("pyhessian").budget_option("eigenvalues") is None
    assert get_backend("hutchpp").budget_option("trace") == "num_hvps"
    assert get_backend("backpack").budget_option("trace") is None
    listed = {b["name"]: b for b in list_backends()}
    budget = [o["name"] for o in listed["pyhessian"]["options"] if o["budget"]]
    assert budget == ["num_hvps"]


def test_monitor_budget_is_num_hvps() -> None:
    monitor = CurvatureMonitor(backend="pyhessian", quantities=["trace"], num_hvps=7)
    resolved = monitor.check_config()
    assert resolved["trace"]["num_hvps"] == 7


def test_monitor_num_samples_is_a_deprecated_alias() -> None:
    with pytest.warns(DeprecationWarning, match="num_samples is deprecated.*num_hvps=7"):
        monitor = CurvatureMonitor(backend="pyhessian", quantities=["trace"], num_samples=7)
    assert monitor.num_hvps == 7
    assert monitor.check_config()["trace"]["num_hvps"] == 7


def test_monitor_refuses_both_budget_names() -> None:
    from deconcnn_curvature.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="give num_hvps alone"):
        CurvatureMonitor(num_hvps=5, num_samples=5)


def test_eval_mode_is_a_host_argument_the_backend_never_sees(monkeypatch) -> None:
    import torch
    from torch import nn

    import deconcnn_curvature as dcc
    from deconcnn_curvature.backends.pyhessian import PyHessianBackend

    seen: list[dict] = []
    compute = PyHessianBackend.compute

    def spy(self, problem, quantity, *, seed, options):
        seen.append(dict(options))
        return compute(self, problem, quantity, seed=seed, options=options)

    monkeypatch.setattr(PyHessianBackend, "compute", spy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    batch = (torch.randn(6, 3), torch.randint(0, 2, (6,)))
    dcc.estimate(model, nn.CrossEntropyLoss(), batch, "trace", num_hvps=4, eval_mode=False)
    assert seen and "eval_mode" not in seen[0]
    _, opts = dcc.resolve("trace", "pyhessian", eval_mode=False)
    assert "eval_mode" not in opts  # an argument of the host, checked apart from the options
    with pytest.raises(dcc.InvalidOptionError, match="true or false"):
        dcc.resolve("trace", "pyhessian", eval_mode="no")  # type: ignore[arg-type]
    with pytest.raises(dcc.InvalidOptionError) as info:  # never folded into the options
        dcc.resolve("trace", "pyhessian", {"eval_mode": False})
    assert str(info.value) == (
        "'eval_mode' is not a backend option but an argument of the host: pass it as "
        "estimate(..., eval_mode=...)."
    )


def test_eigenvalues_call_also_returns_the_trace_as_a_result() -> None:
    import torch
    from torch import nn

    import deconcnn_curvature as dcc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    batch = (torch.randn(6, 3), torch.randint(0, 2, (6,)))
    eig = dcc.estimate(model, nn.CrossEntropyLoss(), batch, "eigenvalues", "hutchpp", seed=2)
    trace = dcc.estimate(model, nn.CrossEntropyLoss(), batch, "trace", "hutchpp", seed=2)
    also = eig.also["trace"]
    # the host filled what it knows: backend, quantity, seed, device, dim
    assert (also.backend, also.quantity, also.seed, also.device, also.dim) == (
        "hutchpp",
        "trace",
        2,
        "cpu",
        trace.dim,
    )
    assert also.value == trace.value and also.stderr == trace.stderr
    assert "trace" not in eig.details  # no magic keys


# A third-party backend whose budget is named otherwise: the host maps the one name onto it.


def _probes_backend():
    from deconcnn_curvature.backend import Backend, Option
    from deconcnn_curvature.results import CurvatureResult

    class ProbesBackend(Backend):
        name = "probes"
        description = "test backend with a differently named budget"
        quantities = frozenset({"trace", "eigenvalues"})
        options = (
            Option(
                "num_probes", int, 3, "budget", min=1, quantities=frozenset({"trace"}), budget=True
            ),
        )
        also_computes = {"eigenvalues": frozenset({"trace"})}  # noqa: RUF012

        def compute(self, problem, quantity, *, seed, options):  # type: ignore[no-untyped-def]
            trace = CurvatureResult(
                value=float(options.get("num_probes", 0)), stderr=0.0, n_hvp=1, exact=False,
                method="count",
            )  # fmt: skip
            if quantity == "trace":
                return trace
            return CurvatureResult(
                value=[1.0], stderr=None, n_hvp=2, exact=False, method="x", also={"trace": trace}
            )

    return ProbesBackend


class _Plugin:
    def __init__(self, cls) -> None:  # type: ignore[no-untyped-def]
        self.cls = cls

    from deconcnn_curvature.hookspecs import hookimpl

    @hookimpl
    def register_backends(self, register):  # type: ignore[no-untyped-def]
        register(self.cls)


def test_a_declared_budget_option_takes_num_hvps_everywhere(monkeypatch) -> None:
    import torch
    from torch import nn

    import deconcnn_curvature as dcc
    from deconcnn_curvature import registry as registry_module
    from deconcnn_curvature.cli.common import plan_options
    from deconcnn_curvature.registry import Registry

    cls = _probes_backend()
    registry_module.set_registry(Registry.build(extra_plugins=(_Plugin(cls),)))
    assert cls.budget_option("trace") == "num_probes"
    # the CLI's --num-hvps and the monitor's num_hvps both set num_probes
    given = {"num_hvps": 7, "rtol": None, "k": None, "options": {}}
    assert plan_options(cls, "trace", given).calls[0].options == {"num_probes": 7}
    monitor = CurvatureMonitor(backend="probes", quantities=["trace", "eigenvalues"], num_hvps=7)
    resolved = monitor.check_config()
    assert resolved["trace"]["num_probes"] == 7
    (call,) = monitor.plan.calls  # one call gives both
    assert (call.quantity, call.records) == ("eigenvalues", ("eigenvalues", "trace"))
    assert call.options == {"num_probes": 7}
    # the host fills backend, quantity, seed, device, dim the backend left out
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    r = dcc.estimate(model, nn.CrossEntropyLoss(), batch, "eigenvalues", "probes", seed=5)
    for res, q in ((r, "eigenvalues"), (r.also["trace"], "trace")):
        assert (res.backend, res.quantity, res.seed, res.device, res.dim) == (
            "probes", q, 5, "cpu", 8,
        )  # fmt: skip
    assert r.also["trace"].value == 3.0


def test_also_may_hold_only_declared_quantities(monkeypatch) -> None:
    import torch
    from torch import nn

    import deconcnn_curvature as dcc
    from deconcnn_curvature import registry as registry_module
    from deconcnn_curvature.registry import Registry

    cls = _probes_backend()
    cls.also_computes = {}  # the eigenvalues result carries a trace it did not declare
    registry_module.set_registry(Registry.build(extra_plugins=(_Plugin(cls),)))
    batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    with pytest.raises(dcc.PluginError, match="declares none there"):
        dcc.estimate(nn.Linear(3, 2), nn.CrossEntropyLoss(), batch, "eigenvalues", "probes")


def test_monitor_takes_the_resolvers_options_for_a_joint_backend(monkeypatch) -> None:
    """One applicability rule: an option declared for the trace only applies to an
    eigenvalues call whose result also carries the trace (``also_computes``), for the resolver,
    the CLI and the monitor alike (the monitor used to drop it, and refuse it when only the
    eigenvalues were monitored)."""
    import deconcnn_curvature as dcc
    from deconcnn_curvature import registry as registry_module
    from deconcnn_curvature.backend import Option, plan_calls
    from deconcnn_curvature.registry import Registry

    base = _probes_backend()

    class ShiftBackend(base):  # type: ignore[misc, valid-type]
        name = "shift"
        options = (
            *base.options,
            Option("shift", float, 0.0, "trace-only", quantities=frozenset({"trace"})),
        )

    registry_module.set_registry(Registry.build(extra_plugins=(_Plugin(ShiftBackend),)))
    given = {"shift": 2.5}
    _, expected = dcc.resolve("eigenvalues", "shift", given)
    assert expected["shift"] == 2.5
    assert plan_calls(ShiftBackend, ["eigenvalues"], options=given).calls[0].options == given
    for quantities in (["eigenvalues"], ["trace", "eigenvalues"]):
        monitor = CurvatureMonitor(backend="shift", quantities=quantities, backend_options=given)
        resolved = monitor.check_config()
        assert resolved["eigenvalues"] == expected, quantities
        plan = {c.quantity: c.options for c in monitor.plan.calls}
        assert plan["eigenvalues"]["shift"] == 2.5, quantities
        assert dcc.resolve("eigenvalues", "shift", plan["eigenvalues"])[1] == expected


def test_monitor_gives_the_trace_settings_to_a_call_that_also_returns_the_trace() -> None:
    """hutchpp's eigenvalues call also returns the trace of the same products, so with only the
    eigenvalues monitored it still spends the trace's budget: ``num_hvps`` and ``data_groups``
    reach it (they used to be dropped silently, leaving the backend's default of products)."""
    import deconcnn_curvature as dcc

    monitor = CurvatureMonitor(
        backend="hutchpp", quantities=["eigenvalues"], num_hvps=12, data_groups=2
    )
    resolved = monitor.check_config()
    assert resolved["eigenvalues"]["num_hvps"] == 12
    assert resolved["eigenvalues"]["data_groups"] == 2
    expected = dcc.resolve("eigenvalues", "hutchpp", {"num_hvps": 12, "data_groups": 2})[1]
    assert {k: resolved["eigenvalues"][k] for k in expected} == expected
    # pyhessian's eigenvalues call returns no trace: the budget is not its option
    plain = CurvatureMonitor(backend="pyhessian", quantities=["eigenvalues"], num_hvps=12)
    assert "num_hvps" not in plain.check_config()["eigenvalues"]


def test_the_router_decides_each_calls_options_with_one_set_of_messages() -> None:
    """plan_calls, the one router: the budget under the backend's own name, the trace's settings
    to a call that also returns the trace, what no call takes refused or reported."""
    from deconcnn_curvature.backend import plan_calls

    hutchpp, pyhessian, backpack = (get_backend(n) for n in ("hutchpp", "pyhessian", "backpack"))
    both = ["trace", "eigenvalues"]
    joint = plan_calls(hutchpp, both, num_hvps=12, rtol=0.1, k=2, data_groups=4)
    (call,) = joint.calls
    assert (call.quantity, call.records) == ("eigenvalues", ("eigenvalues", "trace"))
    assert call.options == {"num_hvps": 12, "rtol": 0.1, "k": 2, "data_groups": 4}
    assert joint.call_for("trace") is call and joint.unused == ()
    split = plan_calls(pyhessian, both, num_hvps=12, k=2, data_groups=4)
    assert [(c.quantity, dict(c.options)) for c in split.calls] == [
        ("trace", {"num_hvps": 12, "data_groups": 4}),
        ("eigenvalues", {"k": 2}),
    ]
    # an exact backend has no budget: refused, or reported with the same reason
    with pytest.raises(InvalidOptionError) as refused:
        plan_calls(backpack, ["trace"], num_hvps=5, labels={"num_hvps": "--num-hvps"})
    reported = plan_calls(backpack, ["trace"], num_hvps=5, strict=False)
    (unused,) = reported.unused
    assert unused.kind == "exact" and unused.setting == "num_hvps"
    assert str(refused.value).startswith("--num-hvps does not apply to 'trace' with backend")
    assert unused.reason.startswith("num_hvps does not apply to 'trace' with backend")
    # k > 1 where the backend gives λ_max only cannot be honoured, whatever the front end
    assert plan_calls(pyhessian, ["trace"], k=1, strict=False).unused[0].kind == "not asked"
    with pytest.raises(InvalidOptionError, match="is given twice"):
        plan_calls(pyhessian, ["trace"], num_hvps=5, options={"num_hvps": 6})


def test_the_monitor_plans_a_measurement_without_changing_its_own_plan() -> None:
    """A time budget can re-plan each measurement with fewer products: plan_for is pure."""
    monitor = CurvatureMonitor(backend="hutchpp", num_hvps=12)
    monitor.check_config()
    before = monitor.plan
    cheaper = monitor.plan_for(get_backend("hutchpp"), num_hvps=6)
    assert cheaper.calls[0].options["num_hvps"] == 6
    assert monitor.plan is before and before.calls[0].options["num_hvps"] == 12
