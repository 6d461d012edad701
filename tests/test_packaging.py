"""The Hydra configs have one home, ``configs/``, and a built, non-editable install still finds
them: no copy inside the package, no copy script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_configs_exist_once() -> None:
    assert (ROOT / "configs" / "train.yaml").is_file()
    assert not (ROOT / "deconcnn_curvature" / "conf").exists()


@pytest.mark.slow
def test_a_built_wheel_installed_elsewhere_composes_the_configs(tmp_path: Path) -> None:
    """Build the wheel, install it (no deps, not editable) into a folder of its own, and run
    ``deconcnn-curv train --cfg`` from an unrelated working directory with that folder first on
    the path: the composed config comes from the installed package's copy of ``configs/``."""
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Build from a copy of what the wheel is made of, so the checkout gets no build/ folder.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "deconcnn_curvature", "configs"):
        if (ROOT / name).is_dir():
            skip = shutil.ignore_patterns("__pycache__")
            shutil.copytree(ROOT / name, source / name, ignore=skip)
        else:
            shutil.copyfile(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(wheels)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("deconcnn_curvature-*.whl")
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    shipped = sorted(p.relative_to(ROOT / "configs") for p in (ROOT / "configs").rglob("*.yaml"))
    installed = target / "deconcnn_curvature" / "conf"
    assert sorted(p.relative_to(installed) for p in installed.rglob("*.yaml")) == shipped

    env = {k: v for k, v in os.environ.items() if k != "DECONCNN_CURVATURE_CONFIG_DIR"}
    env["PYTHONPATH"] = str(target)
    code = (
        "import deconcnn_curvature as d\n"
        f"assert d.__file__.startswith({str(target)!r}), d.__file__\n"
        "from deconcnn_curvature.training.run import default_config_dir\n"
        "print(default_config_dir())\n"
        "from deconcnn_curvature.cli import main\n"
        "main(['train', '--cfg', 'model=small_cnn', 'curvature=hutchpp'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    first, rest = out.stdout.split("\n", 1)
    assert Path(first) == installed
    assert "name: small_cnn" in rest and "backend: hutchpp" in rest, rest
