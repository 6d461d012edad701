"""The documentation's code runs and its site builds: every Python block of every page runs (in
order, one interpreter per page), every fenced block is run or visibly marked, the plugins the
pages show work as installed entry points, the generated tables are current, and
``mkdocs build --strict`` passes. The shell commands run in tests/test_readme_commands.py."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cases import get_case
from doc_blocks import (
    MARKER,
    PAGES,
    ROOT,
    RUN_LANGUAGES,
    TEXT_LANGUAGES,
    all_blocks,
    blocks,
    python_blocks,
)
from test_plugins import write_distribution

import deconcnn_curvature as dcc
from deconcnn_curvature import registry

PYTHON_PAGES = [p for p in PAGES if any(b.marker is None for b in python_blocks(p))]
#: Runs the blocks given as JSON [[where, text], ...] in one namespace, announcing each.
RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
for where, text in json.load(open(sys.argv[1], encoding="utf-8")):
    print(f"--- {where}", flush=True)
    exec(compile(text, where, "exec"), namespace)
"""
#: A warning raised from the package's own code, as Python prints it.
OWN_WARNING = re.compile(r"deconcnn_curvature[/\\][\w/\\]+\.py:\d+: \w*Warning")


def _block(page: str, needle: str) -> str:
    return next(b.text for b in python_blocks(page) if needle in b.text)


@pytest.mark.parametrize("page", PAGES)
def test_every_block_is_run_or_visibly_marked(page: str) -> None:
    """A block is in a language the tests know, and a marker says why it is not run."""
    for block in blocks(page):
        assert block.lang in RUN_LANGUAGES | TEXT_LANGUAGES, (
            f"{block.where}: a ```{block.lang} block is neither run nor a known text language; "
            "use bash, python, toml, yaml or text"
        )
        if block.marker is not None:
            assert block.reason, f"{block.where}: marker without a reason"
            assert block.lang in RUN_LANGUAGES, f"{block.where}: marker on a {block.lang} block"
        if block.marker == "expect-error":
            assert block.commands() and block.lang == "bash", block.where
        if block.lang == "python":
            compile(block.text, block.where, "exec")
    # A marker that does not sit right before a fence marks nothing: a typo, or a moved block.
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if MARKER.match(line.strip()):
            following = next((ln for ln in lines[i + 1 :] if ln.strip()), "")
            assert following.startswith("```"), f"{page}:{i + 1}: marker not before a block"


def test_the_pages_run_something() -> None:
    run = [b for b in all_blocks() if b.lang in RUN_LANGUAGES and b.marker is None]
    assert {b.page for b in run if b.lang == "python"} >= {"README.md", "docs/python.md"}
    assert len(run) > len([b for b in all_blocks() if b.marker == "not-run"])


@pytest.mark.slow
@pytest.mark.parametrize("page", PYTHON_PAGES)
def test_python_blocks_run_in_order(page: str, tmp_path: Path) -> None:
    """The page's Python blocks, run as a reader would: in order, in one session, in a fresh
    folder holding the repository's configs/ (for the pages that copy config files)."""
    (tmp_path / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    code = [[b.where, b.text] for b in python_blocks(page) if b.marker is None]
    (tmp_path / "blocks.json").write_text(json.dumps(code), encoding="utf-8")
    (tmp_path / "runner.py").write_text(RUNNER, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DECONCNN_CURVATURE_")}
    env.update(MPLBACKEND="Agg", DECONCNN_CURVATURE_PLUGINS="")
    done = subprocess.run(
        [sys.executable, "runner.py", "blocks.json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert not OWN_WARNING.search(output), output[-4000:]


@pytest.mark.slow
def test_readme_python_example_gives_an_interval_around_its_value() -> None:
    namespace: dict[str, object] = {}
    exec(python_blocks("README.md")[0].text, namespace)
    r, top = namespace["r"], namespace["top"]
    assert r.quantity == "trace" and r.n_hvp == 100
    assert torch.isfinite(torch.tensor(r.value)) and r.stderr > 0
    assert r.ci[0] < r.value < r.ci[1]
    assert len(top.value) == 1 and top.details["converged"] is True


def _install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str, source: str) -> None:
    module = f"doc_example_{entry}"
    write_distribution(tmp_path, f"doc-{entry}", {entry: module}, {module: source})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DECONCNN_CURVATURE_PLUGINS", entry)
    registry.reset_registry()


def test_plugin_guide_backend_works_as_an_installed_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plugin guide's backend, written out as a distribution with its entry point, is listed
    and gives the exact trace."""
    _install(tmp_path, monkeypatch, "my_backends", _block("docs/plugins.md", "register_backends"))
    try:
        row = next(r for r in dcc.list_backends() if r["name"] == "dense")
        assert row["plugin"] == "doc-my_backends:my_backends" and row["available"] is True
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


def test_readme_plugin_works_as_an_installed_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's one-probe backend is an unbiased trace estimate: its mean over seeds is
    within four standard errors of the exact trace."""
    _install(tmp_path, monkeypatch, "readme_backend", _block("README.md", "register_backends"))
    try:
        case = get_case("mlp")
        model, loss_fn, batch = case.make()
        values = torch.tensor(
            [
                dcc.estimate(model, loss_fn, batch, "trace", backend="one-probe", seed=s).value
                for s in range(200)
            ]
        )
        exact = float(case.exact.trace())
        bound = 4 * float(values.std()) / len(values) ** 0.5
        assert abs(float(values.mean()) - exact) <= bound, (float(values.mean()), exact, bound)
    finally:
        registry.reset_registry()


def test_plugin_guide_checkpoint_loader_loads_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guide's load_checkpoint plugin, installed with its entry point, is asked before the
    built-in loaders and turns its own file into a problem `estimate` measures; other files pass
    through to the built-in loaders."""
    from deconcnn_curvature.checkpoints import CheckpointError, open_checkpoint

    _install(tmp_path, monkeypatch, "my_ckpt", _block("docs/plugins.md", "def load_checkpoint"))
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


def _doc_tables():
    spec = importlib.util.spec_from_file_location("doc_tables", ROOT / "scripts" / "doc_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("page", PAGES)
def test_generated_tables_are_current(page: str) -> None:
    """Tables of measured numbers are what scripts/doc_tables.py makes of docs/data/*.json (and
    the settings table of configs/curvature/base.yaml): never typed, never stale."""
    text = (ROOT / page).read_text(encoding="utf-8")
    assert _doc_tables().generate(text) == text, (
        f"{page} is stale: run python scripts/doc_tables.py --write"
    )


def test_generated_tables_show_where_their_numbers_come_from() -> None:
    tables = _doc_tables()
    for path in sorted((ROOT / "docs" / "data").glob("*.json")):
        text = tables.render(path.stem)
        assert re.search(r"Measured \d{4}-\d\d-\d\d on machine `[^`]+`", text), path.name
        assert f"python benchmarks/{path.stem}.py" in text, path.name


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """mkdocs build --strict: a broken link, a page missing from the nav or an API object that
    does not exist fails the build."""
    mkdocs = Path(sys.prefix) / "bin" / "mkdocs"
    if not mkdocs.exists():
        pytest.fail("mkdocs is not installed: pip install -e '.[docs]' (tasks.sh installs it)")
    done = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").is_file()


def test_the_readme_links_resolve() -> None:
    """The README is read on the forge, outside the site: each relative link names a file."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert local, "the README links no page"
    missing = [link for link in local if not (ROOT / link).is_file()]
    assert not missing, missing
