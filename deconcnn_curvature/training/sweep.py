"""``deconcnn-curv train -m OVERRIDES``: a grid of training runs through Hydra's own multirun.

The grid is Hydra's, run by Hydra's public entry point: :func:`run_sweep` decorates
:func:`run_job` with ``@hydra.main`` (the shipped configs, ``train.yaml``) and calls it with the
command line Hydra reads (``--multirun`` and the overrides). Hydra's sweeper expands
``optim.lr=0.05,0.1 seed=0,1,2`` into jobs and its launcher runs them: the basic launcher, one job
after the other in this process, or any launcher plugin named by ``hydra/launcher=...`` (for SLURM,
hydra-submitit-launcher's ``submitit_slurm``). Nothing here schedules anything.

Each job is :func:`~deconcnn_curvature.training.run.run_training`, the function a plain
``deconcnn-curv train`` runs, with ``run_dir`` set to the job's folder
(``hydra.sweep.dir``/``hydra.sweep.subdir``): so each job holds its folder's lock, writes the same
files and saves ``last.ckpt`` when SIGTERM stops it. The sweep folder::

    <sweep>/multirun.yaml     Hydra's record of the sweep
    <sweep>/<job number>/     a run folder (config.yaml, metrics.jsonl, curvature.jsonl, ...) with
        sweep-job.json        the job's overrides and outcome, written by the job itself
        .hydra/               Hydra's copies of the job's config and overrides

The outcome is read back from the ``sweep-job.json`` files, so it is the same whichever launcher
ran the jobs and wherever. A failed job does not stop the others; a job stopped by SIGTERM or
Ctrl-C stops the sweep (a scheduler's signal). Running the same command into the same
``hydra.sweep.dir`` again skips the jobs that completed and resumes the interrupted ones from their
``last.ckpt``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import traceback
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deconcnn_curvature.errors import ConfigurationError, CurvatureError

if TYPE_CHECKING:
    from omegaconf import DictConfig

__all__ = [
    "JOB_FILE",
    "JobOutcome",
    "SweepInterrupted",
    "SweepResult",
    "check_sweep",
    "read_jobs",
    "run_job",
    "run_sweep",
]

#: The file each job writes into its folder: its overrides and outcome.
JOB_FILE = "sweep-job.json"

#: Set by :func:`run_sweep` for its jobs (inherited by launcher processes), so that the outcome
#: read back is this sweep's and not one an earlier run into the same folder left behind.
SWEEP_ID_ENV = "DECONCNN_CURVATURE_SWEEP_ID"

#: Keys each job's folder decides; a sweep cannot set them.
_PER_JOB_KEYS = ("run_dir", "name", "resume")


class SweepInterrupted(BaseException):
    """A job was stopped by SIGTERM or Ctrl-C: the sweep stops too. A ``BaseException``, so that
    Hydra's job runner (which records an ``Exception`` and goes on) lets it through."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class JobOutcome:
    """One job of a sweep, as its ``sweep-job.json`` says."""

    folder: Path
    status: str  # completed | failed | interrupted | unfinished
    overrides: tuple[str, ...]
    number: int | None = None
    message: str = ""
    global_step: int | None = None
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "status": self.status,
            "overrides": list(self.overrides),
            "number": self.number,
            "message": self.message,
            "global_step": self.global_step,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class SweepResult:
    """A sweep's folder and its jobs' outcomes; ``missing`` jobs left no folder at all."""

    sweep_dir: Path
    jobs: tuple[JobOutcome, ...]
    expected: int | None = None
    stopped: str = ""
    stopped_code: int = 0

    @property
    def missing(self) -> int:
        return max(0, (self.expected or 0) - len(self.jobs))

    @property
    def exit_code(self) -> int:
        """0 when every job completed; 143 / 130 when SIGTERM / Ctrl-C stopped the sweep; else 1."""
        if self.stopped_code:
            return self.stopped_code
        if self.missing or any(job.status != "completed" for job in self.jobs) or not self.jobs:
            return 1
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "sweep_dir": str(self.sweep_dir),
            "jobs": [job.to_dict() for job in self.jobs],
            "expected": self.expected,
            "missing": self.missing,
            "stopped": self.stopped or None,
            "exit_code": self.exit_code,
        }


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _parse(overrides: Sequence[str]) -> list[Any]:
    """Hydra's own parse of the overrides (``hydra.core.override_parser``, the parser sweeper
    plugins use); a line that does not parse is one :class:`ConfigurationError`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = []
    for override in overrides:
        try:
            parsed.extend(parser.parse_overrides([override]))
        except HydraException as exc:
            raise ConfigurationError(f"bad override {override!r}: {_one_line(exc)}") from exc
    return parsed


def _job_values(parsed: Sequence[Any]) -> tuple[list[str], list[list[str]], int | None]:
    """The fixed overrides, each swept key's overrides (one per value), and the number of jobs
    (``None`` when a sweep cannot be enumerated, e.g. an optimiser plugin's ``interval(...)``)."""
    fixed: list[str] = []
    swept: list[list[str]] = []
    jobs: int | None = 1
    for override in parsed:
        if not override.is_sweep_override():
            fixed.append(override.input_line)
        elif override.is_discrete_sweep():
            key = override.get_key_element()
            values = [f"{key}={value}" for value in override.sweep_string_iterator()]
            swept.append(values)
            jobs = None if jobs is None else jobs * len(values)
        else:
            jobs = None  # the sweeper plugin that understands it picks the values
    return fixed, swept, jobs


def check_sweep(
    overrides: Sequence[str], config_dir: str | os.PathLike[str] | None = None
) -> tuple[DictConfig, int | None]:
    """Check a sweep's overrides before any job runs; return the first job's configuration and
    the number of jobs (``None`` when the sweeper picks them).

    Every value of every swept key is composed once (with the other keys at their first value),
    so an unknown key, a group option that does not exist or a value the config refuses is one
    :class:`ConfigurationError` here, not a failure in each job.
    """
    from omegaconf import OmegaConf

    from deconcnn_curvature.training.run import compose_config, finish_composed_config

    parsed = _parse(overrides)
    for override in parsed:
        if override.key_or_group in _PER_JOB_KEYS:
            raise ConfigurationError(
                f"{override.key_or_group}= cannot be given to a sweep (-m): each job runs in its "
                "own folder under hydra.sweep.dir; set hydra.sweep.dir=... instead."
            )
    fixed, swept, jobs = _job_values(parsed)
    first = [values[0] for values in swept]
    cfg = compose_config([*fixed, *first], config_dir)
    for i, values in enumerate(swept):
        for value in values[1:]:
            compose_config([*fixed, *first[:i], value, *first[i + 1 :]], config_dir)
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    if devices not in (1, "1") and not (OmegaConf.is_list(devices) and len(devices) == 1):
        raise ConfigurationError(
            f"trainer.devices={devices}: a sweep job runs on one device (Lightning's multi-device "
            "launcher would start the whole sweep again in each rank); run multi-device runs one "
            "at a time with plain `deconcnn-curv train`."
        )
    cfg, _ = finish_composed_config(cfg, [*fixed, *first])
    return cfg, jobs


def _given(overrides: Sequence[str], key: str) -> bool:
    return any(o.partition("=")[0].lstrip("+~") == key for o in overrides)


def _sweep_dir(
    overrides: Sequence[str], cfg: DictConfig, config_dir: str | os.PathLike[str] | None
) -> Path:
    """The sweep folder: ``hydra.sweep.dir`` when given (resolved once here, so that
    ``${now:...}`` is the same for every job and for the summary), else
    ``<runs_root>/sweeps/<timestamp>`` (a new folder: ``-2``, ``-3`` for sweeps started in the
    same second)."""
    given = next((o for o in overrides if o.partition("=")[0] == "hydra.sweep.dir"), None)
    if given is not None:
        value = given.partition("=")[2]
        if "${" not in value:
            return Path(value.strip("'\"")).expanduser()
        return Path(_resolved_sweep_dir(overrides, config_dir)).expanduser()
    root = Path(str(cfg.get("runs_root") or "runs")).expanduser() / "sweeps"
    base = path = root / datetime.now().strftime("%Y%m%d-%H%M%S")
    i = 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def _resolved_sweep_dir(overrides: Sequence[str], config_dir: str | os.PathLike[str] | None) -> str:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from deconcnn_curvature.training.run import default_config_dir

    folder = Path(config_dir).resolve() if config_dir is not None else default_config_dir()
    fixed, swept, _ = _job_values(_parse(overrides))
    try:
        with initialize_config_dir(str(folder), version_base="1.3", job_name="deconcnn-curv"):
            cfg = compose("train", [*fixed, *(v[0] for v in swept)], return_hydra_config=True)
            return str(cfg.hydra.sweep.dir)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigurationError(f"hydra.sweep.dir does not resolve: {_one_line(exc)}") from exc


def run_sweep(
    overrides: Sequence[str],
    config_dir: str | os.PathLike[str] | None = None,
    *,
    checked: tuple[DictConfig, int | None] | None = None,
) -> SweepResult:
    """Run the grid ``overrides`` describes through Hydra's multirun (see the module docstring)
    and return what each job left. Bad overrides raise :class:`ConfigurationError` before any
    job runs; a failed job is in the result, not raised."""
    import hydra

    from deconcnn_curvature.training.run import default_config_dir

    cfg, expected = checked if checked is not None else check_sweep(overrides, config_dir)
    folder = Path(config_dir).resolve() if config_dir is not None else default_config_dir()
    sweep_dir = _sweep_dir(overrides, cfg, config_dir).resolve()
    argv = [o for o in overrides if o.partition("=")[0] != "hydra.sweep.dir"]
    argv.append(f"hydra.sweep.dir={json.dumps(str(sweep_dir))}")
    if not _given(overrides, "hydra.job.name"):
        argv.append("hydra.job.name=train")
    task = hydra.main(config_path=str(folder), config_name="train", version_base="1.3")(run_job)
    sweep_id = uuid.uuid4().hex
    stopped, code = "", 0
    with _hydra_process_state(["deconcnn-curv train", "--multirun", *argv], sweep_id):
        try:
            task()
        except SweepInterrupted as exc:
            stopped, code = str(exc), exc.exit_code
        except SystemExit as exc:  # Hydra printed why (a launcher refusing, a job's config)
            if exc.code not in (0, None):
                stopped = "Hydra stopped the sweep (its message is above)"
    jobs = read_jobs(sweep_dir, sweep_id)
    return SweepResult(sweep_dir, jobs, expected, stopped, code)


@contextlib.contextmanager
def _hydra_process_state(argv: list[str], sweep_id: str) -> Iterator[None]:
    """``sys.argv`` as Hydra's entry point reads it and the sweep's id for its jobs, for the
    sweep; afterwards both as they were, and the root logger's handlers too (Hydra configures
    logging for its jobs: a console handler and a log file in each job folder)."""
    import logging

    root = logging.getLogger()
    saved_argv, saved_id = sys.argv, os.environ.get(SWEEP_ID_ENV)
    handlers, level = list(root.handlers), root.level
    sys.argv = argv
    os.environ[SWEEP_ID_ENV] = sweep_id
    try:
        yield
    finally:
        sys.argv = saved_argv
        if saved_id is None:
            os.environ.pop(SWEEP_ID_ENV, None)
        else:
            os.environ[SWEEP_ID_ENV] = saved_id
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


def read_jobs(
    sweep_dir: str | os.PathLike[str], sweep_id: str | None = None
) -> tuple[JobOutcome, ...]:
    """The jobs under ``sweep_dir`` (their ``sweep-job.json``), by job number; with ``sweep_id``,
    only the jobs of that sweep (not outcomes an earlier run into the folder left)."""
    out = []
    for path in sorted(Path(sweep_dir).rglob(JOB_FILE)):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if sweep_id is not None and data.get("sweep_id") not in (sweep_id, None):
            continue
        status = data.get("status", "unfinished")
        out.append(
            JobOutcome(
                folder=path.parent,
                status="unfinished" if status == "running" else str(status),
                overrides=tuple(data.get("overrides") or ()),
                number=data.get("number"),
                message=str(data.get("message") or ""),
                global_step=data.get("global_step"),
                seconds=data.get("seconds"),
            )
        )
    out.sort(key=lambda job: (job.number is None, job.number or 0, str(job.folder)))
    return tuple(out)


class _JobFile:
    """A job's ``sweep-job.json``: written when the job starts and again with its outcome
    (atomically: a reader never sees half a file)."""

    def __init__(self, folder: Path, overrides: Sequence[str], number: int | None) -> None:
        self.path = folder / JOB_FILE
        self.data: dict[str, Any] = {
            "overrides": list(overrides),
            "number": number,
            "sweep_id": os.environ.get(SWEEP_ID_ENV),
            "pid": os.getpid(),
            "started": datetime.now().isoformat(timespec="seconds"),
        }

    def earlier(self) -> dict[str, Any] | None:
        """What an earlier run of this job left in the folder, if anything."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def write(self, status: str, message: str = "", **extra: Any) -> None:
        self.data.update(status=status, message=message, **extra)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{JOB_FILE}.{os.getpid()}")
        partial.write_text(json.dumps(self.data, indent=1) + "\n", encoding="utf-8")
        os.replace(partial, self.path)


def _resume_point(job: _JobFile, folder: Path) -> tuple[str | None, str | None]:
    """From an earlier run of this job in ``folder``: ``("completed", None)`` to skip it,
    ``(None, checkpoint)`` to resume it (it was stopped or killed), ``(None, None)`` to run it
    afresh. A folder holding another job (other overrides) is refused."""
    earlier = job.earlier()
    if earlier is None:
        return None, None
    if sorted(earlier.get("overrides") or []) != sorted(job.data["overrides"]):
        other = " ".join(earlier.get("overrides") or [])
        raise ConfigurationError(
            f"{folder} holds another job of an earlier sweep ({other}); "
            "give this sweep a new hydra.sweep.dir, or rerun the earlier command unchanged."
        )
    status = earlier.get("status")
    if status == "completed":
        job.data.update(global_step=earlier.get("global_step"), seconds=earlier.get("seconds"))
        return "completed", None
    checkpoint = folder / "last.ckpt"
    if status in ("interrupted", "running") and checkpoint.is_file():
        return None, str(checkpoint)
    return None, None


def run_job(cfg: DictConfig) -> dict[str, Any]:
    """One job of a sweep, called by Hydra's launcher with the job's composed ``cfg``: the plain
    run (:func:`~deconcnn_curvature.training.run.run_training`) in the job's folder.

    A failed run is not raised (Hydra would stop the sweep on it): its message goes to the job's
    ``sweep-job.json``, which is returned too. SIGTERM or Ctrl-C raises :class:`SweepInterrupted`
    after the file says so."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from deconcnn_curvature.training.run import (
        TrainingInterrupted,
        finish_composed_config,
        run_training,
    )

    hydra_cfg = HydraConfig.get()
    folder = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    job = _JobFile(folder, overrides, hydra_cfg.job.get("num"))
    try:
        done, resume = _resume_point(job, folder)
        if done:
            job.write("completed", "completed by an earlier run of this sweep; not run again")
            return job.data
        job.write("running")
        cfg, notes = finish_composed_config(cfg, overrides)
        for note in notes:
            print(f"deconcnn-curv train: {note}", file=sys.stderr)
        with open_dict(cfg):
            cfg.run_dir = str(folder)
            cfg.resume = resume
        result = run_training(cfg)
    except TrainingInterrupted as exc:
        job.write("interrupted", _one_line(exc))
        raise SweepInterrupted(f"job {job.data['number']}: {exc}", exc.exit_code) from None
    except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C into exit(1)
        job.write("interrupted", "stopped by Ctrl-C")
        raise SweepInterrupted(f"job {job.data['number']} stopped by Ctrl-C", 130) from None
    except CurvatureError as exc:
        job.write("failed", _one_line(exc))
    except Exception as exc:  # a bug or the machine (out of memory): shown, and the sweep goes on
        traceback.print_exc()
        job.write("failed", f"{type(exc).__name__}: {_one_line(exc)}")
    else:
        note = f"resumed from {resume}" if resume else ""
        job.write("completed", note, global_step=result.global_step, seconds=result.seconds)
    return job.data


def summary_lines(result: SweepResult) -> list[str]:
    """The sweep's summary: a header, one line per job (folder, status, the overrides that set it
    apart, steps and time or the error), what is missing, and how to read the sweep."""
    jobs = result.jobs
    shared = set.intersection(*(set(j.overrides) for j in jobs)) if jobs else set()
    counts: dict[str, int] = {}
    for j in jobs:
        counts[j.status] = counts.get(j.status, 0) + 1
    told = ", ".join(f"{n} {status}" for status, n in counts.items()) or "none ran"
    lines = [f"sweep {_shown(result.sweep_dir)}: {len(jobs)} jobs, {told}"]
    width = max((len(_shown(j.folder)) for j in jobs), default=0)
    for j in jobs:
        own = " ".join(o for o in j.overrides if o not in shared) or "-"
        if j.status == "completed" and j.global_step is not None:
            detail = f"{j.global_step} steps, {_seconds(j.seconds)}"
            detail += f" ({j.message})" if j.message else ""
        else:
            detail = j.message
        lines.append(f"  {_shown(j.folder):<{width}}  {j.status:<11}  {own}  {detail}".rstrip())
    if result.missing:
        lines.append(f"  {result.missing} of {result.expected} jobs left no folder (never started)")
    if result.stopped:
        lines.append(f"stopped: {result.stopped}")
    if result.exit_code and any(j.status in ("interrupted", "unfinished") for j in jobs):
        lines.append(
            "Run the same command again with hydra.sweep.dir="
            f"{_shown(result.sweep_dir)} to resume: completed jobs are skipped."
        )
    if any(j.status == "completed" for j in jobs):
        lines.append(f"Read them together: deconcnn-curv report {_shown(result.sweep_dir)}")
    return lines


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _seconds(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "? s"
    return f"{value:.1f} s" if value < 600 else time.strftime("%H:%M:%S", time.gmtime(value))
