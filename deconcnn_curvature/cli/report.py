"""``deconcnn-curv report RUN_OR_GLOB...``: a sweep of run folders in one table, figure and file.

Reads the run folders (:func:`deconcnn_curvature.analysis.runs.load_runs`), summarises each
(:func:`deconcnn_curvature.analysis.report.summarize_runs`: the λ_max plateau with its interval
included) and prints a row per run; ``--csv``/``--parquet`` write the tidy table of every
measurement, ``--plot`` the trajectories. pandas (the ``analysis`` extra) is imported only when the
command runs.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from deconcnn_curvature.cli import cli, print_json, user_errors

__all__ = ["report_cmd"]


def _read(paths: tuple[str, ...]) -> list[Any]:
    """The runs, each warning of the readers (a torn line) said on one line of stderr."""
    from deconcnn_curvature.analysis.runs import load_runs, require_pandas

    require_pandas()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = load_runs(paths)
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    return runs


def _notes(summaries: list[Any], seed: int, n_boot: int) -> list[str]:
    """The lines under the table: the plateau rule, runs short of λ_max points, first errors."""
    from deconcnn_curvature.analysis.plateau import EWMA_ALPHA, PATIENCE, THRESHOLD
    from deconcnn_curvature.analysis.report import MIN_PLATEAU_POINTS

    lines = [
        f"plateau: λ_max smoothed by an EWMA (alpha {EWMA_ALPHA}), on the epoch grid, the first "
        f"epoch from which it changes by less than {THRESHOLD:.0%} per epoch for {PATIENCE} "
        f"epochs; interval: 95 % parametric bootstrap ({n_boot} draws, seed {seed}) from each "
        "point's recorded uncertainty."
    ]
    few = [s for s in summaries if s.few_points]
    if few:
        lines.append(
            f"{len(few)} of {len(summaries)} runs have fewer than {MIN_PLATEAU_POINTS} λ_max "
            "points, the plateau guide's minimum:"
        )
        advice: dict[str, list[str]] = {}
        for s in few:
            advice.setdefault(_advice(s), []).append(s.run)
        for text, names in advice.items():
            who = names[0] if len(names) == 1 else f"{len(names)} runs ({', '.join(names)})"
            lines.append(f"  {who}: {text}")
    for s in summaries:
        if s.first_error:
            lines.append(f"{s.run}: {s.failed} failed; first: {s.first_error}")
    return lines


def _title(summaries: list[Any], by: str | None) -> str:
    runs = f"{len(summaries)} run" + ("" if len(summaries) == 1 else "s")
    return runs if by is None else f"{runs} by {by}"


def _advice(s: Any) -> str:
    """What a run short of λ_max points would need (the same words for runs alike)."""
    from deconcnn_curvature.analysis.report import MIN_PLATEAU_POINTS, cadence_for

    if not s.lambda_max_points:
        return "no λ_max measured (yet)"
    steps = s.last_step or 0
    cadence = cadence_for(MIN_PLATEAU_POINTS, steps)  # step 0 not counted: holds either way
    fix = (
        f"compute_every_n_steps={cadence} would give {steps // cadence}"
        if cadence
        else "too short even at every step: train longer"
    )
    return f"{s.lambda_max_points} points over {steps} steps; {fix}"


@cli.command("report", short_help="Summarise run folders: a row per run, λ_max plateaus.")
@click.argument("runs", nargs=-1, required=True, metavar="RUN_OR_GLOB...")
@click.option("--by", "by", default=None, metavar="KEY",
              help="Group and colour the runs by this config key (e.g. optim.lr).")  # fmt: skip
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write the tidy table of every measurement as CSV.")  # fmt: skip
@click.option("--parquet", "parquet_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write the tidy table as Parquet (needs pyarrow).")  # fmt: skip
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Save λ_max and trace of every run against step.")  # fmt: skip
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the plateau interval's bootstrap.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the summaries as JSON.")
@user_errors
def report_cmd(
    runs: tuple[str, ...],
    by: str | None,
    csv_path: Path | None,
    parquet_path: Path | None,
    plot_path: Path | None,
    seed: int,
    as_json: bool,
) -> None:
    """Summarise run folders: a row per run with the config values that differ between them,
    the last trace ± stderr and λ_max, converged share, failed measurements, the λ_max plateau
    with its interval, the λ_max points and the time spent measuring.

    RUN_OR_GLOB: run folders (holding curvature.jsonl), sweep folders (searched below) or glob
    patterns, e.g. `deconcnn-curv report multirun/2026-12-06/12-00-00 --by optim.lr`.
    """
    from deconcnn_curvature.analysis.plateau import N_BOOT
    from deconcnn_curvature.analysis.report import distinguishing_keys, summarize_runs
    from deconcnn_curvature.analysis.runs import check_parquet, tidy_table, write_table
    from deconcnn_curvature.present import check_plot_path, report_table

    if plot_path is not None:
        check_plot_path(plot_path)
    if parquet_path is not None:
        check_parquet()
    loaded = _read(runs)
    table = tidy_table(loaded)
    summaries = summarize_runs(loaded, table, by, seed=seed, n_boot=N_BOOT)
    keys = [k for k in distinguishing_keys(loaded) if k != by]
    keys = [by, *keys] if by is not None else keys
    if csv_path is not None:
        write_table(table, csv_path, "csv")
    if parquet_path is not None:
        write_table(table, parquet_path, "parquet")
    if plot_path is not None:
        from deconcnn_curvature.analysis.figures import plot_sweep

        plot_sweep(summaries, table, plot_path, by=by, title=_title(summaries, by))
    if as_json:
        print_json({"by": by, "keys": keys, "runs": [s.to_dict() for s in summaries]})
        return
    colours: list[str] = []
    if by is not None or plot_path is not None:  # the figure's colours
        from deconcnn_curvature.analysis.figures import run_colours

        colours = run_colours(summaries, by)[0]
    rich_table = report_table(
        summaries, keys, colours, title=f"deconcnn-curv report: {_title(summaries, by)}"
    )
    out = Console(soft_wrap=False, width=10_000)
    width = out.measure(rich_table).maximum
    out = Console(soft_wrap=False, width=max(width, 100))
    out.print(rich_table)
    for line in _notes(summaries, seed, N_BOOT):
        click.echo(line)
    for label, path in (("table", csv_path), ("table", parquet_path), ("plot", plot_path)):
        if path is not None:
            click.echo(f"{label}: {path}")
