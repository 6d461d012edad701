"""Curvature measured inside a Lightning training run: :class:`CurvatureMonitor` and its records.

:class:`CurvatureMonitor` is a ``lightning.pytorch`` callback built from plain arguments (so Hydra
can build it from YAML, see ``configs/callbacks/curvature_monitor.yaml``). Every
``compute_every_n_steps`` optimiser steps it measures the Hessian trace and top eigenvalue(s) of
the training loss on a curvature batch drawn from the training data, through
:func:`deconcnn_curvature.estimate` (which restores modes, ``.grad``, ``requires_grad``, buffers
and RNG states), logs them with deconCNN's metric names and appends one JSON line per quantity to
``curvature.jsonl`` (:class:`~deconcnn_curvature.monitor.records.RecordWriter`), flushed and
fsync'd at each write.

Guarantees (each has a test with a real ``Trainer``):

* **Training is unchanged.** The curvature batch is read through a private copy of the training
  data set (its random generators copied, the global RNGs restored), never through the training
  loader's iterator, and the measurement itself goes through the state guard; training with the
  monitor on is bit-identical to training with it off.
* **Failures are isolated.** With ``on_error="warn"`` a failing measurement is reported once per
  distinct reason (``rank_zero_warn``), written to the JSONL with ``value: null`` and its error,
  nothing is logged for it (never a fake 0.0), and later measurements still run. With
  ``on_error="raise"`` the run stops with the error.
* **Bad configuration fails fast**: argument checks in ``__init__``; backend, quantities,
  options, the model and the loss are checked in ``setup``, the training data and one forward +
  loss on the curvature batch (under the state guard) in ``on_train_start``, all before the first
  training step: a run never records nothing but ``null`` for a reason known at the start.
* **Resume writes the same records.** The schedule position, the fixed curvature batch (its
  indices) and the seed travel in Lightning checkpoints; every random choice is a function of the
  seed and the step, so a resumed run measures what an uninterrupted one would.

The algorithms are those of the chosen backend: Hutchinson's trace estimator (Hutchinson 1989),
Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021), Lanczos for the top eigenvalues (Lanczos
1950; Golub & Van Loan, *Matrix Computations*, ch. 10).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deconcnn_curvature.api import estimate, get_backend, resolve
from deconcnn_curvature.backend import Backend, Plan, plan_calls
from deconcnn_curvature.defaults import MONITOR, default
from deconcnn_curvature.distributed import rank_agreement
from deconcnn_curvature.errors import ConfigurationError, InvalidOptionError
from deconcnn_curvature.hvp import MeasurementInterrupted
from deconcnn_curvature.monitor.budget import (
    MAX_BATCH_FACTOR,
    MAX_PRODUCTS,
    Limits,
    Size,
    TimeBudget,
)
from deconcnn_curvature.monitor.inputs import (
    build_batch,
    check_trial_loss,
    measured_loss,
    measured_model,
    train_loader,
    what_is_measured,
)
from deconcnn_curvature.monitor.lightning_import import pl
from deconcnn_curvature.monitor.records import RecordWriter, read_jsonl, supersede_after
from deconcnn_curvature.monitor.settings import (
    BATCH_MODES,
    DEFAULT_METRIC_KEYS,
    LOSS_NAMES,
    ON_ERROR,
    MonitorSettings,
    mix_seed,
    settings_kwargs,
)
from deconcnn_curvature.present import unconverged_advice
from deconcnn_curvature.results import CurvatureResult

__all__ = [
    "BATCH_MODES",
    "DEFAULT_METRIC_KEYS",
    "LOSS_NAMES",
    "ON_ERROR",
    "CurvatureMonitor",
    "read_curvature_jsonl",
]

# ------------------------------------------------------------------------------------- records


def read_curvature_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a ``curvature.jsonl`` file, in order (blank lines skipped; a line torn by a
    crash is skipped with a warning naming the file and line)."""
    return read_jsonl(path)


# ------------------------------------------------------------------------------------- monitor


def options_said(
    cls: type[Backend], quantity: str, full: Mapping[str, Any], eval_mode: bool
) -> str:
    """The options part of a start-up line: ``budget NAME=VALUE`` only where the backend
    declares a budget option for ``quantity``, then the backend's options, then the host's
    arguments (``eval_mode``) apart."""
    budget = cls.budget_option(quantity)
    said = [f"budget {budget}={full[budget]}"] if budget in full else []
    return "; ".join(
        [*said, f"options {dict(full)}", f"host arguments {{'eval_mode': {eval_mode}}}"]
    )


def _host_hint(name: str) -> str:
    """How a monitor user sets a host argument given among ``backend_options``."""
    if name == "eval_mode":
        return "set the monitor's eval_mode (in a config: curvature.eval_mode)"
    if name == "seed":
        return "set the monitor's seed (in a config: curvature.seed)"
    return "the monitor decides it from the Trainer (DDP: every rank measures together)"


class CurvatureMonitor(pl.Callback):
    """Measure Hessian trace and λ_max every ``compute_every_n_steps`` optimiser steps.

    Args:
        backend: A registered backend name (``deconcnn-curv list-backends``); ``None`` is the
            default backend (``$DECONCNN_CURVATURE_BACKEND`` or ``pyhessian``).
        quantities: What to measure at each step: ``"trace"``, ``"eigenvalues"`` (λ_max, or the
            top ``k``), ``"density"`` (spectral density, expensive; recorded in the JSONL only) or
            another quantity the backend declares (not ``"diagonal"``).
        compute_every_n_steps: Cadence in optimiser steps (``trainer.global_step``): a measurement
            follows the optimiser step that brings ``global_step`` to a multiple of it. With
            gradient accumulation that is once per accumulation window.
        compute_at_step_zero: Also measure the initial model, before the first optimiser step.
        num_hvps: The trace's probe (HVP) budget, passed to the option the backend declares as
            its budget (:meth:`~deconcnn_curvature.backend.Backend.budget_option`; ``num_hvps``
            for ``pyhessian`` and ``hutchpp``) exactly, never capped. ``None``: the monitor's
            budget for the backend (pyhessian 50, hutchpp 10, see
            :data:`deconcnn_curvature.defaults.DEFAULTS`; another backend: its own default).
            With ``rtol`` it is the most the backend may spend. Exact backends have no budget;
            it is then ignored (logged).
        rtol: Target relative error of the trace (the backend's ``rtol``): stop once the
            confidence interval's half-width is at most ``rtol * |trace|``. ``None``: spend
            ``num_hvps``.
        k: Number of top eigenvalues for ``"eigenvalues"`` (the first one is λ_max).
        hessian_batch_size: Samples in the curvature batch (across all ranks; each rank takes
            its share). ``None``: the monitor's batch for the backend (hutchpp 64, otherwise
            128; :data:`deconcnn_curvature.defaults.DEFAULTS`).
        data_groups: The curvature batch is split into this many groups for the trace, so its
            ``stderr`` and ``ci`` cover the data noise too: an interval for the Hessian of the
            whole training set the batch was drawn from, not only of this batch (backends with a
            ``data_groups`` option, e.g. ``pyhessian``; see
            :mod:`deconcnn_curvature.linalg.two_way`). ``1``: probe noise only, as before. Under
            ``torch.distributed`` the interval covers the probe noise only.
        batch_mode: ``"fixed"``: one batch drawn from the training data by ``seed`` and kept for
            the whole run (the values then differ only through the parameters); ``"refresh"``:
            a new draw at each measurement, determined by ``seed`` and the step.
        seed: Seeds the batch draw and the probes (probe seed = f(seed, step, quantity)).
        on_error: ``"warn"``: a failure is reported once per distinct reason, recorded with
            ``value: null`` and training goes on; ``"raise"``: the run stops with the error.
        metric_keys: Names logged through ``pl_module.log``, overriding
            :data:`DEFAULT_METRIC_KEYS` by key (``trace``, ``trace_stderr``, ``eigenvalues``,
            ``eigenvalues_converged``, ``n_hvp``, ``seconds``); a key mapped to ``None`` is not
            logged. With ``k > 1``, the i-th eigenvalue is logged as ``<eigenvalues key>_<i>`` for
            i ≥ 2. ``eigenvalues_converged`` is 1.0 when the backend reports the eigenvalues
            converged (``details["converged"]``), 0.0 when it stopped at its cap.
        jsonl: The records file: a name relative to ``trainer.log_dir`` (the default root
            folder when there is no logger), or an absolute path; ``None`` writes no file.
        backend_options: Extra backend options (``deconcnn-curv list-backends --json``), e.g.
            ``{"probe_batch": 4, "tol": 1e-3}``; each is passed to the quantities it applies to.
        loss_fn: The mean-reduced loss ``loss_fn(outputs, targets)``, or a short name from
            :data:`LOSS_NAMES` (``"cross_entropy"``, ``"mse"``, ...); default
            ``pl_module.loss_fn``, else ``pl_module.criterion``.
        batch_fn: Maps a collated batch of the training loader to the ``(inputs, targets)``
            pair the model and loss take, e.g. ``lambda b: (b["image"], b["label"])`` for a
            loader of dicts, or the import path of such a function
            (``"package.module:function"``, for configs); by default the batch must already be
            such a pair.
        model_attr: Measure ``pl_module.<model_attr>`` (dotted path) instead of ``pl_module``
            itself; the module's ``forward`` must map the batch's inputs to the loss's outputs.
            Without it: ``pl_module``'s ``forward``, or, for a module without one, its only child
            module when that child holds every trainable parameter (said at start-up; anything
            else raises, asking for ``model_attr``).
        enabled: ``False`` makes the callback do nothing (one flag in a config turns it off).
        log_metrics: Log through ``pl_module.log`` (the JSONL is written either way).
        eval_mode: Measure the model in eval mode (``True``: BatchNorm with running statistics,
            Dropout off) or in the mode training left it in (``False``); an argument of the host
            (:func:`deconcnn_curvature.estimate`'s ``eval_mode``), not a backend option.
        max_overhead: A time budget: measuring takes at most this share of the training time
            (e.g. ``0.05``). The monitor times training steps and its own products and sizes each
            measurement (curvature-batch samples and trace products) to fit, splitting the budget
            where the trace's error is (``docs/time-budget.md``); ``num_hvps`` and
            ``hessian_batch_size`` then give the first measurement's shape, λ_max's least batch
            (when it fits) and the largest batch (8 x ``hessian_batch_size``), no longer every
            measurement's size. ``None``: no budget, fixed sizes.
        max_seconds: A time budget per measurement in seconds; with ``max_overhead`` the tighter
            of the two applies.
        num_samples: deconCNN's own name for ``num_hvps`` (its configs' ``curvature.num_samples``),
            accepted with a ``DeprecationWarning``.

    Every measurement writes one line per quantity to the JSONL file: ``timestamp``, ``step``,
    ``epoch``, ``backend``, ``quantity``, ``value`` (a float for the trace, a list for
    eigenvalues, a dict for the density; ``null`` on failure), ``stderr``, ``ci``,
    ``ci_level``, ``n_hvp``, ``seconds``, ``seed`` (of the probes), ``method``, ``exact``,
    ``rtol``, ``target_met``, ``batch_mode``, ``batch_size``, ``details`` and ``error``
    (``null``, or ``"<ErrorType>: <message>"``).
    """

    def __init__(
        self,
        backend: str | None = None,
        quantities: Sequence[str] = ("trace", "eigenvalues"),
        compute_every_n_steps: int = default("compute_every_n_steps", MONITOR),
        compute_at_step_zero: bool = False,
        num_hvps: int | None = None,
        rtol: float | None = default("rtol", MONITOR),
        k: int = default("k", MONITOR),
        hessian_batch_size: int | None = None,
        data_groups: int = default("data_groups", MONITOR),
        batch_mode: str = "fixed",
        seed: int = default("seed", MONITOR),
        on_error: str = "warn",
        metric_keys: Mapping[str, str | None] | None = None,
        jsonl: str | os.PathLike[str] | None = "curvature.jsonl",
        backend_options: Mapping[str, Any] | None = None,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
        model_attr: str | None = None,
        batch_fn: Callable[[Any], Any] | None = None,
        enabled: bool = True,
        log_metrics: bool = True,
        eval_mode: bool = default("eval_mode", MONITOR),
        max_overhead: float | None = None,
        max_seconds: float | None = None,
        num_samples: int | None = None,
    ) -> None:
        super().__init__()
        settings = MonitorSettings(
            backend=backend,
            quantities=quantities,
            compute_every_n_steps=compute_every_n_steps,
            compute_at_step_zero=compute_at_step_zero,
            num_hvps=num_hvps,
            rtol=rtol,
            k=k,
            hessian_batch_size=hessian_batch_size,
            data_groups=data_groups,
            batch_mode=batch_mode,
            seed=seed,
            on_error=on_error,
            metric_keys=metric_keys,
            jsonl=jsonl,
            backend_options=backend_options,
            loss_fn=loss_fn,
            model_attr=model_attr,
            batch_fn=batch_fn,
            enabled=enabled,
            log_metrics=log_metrics,
            eval_mode=eval_mode,
            max_overhead=max_overhead,
            max_seconds=max_seconds,
            num_samples=num_samples,
        )
        # Each checked setting is the attribute of the same name (monitor.num_hvps, ...).
        for field in dataclasses.fields(settings):
            setattr(self, field.name, getattr(settings, field.name))

        # Resolved in setup().
        self._backend_name: str | None = None
        #: The calls of one measurement (:func:`~deconcnn_curvature.backend.plan_calls`).
        self.plan: Plan | None = None
        self._writer: RecordWriter | None = None
        # Checkpointed state.
        self._last_step = -1
        self._count = 0
        self._indices: list[int] | None = None
        self._dataset_len: int | None = None
        self._warned: set[str] = set()
        # Cache of the fixed batch (rebuilt from the indices after a resume).
        self._batch: tuple[Any, torch.Tensor] | None = None
        # The time budget (max_overhead / max_seconds): built in on_train_start.
        self._budget: TimeBudget | None = None
        self._budget_state: dict[str, Any] | None = None  # from a checkpoint, until train start
        self._clock: float | None = None
        self._setup_seconds = 0.0
        self._sized_fields: dict[str, Any] = {}  # a budgeted measurement's record fields
        self._sized_cache: tuple[int, Any] | None = None  # fixed mode: the sized batch

    @classmethod
    def from_config(cls, settings: Any = None, **overrides: Any) -> CurvatureMonitor:
        """Build the monitor from a config's ``curvature`` group (what
        ``configs/callbacks/curvature_monitor.yaml`` passes as ``settings``), keyword arguments on
        top (``instantiate(cfg.callbacks, jsonl=...)``).

        A setting left unset (``null``, as ``configs/curvature/base.yaml`` lists every one) takes
        the default of :meth:`__init__`, where each default is written
        once; ``jsonl: null`` stays ``None`` (no records file). An unknown key raises
        :class:`~deconcnn_curvature.errors.ConfigurationError` naming it and the valid keys;
        ``num_samples`` is the deprecated alias of ``num_hvps`` (a ``DeprecationWarning``); in a
        config it replaces ``num_hvps`` (which a group file such as ``curvature/pyhessian.yaml``
        sets), so ``curvature.num_samples=50`` keeps working as it did in deconCNN's configs.
        """
        accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        kwargs = settings_kwargs(accepted, settings, overrides)
        if kwargs.get("num_samples") is not None:
            kwargs.pop("num_hvps", None)
        return cls(**kwargs)

    # ------------------------------------------------------------------------------ identity

    @property
    def state_key(self) -> str:
        """Tells apart monitors that share one Trainer (by backend, quantities and records
        file) but not a monitor from itself with another seed or cadence, so that a resumed run
        finds its state (and keeps the checkpoint's seed, with a warning) after such a change.
        An absolute records path counts by its file name, so that a run folder moved elsewhere
        (``deconcnn-curv train`` gives the monitor ``<run folder>/curvature.jsonl``) still finds
        its state."""
        return self._generate_state_key(
            backend=self.backend, quantities=self.quantities, jsonl=self._jsonl_key(self.jsonl)
        )

    @staticmethod
    def _jsonl_key(jsonl: Any) -> str | None:
        if jsonl is None:
            return None
        path = Path(jsonl)
        return path.name if path.is_absolute() else str(path)

    @property
    def backend_name(self) -> str | None:
        """The backend measurements use (known after ``setup``)."""
        return self._backend_name

    @property
    def measurements(self) -> int:
        """How many measurement steps have run (failed ones included)."""
        return self._count

    @property
    def curvature_indices(self) -> list[int] | None:
        """Indices (into the training data set) of the fixed curvature batch, once drawn."""
        return None if self._indices is None else list(self._indices)

    def probe_seed(self, step: int, quantity: str) -> int:
        """The seed :func:`~deconcnn_curvature.estimate` gets for ``quantity`` at ``step``."""
        return mix_seed("probes", self.seed, int(step), quantity)

    def batch_indices(self, step: int, dataset_len: int) -> list[int]:
        """The training-set indices of the curvature batch measured at ``step`` (all ranks)."""
        if self.batch_mode == "fixed":
            if self._indices is not None:
                return list(self._indices)
            seed = mix_seed("batch", self.seed)
        else:
            seed = mix_seed("batch", self.seed, int(step))
        gen = torch.Generator().manual_seed(seed)
        return torch.randperm(dataset_len, generator=gen)[: self.hessian_batch_size].tolist()

    # ------------------------------------------------------------------------------ setup

    def _model(self, pl_module: pl.LightningModule) -> nn.Module:
        return measured_model(pl_module, self.model_attr)

    def _loss(self, pl_module: pl.LightningModule) -> Callable[..., torch.Tensor]:
        return measured_loss(pl_module, self.loss_fn)

    def check_batch(self, pl_module: pl.LightningModule, batch: Any) -> None:
        """Compute the loss once on the curvature ``batch`` as a measurement does, under the state
        guard (training is untouched). A module without ``forward``, a loss that does not take
        the model's outputs, a batch the model cannot read fail here, before the first step,
        with what to set, instead of as a run of ``null`` records. ``on_train_start`` calls it."""
        check_trial_loss(pl_module, batch, self.model_attr, self.loss_fn)

    def plan_for(self, cls: type[Backend], num_hvps: int | None = None) -> Plan:
        """The calls one measurement makes with backend ``cls``
        (:func:`~deconcnn_curvature.backend.plan_calls`, the router every front end uses):
        ``num_hvps`` (default: this monitor's budget) under the backend's budget option, the
        trace's settings also to a call that returns the trace (hutchpp's eigenvalues: one call
        measures both). A backend option no monitored quantity takes is refused; ``k`` or
        ``data_groups`` a backend cannot take, or a budget where no call takes one, is reported
        in :attr:`Plan.unused` (``check_config`` refuses one the backend cannot honour)."""
        return plan_calls(
            cls,
            self.quantities,
            num_hvps=self.num_hvps if num_hvps is None else num_hvps,
            rtol=self.rtol,
            k=self.k,
            data_groups=self.data_groups,
            options=self.backend_options,
            option_label="backend_options.{}",
            host_hint=_host_hint,
            strict_settings=False,
        )

    def check_config(self) -> dict[str, dict[str, Any]]:
        """Resolve backend, quantities and options before any work.

        Returns, per quantity, the complete options the backend will run with (its defaults
        filled in). Raises a :class:`~deconcnn_curvature.errors.CurvatureError` for an unknown
        or unavailable backend, a quantity it cannot compute or an invalid option. ``setup``
        calls this; call it yourself to check a config without training.
        """
        cls = get_backend(self.backend)
        for quantity in self.quantities:
            resolve(quantity, cls.name, {}, eval_mode=self.eval_mode)  # exists, available
        try:  # routing: a setting that cannot reach the backend is a configuration mistake
            plan = self.plan_for(cls)
            cannot = [u.reason for u in plan.unused if u.kind == "cannot"]
            if cannot:  # a setting the backend cannot honour is refused, not skipped
                raise InvalidOptionError(cannot[0])
        except InvalidOptionError as exc:
            raise ConfigurationError(f"CurvatureMonitor: {exc}") from None
        resolved = plan.resolve()  # the values, each checked by the backend's declaration
        for quantity, full in resolved.items():
            cls.check_call(quantity, full, eval_mode=self.eval_mode)
        self._backend_name = cls.name
        self.plan = plan
        return resolved

    def check_model(self, pl_module: pl.LightningModule) -> None:
        """Raise now if the backend refuses the model (BackPACK and BatchNorm, say) or the loss
        is missing, instead of recording a run of null measurements. ``setup`` calls it (after
        :meth:`check_config`)."""
        if self._backend_name is None:
            self.check_config()
        get_backend(self._backend_name).validate_model(self._model(pl_module))
        self._loss(pl_module)
        self._check_k(pl_module)

    def _check_k(self, pl_module: pl.LightningModule) -> None:
        """Refuse more top eigenvalues than the measured model has trainable parameters."""
        if "eigenvalues" not in self.quantities:
            return
        n = sum(p.numel() for p in self._model(pl_module).parameters() if p.requires_grad)
        if self.k > n:
            raise ConfigurationError(
                f"CurvatureMonitor: k={self.k} top eigenvalues asked of a model with {n} "
                f"trainable parameters; k can be at most {n} (in a config: curvature.k={n})."
            )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check backend, quantities, options, model and loss before any training step."""
        began = time.perf_counter()
        if not self.enabled and stage == "fit":  # the shipped curvature/*.yaml start disabled
            pl.utilities.rank_zero_info(
                "CurvatureMonitor: disabled (enabled=false), nothing is measured; set enabled=true "
                "(in a config: curvature.enabled=true) to measure."
            )
        if not self.enabled or stage != "fit":
            return
        resolved = self.check_config()
        pl.utilities.rank_zero_info(what_is_measured(pl_module, self.model_attr, self.loss_fn))
        cls = get_backend(self._backend_name)
        for quantity, full in resolved.items():
            pl.utilities.rank_zero_info(
                f"CurvatureMonitor: {quantity} by backend {self._backend_name!r} every "
                f"{self.compute_every_n_steps} steps on {self.hessian_batch_size} samples "
                f"({self.batch_mode} batch); {options_said(cls, quantity, full, self.eval_mode)}"
            )
        for unused in self.plan.unused if self.plan is not None else ():
            if unused.setting in ("num_hvps", "rtol"):  # data_groups: said below; k: default
                pl.utilities.rank_zero_info(f"CurvatureMonitor: {unused.reason}")
        self._log_data_groups(resolved, trainer.world_size)
        self._check_budget(cls)
        self.check_model(pl_module)
        if self.hessian_batch_size < trainer.world_size:
            raise ConfigurationError(
                f"CurvatureMonitor: hessian_batch_size={self.hessian_batch_size} is smaller than "
                f"the number of processes ({trainer.world_size}); every rank needs at least one "
                "sample."
            )
        # DDP: a backend without distributed support would fail every measurement.
        if trainer.world_size > 1 and not get_backend(self._backend_name).supports_distributed:
            raise ConfigurationError(
                f"CurvatureMonitor: backend {self._backend_name!r} does not support "
                f"torch.distributed, and this run has {trainer.world_size} processes; choose a "
                "backend whose 'distributed' column in `deconcnn-curv list-backends` is true."
            )
        self._last_step = -1
        self._count = 0
        self._indices = None
        self._dataset_len = None
        self._warned = set()
        self._batch = None
        if self.jsonl is not None:
            # trainer.log_dir is a collective under DDP (a broadcast): every rank asks,
            # rank 0 alone writes.
            log_dir = None if self.jsonl.is_absolute() else trainer.log_dir
            if trainer.is_global_zero:
                path = self.jsonl if log_dir is None else Path(log_dir or ".") / self.jsonl
                self._writer = RecordWriter(path)
        self._setup_seconds = time.perf_counter() - began  # charged to a time budget

    def _log_data_groups(self, resolved: Mapping[str, Mapping[str, Any]], world_size: int) -> None:
        """Say what the trace's interval covers, once at setup."""
        trace = resolved.get("trace")
        if trace is None or self.data_groups < 2:
            return
        if "data_groups" not in trace or world_size > 1:
            why = "has no data_groups option" if world_size == 1 else "runs under DDP"
            pl.utilities.rank_zero_info(
                f"CurvatureMonitor: backend {self._backend_name!r} {why}: the trace's stderr and "
                "interval cover the probe noise only (this batch's Hessian, not the data set's)."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the training data before the first step (fail fast)."""
        if not self.enabled:
            return
        began = time.perf_counter()
        dataset = train_loader(trainer).dataset
        size = len(dataset)
        if size < self.hessian_batch_size:
            raise ConfigurationError(
                f"CurvatureMonitor: hessian_batch_size={self.hessian_batch_size} but the training "
                f"data set has only {size} samples; lower hessian_batch_size."
            )
        if self._last_step > trainer.global_step:
            pl.utilities.rank_zero_warn(
                f"CurvatureMonitor: the checkpoint's monitor state puts the last measurement at "
                f"step {self._last_step}, after the checkpoint's own step {trainer.global_step} "
                "(an edited or mismatched checkpoint); measuring on from this step."
            )
            self._last_step = trainer.global_step
        if self._writer is not None and trainer.global_step > 0:
            # Resumed from a checkpoint: records past it belong to a stretch of training that
            # the checkpoint does not contain and that is about to be re-run.
            self._writer.close()  # the next write reopens the rewritten file
            moved, side = supersede_after(self._writer.path, trainer.global_step)
            if moved:
                pl.utilities.rank_zero_warn(
                    f"CurvatureMonitor: resumed at step {trainer.global_step}; {moved} records "
                    f"measured after it (in a run the checkpoint does not contain) moved from "
                    f"{self._writer.path} to {side}."
                )
        # Build one curvature batch now (not cached; augmentation from private generators), so
        # a batch the monitor cannot use fails before the first step, not at every measurement.
        loader = train_loader(trainer)
        with rank_agreement(pl_module.device, enabled=trainer.world_size > 1):
            indices = self.batch_indices(trainer.global_step, size)
            try:
                batch = build_batch(trainer, loader, indices, self.batch_fn)
            except ConfigurationError:
                raise
            except Exception as exc:  # batch_fn or the data set: a user's code, said in one line
                reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
                raise ConfigurationError(
                    f"CurvatureMonitor: building the curvature batch from the training data "
                    f"failed before training: {reason}. If the loader's batches are not "
                    "(inputs, targets) pairs, set batch_fn=... to map one to such a pair (in a "
                    "config: curvature.batch_fn=package.module:function)."
                ) from exc
            self.check_batch(pl_module, batch)  # one forward + loss, under the state guard
        spent = self._setup_seconds + time.perf_counter() - began
        self._start_budget(trainer, pl_module, size, spent)
        self._restart_clock(pl_module)

    # ------------------------------------------------------------------------------ measuring

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Measure the initial model (``compute_at_step_zero``)."""
        if (
            self.enabled
            and self.compute_at_step_zero
            and trainer.global_step == 0
            and self._last_step < 0
        ):
            self._measure(trainer, pl_module, 0)
            self._restart_clock(pl_module)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Measure after the optimiser step that brings ``global_step`` onto the cadence."""
        if not self.enabled:
            return
        self._tick(pl_module)
        step = trainer.global_step
        if step > 0 and step > self._last_step and step % self.compute_every_n_steps == 0:
            self._measure(trainer, pl_module, step)
            self._restart_clock(pl_module)

    def _curvature_batch(self, trainer: pl.Trainer, step: int) -> tuple[Any, torch.Tensor]:
        if self.batch_mode == "fixed" and self._batch is not None:
            return self._batch
        loader = train_loader(trainer)
        dataset = loader.dataset
        if self._dataset_len is None:
            self._dataset_len = len(dataset)
        indices = self.batch_indices(step, self._dataset_len)
        if self.batch_mode == "fixed":
            self._indices = indices
        batch = build_batch(trainer, loader, indices, self.batch_fn)
        if self.batch_mode == "fixed":
            self._batch = batch
        return batch

    def _record(self, trainer: pl.Trainer, step: int, quantity: str, **fields: Any) -> None:
        record = {
            "timestamp": time.time(),
            "step": step,
            "epoch": trainer.current_epoch,
            "backend": self._backend_name,
            "quantity": quantity,
            "value": None,
            "stderr": None,
            "ci": None,
            "ci_level": None,
            "n_hvp": None,
            "seconds": None,
            "seed": self.probe_seed(step, quantity),
            "method": None,
            "exact": None,
            "rtol": None,
            "target_met": None,
            "batch_mode": self.batch_mode,
            "batch_size": self.hessian_batch_size,
            "details": None,
            "error": None,
            **self._sized_fields,
            **fields,
        }
        if self._writer is not None:
            self._writer.write(record)

    def _fail(self, trainer: pl.Trainer, step: int, exc: Exception, seconds: float) -> None:
        """Record a failed measurement of every quantity; warn once per reason or re-raise."""
        reason = f"{type(exc).__name__}: {exc}"
        for quantity in self.quantities:
            self._record(trainer, step, quantity, seconds=seconds, error=reason)
        self._after_failure(reason, step)
        if self.on_error == "raise":
            raise exc

    def _warn_target_missed(self, result: CurvatureResult, step: int) -> None:
        """An rtol target the budget could not reach is said once (the records keep
        ``target_met: false`` for every measurement)."""
        key = "rtol target missed"
        if self.rtol is None or result.target_met is not False or key in self._warned:
            return
        self._warned.add(key)
        pl.utilities.rank_zero_warn(
            f"CurvatureMonitor: at step {step} the trace missed rtol={self.rtol} within its "
            f"budget of {result.n_hvp} products (target_met is false in the records; reported "
            "once). The value is logged with its larger error; raise num_hvps or rtol."
        )

    def _warn_unconverged(self, result: CurvatureResult, step: int) -> None:
        """Eigenvalues a backend reports unconverged are said once, with the solver's note (e.g.
        a tolerance below the rounding of float32 products) when it gives one."""
        key = "eigenvalues unconverged"
        if result.quantity != "eigenvalues" or key in self._warned:
            return
        if result.details.get("converged") is not False:
            return
        self._warned.add(key)
        advice = unconverged_advice(
            result.details, "raise the backend's max_hvps (backend_options={max_hvps: ...})"
        )
        metric = self.metric_keys["eigenvalues_converged"]
        logged = f", and {metric} is 0" if metric else ""
        pl.utilities.rank_zero_warn(
            f"CurvatureMonitor: at step {step} the eigenvalues did not converge within "
            f"{result.n_hvp} products; they are recorded with converged: false{logged} "
            f"(reported once). {advice}."
        )

    def _after_failure(self, reason: str, step: int) -> None:
        if self.on_error == "warn" and reason not in self._warned:
            self._warned.add(reason)
            where = f" (recorded in {self._writer.path})" if self._writer is not None else ""
            pl.utilities.rank_zero_warn(
                f"CurvatureMonitor: measurement at step {step} failed and is recorded as null"
                f"{where}; training continues and later measurements still run. This reason is "
                f"reported once: {reason}"
            )

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        size = self._sized(trainer, pl_module, step)
        self._last_step = step
        if size is not None and size.skipped is not None:
            self._skip(trainer, step, size)
            return
        try:
            self._measure_sized(trainer, pl_module, step, size)
        finally:
            self._sized_fields = {}

    def _measure_sized(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, size: Size | None
    ) -> None:
        start = time.perf_counter()
        self._count += 1
        try:
            # Under DDP every rank fails its preparation or none does, so no rank is left
            # waiting in the collectives of estimate() (which agrees on its own failures).
            with rank_agreement(pl_module.device, enabled=trainer.world_size > 1):
                if size is None:
                    batch = self._curvature_batch(trainer, step)
                else:
                    batch = self._sized_batch(trainer, step, size.samples)
                model = self._model(pl_module)
                loss_fn = self._loss(pl_module)
        except Exception as exc:
            self._fail(trainer, step, exc, time.perf_counter() - start)
            self._observe(pl_module, size, start, 0, None)
            return
        assert self.plan is not None  # setup() made it
        logged: dict[str, float] = {}
        n_hvp = 0
        succeeded = False
        trace_details: Mapping[str, Any] | None = None
        for call in self._sized_plan(size).calls:
            began = time.perf_counter()
            try:
                result = estimate(
                    model,
                    loss_fn,
                    batch,
                    call.quantity,
                    self._backend_name,
                    seed=self.probe_seed(step, call.quantity),
                    eval_mode=self.eval_mode,
                    **call.options,
                )
            except Exception as exc:
                # One line per quantity the call was to record (a joint call's too).
                reason = f"{type(exc).__name__}: {exc}"
                seconds = time.perf_counter() - began
                for quantity in (*call.records[1:], call.quantity):  # as a success writes them
                    self._record(trainer, step, quantity, seconds=seconds, error=reason)
                if isinstance(exc, MeasurementInterrupted):
                    continue  # the run is stopping: recorded, not a failure to warn about
                self._after_failure(reason, step)
                if self.on_error == "raise":
                    self._observe(pl_module, size, start, n_hvp, trace_details)
                    raise
                continue
            succeeded = True
            n_hvp += int(result.n_hvp)
            if call.quantity == "trace":
                trace_details = result.details
            for quantity in call.records[1:]:  # returned by the same call, in its `also`
                other = self.joint_result(result, quantity)
                if quantity == "trace":
                    trace_details = other.details
                self._record(trainer, step, quantity, **self._result_fields(other))
                logged.update(self._scalars(other))
            self._record(trainer, step, call.quantity, **self._result_fields(result))
            logged.update(self._scalars(result))
            self._warn_target_missed(result, step)
            self._warn_unconverged(result, step)
        self._observe(pl_module, size, start, n_hvp, trace_details)
        if succeeded:
            if self.metric_keys["n_hvp"]:
                logged[self.metric_keys["n_hvp"]] = float(n_hvp)
            if self.metric_keys["seconds"]:
                logged[self.metric_keys["seconds"]] = time.perf_counter() - start
        if self.log_metrics and logged:
            self._log(trainer, pl_module, step, logged)

    # ------------------------------------------------------------------------------ time budget

    @property
    def budgeted(self) -> bool:
        """Whether a time budget (``max_overhead`` or ``max_seconds``) sizes the measurements."""
        return self.max_overhead is not None or self.max_seconds is not None

    def budget_summary(self) -> dict[str, Any] | None:
        """The time budget's account so far (``None`` without one): the target
        (``max_overhead``, ``max_seconds``), the training and measuring seconds timed, the
        achieved ``share``, and the sizes chosen (``chosen``: samples, products, seconds allowed,
        and the reason of each skip). On rank 0 under DDP."""
        return None if self._budget is None else self._budget.summary()

    def _check_budget(self, cls: type[Backend]) -> None:
        """With a time budget: refuse what it cannot size, and name the target at start-up."""
        if not self.budgeted:
            return
        serves_trace = any(
            q == "trace" or "trace" in cls.also_computes.get(q, ()) for q in self.quantities
        )
        if cls.budget_option("trace") is None or not serves_trace:
            raise ConfigurationError(
                f"CurvatureMonitor: max_overhead/max_seconds size the trace's products and "
                f"samples, but backend {cls.name!r} has no probe budget for the trace or no "
                f"monitored quantity measures one (quantities: {', '.join(self.quantities)}); "
                "drop the time budget, or measure the trace with a stochastic backend."
            )
        parts = []
        if self.max_overhead is not None:
            parts.append(f"{self.max_overhead:.1%} of the training time")
        if self.max_seconds is not None:
            parts.append(f"{self.max_seconds:g} s per measurement")
        pl.utilities.rank_zero_info(
            f"CurvatureMonitor: time budget: measuring takes at most {' and '.join(parts)}"
            f"{' (the tighter wins)' if len(parts) > 1 else ''}; each measurement's samples and "
            "trace products are chosen to fit it from the timed steps and products, starting "
            "from hessian_batch_size x num_hvps (docs/time-budget.md)."
        )

    def _start_budget(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        dataset_size: int,
        spent: float,
    ) -> None:
        """Build the budget's clock and limits at train start (a checkpoint's account kept, else
        the ``spent`` seconds of set-up and start-up checks charged)."""
        self._budget = None
        self._sized_cache = None
        if not self.budgeted:
            return
        cls = get_backend(self._backend_name)
        option = cls.option_map()[cls.budget_option("trace")]
        least_products = max(2, math.ceil(option.min or 0))
        min_samples = max(2 * self.data_groups, trainer.world_size)
        if dataset_size < min_samples:
            raise ConfigurationError(
                f"CurvatureMonitor: a time-budgeted measurement needs at least {min_samples} "
                f"samples (2 per data group) and the training data set has {dataset_size}; "
                "lower data_groups."
            )
        most = min(dataset_size, MAX_BATCH_FACTOR * self.hessian_batch_size)
        # No more products than parameters: the trace is exact by then.
        params = sum(p.numel() for p in self._model(pl_module).parameters() if p.requires_grad)
        products = max(least_products, min(MAX_PRODUCTS, params))
        # Without a noise estimate: the fixed shape (hessian_batch_size x num_hvps). λ_max (from
        # the same batch) has only data noise, biased upwards on a small batch: its samples count
        # twice in the split, and the batch stays at hessian_batch_size whenever that fits.
        eig = "eigenvalues" in self.quantities
        assert self.plan is not None  # setup() made it
        planned = self.plan.resolve().get("trace", {}).get(option.name)  # the router's products
        shape = (self.hessian_batch_size, int(planned) if planned else least_products)
        limits = Limits(
            min_samples,
            max(min_samples, most),
            least_products,
            products,
            start=shape,
            floor_samples=self.hessian_batch_size if eig else None,
        )
        self._budget = TimeBudget(
            self.max_overhead,
            self.max_seconds,
            limits,
            data_weight=2.0 if eig else 1.0,
            train_batch_size=getattr(train_loader(trainer), "batch_size", None),
            first_extra_products=float(shape[1]) if eig else 0.0,
        )
        if self._budget_state is not None:
            self._budget.load_state_dict(self._budget_state)
            self._budget_state = None
        else:
            self._budget.charge(spent)

    @staticmethod
    def _now(pl_module: pl.LightningModule) -> float:
        """The clock, after the device's queued work (CUDA runs asynchronously)."""
        device = pl_module.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def _tick(self, pl_module: pl.LightningModule) -> None:
        """Count the training time since the clock last started (a batch end, measuring
        excluded) as one step."""
        if self._budget is None:
            return
        now = self._now(pl_module)
        if self._clock is not None:
            self._budget.tick(now - self._clock)
        self._clock = now

    def _restart_clock(self, pl_module: pl.LightningModule) -> None:
        if self._budget is not None:
            self._clock = self._now(pl_module)

    def _sized(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> Size | None:
        """The size of the measurement at ``step`` (rank 0's choice on every rank), and the record
        fields that say it; ``None`` without a budget."""
        if self._budget is None:
            return None
        size = self._budget.size() if trainer.is_global_zero else None
        if trainer.world_size > 1:
            size = trainer.strategy.broadcast(size, src=0)
        self._sized_fields = {
            "batch_size": size.samples,
            "budget": self._budget.record_field(size),
        }
        return size

    def _skip(self, trainer: pl.Trainer, step: int, size: Size) -> None:
        """Record a measurement the budget cannot afford (``value: null``, ``skipped``: why)."""
        self._budget.skipped(size)
        for quantity in self.quantities:
            self._record(trainer, step, quantity, skipped=size.skipped)
        self._sized_fields = {}
        if "budget skip" not in self._warned:
            self._warned.add("budget skip")
            pl.utilities.rank_zero_info(
                f"CurvatureMonitor: step {step} not measured: {size.skipped}. The monitor "
                "measures less often rather than over the budget (recorded with `skipped`; said "
                "once)."
            )

    def _sized_batch(self, trainer: pl.Trainer, step: int, samples: int) -> Any:
        """The first ``samples`` of the curvature draw (the fixed draw, or this step's): nested
        batches, whose first ``hessian_batch_size`` are the unbudgeted batch."""
        fixed = self.batch_mode == "fixed"
        if fixed and self._sized_cache is not None and self._sized_cache[0] == samples:
            return self._sized_cache[1]
        loader = train_loader(trainer)
        seed = mix_seed("batch", self.seed) if fixed else mix_seed("batch", self.seed, int(step))
        gen = torch.Generator().manual_seed(seed)
        indices = torch.randperm(len(loader.dataset), generator=gen)[:samples].tolist()
        batch = build_batch(trainer, loader, indices, self.batch_fn)
        if fixed:
            self._sized_cache = (samples, batch)
        return batch

    def _sized_plan(self, size: Size | None) -> Plan:
        """The plan of this measurement: the setup's, or with a time budget the router's plan
        for ``size.products`` as the trace's budget (the router is cheap and pure)."""
        assert self.plan is not None  # setup() made it
        if size is None:
            return self.plan
        return self.plan_for(get_backend(self._backend_name), num_hvps=size.products)

    def _observe(
        self,
        pl_module: pl.LightningModule,
        size: Size | None,
        start: float,
        n_hvp: int,
        trace_details: Mapping[str, Any] | None,
    ) -> None:
        """Tell the budget what a measurement cost and the trace's noise components."""
        if self._budget is None or size is None:
            return
        details = trace_details or {}
        self._budget.observe(
            size,
            self._now(pl_module) - start,
            n_hvp,
            details.get("stderr_probe"),
            details.get("stderr_data"),
        )

    @staticmethod
    def _log(
        trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, logged: dict[str, float]
    ) -> None:
        """callback_metrics (checkpoint monitors, metrics.jsonl) get the values through
        pl_module.log; the loggers get them directly, at the measured step. Through
        pl_module.log they would land on Lightning's batch counter (one step early) at its
        log_every_n_steps cadence, and be repeated while no new value comes."""
        for key, value in logged.items():
            pl_module.log(
                key, value, on_step=True, on_epoch=False, rank_zero_only=True, logger=False
            )
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(dict(logged), step=step)

    @staticmethod
    def joint_result(result: CurvatureResult, quantity: str) -> CurvatureResult:
        """The ``quantity`` a call also returned (``result.also``, see
        ``Backend.also_computes``; hutchpp's eigenvalues call returns the trace): its ``n_hvp``
        are the products of the shared call that it used (not extra ones), its ``seconds`` 0.0
        (the call's own record holds the time of the one call, so summed record times stay
        true), ``details["measured_with"]`` names the call."""
        other = result.also[quantity]
        details = {**other.details, "measured_with": result.quantity}
        return dataclasses.replace(other, seconds=0.0, details=details)

    @staticmethod
    def _result_fields(result: CurvatureResult) -> dict[str, Any]:
        return {
            "value": result.value,
            "stderr": result.stderr,
            "ci": result.ci,
            "ci_level": result.ci_level,
            "n_hvp": result.n_hvp,
            "seconds": result.seconds,
            "seed": result.seed,
            "method": result.method,
            "exact": result.exact,
            "rtol": result.rtol,
            "target_met": result.target_met,
            "details": dict(result.details) or None,
        }

    def _scalars(self, result: CurvatureResult) -> dict[str, float]:
        out: dict[str, float] = {}
        keys = self.metric_keys
        if result.quantity == "trace":
            if keys["trace"]:
                out[keys["trace"]] = float(result.value)
            if keys["trace_stderr"] and result.stderr is not None:
                out[keys["trace_stderr"]] = float(result.stderr)
        elif result.quantity == "eigenvalues":
            if keys["eigenvalues"]:
                for i, value in enumerate(result.value):
                    name = keys["eigenvalues"] if i == 0 else f"{keys['eigenvalues']}_{i + 1}"
                    out[name] = float(value)
            converged = result.details.get("converged")
            if keys["eigenvalues_converged"] and isinstance(converged, bool):
                out[keys["eigenvalues_converged"]] = 1.0 if converged else 0.0
        return out

    # ------------------------------------------------------------------------------ lifecycle

    def state_dict(self) -> dict[str, Any]:
        """Schedule position, curvature batch, seed and measurement count (for resuming)."""
        return {
            "version": 1,
            "seed": self.seed,
            "batch_mode": self.batch_mode,
            "hessian_batch_size": self.hessian_batch_size,
            "last_step": self._last_step,
            "count": self._count,
            "indices": None if self._indices is None else list(self._indices),
            "dataset_len": self._dataset_len,
            "warned": sorted(self._warned),
            **({} if self._budget is None else {"budget": self._budget.state_dict()}),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue where the checkpointed run stopped (same batch, same seeds)."""
        if state_dict.get("seed", self.seed) != self.seed:
            pl.utilities.rank_zero_warn(
                f"CurvatureMonitor: the checkpoint was measured with seed={state_dict['seed']}, "
                f"this monitor has seed={self.seed}; continuing with the checkpoint's seed so "
                "the resumed records match the original run."
            )
            self.seed = int(state_dict["seed"])
        self._last_step = int(state_dict.get("last_step", -1))
        self._count = int(state_dict.get("count", 0))
        same_batch = (
            state_dict.get("batch_mode") == self.batch_mode
            and state_dict.get("hessian_batch_size") == self.hessian_batch_size
        )
        indices = state_dict.get("indices")
        self._indices = list(indices) if indices is not None and same_batch else None
        self._dataset_len = state_dict.get("dataset_len") if same_batch else None
        self._warned = set(state_dict.get("warned", ()))
        self._batch = None
        self._budget_state = state_dict.get("budget")

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Close the records file (every line is already on disk)."""
        if self._writer is not None:
            self._writer.close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Close the records file and drop the cached batch."""
        if self._writer is not None:
            self._writer.close()
        self._batch = None
