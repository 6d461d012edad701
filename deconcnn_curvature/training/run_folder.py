"""The run folder of ``deconcnn-curv train``: created, locked, written safely, cleaned after a
failed start.

Every function takes the folder as an argument (nothing here reads a config), so a sweep can give
each job its own folder.

* **One suffix rule** (:func:`first_free`): a timestamped folder taken in the same second becomes
  ``<stamp>-2``, an earlier run moved aside goes to ``<name>.1``, a resume's config is written as
  ``config.resume-<n>.yaml``.
* **The lock** (:class:`RunLock`): ``fcntl.flock`` on ``.run.lock``; where the file system has no
  locks (NFS without lockd, some Lustre/GPFS scratch mounts, FUSE) a lock file created exclusively
  holding ``pid@host``, stale when that pid is gone on this host.
* **No writing through links** (:func:`refuse_links`, :func:`write_atomically`): a file of the run
  that is a symbolic link is refused in one line before anything is written, and every whole-file
  write goes to a temporary file in the same folder that replaces the name (``os.replace`` after
  ``fsync``), so a link planted later is replaced, never followed.
* **Checkpoints that survive interruption** (:func:`atomic_checkpoint_io`): ``last.ckpt`` is
  written beside itself and renamed over the old one, so a kill or a full disk during a save
  leaves the previous checkpoint whole.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import socket
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from deconcnn_curvature.errors import ConfigurationError, CurvatureError

__all__ = [
    "LOCK_NAME",
    "RUN_FILES",
    "CheckpointWriteError",
    "LockFallbackWarning",
    "RunLock",
    "atomic_checkpoint_io",
    "config_path",
    "discard_failed_start",
    "first_free",
    "holds_a_run",
    "listing",
    "make_run_dir",
    "move_aside",
    "refuse_links",
    "write_atomically",
]

#: The lock file inside a run folder, held by the run writing into it.
LOCK_NAME = ".run.lock"

#: The files a run writes into its folder (side files and temporaries included).
RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "curvature.jsonl",
    "metrics.superseded.jsonl",
    "curvature.superseded.jsonl",
    "metrics.jsonl.tmp",
    "curvature.jsonl.tmp",
    "last.ckpt",
    "curvature.png",
    LOCK_NAME,
)


class LockFallbackWarning(UserWarning):
    """The run folder's file system has no ``flock``; an exclusive lock file is used instead."""


class CheckpointWriteError(CurvatureError, OSError):
    """A checkpoint could not be written (full disk, I/O error); the previous one is intact."""


# ------------------------------------------------------------------ names


def first_free(name_for: Callable[[int], Path], start: int, *, create: bool) -> Path:
    """The first ``name_for(i)``, ``i = start, start + 1, ...``, that does not exist. With
    ``create`` the folder is made here (``mkdir`` without ``exist_ok``), so two processes racing
    for one name get different folders."""
    i = start
    while True:
        path = name_for(i)
        if create:
            try:
                path.mkdir(parents=True)
                return path
            except FileExistsError:
                pass
        elif not path.exists() and not path.is_symlink():
            return path
        i += 1


def _suffixed(base: Path, sep: str, first_plain: bool = False) -> Callable[[int], Path]:
    def name(i: int) -> Path:
        return base if first_plain and i == 1 else base.with_name(f"{base.name}{sep}{i}")

    return name


def make_run_dir(path: Path, timestamped: bool) -> tuple[Path, bool]:
    """Create the run folder; return it and whether this call created it. A timestamped folder
    taken already (two runs started in the same second) becomes ``<stamp>-2``, ``-3``, ..."""
    try:
        if timestamped:
            return first_free(_suffixed(path, "-", first_plain=True), 1, create=True), True
        existed = path.is_dir()
        path.mkdir(parents=True, exist_ok=True)
        return path, not existed
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigurationError(
            f"cannot create the run folder {path}: {reason}; choose another run_dir= or name=."
        ) from exc


def check_writable(run_dir: Path) -> None:
    """Refuse a folder this process cannot write into, in one line."""
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ConfigurationError(
            f"run folder {run_dir} is not writable (read-only, or another user's); choose "
            "another run_dir= or name=, or make it writable."
        )


def config_path(run_dir: Path, resume: Any) -> Path:
    """``config.yaml``, or for a resume into a folder that has one, ``config.resume-<n>.yaml``
    (the run's original configuration is kept)."""
    path = run_dir / "config.yaml"
    if resume is None or not (path.exists() or path.is_symlink()):
        return path
    return first_free(lambda i: run_dir / f"config.resume-{i}.yaml", 1, create=False)


def move_aside(run_dir: Path) -> Path:
    """Move the contents of ``run_dir`` (its lock file apart) into a new sibling folder
    ``<name>.1`` (``.2``, ... when taken); return that folder."""
    side = first_free(_suffixed(run_dir, "."), 1, create=True)
    for entry in sorted(run_dir.iterdir()):
        if entry.name != LOCK_NAME:
            os.replace(entry, side / entry.name)
    return side


# ------------------------------------------------------------------ what the folder holds


def holds_a_run(run_dir: Path) -> bool:
    return any((run_dir / n).exists() for n in ("curvature.jsonl", "metrics.jsonl", "last.ckpt"))


def listing(run_dir: Path) -> dict[str, tuple[int, int]]:
    """What a folder holds (name: size, modification time), its lock file apart."""
    out = {}
    for entry in run_dir.iterdir():
        if entry.name != LOCK_NAME:
            stat = entry.lstat()
            out[entry.name] = (stat.st_size, stat.st_mtime_ns)
    return out


def discard_failed_start(
    run_dir: Path, created: bool, before: Mapping[str, tuple[int, int]], written: Sequence[Path]
) -> None:
    """A run that failed before training wrote anything leaves no trace: the files it wrote (its
    config) go, and so does the folder if this run created it. Once training has written
    something (records, a checkpoint), everything stays for a resume."""
    if not run_dir.is_dir():
        return
    names = {p.name for p in written}
    now = {k: v for k, v in listing(run_dir).items() if k not in names}
    if now != dict(before):
        return
    for path in written:
        path.unlink(missing_ok=True)
    if created:
        (run_dir / LOCK_NAME).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            run_dir.rmdir()


def refuse_links(run_dir: Path, names: Sequence[str] = RUN_FILES) -> None:
    """Refuse a run folder where a file the run writes is a symbolic link (writing would change
    the file it points to, outside the folder): one line naming it."""
    for name in names:
        path = run_dir / name
        if path.is_symlink():
            raise ConfigurationError(
                f"run folder {run_dir}: {name} is a symbolic link (to {os.readlink(path)}); a run "
                "never writes through a link. Remove the link, or choose another run_dir= or name=."
            )


# ------------------------------------------------------------------ writing


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temporary(path: Path) -> tuple[int, str]:
    """A new file beside ``path`` (same folder, so the same file system), with the permissions
    a plain ``open`` would give it (``mkstemp`` makes it private to the user)."""
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    return fd, tmp


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[io.BufferedWriter]:
    """A binary file that, when the block ends without error, replaces ``path`` atomically: a
    temporary file in ``path``'s own folder (same file system), flushed and ``fsync``-ed, then
    ``os.replace``-d over the name (a link there is replaced, not followed), then the folder
    ``fsync``-ed. On any error or interruption the temporary goes and ``path`` is untouched."""
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_atomically(path: Path, data: bytes | str) -> None:
    """Replace ``path`` by ``data`` (see :func:`_replacing`)."""
    with _replacing(path) as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)


def write_with(path: Path, writer: Callable[[Path], Any]) -> None:
    """Let ``writer`` write a file at a temporary name in ``path``'s folder (the same suffix, for
    writers that choose the format by it), then replace ``path`` by it atomically."""
    fd, tmp = _temporary(path)
    os.close(fd)
    try:
        writer(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_checkpoint_io() -> Any:
    """A Lightning ``CheckpointIO`` (pass it in the Trainer's ``plugins``) that writes each
    checkpoint beside its final name and renames it over it (:func:`_replacing`), instead of
    Lightning's default, which writes to ``$TMPDIR`` and copies the file over the old one when
    ``$TMPDIR`` is on another file system. A failed write raises :class:`CheckpointWriteError`."""
    import torch
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(
            self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
        ) -> None:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with _replacing(target) as handle:
                    torch.save(checkpoint, handle)
            except OSError as exc:
                kept = "the previous one is intact" if target.exists() else "none was saved yet"
                raise CheckpointWriteError(
                    f"could not write the checkpoint {target} ({exc.strerror or exc}); {kept}."
                ) from exc

    return AtomicCheckpointIO()


# ------------------------------------------------------------------ the lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
if hasattr(errno, "ENOTSUP"):
    _NO_LOCKS.add(errno.ENOTSUP)


class RunLock:
    """The run folder's lock, held until :meth:`close`. A second run into the same folder fails
    at once, naming the holder; a lock left by a dead process is no lock."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_NAME
        self._handle: Any = None
        self._file_lock = False
        self._take()

    def _busy(self, holder: str) -> ConfigurationError:
        return ConfigurationError(
            f"run folder {self.run_dir} is in use by another run ({holder}); wait for it to "
            "end, or choose another run_dir= or name=."
        )

    def _take(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; the lock file alone
            self._take_file()
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        handle = os.fdopen(fd, "r+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = handle.read().strip() or "unknown"
            handle.close()
            if exc.errno in _NO_LOCKS:
                self._take_file(str(exc.strerror or exc))
                return
            raise self._busy(f"pid {holder}") from exc
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle

    def _take_file(self, why: str = "") -> None:
        """The lock where ``flock`` is not supported: ``.run.lock`` created exclusively, holding
        ``pid@host``. A file left by a process that is gone (same host) is taken over."""
        if why:
            warnings.warn(
                f"run folder {self.run_dir}: its file system has no file locks ({why}); "
                f"using {LOCK_NAME} created exclusively (holding pid and host) instead.",
                LockFallbackWarning,
                stacklevel=3,
            )
        host = socket.gethostname()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._check_stale(host)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(f"{os.getpid()}@{host}\n")
            self._file_lock = True
            return
        raise self._busy("pid unknown")

    def _check_stale(self, host: str) -> None:
        """Remove a lock file whose holder is gone (same host, pid not alive, or empty: a lock
        left by flock); raise naming the holder otherwise."""
        try:
            text = self.path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return
        pid, _, where = text.partition("@")
        if where and where != host:
            raise self._busy(f"pid {pid} on host {where}; remove {self.path} if that run is gone")
        if pid.isdigit() and _pid_alive(int(pid)) and where:
            raise self._busy(f"pid {pid}")
        self.path.unlink(missing_ok=True)  # stale: its process is gone

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._file_lock:
            self.path.unlink(missing_ok=True)
            self._file_lock = False
