"""Line-per-record JSON files that a resumed run continues (``curvature.jsonl``, ``metrics.jsonl``).

A run resumed from a checkpoint older than its last records (it crashed after measuring past the
checkpoint) would append those steps a second time. :func:`supersede_after` moves the records of
the lost stretch to a side file first, so the main file holds each step once and nothing is lost.

A crash or a full disk in the middle of a write can leave a *torn* last line: part of a record,
without its newline. Appending to such a file would glue the next record onto it (both lost), and a
strict reader would stop at it. So :func:`open_for_append` moves a torn last line to the side file
(a complete record that only lacks its newline gets the newline instead) before appending, and
:func:`read_jsonl` skips a line that is not JSON with a warning naming the file and line.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from deconcnn_curvature.results import plain

__all__ = [
    "RecordWriter",
    "TornLineWarning",
    "open_for_append",
    "read_jsonl",
    "side_file",
    "supersede_after",
]


class TornLineWarning(UserWarning):
    """A records file holds a line that is not JSON (a write cut short by a crash or full disk)."""


def side_file(path: str | os.PathLike[str]) -> Path:
    """``<stem>.superseded<suffix>`` next to ``path``: where lines taken out of it go."""
    path = Path(path)
    return path.with_name(f"{path.stem}.superseded{path.suffix}")


def _append_side(path: Path, lines: list[str]) -> Path:
    side = side_file(path)
    with side.open("a", encoding="utf-8") as handle:
        handle.writelines(line if line.endswith("\n") else line + "\n" for line in lines)
        handle.flush()
        os.fsync(handle.fileno())
    return side


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:  # json.JSONDecodeError, and undecodable text
        return False
    return True


def repair_torn_tail(path: str | os.PathLike[str]) -> str | None:
    """Make ``path`` end on a fresh line. A last line without its newline is completed when it is
    a whole JSON record, else moved to :func:`side_file`. Returns a sentence saying what was done,
    or ``None`` when the file was fine."""
    path = Path(path)
    if not path.is_file():
        return None
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return None
    start = data.rfind(b"\n") + 1
    tail = data[start:].decode("utf-8", errors="replace")
    line_no = data.count(b"\n") + 1
    if _is_json(tail):
        with path.open("a", encoding="utf-8") as handle:
            handle.write("\n")
        return None
    side = _append_side(path, [tail])
    with path.open("r+b") as handle:
        handle.truncate(start)
        handle.flush()
        os.fsync(handle.fileno())
    return (
        f"{path}: line {line_no} was torn ({len(tail)} characters without a newline, not JSON: "
        f"a write cut short by a crash or a full disk); moved it to {side} and continued on a "
        "fresh line."
    )


def open_for_append(path: str | os.PathLike[str]) -> IO[str]:
    """Open ``path`` for appending records (its folder created), after :func:`repair_torn_tail`;
    a torn line moved aside is reported with a :class:`TornLineWarning`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    note = repair_torn_tail(path)
    if note is not None:
        warnings.warn(note, TornLineWarning, stacklevel=3)
    return path.open("a", encoding="utf-8")


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a line-per-record JSON file, in order. Blank lines are skipped; a line that
    is not JSON (torn by a crash) is skipped with a :class:`TornLineWarning` naming the file and
    line, so one cut-short write never hides the records around it."""
    records = []
    with Path(path).open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                warnings.warn(
                    f"{path}: skipped line {number}, which is not JSON ({len(line.rstrip())} "
                    "characters; a write cut short by a crash or a full disk).",
                    TornLineWarning,
                    stacklevel=3,
                )
    return records


def supersede_after(path: str | os.PathLike[str], step: int) -> tuple[int, Path | None]:
    """Move the lines of ``path`` whose ``"step"`` is greater than ``step``, and the lines that are
    not JSON (torn by a crash), to :func:`side_file` (appended). Returns how many moved, and
    where."""
    path = Path(path)
    if not path.is_file():
        return 0, None
    note = repair_torn_tail(path)
    if note is not None:
        warnings.warn(note, TornLineWarning, stacklevel=3)
    keep: list[str] = []
    moved: list[str] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
        if not line.strip():
            keep.append(line)
            continue
        try:
            later = int(json.loads(line)["step"]) > step
        except ValueError:  # not JSON: a torn line (json.JSONDecodeError is a ValueError)
            later = True
        except (KeyError, TypeError):
            later = False  # JSON but not a record of ours: leave it where it is
        (moved if later else keep).append(line)
    if not moved:
        return 0, None
    side = _append_side(path, moved)
    if keep and not keep[-1].endswith("\n"):
        keep[-1] += "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, path)
    return len(moved), side


def _json_safe(value: Any) -> Any:
    """Plain JSON values; non-finite floats become ``None`` so every line is strict JSON."""
    value = plain(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


class RecordWriter:
    """Append JSON records, one per line, to ``path`` (``curvature.jsonl``, ``metrics.jsonl``).

    The file is opened in append mode on the first write (a resumed run continues it; a torn last
    line moves aside first, see :func:`open_for_append`) and its folder is created. Each line is
    flushed; ``fsync`` also pushes it to disk, so it survives a crash of the process or the
    machine right after the write.
    """

    def __init__(self, path: str | os.PathLike[str], fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = bool(fsync)
        self._file: IO[str] | None = None

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` as one line of strict JSON (non-finite floats as ``null``)."""
        if self._file is None:
            self._file = open_for_append(self.path)
        self._file.write(json.dumps(_json_safe(dict(record)), allow_nan=False) + "\n")
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Close the file (a later :meth:`write` reopens it in append mode)."""
        if self._file is not None:
            self._file.close()
            self._file = None
