"""CurvatureMonitor under ``Trainer(strategy="ddp", accelerator="cpu", devices=2)`` (gloo).

One real 2-process DDP run (``lightning_ddp_driver.py``, launched the way Lightning wants: a script
it re-runs for rank 1) with two monitors: ``good`` (pyhessian, trace and λ_max at steps 0, 2, 4) and
``failing`` (a backend that raises on rank 1 only, at steps 2 and 4). What is proven:

* every rank takes part in every measurement, and the run finishes (a deadline fails the test);
* the logged values are identical on both ranks and equal a single process's ``estimate`` on the
  union of the two ranks' curvature batches (same parameters, same probe seed);
* the metrics reach the logger once (rank 0's CSV, one row per measurement) and the JSONL is
  written once, by rank 0;
* the failure on rank 1 is recorded (value null, the error naming rank 1) on every failing step,
  nothing is logged for it, and the ``good`` monitor keeps measuring correctly afterwards.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import deconcnn_curvature as dcc
from deconcnn_curvature.monitor import read_curvature_jsonl
from tests.distributed import _ranks

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="needs torch.distributed with the gloo backend",
    ),
]

DRIVER = Path(__file__).with_name("lightning_ddp_driver.py")
#: Two Lightning imports and a few steps take ~20 s on 2 idle cores; a hang is caught here.
TIMEOUT_S = 90


def _env() -> dict[str, str]:
    env = _ranks.child_env()
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(name, None)
    env["PYTHONWARNINGS"] = "default"
    return env


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ddp")
    proc = subprocess.Popen(
        [sys.executable, str(DRIVER), str(out)],
        cwd=out,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # Lightning's rank-1 process joins this group: killed with it
    )
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"the DDP run did not finish within {TIMEOUT_S} s (a deadlock?):\n{log}")
    assert proc.returncode == 0, log
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    log_dir = Path(ranks[0]["log_dir"])
    return {"out": out, "log": log, "ranks": ranks, "log_dir": log_dir}


def _driver() -> Any:
    sys.path.insert(0, str(DRIVER.parent))
    try:
        import lightning_ddp_driver as driver
    finally:
        sys.path.remove(str(DRIVER.parent))
    return driver


def test_every_rank_takes_part_in_every_measurement(ddp_run: dict[str, Any]) -> None:
    for r, report in enumerate(ddp_run["ranks"]):
        assert report["rank"] == r and report["world_size"] == 2
        assert report["measurements"] == {"good": 3, "failing": 2}
    assert ddp_run["ranks"][0]["indices"] == ddp_run["ranks"][1]["indices"]
    assert ddp_run["ranks"][0]["log_dir"] == ddp_run["ranks"][1]["log_dir"]


def test_the_jsonl_is_written_once_by_rank_zero(ddp_run: dict[str, Any]) -> None:
    files = sorted(p.relative_to(ddp_run["out"]) for p in ddp_run["out"].rglob("*.jsonl"))
    log_dir = ddp_run["log_dir"].relative_to(ddp_run["out"])
    assert files == [log_dir / "curvature.jsonl", log_dir / "failing.jsonl"]
    assert ddp_run["ranks"][0]["writers"] == {"good": True, "failing": True}
    assert ddp_run["ranks"][1]["writers"] == {"good": False, "failing": False}
    good = read_curvature_jsonl(ddp_run["log_dir"] / "curvature.jsonl")
    assert [(r["step"], r["quantity"]) for r in good] == [
        (s, q) for s in (0, 2, 4) for q in ("trace", "eigenvalues")
    ]
    assert all(r["error"] is None and r["value"] is not None for r in good)


def test_values_equal_a_single_process_on_the_union_of_the_shards(
    ddp_run: dict[str, Any],
) -> None:
    driver = _driver()
    x, y = driver.make_dataset().tensors
    indices = ddp_run["ranks"][0]["indices"]
    assert len(indices) == driver.GOOD["hessian_batch_size"]
    union = [(x[indices[r::2]], y[indices[r::2]]) for r in range(2)]  # rank r's share
    options = {
        "trace": {"num_hvps": driver.GOOD["num_hvps"]},
        "eigenvalues": {"k": 1, **driver.GOOD["backend_options"]},
    }
    records = read_curvature_jsonl(ddp_run["log_dir"] / "curvature.jsonl")
    for rec in records:
        model = driver.make_model()
        model.load_state_dict(torch.load(ddp_run["out"] / f"params_step{rec['step']}.pt"))
        single = dcc.estimate(
            model, nn.CrossEntropyLoss(), union, rec["quantity"], "pyhessian", seed=rec["seed"],
            **options[rec["quantity"]],
        )  # fmt: skip
        assert rec["n_hvp"] == single.n_hvp, rec
        torch.testing.assert_close(
            torch.tensor(rec["value"], dtype=torch.float64),
            torch.tensor(single.value, dtype=torch.float64),
            rtol=1e-8,
            atol=0,
        )
    # The parameters moved between measurements, so equal values are not an accident:
    traces = [r["value"] for r in records if r["quantity"] == "trace"]
    assert len(set(traces)) == 3


def test_metrics_are_identical_on_every_rank_and_logged_once(ddp_run: dict[str, Any]) -> None:
    def values(report: dict[str, Any]) -> list[tuple[int, str, float]]:
        return [tuple(v) for v in report["logged"] if v[1] != "curvature/seconds"]

    rank0, rank1 = (values(r) for r in ddp_run["ranks"])
    assert rank0 == rank1  # bitwise: the reduced products are the same on both ranks
    assert {name for _, name, _ in rank0} == {
        "curvature/hutch_trace",
        "curvature/hutch_trace_stderr",
        "curvature/lambda_max",
        "curvature/lambda_max_converged",
        "curvature/n_hvp",
    }
    metrics = list(ddp_run["out"].rglob("metrics.csv"))
    assert metrics == [ddp_run["log_dir"] / "metrics.csv"]  # the logger lives on rank 0 only
    with metrics[0].open() as handle:
        rows = list(csv.DictReader(handle))
    for key in ("curvature/hutch_trace", "curvature/lambda_max"):
        # Distinct values: Lightning re-emits a value logged in on_train_batch_end with the next
        # step's row too (single-process runs do the same); self.log stores float32.
        logged = sorted({float(r[key]) for r in rows if r.get(key)})
        expected = sorted(v for _, name, v in rank0 if name == key)
        assert len(logged) == len(expected) == 3
        torch.testing.assert_close(logged, expected, rtol=1e-6, atol=0)
    assert not any(k.startswith("failing/") for k in rows[0])


def test_a_failure_on_rank_1_is_recorded_and_the_run_goes_on(ddp_run: dict[str, Any]) -> None:
    failed = read_curvature_jsonl(ddp_run["log_dir"] / "failing.jsonl")
    assert [r["step"] for r in failed] == [2, 4]
    for rec in failed:
        assert rec["value"] is None and rec["quantity"] == "trace"
        assert "1 of 2 ranks failed" in rec["error"]
        assert "rank 1:" in rec["error"]
        assert "injected: the backend broke on rank 1" in rec["error"]
    assert all(
        name.startswith("curvature/") for r in ddp_run["ranks"] for _, name, _ in r["logged"]
    )
    assert ddp_run["log"].count("measurement at step 2 failed") == 1  # warned once, by rank 0


def test_a_backend_without_distributed_support_is_refused_at_setup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    from deconcnn_curvature import registry as registry_module
    from deconcnn_curvature.backends.pyhessian import PyHessianBackend
    from deconcnn_curvature.errors import ConfigurationError
    from deconcnn_curvature.hookspecs import hookimpl
    from deconcnn_curvature.monitor import CurvatureMonitor
    from deconcnn_curvature.registry import Registry

    class LocalOnly(PyHessianBackend):
        name = "local_only"
        supports_distributed = False

    class Plugin:
        @hookimpl
        def register_backends(self, register: Any) -> None:
            register(LocalOnly)

    registry_module.set_registry(Registry.build(extra_plugins=(Plugin(),)))
    monitor = CurvatureMonitor(backend="local_only", quantities=("trace",))
    trainer = SimpleNamespace(world_size=2, is_global_zero=True, log_dir=None)
    with pytest.raises(ConfigurationError, match=r"'local_only' does not support .* 2 processes"):
        monitor.setup(trainer, _driver().Tiny(), "fit")  # type: ignore[arg-type]
    trainer.world_size = 1  # one process: accepted
    monitor.setup(trainer, _driver().Tiny(), "fit")  # type: ignore[arg-type]
