"""The main job: a deconCNN-shaped training run with curvature measured during training.

:func:`run_training` takes a composed Hydra config (``configs/train.yaml`` and its groups; see
:func:`compose_config`) and builds everything from it: the CIFAR data module, the
``resnet18_cifar`` ``ClassificationModule`` (SGD with momentum, warm-up + cosine), a Lightning
``Trainer`` with a progress bar, deconCNN's ``metrics.jsonl`` writer, a checkpoint and the
``CurvatureMonitor`` (when ``curvature.enabled``). It fits, then draws the curvature records
(trace and λ_max with error bars against step, the training loss underneath) into
``curvature.png``. ``deconcnn-curv train
[overrides]`` is a thin front end over it.

The run folder (``run_dir``, default ``runs/<name or timestamp>``) holds::

    config.yaml       the resolved configuration (a resume writes config.resume-<n>.yaml beside it)
    .run.lock         locked (fcntl.flock) by the run writing into the folder, for its lifetime
    metrics.jsonl     {"timestamp", "step", "metrics": {...}} per optimiser step (deconCNN's format)
    curvature.jsonl   one record per measurement and quantity (value, stderr, ci, n_hvp, error...)
    last.ckpt         the Lightning checkpoint (resume with resume=<run_dir>/last.ckpt)
    curvature.png     the plot

Where the configs come from (:func:`default_config_dir`): ``$DECONCNN_CURVATURE_CONFIG_DIR`` if
set; else the repository's ``configs/`` when running from a source checkout; else the same files as
installed with the package (``deconcnn_curvature/conf``: ``pyproject.toml`` maps that package to
``configs/``, the only copy in the repository).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deconcnn_curvature.errors import ConfigurationError, CurvatureError
from deconcnn_curvature.present import plot_curvature, summary_table
from deconcnn_curvature.results import usable_record

if TYPE_CHECKING:
    from omegaconf import DictConfig

__all__ = [
    "ENV_CONFIG_DIR",
    "LOCK_NAME",
    "RunResult",
    "TrainingInterrupted",
    "compose_config",
    "compose_run_config",
    "default_config_dir",
    "plot_curvature",
    "read_training_loss",
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
        _check_curvature_keys(overrides)  # not Hydra's "use +curvature.num_hvp=3": no such setting
        # Hydra's later lines carry the fix ("To append to your config use +key=value").
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigurationError(
            f"bad configuration override: {message} (config folder: {folder}; see "
            "`deconcnn-curv train --cfg` for the keys)."
        ) from exc


def _check_curvature_keys(overrides: Sequence[str]) -> None:
    """Raise the monitor's own unknown-setting error (the valid names, a close match) for an
    override ``curvature.<name>=...`` whose name is no monitor setting."""
    import inspect

    from deconcnn_curvature.monitor import CurvatureMonitor
    from deconcnn_curvature.monitor.settings import settings_kwargs

    accepted = [p for p in inspect.signature(CurvatureMonitor.__init__).parameters if p != "self"]
    for override in overrides:
        key = override.partition("=")[0]
        head, _, rest = key.partition(".")
        name = rest.partition(".")[0]
        if head == "curvature" and name and name not in accepted:
            settings_kwargs(accepted, {name: None}, {})


def compose_run_config(
    overrides: Sequence[str] = (), config_dir: str | os.PathLike[str] | None = None
) -> tuple[DictConfig, list[str]]:
    """The configuration ``deconcnn-curv train OVERRIDES`` runs, and notes to show at start-up.

    On top of :func:`compose_config`:

    * a value starting with ``~`` (``data.root=~/data/cifar``) is expanded to the home folder
      (the shell leaves it alone after ``key=``, and Hydra's override lexer refuses it);
    * a resume (``resume=<run>/last.ckpt``) takes the run's own ``config.yaml`` (saved next to
      the checkpoint) with this command's overrides on top, and continues in the checkpoint's
      folder unless ``run_dir=``/``name=`` is given;
    * otherwise ``$DECONCNN_CURVATURE_BACKEND`` names the backend when no override does;
    * the ``curvature`` settings left unset (``null``, see ``configs/curvature/base.yaml``) are
      filled with the monitor's defaults, so ``--cfg`` and the saved ``config.yaml`` show the
      values the run uses.
    """
    overrides = [_expand_home(o) for o in overrides]
    resume = next((o.partition("=")[2] for o in overrides if o.startswith("resume=")), None)
    if resume:
        saved = Path(resume.strip("'\"")).expanduser().parent / "config.yaml"
        if saved.is_file():
            cfg, notes = _resume_config(saved, overrides, config_dir)
            return _fill_monitor_defaults(cfg), notes
    cfg = compose_config(overrides, config_dir)
    if cfg.get("resume"):
        return _fill_monitor_defaults(cfg), [
            f"no config.yaml next to {cfg.resume}; resuming with the configuration this command "
            "composes (the checkpoint must fit it)."
        ]
    notes = _env_backend(cfg, overrides)
    return _fill_monitor_defaults(cfg), notes


def _fill_monitor_defaults(cfg: DictConfig) -> DictConfig:
    """Set each unset (``null``) ``curvature`` setting to the
    default of ``CurvatureMonitor``'s signature (where the defaults are written, once); an unset
    deprecated ``num_samples`` is dropped. A config without a ``curvature`` group is returned as
    it is."""
    import inspect

    from omegaconf import OmegaConf, open_dict

    from deconcnn_curvature.monitor import CurvatureMonitor
    from deconcnn_curvature.monitor.settings import is_unset

    node = OmegaConf.select(cfg, "curvature", default=None)
    if not OmegaConf.is_dict(node):
        return cfg
    defaults = inspect.signature(CurvatureMonitor.__init__).parameters
    with open_dict(node):
        for key in list(node.keys()):
            if key not in defaults:
                continue
            if OmegaConf.is_missing(node, key) or not is_unset(key, node[key]):
                continue
            if key == "num_samples":
                del node[key]
                continue
            value = defaults[key].default
            node[key] = list(value) if isinstance(value, tuple) else value
    return cfg


def _expand_home(override: str) -> str:
    key, sep, value = override.partition("=")
    if not sep or not value.startswith("~") or "'" in value or '"' in value:
        return override
    return f"{key}='{os.path.expanduser(value)}'"


def _override_keys(overrides: Sequence[str]) -> list[str]:
    return [o.partition("=")[0].lstrip("+~") for o in overrides if "=" in o]


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(_leaves(value, name))
        else:
            out[name] = value
    return out


def _resolved_leaves(cfg: DictConfig) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return _leaves(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))


def _resume_config(
    saved_path: Path, overrides: Sequence[str], config_dir: str | os.PathLike[str] | None
) -> tuple[DictConfig, list[str]]:
    """The run's saved config with this command's overrides on top.

    ``key=value`` for a key the saved config has is applied to it directly (so ``model.width=8``
    works for a ``model=small_cnn`` run; a ``curvature.*`` key also sets the resolved
    ``callbacks.*`` copy). Group choices and ``+`` additions are composed by Hydra over the
    defaults, and the keys they change are copied over.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    saved = OmegaConf.load(saved_path)
    absent = object()

    def put(key: str, value: Any) -> None:
        OmegaConf.update(saved, key, value, merge=False, force_add=True)
        # The saved callbacks node holds resolved copies of the curvature.* values in its
        # `settings`.
        name = key.removeprefix("curvature.")
        if not key.startswith("curvature."):
            return
        if OmegaConf.is_dict(OmegaConf.select(saved, "callbacks.settings", default=None)):
            mirror = "callbacks.settings." + name
            OmegaConf.update(saved, mirror, value, merge=False, force_add=True)

    plain, rest = [], []
    for override in overrides:
        key, sep, _ = override.partition("=")
        found = (
            OmegaConf.select(saved, key, default=absent) if sep and key[:1] not in "+~" else absent
        )
        leaf = found is not absent and not OmegaConf.is_config(found)
        (plain if leaf else rest).append(override)  # a group choice (model=...) goes to Hydra
    if rest:
        new = _resolved_leaves(compose_config(rest, config_dir))
        default = _resolved_leaves(compose_config([], config_dir))
        named = _override_keys(rest)
        for key, value in new.items():
            if key.startswith("callbacks."):
                continue  # follows curvature.* (put), or an explicit callbacks.* override below
            if default.get(key, absent) != value or any(
                key == n or key.startswith(n + ".") for n in named
            ):
                put(key, value)
        for key, value in new.items():
            if key.startswith("callbacks.") and any(
                key == n or key.startswith(n + ".") for n in named
            ):
                put(key, value)
    try:
        dotlist = OmegaConf.from_dotlist(list(plain))
    except OmegaConfBaseException as exc:
        raise ConfigurationError(f"bad configuration override: {exc}") from exc
    for key, value in _leaves(OmegaConf.to_container(dotlist)).items():
        put(key, value)
    named = _override_keys(overrides)
    resume = Path(str(saved.resume)).expanduser()
    saved.resume = str(resume)
    if not {"run_dir", "name"} & set(named):
        saved.run_dir = str(resume.parent)  # the run continues in its own folder
    elif "name" in named and "run_dir" not in named:
        saved.run_dir = None
    shown = [o for o in overrides if _override_keys([o])[:1] not in (["resume"], ["run_dir"])]
    extra = f" and this command's {' '.join(shown)}" if shown else ""
    return saved, [f"resuming with the run's own configuration ({saved_path}){extra}."]


def _env_backend(cfg: DictConfig, overrides: Sequence[str]) -> list[str]:
    """Apply ``$DECONCNN_CURVATURE_BACKEND`` as the default curvature backend."""
    from omegaconf import OmegaConf

    from deconcnn_curvature.registry import ENV_BACKEND

    env = os.environ.get(ENV_BACKEND)
    if not env:
        return []
    keys = _override_keys(overrides)
    if any(k in ("curvature", "curvature.backend", "callbacks", "callbacks.backend") for k in keys):
        backend = OmegaConf.select(cfg, "curvature.backend", default=None)
        return [
            f"curvature backend {backend} (from the command line; ${ENV_BACKEND}={env} unused)."
        ]
    import deconcnn_curvature as dcc

    known = [b["name"] for b in dcc.list_backends()]
    if env not in known:
        raise ConfigurationError(
            f"${ENV_BACKEND}={env} names no registered backend (known: {', '.join(known)}); "
            "unset it or set it to a name from `deconcnn-curv list-backends`."
        )
    OmegaConf.update(cfg, "curvature.backend", env, merge=False, force_add=True)
    return [f"curvature backend {env} (from ${ENV_BACKEND})."]


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
        }


#: Set by the first process of a run for the rank processes Lightning launches from it (they run
#: this command again and must write to the same folder, whatever the clock says by then).
RUN_DIR_ENV = "DECONCNN_CURVATURE_RUN_DIR_OF_RANK0"


def _launched_rank() -> bool:
    """This process is a rank > 0 that Lightning's DDP launcher started from rank 0's command."""
    return os.environ.get("LOCAL_RANK", "0") != "0" and RUN_DIR_ENV in os.environ


def secondary_rank() -> bool:
    """A process other than the first of a distributed run: launched by Lightning from rank 0,
    or given a non-zero rank by torchrun / SLURM. Rank 0 alone locks the folder, checks it and
    writes the config; the other ranks write into it."""
    if _launched_rank():
        return True
    return any(os.environ.get(name, "0") not in ("", "0") for name in ("RANK", "SLURM_PROCID"))


def _run_dir(cfg: DictConfig) -> Path:
    if _launched_rank():
        return Path(os.environ[RUN_DIR_ENV])
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


#: The lock file inside a run folder, held (``fcntl.flock``) by the run writing into it.
LOCK_NAME = ".run.lock"


def make_run_dir(path: Path, timestamped: bool) -> tuple[Path, bool]:
    """Create the run folder; return it and whether this call created it.

    A timestamped folder is created atomically (``mkdir`` without ``exist_ok``): two runs started
    in the same second get ``<stamp>`` and ``<stamp>-2``, never one folder between them.
    """
    try:
        if timestamped:
            base, i = path, 1
            while True:
                try:
                    path.mkdir(parents=True)
                    return path, True
                except FileExistsError:
                    i += 1
                    path = base.with_name(f"{base.name}-{i}")
        existed = path.is_dir()
        path.mkdir(parents=True, exist_ok=True)
        return path, not existed
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigurationError(
            f"cannot create the run folder {path}: {reason}; choose another run_dir= or name=."
        ) from exc


def _lock_run_dir(run_dir: Path) -> Any:
    """Take the run folder's lock (``fcntl.flock``, exclusive, not waiting) for this process and
    write its pid into the lock file. A second run into the same folder fails here at once; a lock
    left by a dead process is no lock (the kernel drops it with the process). Returns the open
    lock file (closing it releases the lock), or ``None`` where ``fcntl`` does not exist."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the "already holds a run" check remains
        return None
    handle = (run_dir / LOCK_NAME).open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ConfigurationError(
            f"run folder {run_dir} is in use by another run (pid {holder}); wait for it to end, "
            "or choose another run_dir= or name=."
        ) from exc
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _holds_a_run(run_dir: Path) -> bool:
    return (run_dir / "curvature.jsonl").exists() or (run_dir / "metrics.jsonl").exists()


def _move_aside(run_dir: Path) -> Path:
    """Move the contents of ``run_dir`` (its lock file apart) into a new sibling folder
    ``<name>.1`` (``.2``, ... when taken); return that folder."""
    i = 1
    while True:
        side = run_dir.with_name(f"{run_dir.name}.{i}")
        try:
            side.mkdir()
            break
        except FileExistsError:
            i += 1
    for entry in sorted(run_dir.iterdir()):
        if entry.name != LOCK_NAME:
            os.replace(entry, side / entry.name)
    return side


def _config_path(run_dir: Path, resume: Any) -> Path:
    """``config.yaml``, or for a resume into a folder that has one, ``config.resume-<n>.yaml``
    (the run's original configuration is kept)."""
    path = run_dir / "config.yaml"
    if resume is None or not path.exists():
        return path
    n = 1
    while (run_dir / f"config.resume-{n}.yaml").exists():
        n += 1
    return run_dir / f"config.resume-{n}.yaml"


def _listing(run_dir: Path) -> dict[str, tuple[int, int]]:
    """What a folder holds (name: size, modification time), its lock file apart."""
    out = {}
    for entry in run_dir.iterdir():
        if entry.name != LOCK_NAME:
            stat = entry.stat()
            out[entry.name] = (stat.st_size, stat.st_mtime_ns)
    return out


def _discard_failed_start(
    run_dir: Path, created: bool, before: Mapping[str, tuple[int, int]], written: Sequence[Path]
) -> None:
    """A run that failed before training wrote anything leaves no trace: the files it wrote (its
    config) go, and so does the folder if this run created it. Once training has written
    something (records, a checkpoint), everything stays for a resume."""
    if not run_dir.is_dir():
        return
    names = {p.name for p in written}
    now = {k: v for k, v in _listing(run_dir).items() if k not in names}
    if now != dict(before):
        return
    for path in written:
        path.unlink(missing_ok=True)
    if created:
        (run_dir / LOCK_NAME).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            run_dir.rmdir()


class TrainingInterrupted(CurvatureError):
    """Training was stopped by SIGTERM; the message says how to resume (the CLI exits 143)."""

    exit_code = 143  # 128 + SIGTERM, what a shell reports for a process ended by the signal


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
    expected = module.state_dict()
    differ = [
        f"{name}: checkpoint {list(state[name].shape)} vs model {list(tensor.shape)}"
        for name, tensor in expected.items()
        if name in state and tuple(state[name].shape) != tuple(tensor.shape)
    ]
    missing = [name for name in expected if name not in state]
    extra = [name for name in state if name not in expected]
    if differ or missing or extra:
        example = differ[0] if differ else (f"missing {missing[0]}" if missing else extra[0])
        raise ConfigurationError(
            f"resume={resume}: the checkpoint does not fit the model of this config "
            f"({len(differ)} tensors of another shape, {len(missing)} missing, {len(extra)} "
            f"unexpected; e.g. {example}); resume with the run's own config (drop the overrides "
            "that change the model)."
        )
    return int(checkpoint.get("global_step") or 0)


def _checkpoint_on_sigterm(path: Path) -> Any:
    """A callback saving ``path`` when Lightning stops training for SIGTERM (it raises its
    ``SIGTERMException`` after the current optimiser step, so the saved state is consistent)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from deconcnn_curvature.monitor.lightning_import import pl

    class _CheckpointOnSigterm(pl.Callback):
        def on_exception(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
        ) -> None:
            # Under DDP the launcher has already killed the other ranks, and saving is a
            # collective: there the last epoch-end checkpoint is the one to resume from.
            if isinstance(exception, SIGTERMException) and trainer.world_size == 1:
                trainer.save_checkpoint(path, weights_only=False)

    return _CheckpointOnSigterm()


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
    """Train as ``cfg`` says and write the run folder (see the module docstring).

    The run holds the folder's lock (:data:`LOCK_NAME`) until it returns: a second run into the
    same folder fails at once. A run that fails before training wrote anything removes what it
    created. SIGTERM stops training after the current step, saves ``last.ckpt`` and raises
    :class:`TrainingInterrupted` (the CLI exits with 143 and prints the resume command).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    from deconcnn_curvature.checkpoints import check_resume_checkpoint

    _require(cfg, "model", "optim", "lrsched", "data", "trainer")
    try:  # `???` (Hydra's "must be given") anywhere but in the callbacks' resolved copies
        kept = [key for key in cfg if key != "callbacks"]
        OmegaConf.to_container(
            OmegaConf.masked_copy(cfg, kept), resolve=True, throw_on_missing=True
        )
    except MissingMandatoryValue as exc:
        key = getattr(exc, "full_key", None) or str(exc)
        hint = " (e.g. data.root=/path/to/cifar)" if str(key).startswith("data.") else ""
        raise ConfigurationError(f"the config value {key} must be given{hint}.") from exc

    resume = cfg.get("resume")
    if resume is not None and not Path(resume).expanduser().is_file():
        raise ConfigurationError(f"resume={resume}: no such checkpoint file.")
    if resume is not None:
        resume = str(Path(resume).expanduser())
        check_resume_checkpoint(resume)  # pickled code is refused before anything is built
    _check_trainer_values(_plain(cfg.trainer))
    if_exists = cfg.get("if_exists") or "refuse"
    if if_exists not in ("refuse", "move_aside"):
        raise ConfigurationError(f"if_exists must be refuse or move_aside; got {if_exists!r}.")
    moving = if_exists == "move_aside"
    launched = secondary_rank()
    timestamped = not _launched_rank() and not cfg.get("run_dir") and not cfg.get("name")
    run_dir, created = make_run_dir(_run_dir(cfg), timestamped)
    lock = None if launched else _lock_run_dir(run_dir)
    before = _listing(run_dir)
    written: list[Path] = []
    try:
        if not launched and resume is None and _holds_a_run(run_dir) and not moving:
            raise ConfigurationError(
                f"run folder {run_dir} already holds a run; choose another name= or "
                f"run_dir=, or continue it with resume={run_dir / 'last.ckpt'}."
            )
        return _train_in(cfg, run_dir, resume, launched, written)
    except BaseException:
        if not launched:
            _discard_failed_start(run_dir, created, before, written)
        raise
    finally:
        if lock is not None:
            lock.close()


def _train_in(
    cfg: DictConfig, run_dir: Path, resume: str | None, launched: bool, written: list[Path]
) -> RunResult:
    """The run itself, in its created and locked folder (see :func:`run_training`)."""
    from omegaconf import OmegaConf

    from deconcnn_curvature.checkpoints import allowed_checkpoint_globals
    from deconcnn_curvature.monitor import read_curvature_jsonl
    from deconcnn_curvature.monitor.lightning_import import pl
    from deconcnn_curvature.training._console import no_logger_tip, progress_bar
    from deconcnn_curvature.training.metrics import MetricsJSONL
    from deconcnn_curvature.training.module import ClassificationModule

    curvature_path = run_dir / "curvature.jsonl"
    # Build everything that can fail on a bad value before anything is written.
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

    metrics_path = run_dir / "metrics.jsonl"
    checkpoint = run_dir / "last.ckpt"
    callbacks: list[Any] = [
        MetricsJSONL(metrics_path, every_n_steps=int(cfg.get("metrics_every_n_steps") or 1)),
        pl.callbacks.ModelCheckpoint(
            dirpath=run_dir, filename="last", save_top_k=1, enable_version_counter=False
        ),
        _checkpoint_on_sigterm(checkpoint),
    ]
    if monitor is not None:
        callbacks.append(monitor)
    trainer_kwargs = dict(_plain(cfg.trainer))
    if trainer_kwargs.get("enable_progress_bar", True):
        callbacks.append(progress_bar())  # "Epoch 2/2" on the last of 2 epochs, not "Epoch 1/1"
    with no_logger_tip():  # Lightning's litlogger advertisement
        trainer = _make_trainer(
            trainer_kwargs, default_root_dir=run_dir, logger=False, callbacks=callbacks
        )

    config_path = _config_path(run_dir, resume)
    if not launched:
        if resume is None and _holds_a_run(run_dir):  # if_exists=move_aside (checked before)
            side = _move_aside(run_dir)
            print(
                f"deconcnn-curv train: {run_dir} held an earlier run; moved it to {side} "
                "(nothing deleted).",
                file=sys.stderr,
            )
        written.append(config_path)
        OmegaConf.save(cfg, config_path, resolve=True)
        os.environ[RUN_DIR_ENV] = str(run_dir.resolve())  # inherited by DDP rank processes

    import torch.distributed as dist
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    group_before = dist.is_available() and dist.is_initialized()
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(), allowed_checkpoint_globals():  # resume= weights only
            for pattern in _QUIET:
                warnings.filterwarnings("ignore", message=pattern)
            trainer.fit(module, datamodule=data, ckpt_path=resume)
    except SIGTERMException:
        if not trainer.is_global_zero:
            raise
        if not checkpoint.exists():
            raise TrainingInterrupted(
                f"stopped by SIGTERM at step {trainer.global_step}, before a checkpoint was "
                f"saved in {run_dir}; start the run again."
            ) from None
        raise TrainingInterrupted(
            f"stopped by SIGTERM at step {trainer.global_step}; the run is saved in {run_dir}. "
            f"Resume it with: deconcnn-curv train resume={checkpoint} run_dir={run_dir}"
        ) from None
    seconds = time.perf_counter() - start

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
        # Measurements that failed stay failed (value null, marked); a record claiming success
        # with an unusable value (NaN written as null before results were checked) is left out.
        plotted = [r for r in records if usable_record(r) or r.get("value") is None]
        plot_path = plot_curvature(
            plotted,
            run_dir / "curvature.png",
            title=_title(cfg, monitor),
            loss=read_training_loss(metrics_path),
        )
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
        start_step=start_step,
    )


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
