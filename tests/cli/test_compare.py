"""`deconcnn-curv compare CHECKPOINT`: several backends on the same model, batch and seed; a backend
that cannot run gets a row with the reason instead of ending the command."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from cases import dense_hessian
from checkpoint_helpers import (
    GENERIC_ARGS,
    helper_model,
    save_state_dict,
)
from click.testing import CliRunner, Result
from torch import nn

from deconcnn_curvature import Backend, CurvatureResult, UnsupportedModelError, hookimpl
from deconcnn_curvature import registry as registry_module
from deconcnn_curvature.checkpoints.data import DataSpec, build_batches
from deconcnn_curvature.cli import cli
from deconcnn_curvature.cli.memory import PeakMemory
from deconcnn_curvature.registry import Registry


class ExactDense(Backend):
    """The exact trace from a dense Hessian (tiny models only)."""

    name = "exact-dense"
    description = "dense Hessian (test only)"
    quantities = frozenset({"trace"})
    exact = True

    def compute(self, problem, quantity, *, seed, options) -> CurvatureResult:
        hessian = dense_hessian(problem.model, problem.loss_fn, problem.batches)
        return CurvatureResult(
            backend=self.name, quantity=quantity, value=float(hessian.trace()), stderr=0.0,
            n_hvp=problem.dim, seconds=0.0, seed=seed, device=str(problem.device), exact=True,
            method="dense", dim=problem.dim,
        )  # fmt: skip


class Missing(Backend):
    name = "missing"
    quantities = frozenset({"trace"})
    requires = ("a_module_that_is_not_installed",)
    install_hint = "pip install missing-backend"

    def compute(self, problem, quantity, *, seed, options):  # pragma: no cover
        raise AssertionError("an unavailable backend is never run")


class Flaky(Backend):
    name = "flaky"
    quantities = frozenset({"trace"})

    def compute(self, problem, quantity, *, seed, options):
        raise RuntimeError("ran out of patience")


class NoTanh(Backend):
    name = "no-tanh"
    quantities = frozenset({"trace"})

    @classmethod
    def validate_model(cls, model: Any) -> None:
        if any(isinstance(m, nn.Tanh) for m in model.modules()):
            raise UnsupportedModelError("Tanh layers are not supported by no-tanh")

    def compute(self, problem, quantity, *, seed, options):  # pragma: no cover
        raise AssertionError("validate_model refuses first")


class EigenOnly(Backend):
    name = "eigen-only"
    quantities = frozenset({"eigenvalues"})

    def compute(self, problem, quantity, *, seed, options):  # pragma: no cover
        raise AssertionError("never asked for a trace")


class Plugin:
    @hookimpl
    def register_backends(self, register):
        for cls in (ExactDense, Missing, Flaky, NoTanh, EigenOnly):
            register(cls)


@pytest.fixture
def workdir(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The shared working folder (tests/conftest.py) with this file's test plugin registered."""
    registry_module.set_registry(Registry.build(extra_plugins=(Plugin(),)))
    return workdir


def run(*args: Any) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], env={"COLUMNS": "250"})


def test_rows_for_every_backend_and_exact_numbers(workdir: Path) -> None:
    path = save_state_dict(workdir / "w.pt", seed=4)
    names = "pyhessian,exact-dense,missing,flaky,no-tanh,eigen-only"
    result = run(
        "compare", path, *GENERIC_ARGS, "--backends", names, "--batch-size", 12, "--seed", 3,
        "--num-hvps", 80, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    rows = {r["backend"]: r for r in out["rows"]}
    assert [r["backend"] for r in out["rows"]] == names.split(",")
    assert {n: r["status"] for n, r in rows.items()} == {
        "pyhessian": "ok",
        "exact-dense": "ok",
        "missing": "unavailable",
        "flaky": "failed",
        "no-tanh": "unsupported",
        "eigen-only": "unsupported",
    }
    assert rows["missing"]["reason"] == (
        "backend 'missing' is not available here (missing module(s): "
        "a_module_that_is_not_installed). Install it with: pip install missing-backend"
    )
    assert "RuntimeError: ran out of patience" in rows["flaky"]["reason"]
    assert "Tanh layers are not supported" in rows["no-tanh"]["reason"]
    assert "cannot compute quantity 'trace'" in rows["eigen-only"]["reason"]

    # Same model and batch for every backend: the exact row is the dense trace of that problem.
    model = helper_model(4).eval()
    batches = build_batches(DataSpec("synthetic", 12, 1, (12,), num_classes=3, seed=3))
    exact = float(dense_hessian(model, nn.CrossEntropyLoss(), batches).trace())
    torch.testing.assert_close(rows["exact-dense"]["result"]["value"], exact)
    est = rows["pyhessian"]["result"]
    assert est["seed"] == 3 and rows["exact-dense"]["result"]["seed"] == 3
    assert est["n_hvp"] == 80 and abs(est["value"] - exact) <= 4 * est["stderr"]
    assert rows["exact-dense"]["ignored_options"] == ["--num-hvps"]
    assert "ignored_options" not in rows["pyhessian"]
    assert out["memory"]["kind"] == "rss_sampled" and out["device"] == "cpu"
    for name in ("pyhessian", "exact-dense"):
        assert isinstance(rows[name]["peak_memory_bytes"], int)
        assert rows[name]["peak_memory_bytes"] >= 0


def test_human_table(workdir: Path) -> None:
    path = save_state_dict(workdir / "w.pt")
    result = run(
        "compare", path, *GENERIC_ARGS, "--backends", "pyhessian,exact-dense,missing,flaky",
        "--batch-size", 8, "--num-hvps", 10,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "trace: same model, data and seed (0)" in text
    for column in ("backend", "value", "± stderr", "interval", "HVPs", "seconds", "peak RSS"):
        assert column in text
    assert "unavailable: backend 'missing' is not available here" in text
    assert (
        "failed: backend 'flaky' failed computing 'trace': RuntimeError: ran out of patience"
        in (text)
    )
    assert "dense (exact); ignored --num-hvps" in text
    assert "peak memory: process resident memory above its level at the start" in text


def test_default_is_every_backend_that_computes_the_quantity(workdir: Path) -> None:
    path = save_state_dict(workdir / "w.pt")
    result = run("compare", path, *GENERIC_ARGS, "--batch-size", 8, "--num-hvps", 6, "--json")
    assert result.exit_code == 0, result.output
    names = [r["backend"] for r in json.loads(result.stdout)["rows"]]
    assert names == registry_module.get_registry().supporting("trace")
    assert {"pyhessian", "exact-dense", "missing", "flaky", "no-tanh"} <= set(names)
    assert "eigen-only" not in names


def test_fails_when_no_backend_produced_a_value(workdir: Path) -> None:
    path = save_state_dict(workdir / "w.pt")
    result = run("compare", path, *GENERIC_ARGS, "--backends", "missing,flaky", "--batch-size", 4)
    assert result.exit_code == 1
    assert "unavailable:" in result.stdout and "failed:" in result.stdout
    assert result.stderr.strip() == (
        "Error: no backend could compute 'trace' for this checkpoint (reasons above)."
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--backends", "pyhessian,pyhesian"], "unknown backend 'pyhesian'. Did you mean"),
        (["--backends", " , "], "--backends is empty"),
        (["-q", "curvature"], "unknown quantity 'curvature'"),
        (["-o", "noequals"], "-o/--option must look like key=value"),
    ],
)
def test_bad_input(workdir: Path, args: list[str], fragment: str) -> None:
    path = save_state_dict(workdir / "w.pt")
    result = run("compare", path, *GENERIC_ARGS, *args)
    assert result.exit_code == 1, result.output
    assert result.stdout == "" and "Traceback" not in result.output
    assert result.stderr.startswith("Error: ") and fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_checkpoint(workdir: Path) -> None:
    result = run("compare", workdir / "gone.pt", *GENERIC_ARGS)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: checkpoint file {workdir / 'gone.pt'} does not exist."


def test_rss_meter_sees_a_transient_allocation() -> None:
    meter = PeakMemory(torch.device("cpu"))
    if meter.kind != "rss_sampled":
        pytest.skip("needs /proc/self/statm")
    with meter:
        block = torch.ones(16 * 2**20)  # 64 MiB, written, so resident
        time.sleep(0.05)
        del block
    assert meter.peak_bytes is not None and meter.peak_bytes >= 48 * 2**20
    with PeakMemory(torch.device("cpu")) as idle:
        time.sleep(0.01)
    assert idle.peak_bytes is not None and idle.peak_bytes < 16 * 2**20


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["-o", "num_hvsp=5"], "-o num_hvsp: no compared backend (pyhessian) takes this option"),
        (["-o", "num_hvps=1"], "option 'num_hvps' of backend 'pyhessian' must be >= 2, got 1."),
    ],
)
def test_a_mistyped_or_bad_option_fails_before_any_work(
    workdir: Path, args: list[str], fragment: str
) -> None:
    """compare used to run every backend with its defaults and note 'ignored' in a column."""
    path = save_state_dict(workdir / "w.pt")
    result = run("compare", path, *GENERIC_ARGS, "--backends", "pyhessian", *args)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("Error: ") and fragment in result.stderr


def test_a_value_only_some_backends_refuse_gives_them_a_row(workdir: Path) -> None:
    """`compare --num-hvps 3` failed as a whole (Hutch++ needs at least 5) although
    the help promises a row with the reason for a backend that cannot run."""
    path = save_state_dict(workdir / "w.pt")
    args = ("compare", path, *GENERIC_ARGS, "--backends", "pyhessian,hutchpp", "--batch-size", 8)
    result = run(*args, "--num-hvps", 3, "--json")
    assert result.exit_code == 0, result.output
    rows = {r["backend"]: r for r in json.loads(result.stdout)["rows"]}
    assert rows["pyhessian"]["status"] == "ok" and rows["pyhessian"]["result"]["n_hvp"] == 3
    assert rows["hutchpp"]["status"] == "invalid option"
    assert (
        rows["hutchpp"]["reason"] == "option 'num_hvps' of backend 'hutchpp' must be >= 5, got 3."
    )
    table = run(*args, "--num-hvps", 3, "--quiet")
    assert table.exit_code == 0
    assert "hutchpp invalid option: option 'num_hvps' of backend 'hutchpp' must be >= 5" in (
        table.stdout
    )
    # A value every compared backend refuses is still a mistake, said before any work.
    refused = run(*args, "-o", "num_hvps=1")
    assert refused.exit_code == 1 and refused.stdout == ""
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "pyhessian: option 'num_hvps'" in refused.stderr
    assert "hutchpp: option 'num_hvps'" in refused.stderr


def test_the_backend_variable_does_not_narrow_compare_and_its_help_says_so(
    workdir: Path,
) -> None:
    path = save_state_dict(workdir / "w.pt")
    result = CliRunner().invoke(
        cli,
        ["compare", str(path), *GENERIC_ARGS, "--batch-size", "8", "--num-hvps", "6", "--json"],
        env={"COLUMNS": "250", "DECONCNN_CURVATURE_BACKEND": "hutchpp"},
    )
    assert result.exit_code == 0, result.output
    names = [r["backend"] for r in json.loads(result.stdout)["rows"]]
    assert names == registry_module.get_registry().supporting("trace")
    help_text = " ".join(run("compare", "--help").stdout.split())
    assert (
        "$DECONCNN_CURVATURE_BACKEND sets the backend of estimate and density, not this list"
        in (help_text)
    )
