"""``deconcnn-curv train`` under Lightning's DDP strategy: 2 real gloo processes on CPU.

Lightning starts rank 1 by running the same command again. The run must still be one run: one
folder (even when it is named by a timestamp), one summary on stdout, the curvature file written
once, and a clean exit on both ranks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from test_train_cli import TINY as TRAIN_TINY

from deconcnn_curvature.monitor import read_curvature_jsonl
from deconcnn_curvature.training.metrics import read_metrics_jsonl
from tests.distributed import _ranks

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="needs torch.distributed with the gloo backend",
    ),
]

TIMEOUT_S = 120
TINY = [
    *TRAIN_TINY,
    "curvature.compute_every_n_steps=1",
    "curvature.compute_at_step_zero=false",
    "trainer.strategy=ddp",
    "trainer.devices=2",
    "trainer.accelerator=cpu",
]


def test_a_ddp_training_run_is_one_run(tmp_path: Path) -> None:
    env = _ranks.child_env()
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "deconcnn_curvature", "train", *TINY, "--json"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # rank 1 joins this group and is killed with it on a hang
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the DDP training run did not finish within {TIMEOUT_S} s:\n{out}\n{err}")
    assert proc.returncode == 0, err
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs  # rank 1 wrote into rank 0's timestamped folder
    summary = json.loads(out)  # exactly one JSON document: rank 1 printed nothing
    assert summary["global_rank"] == 0 and Path(summary["run_dir"]).name == runs[0].name
    # 64 samples, 2 ranks, batch 16: 2 optimiser steps, each measured once (trace + eigenvalues)
    records = read_curvature_jsonl(runs[0] / "curvature.jsonl")
    assert [(r["step"], r["quantity"]) for r in records] == [
        (s, q) for s in (1, 2) for q in ("trace", "eigenvalues")
    ]
    assert all(r["error"] is None and r["batch_size"] == 8 for r in records)
    steps = [line["step"] for line in read_metrics_jsonl(runs[0] / "metrics.jsonl")]
    assert steps and steps == sorted(steps)  # one writer: no interleaved lines
    assert "terminate called" not in err
