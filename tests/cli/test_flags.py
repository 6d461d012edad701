"""The estimator options (``--num-hvps``, ``--rtol``, ``-k``) are plain Click options with their
defaults shown; the router of the backend contract (``plan_calls``) maps them onto the selected
backend's options (``--num-hvps`` its budget option, whatever its name) with one set of
messages, and each backend checks its own bounds."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
from checkpoint_helpers import GENERIC_ARGS, save_state_dict
from click.testing import CliRunner, Result

from deconcnn_curvature import Backend, CurvatureResult, Option, hookimpl
from deconcnn_curvature import registry as registry_module
from deconcnn_curvature.backend import HOST_ARGUMENTS
from deconcnn_curvature.cli import cli
from deconcnn_curvature.registry import Registry, builtin_backends


def run(*args: Any) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], env={"COLUMNS": "200"})


def _words(text: str) -> str:
    """``text`` without whitespace (Click wraps help text, also after a hyphen)."""
    return "".join(text.split())


@pytest.mark.parametrize("command", ["estimate", "compare"])
def test_the_estimator_options_show_their_defaults(command: str) -> None:
    result = run(command, "--help")
    assert result.exit_code == 0, result.output
    text = _words(result.output)
    budgets = [
        f"{cls.name} {cls.option_map()['num_hvps'].default}"
        for cls in builtin_backends()
        if cls.budget_option("trace") == "num_hvps"
    ]
    assert budgets == ["pyhessian 100", "hutchpp 30"]
    assert _words(f"[default: (the backend's own: {', '.join(budgets)}); x>=1]") in text
    assert _words("[default: (off: spend the whole budget); x>0]") in text
    assert _words("[default: (1, the backend's own); x>=1]") in text
    for flag in ("--num-hvps", "--rtol", "-k", "-q, --quantity"):
        assert re.search(rf"(^|\s){re.escape(flag)}\b", result.output), flag


def test_a_bound_only_one_backend_declares_is_its_own_one_line_error(workdir: Path) -> None:
    """--num-hvps 3: pyhessian takes it; hutchpp's own check refuses it; 0 is Click's."""
    path = save_state_dict(workdir / "w.pt")
    result = run("estimate", path, *GENERIC_ARGS, "-b", "hutchpp", "--num-hvps", 3)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "Error: option 'num_hvps' of backend 'hutchpp' must be >= 5, got 3."
    ]
    below = run("estimate", path, *GENERIC_ARGS, "--num-hvps", 1)
    assert below.exit_code == 1 and "Traceback" not in below.output
    assert below.stderr.strip().splitlines() == [
        "Error: option 'num_hvps' of backend 'pyhessian' must be >= 2, got 1."
    ]
    zero = run("estimate", path, *GENERIC_ARGS, "--num-hvps", 0)
    assert zero.exit_code == 2 and "0 is not in the range x>=1" in zero.stderr


class Probes(Backend):
    """A plugin backend whose declarations differ from the built-ins': its budget is named
    ``num_probes``, its ``k`` has other bounds, its ``rtol`` another minimum."""

    name = "probes"
    quantities = frozenset({"trace", "eigenvalues"})
    options = (
        Option("num_probes", int, 3, "probes", min=1, quantities=frozenset({"trace"}), budget=True),
        Option("k", int, 1, "eigenvalues", min=1, max=4, quantities=frozenset({"eigenvalues"})),
        Option("rtol", float, None, "tolerance", min=0.5, allow_none=True,
               quantities=frozenset({"trace"})),
        Option("scale", float, 1.0, "no flag"),
    )  # fmt: skip

    def compute(self, problem, quantity, *, seed, options):  # type: ignore[no-untyped-def]
        value: Any = float(options["num_probes"]) if quantity == "trace" else [1.0] * options["k"]
        return CurvatureResult(value=value, stderr=None, n_hvp=1, exact=False, method="fixed")


class Joint(Probes):
    """One call for the eigenvalues also returns the trace, so it takes the trace's options."""

    name = "joint"
    also_computes = {"eigenvalues": frozenset({"trace"})}  # noqa: RUF012

    def compute(self, problem, quantity, *, seed, options):  # type: ignore[no-untyped-def]
        trace = super().compute(problem, "trace", seed=seed, options=options)
        if quantity == "trace":
            return trace
        top = super().compute(problem, quantity, seed=seed, options=options)
        return dataclasses.replace(top, also={"trace": trace})


class ProbesPlugin:
    @hookimpl
    def register_backends(self, register):  # type: ignore[no-untyped-def]
        register(Probes)
        register(Joint)


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = Registry.build(extra_plugins=(ProbesPlugin(),))
    registry_module.set_registry(reg)


def test_a_plugin_backend_gets_the_flags_mapped_onto_its_declarations(
    workdir: Path, probes: None
) -> None:
    path = save_state_dict(workdir / "w.pt")
    args = ["estimate", path, *GENERIC_ARGS, "--batch-size", 4, "-b", "probes", "--json"]
    trace = run(*args, "--num-hvps", 7, "--rtol", 0.75)
    assert trace.exit_code == 0, trace.output
    out = json.loads(trace.stdout)
    assert out["options"] == {"num_probes": 7, "rtol": 0.75, "scale": 1.0}
    assert out["result"]["value"] == 7.0
    eig = run(*args, "-q", "eigenvalues", "-k", 3)
    assert eig.exit_code == 0, eig.output
    assert json.loads(eig.stdout)["options"]["k"] == 3
    # The backend's own bounds apply: one line, exit 1.
    for extra, message in [
        (["-q", "eigenvalues", "-k", 5], "option 'k' of backend 'probes' must be <= 4, got 5."),
        (["--rtol", 0.1], "option 'rtol' of backend 'probes' must be >= 0.5, got 0.1."),
        (["-k", 2], "-k: option 'k' of backend 'probes' applies to eigenvalues only, not to "
                    "'trace'; drop it or choose another backend."),
        (["--num-hvps", 4, "-o", "num_probes=5"],
         "option 'num_probes' of backend 'probes' is given twice (-o num_probes and "
         "--num-hvps); give it once."),
    ]:  # fmt: skip
        bad = run(*args, *extra)
        assert bad.exit_code == 1 and "Traceback" not in bad.output, bad.output
        assert len(bad.stderr.strip().splitlines()) == 1 and message in bad.stderr, bad.stderr


def test_list_backends_json_is_the_declarations_and_the_host_arguments(probes: None) -> None:
    result = run("list-backends", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)["backends"]}
    for cls in builtin_backends():
        row = rows[cls.name]
        assert row["options"] == [o.to_dict() for o in cls.options], cls.name
        assert row["host_arguments"] == [a.to_dict() for a in HOST_ARGUMENTS.values()]
        budgets = {o["name"] for o in row["options"] if o["budget"]}
        assert budgets == {cls.budget_option(q) for q in cls.quantities} - {None}
    budget = [o["name"] for o in rows["probes"]["options"] if o["budget"]]
    assert budget == ["num_probes"]  # what --num-hvps sets for this backend


@pytest.mark.parametrize("command", ["estimate", "compare"])
@pytest.mark.parametrize(
    ("option", "fix"),
    [
        ("seed=3", "use --seed"),
        ("distributed=true", "the command line measures in one process"),
        ("eval_mode=false", "the command line measures in eval mode"),
    ],
)
def test_a_host_argument_given_as_a_backend_option_says_where_it_goes(
    workdir: Path, command: str, option: str, fix: str
) -> None:
    path = save_state_dict(workdir / "w.pt")
    result = run(command, path, *GENERIC_ARGS, "--batch-size", 4, "-o", option)
    name = option.split("=")[0]
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.stderr.strip().splitlines() == [
        f"Error: -o {name}: {name!r} is not a backend option but an argument of the host: {fix}."
    ]


def test_a_call_that_also_returns_the_trace_takes_its_flags_like_the_resolver(
    workdir: Path, probes: None
) -> None:
    """The CLI decides applicability by the resolver's one rule (Backend.applies): the trace's
    budget and rtol reach an eigenvalues call that also returns the trace."""
    path = save_state_dict(workdir / "w.pt")
    args = ["estimate", path, *GENERIC_ARGS, "--batch-size", 4, "-b", "joint", "--json"]
    result = run(*args, "-q", "eigenvalues", "-k", 2, "--num-hvps", 6, "--rtol", 0.5)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["options"] == {
        "num_probes": 6,
        "k": 2,
        "rtol": 0.5,
        "scale": 1.0,
    }
    assert out["result"]["also"]["trace"]["value"] == 6.0
