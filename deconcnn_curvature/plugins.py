"""The plugin manager: built-in backends plus third-party entry points, loaded lazily and once.

Environment variables:

``DECONCNN_CURVATURE_PLUGINS``
    Which entry points of the ``deconcnn_curvature`` group to load. Unset: all of them. Empty: none
    (tests use this for isolation). Otherwise a comma-separated list of entry-point names.
    Built-in backends are always loaded.
``DECONCNN_CURVATURE_TRACE``
    Set to ``1`` to print every hook call to standard error.

A plugin that fails to import, or whose hook raises, is recorded as broken (name and error); every
other plugin keeps working. That includes a plugin calling ``sys.exit()`` or raising any other
``BaseException`` except ``KeyboardInterrupt``. ``check_pending()`` runs after loading so a
misspelt hook implementation fails loudly instead of being silently ignored.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import traceback
from dataclasses import dataclass, field

import pluggy

from deconcnn_curvature import hookspecs
from deconcnn_curvature.errors import PluginError

__all__ = [
    "BUILTIN_PLUGINS",
    "ENV_PLUGINS",
    "ENV_TRACE",
    "BrokenPlugin",
    "LoadedPlugins",
    "load_plugins",
    "reraise_interrupt",
]

ENV_PLUGINS = "DECONCNN_CURVATURE_PLUGINS"
ENV_TRACE = "DECONCNN_CURVATURE_TRACE"

#: Modules registered as plugins before any entry point; they use the same public hooks. Named,
#: not imported: ``training.reference`` (the reference run's checkpoint loader, torch only) stays
#: a leaf the core never imports.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "deconcnn_curvature.backends.pyhessian",
    "deconcnn_curvature.backends.hutchpp",
    "deconcnn_curvature.backends.backpack",
    "deconcnn_curvature.checkpoints",
    "deconcnn_curvature.training.reference",
)


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that could not be loaded or whose hook raised."""

    name: str
    error: str
    where: str  # "import", "check", or the hook name

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "error": self.error, "where": self.where}


@dataclass
class LoadedPlugins:
    manager: pluggy.PluginManager
    broken: list[BrokenPlugin] = field(default_factory=list)


def reraise_interrupt(exc: BaseException) -> None:
    """Re-raise ``exc`` if it is the user's interrupt (Ctrl-C) or not an error at all; return for
    anything a plugin may have raised, ``SystemExit`` (a plugin calling ``sys.exit()``) and other
    ``BaseException`` subclasses included, so the caller records the plugin as broken."""
    if isinstance(exc, KeyboardInterrupt | GeneratorExit):
        raise exc


def describe_error(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def _selected_entry_points() -> list[importlib.metadata.EntryPoint]:
    eps = list(importlib.metadata.entry_points(group=hookspecs.PROJECT_NAME))
    wanted = os.environ.get(ENV_PLUGINS)
    if wanted is None:
        return eps
    names = {n.strip() for n in wanted.split(",") if n.strip()}
    return [ep for ep in eps if ep.name in names]


def load_plugins(extra: tuple[object, ...] = ()) -> LoadedPlugins:
    """Build a plugin manager with the built-ins, selected entry points and ``extra`` objects.

    ``extra`` plugins (modules or objects with hook implementations) are registered after the
    entry points; tests use it to add plugins in-process.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    broken: list[BrokenPlugin] = []

    for modname in BUILTIN_PLUGINS:
        module = importlib.import_module(modname)  # a broken built-in is our bug: let it raise
        pm.register(module, name=f"builtin:{modname.rsplit('.', 1)[1]}")

    for ep in _selected_entry_points():
        name = f"{ep.dist.name}:{ep.name}" if ep.dist is not None else ep.name
        try:
            plugin = ep.load()
            pm.register(plugin, name=name)
        except BaseException as exc:  # a third-party import failure must not take us down
            reraise_interrupt(exc)  # sys.exit() in a plugin is its failure; Ctrl-C is the user's
            broken.append(BrokenPlugin(name, describe_error(exc), "import"))

    for i, plugin in enumerate(extra):
        name = getattr(plugin, "__name__", None) or f"extra-{i}"
        try:
            pm.register(plugin, name=name)
        except BaseException as exc:
            reraise_interrupt(exc)
            broken.append(BrokenPlugin(name, describe_error(exc), "import"))

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        # Find and drop the offending plugin(s), keeping everything else.
        for plugin in list(pm.get_plugins()):
            name = pm.get_name(plugin) or repr(plugin)
            probe = pluggy.PluginManager(hookspecs.PROJECT_NAME)
            probe.add_hookspecs(hookspecs)
            probe.register(plugin, name=name)
            try:
                probe.check_pending()
            except pluggy.PluginValidationError as inner:
                if name.startswith("builtin:"):
                    raise PluginError(f"built-in plugin {name} is invalid: {inner}") from exc
                pm.unregister(plugin)
                broken.append(BrokenPlugin(name, describe_error(inner), "check"))

    if os.environ.get(ENV_TRACE, "") not in ("", "0"):
        pm.trace.root.setwriter(lambda msg: sys.stderr.write(f"[deconcnn_curvature] {msg}"))
        pm.enable_tracing()
    return LoadedPlugins(manager=pm, broken=broken)
