"""The backend contract: what a curvature backend declares and what it must implement.

A backend is a class. Everything a user or a front end needs to *choose* a backend is declared as
class attributes and read without instantiating it (listing backends never builds anything heavy
and never imports an optional dependency): its ``name``, the ``quantities`` it computes, whether it
is ``exact`` or stochastic, the distributions it ``requires`` and the command that installs them,
its ``options`` with defaults, and whether it supports a ``torch.distributed`` process group.

To *compute*, the host instantiates the class and calls :meth:`Backend.compute` with a validated
:class:`~deconcnn_curvature.problem.CurvatureProblem` (model, loss, data, trainable parameters, all
on one device) inside the state guard that restores the model and RNG afterwards. Backends never
parse strings or talk to Lightning or Click.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from deconcnn_curvature.errors import InvalidOptionError

if TYPE_CHECKING:
    from deconcnn_curvature.problem import CurvatureProblem
    from deconcnn_curvature.results import CurvatureResult

__all__ = ["HOST_ARGUMENTS", "HOST_OPTIONS", "QUANTITIES", "Availability", "Backend", "Option"]

#: Quantities the package knows about, with a one-line description each.
QUANTITIES: Mapping[str, str] = {
    "trace": "Hessian trace (float), with a standard error when stochastic",
    "eigenvalues": "top-k largest algebraic eigenvalues, descending (list of floats)",
    "density": "spectral density by stochastic Lanczos quadrature (nodes, weights summing to 1)",
    "layer_trace": "trace split by parameter tensor (dict name → float), summing to the trace",
    "diagonal": "the exact Hessian diagonal, shaped like the parameters (dict name → tensor)",
}


@dataclass(frozen=True)
class Option:
    """One backend option: its name, type, default, bounds and help text.

    ``quantities`` restricts the option to some quantities (empty: all). ``check`` validates a value
    and returns it converted to ``type`` or raises :class:`InvalidOptionError` saying what to pass.
    """

    name: str
    type: type
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    allow_none: bool = False
    min_exclusive: bool = False
    #: Quantities the option applies to (empty: all of the backend's quantities).
    quantities: frozenset[str] = frozenset()
    #: True for the option that is the HVP budget of the quantities it applies to (at most one
    #: per quantity). Front ends map their one budget setting (``num_hvps``) onto it.
    budget: bool = False
    #: The command-line flag of this option (``"-k"``, ``"--rtol"``, ``"--num-hvps"``), or None
    #: (set with ``-o name=value``). The CLI makes its flags from the built-in backends'
    #: declarations; a plugin's option is set by a built-in flag when it declares the same flag,
    #: is its backend's budget (``--num-hvps``) or has the built-in option's name.
    flag: str | None = None

    def check(self, value: Any, backend: str) -> Any:
        where = f"option {self.name!r} of backend {backend!r}"
        if value is None:
            if self.allow_none:
                return None
            raise InvalidOptionError(f"{where} must not be None ({self.help}).")
        if self.type is bool:
            if not isinstance(value, bool):
                raise InvalidOptionError(f"{where} must be true or false, got {value!r}.")
            return value
        # numbers.Real / Integral: NumPy scalars (what a config reader often gives) count too.
        if self.type is int:
            if (
                isinstance(value, bool | np.bool_)
                or not isinstance(value, numbers.Real)
                or not math.isfinite(float(value))
                or value != int(value)
            ):
                raise InvalidOptionError(f"{where} must be an integer, got {value!r}.")
            value = int(value)
        elif self.type is float:
            if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
                raise InvalidOptionError(f"{where} must be a number, got {value!r}.")
            value = float(value)
            if not math.isfinite(value):
                raise InvalidOptionError(f"{where} must be finite, got {value!r}.")
        elif not isinstance(value, self.type):
            raise InvalidOptionError(
                f"{where} must be of type {self.type.__name__}, got {type(value).__name__}."
            )
        if self.choices is not None and value not in self.choices:
            raise InvalidOptionError(
                f"{where} must be one of {', '.join(map(repr, self.choices))}; got {value!r}."
            )
        if self.min is not None and (
            value < self.min or (self.min_exclusive and value == self.min)
        ):
            op = ">" if self.min_exclusive else ">="
            raise InvalidOptionError(f"{where} must be {op} {self.min:g}, got {value!r}.")
        if self.max is not None and value > self.max:
            raise InvalidOptionError(f"{where} must be <= {self.max:g}, got {value!r}.")
        return value

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type.__name__,
            "default": self.default,
            "help": self.help,
            "min": self.min,
            "max": self.max,
            "choices": list(self.choices) if self.choices else None,
            "quantities": sorted(self.quantities),
            "budget": self.budget,
            "flag": self.flag,
        }


#: Arguments of the host (:func:`deconcnn_curvature.estimate`), not of any backend:
#: the host applies them around the backend's call (``eval_mode``: the mode the model is measured
#: in; besides it, ``seed`` and ``distributed`` are plain arguments of ``estimate``). A front end
#: may pass them with the backend options (``-o eval_mode=false``, ``backend_options``): the one
#: resolver (:meth:`Backend.resolve_options`) checks them, and the host takes them out before
#: :meth:`Backend.compute` sees the options.
HOST_OPTIONS: tuple[Option, ...] = (
    Option(
        "eval_mode",
        bool,
        True,
        "measure the model in eval mode (BatchNorm uses running statistics, Dropout off); "
        "false measures it in the mode it was handed over in",
    ),
)
HOST_OPTION_NAMES: frozenset[str] = frozenset(o.name for o in HOST_OPTIONS)

#: Every argument of the host (:func:`deconcnn_curvature.estimate`) a backend option
#: could be mistaken for, with what a backend reads instead. A backend may not declare an option
#: of these names (registration refuses it): the host applies them itself and never passes them
#: to :meth:`Backend.compute` as options, so such an option would silently never arrive.
HOST_ARGUMENTS: Mapping[str, str] = {
    "eval_mode": "compute() finds the mode the model is measured in as problem.eval_mode",
    "seed": "compute() receives the seed as its `seed` argument",
    "distributed": "declare supports_distributed = True; the host decides whether a call is "
    "collective",
}


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here; if not, ``reason`` and the ``install`` command."""

    available: bool
    reason: str | None = None
    install: str | None = None


class Backend(ABC):
    """Base class of every curvature backend (built-in or third-party)."""

    #: Unique registry name, e.g. ``"pyhessian"``.
    name: ClassVar[str]
    #: One line for ``deconcnn-curv list-backends``.
    description: ClassVar[str] = ""
    #: Quantities :meth:`compute` accepts (keys of :data:`QUANTITIES` or new ones).
    quantities: ClassVar[frozenset[str]]
    #: True when the backend's numbers are exact (up to floating point), False when stochastic.
    exact: ClassVar[bool] = False
    #: Importable module names this backend needs (checked with ``importlib.util.find_spec``).
    requires: ClassVar[tuple[str, ...]] = ()
    #: What to run when a requirement is missing.
    install_hint: ClassVar[str | None] = None
    #: Declared options, with defaults.
    options: ClassVar[tuple[Option, ...]] = ()
    #: Whether the backend is correct under an initialised ``torch.distributed`` process group.
    supports_distributed: ClassVar[bool] = False
    #: Per quantity, the other quantities one call for it also returns, in the result's ``also``
    #: (measured from the same products, with the options of both: a call for ``eigenvalues``
    #: that also returns the ``trace`` takes the trace's budget). A caller that wants both (the
    #: Lightning monitor) then makes one call, not two. E.g. ``{"eigenvalues": {"trace"}}``.
    also_computes: ClassVar[Mapping[str, frozenset[str]]] = {}

    @classmethod
    def availability(cls) -> Availability:
        """Whether this backend can run here.

        The default checks :attr:`requires` with ``importlib.util.find_spec`` (nothing imported)."""
        missing = [m for m in cls.requires if importlib.util.find_spec(m) is None]
        if missing:
            return Availability(
                False,
                reason=f"missing module(s): {', '.join(missing)}",
                install=cls.install_hint,
            )
        return Availability(True)

    @classmethod
    def option_map(cls) -> dict[str, Option]:
        """Every option a caller may give: the backend's and the host's (:data:`HOST_OPTIONS`;
        registration refuses a backend option named like one, see :data:`HOST_ARGUMENTS`)."""
        declared = {o.name: o for o in HOST_OPTIONS}
        declared.update({o.name: o for o in cls.options if o.name not in declared})
        return declared

    @classmethod
    def budget_option(cls, quantity: str) -> str | None:
        """The name of the option that is the HVP budget of ``quantity``: the one declared with
        ``budget=True``, else one named ``num_hvps`` (the package's one name for the budget);
        None when there is none (an exact backend)."""
        applying = [o for o in cls.options if not o.quantities or quantity in o.quantities]
        found = next((o for o in applying if o.budget), None)
        found = found or next((o for o in applying if o.name == "num_hvps"), None)
        return None if found is None else found.name

    @classmethod
    def applies(cls, name: str, quantity: str) -> bool:
        """Whether option ``name`` (the backend's or the host's) is taken by a call for
        ``quantity``: declared for it, for every quantity, or for a quantity the call also
        returns (:attr:`also_computes`). The one rule of :meth:`resolve_options` and the CLI."""
        option = cls.option_map().get(name)
        served = {quantity, *cls.also_computes.get(quantity, ())}
        return option is not None and (not option.quantities or bool(served & option.quantities))

    @classmethod
    def resolve_options(cls, quantity: str, given: Mapping[str, Any]) -> dict[str, Any]:
        """Check user options against the declaration and fill in defaults for ``quantity``."""
        declared = cls.option_map()
        unknown = sorted(set(given) - set(declared))
        host = [name for name in unknown if name in HOST_ARGUMENTS]
        if host:
            raise InvalidOptionError(
                f"{host[0]!r} is not an option of backend {cls.name!r} but an argument of the "
                f"host: pass it as estimate(..., {host[0]}=...)."
            )
        if unknown:
            known = ", ".join(sorted(declared)) or "(none)"
            raise InvalidOptionError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for backend {cls.name!r}; "
                f"its options are: {known}."
            )
        resolved = {}
        for name, opt in declared.items():
            applies = cls.applies(name, quantity)
            if name in given and not applies:
                raise InvalidOptionError(
                    f"option {name!r} of backend {cls.name!r} applies to "
                    f"{', '.join(sorted(opt.quantities))} only, not to {quantity!r}; drop it."
                )
            if applies:
                resolved[name] = opt.check(given[name], cls.name) if name in given else opt.default
        return resolved

    @classmethod
    def validate_model(cls, model: Any) -> None:
        """Raise :class:`~deconcnn_curvature.errors.UnsupportedModelError` before any work if the
        backend cannot handle ``model``. The default accepts every model."""
        return None

    @abstractmethod
    def compute(
        self,
        problem: CurvatureProblem,
        quantity: str,
        *,
        seed: int,
        options: Mapping[str, Any],
    ) -> CurvatureResult:
        """Compute ``quantity`` for ``problem``; ``options`` are already validated and complete
        (the backend's own: the host's arguments, :data:`HOST_OPTIONS`, are not among them)."""


def describe(backend: type[Backend]) -> dict[str, Any]:
    """The declared facts of a backend class, JSON-serialisable (no instantiation)."""
    avail = backend.availability()
    return {
        "name": backend.name,
        "description": backend.description,
        "quantities": sorted(backend.quantities),
        "exact": backend.exact,
        "requires": list(backend.requires),
        "available": avail.available,
        "reason": avail.reason,
        "install": avail.install,
        "distributed": backend.supports_distributed,
        "options": [o.to_dict() for o in backend.options],
        "host_options": [o.to_dict() for o in HOST_OPTIONS],
    }
