"""Data groups for the trace's data-noise interval, shared by the HVP backends.

The groups are the batches of the problem (a shuffled loader's batches), or one batch split into
``data_groups`` near-equal parts along its first dimension (the Lightning monitor's random
curvature batch). The estimator and its assumptions: :mod:`deconcnn_curvature.linalg.two_way`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from deconcnn_curvature.backend import Option
from deconcnn_curvature.distributed import world_size
from deconcnn_curvature.errors import InvalidOptionError, InvalidProblemError
from deconcnn_curvature.problem import (
    CurvatureProblem,
    _batch_size,
    _check_per_sample_mean,
    rebuild_like,
)

__all__ = [
    "DATA_GROUP_OPTIONS",
    "DataGroupsMixin",
    "check_data_groups",
    "check_population",
    "data_group_options",
    "grouped_problem",
]

_T = frozenset({"trace"})


def data_group_options(quantities: frozenset[str]) -> tuple[Option, ...]:
    """``data_groups`` and ``population_size``, declared for ``quantities``."""
    return (
        Option(
            "data_groups",
            int,
            None,
            "groups of samples for a trace interval that covers the data noise (the whole data "
            "set's Hessian), not only the probes': null = the batches given (one batch: probe "
            "noise only), 1 = probe noise only, k >= 2 = one batch split into k parts",
            min=1,
            allow_none=True,
            quantities=quantities,
        ),
        Option(
            "population_size",
            int,
            None,
            "samples in the finite data set the measured ones were drawn from without "
            "replacement (finite-population correction of the data part); null = drawn from a "
            "distribution",
            min=1,
            allow_none=True,
            quantities=quantities,
        ),
    )


DATA_GROUP_OPTIONS: tuple[Option, ...] = data_group_options(_T)


def check_data_groups(backend: str, options: Mapping[str, Any], *, eval_mode: bool) -> None:
    """Refuse, before any work, a split that would change the matrix measured."""
    groups = options.get("data_groups")
    if groups is not None and groups >= 2 and eval_mode is False:
        raise InvalidOptionError(
            f"option 'data_groups' ({groups}) of backend {backend!r} splits the data into "
            "groups, which changes a train-mode model's batch statistics (BatchNorm) and so the "
            "Hessian measured; pass data_groups=1 with eval_mode=false, or eval_mode=true."
        )


class DataGroupsMixin:
    """For a backend declaring the data-group options: the host's check before any work
    (:meth:`~deconcnn_curvature.backend.Backend.check_call`) also refuses a split that would
    change the matrix measured (:func:`check_data_groups`). Put it before
    :class:`~deconcnn_curvature.backend.Backend` in the bases."""

    name: str

    @classmethod
    def check_call(cls, quantity: str, options: Mapping[str, Any], *, eval_mode: bool) -> None:
        check_data_groups(cls.name, options, eval_mode=eval_mode)


def _unsplittable(parts: int, where: str, what: str) -> InvalidOptionError:
    return InvalidOptionError(
        f"option 'data_groups' ({parts}) cannot split the batch: {where} is {what}; pass "
        "data_groups=1, or a batch whose inputs and targets are tensors (or mappings, tuples or "
        "lists of tensors) with the samples along their first dimension."
    )


def _split(value: Any, parts: int, samples: int, where: str) -> list[Any]:
    """``value`` (a batch's inputs or targets) cut into ``parts`` groups along the samples:
    every tensor in it, however nested in mappings, tuples and lists, is split along its first
    dimension, which must count the batch's ``samples``; the containers are rebuilt with their
    own type (:func:`~deconcnn_curvature.problem.rebuild_like`); ``None`` (no data, such as an
    absent mask) goes to every group. Anything else is refused (:class:`InvalidOptionError`
    naming ``where`` it sits), never given whole to every group."""
    if value is None:
        return [None] * parts
    if isinstance(value, torch.Tensor):
        if value.ndim == 0:
            raise _unsplittable(parts, where, "a 0-dimensional tensor")
        if value.shape[0] != samples:
            raise InvalidOptionError(
                f"option 'data_groups' ({parts}) cannot split the batch: {where} has "
                f"{value.shape[0]} rows along its first dimension but the batch has {samples} "
                "samples; give every tensor of the inputs and targets the samples along its "
                "first dimension, or pass data_groups=1."
            )
        return list(torch.tensor_split(value, parts, dim=0))
    if isinstance(value, Mapping):
        columns = {k: _split(v, parts, samples, f"{where}[{k!r}]") for k, v in value.items()}
        return [rebuild_like(value, {k: c[i] for k, c in columns.items()}) for i in range(parts)]
    if isinstance(value, tuple | list):
        cols = [_split(v, parts, samples, f"{where}[{j}]") for j, v in enumerate(value)]
        return [rebuild_like(value, [c[i] for c in cols]) for i in range(parts)]
    raise _unsplittable(parts, where, f"a {type(value).__name__}")


def grouped_problem(problem: CurvatureProblem, data_groups: int | None) -> CurvatureProblem | None:
    """The problem whose batches are the data groups, or ``None`` for a single group (or under
    a process group, where per-group products are not computed: the interval is then the probe
    noise's, as before).

    Raises :class:`~deconcnn_curvature.errors.InvalidOptionError` when ``data_groups`` cannot be
    honoured: more groups than samples, several batches that are not ``data_groups`` of them,
    or a loss that is not a mean over samples.
    """
    batches = problem.batches
    if data_groups == 1 or (data_groups is None and len(batches) < 2):
        return None
    if world_size() > 1:
        return None
    if data_groups is not None and len(batches) > 1 and len(batches) != data_groups:
        raise InvalidOptionError(
            f"option 'data_groups' ({data_groups}) does not match the {len(batches)} batches "
            "given: several batches are the groups themselves; pass data_groups=null (the "
            f"batches), data_groups=1 (probe noise only) or one batch to split."
        )
    if len(batches) > 1:
        return problem
    assert data_groups is not None
    inputs, targets = batches[0]
    n = _batch_size(inputs, targets)
    if n < data_groups:
        raise InvalidOptionError(
            f"option 'data_groups' ({data_groups}) exceeds the {n} samples of the batch; pass at "
            f"most data_groups={n}, or a larger batch."
        )
    groups = list(
        zip(
            _split(inputs, data_groups, n, "inputs"),
            _split(targets, data_groups, n, "targets"),
            strict=True,
        )
    )
    try:
        _check_per_sample_mean(problem.loss_fn, groups)
    except InvalidProblemError:
        raise InvalidOptionError(
            f"{type(problem.loss_fn).__name__} here is not a mean over samples (class weights or "
            "ignore_index targets), so the batch cannot be split into data groups whose losses "
            f"average to the batch's; pass data_groups=1 (given: {data_groups})."
        ) from None
    return dataclasses.replace(problem, batches=groups)


def check_population(problem: CurvatureProblem, population: int | None) -> None:
    """``population_size`` must count at least the samples measured."""
    if population is not None and population < problem.num_samples:
        raise InvalidOptionError(
            f"option 'population_size' ({population}) is smaller than the "
            f"{problem.num_samples} samples measured; pass the size of the data set they were "
            "drawn from, or null."
        )
