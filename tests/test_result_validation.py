"""The host checks every result a backend returns (type, quantity, shape,
finiteness) before anyone uses it.

The misbehaving backends are third-party plugins installed the way a wheel is (a module plus
``*.dist-info`` with an entry point, on ``sys.path``), registered through the ``register_backends``
hook by pluggy: the path a real plugin takes.
"""

from __future__ import annotations

import json
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoint_helpers import GENERIC_ARGS, HELPER_MODULE, install_helper_module, save_state_dict
from click.testing import CliRunner
from torch import nn

import deconcnn_curvature as dcc
from deconcnn_curvature import registry
from deconcnn_curvature.cli import cli
from deconcnn_curvature.errors import NonFiniteError, PluginError
from deconcnn_curvature.results import usable_record

DIST = "dcc-bad-results"

BAD_BACKEND = """
import dataclasses
import math

from deconcnn_curvature import Backend, CurvatureResult, hookimpl

KIND = "{kind}"
NAN = float("nan")


class Misbehaving(Backend):
    name = "{backend}"
    description = "a backend that returns what it should not (test plugin)"
    quantities = frozenset({{"trace", "eigenvalues"}})

    def compute(self, problem, quantity, *, seed, options):
        trace = quantity == "trace"
        result = CurvatureResult(
            backend=self.name, quantity=quantity, value=NAN if trace else [NAN],
            stderr=NAN if trace else None, n_hvp=1, seconds=0.0, seed=seed,
            device=str(problem.device), exact=False, method="bad", dim=problem.dim,
        )
        if KIND == "nan":
            return result
        if KIND == "dict":
            return {{"value": 1.0}}
        if KIND == "float":
            return 1.5
        if KIND == "nan-stderr":
            return dataclasses.replace(result, value=1.0 if trace else [1.0])
        if KIND == "wrong-quantity":
            return dataclasses.replace(result, quantity="density", value=1.0, stderr=0.0)
        if KIND == "wrong-shape":
            return dataclasses.replace(result, value=[1.0, 2.0] if trace else 3.0, stderr=None)
        raise AssertionError(KIND)


@hookimpl
def register_backends(register):
    register(Misbehaving)
"""

KINDS = ("nan", "dict", "float", "nan-stderr", "wrong-quantity", "wrong-shape")


def _write_distribution(root: Path) -> dict[str, str]:
    """One installed-looking distribution with a backend ``<kind>-curv`` per kind."""
    suffix = uuid.uuid4().hex[:8]
    modules = {kind: f"dcc_bad_{kind.replace('-', '_')}_{suffix}" for kind in KINDS}
    for kind, module in modules.items():
        source = BAD_BACKEND.format(kind=kind, backend=f"{kind}-curv")
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{DIST.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 0.1\n")
    eps = "\n".join(f"{kind} = {module}" for kind, module in modules.items())
    (info / "entry_points.txt").write_text(f"[deconcnn_curvature]\n{eps}\n")
    return modules


@pytest.fixture
def bad_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    plugin_root = tmp_path / "site"
    plugin_root.mkdir()
    modules = _write_distribution(plugin_root)
    monkeypatch.syspath_prepend(str(plugin_root))
    monkeypatch.setenv("DECONCNN_CURVATURE_PLUGINS", ",".join(KINDS))
    registry.reset_registry()
    assert not registry.get_registry().broken
    install_helper_module(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for module in modules.values():
        sys.modules.pop(module, None)
    sys.modules.pop(HELPER_MODULE, None)


def _problem() -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(4, 3)
    x = torch.randn(8, 4, generator=gen)
    return model, nn.CrossEntropyLoss(), (x, torch.randint(0, 3, (8,), generator=gen))


@pytest.mark.parametrize(
    ("kind", "quantity", "error", "fragment"),
    [
        ("nan", "trace", NonFiniteError, "non-finite trace (nan)"),
        ("nan", "eigenvalues", NonFiniteError, "non-finite eigenvalues (nan)"),
        ("nan-stderr", "trace", NonFiniteError, "non-finite standard error of the trace"),
        ("dict", "trace", PluginError, "returned dict for 'trace', not a"),
        ("float", "trace", PluginError, "returned float for 'trace', not a"),
        ("wrong-quantity", "trace", PluginError, "returned a result for 'density'"),
        ("wrong-shape", "trace", PluginError, "trace must be a float"),
        ("wrong-shape", "eigenvalues", PluginError, "must be a non-empty list of floats"),
    ],
)
def test_the_host_refuses_a_bad_result_naming_backend_and_plugin(
    bad_plugins: Path, kind: str, quantity: str, error: type[Exception], fragment: str
) -> None:
    model, loss, batch = _problem()
    with pytest.raises(error) as info:
        dcc.estimate(model, loss, batch, quantity, f"{kind}-curv")
    message = str(info.value)
    assert fragment in message, message
    assert f"backend '{kind}-curv' (plugin '{DIST}:{kind}')" in message


def test_a_good_result_passes_unchanged() -> None:
    model, loss, batch = _problem()
    result = dcc.estimate(model, loss, batch, "trace", "pyhessian", num_hvps=4)
    assert isinstance(result.value, float) and result.stderr is not None


def _cli(*args: Any) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize(
    ("kind", "fragment"), [("nan", "NonFinite"), ("nan", "non-finite trace"), ("dict", "dict")]
)
def test_estimate_json_reports_a_bad_result_in_one_line(
    bad_plugins: Path, kind: str, fragment: str
) -> None:
    path = save_state_dict(bad_plugins / "w.pt")
    result = _cli("estimate", path, *GENERIC_ARGS, "-b", f"{kind}-curv", "--json")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert f"{DIST}:{kind}" in lines[0]
    if fragment != "NonFinite":
        assert fragment in lines[0]


def test_compare_keeps_the_bad_backend_as_a_failed_row(bad_plugins: Path) -> None:
    path = save_state_dict(bad_plugins / "w.pt")
    result = _cli(
        "compare",
        path,
        *GENERIC_ARGS,
        "--backends",
        "pyhessian,nan-curv",
        "--num-hvps",
        4,
        "--json",
    )
    assert result.exit_code == 0, result.output
    rows = {row["backend"]: row for row in json.loads(result.stdout)["rows"]}
    assert rows["pyhessian"]["status"] == "ok"
    assert rows["nan-curv"]["status"] == "failed" and "non-finite" in rows["nan-curv"]["reason"]


def test_usable_record() -> None:
    good = {"quantity": "trace", "value": 1.0, "stderr": 0.1, "ci": [0.8, 1.2], "error": None}
    assert usable_record(good)
    assert usable_record({"quantity": "eigenvalues", "value": [3.0, 1.0], "error": None})
    # what a NaN result used to leave in curvature.jsonl: null with no error
    assert not usable_record({**good, "value": None})
    assert not usable_record({"quantity": "eigenvalues", "value": [None], "error": None})
    assert not usable_record({**good, "ci": [None, None]})
    assert not usable_record({**good, "error": "NonFiniteError: ..."})


TINY = [
    "model=small_cnn",
    "model.width=4",
    "data.num_train=32",
    "data.num_val=16",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.val_check_interval=1.0",
    "trainer.log_every_n_steps=1",
    "lrsched.warmup_epochs=0.5",
    "curvature.compute_every_n_steps=1",
    "curvature.compute_at_step_zero=true",
    "curvature.num_hvps=null",
    "curvature.hessian_batch_size=8",
]


@pytest.mark.filterwarnings("ignore:CurvatureMonitor. measurement at step")
def test_a_training_run_records_the_error_and_never_logs_the_nan(bad_plugins: Path) -> None:
    """Through `deconcnn-curv train`: the monitor records each refused result with its error
    (value null), Lightning never sees a number, and the summary and plot still come out (the
    plot used to crash with a TypeError on the NaN eigenvalue)."""
    pytest.importorskip("lightning")
    pytest.importorskip("hydra")
    from deconcnn_curvature.monitor import read_curvature_jsonl
    from deconcnn_curvature.training.metrics import read_metrics_jsonl

    run = bad_plugins / "run"
    result = CliRunner().invoke(
        cli,
        ["train", *TINY, "curvature.backend=nan-curv", f"run_dir={run}"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    records = read_curvature_jsonl(run / "curvature.jsonl")
    assert {r["quantity"] for r in records} == {"trace", "eigenvalues"}
    for rec in records:
        assert rec["value"] is None
        assert rec["error"].startswith("NonFiniteError: backend 'nan-curv' (plugin "), rec
    logged = {k for line in read_metrics_jsonl(run / "metrics.jsonl") for k in line["metrics"]}
    assert not {k for k in logged if k.startswith("curvature/")}, logged
    assert (run / "curvature.png").is_file()
    assert "0 ok" in result.output and "first failure" in result.output
