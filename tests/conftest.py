"""Test-wide isolation: no third-party entry points, a fresh registry per test, default backend."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from checkpoint_helpers import HELPER_MODULE, install_helper_module

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


@pytest.fixture
def one_thread():
    """One torch thread for the test (restored after): tiny models and small dense matrices are
    fastest on one, and immune to a busy machine's oversubscription. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A temporary working folder holding the checkpoint helper module (importable, the current
    directory); a test file adds what it needs by overriding ``workdir`` and requesting it."""
    install_helper_module(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop(HELPER_MODULE, None)
