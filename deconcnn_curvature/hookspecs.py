"""The extension surface: pluggy markers and every hook this package calls.

The project name ``deconcnn_curvature`` is also the entry-point group: a third-party distribution
adds backends by declaring, in its ``pyproject.toml``::

    [project.entry-points.deconcnn_curvature]
    my_backends = "my_package.curvature_plugin"

where ``my_package/curvature_plugin.py`` implements hooks with :data:`hookimpl`::

    from deconcnn_curvature import Backend, hookimpl

    class MyBackend(Backend):
        name = "mine"
        ...

    @hookimpl
    def register_backends(register):
        register(MyBackend)

Hooks are called by keyword and only ever gain arguments; an implementation may accept any subset
of a hook's arguments. The built-in backends are registered through exactly this hook.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from deconcnn_curvature.backend import Backend
    from deconcnn_curvature.problem import LoadedCheckpoint

__all__ = ["PROJECT_NAME", "hookimpl", "hookspec"]

#: pluggy project name and ``importlib.metadata`` entry-point group.
PROJECT_NAME = "deconcnn_curvature"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    """Register curvature backend classes.

    Called once per plugin when the registry is first built.

    :param register: call ``register(BackendClass)`` once per backend this plugin provides. The
        class must subclass :class:`deconcnn_curvature.Backend`. ``register`` raises
        :class:`deconcnn_curvature.errors.PluginError` for an invalid class; a name already
        registered by another plugin makes that name ambiguous (selecting it raises
        :class:`deconcnn_curvature.errors.DuplicateBackendError` naming both plugins).

    Return ``None``: a non-``None`` return value (e.g. the class instead of ``register(cls)``)
    is reported as a broken plugin by ``deconcnn-curv list-backends`` and not registered.
    """


@hookspec(firstresult=True)
def load_checkpoint(
    path: Path, checkpoint: Mapping[str, Any] | None, settings: Mapping[str, Any]
) -> LoadedCheckpoint | None:
    """Turn a checkpoint file into a curvature problem (model, loss and data).

    Called by ``deconcnn-curv estimate/compare/density`` before the built-in loaders, so a training
    project can ship a plugin that understands its own checkpoints without this package importing
    that project.

    :param path: the checkpoint file the user named.
    :param checkpoint: the file's contents as loaded by ``torch.load(..., weights_only=True)`` on
        the CPU (``weights_only=False`` only when the user trusts the file: ``--trust-checkpoint``),
        or ``None`` if it could not be read as a torch file. A torch file refused as untrusted
        never reaches the hook; do not unpickle the file yourself.
    :param settings: the CLI's data and model settings (``batch_size``, ``num_batches``, ``data``,
        ``data_root``, ``seed``, ``model``, ``model_args``, ``loss``, ``device``, ``input_shape``,
        ``num_classes``), already validated. ``data`` is ``synthetic``, ``synthetic-cifar`` or
        ``cifar10``; ``model_args`` is a dict; ``num_classes=None`` means the model's output size.

    Return a :class:`deconcnn_curvature.problem.LoadedCheckpoint` (also importable from
    ``deconcnn_curvature.checkpoints``), or ``None`` to let the next loader try. Raise
    :class:`deconcnn_curvature.errors.CurvatureError` with a message for the user when the
    checkpoint is yours but unusable.
    """
