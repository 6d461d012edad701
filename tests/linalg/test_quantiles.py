"""The normal and Student-t quantiles that replaced ``scipy.stats`` (importing it for
two quantiles cost ~60 MiB of resident memory in the first measurement of a process)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
from scipy import stats

from deconcnn_curvature.linalg._quantiles import normal_quantile, student_t_quantile

LEVELS = [0.0005, 0.05, 0.5, 0.6, 0.75, 0.9, 0.95, 0.975, 0.99, 0.995, 0.9995]
DOFS = [1, 2, 3, 4, 5, 7, 10, 19, 30, 49, 100, 1000, 1e5]


@pytest.mark.parametrize(("p", "dof"), list(itertools.product(LEVELS, DOFS)))
def test_student_t_quantile_equals_scipy(p: float, dof: float) -> None:
    assert student_t_quantile(p, dof) == pytest.approx(stats.t.ppf(p, dof), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("p", LEVELS)
def test_normal_quantile_equals_scipy(p: float) -> None:
    assert normal_quantile(p) == pytest.approx(stats.norm.ppf(p), rel=1e-12, abs=1e-14)


@pytest.mark.parametrize(("p", "dof"), [(0.0, 3), (1.0, 3), (0.5, 0)])
def test_student_t_quantile_refuses_bad_arguments(p: float, dof: float) -> None:
    with pytest.raises(ValueError, match="need 0 < p < 1 and dof > 0"):
        student_t_quantile(p, dof)


def test_a_trace_estimate_does_not_import_scipy_stats() -> None:
    code = (
        "import sys, torch\n"
        "from torch import nn\n"
        "import deconcnn_curvature as dcc\n"
        "b = (torch.randn(8, 3), torch.randint(0, 2, (8,)))\n"
        "for backend in ('hutchpp', 'pyhessian'):\n"
        "    dcc.estimate(nn.Linear(3, 2), nn.CrossEntropyLoss(), b, 'trace', backend, "
        "seed=0, num_hvps=6)\n"
        "print('scipy.stats' in sys.modules)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DECONCNN_CURVATURE_PLUGINS": ""}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"
