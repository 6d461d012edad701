"""Checkpoint files for the checkpoint loader and the estimate/compare/density command tests.

* :data:`HELPER_SOURCE` is written as ``tests_helper_module.py`` into a temporary folder that
  becomes the working directory, so ``--model tests_helper_module:factory`` is imported the way a
  user's own module would be. The network is a tiny float64 MLP, so dense Hessians are exact.
* :func:`reference_checkpoint` runs a tiny real Lightning fit of the reference
  ``ClassificationModule`` (about 3 s) once per test session.
"""

from __future__ import annotations

import importlib
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

HELPER_MODULE = "tests_helper_module"

HELPER_SOURCE = '''
"""A user's own model module, as named by --model tests_helper_module:factory."""
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, in_features=12, hidden=5, num_classes=3):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.Tanh(),
            nn.Linear(hidden, num_classes),
        ).double()

    def forward(self, x):
        return self.body(x.to(torch.float64))


def factory(in_features=12, hidden=5, num_classes=3):
    return Net(in_features, hidden, num_classes)


def broken(**kwargs):
    raise RuntimeError("the factory itself fails")


def not_a_module(**kwargs):
    return 42
'''

#: Options that make the CLI build the data the helper model expects.
GENERIC_ARGS = ["--model", f"{HELPER_MODULE}:factory", "--data", "synthetic", "--input-shape", "12"]


def install_helper_module(folder: Path) -> None:
    """Write the helper module into ``folder`` and forget any earlier import of it."""
    (folder / f"{HELPER_MODULE}.py").write_text(HELPER_SOURCE)
    sys.modules.pop(HELPER_MODULE, None)
    importlib.invalidate_caches()


def helper_model(seed: int = 0, **kwargs: Any) -> nn.Module:
    """The helper network with weights drawn from ``seed`` (global RNG left untouched)."""
    module = importlib.import_module(HELPER_MODULE)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return module.factory(**kwargs)


def save_state_dict(path: Path, seed: int = 0, prefix: str = "", wrap: str | None = None) -> Path:
    """Save the helper model's weights: a plain state dict, or under ``wrap`` (e.g.
    ``"state_dict"``) with ``prefix`` on every key (e.g. ``"model."``, as Lightning writes)."""
    state = {prefix + k: v for k, v in helper_model(seed).state_dict().items()}
    torch.save(state if wrap is None else {wrap: state, "epoch": 3, "global_step": 42}, path)
    return path


def write_fake_cifar(folder: Path, per_batch: int = 8) -> Path:
    """A CIFAR-10 python-format folder with ``per_batch`` random images per file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        with (folder / name).open("wb") as handle:
            pickle.dump({b"data": data, b"labels": labels}, handle)
    return folder


def reference_checkpoint(base: Path) -> Path:
    """A real Lightning checkpoint of the reference run (tiny small_cnn, one epoch, 64 images),
    built once under ``base``."""
    path = base / "reference.ckpt"
    if path.exists():
        return path
    import lightning.pytorch as pl

    from deconcnn_curvature.training.data import CIFARDataModule
    from deconcnn_curvature.training.module import ClassificationModule

    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = ClassificationModule("small_cnn", {"width": 4, "norm_type": "batchnorm"}, lr=0.05)
        data = CIFARDataModule(num_train=64, num_val=32, batch_size=32, seed=0)
        trainer = pl.Trainer(
            max_epochs=1,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            default_root_dir=base,
        )
        trainer.fit(module, data)
        trainer.save_checkpoint(path)
    return path
