"""The documentation's code runs: the README's Python example, and every Python block parses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from cases import get_case
from test_plugins import write_distribution

import deconcnn_curvature as dcc
from deconcnn_curvature import registry

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "migration.md")


def _python_blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / name).read_text(encoding="utf-8"), re.S)


@pytest.mark.parametrize("name", DOCS)
def test_every_python_block_parses(name: str) -> None:
    blocks = _python_blocks(name)
    assert blocks, f"{name} has no Python example"
    for i, block in enumerate(blocks):
        compile(block, f"{name}[block {i}]", "exec")


def test_readme_python_example_runs_and_gives_finite_numbers() -> None:
    namespace: dict[str, object] = {}
    torch.manual_seed(0)
    exec(_python_blocks("README.md")[0], namespace)
    result = namespace["r"]
    assert result.quantity == "trace"
    assert result.n_hvp <= 400
    assert result.details is None or isinstance(result.details, dict)
    assert torch.isfinite(torch.tensor(result.value))
    assert result.stderr > 0
    assert result.ci[0] < result.value < result.ci[1]


def test_readme_plugin_example_works_as_an_installed_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's plugin, written out as a distribution with its entry point, is listed and
    gives the exact trace."""
    source = next(b for b in _python_blocks("README.md") if "register_backends" in b)
    module = "readme_plugin_example"
    write_distribution(tmp_path, "readme-example", {"my_backends": module}, {module: source})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DECONCNN_CURVATURE_PLUGINS", "my_backends")
    registry.reset_registry()
    try:
        row = next(r for r in dcc.list_backends() if r["name"] == "dense")
        assert row["plugin"] == "readme-example:my_backends" and row["available"] is True
        case = get_case("cnn")
        model, loss_fn, batch = case.make()
        result = dcc.estimate(model, loss_fn, batch, "trace", backend="dense")
        torch.testing.assert_close(result.value, float(case.exact.trace()), rtol=1e-10, atol=0.0)
        assert result.exact and result.n_hvp == case.exact.shape[0]
    finally:
        registry.reset_registry()
