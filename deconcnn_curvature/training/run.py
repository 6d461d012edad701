"""The main job: a deconCNN-shaped training run with curvature measured during training.

:func:`run_training` takes a composed Hydra config (``configs/train.yaml`` and its groups; see
:func:`~deconcnn_curvature.training.run_config.compose_run_config`) and runs it in three steps:
**build** (the CIFAR data module, the ``ClassificationModule``, the ``CurvatureMonitor`` when
``curvature.enabled``, a Lightning ``Trainer`` with deconCNN's ``metrics.jsonl`` writer and a
checkpoint), everything that can fail on a bad value, before anything is written; **fit**, with
SIGTERM and Ctrl-C turned into a clean stop that saves ``last.ckpt``; **finish**: the plot
(``curvature.png``) and the :class:`RunResult`. ``deconcnn-curv train [overrides]`` is a thin front
end over it.

The run folder (``run_dir``, default ``runs/<name or timestamp>``; :mod:`.run_folder`) holds::

    config.yaml       the resolved configuration (a resume writes config.resume-<n>.yaml beside it)
    .run.lock         the lock of the run writing into the folder, for its lifetime
    metrics.jsonl     {"timestamp", "step", "metrics": {...}} per optimiser step (deconCNN's format)
    curvature.jsonl   one record per measurement and quantity (value, stderr, ci, n_hvp, error...)
    last.ckpt         the Lightning checkpoint (resume with resume=<run_dir>/last.ckpt)
    curvature.png     the plot
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deconcnn_curvature.errors import ConfigurationError, CurvatureError
from deconcnn_curvature.present import plot_curvature
from deconcnn_curvature.results import usable_record
from deconcnn_curvature.training import run_folder
from deconcnn_curvature.training.run_config import (
    ENV_CONFIG_DIR,
    compose_config,
    compose_run_config,
    default_config_dir,
    finish_composed_config,
)
from deconcnn_curvature.training.run_folder import LOCK_NAME, CheckpointWriteError

if TYPE_CHECKING:
    from omegaconf import DictConfig

__all__ = [
    "ENV_CONFIG_DIR",
    "LOCK_NAME",
    "RUN_DIR_ENV",
    "RunResult",
    "RunStorageError",
    "TrainingInterrupted",
    "compose_config",
    "compose_run_config",
    "default_config_dir",
    "finish_composed_config",
    "read_training_loss",
    "run_training",
    "secondary_rank",
]

# Lightning advice that does not apply here (in-memory CIFAR tensors; the run folder holds the
# config next to the checkpoint) and a deprecation inside Lightning: nothing a user can act on.
_QUIET = (
    r".*does not have many workers.*",
    r".*isinstance\(treespec, LeafSpec\).*",
    r".*Checkpoint directory .* exists and is not empty.*",
)

#: Errors of a full or failing disk: the run stops in one line, its state saved where possible.
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS}


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
    #: The step training started from (the checkpoint's, for a resumed run; 0 otherwise).
    start_step: int = 0
    #: Why a run with the monitor on has no curvature records (``None`` otherwise).
    curvature_note: str | None = None

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
            "start_step": self.start_step,
            "curvature_note": self.curvature_note,
        }


class TrainingInterrupted(CurvatureError):
    """Training was stopped by SIGTERM (exit code 143) or Ctrl-C (130); the message says how to
    resume."""

    def __init__(self, message: str, exit_code: int = 143) -> None:
        super().__init__(message)
        #: 128 + the signal's number, what a shell reports for a process ended by it.
        self.exit_code = exit_code


class RunStorageError(CurvatureError):
    """The run folder's disk refused a write (full, read-only, failing); the message says what
    was saved."""


# ------------------------------------------------------------------ ranks and the folder

#: Set by the first process of a run for the rank processes Lightning launches from it (they run
#: this command again and must write to the same folder, whatever the clock says by then).
RUN_DIR_ENV = "DECONCNN_CURVATURE_RUN_DIR_OF_RANK0"


def launched_rank() -> bool:
    """This process is a rank > 0 that Lightning's DDP launcher started from rank 0's command."""
    return os.environ.get("LOCAL_RANK", "0") != "0" and RUN_DIR_ENV in os.environ


def secondary_rank() -> bool:
    """A process other than the first of a distributed run: launched by Lightning from rank 0,
    or given a non-zero rank by torchrun / SLURM. Rank 0 alone locks the folder, checks it and
    writes the config; the other ranks write into it."""
    if launched_rank():
        return True
    return any(os.environ.get(name, "0") not in ("", "0") for name in ("RANK", "SLURM_PROCID"))


def run_dir_of(cfg: DictConfig) -> tuple[Path, bool]:
    """The run folder ``cfg`` names, and whether it is a timestamp (made unique on creation)."""
    if launched_rank():
        return Path(os.environ[RUN_DIR_ENV]), False
    if cfg.get("run_dir"):
        return Path(cfg.run_dir).expanduser(), False
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if not cfg.get("name") and "RANK" in os.environ and world > 1:
        raise ConfigurationError(
            "this process was started by a distributed launcher (torchrun or similar): give the "
            "run a name= or run_dir=, so that every rank writes to the same folder."
        )
    name = cfg.get("name") or datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.get("runs_root") or "runs").expanduser() / str(name), not cfg.get("name")


# ------------------------------------------------------------------ checks before anything


def _plain(node: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _check_config(cfg: DictConfig) -> str | None:
    """Refuse, before any folder is made, what can be told from the config alone; return the
    checkpoint to resume from (``None`` for a fresh run)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    from deconcnn_curvature.checkpoints import check_resume_checkpoint

    for key in ("model", "optim", "lrsched", "data", "trainer"):
        if OmegaConf.is_missing(cfg, key) or cfg.get(key) is None:
            raise ConfigurationError(f"the config has no {key!r}; check configs/train.yaml.")
    try:  # `???` (Hydra's "must be given") anywhere but in the callbacks' resolved copies
        kept = [key for key in cfg if key != "callbacks"]
        OmegaConf.to_container(
            OmegaConf.masked_copy(cfg, kept), resolve=True, throw_on_missing=True
        )
    except MissingMandatoryValue as exc:
        key = getattr(exc, "full_key", None) or str(exc)
        hint = " (e.g. data.root=/path/to/cifar)" if str(key).startswith("data.") else ""
        raise ConfigurationError(f"the config value {key} must be given{hint}.") from exc
    _check_seed(cfg.get("seed", 0))
    _check_trainer_values(_plain(cfg.trainer))
    if (cfg.get("if_exists") or "refuse") not in ("refuse", "move_aside"):
        raise ConfigurationError(
            f"if_exists must be refuse or move_aside; got {cfg.get('if_exists')!r}."
        )
    resume = cfg.get("resume")
    if resume is None:
        return None
    resume = str(Path(resume).expanduser())
    if not Path(resume).is_file():
        raise ConfigurationError(f"resume={cfg.resume}: no such checkpoint file.")
    check_resume_checkpoint(resume)  # pickled code is refused before anything is built
    return resume


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigurationError(
            f"seed must be a whole number from 0 to {2**32 - 1}; got {seed!r} (e.g. seed=1)."
        )


#: Trainer settings that must be whole numbers / numbers (Lightning fails on them late, inside
#: ``fit``, with a bare ``TypeError``).
_TRAINER_INTS = (
    "max_epochs",
    "min_epochs",
    "max_steps",
    "min_steps",
    "log_every_n_steps",
    "accumulate_grad_batches",
    "num_sanity_val_steps",
    "check_val_every_n_epoch",
)
_TRAINER_NUMBERS = (
    "val_check_interval",
    "limit_train_batches",
    "limit_val_batches",
    "gradient_clip_val",
)


def _check_trainer_values(trainer: Mapping[str, Any]) -> None:
    for key in (*_TRAINER_INTS, *_TRAINER_NUMBERS):
        value = trainer.get(key)
        if value is None:
            continue
        whole = key in _TRAINER_INTS
        kinds = (int,) if whole else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            what = "an integer" if whole else "a number"
            raise ConfigurationError(
                f"trainer.{key} must be {what}; got {value!r}. Fix the override, e.g. "
                f"trainer.{key}={2 if whole else 0.5}."
            )


# ------------------------------------------------------------------ the run


def run_training(cfg: DictConfig, run_dir: str | os.PathLike[str] | None = None) -> RunResult:
    """Train as ``cfg`` says and write the run folder (see the module docstring).

    The run holds the folder's lock (:data:`LOCK_NAME`) until it returns: a second run into the
    same folder fails at once. A run that fails before training wrote anything removes what it
    created. SIGTERM (or Ctrl-C) stops training after the current step, abandoning a measurement
    in progress, saves ``last.ckpt`` and raises :class:`TrainingInterrupted` (the CLI exits with
    143, or 130, and prints the resume command).

    ``run_dir`` (e.g. one folder per job of a sweep) takes the place of the folder the config
    names (``run_dir``, or ``runs_root``/``name``).
    """
    resume = _check_config(cfg)
    if run_dir is not None:
        return _train_in(cfg, Path(run_dir).expanduser(), resume)
    path, timestamped = run_dir_of(cfg)
    return _train_in(cfg, path, resume, timestamped=timestamped)


def _train_in(
    cfg: DictConfig, run_dir: Path, resume: str | None, *, timestamped: bool = False
) -> RunResult:
    """The run of ``cfg`` (checked, ``resume`` from :func:`_check_config`) in the folder
    ``run_dir`` (created if needed; a ``timestamped`` one taken already gets a ``-2`` suffix),
    locked for the run's lifetime."""
    launched = secondary_rank()
    run_dir, created = run_folder.make_run_dir(run_dir, timestamped and not launched_rank())
    lock = None
    written: list[Path] = []
    before: dict[str, tuple[int, int]] = {}
    try:
        if not launched:
            run_folder.check_writable(run_dir)
            run_folder.refuse_links(run_dir)
            lock = run_folder.RunLock(run_dir)
            before = run_folder.listing(run_dir)
            _check_folder_free(cfg, run_dir, resume)
        built = _build(cfg, run_dir, resume)
        if not launched:
            _prepare_folder(cfg, run_dir, resume, written, built)
        return _finish(cfg, built, _fit(built, run_dir, resume))
    except BaseException:
        if not launched:
            run_folder.discard_failed_start(run_dir, created, before, written)
        raise
    finally:
        if lock is not None:
            lock.close()


def _check_folder_free(cfg: DictConfig, run_dir: Path, resume: str | None) -> None:
    """A fresh run into a folder holding a run is refused (or, with ``if_exists=move_aside``,
    moves it aside later), except a run stopped before its first checkpoint with nothing
    measured past step 0: that one is moved aside and the run starts afresh."""
    if resume is not None or not run_folder.holds_a_run(run_dir):
        return
    if (cfg.get("if_exists") or "refuse") == "move_aside":
        return
    if not (run_dir / "last.ckpt").exists() and _last_step(run_dir) <= 0:
        side = run_folder.move_aside(run_dir)
        print(
            f"deconcnn-curv train: {run_dir} held a run stopped before its first checkpoint "
            f"(nothing past step 0); starting afresh there, its files moved to {side}.",
            file=sys.stderr,
        )
        return
    if (run_dir / "last.ckpt").exists():
        how = f"continue it with resume={run_dir / 'last.ckpt'}"
    else:
        how = "move it aside with if_exists=move_aside (it has no last.ckpt to resume from)"
    raise ConfigurationError(
        f"run folder {run_dir} already holds a run; choose another name= or run_dir=, or {how}."
    )


def _last_step(run_dir: Path) -> int:
    """The largest ``step`` of the folder's records files (-1 when there are none)."""
    import json

    last = -1
    for name in ("metrics.jsonl", "curvature.jsonl"):
        path = run_dir / name
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                last = max(last, int(json.loads(line)["step"]))
    return last


def _prepare_folder(
    cfg: DictConfig, run_dir: Path, resume: str | None, written: list[Path], built: _Built
) -> None:
    """Move an earlier run aside (``if_exists=move_aside``) and write the config."""
    from omegaconf import OmegaConf

    if resume is None and run_folder.holds_a_run(run_dir):
        side = run_folder.move_aside(run_dir)
        print(
            f"deconcnn-curv train: {run_dir} held an earlier run; moved it to {side} "
            "(nothing deleted).",
            file=sys.stderr,
        )
    path = run_folder.config_path(run_dir, resume)
    written.append(path)
    run_folder.write_atomically(path, OmegaConf.to_yaml(cfg, resolve=True))
    built.config_path = path
    os.environ[RUN_DIR_ENV] = str(run_dir.resolve())  # inherited by DDP rank processes


# ------------------------------------------------------------------ build


@dataclass
class _Stop:
    """How the fit was asked to stop: ``"SIGTERM"``, ``"Ctrl-C"`` or ``None``."""

    how: str | None = None


@dataclass
class _Built:
    """What :func:`_build` made: everything the fit needs, nothing written yet."""

    data: Any
    module: Any
    monitor: Any
    trainer: Any
    start_step: int
    run_dir: Path
    stop: _Stop
    config_path: Path | None = None

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "last.ckpt"

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def curvature_path(self) -> Path:
        return self.run_dir / "curvature.jsonl"


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


def _build(cfg: DictConfig, run_dir: Path, resume: str | None) -> _Built:
    """Data, model, monitor and trainer: everything that can fail on a bad value, before
    anything is written."""
    from deconcnn_curvature.monitor.lightning_import import pl
    from deconcnn_curvature.training.module import ClassificationModule

    pl.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)
    data = _instantiate(cfg.data)
    model_cfg = dict(_plain(cfg.model))
    module = ClassificationModule(
        model_name=model_cfg.pop("name"),
        model_kwargs=model_cfg,
        **_plain(cfg.optim),
        **_plain(cfg.lrsched),
    )
    start_step = _check_checkpoint_fits(resume, module) if resume is not None else 0
    monitor = _build_monitor(cfg, run_dir / "curvature.jsonl", module)
    stop = _Stop()
    trainer = _build_trainer(cfg, run_dir, monitor, stop)
    return _Built(data, module, monitor, trainer, start_step, run_dir, stop)


def _build_monitor(cfg: DictConfig, curvature_path: Path, module: Any) -> Any:
    from omegaconf import OmegaConf

    if not OmegaConf.select(cfg, "curvature.enabled", default=False):
        return None
    if cfg.get("callbacks") is None:
        raise ConfigurationError(
            "curvature.enabled=true but the config has no `callbacks` entry; keep "
            "`callbacks: curvature_monitor` in the defaults of train.yaml."
        )
    monitor = _instantiate(cfg.callbacks, jsonl=str(curvature_path.resolve()))
    if monitor.enabled:
        monitor.check_config()  # unknown backend, unsupported quantity, bad option
        monitor.check_model(module)  # a model the backend refuses, k above its parameters
    return monitor


def _build_trainer(cfg: DictConfig, run_dir: Path, monitor: Any, stop: _Stop) -> Any:
    from deconcnn_curvature.monitor.lightning_import import pl
    from deconcnn_curvature.training._console import no_logger_tip, progress_bar
    from deconcnn_curvature.training.metrics import MetricsJSONL

    every = int(cfg.get("metrics_every_n_steps") or 1)
    callbacks: list[Any] = [
        MetricsJSONL(run_dir / "metrics.jsonl", every_n_steps=every),
        pl.callbacks.ModelCheckpoint(
            dirpath=run_dir, filename="last", save_top_k=1, enable_version_counter=False
        ),
        _checkpoint_on_stop(run_dir / "last.ckpt", stop),
    ]
    if monitor is not None:
        callbacks += [monitor, _cadence_check(monitor)]
    settings = dict(_plain(cfg.trainer))
    if settings.get("enable_progress_bar", True):
        callbacks.append(progress_bar())  # "Epoch 2/2" on the last of 2 epochs, not "Epoch 1/1"
    plugins = [*(settings.pop("plugins", None) or ()), run_folder.atomic_checkpoint_io()]
    with no_logger_tip():  # Lightning's litlogger advertisement
        return _make_trainer(
            settings, default_root_dir=run_dir, logger=False, callbacks=callbacks, plugins=plugins
        )


def _make_trainer(settings: dict[str, Any], **kwargs: Any) -> Any:
    """``lightning.pytorch.Trainer(**settings, **kwargs)``, its refusals as one-line errors."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from deconcnn_curvature.monitor.lightning_import import pl

    try:
        return pl.Trainer(**settings, **kwargs)
    except (MisconfigurationException, TypeError, ValueError, RuntimeError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        accelerator = str(settings.get("accelerator", "auto"))
        if accelerator not in ("auto", "cpu") and "accelerator" not in message.lower():
            message += f" (trainer.accelerator={accelerator})"
        hint = (
            "use trainer.accelerator=cpu or trainer.accelerator=auto on a machine without one"
            if accelerator not in ("auto", "cpu")
            else "check the trainer.* overrides (`deconcnn-curv train --cfg` shows them)"
        )
        raise ConfigurationError(
            f"Lightning refused the trainer settings: {message}; {hint}."
        ) from exc


def _check_checkpoint_fits(resume: str, module: Any) -> int:
    """Open the checkpoint to resume from (tensors only: ``weights_only=True``) and check its
    weights fit the model this config builds; return its global step. A mismatch is one line."""
    import pickle

    import torch

    try:
        checkpoint = torch.load(resume, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigurationError(
            f"resume={resume}: the checkpoint holds objects other than tensors and plain values, "
            "which are not loaded (loading them could run code from the file); resume from a "
            "checkpoint written by deconcnn-curv train."
        ) from exc
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise ConfigurationError(
            f"resume={resume}: not a readable checkpoint ({' '.join(str(exc).split())})."
        ) from exc
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ConfigurationError(
            f"resume={resume}: not a Lightning checkpoint (no state_dict); give the last.ckpt "
            "of a deconcnn-curv train run."
        )
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}
    if expected != found:
        differ = [f"{k}: checkpoint {list(found[k])} vs model {list(s)}" for k, s in
                  expected.items() if k in found and found[k] != s]  # fmt: skip
        missing = [k for k in expected if k not in found]
        extra = [k for k in found if k not in expected]
        example = differ[0] if differ else (f"missing {missing[0]}" if missing else extra[0])
        raise ConfigurationError(
            f"resume={resume}: the checkpoint does not fit the model of this config "
            f"({len(differ)} tensors of another shape, {len(missing)} missing, {len(extra)} "
            f"unexpected; e.g. {example}); resume with the run's own config (drop the overrides "
            "that change the model)."
        )
    return int(checkpoint.get("global_step") or 0)


def _cadence_check(monitor: Any) -> Any:
    """A callback saying at the start of training when the run is too short for the monitor's
    cadence (nothing would be measured)."""
    from deconcnn_curvature.monitor.lightning_import import pl

    class _CadenceCheck(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            every = int(monitor.compute_every_n_steps)
            total = trainer.estimated_stepping_batches
            if not monitor.enabled or monitor.compute_at_step_zero or not trainer.is_global_zero:
                return
            if math.isfinite(total) and every > total:
                print(
                    f"deconcnn-curv train: warning: the run has {int(total)} steps and curvature "
                    f"is measured every {every} (curvature.compute_every_n_steps), so nothing "
                    "will be measured; lower curvature.compute_every_n_steps or set "
                    "curvature.compute_at_step_zero=true.",
                    file=sys.stderr,
                )

    return _CadenceCheck()


def _checkpoint_on_stop(path: Path, stop: _Stop) -> Any:
    """A callback saving ``path`` when Lightning stops training for SIGTERM (it raises its
    ``SIGTERMException`` after the current optimiser step, so the saved state is consistent). A
    signal that came before Lightning's handler was installed stops before the next step."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from deconcnn_curvature.monitor.lightning_import import pl

    class _CheckpointOnStop(pl.Callback):
        def on_train_batch_start(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
        ) -> None:
            if stop.how is not None and not trainer.received_sigterm:
                raise SIGTERMException

        def on_exception(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
        ) -> None:
            # Under DDP the launcher has already killed the other ranks, and saving is a
            # collective: there the last epoch-end checkpoint is the one to resume from.
            if isinstance(exception, SIGTERMException) and trainer.world_size == 1:
                trainer.save_checkpoint(path, weights_only=False)

    return _CheckpointOnStop()


# ------------------------------------------------------------------ fit


@contextlib.contextmanager
def _stoppable(stop: _Stop) -> Iterator[_Stop]:
    """SIGTERM and Ctrl-C during the fit: abandon a measurement in progress (the HVP operator
    checks :data:`deconcnn_curvature.hvp.CANCEL` before each product) and let Lightning stop after
    the current step (its own SIGTERM handler, which calls this one too). A first Ctrl-C is turned
    into that SIGTERM; a second one interrupts at once."""
    import threading

    from deconcnn_curvature import hvp

    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_term(signum: int, frame: Any) -> None:
        stop.how = stop.how or "SIGTERM"
        hvp.CANCEL.set()

    def on_int(signum: int, frame: Any) -> None:
        stop.how = "Ctrl-C"
        hvp.CANCEL.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: at once
        signal.raise_signal(signal.SIGTERM)

    hvp.CANCEL.clear()
    old_term = signal.signal(signal.SIGTERM, on_term)
    old_int = signal.signal(signal.SIGINT, on_int)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
        hvp.CANCEL.clear()


def _fit(built: _Built, run_dir: Path, resume: str | None) -> float:
    """Train; return the wall time. A stop by signal raises :class:`TrainingInterrupted`, a disk
    that refuses a write :class:`RunStorageError`, each in one line saying what was saved."""
    import torch.distributed as dist
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from deconcnn_curvature.checkpoints import allowed_checkpoint_globals

    trainer = built.trainer
    group_before = dist.is_available() and dist.is_initialized()
    start = time.perf_counter()
    try:
        with _stoppable(built.stop), warnings.catch_warnings(), allowed_checkpoint_globals():
            for pattern in _QUIET:
                warnings.filterwarnings("ignore", message=pattern)
            trainer.fit(built.module, datamodule=built.data, ckpt_path=resume)
    except SIGTERMException:
        if not trainer.is_global_zero:
            raise
        raise _interrupted(built, built.stop.how or "SIGTERM") from None
    except (CheckpointWriteError, OSError) as exc:
        if not isinstance(exc, CheckpointWriteError) and exc.errno not in _DISK_ERRORS:
            raise
        raise _storage_error(built, exc) from None
    seconds = time.perf_counter() - start
    if not built.checkpoint.exists():
        trainer.save_checkpoint(built.checkpoint)  # a collective under DDP: every rank calls it
    if not group_before and dist.is_available() and dist.is_initialized():
        # Lightning's DDP leaves its process group up; close it in step on every rank (gloo's
        # threads torn down at interpreter exit otherwise abort the process now and then).
        dist.barrier()
        dist.destroy_process_group()
    return seconds


def _resume_command(built: _Built) -> str:
    return f"deconcnn-curv train resume={built.checkpoint} run_dir={built.run_dir}"


def _interrupted(built: _Built, how: str) -> TrainingInterrupted:
    step = built.trainer.global_step
    code = 130 if how == "Ctrl-C" else 143
    if not built.checkpoint.exists():
        return TrainingInterrupted(
            f"stopped by {how} at step {step}, before a checkpoint was saved in "
            f"{built.run_dir}; start the run again with if_exists=move_aside.",
            code,
        )
    return TrainingInterrupted(
        f"stopped by {how} at step {step}; the run is saved in {built.run_dir}. "
        f"Resume it with: {_resume_command(built)}",
        code,
    )


def _saved_step(path: Path) -> int | None:
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except Exception:  # absent or unreadable: nothing to resume from
        return None


def _storage_error(built: _Built, exc: OSError) -> RunStorageError:
    """Try to save the training state once more (the atomic write keeps the previous
    checkpoint if it fails too) and say in one line what is on disk."""
    step = built.trainer.global_step
    what = exc.strerror or str(exc)
    if not isinstance(exc, CheckpointWriteError) and built.trainer.world_size == 1:
        with contextlib.suppress(CheckpointWriteError, OSError):
            built.trainer.save_checkpoint(built.checkpoint, weights_only=False)
    saved = _saved_step(built.checkpoint)
    if saved is None:
        state = (
            "no checkpoint could be saved; free space and start the run again with "
            "if_exists=move_aside"
        )
    else:
        state = f"last.ckpt holds step {saved}; free space and resume: {_resume_command(built)}"
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    return RunStorageError(
        f"training stopped at step {step}: the disk refused a write{where}: {what}; {state}."
    )


# ------------------------------------------------------------------ finish


def _finish(cfg: DictConfig, built: _Built, seconds: float) -> RunResult:
    """The plot and the :class:`RunResult` of a completed fit."""
    from deconcnn_curvature.monitor import read_curvature_jsonl

    trainer, monitor = built.trainer, built.monitor
    path = built.curvature_path
    records = read_curvature_jsonl(path) if path.exists() else []
    plot_path = None
    if cfg.get("plot", True) and records and trainer.is_global_zero:
        plot_path = _plot(cfg, built, records)
    metrics = {}
    for key, value in trainer.callback_metrics.items():
        number = float(value)
        if math.isfinite(number):
            metrics[key] = number
    note = None
    if monitor is not None and monitor.enabled and not records:
        note = (
            f"no measurement: the run had {trainer.global_step - built.start_step} steps, the "
            f"cadence is {monitor.compute_every_n_steps} (curvature.compute_every_n_steps)"
        )
    return RunResult(
        run_dir=built.run_dir,
        config_path=built.config_path or built.run_dir / "config.yaml",
        metrics_path=built.metrics_path,
        curvature_path=path if path.exists() else None,
        checkpoint_path=built.checkpoint if built.checkpoint.exists() else None,
        plot_path=plot_path,
        global_step=int(trainer.global_step),
        epochs=int(trainer.current_epoch),
        seconds=seconds,
        metrics=metrics,
        records=tuple(records),
        global_rank=int(trainer.global_rank),
        start_step=built.start_step,
        curvature_note=note,
    )


def _plot(cfg: DictConfig, built: _Built, records: Sequence[Mapping[str, Any]]) -> Path:
    """``curvature.png``, written beside itself and renamed over the name (never through a
    link). Measurements that failed stay failed (value null, marked); a record claiming success
    with an unusable value is left out."""
    plotted = [r for r in records if usable_record(r) or r.get("value") is None]
    out = built.run_dir / "curvature.png"
    title, loss = _title(cfg, built.monitor), read_training_loss(built.metrics_path)
    run_folder.write_with(out, lambda tmp: plot_curvature(plotted, tmp, title=title, loss=loss))
    return out


def _title(cfg: DictConfig, monitor: Any) -> str:
    from omegaconf import OmegaConf

    model = OmegaConf.select(cfg, "model.name", default="model")
    width = OmegaConf.select(cfg, "model.width_mult", default=None)
    backend = getattr(monitor, "backend_name", None) or getattr(monitor, "backend", None) or "?"
    every = getattr(monitor, "compute_every_n_steps", "?")
    batch = getattr(monitor, "hessian_batch_size", "?")
    shape = f"{model}" + (f" (width {width:g})" if isinstance(width, int | float) else "")
    return f"{shape}: curvature by {backend} every {every} steps on {batch} samples"


def read_training_loss(
    metrics_path: str | os.PathLike[str], key: str = "train/loss"
) -> list[tuple[int, float]]:
    """``(step, value)`` of ``key`` from a ``metrics.jsonl`` (deconCNN's format), finite values
    only; an absent file or unreadable line gives nothing rather than an error (the plot is
    drawn without the loss panel)."""
    import json

    path = Path(metrics_path)
    if not path.is_file():
        return []
    out: list[tuple[int, float]] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                row = json.loads(line)
                value = float(row["metrics"][key])
                step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                continue
            if math.isfinite(value):
                out.append((step, value))
    return out
