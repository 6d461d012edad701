"""``deconcnn-curv compare``: several backends on the same checkpoint, batch and seed.

The checkpoint is loaded once (:func:`deconcnn_curvature.cli.common.load_problem`);
:func:`deconcnn_curvature.compare` runs the backends; this module checks the options up front,
samples peak memory per backend and presents the rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
import torch

import deconcnn_curvature as dcc
from deconcnn_curvature.backend import Backend
from deconcnn_curvature.cli import cli, console, print_json, user_errors
from deconcnn_curvature.cli.common import (
    check_quantity_known,
    command_settings,
    estimator_options,
    estimator_settings,
    load_options,
    load_problem,
    plan_options,
    resolve_device,
)
from deconcnn_curvature.cli.memory import PeakMemory, ProgressDisplay
from deconcnn_curvature.cli.progress import interruptible
from deconcnn_curvature.errors import ConfigurationError, InvalidOptionError
from deconcnn_curvature.present import print_header, show_compare
from deconcnn_curvature.registry import get_registry

__all__ = ["compare_cmd"]


def _check_compare_options(names: list[str], quantity: str, given: Mapping[str, Any]) -> None:
    """Before any work: an option no compared backend takes for ``quantity`` is a typo, and a
    value every compared backend refuses is a mistake, not rows to discover after loading. A
    value only some refuse (``--num-hvps 3``: Hutch++ needs at least 5) gives those a row with
    the reason, as the help promises."""
    registry = get_registry()
    refused: dict[str, str] = {}
    unused: list[set[str]] = []
    for name in names:
        cls = registry.get(name)
        try:
            plan = plan_options(cls, quantity, given, strict=False)
            unused.append({u.setting for u in plan.unused})
            cls.resolve_options(quantity, plan.calls[0].options)
        except InvalidOptionError as exc:
            refused[name] = str(exc)
    taken_by_none = set.intersection(*unused) if len(unused) == len(names) else set()
    if taken_by_none:
        raise InvalidOptionError(
            f"{', '.join(sorted(taken_by_none))}: no compared backend ({', '.join(names)}) "
            f"takes this option for {quantity!r}."
        )
    if refused and len(refused) == len(names):
        reasons = set(refused.values())
        if len(reasons) == 1:
            raise InvalidOptionError(reasons.pop())
        said = " ".join(f"{name}: {reason}" for name, reason in refused.items())
        raise InvalidOptionError(f"no compared backend accepts these options: {said}")


def _backend_names(backends: str | None, quantity: str) -> list[str]:
    """The backends to compare: those named by ``--backends`` (each must exist: a typo fails
    before any work), else every registered backend that computes ``quantity``."""
    registry = get_registry()
    check_quantity_known(quantity)
    if backends is None:
        return registry.supporting(quantity)
    names = list(dict.fromkeys(n.strip() for n in backends.split(",") if n.strip()))
    if not names:
        raise ConfigurationError("--backends is empty; name at least one backend.")
    for name in names:
        registry.get(name)  # unknown names are a typo: fail before any work
    return names


def _rows(
    found: list[dict[str, Any]],
    dropped: Mapping[str, list[str]],
    meters: Mapping[str, PeakMemory],
    dev: torch.device,
) -> list[dict[str, Any]]:
    """One row per backend of :func:`deconcnn_curvature.compare`'s answer, with the flags it
    ignored and its peak memory (CUDA's own count on a GPU, the sampled RSS otherwise);
    ``_result`` keeps the result for the table and is left out of ``--json``."""
    rows: list[dict[str, Any]] = []
    for found_row in found:
        name = found_row["backend"]
        row: dict[str, Any] = {k: found_row[k] for k in ("backend", "status", "reason")}
        if dropped.get(name):
            row["ignored_options"] = dropped[name]
        result = found_row["result"]
        if result is not None:
            row["result"] = result.to_dict()
            row["peak_memory_bytes"] = (
                result.peak_memory_bytes if dev.type == "cuda" else meters[name].peak_bytes
            )
            row["_result"] = result
        rows.append(row)
    return rows


@cli.command("compare")
@load_options
@click.option(
    "--backends",
    metavar="NAME[,NAME...]",
    help="Comma-separated backends (default: every registered backend that computes the quantity).",
)
@click.option(
    "-q",
    "--quantity",
    default="trace",
    show_default=True,
    help="The quantity every backend measures: trace, eigenvalues, layer_trace, diagonal.",
)
@estimator_options
@user_errors
def compare_cmd(
    checkpoint: Path,
    backends: str | None,
    quantity: str,
    as_json: bool,
    quiet: bool,
    device: str,
    **load: Any,
) -> None:
    """Run several backends on the same CHECKPOINT, batch and seed, side by side.

    A backend that cannot run here (not installed, cannot handle this model or quantity, refuses
    an option value, or fails) gets a row with the reason; the command fails only if no backend
    produced a value. Without --backends every registered backend that computes the quantity
    runs ($DECONCNN_CURVATURE_BACKEND sets the backend of estimate and density, not this list).
    Peak memory is CUDA memory on a GPU, the process's resident memory otherwise.
    """
    dev = resolve_device(device)
    trust = load.pop("trust_checkpoint")
    given = estimator_settings(load)
    settings = command_settings(device=dev, **load)
    names = _backend_names(backends, quantity)
    _check_compare_options(names, quantity, given)

    memory_kind = PeakMemory(dev).kind
    meters: dict[str, PeakMemory] = {}
    dropped: dict[str, list[str]] = {}

    def options_for(cls: type[Backend]) -> dict[str, Any]:
        plan = plan_options(cls, quantity, given, strict=False)
        dropped[cls.name] = [u.setting for u in plan.unused]
        return dict(plan.calls[0].options)

    def started(progress: ProgressDisplay, name: str) -> None:
        if name != names[0]:
            progress.advance()  # the previous backend is done
        progress.step(f"{name}: {quantity}")

    def measure(name: str) -> PeakMemory:
        meters[name] = PeakMemory(dev)
        return meters[name]

    with interruptible("compare"), ProgressDisplay(quiet, total=len(names)) as progress:
        progress.step(f"loading {checkpoint.name}")
        loaded = load_problem(checkpoint, settings, dev, trust)
        found = dcc.compare(
            loaded.model,
            loaded.loss_fn,
            loaded.data,
            quantity,
            names,
            seed=settings["seed"],
            options=options_for,
            before=lambda name: started(progress, name),
            measure=measure,
        )
        if found:
            progress.advance()
    rows = _rows(found, dropped, meters, dev)
    _report(rows, checkpoint, loaded, dev, quantity, settings["seed"], as_json, quiet, memory_kind)
    if not any(r["status"] == "ok" for r in rows):
        raise click.ClickException(
            f"no backend could compute {quantity!r} for this checkpoint (reasons above)."
        )


def _report(
    rows: list[dict[str, Any]],
    checkpoint: Path,
    loaded: Any,
    dev: torch.device,
    quantity: str,
    seed: int,
    as_json: bool,
    quiet: bool,
    memory_kind: str,
) -> None:
    """The rows as JSON or as a table with the checkpoint's header."""
    explain = PeakMemory(dev).explain()
    if as_json:
        print_json(
            {
                "checkpoint": str(checkpoint),
                "loaded": loaded.describe(),
                "device": str(dev),
                "quantity": quantity,
                "seed": seed,
                "memory": {"kind": memory_kind, "meaning": explain},
                "rows": [{k: v for k, v in r.items() if k != "_result"} for r in rows],
            }
        )
        return
    out = console()
    if not quiet:
        print_header(out, checkpoint, loaded, dev)
    show_compare(
        out,
        rows,
        f"{quantity}: same model, data and seed ({seed})",
        "peak CUDA" if dev.type == "cuda" else "peak RSS",
        None if quiet else explain,
    )
