"""The package's import layers, read from the source with ``ast``.

Layers, lowest first; a module may import its own layer and the layers below it, never above:

* ``base``: errors, the JSONL record helpers;
* ``contract``: the values every layer above exchanges (problem, results, the backend contract);
* ``numerics``: linear algebra, the Hessian operator, the distributed agreement, data sets;
* ``extension``: the hook specifications, the plugin manager, the registry, the built-in backends;
* ``api``: ``estimate()`` and the checkpoint loaders;
* ``front``: the package's facade, the command line, the Lightning callback.

``training/`` (the reference training run, and ``cli/train.py``, its command, which the CLI loads
by name) sits above everything and nothing in the core imports it. Every import counts:
module-level, inside functions, and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

PACKAGE = "deconcnn_curvature"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("errors", "_seeds")),
    ("contract", ("problem", "results", "backend", "losses", "monitor.records")),
    (
        "numerics",
        ("linalg", "linalg.*", "hvp", "distributed", "checkpoints.cifar", "checkpoints.data"),
    ),
    # defaults: the table of defaults reads the built-in backends' declarations
    ("extension", ("hookspecs", "plugins", "registry", "backends", "backends.*", "defaults")),
    ("api", ("api", "checkpoints", "checkpoints.*", "analysis", "analysis.*")),
    ("front", ("", "__main__", "present", "monitor", "monitor.*", "cli", "cli.*")),
    # `deconcnn-curv train` is the training run's command: the CLI loads it by name, like a plugin.
    ("training", ("training", "training.*", "cli.train", "cli.multirun")),
)


def _layer_of(module: str) -> int:
    """Index into :data:`LAYERS` of ``module`` (relative to the package, ``""`` = the package)."""
    for i, (_, patterns) in enumerate(LAYERS):  # an exact name wins over a `package.*`
        if module in patterns:
            return i
    for i, (_, patterns) in enumerate(LAYERS):
        if any(p.endswith(".*") and module.startswith(p[:-1]) for p in patterns):
            return i
    raise AssertionError(
        f"module {PACKAGE}.{module} has no layer: add it to LAYERS in tests/test_layers.py"
    )


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(module: str, source: str, known: Iterable[str]) -> set[str]:
    """The package modules ``source`` (the text of ``module``) imports, anywhere in the file."""
    known = set(known)
    here = [p for p in module.split(".") if p]
    found: set[str] = set()

    def add(name: str) -> None:  # name relative to the package; keep the longest known prefix
        parts = name.split(".") if name else []
        while parts and ".".join(parts) not in known:
            parts.pop()
        found.add(".".join(parts))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(alias.name[len(PACKAGE) + 1 :])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package_parts = here if _is_package_init(module) else here[:-1]
                base = package_parts[: len(package_parts) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module == PACKAGE or (node.module or "").startswith(PACKAGE + "."):
                target = (node.module or "")[len(PACKAGE) + 1 :]
            else:
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{alias.name}" if target else alias.name
                add(sub if sub in known else target)
    found.discard(module)
    return found


_PACKAGE_INITS: set[str] = set()


def _is_package_init(module: str) -> bool:
    return module in _PACKAGE_INITS


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    _PACKAGE_INITS.update(m for m, p in modules.items() if p.name == "__init__.py")
    return {m: _imports(m, p.read_text(), modules) for m, p in modules.items()}


def _upward(graph: Mapping[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if _layer_of(target) > _layer_of(module):
                bad.append(
                    f"{module or PACKAGE} ({LAYERS[_layer_of(module)][0]}) imports "
                    f"{target or PACKAGE} ({LAYERS[_layer_of(target)][0]})"
                )
    return bad


def _cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _core(graph: Mapping[str, set[str]]) -> dict[str, set[str]]:
    return {m: t for m, t in graph.items() if _layer_of(m) < _layer_of("training")}


def test_no_import_from_a_lower_layer_to_a_higher_one() -> None:
    assert _upward(_graph()) == []


def test_no_circle_among_core_modules() -> None:
    assert _cycles(_core(_graph())) == []


def test_no_circle_anywhere_in_the_package() -> None:
    """Every module, ``training/`` included: a circle inside one layer (which the layer order
    cannot see) is still a circle, e.g. ``training.data`` naming ``CIFARDataModule`` on demand
    while ``training.datamodule`` imported its data sets from ``training.data``."""
    graph = _graph()
    assert any(m.startswith("training.") for m in graph)  # the whole package was read
    assert _cycles(graph) == []


def test_training_is_a_leaf_nothing_in_the_core_imports() -> None:
    importers = {
        m: sorted(t for t in targets if _layer_of(t) == _layer_of("training"))
        for m, targets in _core(_graph()).items()
    }
    assert {m: t for m, t in importers.items() if t} == {}


def test_the_checker_sees_upward_imports_and_circles() -> None:
    """The rules above can fail: a synthetic graph with each defect is caught."""
    known = ["errors", "hvp", "registry", "api", "hookspecs", "training", "training.run"]
    _PACKAGE_INITS.add("training")
    function_level = "def f():\n    from deconcnn_curvature.registry import get_registry\n"
    graph = {
        "errors": set(),
        "hvp": _imports("hvp", function_level, known),  # numerics -> extension, in a function
        "api": _imports("api", "from .hookspecs import hookimpl\n", known),
        "hookspecs": _imports(
            "hookspecs",
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from deconcnn_curvature.api import X\n",
            known,
        ),
        "registry": _imports("registry", "from deconcnn_curvature import training\n", known),
    }
    assert graph["hvp"] == {"registry"} and graph["registry"] == {"training"}
    assert _upward(graph) == [
        "hookspecs (extension) imports api (api)",
        "hvp (numerics) imports registry (extension)",
        "registry (extension) imports training (training)",
    ]
    assert _cycles(graph) == [["api", "hookspecs"]]
    # a circle inside one layer, through an import in a module-level `__getattr__` (the shape
    # of the training.data <-> training.datamodule circle), is seen too
    known += ["training.data", "training.datamodule"]
    lazy = (
        "def __getattr__(name):\n"
        "    from deconcnn_curvature.training.datamodule import CIFARDataModule\n"
        "    return CIFARDataModule\n"
    )
    same_layer = {
        "training.data": _imports("training.data", lazy, known),
        "training.datamodule": _imports(
            "training.datamodule", "from deconcnn_curvature.training.data import X\n", known
        ),
    }
    assert _upward(same_layer) == []
    assert _cycles(same_layer) == [["training.data", "training.datamodule"]]
    # inside a sub-package: a relative import names the sibling module, and the records helpers
    # (contract) importing the callback (front) are an upward import
    known += ["monitor", "monitor.callback", "monitor.records"]
    sub_package = {
        "monitor.callback": _imports("monitor.callback", "from .records import R\n", known),
        "monitor.records": _imports(
            "monitor.records", "from deconcnn_curvature.monitor.callback import C\n", known
        ),
    }
    assert sub_package["monitor.callback"] == {"monitor.records"}
    assert _upward(sub_package) == ["monitor.records (contract) imports monitor.callback (front)"]
    assert _cycles(sub_package) == [["monitor.callback", "monitor.records"]]
    with pytest.raises(AssertionError, match="has no layer"):
        _layer_of("brand_new_module")


def _module_level_imports(source: str) -> set[str]:
    """Top-level modules imported when the module runs (not in functions or TYPE_CHECKING)."""
    names: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
    return names


def test_importing_the_package_needs_no_optional_dependency_statically() -> None:
    """Follow the module-level imports from ``deconcnn_curvature``: PyHessian (imported where its
    product is used), BackPACK, Lightning and Hydra are never reached."""
    modules = _modules()
    seen: set[str] = set()
    external: set[str] = set()
    todo = [""]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for name in _module_level_imports(modules[module].read_text()):
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                rel = name[len(PACKAGE) + 1 :]
                todo.extend(m for m in (rel, *rel.split(".")[:1]) if m in modules)
            else:
                external.add(name.split(".")[0])
    assert external.isdisjoint({"pyhessian", "backpack", "lightning", "hydra", "omegaconf"}), (
        sorted(external)
    )
    assert not any(m.startswith("training") for m in seen), sorted(seen)


@pytest.mark.slow
def test_import_deconcnn_curvature_does_not_import_pyhessian() -> None:
    """A fresh interpreter: after ``import deconcnn_curvature`` (and ``estimate``'s module)
    neither PyHessian nor Lightning nor the training package is in ``sys.modules``."""
    code = (
        "import sys, deconcnn_curvature, deconcnn_curvature.api\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('pyhessian', 'lightning', 'backpack', 'hydra')"
        " or m.startswith('deconcnn_curvature.training'))\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
