"""Ctrl-C or SIGTERM during a long ``deconcnn-curv estimate`` prints the trace
from the products already made, marked partial, and exits 130 / 143; on a terminal a long
estimate shows products done / budget and an ETA.

The command runs as a real subprocess whose stderr is a pseudo-terminal (so the progress display
is on, as for a person at a terminal) while stdout is a pipe (as for ``--json`` read by a program).
"""

from __future__ import annotations

import json
import math
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import GENERIC_ARGS, save_state_dict

import deconcnn_curvature as dcc
from deconcnn_curvature.linalg import DenseOperator, hutchinson, hutchpp, trace_progress

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and pty")

BUDGET = 50_000_000  # far more than the test will wait for


@pytest.fixture
def workdir(workdir: Path) -> Path:
    """The shared working folder (tests/conftest.py) with weights saved in ``w.pt``."""
    save_state_dict(workdir / "w.pt", seed=1)
    return workdir


def _interrupt(workdir: Path, sig: int, *extra: str) -> tuple[int, str, str]:
    """Start a long estimate, wait until its terminal shows products being made, send ``sig``.
    Returns the exit code, stdout, and what the terminal showed."""
    master, slave = pty.openpty()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deconcnn_curvature",
            "estimate",
            "w.pt",
            *GENERIC_ARGS,
            "--num-hvps",
            str(BUDGET),
            *extra,
        ],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 90
    signalled = False
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    seen += os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    ready = []
            if not signalled and re.search(rb"\d+/%d products, ETA" % BUDGET, seen):
                time.sleep(0.3)  # a few more products
                proc.send_signal(sig)
                signalled = True
            if proc.poll() is not None and not ready:
                break
            assert time.monotonic() < deadline, seen.decode(errors="replace")[-2000:]
        stdout = proc.stdout.read().decode() if proc.stdout else ""
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)
    assert signalled, seen.decode(errors="replace")[-2000:]
    return proc.returncode, stdout, seen.decode(errors="replace")


@pytest.mark.slow
def test_ctrl_c_prints_the_partial_trace_and_exits_130(workdir: Path) -> None:
    code, stdout, terminal = _interrupt(workdir, signal.SIGINT)
    assert code == 130, (stdout, terminal[-2000:])
    assert "Traceback" not in terminal and "Aborted" not in terminal
    match = re.search(
        r"PARTIAL trace \(interrupted by SIGINT after (\d+)/(\d+) products\): (\S+) ± (\S+) ",
        stdout,
    )
    assert match, stdout
    done, budget, value, stderr = match.groups()
    assert 2 <= int(done) < int(budget) == BUDGET
    assert math.isfinite(float(value)) and math.isfinite(float(stderr)) and float(stderr) > 0
    assert "ETA" in terminal  # the progress display ran on the terminal


@pytest.mark.slow
def test_sigterm_with_json_prints_a_partial_object_and_exits_143(workdir: Path) -> None:
    code, stdout, terminal = _interrupt(workdir, signal.SIGTERM, "--json")
    assert code == 143, (stdout, terminal[-2000:])
    data = json.loads(stdout)  # stdout holds the JSON object alone: no progress in it
    assert data["partial"] is True and data["interrupted_by"] == "SIGTERM"
    result = data["result"]
    assert result["quantity"] == "trace" and result["budget"] == BUDGET
    assert 2 <= result["n_hvp"] < BUDGET and result["probes"] == result["n_hvp"]
    assert math.isfinite(result["value"]) and math.isfinite(result["stderr"])
    assert "Traceback" not in terminal


# --------------------------------------------------------------------------- the estimator hook


def _operator(dim: int = 12, seed: int = 0) -> DenseOperator:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    return DenseOperator(a + a.T)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("block_size", [1, 3])
def test_hutchinson_reports_each_block_and_the_last_report_is_the_result(block_size: int) -> None:
    reports = []
    with trace_progress(reports.append):
        est = hutchinson(
            _operator(), 20, generator=torch.Generator().manual_seed(5), block_size=block_size
        )
    assert [r.n_matvecs for r in reports] == [*range(block_size, 20, block_size), 20]
    assert all(r.budget == 20 and r.method == "hutchinson" for r in reports)
    torch.testing.assert_close(reports[-1].value, est.value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reports[-1].stderr, est.stderr, rtol=1e-10, atol=1e-12)


def test_a_stopped_hutchinson_reports_the_estimate_of_the_probes_made() -> None:
    """Stopped after 7 probes, the last report is exactly the 7-probe estimate (same probes)."""
    reports = []

    def listen(report):
        reports.append(report)
        if report.n_probes == 7:
            raise _Stop

    with trace_progress(listen), pytest.raises(_Stop):
        hutchinson(_operator(), 1000, generator=torch.Generator().manual_seed(3))
    seven = hutchinson(_operator(), 7, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(reports[-1].value, seven.value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reports[-1].stderr, seven.stderr, rtol=1e-10, atol=1e-12)
    assert reports[-1].budget == 1000


def test_hutchpp_reports_its_deflated_probes_with_the_exact_part() -> None:
    reports = []
    with trace_progress(reports.append):
        est = hutchpp(_operator(dim=40), 30, generator=torch.Generator().manual_seed(1))
    assert reports and all(r.method == "hutch++" and r.budget == 30 for r in reports)
    assert [r.n_probes for r in reports] == list(range(1, len(reports) + 1))
    assert reports[-1].n_matvecs == est.n_matvecs
    torch.testing.assert_close(reports[-1].value, est.value, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(reports[-1].stderr, est.stderr, rtol=1e-10, atol=1e-12)


def test_no_listener_no_reports_and_the_same_numbers() -> None:
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    loss = torch.nn.CrossEntropyLoss()
    plain = dcc.estimate(model, loss, (x, y), "trace", "pyhessian", num_hvps=6)
    reports = []
    with trace_progress(reports.append):
        heard = dcc.estimate(model, loss, (x, y), "trace", "pyhessian", num_hvps=6)
    assert plain.value == heard.value and plain.stderr == heard.stderr
    assert len(reports) == 6 and reports[-1].n_matvecs == 6
