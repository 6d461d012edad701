"""Shared set-up of the estimators' tests on small dense matrices: one torch thread
(``one_thread`` in ``tests/conftest.py``)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
