"""What the config tests share: the shipped config tree, the monitor's settings as attributes,
and what one ``configs/curvature/<name>.yaml`` writes itself."""

from __future__ import annotations

import inspect
from pathlib import Path

from omegaconf import OmegaConf

from deconcnn_curvature.monitor import CurvatureMonitor

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
#: The backend files of the curvature group (base.yaml, every setting unset, is their start).
BACKEND_FILES = sorted(p.stem for p in (CONFIGS / "curvature").glob("*.yaml") if p.stem != "base")
#: CurvatureMonitor's arguments, each kept as an attribute of the same name (num_samples, the
#: deprecated alias, becomes num_hvps).
SETTINGS = [p for p in inspect.signature(CurvatureMonitor).parameters if p != "num_samples"]


def attributes(monitor: CurvatureMonitor) -> dict[str, object]:
    return {name: getattr(monitor, name) for name in SETTINGS}


def listed(name: str) -> dict[str, object]:
    """The settings curvature/<name>.yaml itself writes (its defaults list aside)."""
    group = OmegaConf.to_container(OmegaConf.load(CONFIGS / "curvature" / f"{name}.yaml"))
    assert isinstance(group, dict)
    group.pop("defaults", None)
    return group
