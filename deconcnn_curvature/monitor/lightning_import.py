"""Import Lightning once, turning the two ways it fails here into one clear error.

``lightning`` imports ``torchmetrics``, which imports ``torchvision`` whenever torchvision is
installed. A torchvision built for another torch (what pip picks for BackPACK next to a CPU
torch) then breaks ``import lightning`` with an unrelated-looking ``RuntimeError``. This package
never needs torchvision, so the fix is to uninstall it (or install the build matching torch).
"""

from __future__ import annotations

import importlib
import importlib.util

from deconcnn_curvature.errors import CurvatureError

__all__ = ["LightningUnavailableError", "check_lightning_importable", "pl"]


class LightningUnavailableError(CurvatureError, ImportError):
    """Lightning is not installed, or cannot be imported in this environment."""


def _torchvision_problem() -> str | None:
    """Return why torchvision fails to import, or ``None`` when it is absent or imports."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        importlib.import_module("torchvision")
    except Exception as exc:  # any failure here breaks torchmetrics, hence lightning
        return f"{type(exc).__name__}: {exc}"
    return None


def check_lightning_importable() -> None:
    """Raise :class:`LightningUnavailableError` with the fix when Lightning cannot be imported."""
    if importlib.util.find_spec("lightning") is None:
        raise LightningUnavailableError(
            "the training pieces need Lightning, which is not installed; install it with "
            "pip install 'deconcnn-curvature[lightning]'."
        )
    problem = _torchvision_problem()
    if problem is not None:
        import torch

        raise LightningUnavailableError(
            f"Lightning cannot be imported: torchvision is installed but does not load against "
            f"torch {torch.__version__} ({problem}), and torchmetrics, which Lightning imports, "
            f"imports torchvision whenever it is installed. deconcnn_curvature never needs "
            f"torchvision: run pip uninstall -y torchvision (or install the torchvision build "
            f"that matches your torch)."
        )


check_lightning_importable()

import lightning.pytorch as pl  # noqa: E402  (after the check, on purpose)
