"""Test-wide isolation: no third-party entry points, a fresh registry per test, default backend."""

from __future__ import annotations

import pytest

from deconcnn_curvature.registry import reset_registry


@pytest.fixture(autouse=True)
def _isolated_plugins(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DECONCNN_CURVATURE_PLUGINS", "")
    monkeypatch.delenv("DECONCNN_CURVATURE_BACKEND", raising=False)
    monkeypatch.delenv("DECONCNN_CURVATURE_TRACE", raising=False)
    reset_registry()
    yield
    reset_registry()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    # A process group spawns interpreters: every `distributed` test is also `slow`, so the quick
    # tier (`pytest -m "not slow"`) stays quick without each test having to say so.
    for item in items:
        if item.get_closest_marker("distributed") is not None:
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
