"""Copy the repository's ``configs/`` here: ``python -m deconcnn_curvature.conf``.

Run it from a source checkout after editing ``configs/``; YAML files here that are no longer in
``configs/`` are removed. ``tests/test_configs.py`` fails until the two trees are identical.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def sync(source: Path, target: Path) -> list[str]:
    """Make the YAML files under ``target`` equal to those under ``source``; return what changed."""
    wanted = {p.relative_to(source) for p in source.rglob("*.yaml")}
    changed = []
    for old in sorted(target.rglob("*.yaml")):
        if old.relative_to(target) not in wanted:
            old.unlink()
            changed.append(f"removed {old.relative_to(target)}")
    for rel in sorted(wanted):
        src, dst = source / rel, target / rel
        if not dst.is_file() or dst.read_bytes() != src.read_bytes():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            changed.append(f"copied {rel}")
    for folder in sorted((p for p in target.rglob("*") if p.is_dir()), reverse=True):
        if folder.name != "__pycache__" and not any(folder.iterdir()):
            folder.rmdir()
    return changed


def main() -> int:
    target = Path(__file__).resolve().parent
    source = target.parents[1] / "configs"
    if not (source / "train.yaml").is_file():
        print(f"no configs/train.yaml next to the package ({source}); run from a source checkout.")
        return 1
    for line in sync(source, target) or ["already identical"]:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
