"""``deconcnn-curv train [OVERRIDES...]``: the deconCNN-shaped training run, curvature on.

Overrides are Hydra's (``key=value``, ``group=option``, ``+preset=demo``) and go to Hydra's
compose API; the run itself is :func:`deconcnn_curvature.training.run.run_training`. Lightning and
Hydra are imported only when the command runs, so the rest of the CLI starts fast without them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from deconcnn_curvature.cli import cli, console, print_json, user_errors
from deconcnn_curvature.errors import ConfigurationError

__all__ = ["train_cmd"]


def _check_training_extra() -> None:
    """The training run needs the ``lightning`` extra; say so instead of a traceback."""
    missing = []
    for name in ("lightning", "hydra", "omegaconf"):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: sys.modules[name] is None (blocked)
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise ConfigurationError(
            f"deconcnn-curv train needs the lightning extra ({', '.join(missing)} not installed): "
            "pip install 'deconcnn-curvature[lightning]' (with your torch pinned, see the README)."
        )
    from deconcnn_curvature.monitor.lightning_import import check_lightning_importable

    check_lightning_importable()


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Show the package's own warnings (a lock file instead of flock, a torn record moved aside)
    as one line each, ``deconcnn-curv train: warning: ...``, not Python's two-line form."""
    formatted = warnings.formatwarning

    def one_line(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> str:
        if category.__module__.startswith("deconcnn_curvature"):
            return f"deconcnn-curv train: warning: {message}\n"
        return formatted(message, category, *args, **kwargs)

    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = formatted


@cli.command(
    "train",
    context_settings={"ignore_unknown_options": True},
    short_help="Train a CIFAR ResNet-18 with curvature measured during training.",
)
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@click.option(
    "--config-dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="Folder holding train.yaml and its groups (default: the shipped configs; "
    "$DECONCNN_CURVATURE_CONFIG_DIR also sets it).",
)
@click.option(
    "--cfg",
    "show_cfg",
    is_flag=True,
    help="Print the composed config and exit (`--cfg job`, Hydra's form, works too).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
@click.option(
    "-m",
    "--multirun",
    is_flag=True,
    help="Run a grid through Hydra's sweeper and launcher (optim.lr=0.05,0.1 seed=0,1,2): "
    "each job a run folder under hydra.sweep.dir (see docs/sweeps.md).",
)
@click.option(
    "--trust-config",
    is_flag=True,
    help="On resume, build whatever the run folder's config.yaml names (_target_, batch_fn), "
    "even code no config of this package or yours names: only for a folder you wrote.",
)
@user_errors
def train_cmd(
    overrides: tuple[str, ...],
    config_dir: Path | None,
    show_cfg: bool,
    as_json: bool,
    multirun: bool,
    trust_config: bool,
) -> None:
    """Train a deconCNN-shaped CIFAR run (ResNet-18, SGD + momentum, warm-up + cosine) and
    measure curvature during it.

    OVERRIDES are Hydra overrides, for example:

    \b
      deconcnn-curv train +preset=demo                  # small: a few minutes on 2 idle CPU cores
      deconcnn-curv train model.width_mult=0.25 trainer.max_epochs=5 name=w025
      deconcnn-curv train curvature=hutchpp curvature.compute_every_n_steps=200
      deconcnn-curv train data=cifar10 data.root=/data/cifar trainer.accelerator=gpu
      deconcnn-curv train resume=runs/w025/last.ckpt run_dir=runs/w025

    The run folder (runs/<name or timestamp>/, or run_dir=; the demo's is runs/demo/) gets
    config.yaml, metrics.jsonl, curvature.jsonl, last.ckpt and curvature.png; a summary table is
    printed at the end. A resume takes the run's own config.yaml with these overrides on top. A
    second run into a folder in use stops at once; SIGTERM saves last.ckpt and exits with 143
    (Ctrl-C: 130), abandoning a measurement in progress. A resume builds only what the shipped
    configs or your --config-dir name (--trust-config lifts that for a folder you wrote).
    """
    _check_training_extra()
    from deconcnn_curvature.present import summary_table
    from deconcnn_curvature.training.run import (
        TrainingInterrupted,
        compose_run_config,
        run_training,
    )

    if show_cfg:  # Hydra's `--cfg job`: a bare word is never an override (key=value)
        overrides = tuple(o for o in overrides if o not in ("job", "all"))
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        raise click.UsageError(
            f"unknown option {bad[0]!r}; overrides look like key=value (see --help)."
        )
    if multirun:
        from deconcnn_curvature.cli.multirun import train_multirun

        return train_multirun(overrides, config_dir, show_cfg=show_cfg, as_json=as_json)
    cfg, notes = compose_run_config(overrides, config_dir, trust_config=trust_config)
    for note in notes:
        click.echo(f"deconcnn-curv train: {note}", err=True)
    if show_cfg:
        from omegaconf import OmegaConf

        click.echo(OmegaConf.to_yaml(cfg), nl=False)
        return
    try:
        with _one_line_warnings():
            if as_json:  # stdout carries the JSON alone; Lightning's own output goes to stderr
                with contextlib.redirect_stdout(sys.stderr):
                    result = run_training(cfg)
            else:
                result = run_training(cfg)
    except TrainingInterrupted as exc:  # SIGTERM / Ctrl-C: not a success for a scheduler
        click.echo(f"Error: {exc}", err=True)
        sys.exit(exc.exit_code)
    if result.global_rank != 0:  # a DDP rank process: rank 0 reports for the run
        return
    if as_json:
        print_json(result.to_dict())
        return
    console().print(summary_table(result))
