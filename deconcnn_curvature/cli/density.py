"""``deconcnn-curv density``: the Hessian's spectral density (SLQ) of a checkpoint, with its top
eigenvalues, as a table, a plot or JSON.

:func:`deconcnn_curvature.density` computes both; the smoothing, the table and the figure come
from :mod:`deconcnn_curvature.present`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import torch

import deconcnn_curvature as dcc
from deconcnn_curvature.api import density_plan
from deconcnn_curvature.checkpoints import LoadedCheckpoint, parse_key_values
from deconcnn_curvature.cli import cli, console, print_json, user_errors
from deconcnn_curvature.cli.common import (
    LABELS,
    backend_option,
    cli_host_hint,
    command_settings,
    load_options,
    load_problem,
    resolve_device,
)
from deconcnn_curvature.cli.memory import ProgressDisplay
from deconcnn_curvature.cli.progress import interruptible
from deconcnn_curvature.errors import ConfigurationError
from deconcnn_curvature.present import (
    check_plot_path,
    default_sigma,
    density_json,
    density_title,
    plot_density,
    print_header,
    show_density,
    smooth,
)
from deconcnn_curvature.registry import default_backend_name
from deconcnn_curvature.results import Density

__all__ = ["density_cmd"]


def _num_samples(loaded: LoadedCheckpoint) -> int:
    return sum(int(y.shape[0]) if isinstance(y, torch.Tensor) else len(y) for _, y in loaded.data)


def _write_plot(
    path: Path,
    checkpoint: Path,
    loaded: LoadedCheckpoint,
    backend_name: str,
    density: Density,
    eigenvalues: list[float],
    width: float,
    grid: Any,
    curve: Any,
    *,
    log_scale: bool,
) -> str | None:
    """Write the figure to ``path``; why it could not be written, or None."""
    try:
        plot_density(
            path,
            grid,
            curve,
            eigenvalues,
            log_scale=log_scale,
            nodes=density.nodes,
            dim=density.dim,
            title=density_title(checkpoint),
            subtitle=(
                f"{backend_name} SLQ, {density.num_runs} runs x {density.lanczos_steps} "
                f"steps, σ = {width:.3g}; {_num_samples(loaded)} samples of "
                f"{loaded.data_description.split(':')[0]}"
            ),
        )
    except ConfigurationError as exc:
        return str(exc)
    return None


@cli.command("density")
@load_options
@backend_option
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write a plot of the density to this image file (.png, .pdf, .svg).",
)
@click.option("--log-scale", is_flag=True, help="Logarithmic density axis.")
@click.option(
    "--sigma",
    type=click.FloatRange(min=0, min_open=True),
    help="Width of the Gaussian smoothing (default: 1/100 of the spectrum's span).",
)
@click.option(
    "--grid-points", type=click.IntRange(min=10, max=100_000), default=1000, show_default=True
)
@click.option(
    "-k",
    "k",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Top eigenvalues to mark, 0: none (the backend's option k).",
)
@click.option(
    "-o",
    "--option",
    "extra_options",
    multiple=True,
    metavar="NAME=VALUE",
    help="Backend option for the density or the eigenvalues, e.g. -o lanczos_steps=120.",
)
@user_errors
def density_cmd(
    checkpoint: Path,
    backend: str | None,
    plot_path: Path | None,
    log_scale: bool,
    sigma: float | None,
    grid_points: int,
    k: int,
    extra_options: tuple[str, ...],
    as_json: bool,
    quiet: bool,
    device: str,
    **load: Any,
) -> None:
    """Spectral density of the Hessian (stochastic Lanczos quadrature) of a CHECKPOINT, with its
    top eigenvalues, as a table, a plot (--plot) or JSON.

    The density is smoothed with a Gaussian of width --sigma (Ghorbani, Krishnan & Xiao, ICML
    2019); the top-k eigenvalues come from the same backend (Lanczos for pyhessian).
    """
    dev = resolve_device(device)
    trust = load.pop("trust_checkpoint")
    settings = command_settings(device=dev, **load)
    backend_name = backend or default_backend_name()
    extra = parse_key_values(extra_options, "-o/--option")
    plan = density_plan(
        backend_name, k, extra, labels=LABELS, option_label="-o {}", host_hint=cli_host_hint
    )
    density_full = plan.resolve()["density"]
    if plot_path is not None:
        check_plot_path(plot_path.expanduser())

    with interruptible("density"), ProgressDisplay(quiet) as progress:
        progress.step(f"loading {checkpoint.name}")
        loaded = load_problem(checkpoint, settings, dev, trust)
        steps = {
            "density": f"density with {backend_name} on {dev}",
            "eigenvalues": f"top-{k} eigenvalues with {backend_name} on {dev}",
        }
        dens, eig = dcc.density(
            loaded.model,
            loaded.loss_fn,
            loaded.data,
            backend_name,
            k=k,
            seed=settings["seed"],
            options=extra,
            before=lambda q: progress.step(steps[q]),
        )

    density: Density = dens.value
    eigenvalues = [float(v) for v in eig.value] if eig is not None else []
    width = sigma if sigma is not None else default_sigma(density)
    # The computed numbers are always shown; a smoothing width that cannot work, or a plot that
    # cannot be written, is reported after them (exit 1), never instead of them.
    problem, grid, curve = smooth(density, eigenvalues, width, grid_points)
    plot_problem = None
    if plot_path is not None and problem is None:
        plot_problem = _write_plot(
            plot_path.expanduser(), checkpoint, loaded, backend_name, density, eigenvalues,
            width, grid, curve, log_scale=log_scale,
        )  # fmt: skip
    failure = problem or plot_problem
    shown = None if failure else plot_path
    try:
        if as_json:
            print_json(
                density_json(
                    checkpoint, loaded, dev, density_full, dens, eig, width, grid, curve, shown
                )
            )
        else:
            out = console()
            if not quiet:
                print_header(out, checkpoint, loaded, dev)
            show_density(out, checkpoint, dens, eig, backend_name, settings["seed"], width, shown)
    finally:
        if failure:
            raise ConfigurationError(failure)
