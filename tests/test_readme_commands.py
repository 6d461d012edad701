"""Every shell command of the documentation (README.md, migration.md, docs/*.md), run as written
at reduced sizes, in a fresh folder.

A command copied from the documentation must work, or fail with the one-line message the page
announces. Each ```bash block (and each ``$ `` line of an output block) is one test: its commands
run in order with ``bash -c`` in one folder shared by all blocks, which holds ``.venv`` (this
environment), the repository's ``configs/`` and ``benchmarks/``, ``HOME`` (empty, so ``~/data``
holds nothing) and a tiny demo run in ``runs/demo``. A command fails the test on a traceback or a
non-zero exit. Which blocks run is decided by the visible markers :mod:`doc_blocks` reads:
``not-run`` blocks are skipped with their reason, and each command of an ``expect-error`` block
must exit non-zero with one ``Error`` line holding the announced message.

What is changed, and why (the commands themselves are never edited):

* ``deconcnn-curv`` is a shell function that appends arguments: for ``train``, the overrides of
  :data:`TINY` whose keys the command does not set itself (not for a ``resume=``, which takes the
  run's own saved configuration); for ``estimate``, ``compare`` and ``density``,
  :data:`CHECKPOINT_SIZES` (and a smaller ``--num-hvps`` where the command gives one: Click keeps
  the last value). Expected failures get nothing appended: they fail as written.
* ``python benchmarks/NAME.py`` gets ``--out results/NAME.json``: the JSON goes to the folder,
  not into the repository. The pages give benchmark commands that run at ``--quick`` size.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from doc_blocks import ROOT, Block, all_blocks

pytestmark = pytest.mark.slow

#: Overrides that make a ``train`` command tiny (seconds); a key the command sets itself keeps
#: the command's value. ``run_dir`` gets a fresh folder per command unless it names one.
TINY: tuple[str, ...] = (
    "data.num_train=64",
    "data.num_val=16",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.val_check_interval=1.0",
    "trainer.enable_progress_bar=false",
    "curvature.compute_every_n_steps=2",
    "curvature.num_hvps=6",  # Hutch++ needs at least 5
    "curvature.hessian_batch_size=8",
)
#: Appended to the checkpoint commands: fewer samples and products, same code paths.
CHECKPOINT_SIZES: tuple[str, ...] = ("--batch-size", "8")
SMALL_BUDGET: tuple[str, ...] = ("--num-hvps", "20")
DENSITY_SIZES: tuple[str, ...] = ("-o", "lanczos_steps=12", "-o", "num_runs=1")

SHELL_BLOCKS = [b for b in all_blocks() if b.commands()]


def _extra_arguments(command: str, number: int) -> list[str]:
    """What the wrappers append to ``command`` (see the module docstring)."""
    words = shlex.split(command, comments=True)
    if len(words) >= 2 and words[0] == "python" and words[1].startswith("benchmarks/"):
        return ["--out", f"results/{Path(words[1]).stem}.json"]
    if len(words) < 2 or words[0] != "deconcnn-curv":
        return []
    sub = words[1]
    if sub == "train":
        if any(w.startswith("resume=") for w in words):
            return []  # a resume takes the run's own saved configuration (a tiny one here)
        given = {w.split("=", 1)[0].lstrip("+~") for w in words[2:] if "=" in w}
        extra = [o for o in TINY if o.split("=", 1)[0] not in given]
        if "run_dir" not in given:
            extra.append(f"run_dir=runs/doc-{number}")
        return extra
    if sub in ("estimate", "compare", "density") and "--help" not in words:
        extra = list(CHECKPOINT_SIZES)
        if "--num-hvps" in words:
            extra += SMALL_BUDGET
        if sub == "density":
            extra += DENSITY_SIZES
        return extra
    return []


def _run(command: str, workdir: Path, extra: list[str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DECONCNN_CURVATURE_")}
    env.update(
        PATH=f"{Path(sys.prefix) / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        HOME=str(workdir / "home"),
        MPLBACKEND="Agg",
        COLUMNS="120",
        DOC_EXTRA=" ".join(shlex.quote(a) for a in extra),
    )
    wrapper = (
        'deconcnn-curv() { eval "command deconcnn-curv \\"\\$@\\" $DOC_EXTRA"; }\n'
        'python() { eval "command python \\"\\$@\\" $DOC_EXTRA"; }\n'
    )
    return subprocess.run(
        ["bash", "-c", wrapper + command],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def docs_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh folder laid out like a checkout, with a tiny demo run in ``runs/demo``."""
    folder = tmp_path_factory.mktemp("docs")
    (folder / "home").mkdir()
    (folder / "results").mkdir()
    (folder / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    for name in ("configs", "benchmarks"):
        (folder / name).symlink_to(ROOT / name, target_is_directory=True)
    done = _run("deconcnn-curv train +preset=demo run_dir=runs/demo", folder, list(TINY))
    assert done.returncode == 0, done.stdout + done.stderr
    assert (folder / "runs" / "demo" / "last.ckpt").is_file()
    return folder


def test_the_pages_have_the_commands_this_test_relies_on() -> None:
    """The demo checkpoint's commands, a resume, an expected failure and a benchmark are shown
    and run: a page rewritten without them would silently stop checking them."""
    run = [c for b in SHELL_BLOCKS if b.marker != "not-run" for c in b.commands()]
    assert any(c.startswith("deconcnn-curv estimate runs/demo/last.ckpt") for c in run)
    assert any(c.startswith("deconcnn-curv train resume=") for c in run)
    assert any(c.startswith("python benchmarks/") and "--quick" in c for c in run)
    assert any(b.marker == "expect-error" for b in SHELL_BLOCKS)


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=[b.where for b in SHELL_BLOCKS])
def test_documented_commands_work_as_written(docs_workdir: Path, block: Block) -> None:
    if block.marker == "not-run":
        pytest.skip(f"{block.where} marked not-run: {block.reason}")
    for number, command in enumerate(block.commands()):
        expected = block.expected_error if block.marker == "expect-error" else None
        extra = [] if expected else _extra_arguments(command, block.line * 100 + number)
        done = _run(command, docs_workdir, extra)
        output = done.stdout + done.stderr
        shown = (
            f"{block.where}: $ {command}  [+ {' '.join(extra)}]\n"
            f"exit {done.returncode}\n{output[-3000:]}"
        )
        assert "Traceback (most recent call last)" not in output, shown
        if expected is None:
            assert done.returncode == 0, shown
            continue
        assert done.returncode != 0, shown
        errors = [ln for ln in done.stderr.splitlines() if ln.startswith("Error")]
        assert len(errors) == 1, shown  # one line saying what is wrong
        assert expected.lower() in errors[0].lower(), shown
