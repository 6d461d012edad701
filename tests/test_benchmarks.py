"""Every benchmark script runs end to end (at smoke sizes, into a temporary JSON) and writes the
ratios it exists to measure. The numbers themselves are measured by running the scripts, not here:
timings are never asserted in tests."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

SMOKE: dict[str, list[str]] = {
    "hvp_cost": ["--reps", "1", "--probes", "2", "--batch", "8"],
    "backpack_cost": ["--batch", "8", "--reps", "1"],
    "monitor_overhead": [
        "--steps",
        "4",
        "--every",
        "2",
        "--rounds",
        "1",
        "--model",
        "small_cnn",
        "--num-samples",
        "6",
        "--hessian-batch-size",
        "8",
        "--threads",
        "1",
    ],
    "gpu_hvp": ["--device", "cpu", "--quick"],
    "hvp_paths": ["--quick", "--memory"],
    "trace_accuracy": ["--quick", "--seeds", "2", "--jobs", "1"],
    "cost_accuracy": ["--quick"],
    "parameter_guard": ["--batch", "4", "--reps", "1"],
    "time_budget": ["--quick"],
    "budget_noise": ["--quick"],
    "eig_wrong_converged": ["--networks", "6"],
    "eig_tolerance": ["--quick", "--no-mlp"],
}


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _check(name: str, data: dict[str, Any]) -> None:
    if name == "hvp_cost":
        for model in ("cnn", "resnet"):
            assert all(_positive(v) for v in data["models"][model]["hvp_ratio"].values())
    elif name == "backpack_cost":
        methods = {row["method"] for row in data["rows"]}
        assert "gradient" in methods and len(methods) > 1, methods
    elif name == "monitor_overhead":
        backends = {b["backend"]: b for b in data["backends"]}
        assert {"pyhessian", "hutchpp"} <= set(backends)
        assert all(_positive(b["ratio_on_off"]) for b in backends.values())
        assert all(_positive(b["cost_in_training_steps"]) for b in backends.values())
    elif name == "hvp_paths":
        cnn = data["models"]["cnn"]
        for path in ("double_backward", "forward_over_reverse", "pyhessian_raw"):
            assert _positive(cnn["ratio"][path]), (path, cnn)
            assert cnn["max_rel_diff_vs_double_backward"][path] < 1e-4
        # curvlinops and torch.compile: a measured row or a note saying why not
        for row in ("curvlinops", "compiled[forward_over_reverse_vmap]"):
            assert row in cnn["ratio"] or row in cnn["notes"], row
        assert _positive(data["memory"]["cnn"]["ratio_to_pyhessian"]["hutchpp:double_backward"])
    elif name == "gpu_hvp":
        assert data["device"] == "cpu" and data["ratios"]
    elif name == "eig_wrong_converged":
        rows = {(t["backend"], t["dtype"]): t for t in data["table"]}
        assert set(rows) == {
            (b, d) for b in ("hutchpp", "pyhessian") for d in ("float32", "float64")
        }
        for t in rows.values():
            assert t["networks"] == 6 and 0 <= t["wrong_and_converged"] <= t["wrong"] <= 6
            assert 0 <= t["converged_share"] <= 1 and _positive(t["mean_hvps"])
        assert all(r["gap"] < data["max_gap"] for r in data["rows"])
    elif name == "cost_accuracy":
        rows = {r["backend"]: r for r in data["results"]}
        assert set(rows) == {"pyhessian", "hutchpp"}
        assert all(
            _positive(r["share"]) and _positive(r["cost_in_training_steps"]) for r in rows.values()
        )
        assert set(data["reference"]) == {"0", "2"}  # checkpoints of the training run
        for r in rows.values():
            assert set(r["per_checkpoint"]) == {"0", "2"}
            acc = r["accuracy"]
            assert acc["draws"] == 2 and isinstance(acc["met"], bool)
            for crit in ("trace_within_5pct", "coverage", "lambda_within_1pct"):
                lo, hi = acc[crit]["share"]  # a range over the reference's uncertainty
                w_lo, w_hi = acc[crit]["wilson95"]
                assert 0 <= w_lo <= lo <= hi <= w_hi <= 1, acc[crit]
        for f in data["reference"].values():  # the reference's uncertainty is reported
            assert _positive(f["trace_stderr"]) and f["lambda_halfwidth"] >= 0
            assert isinstance(f["trace_decidable"], bool)
        assert data["frontier"] and set(data["frontier"]) <= {r["name"] for r in rows.values()}
    elif name == "parameter_guard":
        assert all(_positive(r["guard_over_hvp"]) for r in data["rows"])
        assert all(_positive(r["fingerprint_over_hvp"]) for r in data["rows"])
    elif name == "time_budget":
        assert set(data["pooled"]) == {"fixed", "budget", "matched"}
        for row in data["pooled"].values():
            assert all(math.isfinite(x) for x in row["overhead_cpu_per_seed"])
            lo, hi = row["coverage_wilson95"]
            assert 0 <= lo <= hi <= 1
        fixed = data["pooled"]["fixed"]
        assert fixed["measurements"] >= 1 and fixed["trace_err_mean"] is not None
        assert fixed["draws"] == 2 * fixed["measurements"]  # --quick: 2 draws per step
        assert data["seeds"][0]["replay_matches"] is True  # the reference saw the same weights
        sizes = data["chosen_sizes"]["0"]["matched"]
        assert sizes and all(n >= 8 and m >= 5 for _, n, m in sizes)  # Hutch++'s minimum: 5
    elif name == "eig_tolerance":
        default = data["lambda_max"]["float32"]["default"]
        assert default["converged"] is True and default["note"] is None
        assert 0 < max(default["rel_errors"]) < 1e-3, default
    elif name == "budget_noise":
        (step,) = data["steps"].values()
        assert step["reference"]["trace"] > 0
        for row in step["shapes"].values():
            assert all(math.isfinite(row[k]) and row[k] >= 0 for k in ("err_mean", "err_median"))
            assert row["stderr_probe_median"] >= 0 and row["stderr_data_median"] >= 0
    elif name == "trace_accuracy":
        assert set(data["accuracy"]) >= {"cnn_init", "cnn_trained"}
        assert all("met" in t for t in data["targets"])


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_benchmark_runs_and_writes_its_ratios(name: str, tmp_path: Path) -> None:
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *SMOKE[name], "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    _check(name, data)


def _cost_accuracy() -> Any:
    spec = importlib.util.spec_from_file_location(
        "cost_accuracy", ROOT / "benchmarks" / "cost_accuracy.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cost_accuracy_wilson_interval_matches_its_closed_form() -> None:
    wilson = _cost_accuracy().wilson
    z2 = 1.96**2
    # k = 0 and k = n: the bounds are z^2/(n+z^2) and n/(n+z^2)
    assert wilson(0, 10) == pytest.approx((0.0, z2 / (10 + z2)), abs=1e-12)
    assert wilson(10, 10) == pytest.approx((10 / (10 + z2), 1.0), abs=1e-12)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # symmetric about 1/2
    assert wilson(18, 20) == pytest.approx((0.6990, 0.9721), abs=1e-4)


def test_cost_accuracy_judges_with_the_references_uncertainty() -> None:
    ca = _cost_accuracy()
    z2 = 1.96**2
    # 4 % from an exact reference is within 5 %; with a reference of ±2 % it only may be
    assert ca._within(1.04, 1.0, 0.0, 0.05) == (True, True)
    assert ca._within(1.04, 1.0, 0.02, 0.05) == (False, True)
    assert ca._within(1.50, 1.0, 0.02, 0.05) == (False, False)
    assert ca._covers([0.9, 1.1], 1.0, 0.05) == (True, True)
    assert ca._covers([0.9, 1.0], 1.0, 0.05) == (False, True)
    assert ca._covers([1.2, 1.3], 1.0, 0.05) == (False, False)
    assert ca._covers(None, 1.0, 0.0) == (False, False)
    # verdicts on ">= 90 %": 20/20 meets it but is not shown beyond draw noise, 40/40 is
    full = ca._share([(True, True)] * 20)
    assert (full["verdict"], full["shown"]) == ("met", False)
    assert full["wilson95"][0] == pytest.approx(20 / (20 + z2))
    assert ca._share([(True, True)] * 40)["shown"] is True
    half = ca._share([(True, True)] * 10 + [(False, False)] * 10)
    assert (half["verdict"], half["shown"]) == ("not met", True)
    # 17 surely and 19 possibly of 20: the reference cannot tell
    mixed = ca._share([(True, True)] * 17 + [(False, True)] * 2 + [(False, False)])
    assert mixed["share"] == [0.85, 0.95] and mixed["verdict"] == "undecided"


def test_monitor_overhead_reports_a_backend_that_refuses_the_model(tmp_path: Path) -> None:
    """--quick on the BatchNorm ResNet: backpack refuses the model at setup, and the run ends
    with a table and JSON holding that backend's reason instead of a traceback."""
    out = tmp_path / "quick.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "monitor_overhead.py"), "--quick",
         "--out", str(out)],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["settings"]["quick"] is True and data["environment"]["date"]
    assert data["skipped"]["backpack"].startswith("refused: backend 'backpack'")
    assert "BatchNorm" in data["skipped"]["backpack"]
    assert {b["backend"] for b in data["backends"]} == {"pyhessian", "hutchpp"}
