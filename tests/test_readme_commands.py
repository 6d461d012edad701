"""Every shell command of README.md, run as written (at reduced sizes) in a fresh folder.

The README is the product's front door: a command copied from it must work, or fail
with the one-line message the README announces. This test collects every line of its ```bash
blocks (continuation lines joined) and every ``$ command`` line of its output transcripts, and
runs each with ``bash -c`` in a temporary folder, with this virtual environment's ``bin`` first on
``PATH`` and ``HOME`` pointing into the folder (so ``~/data`` holds nothing). It fails on a
traceback or a non-zero exit, except for the commands in :data:`EXPECTED_FAILURES`, which must
exit non-zero with their one-line message.

What is changed, and why (the commands themselves are never edited):

* A tiny demo run is made first (``+preset=demo run_dir=runs/demo`` plus :data:`TINY`), so the
  README's ``runs/demo/last.ckpt`` exists.
* ``deconcnn-curv`` is a shell function that appends arguments to the README's command: for
  ``train``, the overrides of :data:`TINY` whose keys the command does not set itself (a full
  ``+preset=demo`` run takes minutes; not for a ``resume=``, which takes the run's own saved
  configuration, nor for the expected failures, which fail as written); for ``estimate``,
  ``compare`` and ``density``, :data:`CHECKPOINT_SIZES` (``--batch-size 8``, a smaller
  ``--num-hvps`` where the command gives one: Click keeps the last value). The README's own
  settings stay in force otherwise.
* Skipped, see :data:`SKIPPED`: ``bash tasks.sh ...`` and ``pip install ...`` (they install; this
  suite runs inside what they install, and ``bash tasks.sh test`` runs this very suite) and the
  benchmark scripts (minutes each at the README's sizes; ``tests/test_benchmarks.py`` runs every
  one of them at smoke size).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: Overrides that make a README ``train`` command tiny (seconds); a key the command sets itself
#: keeps the command's value. ``run_dir`` gets a fresh folder per command unless it names one.
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

#: Command prefixes not run, with the reason.
SKIPPED: dict[str, str] = {
    "bash tasks.sh": "installs the environment this suite runs in ('test' runs this suite)",
    "pip install": "installs packages",
    "python benchmarks/": "minutes at the README's sizes; tests/test_benchmarks.py runs it small",
}

#: Commands the README shows that cannot work on a machine without CIFAR-10 data or a GPU, and
#: the message each must show (one of the alternatives; one line, no traceback, non-zero exit).
EXPECTED_FAILURES: dict[str, tuple[str, ...]] = {
    # No CIFAR-10 under ~/data/cifar (HOME is an empty folder here).
    "deconcnn-curv train data=cifar10 data.root=~/data/cifar": ("CIFAR-10 folder",),
    # No GPU on this machine (skipped where there is one: that run is the full-size job).
    "deconcnn-curv train model.width_mult=0.5 model.norm_type=none trainer.accelerator=gpu": (
        "gpu",
    ),
    # weights.pt and mypkg are the reader's own; the README shows the shape of the command.
    "deconcnn-curv estimate weights.pt --model mypkg.nets:small_cnn": (
        "--device cuda:0: no CUDA GPU",
        "weights.pt does not exist",
    ),
}


def _strip(command: str) -> str:
    """The command without its comment, whitespace normalised (the key of the tables above)."""
    return " ".join(shlex.split(command, comments=True))


def readme_commands() -> list[str]:
    """Every shell command of the README, in order: lines of ```bash blocks (continuations
    joined, comment-only lines dropped) and ``$ ...`` lines of plain ``` output blocks."""
    commands: list[str] = []
    fence: str | None = None
    pending = ""
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            continue
        if fence == "bash":
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            text = (pending + line).strip()
            pending = ""
            if text and not text.startswith("#"):
                commands.append(text)
        elif fence == "" and line.startswith("$ "):
            commands.append(line[2:].strip())
    return commands


def _expected_failure(command: str) -> tuple[str, ...] | None:
    key = _strip(command)
    return next((msg for prefix, msg in EXPECTED_FAILURES.items() if key.startswith(prefix)), None)


def _skip_reason(command: str) -> str | None:
    key = _strip(command)
    return next((why for prefix, why in SKIPPED.items() if key.startswith(prefix)), None)


def _extra_arguments(command: str, run_number: int) -> list[str]:
    """What the ``deconcnn-curv`` wrapper appends to ``command`` (see the module docstring)."""
    words = shlex.split(command, comments=True)
    if not words or words[0] != "deconcnn-curv" or len(words) < 2:
        return []
    sub = words[1]
    if sub == "train":
        if any(w.startswith("resume=") for w in words):
            return []  # a resume takes the run's own saved configuration (the tiny demo's)
        given = {w.split("=", 1)[0].lstrip("+~") for w in words[2:] if "=" in w}
        extra = [o for o in TINY if o.split("=", 1)[0] not in given]
        if "run_dir" not in given:
            extra.append(f"run_dir=runs/readme-{run_number}")
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
        README_EXTRA=" ".join(shlex.quote(a) for a in extra),
    )
    wrapper = 'deconcnn-curv() { eval "command deconcnn-curv \\"\\$@\\" $README_EXTRA"; }\n'
    return subprocess.run(
        ["bash", "-c", wrapper + command],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh folder with ``.venv`` (this environment) and a tiny demo run in ``runs/demo``."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "home").mkdir()
    (folder / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    demo = "deconcnn-curv train +preset=demo run_dir=runs/demo"
    done = _run(demo, folder, [o for o in TINY])
    assert done.returncode == 0, done.stdout + done.stderr
    assert (folder / "runs" / "demo" / "last.ckpt").is_file()
    return folder


COMMANDS = readme_commands()


def test_the_readme_has_the_commands_this_test_knows() -> None:
    """The tables above name commands of the README; a stale entry would silently stop
    checking anything."""
    keys = [_strip(c) for c in COMMANDS]
    for prefix in EXPECTED_FAILURES:
        assert any(k.startswith(prefix) for k in keys), prefix
    assert any(k.startswith("deconcnn-curv estimate runs/demo/last.ckpt") for k in keys)
    assert any(k.startswith("deconcnn-curv train resume=runs/demo/last.ckpt") for k in keys)
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize(
    "command", COMMANDS, ids=[re.sub(r"\s+", " ", _strip(c))[:70] for c in COMMANDS]
)
def test_readme_command_works_as_written(workdir: Path, command: str) -> None:
    reason = _skip_reason(command)
    if reason is not None:
        pytest.skip(reason)
    expected = _expected_failure(command)
    if expected == ("gpu",):
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present: this README line is the full-size run")
    extra = [] if expected else _extra_arguments(command, COMMANDS.index(command))
    done = _run(command, workdir, extra)
    output = done.stdout + done.stderr
    shown = f"$ {command}  [+ {' '.join(extra)}]\nexit {done.returncode}\n{output[-3000:]}"
    assert "Traceback (most recent call last)" not in output, shown
    if expected is None:
        assert done.returncode == 0, shown
        return
    assert done.returncode != 0, shown
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("Error")]
    assert len(errors) == 1, shown  # one line saying what is wrong
    assert any(text.lower() in errors[0].lower() for text in expected), shown
