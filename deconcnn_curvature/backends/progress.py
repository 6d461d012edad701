"""Where a front end listens to a running measurement: the per-product callback of the estimators.

The estimators (:mod:`deconcnn_curvature.linalg`) take an ``on_product`` argument and know nothing
of who listens. A front end (the ``estimate`` command's progress line and its partial result on an
interrupt) cannot pass arguments through :func:`deconcnn_curvature.estimate` to them, so it sets
a listener for a block with :func:`trace_progress`, and the backends hand :func:`listener` to
the estimators they call.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from deconcnn_curvature.linalg.probes import OnProduct

__all__ = ["listener", "trace_progress"]

_listener: contextvars.ContextVar[OnProduct | None] = contextvars.ContextVar(
    "deconcnn_curvature_trace_progress", default=None
)


@contextlib.contextmanager
def trace_progress(callback: OnProduct) -> Iterator[None]:
    """Within this block, every trace estimate a backend makes (Hutchinson, the deflated probes
    of Hutch++) calls ``callback(TraceProgress)`` after each block of products. The callback runs
    in the estimator's thread, so it should be quick; an exception it raises ends the estimate
    (the backend restores the model's state on the way out)."""
    token = _listener.set(callback)
    try:
        yield
    finally:
        _listener.reset(token)


def listener() -> OnProduct | None:
    """The callback set by the innermost :func:`trace_progress` block, if any."""
    return _listener.get()
