"""Without the ``lightning`` extra (Lightning, Hydra, OmegaConf absent), the core still works.

A child interpreter blocks those packages (``sys.modules[name] = None`` makes every import of them
fail, as on a machine where they are not installed) and runs the real CLI: ``estimate`` on the
reference run's synthetic CIFAR data needs no Lightning, and ``train`` says which extra to install
instead of a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deconcnn_curvature.training.resnet_cifar import small_cnn

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, sys
BLOCKED = ("lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics", "hydra",
           "omegaconf")
for name in BLOCKED:
    sys.modules[name] = None
from deconcnn_curvature.cli import main
try:
    main(sys.argv[1:])
    code = 0
except SystemExit as exc:
    code = exc.code
loaded = sorted(n for n in BLOCKED if sys.modules.get(n) is not None)
print("\\n@@" + json.dumps({"code": code, "loaded": loaded}))
"""


def _run(tmp_path: Path, *args: str) -> tuple[dict, str, str]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**_env(), "PYTHONPATH": str(ROOT)},
    )
    tail = proc.stdout.rsplit("@@", 1)
    assert len(tail) == 2, proc.stdout + proc.stderr
    return json.loads(tail[1]), tail[0], proc.stderr


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["DECONCNN_CURVATURE_PLUGINS"] = ""
    env.pop("DECONCNN_CURVATURE_BACKEND", None)
    return env


@pytest.mark.slow
def test_estimate_on_synthetic_cifar_needs_no_lightning(tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.save(small_cnn().state_dict(), tmp_path / "w.pt")
    status, out, err = _run(
        tmp_path,
        "estimate",
        "w.pt",
        "--model",
        "deconcnn_curvature.training.resnet_cifar:small_cnn",
        "--data",
        "synthetic-cifar",
        "--batch-size",
        "16",
        "--num-hvps",
        "12",
        "--json",
        "--quiet",
    )
    assert status == {"code": 0, "loaded": []}, (out, err)
    payload = json.loads(out)
    assert payload["loaded"]["data"].startswith("synthetic-cifar"), payload["loaded"]
    result = payload["result"]
    assert result["n_hvp"] == 12 and result["stderr"] > 0
    assert torch.isfinite(torch.tensor(result["value"]))


@pytest.mark.slow
def test_train_without_the_extra_names_it_and_exits_1(tmp_path: Path) -> None:
    status, out, err = _run(tmp_path, "train", "+preset=demo")
    assert status["code"] == 1, (out, err)
    assert "needs the lightning extra" in err
    assert "pip install 'deconcnn-curvature[lightning]'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()
