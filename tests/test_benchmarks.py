"""Every benchmark script runs end to end (at smoke sizes, into a temporary JSON) and writes the
ratios it exists to measure. The numbers themselves are measured by running the scripts, not here:
timings are never asserted in tests."""

from __future__ import annotations

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
    elif name == "cost_accuracy":
        rows = {r["backend"]: r for r in data["results"]}
        assert set(rows) == {"pyhessian", "hutchpp"}
        assert all(
            _positive(r["share"]) and _positive(r["cost_in_training_steps"]) for r in rows.values()
        )
        assert set(data["reference"]) == {"0", "2"}  # checkpoints of the training run
        for r in rows.values():
            assert set(r["per_checkpoint"]) == {"0", "2"}
            assert 0 <= r["accuracy"]["coverage"] <= 1 and isinstance(r["accuracy"]["met"], bool)
        assert data["frontier"] and set(data["frontier"]) <= {r["name"] for r in rows.values()}
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
