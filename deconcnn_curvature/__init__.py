"""deconcnn_curvature: curvature of a network's loss (trace, top eigenvalues, spectral density)
during and after training, through a pluggy registry of backends.

>>> import deconcnn_curvature as dcc
>>> dcc.list_backends()                                   # doctest: +SKIP
>>> r = dcc.estimate(model, loss_fn, (x, y), quantity="trace", backend="pyhessian", seed=0)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from deconcnn_curvature.api import (
    compare,
    density,
    estimate,
    get_backend,
    list_backends,
    resolve,
)
from deconcnn_curvature.backend import QUANTITIES, Availability, Backend, Option
from deconcnn_curvature.errors import (
    BackendFailedError,
    BackendUnavailableError,
    ConfigurationError,
    CurvatureError,
    DuplicateBackendError,
    InvalidOptionError,
    InvalidProblemError,
    NonFiniteError,
    PluginError,
    UnknownBackendError,
    UnsupportedModelError,
    UnsupportedQuantityError,
)
from deconcnn_curvature.hookspecs import hookimpl
from deconcnn_curvature.hvp import HessianOperator
from deconcnn_curvature.problem import CurvatureProblem
from deconcnn_curvature.results import CurvatureResult, Density

if TYPE_CHECKING:
    from deconcnn_curvature.monitor import CurvatureMonitor

try:
    __version__ = version("deconcnn-curvature")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = [
    "QUANTITIES",
    "Availability",
    "Backend",
    "BackendFailedError",
    "BackendUnavailableError",
    "ConfigurationError",
    "CurvatureError",
    "CurvatureMonitor",
    "CurvatureProblem",
    "CurvatureResult",
    "Density",
    "DuplicateBackendError",
    "HessianOperator",
    "InvalidOptionError",
    "InvalidProblemError",
    "NonFiniteError",
    "Option",
    "PluginError",
    "UnknownBackendError",
    "UnsupportedModelError",
    "UnsupportedQuantityError",
    "__version__",
    "compare",
    "density",
    "estimate",
    "get_backend",
    "hookimpl",
    "list_backends",
    "resolve",
]


def __getattr__(name: str) -> Any:
    # Lightning is an optional extra: import the callback only when it is asked for.
    if name == "CurvatureMonitor":
        from deconcnn_curvature.monitor import CurvatureMonitor

        return CurvatureMonitor
    raise AttributeError(f"module 'deconcnn_curvature' has no attribute {name!r}")
