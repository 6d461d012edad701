"""Line-per-record JSON files that a resumed run continues (``curvature.jsonl``, ``metrics.jsonl``).

A run resumed from a checkpoint older than its last records (it crashed after measuring past the
checkpoint) would append those steps a second time. :func:`supersede_after` moves the records of
the lost stretch to a side file first, so the main file holds each step once and nothing is lost.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["supersede_after"]


def supersede_after(path: str | os.PathLike[str], step: int) -> tuple[int, Path | None]:
    """Move the lines of ``path`` whose ``"step"`` is greater than ``step`` to
    ``<stem>.superseded<suffix>`` next to it (appended). Returns how many moved, and where."""
    path = Path(path)
    if not path.is_file():
        return 0, None
    keep: list[str] = []
    moved: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            later = int(json.loads(line)["step"]) > step
        except (ValueError, KeyError, TypeError):
            later = False  # not a record of ours: leave it where it is
        (moved if later else keep).append(line)
    if not moved:
        return 0, None
    side = path.with_name(f"{path.stem}.superseded{path.suffix}")
    with side.open("a", encoding="utf-8") as handle:
        handle.writelines(moved)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, path)
    return len(moved), side
