"""Backend lookup by name, built once from the plugins: did-you-mean and duplicate detection."""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from deconcnn_curvature.backend import HOST_ARGUMENTS, Backend, Option, describe
from deconcnn_curvature.errors import (
    DuplicateBackendError,
    PluginError,
    UnknownBackendError,
    UnsupportedQuantityError,
)
from deconcnn_curvature.plugins import (
    BUILTIN_PLUGINS,
    BrokenPlugin,
    describe_error,
    load_plugins,
    reraise_interrupt,
)

__all__ = [
    "DEFAULT_BACKEND",
    "ENV_BACKEND",
    "BackendEntry",
    "Flag",
    "Registry",
    "builtin_backends",
    "builtin_flags",
    "default_backend_name",
    "get_registry",
    "reset_registry",
    "set_registry",
]

ENV_BACKEND = "DECONCNN_CURVATURE_BACKEND"
DEFAULT_BACKEND = "pyhessian"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_\-]*$")


def default_backend_name() -> str:
    """The backend used when none is named: ``$DECONCNN_CURVATURE_BACKEND`` or ``pyhessian``."""
    return os.environ.get(ENV_BACKEND) or DEFAULT_BACKEND


@dataclass(frozen=True)
class BackendEntry:
    cls: type[Backend]
    plugin: str


@dataclass
class Registry:
    """Backends by name, the plugin that registered each, conflicts and broken plugins."""

    entries: dict[str, BackendEntry] = field(default_factory=dict)
    conflicts: dict[str, list[str]] = field(default_factory=dict)
    broken: list[BrokenPlugin] = field(default_factory=list)
    manager: Any = None

    # -- building -----------------------------------------------------------------------------
    def _register(self, cls: Any, plugin: str) -> None:
        if not (inspect.isclass(cls) and issubclass(cls, Backend)):
            raise PluginError(
                f"plugin {plugin!r} registered {cls!r}, which is not a subclass of "
                "deconcnn_curvature.Backend."
            )
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise PluginError(
                f"plugin {plugin!r} registered {cls.__qualname__} with invalid name {name!r}; use "
                "lower-case letters, digits, '_' or '-', starting with a letter."
            )
        if inspect.isabstract(cls):
            missing = ", ".join(sorted(cls.__abstractmethods__))
            raise PluginError(
                f"plugin {plugin!r} registered backend {name!r} ({cls.__qualname__}) without "
                f"implementing: {missing}."
            )
        quantities = getattr(cls, "quantities", None)
        if not quantities or not all(isinstance(q, str) for q in quantities):
            raise PluginError(
                f"plugin {plugin!r} registered backend {name!r} without a non-empty set of "
                "quantity names in `quantities`."
            )
        _check_declared_options(cls, name, plugin)
        if name in self.entries:
            # Not raised: the plugin's other backends must still register. The name is ambiguous
            # from now on; selecting it raises DuplicateBackendError naming every plugin.
            first = self.entries[name].plugin
            self.conflicts.setdefault(name, [first]).append(plugin)
            self.broken.append(
                BrokenPlugin(
                    plugin,
                    f"backend name {name!r} is registered by both {first!r} and {plugin!r}; "
                    "rename one of them (selecting this name fails until then).",
                    "register_backends",
                )
            )
            return
        self.entries[name] = BackendEntry(cls, plugin)

    @classmethod
    def build(cls, extra_plugins: tuple[object, ...] = ()) -> Registry:
        loaded = load_plugins(extra_plugins)
        pm = loaded.manager
        reg = cls(broken=list(loaded.broken), manager=pm)
        # Registration order (built-ins, then entry points, then extras), not get_plugins()'s set
        # order: which plugin counts as "first" for a duplicate name must not vary between runs.
        plugins = [(n, p) for n, p in pm.list_name_plugin() if p is not None]
        for pname, plugin in plugins:
            if not any(impl.plugin is plugin for impl in pm.hook.register_backends.get_hookimpls()):
                continue
            others = [p for _, p in plugins if p is not plugin]
            call = pm.subset_hook_caller("register_backends", remove_plugins=others)
            try:
                returned = call(register=lambda backend, _p=pname: reg._register(backend, _p))
            except BaseException as exc:  # keep every other plugin working (sys.exit() too)
                reraise_interrupt(exc)
                if pname.startswith("builtin:"):
                    raise
                reg.broken.append(BrokenPlugin(pname, describe_error(exc), "register_backends"))
                continue
            if returned:  # pluggy collects the non-None return values
                reg.broken.append(BrokenPlugin(pname, _returned(returned), "register_backends"))
        return reg

    # -- lookup -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self.entries)

    def get(self, name: str) -> type[Backend]:
        """The backend class registered as ``name`` (errors say what to do otherwise)."""
        if name in self.conflicts:
            raise DuplicateBackendError(
                f"backend name {name!r} is registered by several plugins "
                f"({', '.join(map(repr, self.conflicts[name]))}); uninstall or rename one of them."
            )
        if name not in self.entries:
            known = self.names()
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownBackendError(
                f"unknown backend {name!r}.{hint} Known backends: {', '.join(known) or '(none)'}. "
                "Run `deconcnn-curv list-backends` to see them and whether they are available."
            )
        return self.entries[name].cls

    def supporting(self, quantity: str) -> list[str]:
        return [n for n in self.names() if quantity in self.entries[n].cls.quantities]

    def check_quantity(self, backend: type[Backend], quantity: str) -> None:
        if quantity not in backend.quantities:
            others = self.supporting(quantity)
            alt = (
                f" Backends that compute it: {', '.join(others)}."
                if others
                else " No registered backend computes it."
            )
            raise UnsupportedQuantityError(
                f"backend {backend.name!r} cannot compute quantity {quantity!r} (it computes: "
                f"{', '.join(sorted(backend.quantities))}).{alt}"
            )

    def describe_all(self) -> list[dict[str, Any]]:
        rows = []
        for name in self.names():
            cls = self.entries[name].cls
            info = describe(cls)
            info["plugin"] = self.entries[name].plugin
            # The command-line flag that sets each option (a plugin's option too), if any.
            for row, option in zip(info["options"], cls.options, strict=True):
                row["flag"] = flag_of(cls, option)
            if name in self.conflicts:
                info["available"] = False
                info["reason"] = "name registered by several plugins: " + ", ".join(
                    self.conflicts[name]
                )
            rows.append(info)
        return rows


def _check_declared_options(cls: type[Backend], name: str, plugin: str) -> None:
    """A backend's ``options`` are :class:`Option` values with distinct names, none
    named like an argument of the host (``eval_mode``, ``seed``, ``distributed``): the host
    applies those itself and never hands them to ``compute`` as options, so a backend declaring
    one would be told it has an option that never arrives (or, for ``seed``, one no caller can
    pass)."""
    where = f"plugin {plugin!r} registered backend {name!r}"
    options = getattr(cls, "options", ())
    if not isinstance(options, tuple | list) or not all(isinstance(o, Option) for o in options):
        raise PluginError(f"{where} whose `options` is not a tuple of deconcnn_curvature.Option.")
    seen: set[str] = set()
    for option in options:
        if option.name in HOST_ARGUMENTS:
            raise PluginError(
                f"{where} declaring option {option.name!r}, which is an argument of the host "
                f"(estimate(..., {option.name}=...)), not of a backend: the host applies it and "
                f"never passes it to compute() as an option. Remove it from `options`; "
                f"{HOST_ARGUMENTS[option.name]}."
            )
        if option.name in seen:
            raise PluginError(f"{where} declaring option {option.name!r} twice.")
        seen.add(option.name)


# --------------------------------------------------------------------------------------------
# command-line flags, from the built-in backends' declarations


@functools.cache
def builtin_backends() -> tuple[type[Backend], ...]:
    """The built-in backend classes, as their modules register them through the public
    ``register_backends`` hook (modules imported, nothing instantiated, no optional dependency
    imported; no entry point loaded)."""
    found: list[type[Backend]] = []
    for modname in BUILTIN_PLUGINS:
        if modname.startswith("deconcnn_curvature.backends."):
            importlib.import_module(modname).register_backends(register=found.append)
    return tuple(found)


@dataclass(frozen=True)
class Flag:
    """One command-line flag made from the built-in declarations of an option.

    ``option`` carries the flag's type, bounds, choices and help: where built-in backends declare
    the option differently, the loosest bounds (each backend's own :meth:`Option.check` then
    refuses what it does not take, with its reason) and each backend's help. ``budget``: the
    flag sets each backend's budget option (:meth:`Backend.budget_option`), whatever its name.
    """

    flag: str
    option: Option
    budget: bool
    sources: tuple[tuple[str, Option], ...]

    @property
    def dest(self) -> str:
        """The Python name of the flag's value (the built-in option's name)."""
        return self.option.name

    def target(self, cls: type[Backend], quantity: str) -> str:
        """The option of ``cls`` this flag sets for ``quantity`` (applicable or not: the caller
        says when it does not apply): one declaring this flag, else the backend's budget option
        (the budget flag), else the option of the built-in name."""
        declared = [o for o in cls.options if o.flag == self.flag]
        applying = [o for o in declared if not o.quantities or quantity in o.quantities]
        if applying or declared:
            return (applying or declared)[0].name
        if self.budget:  # a call that also returns the trace takes the trace's budget
            served = (quantity, *sorted(cls.also_computes.get(quantity, ())))
            return next(filter(None, map(cls.budget_option, served)), self.dest)
        return self.dest


def _merge(flag: str, sources: list[tuple[str, Option]]) -> Flag:
    options = [o for _, o in sources]
    first = options[0]
    names = {o.name for o in options}
    types = {o.type for o in options}
    budget = {o.budget for o in options}
    if len(types) > 1 or len(budget) > 1 or (len(names) > 1 and budget != {True}):
        raise AssertionError(  # a bug in the built-in declarations, caught by the test suite
            f"built-in backends declare flag {flag} for different options: {sources}"
        )
    mins = [(o.min, o.min_exclusive) for o in options]
    lowest = None if any(m is None for m, _ in mins) else min(mins, key=lambda m: (m[0], m[1]))
    maxes = [o.max for o in options]
    helps = list(dict.fromkeys(o.help for o in options))
    text = (
        helps[0]
        if len(helps) == 1
        else "; ".join(f"{b}: {o.help}" for b, o in sources if o.help in helps)
    )
    choices = None
    if all(o.choices is not None for o in options):
        choices = tuple(dict.fromkeys(c for o in options for c in o.choices or ()))
    merged = Option(
        first.name if len(names) == 1 else "num_hvps",
        first.type,
        None,
        text,
        min=None if lowest is None else lowest[0],
        max=None if any(m is None for m in maxes) else max(m for m in maxes if m is not None),
        choices=choices,
        allow_none=True,
        min_exclusive=False if lowest is None else lowest[1],
        budget=first.budget,
        flag=flag,
    )
    return Flag(flag, merged, first.budget, tuple(sources))


@functools.cache
def builtin_flags() -> Mapping[str, Flag]:
    """The flags (``"-k"``, ``"--num-hvps"``, ...) the built-in backends declare, by flag."""
    by_flag: dict[str, list[tuple[str, Option]]] = {}
    for cls in builtin_backends():
        for option in cls.options:
            if option.flag is not None:
                by_flag.setdefault(option.flag, []).append((cls.name, option))
    return {flag: _merge(flag, sources) for flag, sources in by_flag.items()}


def flag_of(cls: type[Backend], option: Option) -> str | None:
    """The command-line flag that sets ``option`` of ``cls``, or None (then ``-o name=value``)."""
    flags = builtin_flags()
    if option.flag in flags:
        return option.flag
    for flag in flags.values():
        if any(o.flag == flag.flag for o in cls.options):
            continue  # the flag sets the backend's own option declaring it
        if (flag.budget and option.budget) or option.name == flag.dest:
            return flag.flag
    return None


def _returned(values: list[Any]) -> str:
    """What a ``register_backends`` hook that returned something instead of ``None`` is told."""
    shown = ", ".join(repr(v) for v in values)
    if len(shown) > 200:
        shown = shown[:197] + "..."
    return (
        f"register_backends returned {shown}; the hook must call register(BackendClass) for "
        "each backend and return None. The returned value was not registered."
    )


_lock = threading.Lock()
_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = Registry.build()
        return _registry


def set_registry(registry: Registry) -> None:
    """Make ``registry`` the process-wide one (e.g. one built with ``extra_plugins`` in a worker
    process) until :func:`reset_registry`."""
    global _registry
    with _lock:
        _registry = registry


def reset_registry() -> None:
    """Forget the registry so the next lookup reloads plugins (tests, or after installing one)."""
    global _registry
    with _lock:
        _registry = None
