"""The cadence advice: points per run at a cadence, and the docs' numbers for deconCNN's run."""

from __future__ import annotations

from pathlib import Path

import pytest

from deconcnn_curvature.analysis import cadence_for

DOCS = Path(__file__).resolve().parents[2] / "docs" / "sweeps.md"
CIFAR_50_EPOCHS = 50 * 391  # batch 128: 391 steps per epoch


@pytest.mark.parametrize(
    ("steps", "zero"), [(19550, False), (19550, True), (96, False), (1000, True)]
)
def test_cadence_is_the_largest_giving_enough_points(steps: int, zero: bool) -> None:
    cadence = cadence_for(100, steps, at_step_zero=zero)
    points = lambda c: steps // c + (1 if zero else 0)  # noqa: E731
    if cadence == 0:
        assert points(1) < 100
    else:
        assert points(cadence) >= 100 and points(cadence + 1) < 100


def test_docs_state_the_numbers_the_function_gives() -> None:
    text = DOCS.read_text(encoding="utf-8")
    assert CIFAR_50_EPOCHS // 500 == 39 and "| 500 (deconCNN's default) | 39 |" in text
    assert cadence_for(100, CIFAR_50_EPOCHS) == 195
    assert cadence_for(100, CIFAR_50_EPOCHS, at_step_zero=True) == 197
    assert "`curvature.compute_every_n_steps=195`" in text and "(197 with" in text
    for cadence, points in ((250, 78), (200, 97), (195, 100)):
        assert CIFAR_50_EPOCHS // cadence == points
