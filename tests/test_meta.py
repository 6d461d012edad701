"""Meta-tests that keep the extension surface and the public API honest.

Every hook in :mod:`deconcnn_curvature.hookspecs` is documented and exercised by some test; every
name in ``__all__`` resolves.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

import deconcnn_curvature as dcc
from deconcnn_curvature import hookspecs

TESTS = Path(__file__).parent
MARKER = f"{hookspecs.PROJECT_NAME}_spec"


def _hookspecs() -> list[str]:
    return sorted(
        name
        for name, obj in vars(hookspecs).items()
        if inspect.isfunction(obj) and hasattr(obj, MARKER)
    )


def _test_sources() -> str:
    me = Path(__file__).resolve()
    return "\n".join(
        p.read_text(encoding="utf-8") for p in TESTS.rglob("*.py") if p.resolve() != me
    )


def test_there_are_hookspecs() -> None:
    assert "register_backends" in _hookspecs()


@pytest.mark.parametrize("hook", _hookspecs())
def test_hookspec_is_documented(hook: str) -> None:
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert len(doc.split()) >= 10, f"hook {hook} needs a docstring saying when it is called"
    params = inspect.signature(getattr(hookspecs, hook)).parameters
    for param in params:
        assert re.search(rf":param {param}:", doc), f"hook {hook}: argument {param} undocumented"
    assert "return" in doc.lower(), f"hook {hook}: say what to return"


@pytest.mark.parametrize("hook", _hookspecs())
def test_hookspec_is_exercised_by_a_test(hook: str) -> None:
    assert re.search(rf"\b{hook}\b", _test_sources()), f"no test mentions hook {hook}"


@pytest.mark.parametrize(
    "module",
    [
        "deconcnn_curvature",
        "deconcnn_curvature.api",
        "deconcnn_curvature.backend",
        "deconcnn_curvature.errors",
        "deconcnn_curvature.hookspecs",
        "deconcnn_curvature.plugins",
        "deconcnn_curvature.registry",
        "deconcnn_curvature.problem",
        "deconcnn_curvature.results",
        "deconcnn_curvature.hvp",
        "deconcnn_curvature.linalg",
        "deconcnn_curvature.linalg.hutchinson",
        "deconcnn_curvature.linalg.hutchpp",
        "deconcnn_curvature.linalg.lanczos",
        "deconcnn_curvature.linalg.slq",
        "deconcnn_curvature.linalg.operator",
        "deconcnn_curvature.backends.pyhessian",
        "deconcnn_curvature.backends.hutchpp",
        "deconcnn_curvature.backends.common",
        "deconcnn_curvature.cli",
    ],
)
def test_all_names_resolve(module: str) -> None:
    mod = importlib.import_module(module)
    names = getattr(mod, "__all__", None)
    assert names, f"{module} has no __all__"
    assert len(names) == len(set(names)), f"{module}.__all__ repeats a name"
    for name in names:
        if module == "deconcnn_curvature" and name == "CurvatureMonitor":
            pytest.importorskip("lightning")
        assert getattr(mod, name) is not None, f"{module}.{name}"


def test_top_level_api_is_documented() -> None:
    for name in ("estimate", "list_backends", "get_backend", "resolve"):
        assert inspect.getdoc(getattr(dcc, name)), name
    assert dcc.__version__ and dcc.__version__ != "0.0.0+unknown"
