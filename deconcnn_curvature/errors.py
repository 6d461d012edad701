"""Every error this package raises on purpose derives from :class:`CurvatureError`.

Messages follow one rule: say what was wrong (with the value received) and how to fix it. Front
ends (the CLI, the Lightning callback) catch :class:`CurvatureError` and show its message without a
traceback; anything else is a bug in this package or in a plugin.
"""

from __future__ import annotations

__all__ = [
    "BackendFailedError",
    "BackendUnavailableError",
    "ConfigurationError",
    "CurvatureError",
    "DuplicateBackendError",
    "InvalidOptionError",
    "InvalidProblemError",
    "NonFiniteError",
    "PluginError",
    "UnknownBackendError",
    "UnsupportedModelError",
    "UnsupportedQuantityError",
]


class CurvatureError(Exception):
    """Base class of every error raised by deconcnn_curvature on purpose."""


class ConfigurationError(CurvatureError, ValueError):
    """A configuration value (a front end's setting) is invalid."""


class InvalidOptionError(CurvatureError, ValueError):
    """An option passed to a backend is unknown or out of range."""


class InvalidProblemError(CurvatureError, ValueError):
    """The model, loss or data do not form a measurable problem (e.g. no trainable parameters)."""


class NonFiniteError(CurvatureError, ArithmeticError):
    """The loss or a Hessian-vector product is NaN or infinite; we refuse to report a number."""


class UnknownBackendError(CurvatureError, LookupError):
    """No backend of that name is registered."""


class UnsupportedQuantityError(CurvatureError, ValueError):
    """The chosen backend cannot compute the requested quantity."""


class BackendUnavailableError(CurvatureError, RuntimeError):
    """The backend is registered but cannot run here (a dependency is missing)."""


class UnsupportedModelError(CurvatureError, ValueError):
    """The backend cannot handle this model (e.g. a layer it does not support)."""


class BackendFailedError(CurvatureError, RuntimeError):
    """A backend failed while computing (wraps the underlying error, kept as ``__cause__``)."""


class PluginError(CurvatureError, RuntimeError):
    """A plugin is broken: it failed to import, its hook raised, or it registered something bad."""


class DuplicateBackendError(PluginError):
    """Two plugins registered a backend under the same name."""
