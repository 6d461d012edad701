"""``deconcnn-curv estimate``: one curvature quantity of a saved checkpoint, with one backend.

The checkpoint is loaded once through :func:`deconcnn_curvature.checkpoints.open_checkpoint`
(plugins' ``load_checkpoint`` hooks first, then the built-in loaders; see
:mod:`deconcnn_curvature.cli.common`, shared with ``compare`` and ``density``), the model moved
to ``--device``, and :func:`deconcnn_curvature.estimate` called; nothing here computes curvature
itself. Package errors become one ``Error: ...`` line and exit code 1; Click's own checks
(out-of-range numbers, unknown choices) exit with 2. Interrupted (Ctrl-C, SIGTERM), a trace
shows what the products already made give, marked PARTIAL (:mod:`deconcnn_curvature.cli.progress`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

import deconcnn_curvature as dcc
from deconcnn_curvature.backends.progress import trace_progress
from deconcnn_curvature.cli import cli, console, print_json, user_errors
from deconcnn_curvature.cli.common import (
    backend_option,
    command_settings,
    estimator_options,
    estimator_settings,
    load_options,
    load_problem,
    plan_options,
    resolve_device,
)
from deconcnn_curvature.cli.memory import ProgressDisplay
from deconcnn_curvature.cli.progress import (
    RunningTrace,
    exit_code,
    print_partial,
    signals_interrupt,
)
from deconcnn_curvature.present import print_header, show_estimate
from deconcnn_curvature.registry import default_backend_name

__all__ = ["estimate_cmd", "resolve_device"]


def _not_density(checkpoint: Path, quantity: str) -> None:
    """The density has its own command (smoothing, eigenvalue marks, a plot): point to it."""
    if quantity == "density":
        raise click.BadParameter(
            f"the spectral density has its own command: use `deconcnn-curv density {checkpoint}` "
            "(smoothed, with the top eigenvalues marked, --plot to draw it).",
            param_hint="'-q' / '--quantity'",
        )


@cli.command("estimate")
@load_options
@backend_option
@click.option(
    "-q",
    "--quantity",
    default="trace",
    show_default=True,
    help="trace, eigenvalues, layer_trace, diagonal (what the backend computes).",
)
@estimator_options
@user_errors
def estimate_cmd(
    checkpoint: Path,
    backend: str | None,
    quantity: str,
    as_json: bool,
    quiet: bool,
    device: str,
    **load: Any,
) -> None:
    """Measure one curvature quantity of a saved CHECKPOINT with one backend.

    \b
    deconcnn-curv estimate runs/demo/last.ckpt -q eigenvalues -k 3
    deconcnn-curv estimate weights.pt --model mypkg.nets:small_cnn --model-arg width=8 \\
        --data cifar10 --data-root ~/data --num-hvps 200 --json
    """
    _not_density(checkpoint, quantity)
    dev = resolve_device(device)
    trust = load.pop("trust_checkpoint")
    given = estimator_settings(load)
    settings = command_settings(device=dev, **load)
    backend_name = backend or default_backend_name()
    cls, _ = dcc.resolve(quantity, backend_name)  # unknown / unsupported / unavailable
    plan = plan_options(cls, quantity, given)  # which option each setting is
    opts, full = plan.calls[0].options, plan.resolve()[quantity]  # the values, checked

    running = RunningTrace(f"{quantity} with {backend_name} on {dev}")
    try:
        with signals_interrupt(), ProgressDisplay(quiet) as progress:
            progress.step(f"loading {checkpoint.name}")
            loaded = load_problem(checkpoint, settings, dev, trust)
            running.progress = progress
            progress.step(running.label)
            with trace_progress(running.update):
                result = dcc.estimate(
                    loaded.model,
                    loaded.loss_fn,
                    loaded.data,
                    quantity,
                    backend_name,
                    seed=settings["seed"],
                    **opts,
                )
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM through signals_interrupt
        print_partial(exc, running, quantity, backend_name, settings, as_json, checkpoint, dev)
        raise click.exceptions.Exit(exit_code(exc)) from None

    if as_json:
        print_json(
            {
                "checkpoint": str(checkpoint),
                "loaded": loaded.describe(),
                "device": str(dev),
                "options": full,
                "result": result.to_dict(),
            }
        )
        return
    out = console()
    if not quiet:
        print_header(out, checkpoint, loaded, dev)
    show_estimate(out, result, quantity, backend_name, quiet)
