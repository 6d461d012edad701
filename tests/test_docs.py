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


@pytest.mark.slow
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
        # The declared option is checked and used: a block of 7 columns gives the same trace.
        blocked = dcc.estimate(model, loss_fn, batch, "trace", backend="dense", block=7)
        torch.testing.assert_close(blocked.value, result.value, rtol=1e-12, atol=0.0)
        assert [o["name"] for o in row["options"]] == ["block"]
        with pytest.raises(dcc.InvalidOptionError, match="block"):
            dcc.estimate(model, loss_fn, batch, "trace", backend="dense", block=0)
        # validate_model refuses a model too large for a dense Hessian, before any work.
        big = torch.nn.Linear(200, 200)
        with pytest.raises(dcc.UnsupportedModelError, match="40200 parameters"):
            dcc.estimate(
                big, torch.nn.MSELoss(), (torch.randn(2, 200), torch.randn(2, 200)), "trace",
                backend="dense",
            )  # fmt: skip
    finally:
        registry.reset_registry()


def test_readme_checkpoint_plugin_example_loads_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's load_checkpoint plugin, installed with its entry point, is asked before the
    built-in loaders and turns its own file into a problem `estimate` measures; other files pass
    through to the built-in loaders."""
    from deconcnn_curvature.checkpoints import CheckpointError, open_checkpoint

    source = next(b for b in _python_blocks("README.md") if "def load_checkpoint" in b)
    module = "readme_checkpoint_example"
    write_distribution(tmp_path, "readme-ckpt", {"my_ckpt": module}, {module: source})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DECONCNN_CURVATURE_PLUGINS", "my_ckpt")
    registry.reset_registry()
    try:
        weights = torch.nn.Linear(4, 3).state_dict()
        torch.save({"my_linear": weights}, tmp_path / "mine.pt")
        loaded = open_checkpoint(tmp_path / "mine.pt", {"batch_size": 5, "seed": 3})
        assert loaded.loader == "my-linear" and loaded.data[0][0].shape == (5, 4)
        torch.testing.assert_close(loaded.model.weight.detach(), weights["weight"])
        result = dcc.estimate(loaded.model, loaded.loss_fn, loaded.data, "trace", backend="hutchpp")
        assert torch.isfinite(torch.tensor(result.value))
        torch.save({"other": torch.zeros(1)}, tmp_path / "other.pt")
        with pytest.raises(CheckpointError, match=r"--model package\.module:factory"):
            open_checkpoint(tmp_path / "other.pt")
    finally:
        registry.reset_registry()
