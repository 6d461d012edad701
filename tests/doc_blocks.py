"""The fenced code blocks of the documentation (README.md, migration.md, docs/*.md), with the
marker that says whether and how the tests run each one.

A block is run unless the line before its fence (blank lines aside) is a marker:

* ``<!-- not-run: REASON -->``: not run (an install, a GPU, a download, a full-size benchmark);
* ``<!-- expect-error: MESSAGE -->``: each command runs and must fail on the test machine with one
  ``Error`` line containing MESSAGE (the part before a parenthesis), no traceback.

Languages: ``bash`` and ``python`` blocks run; ``toml``, ``yaml`` and ``text`` blocks are not
commands; a plain fence holds output, whose ``$ `` lines are commands. Anything else is an error,
so a command cannot hide in an unknown language.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES: tuple[str, ...] = (
    "README.md",
    "migration.md",
    *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md"))),
)
RUN_LANGUAGES = frozenset({"bash", "python"})
TEXT_LANGUAGES = frozenset({"toml", "yaml", "text", ""})
MARKER = re.compile(r"^<!--\s*(not-run|expect-error):\s*(.*?)\s*-->$")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language, its text and its marker."""

    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: str | None  # "not-run", "expect-error" or None
    reason: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def expected_error(self) -> str:
        """The message an ``expect-error`` block's commands must show (before any ``(``)."""
        return self.reason.split("(")[0].strip()

    def commands(self) -> list[str]:
        """Shell commands: each line of a bash block (continuations joined, comment-only lines
        dropped), or the ``$ `` lines of an output block."""
        if self.lang == "":
            return [ln[2:].strip() for ln in self.text.splitlines() if ln.startswith("$ ")]
        if self.lang != "bash":
            return []
        commands, pending = [], ""
        for line in self.text.splitlines():
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            text, pending = (pending + line).strip(), ""
            if text and not text.startswith("#"):
                commands.append(text)
        return commands


def blocks(page: str) -> list[Block]:
    """Every fenced block of ``page`` (relative to the repository root), in order."""
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        lang, start = lines[i][3:].strip(), i
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        prev = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        match = MARKER.match(prev)
        text = "\n".join(lines[start + 1 : end]) + "\n"
        marker, reason = (match.group(1), match.group(2)) if match else (None, "")
        found.append(Block(page, start + 1, lang, text, marker, reason))
        i = end + 1
    return found


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in blocks(page)]


def python_blocks(page: str) -> list[Block]:
    return [b for b in blocks(page) if b.lang == "python"]
