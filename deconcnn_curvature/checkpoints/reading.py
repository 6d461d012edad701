"""Reading a checkpoint file safely: one ``torch.load`` with ``weights_only=True`` and the
classes and functions a checkpoint may name without trust (:func:`allowed_checkpoint_globals`),
the one-line refusal of anything else, and the pre-flight check of a ``resume=`` checkpoint.

``trust=True`` (``--trust-checkpoint``) unpickles a file in full and warns: any code in it runs.
"""

from __future__ import annotations

import collections
import contextlib
import os
import pickle
import re
import sys
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deconcnn_curvature.errors import ConfigurationError

__all__ = [
    "TRUST_FLAG",
    "CheckpointError",
    "ReadFailure",
    "UntrustedCheckpointError",
    "UntrustedCheckpointWarning",
    "allowed_checkpoint_globals",
    "check_resume_checkpoint",
    "describe_error",
    "read_checkpoint",
    "read_torch_file",
]


class CheckpointError(ConfigurationError):
    """A checkpoint file is missing, unreadable, or does not describe a model we can rebuild."""


# --------------------------------------------------------------------------------------------
# reading the file


def describe_error(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[-1]


class UntrustedCheckpointError(CheckpointError):
    """The file is a torch checkpoint whose unpickling would import or call something beyond
    tensors and plain containers (code could run); it is opened only with ``trust=True``."""


class UntrustedCheckpointWarning(UserWarning):
    """A checkpoint is being opened with ``trust=True``: any code pickled in it runs."""


#: What the command line calls the opt-in (named in the refusal message).
TRUST_FLAG = "--trust-checkpoint"


def _allowed_globals() -> list[Any]:
    """Classes and functions a checkpoint may name and still be opened without trust.

    Besides what ``torch.load(weights_only=True)`` accepts by default (tensors, dicts, lists,
    ``OrderedDict``...), Lightning checkpoints carry the run's hyper-parameters, where paths
    (``pathlib``) and numpy scalars are common. Each of these only rebuilds a value; none calls
    anything the file chooses.
    """
    import pathlib

    allowed: list[Any] = [
        pathlib.PosixPath,
        pathlib.PurePosixPath,
        pathlib.WindowsPath,
        pathlib.PureWindowsPath,
    ]
    allowed += _omegaconf_globals()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return allowed
    # numpy scalars pickle as (scalar-constructor, dtype, bytes); take the constructor from a
    # scalar's own __reduce__ rather than from a private numpy module.
    allowed += [np.float64(0).__reduce__()[0], np.dtype]
    # numpy >= 1.25 restores a dtype through its own class (numpy.dtypes.Float64DType...).
    allowed += list(dict.fromkeys(type(np.dtype(code)) for code in "?bhilqBHILQefdgFDGUS"))
    return allowed


def _omegaconf_globals() -> list[Any]:
    """What ``save_hyperparameters(cfg)`` of an OmegaConf ``DictConfig`` (Hydra's config) pickles
    into a Lightning checkpoint, when omegaconf is installed; nothing otherwise.

    The config objects and their metadata are rebuilt by ``object.__new__`` and omegaconf's own
    ``__setstate__`` (a ``__dict__`` update plus type bookkeeping); the metadata names the types
    ``dict``, ``list``, ``int`` and ``typing.Any``. Its resolver cache, a
    ``collections.defaultdict(dict)`` (Hydra fills the root's with ``${now:...}``), is read as a
    plain dict (torch fills no other mapping) and made a ``defaultdict`` again by
    :func:`_restore_resolver_caches`. None of these calls anything the file chooses: a config that
    holds any other object (a user's class, a function) is still refused. Interpolations such as
    ``${a}`` stay text until read.
    """
    try:
        from omegaconf import DictConfig, ListConfig
        from omegaconf.base import ContainerMetadata, Metadata
        from omegaconf.nodes import AnyNode
    except ImportError:
        return []
    import typing

    allowed: list[Any] = [
        DictConfig,
        ListConfig,
        ContainerMetadata,
        Metadata,
        AnyNode,
        dict,
        list,
        int,
        typing.Any,
    ]
    if torch.__version__ >= "2.6":  # older torch takes no (object, name) pairs: cache refused
        allowed.append((_plain_dict, "collections.defaultdict"))
    return allowed


def _plain_dict(*_factory: Any) -> dict[Any, Any]:
    """Stands in for ``collections.defaultdict`` while unpickling: an empty plain dict."""
    return {}


def _restore_resolver_caches(contents: Any) -> None:
    """Give the OmegaConf configs of ``contents`` (the file's top level or one of its entries,
    such as ``hyper_parameters``) their resolver cache back as a ``defaultdict(dict)`` (see
    :func:`_omegaconf_globals`); only a config's root cache is ever used."""
    omegaconf = sys.modules.get("omegaconf")
    if omegaconf is None:
        return
    candidates = [contents, *contents.values()] if isinstance(contents, dict) else [contents]
    for config in candidates:
        if isinstance(config, omegaconf.Container):
            cache = omegaconf.OmegaConf.get_cache(config)
            if not isinstance(cache, collections.defaultdict):
                omegaconf.OmegaConf.set_cache(config, collections.defaultdict(dict, cache))


@contextlib.contextmanager
def allowed_checkpoint_globals() -> Iterator[None]:
    """Within this block, ``torch.load(weights_only=True)`` also accepts
    :func:`_allowed_globals` (scoped: torch's allow-list is restored afterwards). Used around
    every checkpoint read of this package, and around the training run's ``resume=``."""
    scoped = getattr(torch.serialization, "safe_globals", None)
    if scoped is None:  # torch < 2.5: only torch's own allow-list
        yield
        return
    with scoped(_allowed_globals()):
        yield


_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>")


def _refusal(path: Path, exc: BaseException) -> str:
    found = _UNSAFE_GLOBAL.search(str(exc))
    what = f" ({found.group(1) or found.group(2)})" if found else ""
    return (
        f"{path} holds pickled Python objects{what} beyond tensors and plain values; opening it "
        f"could run code from the file, so it is refused. Only if you trust its source, pass "
        f"{TRUST_FLAG} (trust=True from Python)."
    )


#: How torch's weights-only unpickler says "this names a class or function I will not load" (as
#: opposed to "this is not a pickle at all").
_REFUSED = re.compile(r"GLOBAL|allowlisted|unrecognized function", re.IGNORECASE)


def _is_refusal(exc: BaseException) -> bool:
    text = str(exc)
    return (
        isinstance(exc, pickle.UnpicklingError)
        and "Weights only load failed" in text
        and _REFUSED.search(text) is not None
    )


def _load_error(exc: BaseException) -> str:
    """One line for a failed ``torch.load``: torch's weights-only message spans several lines
    of advice around the actual error (after ``WeightsUnpickler error:``); keep that error."""
    text = str(exc)
    if "Weights only load failed" in text and "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
        return f"{type(exc).__name__}: {' '.join(detail.split())}"
    return describe_error(exc)


@dataclass(frozen=True)
class ReadFailure:
    reason: str
    refused: bool  # the weights-only unpickler refused a global: a torch file, untrusted


def read_torch_file(path: Path, trust: bool) -> tuple[Any | None, ReadFailure | None]:
    """One ``torch.load`` of ``path``; never a second one (a failed unpickling may already have
    run code, with ``trust``)."""
    if path.is_dir():
        return None, ReadFailure("it is a directory", refused=False)
    if trust:
        warnings.warn(
            f"{path} is opened with trust: any code pickled in it runs ({TRUST_FLAG}).",
            UntrustedCheckpointWarning,
            stacklevel=3,
        )
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False), None
        with allowed_checkpoint_globals():
            contents = torch.load(path, map_location="cpu", weights_only=True)
        _restore_resolver_caches(contents)
        return contents, None
    except Exception as exc:  # any failure to unpickle means "not a readable torch file"
        if not trust and _is_refusal(exc):
            return None, ReadFailure(_refusal(path, exc), refused=True)
        return None, ReadFailure(_load_error(exc), refused=False)


def read_checkpoint(
    path: str | os.PathLike[str], *, trust: bool = False
) -> tuple[Any | None, str | None]:
    """``(contents, None)``, or ``(None, reason)`` when ``path`` cannot be read as a torch file.

    Reads the file once with ``torch.load(map_location="cpu", weights_only=True)``: tensors,
    containers, plain values, paths and numpy scalars only, so nothing in the file can run code.
    A checkpoint that pickles other objects (a whole ``nn.Module``, a custom class) is refused
    with a reason naming ``--trust-checkpoint``; ``trust=True`` unpickles it in full
    (``weights_only=False``, any code in it runs) and warns with
    :class:`UntrustedCheckpointWarning`. Use it only for files you trust.
    """
    contents, failure = read_torch_file(Path(path), trust)
    return contents, None if failure is None else failure.reason


def check_resume_checkpoint(path: str | os.PathLike[str]) -> None:
    """Refuse, before training starts, a ``resume=`` checkpoint that pickles objects beyond
    what :func:`allowed_checkpoint_globals` accepts (its unpickling could run code).

    Reads only the file's pickle opcodes (``torch.serialization.
    get_unsafe_globals_in_checkpoint``); nothing in it is executed. Raises
    :class:`UntrustedCheckpointError` (one line).
    """
    path = Path(path)
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if scan is None:  # torch < 2.5: Lightning's own weights-only load is the guard
        return
    try:
        with allowed_checkpoint_globals():
            unsafe = sorted(scan(path))
    except Exception as exc:
        raise CheckpointError(
            f"resume={path}: not a checkpoint written by torch.save or Lightning "
            f"({describe_error(exc)})."
        ) from exc
    if unsafe:
        raise UntrustedCheckpointError(
            f"resume={path}: the checkpoint holds pickled Python objects ({', '.join(unsafe)}) "
            "beyond tensors and plain values; loading it could run code from the file, so "
            "training refuses it. Resume from a checkpoint written by deconcnn-curv train."
        )
