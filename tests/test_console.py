"""What a user sees besides the results: no warnings from set-up, no advertising, epochs counted
right.

``tasks.sh`` printed torch's "Failed to initialize NumPy" while writing the
constraints file (it imported torch before numpy was installed); Lightning printed its litlogger tip
on every run; the progress bar of a 2-epoch run read "Epoch 1/1" (Lightning counts both numbers
from 0).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _constraint_command() -> str:
    """The Python code tasks.sh runs to write the constraints file."""
    text = (ROOT / "tasks.sh").read_text()
    (line,) = [ln for ln in text.splitlines() if '> "$constraints"' in ln]
    match = re.search(r'-c "(.*)" > "\$constraints"', line)
    assert match, line
    return match.group(1)


def test_tasks_sh_writes_the_constraint_without_importing_torch(tmp_path: Path) -> None:
    """Run it as tasks.sh does on a fresh venv, where numpy is not installed yet (a stand-in
    numpy that cannot be imported): the pin comes out and nothing is printed to stderr."""
    import torch

    fake = tmp_path / "numpy"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "raise ModuleNotFoundError('No module named numpy (stand-in)', name='numpy')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", _constraint_command()],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"torch=={torch.__version__.split('+')[0]}\n"
    assert done.stderr == ""


def test_the_install_guide_writes_the_constraint_the_same_way() -> None:
    guide = (ROOT / "docs" / "install.md").read_text()
    assert f'python -c "{_constraint_command()}" > "$VIRTUAL_ENV/constraints.txt"' in guide


pl = pytest.importorskip("lightning.pytorch")


def _tiny_fit(callbacks: list[Any], max_epochs: int = 2) -> Any:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(3, 2)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g))
    trainer = pl.Trainer(
        max_epochs=max_epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(Module(), DataLoader(data, batch_size=4))
    return trainer


def test_the_progress_bar_counts_epochs_from_one() -> None:
    from deconcnn_curvature.training._console import epoch_label, progress_bar

    bar = progress_bar()
    seen: list[str] = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            seen.append(str(bar.progress.tasks[bar.train_progress_bar_id].description).strip())

    _tiny_fit([bar, Spy()])
    assert seen == ["Epoch 1/2", "Epoch 1/2", "Epoch 2/2", "Epoch 2/2"]  # Lightning: 0/1, 1/1
    assert epoch_label(0, None) == epoch_label(0, -1) == "Epoch 1"


def test_the_litlogger_tip_is_dropped_and_nothing_else(caplog: pytest.LogCaptureFixture) -> None:
    from deconcnn_curvature.training._console import no_logger_tip

    def messages(quiet: bool) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.INFO), no_logger_tip() if quiet else nullcontext():
            pl.Trainer(logger=False, accelerator="cpu", enable_progress_bar=False)
        return [r.getMessage() for r in caplog.records]

    loud, quiet = messages(False), messages(True)
    assert any("litlogger" in m for m in loud)  # Lightning prints it: the test can fail
    assert not any("litlogger" in m for m in quiet)
    assert [m for m in loud if "litlogger" not in m] == quiet


def test_the_training_run_uses_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The reference run's console output: no litlogger tip; the last epoch of 2 says 2/2."""
    from deconcnn_curvature.training.run import compose_config, run_training

    cfg = compose_config(
        [
            "model=small_cnn", "model.width=4", "data.num_train=32", "data.num_val=8",
            "data.batch_size=16", "trainer.max_epochs=2", "curvature.enabled=false",
            "plot=false", f"run_dir={tmp_path / 'run'}",
        ]
    )  # fmt: skip
    run_training(cfg)
    out = capsys.readouterr()
    text = out.out + out.err
    assert "litlogger" not in text
    assert "Epoch 2/2" in text and "Epoch 1/1" not in text
