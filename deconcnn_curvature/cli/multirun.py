"""``deconcnn-curv train -m``: the sweep's front end (the sweep itself is
:mod:`deconcnn_curvature.training.sweep`, Hydra's multirun)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

import click

from deconcnn_curvature.cli import print_json

__all__ = ["train_multirun"]


def train_multirun(
    overrides: Sequence[str], config_dir: Path | None, *, show_cfg: bool, as_json: bool
) -> None:
    """Check the overrides, run the sweep, print one line per job (or ``--json``); exit with the
    sweep's code (non-zero when a job did not complete). ``--cfg`` prints the first job's
    configuration."""
    from omegaconf import OmegaConf

    from deconcnn_curvature.training.sweep import check_sweep, run_sweep, summary_lines

    checked = check_sweep(overrides, config_dir)
    if show_cfg:
        click.echo("deconcnn-curv train: the first job's configuration.", err=True)
        click.echo(OmegaConf.to_yaml(checked[0]), nl=False)
        return
    if as_json:  # stdout carries the JSON alone: Hydra's and Lightning's output go to stderr
        with contextlib.redirect_stdout(sys.stderr):
            result = run_sweep(overrides, config_dir, checked=checked)
        print_json(result.to_dict())
    else:
        result = run_sweep(overrides, config_dir, checked=checked)
        for line in summary_lines(result):
            click.echo(line)
    if result.exit_code:
        sys.exit(result.exit_code)
