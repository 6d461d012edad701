"""Shared set-up of the estimators' tests on small dense matrices."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # Small dense matrices: one BLAS thread is fastest and immune to a busy machine's contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
