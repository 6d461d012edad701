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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from deconcnn_curvature.errors import InvalidOptionError

if TYPE_CHECKING:
    from deconcnn_curvature.problem import CurvatureProblem
    from deconcnn_curvature.results import CurvatureResult

__all__ = [
    "HOST_ARGUMENTS",
    "QUANTITIES",
    "Availability",
    "Backend",
    "Call",
    "HostArgument",
    "Option",
    "Plan",
    "Unused",
    "plan_calls",
]

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
        }


@dataclass(frozen=True)
class HostArgument:
    """An argument of the host (:func:`deconcnn_curvature.estimate`), not of any backend: the
    host applies it around the backend's call and never passes it to :meth:`Backend.compute` as
    an option. ``instead``: where a backend finds it."""

    name: str
    default: Any
    help: str
    instead: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "default": self.default, "help": self.help}


#: The host's arguments, the one table: every front end passes them as arguments
#: (``estimate(..., eval_mode=False)``, the monitor's ``eval_mode`` setting, the CLI's
#: ``--seed``), never among the backend options; a backend may not declare an option of these
#: names (registration refuses it, saying what to read instead), and the router refuses one given
#: as an option, saying how the front end sets it.
HOST_ARGUMENTS: Mapping[str, HostArgument] = {
    a.name: a
    for a in (
        HostArgument(
            "eval_mode",
            True,
            "measure the model in eval mode (BatchNorm uses running statistics, Dropout off); "
            "false measures it in the mode it was handed over in",
            "compute() finds the mode the model is measured in as problem.eval_mode",
        ),
        HostArgument(
            "seed",
            0,
            "seeds the probes (None: a fresh random seed, recorded in the result)",
            "compute() receives the seed as its `seed` argument",
        ),
        HostArgument(
            "distributed",
            None,
            "under a process group: None/True a collective call, False this process's data alone",
            "declare supports_distributed = True; the host decides whether a call is collective",
        ),
    )
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
        """The backend's options by name (registration refuses one named like a host argument,
        see :data:`HOST_ARGUMENTS`)."""
        return {o.name: o for o in cls.options}

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
        """Whether option ``name`` is taken by a call for ``quantity``: declared for it, for every
        quantity, or for a quantity the call also returns (:attr:`also_computes`). The one rule
        of :meth:`resolve_options` and :func:`plan_calls`."""
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
    def check_call(cls, quantity: str, options: Mapping[str, Any], *, eval_mode: bool) -> None:
        """Refuse, before any work, resolved ``options`` that cannot work with the host's
        arguments (raise :class:`InvalidOptionError`); the default accepts every combination."""
        return None

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
        (the backend's own: the host's arguments, :data:`HOST_ARGUMENTS`, are not among them)."""


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
        "host_arguments": [a.to_dict() for a in HOST_ARGUMENTS.values()],
    }


# --------------------------------------------------------------------------------------------
# the router: which backend options each call of a front end gets


@dataclass(frozen=True)
class Call:
    """One :func:`~deconcnn_curvature.estimate` call of a :class:`Plan`: the ``quantity`` asked
    for, the ``options`` given to it (the backend fills in its defaults) and the quantities its
    result ``records``: the quantity first, then the asked-for ones it also returns
    (:attr:`Backend.also_computes`, in its ``also``)."""

    quantity: str
    options: Mapping[str, Any]
    records: tuple[str, ...]


@dataclass(frozen=True)
class Unused:
    """A setting or option the front end gave that no call of the plan takes: how the front end
    names it (``setting``) and the one-line ``reason``."""

    setting: str
    reason: str
    #: ``"not asked"``: no asked-for quantity takes it (``k`` without eigenvalues);
    #: ``"exact"``: an exact backend has nothing to spend it on; ``"cannot"``: the backend
    #: computes what it applies to but cannot honour it (no budget option, no ``k``).
    kind: str = "not asked"


@dataclass(frozen=True)
class Plan:
    """What :func:`plan_calls` decided: the ``calls`` to make, in order, and what went unused."""

    backend: type[Backend]
    calls: tuple[Call, ...]
    unused: tuple[Unused, ...] = ()

    def call_for(self, quantity: str) -> Call:
        """The call whose result records ``quantity``."""
        return next(c for c in self.calls if quantity in c.records)

    def resolve(self) -> dict[str, dict[str, Any]]:
        """Per recorded quantity, the complete options it is measured with (values checked,
        defaults filled in by :meth:`Backend.resolve_options`): a quantity recorded from
        another's call gets the options of that call that apply to it."""
        cls = self.backend
        resolved: dict[str, dict[str, Any]] = {}
        for call in self.calls:
            for quantity in call.records:
                given = {n: v for n, v in call.options.items() if cls.applies(n, quantity)}
                resolved[quantity] = cls.resolve_options(quantity, given)
        return resolved


def _joint_calls(cls: type[Backend], quantities: tuple[str, ...]) -> list[tuple[str, tuple]]:
    """One call per quantity, except a quantity another asked-for call also returns."""
    served_by: dict[str, str] = {}
    for quantity in quantities:
        for other in sorted(cls.also_computes.get(quantity, ())):
            if other in quantities and other != quantity and quantity not in served_by:
                served_by.setdefault(other, quantity)
    return [
        (q, (q, *(r for r in quantities if served_by.get(r) == q)))
        for q in quantities
        if q not in served_by
    ]


class _Router:
    """The state of one :func:`plan_calls` (kept apart so each rule reads as one method).

    A setting is named ``"num_hvps"``, ``"rtol"``, ``"k"`` or ``"data_groups"``; a backend
    option given by name is ``"-o NAME"`` internally and spelt ``option_label.format(NAME)``."""

    def __init__(
        self,
        cls: type[Backend],
        quantities: tuple[str, ...],
        labels: Mapping[str, str],
        option_label: str,
        host_hint: Callable[[str], str] | None,
        strict: Mapping[str, bool],
    ) -> None:
        self.cls = cls
        self.quantities = quantities
        self.labels = labels
        self.option_label = option_label
        self.host_hint = host_hint
        self.strict = strict
        self.calls = _joint_calls(cls, quantities)
        self.options: dict[str, dict[str, Any]] = {q: {} for q, _ in self.calls}
        self.given_as: dict[tuple[str, str], str] = {}
        self.unused: list[Unused] = []

    def label(self, setting: str) -> str:
        """How the front end spells ``setting``."""
        if setting.startswith("-o "):
            return self.option_label.format(setting[3:])
        return self.labels.get(setting, setting)

    def set(self, quantity: str, name: str, value: Any, setting: str) -> None:
        earlier = self.given_as.get((quantity, name))
        if earlier is not None and earlier != setting:
            raise InvalidOptionError(
                f"option {name!r} of backend {self.cls.name!r} is given twice "
                f"({self.label(earlier)} and {self.label(setting)}); give it once."
            )
        self.given_as[(quantity, name)] = setting
        self.options[quantity][name] = value

    def cannot(self, setting: str, reason: str) -> None:
        """The backend computes what ``setting`` applies to but cannot honour it: refused
        (strict) or reported unused."""
        if self.strict["options" if setting.startswith("-o ") else "settings"]:
            raise InvalidOptionError(reason)
        self.unused.append(Unused(self.label(setting), reason, "cannot"))

    def not_taken(self, setting: str, name: str, why: str = "") -> None:
        """``setting`` (option ``name``) reaches no call: refused (strict) or reported unused."""
        cls, asked = self.cls, ", ".join(map(repr, self.quantities))
        label = self.label(setting)
        option = cls.option_map().get(name)
        if option is not None and option.quantities:
            where = f"{label}: " if label != name else ""
            reason = (
                f"{where}option {name!r} of backend {cls.name!r} applies to "
                f"{', '.join(sorted(option.quantities))} only, not to {asked}"
            )
        else:
            names = {n for q, _ in self.calls for n in cls.option_map() if cls.applies(n, q)}
            reason = (
                f"{label} does not apply to {asked} with backend {cls.name!r}{why}; its options "
                f"for {asked} are: {', '.join(sorted(names)) or '(none)'}"
            )
        if self.strict["options" if setting.startswith("-o ") else "settings"]:
            raise InvalidOptionError(f"{reason}; drop it or choose another backend.")
        kind = "exact" if why else "not asked"
        self.unused.append(Unused(label, f"{reason}; it is ignored.", kind))

    def host_argument(self, name: str) -> InvalidOptionError:
        hint = self.host_hint(name) if self.host_hint else f"pass it as estimate(..., {name}=...)"
        label = self.label(f"-o {name}")
        where = f"{label}: " if label != name else ""
        return InvalidOptionError(
            f"{where}{name!r} is not a backend option but an argument of the host: {hint}."
        )

    def route_options(self, options: Mapping[str, Any]) -> None:
        """Each backend option to every call it applies to (:meth:`Backend.applies`)."""
        declared = self.cls.option_map()
        for name, value in options.items():
            if name in HOST_ARGUMENTS:
                raise self.host_argument(name)
            setting = f"-o {name}"
            if name not in declared and self.strict["options"]:
                label = self.label(setting)
                where = f"{label}: " if label != name else ""
                raise InvalidOptionError(
                    f"{where}unknown option(s) {name!r} for backend {self.cls.name!r}; its "
                    f"options are: {', '.join(sorted(declared)) or '(none)'}."
                )
            takers = [q for q, _ in self.calls if self.cls.applies(name, q)]
            if not takers:
                self.not_taken(setting, name)
            for quantity in takers:
                self.set(quantity, name, value, setting)

    def route_budget(self, setting: str, value: Any) -> None:
        """``num_hvps`` (the budget, under each backend's own name) or ``rtol``: to every call
        that takes it; a stochastic backend whose trace call cannot take it refuses it."""
        cls, taken = self.cls, False
        for quantity, _ in self.calls:
            served = (quantity, *sorted(cls.also_computes.get(quantity, ())))
            if setting == "num_hvps":
                target = next(filter(None, map(cls.budget_option, served)), None)
            else:
                target = setting if cls.applies(setting, quantity) else None
            if target is not None:
                self.set(quantity, target, value, setting)
                taken = True
            elif "trace" in served and not cls.exact:
                what = "probe-budget option" if setting == "num_hvps" else f"{setting!r} option"
                return self.cannot(
                    setting,
                    f"backend {cls.name!r} declares no {what} for the trace, so "
                    f"{self.label(setting)}={value} cannot be honoured; leave it unset or "
                    "choose another backend.",
                )
        if not taken:
            exact = " (an exact backend has no probe budget)" if cls.exact else ""
            self.not_taken(setting, setting, exact)

    def route_k(self, k: int) -> None:
        takers = [q for q, _ in self.calls if self.cls.applies("k", q)]
        for quantity in takers:
            self.set(quantity, "k", k, "k")
        if takers:
            return
        if "eigenvalues" in self.quantities:
            if k != 1:
                self.cannot(
                    "k",
                    f"backend {self.cls.name!r} has no 'k' option for eigenvalues (it gives the "
                    f"largest only), so {self.label('k')}={k} cannot be honoured; ask for 1 or "
                    "choose another backend.",
                )
            return
        self.not_taken("k", "k")

    def route_data_groups(self, groups: int) -> None:
        takers = [q for q, _ in self.calls if self.cls.applies("data_groups", q)]
        for quantity in takers:
            self.set(quantity, "data_groups", groups, "data_groups")
        if not takers:
            self.not_taken("data_groups", "data_groups")


def plan_calls(
    cls: type[Backend],
    quantities: Sequence[str],
    *,
    num_hvps: int | None = None,
    rtol: float | None = None,
    k: int | None = None,
    data_groups: int | None = None,
    options: Mapping[str, Any] | None = None,
    labels: Mapping[str, str] | None = None,
    option_label: str = "{}",
    host_hint: Callable[[str], str] | None = None,
    strict: bool = True,
    strict_settings: bool | None = None,
) -> Plan:
    """Decide which backend options each call gets: the one router every front end calls (the
    API, ``compare``, ``density``, the Lightning monitor, the CLI). A pure function, cheap
    enough to call per measurement; values are checked later, by :meth:`Plan.resolve` or by
    :func:`~deconcnn_curvature.estimate`.

    ``quantities``: one call each, except that a quantity another asked-for call also returns
    (:attr:`Backend.also_computes`: ``hutchpp``'s eigenvalues call returns the trace) is recorded
    from that call, which takes the options of both. The settings (``None``: not given):

    ============== ================================================================================
    ``num_hvps``   the budget, under each call's budget option (:meth:`Backend.budget_option`,
                   its own quantity's or that of a quantity it also returns); refused when a
                   stochastic backend's trace call has none
    ``rtol``       to every call declaring ``rtol``; refused likewise
    ``k``          to every call declaring ``k``; ``k > 1`` refused where eigenvalues are asked
                   of a backend without it (it gives the largest only)
    ``data_groups``to every call declaring ``data_groups``
    ``options``    other backend options by name, to every call they apply to; a host argument
                   (:data:`HOST_ARGUMENTS`) among them is refused, saying how to set it
                   (``host_hint(name)``; default: as an argument of ``estimate``)
    ============== ================================================================================

    A setting or option no call takes (``k`` without eigenvalues, the budget of an exact backend,
    an unknown option name) is refused (``strict``; ``strict_settings`` for the four settings,
    default ``strict``) or listed in :attr:`Plan.unused` with the reason. ``labels`` name the
    settings in the messages as the front end spells them (``{"num_hvps": "--num-hvps"}``),
    ``option_label`` an option (``"-o {}"``). The same option given twice (a setting and the
    option it maps to) is refused.
    """
    strict_map = {
        "options": strict,
        "settings": strict if strict_settings is None else strict_settings,
    }
    asked = tuple(dict.fromkeys(quantities))
    router = _Router(cls, asked, labels or {}, option_label, host_hint, strict_map)
    router.route_options(options or {})
    if num_hvps is not None:
        router.route_budget("num_hvps", num_hvps)
    if rtol is not None:
        router.route_budget("rtol", rtol)
    if k is not None:
        router.route_k(k)
    if data_groups is not None:
        router.route_data_groups(data_groups)
    calls = tuple(Call(q, router.options[q], records) for q, records in router.calls)
    return Plan(cls, calls, tuple(router.unused))
