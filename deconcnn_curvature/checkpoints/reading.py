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
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deconcnn_curvature.errors import ConfigurationError

__all__ = [
    "ENV_CHECKPOINT_MAX_BYTES",
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


#: A ``${`` that does not open a plain reference to another node of the same config
#: (``${seed}``, ``${model.width}``, ``${..x}``, ``${a[0]}``): the start of a resolver call
#: (``${oc.env:SECRET}``, ``${oc.decode:...}``, any resolver registered in this process).
_RESOLVER_CALL = re.compile(r"(?<!\\)\$\{(?![\w.\-\[\] ]*\})")


def _escape_resolvers(value: Any) -> Any:
    """``value`` (a plain container from ``OmegaConf.to_container(resolve=False)``) with every
    resolver call escaped (``\\${oc.env:SECRET}``, which OmegaConf reads as the text
    ``${oc.env:SECRET}``); references to other nodes stay live."""
    if isinstance(value, str):
        return _RESOLVER_CALL.sub(r"\\${", value)
    if isinstance(value, dict):
        return {k: _escape_resolvers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape_resolvers(v) for v in value]
    return value


def _without_resolvers(contents: Any) -> Any:
    """The OmegaConf configs of ``contents`` (its top level or one of its entries, such as
    ``hyper_parameters``) rebuilt with every resolver call as plain text: reading a file's
    hyper-parameters never reads the environment (``${oc.env:...}``, whose value would then be
    printed in messages and ``--json``) or calls a resolver of this process. Node references
    (``${seed}``) still resolve, and each config keeps its resolver cache."""
    omegaconf = sys.modules.get("omegaconf")
    if omegaconf is None:
        return contents
    conf = omegaconf.OmegaConf

    def rebuilt(config: Any) -> Any:
        if not isinstance(config, omegaconf.Container):
            return config
        plain = _escape_resolvers(conf.to_container(config, resolve=False))
        try:
            fresh = conf.create(plain)
        except Exception:  # a value OmegaConf takes only in a node it rebuilt itself
            return plain  # the plain containers: nothing in them resolves
        conf.set_cache(fresh, conf.get_cache(config))
        return fresh

    if isinstance(contents, dict):
        for key, value in contents.items():
            if isinstance(value, omegaconf.Container):
                contents[key] = rebuilt(value)
        return contents
    return rebuilt(contents)


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


def _unsafe_name(exc: BaseException) -> str:
    """`` (builtins.exec)``: what the weights-only unpickler refused, or ``""``."""
    found = _UNSAFE_GLOBAL.search(str(exc))
    return f" ({found.group(1) or found.group(2)})" if found else ""


def _refusal(path: Path, exc: BaseException) -> str:
    what = _unsafe_name(exc)
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
    oversized: bool = False  # the archive would inflate beyond the limit: not even tried
    unsafe: str = ""  # " (builtins.exec)": what a refused file names, when torch says it


#: Environment variable: the most bytes a checkpoint archive may hold once inflated (an integer;
#: overrides the default limit of :func:`archive_limit`).
ENV_CHECKPOINT_MAX_BYTES = "DECONCNN_CURVATURE_CHECKPOINT_MAX_BYTES"
#: By default a checkpoint may inflate by at most this factor of its file size, and at most by
#: :data:`_MAX_INFLATION` bytes: torch.save stores its entries uncompressed (inflating by 0),
#: so only a re-compressed or crafted archive comes near either.
_INFLATION_FACTOR = 4
_MAX_INFLATION = 2**30


def archive_limit(file_size: int) -> tuple[int, str]:
    """The most bytes a checkpoint archive of ``file_size`` bytes may inflate to, and where the
    limit comes from (for the message): ``$DECONCNN_CURVATURE_CHECKPOINT_MAX_BYTES`` when set,
    else the file size plus ``min(4 x file size, 1 GiB)``."""
    given = os.environ.get(ENV_CHECKPOINT_MAX_BYTES, "").strip()
    if given:
        try:
            limit = int(given)
        except ValueError:
            raise CheckpointError(
                f"${ENV_CHECKPOINT_MAX_BYTES} must be a number of bytes, got {given!r}."
            ) from None
        return limit, f"${ENV_CHECKPOINT_MAX_BYTES}={limit}"
    extra = min(_INFLATION_FACTOR * file_size, _MAX_INFLATION)
    return file_size + extra, f"the default: file size + {_size(extra)}"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def _inflated_size(archive: zipfile.ZipFile, member: zipfile.ZipInfo, cap: int) -> int:
    """Bytes ``member`` inflates to, read in chunks and never more than ``cap`` + 1 MiB; zipfile
    stops at the declared size and checks the CRC there, so a header that understates the size
    raises :class:`zipfile.BadZipFile` instead of inflating without bound."""
    total = 0
    with archive.open(member) as stream:
        while total <= cap:
            chunk = stream.read(1 << 20)
            if not chunk:
                break
            total += len(chunk)
    return total


def _archive_problem(archive: zipfile.ZipFile, file_size: int, limit: int) -> str | None:
    members = archive.infolist()
    declared = sum(m.file_size for m in members)
    if declared > limit:
        biggest = max(members, key=lambda m: m.file_size)
        return (
            f"its zip entries declare {_size(declared)} of contents in a file of "
            f"{_size(file_size)} ({biggest.filename} alone {_size(biggest.file_size)})"
        )
    budget = limit
    for member in members:
        if member.compress_type == zipfile.ZIP_STORED:
            budget -= member.file_size
            continue
        try:
            actual = _inflated_size(archive, member, budget)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as exc:
            return f"its zip entry {member.filename} does not inflate as declared ({exc})"
        if actual > budget:
            return f"its zip entry {member.filename} inflates to over {_size(actual)}"
        budget -= actual
    return None


def _oversized_archive(path: Path) -> str | None:
    """Why ``path``, a zip archive (the format of torch.save), must not be handed to
    ``torch.load``: the sizes its entries declare add up to more than :func:`archive_limit`, or
    a compressed entry inflates to more than it declares or than the limit; ``None`` when it may
    be read (or is no zip: the unpickler then says what it is)."""
    try:
        if not zipfile.is_zipfile(path):
            return None
        file_size = path.stat().st_size
    except OSError:
        return None
    limit, origin = archive_limit(file_size)
    try:
        with zipfile.ZipFile(path) as archive:
            problem = _archive_problem(archive, file_size, limit)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):
        return None  # the directory itself is unreadable: torch.load says what is wrong
    return None if problem is None else f"{problem}; at most {_size(limit)} is allowed ({origin})"


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
    oversized = _oversized_archive(path)
    if oversized is not None:
        reason = (
            f"{path} is refused before inflating it: {oversized}. A checkpoint written by "
            f"torch.save inflates by nothing; if you trust this one, set "
            f"{ENV_CHECKPOINT_MAX_BYTES} to the bytes it may take."
        )
        return None, ReadFailure(reason, refused=False, oversized=True)
    try:
        if trust:
            contents = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with allowed_checkpoint_globals():
                contents = torch.load(path, map_location="cpu", weights_only=True)
            _restore_resolver_caches(contents)
        return _without_resolvers(contents), None
    except Exception as exc:  # any failure to unpickle means "not a readable torch file"
        if not trust and _is_refusal(exc):
            return None, ReadFailure(_refusal(path, exc), refused=True, unsafe=_unsafe_name(exc))
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
    """Refuse, before training starts, a ``resume=`` checkpoint that ``estimate`` would not open
    either, for the same reason: the file is read by the same code (:func:`read_checkpoint`,
    without trust), so both accept the same files (a legacy-format ``torch.save``, a Lightning
    checkpoint with an OmegaConf config in its hyper-parameters) and refuse the same ones.

    Raises :class:`UntrustedCheckpointError` for a file that pickles objects beyond what
    :func:`allowed_checkpoint_globals` accepts (unpickling it could run code; nothing in it ran),
    and :class:`CheckpointError` for one that is no readable checkpoint or would inflate beyond
    :func:`archive_limit`; one line each.
    """
    path = Path(path)
    _, failure = read_torch_file(path, trust=False)
    if failure is None:
        return
    if failure.refused:
        raise UntrustedCheckpointError(
            f"resume={path}: the checkpoint holds pickled Python objects{failure.unsafe} beyond "
            "tensors and plain values; loading it could run code from the file, so training "
            "refuses it. Resume from a checkpoint written by deconcnn-curv train."
        )
    if failure.oversized:
        raise CheckpointError(f"resume={failure.reason}")
    raise CheckpointError(
        f"resume={path}: not a checkpoint written by torch.save or Lightning, or it is "
        f"truncated ({failure.reason})."
    )
