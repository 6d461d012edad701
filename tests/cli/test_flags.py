"""The estimator flags (``--num-hvps``, ``--rtol``, ``-k``) are made from the built-in
backends' ``Option`` declarations: help, type and bounds come from them, each flag sets the selected
backend's option (``--num-hvps`` its budget option), and ``list-backends --json`` names the flag of
every option."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import click
import pytest
from checkpoint_helpers import GENERIC_ARGS, save_state_dict
from click.testing import CliRunner, Result

from deconcnn_curvature import Backend, CurvatureResult, Option, hookimpl
from deconcnn_curvature import registry as registry_module
from deconcnn_curvature.backend import HOST_OPTIONS
from deconcnn_curvature.cli import cli
from deconcnn_curvature.registry import Registry, builtin_backends, builtin_flags


def run(*args: Any) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], env={"COLUMNS": "200"})


def _words(text: str) -> str:
    """``text`` without whitespace (Click wraps help text, also after a hyphen)."""
    return "".join(text.split())


def _declared() -> dict[str, list[Option]]:
    """Every built-in option declaring a flag, by flag (read from the classes)."""
    found: dict[str, list[Option]] = {}
    for cls in builtin_backends():
        for option in cls.options:
            if option.flag:
                found.setdefault(option.flag, []).append(option)
    return found


def test_the_builtin_backends_declare_the_flags_the_cli_always_had() -> None:
    assert {c.name for c in builtin_backends()} == {"pyhessian", "hutchpp", "backpack"}
    assert set(_declared()) == {"--num-hvps", "--rtol", "-k"} == set(builtin_flags())
    assert all(o.budget for o in _declared()["--num-hvps"])


@pytest.mark.parametrize("command", ["estimate", "compare"])
def test_flags_show_the_declared_help_and_bounds(command: str) -> None:
    result = run(command, "--help")
    assert result.exit_code == 0, result.output
    text = _words(result.output)
    for flag, options in _declared().items():
        assert re.search(rf"(^|\s){re.escape(flag)} (INTEGER|FLOAT) RANGE", result.output), flag
        for option in options:
            assert _words(option.help) in text, (flag, option.help)
    params = {p.opts[0]: p for p in click.Context(cli).command.commands[command].params}
    for flag, options in _declared().items():
        kind: Any = params[flag].type
        # Where built-ins differ, the flag takes the loosest bound; each backend checks its own.
        lowest = min(o.min for o in options if o.min is not None)
        inclusive = not all(o.min_exclusive for o in options if o.min == lowest)
        assert (kind.min, kind.min_open) == (lowest, not inclusive), flag


def test_density_k_help_comes_from_the_declaration() -> None:
    text = _words(run("density", "--help").output)
    (k,) = {o.help for o in _declared()["-k"]}
    assert _words("Top eigenvalues to mark, 0: none") in text and _words(k) in text


def test_a_bound_only_one_backend_declares_is_its_own_one_line_error(workdir: Path) -> None:
    """--num-hvps 3: Click takes it (pyhessian's bound is 2); hutchpp's own check refuses it."""
    path = save_state_dict(workdir / "w.pt")
    result = run("estimate", path, *GENERIC_ARGS, "-b", "hutchpp", "--num-hvps", 3)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "Error: option 'num_hvps' of backend 'hutchpp' must be >= 5, got 3."
    ]
    below = run("estimate", path, *GENERIC_ARGS, "--num-hvps", 1)
    assert below.exit_code == 2 and "Traceback" not in below.output
    assert "Error: Invalid value for '--num-hvps': 1 is not in the range x>=2." in below.stderr


class Probes(Backend):
    """A plugin backend whose declarations differ from the built-ins': its budget is named
    ``num_probes``, its top-k option ``top`` declares ``-k`` with other bounds."""

    name = "probes"
    quantities = frozenset({"trace", "eigenvalues"})
    options = (
        Option("num_probes", int, 3, "probes", min=1, quantities=frozenset({"trace"}), budget=True),
        Option("top", int, 1, "eigenvalues", min=1, max=4, quantities=frozenset({"eigenvalues"}),
               flag="-k"),
        Option("rtol", float, None, "tolerance", min=0.5, allow_none=True,
               quantities=frozenset({"trace"})),
        Option("scale", float, 1.0, "no flag"),
    )  # fmt: skip

    def compute(self, problem, quantity, *, seed, options):  # type: ignore[no-untyped-def]
        value: Any = float(options["num_probes"]) if quantity == "trace" else [1.0] * options["top"]
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
    assert out["options"] == {"eval_mode": True, "num_probes": 7, "rtol": 0.75, "scale": 1.0}
    assert out["result"]["value"] == 7.0
    eig = run(*args, "-q", "eigenvalues", "-k", 3)
    assert eig.exit_code == 0, eig.output
    assert json.loads(eig.stdout)["options"]["top"] == 3
    # The backend's own bounds apply (the flag's are the built-ins' loosest): one line, exit 1.
    for extra, message in [
        (["-q", "eigenvalues", "-k", 5], "option 'top' of backend 'probes' must be <= 4, got 5."),
        (["--rtol", 0.1], "option 'rtol' of backend 'probes' must be >= 0.5, got 0.1."),
        (["-k", 2], "-k does not apply to quantity 'trace' with backend 'probes'; its options "
                    "for trace are: eval_mode, num_probes, rtol, scale"),
    ]:  # fmt: skip
        bad = run(*args, *extra)
        assert bad.exit_code == 1 and "Traceback" not in bad.output, bad.output
        assert len(bad.stderr.strip().splitlines()) == 1 and message in bad.stderr, bad.stderr


def test_list_backends_json_is_the_declarations_with_each_flag(probes: None) -> None:
    result = run("list-backends", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)["backends"]}
    for cls in builtin_backends():
        row = rows[cls.name]
        assert row["options"] == [o.to_dict() for o in cls.options], cls.name
        assert row["host_options"] == [o.to_dict() for o in HOST_OPTIONS]
        budgets = {o["name"] for o in row["options"] if o["budget"]}
        assert budgets == {cls.budget_option(q) for q in cls.quantities} - {None}
        for option in row["options"]:
            assert option["flag"] == ("--num-hvps" if option["budget"] else option["flag"])
    assert [o["flag"] for o in rows["pyhessian"]["options"][:2]] == ["--num-hvps", "--rtol"]
    # A plugin's option: the flag it declares, its budget's, or the built-in option's name's.
    flags = {o["name"]: o["flag"] for o in rows["probes"]["options"]}
    assert flags == {"num_probes": "--num-hvps", "top": "-k", "rtol": "--rtol", "scale": None}


@pytest.mark.parametrize("command", ["estimate", "compare"])
@pytest.mark.parametrize(
    ("option", "fix"),
    [("seed=3", "use --seed"), ("distributed=true", "the command line measures in one process")],
)
def test_a_host_argument_given_as_a_backend_option_says_where_it_goes(
    workdir: Path, command: str, option: str, fix: str
) -> None:
    path = save_state_dict(workdir / "w.pt")
    result = run(command, path, *GENERIC_ARGS, "--batch-size", 4, "-o", option)
    name = option.split("=")[0]
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.stderr.strip().splitlines() == [
        f"Error: -o {name}: {name!r} is not a backend option but an argument of the host; {fix}."
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
        "eval_mode": True,
        "num_probes": 6,
        "top": 2,
        "rtol": 0.5,
        "scale": 1.0,
    }
    assert out["result"]["also"]["trace"]["value"] == 6.0
