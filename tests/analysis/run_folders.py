"""Run folders written the way ``deconcnn-curv train`` and the monitor write them, with chosen
numbers: ``config.yaml`` (nested YAML), ``curvature.jsonl`` (the monitor's record fields, written
by the package's own RecordWriter) and ``metrics.jsonl`` (deconCNN's format)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from deconcnn_curvature.monitor.records import RecordWriter

T0 = 1_800_000_000.0


def record(
    step: int,
    quantity: str,
    value: Any,
    *,
    epoch: int = 0,
    stderr: float | None = None,
    ci: Sequence[float] | None = None,
    residuals: Sequence[float] | None = None,
    converged: bool | None = None,
    seconds: float = 0.5,
    error: str | None = None,
    timestamp: float | None = None,
    n_hvp: int = 10,
) -> dict[str, Any]:
    """One line of curvature.jsonl, with every field the monitor writes."""
    details: dict[str, Any] | None = None
    if quantity == "eigenvalues" and error is None:
        details = {"residuals": list(residuals or []), "converged": converged}
    return {
        "timestamp": T0 + step if timestamp is None else timestamp,
        "step": step,
        "epoch": epoch,
        "backend": "pyhessian",
        "quantity": quantity,
        "value": value,
        "stderr": stderr,
        "ci": None if ci is None else list(ci),
        "ci_level": None if ci is None else 0.95,
        "n_hvp": None if error else n_hvp,
        "seconds": seconds,
        "seed": 7,
        "method": None if error else ("hutchinson" if quantity == "trace" else "lanczos"),
        "exact": None if error else False,
        "rtol": None,
        "target_met": None,
        "batch_mode": "fixed",
        "batch_size": 64,
        "details": details,
        "error": error,
    }


def write_run(
    folder: Path,
    records: Sequence[Mapping[str, Any]],
    config: Mapping[str, Any] | None = None,
    losses: Sequence[tuple[int, float]] = (),
) -> Path:
    """A run folder holding ``records``; ``config.yaml`` and ``metrics.jsonl`` only when given."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = RecordWriter(folder / "curvature.jsonl", fsync=False)
    for rec in records:
        writer.write(rec)
    writer.close()
    if config is not None:
        text = yaml.safe_dump(dict(config), sort_keys=False)
        (folder / "config.yaml").write_text(text, encoding="utf-8")
    if losses:
        metrics = RecordWriter(folder / "metrics.jsonl", fsync=False)
        for step, loss in losses:
            metrics.write({"timestamp": T0 + step, "step": step, "metrics": {"train/loss": loss}})
        metrics.close()
    return folder


def config(lr: float, seed: int, **extra: Any) -> dict[str, Any]:
    """A nested configuration shaped like the reference run's."""
    return {
        "model": {"name": "small_cnn", "width": 8},
        "optim": {"lr": lr, "momentum": 0.9},
        "data": {"crop_scale": [0.08, 1.0]},
        "seed": seed,
        "run_dir": f"/runs/lr{lr}-s{seed}",
        **extra,
    }


def trajectory_run(
    folder: Path,
    lams: Sequence[float],
    *,
    steps_per_epoch: int = 4,
    cadence: int = 1,
    lr: float = 0.1,
    seed: int = 0,
    trace_scale: float = 5.0,
) -> Path:
    """A run measuring trace and λ_max every ``cadence`` steps from step 0: λ_max takes ``lams``
    in turn (residual 1e-5, converged), the trace is ``trace_scale`` times it (stderr 10 %)."""
    recs = []
    losses = []
    for i, lam in enumerate(lams):
        step = i * cadence
        epoch = max(step - 1, 0) // steps_per_epoch
        trace = trace_scale * lam
        recs.append(record(step, "trace", trace, epoch=epoch, stderr=0.1 * trace,
                           ci=(0.8 * trace, 1.2 * trace), seconds=0.25))  # fmt: skip
        recs.append(record(step, "eigenvalues", [lam], epoch=epoch, residuals=[1e-5],
                           converged=True, seconds=0.25))  # fmt: skip
        if step:
            losses.append((step, 2.0 / (1 + step)))
    return write_run(folder, recs, config(lr, seed), losses)
