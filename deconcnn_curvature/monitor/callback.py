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
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deconcnn_curvature.api import estimate, get_backend, resolve
from deconcnn_curvature.backend import HOST_OPTION_NAMES, Backend
from deconcnn_curvature.distributed import rank_agreement
from deconcnn_curvature.errors import ConfigurationError
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


def _options_said(cls: type[Backend], quantity: str, full: Mapping[str, Any]) -> str:
    """The options part of a start-up line: ``budget NAME=VALUE`` only where the backend
    declares a budget option for ``quantity``, then the backend's options, then the host's
    arguments (:data:`~deconcnn_curvature.backend.HOST_OPTIONS`, e.g. ``eval_mode``) apart."""
    budget = cls.budget_option(quantity)
    options = {n: v for n, v in full.items() if n not in HOST_OPTION_NAMES}
    host = {n: v for n, v in full.items() if n in HOST_OPTION_NAMES}
    said = [f"budget {budget}={full[budget]}"] if budget in full else []
    return "; ".join([*said, f"options {options}", f"host arguments {host}"])


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
            for ``pyhessian`` and ``hutchpp``) exactly, never capped. ``None``
            keeps the backend's default (logged at setup). With ``rtol`` it is the most the
            backend may spend. Exact backends have no budget; it is then ignored (logged).
        rtol: Target relative error of the trace (the backend's ``rtol``): stop once the
            confidence interval's half-width is at most ``rtol * |trace|``. ``None``: spend
            ``num_hvps``.
        k: Number of top eigenvalues for ``"eigenvalues"`` (the first one is λ_max).
        hessian_batch_size: Samples in the curvature batch (across all ranks; each rank takes
            its share).
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
        compute_every_n_steps: int = 500,
        compute_at_step_zero: bool = False,
        num_hvps: int | None = None,
        rtol: float | None = None,
        k: int = 1,
        hessian_batch_size: int = 128,
        data_groups: int = 4,
        batch_mode: str = "fixed",
        seed: int = 0,
        on_error: str = "warn",
        metric_keys: Mapping[str, str | None] | None = None,
        jsonl: str | os.PathLike[str] | None = "curvature.jsonl",
        backend_options: Mapping[str, Any] | None = None,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
        model_attr: str | None = None,
        batch_fn: Callable[[Any], Any] | None = None,
        enabled: bool = True,
        log_metrics: bool = True,
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
            num_samples=num_samples,
        )
        # Each checked setting is the attribute of the same name (monitor.num_hvps, ...).
        for field in dataclasses.fields(settings):
            setattr(self, field.name, getattr(settings, field.name))

        # Resolved in setup().
        self._backend_name: str | None = None
        self._plan: list[tuple[str, dict[str, Any]]] = []
        self._joint = False
        self._writer: RecordWriter | None = None
        # Checkpointed state.
        self._last_step = -1
        self._count = 0
        self._indices: list[int] | None = None
        self._dataset_len: int | None = None
        self._warned: set[str] = set()
        # Cache of the fixed batch (rebuilt from the indices after a resume).
        self._batch: tuple[Any, torch.Tensor] | None = None

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

    def _budget_options(self, cls: type[Backend], quantity: str) -> dict[str, Any]:
        def applies(name: str) -> bool:  # the resolver's rule, also_computes included
            return cls.applies(name, quantity)

        opts: dict[str, Any] = {}
        # A call that also returns the trace (also_computes, e.g. hutchpp's eigenvalues) spends
        # the trace's budget: the trace settings go to it as they would to a trace call.
        serves_trace = quantity == "trace" or "trace" in cls.also_computes.get(quantity, ())
        if serves_trace:
            if self.num_hvps is not None:
                budget = cls.budget_option("trace")
                if budget is not None:
                    opts[budget] = self.num_hvps
                elif not cls.exact:
                    raise ConfigurationError(
                        f"CurvatureMonitor: backend {cls.name!r} declares no probe-budget option "
                        f"for the trace, so num_hvps={self.num_hvps} cannot be honoured; "
                        "set num_hvps to null or choose another backend."
                    )
            if self.rtol is not None:
                if applies("rtol"):
                    opts["rtol"] = self.rtol
                elif not cls.exact:
                    raise ConfigurationError(
                        f"CurvatureMonitor: backend {cls.name!r} has no 'rtol' option for the "
                        "trace; set rtol to null or choose another backend."
                    )
        if quantity == "eigenvalues" and applies("k"):
            opts["k"] = self.k
        elif quantity == "eigenvalues" and self.k != 1:
            raise ConfigurationError(
                f"CurvatureMonitor: backend {cls.name!r} has no 'k' option for eigenvalues; "
                "set k to 1 or choose another backend."
            )
        if serves_trace and applies("data_groups"):
            opts["data_groups"] = self.data_groups
        for name, value in self.backend_options.items():
            if applies(name):
                opts[name] = value
        return opts

    def _check_backend_options(self, cls: type[Backend]) -> None:
        declared = cls.option_map()
        unknown = sorted(set(self.backend_options) - set(declared))
        if unknown:
            raise ConfigurationError(
                f"CurvatureMonitor: unknown backend_options {unknown} for backend {cls.name!r}; "
                f"its options are: {', '.join(sorted(declared)) or '(none)'}."
            )
        for name in self.backend_options:
            opt = declared[name]
            if not any(cls.applies(name, q) for q in self.quantities):
                raise ConfigurationError(
                    f"CurvatureMonitor: backend option {name!r} of {cls.name!r} applies to "
                    f"{', '.join(sorted(opt.quantities))} only, none of the monitored quantities "
                    f"({', '.join(self.quantities)}); drop it."
                )

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

    def check_config(self) -> dict[str, dict[str, Any]]:
        """Resolve backend, quantities and options with :func:`deconcnn_curvature.resolve`.

        Returns, per quantity, the complete options the backend will run with (its defaults
        filled in). Raises a :class:`~deconcnn_curvature.errors.CurvatureError` for an unknown
        or unavailable backend, a quantity it cannot compute or an invalid option. ``setup``
        calls this; call it yourself to check a config without training.
        """
        cls = get_backend(self.backend)
        self._check_backend_options(cls)
        # A backend whose eigenvalues come with the trace of the same products measures both in
        # one call (one sketch of num_hvps products, not two runs).
        joint = "trace" in cls.also_computes.get("eigenvalues", ()) and {
            "trace",
            "eigenvalues",
        } <= set(self.quantities)
        plan, resolved = [], {}
        for quantity in self.quantities:
            opts = self._budget_options(cls, quantity)
            if joint and quantity == "eigenvalues":
                opts = {**self._budget_options(cls, "trace"), **opts}
            _, resolved[quantity] = resolve(quantity, cls.name, opts)
            if joint and quantity == "trace":
                continue  # recorded from the eigenvalues call
            plan.append((quantity, opts))
        self._backend_name = cls.name
        self._plan = plan
        self._joint = joint
        return resolved

    def check_model(self, pl_module: pl.LightningModule) -> None:
        """Raise now if the backend refuses the model (BackPACK and BatchNorm, say) or the loss
        is missing, instead of recording a run of null measurements. ``setup`` calls it (after
        :meth:`check_config`)."""
        if self._backend_name is None:
            self.check_config()
        get_backend(self._backend_name).validate_model(self._model(pl_module))
        self._loss(pl_module)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check backend, quantities, options, model and loss before any training step."""
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
        exact = cls.exact
        for quantity, full in resolved.items():
            pl.utilities.rank_zero_info(
                f"CurvatureMonitor: {quantity} by backend {self._backend_name!r} every "
                f"{self.compute_every_n_steps} steps on {self.hessian_batch_size} samples "
                f"({self.batch_mode} batch); {_options_said(cls, quantity, full)}"
            )
            if (
                quantity == "trace"
                and self.num_hvps is not None
                and exact
                and cls.budget_option("trace") is None
            ):
                pl.utilities.rank_zero_info(
                    f"CurvatureMonitor: backend {self._backend_name!r} is exact; num_hvps="
                    f"{self.num_hvps} does not apply to it."
                )
        serves_trace = any(
            q == "trace" or "trace" in cls.also_computes.get(q, ()) for q in self.quantities
        )
        if self.num_hvps is not None and not serves_trace:
            pl.utilities.rank_zero_info(
                f"CurvatureMonitor: num_hvps={self.num_hvps} is the trace's probe budget and no "
                f"monitored call measures a trace (quantities: {', '.join(self.quantities)}); "
                "it is unused."
            )
        self._log_data_groups(resolved, trainer.world_size)
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
        dataset = train_loader(trainer).dataset
        size = len(dataset)
        if size < self.hessian_batch_size:
            raise ConfigurationError(
                f"CurvatureMonitor: hessian_batch_size={self.hessian_batch_size} but the training "
                f"data set has only {size} samples; lower hessian_batch_size."
            )
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
        step = trainer.global_step
        if step > 0 and step > self._last_step and step % self.compute_every_n_steps == 0:
            self._measure(trainer, pl_module, step)

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
        start = time.perf_counter()
        self._last_step = step
        self._count += 1
        try:
            # Under DDP every rank fails its preparation or none does, so no rank is left
            # waiting in the collectives of estimate() (which agrees on its own failures).
            with rank_agreement(pl_module.device, enabled=trainer.world_size > 1):
                batch = self._curvature_batch(trainer, step)
                model = self._model(pl_module)
                loss_fn = self._loss(pl_module)
        except Exception as exc:
            self._fail(trainer, step, exc, time.perf_counter() - start)
            return
        logged: dict[str, float] = {}
        n_hvp = 0
        succeeded = False
        for quantity, opts in self._plan:
            began = time.perf_counter()
            try:
                result = estimate(
                    model,
                    loss_fn,
                    batch,
                    quantity,
                    self._backend_name,
                    seed=self.probe_seed(step, quantity),
                    **opts,
                )
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                self._record(
                    trainer, step, quantity, seconds=time.perf_counter() - began, error=reason
                )
                self._after_failure(reason, step)
                if self.on_error == "raise":
                    raise
                continue
            succeeded = True
            n_hvp += int(result.n_hvp)
            if self._joint and quantity == "eigenvalues":
                trace = self._joint_trace(result)
                self._record(trainer, step, "trace", **self._result_fields(trace))
                logged.update(self._scalars(trace))
            self._record(trainer, step, quantity, **self._result_fields(result))
            logged.update(self._scalars(result))
            self._warn_target_missed(result, step)
        if succeeded:
            if self.metric_keys["n_hvp"]:
                logged[self.metric_keys["n_hvp"]] = float(n_hvp)
            if self.metric_keys["seconds"]:
                logged[self.metric_keys["seconds"]] = time.perf_counter() - start
        if self.log_metrics and logged:
            # callback_metrics (checkpoint monitors, metrics.jsonl) get the values through
            # pl_module.log; the loggers get them directly, at the measured step. Through
            # pl_module.log they would land on Lightning's batch counter (one step early) at
            # its log_every_n_steps cadence, and be repeated while no new value comes.
            for key, value in logged.items():
                pl_module.log(
                    key, value, on_step=True, on_epoch=False, rank_zero_only=True, logger=False
                )
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(dict(logged), step=step)

    @staticmethod
    def _joint_trace(result: CurvatureResult) -> CurvatureResult:
        """The trace an ``eigenvalues`` call also returned (``result.also["trace"]``, see
        ``Backend.also_computes``): its ``n_hvp`` are the products of the shared call that the
        trace used (not extra ones), its ``seconds`` 0.0 (the eigenvalues record holds the time
        of the one call, so summed record times stay true), ``details["measured_with"]`` says
        so."""
        trace = result.also["trace"]
        details = {**trace.details, "measured_with": "eigenvalues"}
        return dataclasses.replace(trace, seconds=0.0, details=details)

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
