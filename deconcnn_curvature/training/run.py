"""The main job: a deconCNN-shaped training run with curvature measured during training.

:func:`run_training` takes a composed Hydra config (``configs/train.yaml`` and its groups; see
:func:`compose_config`) and builds everything from it: the CIFAR data module, the
``resnet18_cifar`` ``ClassificationModule`` (SGD with momentum, warm-up + cosine), a Lightning
``Trainer`` with a progress bar, deconCNN's ``metrics.jsonl`` writer, a checkpoint and the
``CurvatureMonitor`` (when ``curvature.enabled``). It fits, then draws the curvature records
(trace and λ_max with error bars against step) into ``curvature.png``. ``deconcnn-curv train
[overrides]`` is a thin front end over it.

The run folder (``run_dir``, default ``runs/<name or timestamp>``) holds::

    config.yaml       the resolved configuration
    metrics.jsonl     {"timestamp", "step", "metrics": {...}} per optimiser step (deconCNN's format)
    curvature.jsonl   one record per measurement and quantity (value, stderr, ci, n_hvp, error...)
    last.ckpt         the Lightning checkpoint (resume with resume=<run_dir>/last.ckpt)
    curvature.png     the plot

Where the configs come from (:func:`default_config_dir`): ``$DECONCNN_CURVATURE_CONFIG_DIR`` if
set; else the repository's ``configs/`` when running from a source checkout; else the copy shipped
inside the package (``deconcnn_curvature/conf``), which a test keeps identical to ``configs/``.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deconcnn_curvature.errors import ConfigurationError, CurvatureError

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from rich.table import Table

__all__ = [
    "ENV_CONFIG_DIR",
    "RunResult",
    "compose_config",
    "default_config_dir",
    "plot_curvature",
    "run_training",
    "summary_table",
]

#: Environment variable naming a config folder to use instead of the shipped one.
ENV_CONFIG_DIR = "DECONCNN_CURVATURE_CONFIG_DIR"

# Lightning advice that does not apply here (in-memory CIFAR tensors; the run folder holds the
# config next to the checkpoint) and a deprecation inside Lightning: nothing a user can act on.
_QUIET = (
    r".*does not have many workers.*",
    r".*isinstance\(treespec, LeafSpec\).*",
    r".*Checkpoint directory .* exists and is not empty.*",
)


def default_config_dir() -> Path:
    """The folder holding ``train.yaml`` and its config groups (see the module docstring)."""
    env = os.environ.get(ENV_CONFIG_DIR)
    if env:
        path = Path(env).expanduser().resolve()
        if not (path / "train.yaml").is_file():
            raise ConfigurationError(
                f"${ENV_CONFIG_DIR}={env} has no train.yaml; point it at a folder like the "
                "repository's configs/, or unset it."
            )
        return path
    source = Path(__file__).resolve().parents[2] / "configs"
    if (source / "train.yaml").is_file():  # a source checkout (editable install)
        return source
    return Path(str(resources.files("deconcnn_curvature") / "conf"))


def compose_config(
    overrides: Sequence[str] = (), config_dir: str | os.PathLike[str] | None = None
) -> DictConfig:
    """Compose ``train.yaml`` with Hydra overrides (``key=value``, ``group=option``, ``+key=v``).

    Raises :class:`~deconcnn_curvature.errors.ConfigurationError` with Hydra's message when an
    override does not apply (unknown key or group option).
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    folder = Path(config_dir).resolve() if config_dir is not None else default_config_dir()
    if not (folder / "train.yaml").is_file():
        raise ConfigurationError(f"config folder {folder} has no train.yaml.")
    try:
        with initialize_config_dir(str(folder), version_base="1.3", job_name="deconcnn-curv"):
            return compose("train", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        # Hydra's later lines carry the fix ("To append to your config use +key=value").
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigurationError(
            f"bad configuration override: {message} (config folder: {folder}; see "
            "`deconcnn-curv train --cfg` for the keys)."
        ) from exc


@dataclass(frozen=True)
class RunResult:
    """What a run left behind, and its headline numbers."""

    run_dir: Path
    config_path: Path
    metrics_path: Path
    curvature_path: Path | None
    checkpoint_path: Path | None
    plot_path: Path | None
    global_step: int
    epochs: int
    seconds: float
    metrics: Mapping[str, float]
    records: Sequence[Mapping[str, Any]] = field(default_factory=tuple)
    global_rank: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary (records included)."""
        return {
            "run_dir": str(self.run_dir),
            "config": str(self.config_path),
            "metrics": str(self.metrics_path),
            "curvature": None if self.curvature_path is None else str(self.curvature_path),
            "checkpoint": None if self.checkpoint_path is None else str(self.checkpoint_path),
            "plot": None if self.plot_path is None else str(self.plot_path),
            "global_step": self.global_step,
            "epochs": self.epochs,
            "seconds": self.seconds,
            "final_metrics": dict(self.metrics),
            "curvature_records": [dict(r) for r in self.records],
            "global_rank": self.global_rank,
        }


#: Set by the first process of a run for the rank processes Lightning launches from it (they run
#: this command again and must write to the same folder, whatever the clock says by then).
_RUN_DIR_ENV = "DECONCNN_CURVATURE_RUN_DIR_OF_RANK0"


def _launched_rank() -> bool:
    """This process is a rank > 0 that Lightning's DDP launcher started from rank 0's command."""
    return os.environ.get("LOCAL_RANK", "0") != "0" and _RUN_DIR_ENV in os.environ


def _run_dir(cfg: DictConfig) -> Path:
    if _launched_rank():
        return Path(os.environ[_RUN_DIR_ENV])
    if cfg.get("run_dir"):
        return Path(cfg.run_dir).expanduser()
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if not cfg.get("name") and "RANK" in os.environ and world > 1:
        raise ConfigurationError(
            "this process was started by a distributed launcher (torchrun or similar): give the "
            "run a name= or run_dir=, so that every rank writes to the same folder."
        )
    name = cfg.get("name") or datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(cfg.get("runs_root") or "runs").expanduser() / str(name)
    if not cfg.get("name"):  # two runs started in the same second get different folders
        base, i = path, 1
        while path.exists():
            i += 1
            path = base.with_name(f"{base.name}-{i}")
    return path


def _plain(node: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _require(cfg: DictConfig, *keys: str) -> None:
    from omegaconf import OmegaConf

    for key in keys:
        if OmegaConf.is_missing(cfg, key) or cfg.get(key) is None:
            raise ConfigurationError(f"the config has no {key!r}; check configs/train.yaml.")


def _instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets a package error through unwrapped (its message is the
    one to show; Hydra would wrap it in an ``InstantiationException``)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, CurvatureError):
            raise cause from None
        raise ConfigurationError(str(exc).strip().replace("\n", " ")) from exc


def run_training(cfg: DictConfig) -> RunResult:
    """Train as ``cfg`` says and write the run folder (see the module docstring)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    from deconcnn_curvature.lightning import read_curvature_jsonl
    from deconcnn_curvature.training._lightning import pl
    from deconcnn_curvature.training.metrics import MetricsJSONL
    from deconcnn_curvature.training.module import ClassificationModule

    _require(cfg, "model", "optim", "lrsched", "data", "trainer")
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        key = getattr(exc, "full_key", None) or str(exc)
        hint = " (e.g. data.root=/path/to/cifar)" if str(key).startswith("data.") else ""
        raise ConfigurationError(f"the config value {key} must be given{hint}.") from exc

    resume = cfg.get("resume")
    if resume is not None and not Path(resume).is_file():
        raise ConfigurationError(f"resume={resume}: no such checkpoint file.")
    launched = _launched_rank()
    run_dir = _run_dir(cfg)
    curvature_path = run_dir / "curvature.jsonl"
    if (
        not launched
        and resume is None
        and (curvature_path.exists() or (run_dir / "metrics.jsonl").exists())
    ):
        raise ConfigurationError(
            f"run folder {run_dir} already holds a run; choose another name= or run_dir=, or "
            f"continue it with resume={run_dir / 'last.ckpt'}."
        )
    # Build everything that can fail on a bad value before the run folder is created.
    pl.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)
    data = _instantiate(cfg.data)
    model_cfg = dict(_plain(cfg.model))
    module = ClassificationModule(
        model_name=model_cfg.pop("name"),
        model_kwargs=model_cfg,
        **_plain(cfg.optim),
        **_plain(cfg.lrsched),
    )
    monitor = None
    if OmegaConf.select(cfg, "curvature.enabled", default=False):
        if cfg.get("callbacks") is None:
            raise ConfigurationError(
                "curvature.enabled=true but the config has no `callbacks` entry; keep "
                "`callbacks: curvature_monitor` in the defaults of train.yaml."
            )
        monitor = _instantiate(cfg.callbacks, jsonl=str(curvature_path.resolve()))
        if monitor.enabled:
            monitor.check_config()  # unknown backend, unsupported quantity, bad option
            monitor.check_model(module)  # a model the backend refuses

    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    if not launched:
        OmegaConf.save(cfg, config_path, resolve=True)
        os.environ[_RUN_DIR_ENV] = str(run_dir.resolve())  # inherited by DDP rank processes
    metrics_path = run_dir / "metrics.jsonl"
    callbacks: list[Any] = [
        MetricsJSONL(metrics_path, every_n_steps=int(cfg.get("metrics_every_n_steps") or 1)),
        pl.callbacks.ModelCheckpoint(
            dirpath=run_dir, filename="last", save_top_k=1, enable_version_counter=False
        ),
    ]
    if monitor is not None:
        callbacks.append(monitor)
    trainer_kwargs = dict(_plain(cfg.trainer))
    trainer = pl.Trainer(
        **trainer_kwargs, default_root_dir=run_dir, logger=False, callbacks=callbacks
    )

    import torch.distributed as dist

    group_before = dist.is_available() and dist.is_initialized()
    start = time.perf_counter()
    with warnings.catch_warnings():
        for pattern in _QUIET:
            warnings.filterwarnings("ignore", message=pattern)
        trainer.fit(module, datamodule=data, ckpt_path=resume)
    seconds = time.perf_counter() - start

    checkpoint = run_dir / "last.ckpt"
    if not checkpoint.exists():
        trainer.save_checkpoint(checkpoint)  # a collective under DDP: every rank calls it
    if not group_before and dist.is_available() and dist.is_initialized():
        # Lightning's DDP leaves its process group up; close it in step on every rank (gloo's
        # threads torn down at interpreter exit otherwise abort the process now and then).
        dist.barrier()
        dist.destroy_process_group()
    records = read_curvature_jsonl(curvature_path) if curvature_path.exists() else []
    plot_path = None
    if cfg.get("plot", True) and records and trainer.is_global_zero:
        plot_path = plot_curvature(records, run_dir / "curvature.png", title=_title(cfg))
    metrics = {}
    for key, value in trainer.callback_metrics.items():
        number = float(value)
        if math.isfinite(number):
            metrics[key] = number
    return RunResult(
        run_dir=run_dir,
        config_path=config_path,
        metrics_path=metrics_path,
        curvature_path=curvature_path if curvature_path.exists() else None,
        checkpoint_path=checkpoint if checkpoint.exists() else None,
        plot_path=plot_path,
        global_step=int(trainer.global_step),
        epochs=int(trainer.current_epoch),
        seconds=seconds,
        metrics=metrics,
        records=tuple(records),
        global_rank=int(trainer.global_rank),
    )


def _title(cfg: DictConfig) -> str:
    from omegaconf import OmegaConf

    model = OmegaConf.select(cfg, "model.name", default="model")
    width = OmegaConf.select(cfg, "model.width_mult", default=None)
    backend = OmegaConf.select(cfg, "callbacks.backend", default="?")
    every = OmegaConf.select(cfg, "callbacks.compute_every_n_steps", default="?")
    batch = OmegaConf.select(cfg, "callbacks.hessian_batch_size", default="?")
    shape = f"{model}" + (f" (width {width:g})" if isinstance(width, int | float) else "")
    return f"{shape}: curvature by {backend} every {every} steps on {batch} samples"


def _series(
    records: Sequence[Mapping[str, Any]], quantity: str
) -> tuple[list[int], list[float], list[float], list[float], list[int]]:
    """Steps, values and lower/upper error-bar lengths of ``quantity``; failed steps apart."""
    steps, values, low, high, failed = [], [], [], [], []
    for rec in records:
        if rec.get("quantity") != quantity:
            continue
        value = rec.get("value")
        if value is None:
            failed.append(int(rec["step"]))
            continue
        if quantity == "eigenvalues":
            value = value[0]
            residuals = (rec.get("details") or {}).get("residuals") or []
            err = abs(float(residuals[0])) if residuals else 0.0
            lo = hi = err
        else:
            ci = rec.get("ci")
            stderr = rec.get("stderr")
            if ci is not None:
                lo, hi = value - ci[0], ci[1] - value
            elif stderr is not None:
                lo = hi = 1.96 * float(stderr)
            else:
                lo = hi = 0.0
        steps.append(int(rec["step"]))
        values.append(float(value))
        low.append(max(0.0, float(lo)))
        high.append(max(0.0, float(hi)))
    return steps, values, low, high, failed


def plot_curvature(
    records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], title: str = ""
) -> Path:
    """Draw the trace (error bars: its confidence interval) and λ_max (error bars: the Lanczos
    residual, which bounds the distance to an eigenvalue) against step; failed measurements are
    marked with a red line. Writes a PNG with matplotlib's Agg backend and returns its path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    panels = [
        ("trace", "Hessian trace", "95 % confidence interval"),
        ("eigenvalues", "λ_max", "Lanczos residual bound"),
    ]
    present = [p for p in panels if any(r.get("quantity") == p[0] for r in records)]
    if not present:
        raise ConfigurationError("no trace or eigenvalue records to plot.")
    fig = Figure(figsize=(8, 3.2 * len(present)), layout="constrained")
    axes = fig.subplots(len(present), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (quantity, label, bars) in zip(axes, present, strict=True):
        steps, values, low, high, failed = _series(records, quantity)
        if steps:
            ax.errorbar(
                steps,
                values,
                yerr=[low, high],
                fmt="o-",
                markersize=4,
                capsize=3,
                linewidth=1.2,
                label=f"{label} (error bars: {bars})",
            )
        for i, step in enumerate(failed):
            ax.axvline(step, color="tab:red", linestyle=":", label="failed" if i == 0 else None)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("optimiser step")
    if title:
        fig.suptitle(title, fontsize="medium")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def _fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def _unconverged_mark(rec: Mapping[str, Any]) -> str:
    return ", UNCONVERGED" if (rec.get("details") or {}).get("converged") is False else ""


def _unconverged_row(table: Table, eigs: list[Mapping[str, Any]]) -> None:
    """Say how many λ_max values stopped at the solver's cap (``details["converged"]`` false)."""
    bad = [r for r in eigs if (r.get("details") or {}).get("converged") is False]
    if bad:
        table.add_row(
            "λ_max unconverged",
            f"{len(bad)} of {len(eigs)} measurements (first at step {bad[0]['step']}): the "
            "solver stopped at its cap; raise curvature.backend_options.max_hvps",
        )


def summary_table(result: RunResult) -> Table:
    """A rich table of the run: where its files are, final metrics, the curvature measured."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"deconcnn-curv train: {result.run_dir}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    minutes = result.seconds / 60
    table.add_row("steps / epochs", f"{result.global_step} / {result.epochs}")
    table.add_row("training wall time", f"{result.seconds:.1f} s ({minutes:.1f} min)")
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        if key in result.metrics:
            table.add_row(key, _fmt(result.metrics[key]))
    recs = list(result.records)
    if recs:
        ok = [r for r in recs if r.get("value") is not None]
        failed = [r for r in recs if r.get("value") is None]
        steps = sorted({int(r["step"]) for r in recs})
        table.add_row(
            "curvature records",
            f"{len(ok)} ok, {len(failed)} failed, at {len(steps)} steps ({steps[0]}…{steps[-1]})",
        )
        spent = sum(float(r.get("seconds") or 0.0) for r in recs)
        share = spent / result.seconds if result.seconds > 0 else float("nan")
        table.add_row("curvature time", f"{spent:.1f} s ({share:.0%} of the wall time)")
        last_trace = next((r for r in reversed(ok) if r["quantity"] == "trace"), None)
        if last_trace is not None:
            table.add_row(
                f"trace @ step {last_trace['step']}",
                f"{_fmt(last_trace['value'])} ± {_fmt(last_trace.get('stderr'), 2)} "
                f"({last_trace.get('n_hvp')} HVPs, {last_trace.get('backend')})",
            )
        last_eig = next((r for r in reversed(ok) if r["quantity"] == "eigenvalues"), None)
        if last_eig is not None:
            residuals = (last_eig.get("details") or {}).get("residuals") or [None]
            table.add_row(
                f"λ_max @ step {last_eig['step']}",
                f"{_fmt(last_eig['value'][0])} (residual {_fmt(residuals[0], 2)}, "
                f"{last_eig.get('n_hvp')} HVPs{_unconverged_mark(last_eig)})",
            )
            _unconverged_row(table, [r for r in ok if r["quantity"] == "eigenvalues"])
        if failed:
            table.add_row("first failure", escape(str(failed[0].get("error"))))
    else:
        table.add_row("curvature", "off (curvature.enabled=false)")
    for label, path in (
        ("config", result.config_path),
        ("metrics", result.metrics_path),
        ("curvature file", result.curvature_path),
        ("checkpoint", result.checkpoint_path),
        ("plot", result.plot_path),
    ):
        if path is not None:
            table.add_row(label, escape(str(path)))
    return table
