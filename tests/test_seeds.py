"""The seed rule and the two seed mixers (:mod:`deconcnn_curvature._seeds`), through their callers.

Every expected number below was computed on main before the mixers moved into one module: the
monitor's probe seeds and batch draws are recorded in users' ``curvature.jsonl`` and checkpoints,
the data sets' streams decide the synthetic images, the epoch orders and each augmentation. None
of them may change.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import deconcnn_curvature as dcc
from deconcnn_curvature._seeds import check_seed, integer_seed, tagged_seed
from deconcnn_curvature.checkpoints import checkpoint_settings
from deconcnn_curvature.checkpoints.cifar import SyntheticCIFAR
from deconcnn_curvature.checkpoints.data import DataSpec
from deconcnn_curvature.errors import ConfigurationError, InvalidOptionError
from deconcnn_curvature.monitor import CurvatureMonitor
from deconcnn_curvature.training.augment import EpochShuffleSampler, RandomResizedCropFlip


def test_the_monitors_mixer_keeps_its_outputs() -> None:
    assert tagged_seed("probes", 0, 500, "trace") == 2979683574521901210
    assert tagged_seed("batch", 0) == 1524294289235195559
    assert tagged_seed("batch", 3, 500) == 7855012622963304147
    monitor = CurvatureMonitor(seed=7, hessian_batch_size=4)
    assert monitor.probe_seed(1000, "eigenvalues") == 5727164121728823262
    assert monitor.probe_seed(500, "trace") == 7381700555240568020
    assert monitor.batch_indices(500, 100) == [16, 66, 17, 76]
    refresh = CurvatureMonitor(seed=7, hessian_batch_size=4, batch_mode="refresh")
    assert refresh.batch_indices(500, 100) == [86, 74, 72, 63]


def test_the_data_sets_mixer_keeps_its_outputs() -> None:
    assert integer_seed(0, 0) == 2547805098422156800
    assert integer_seed(5, 2, 17) == 2573398142319685632
    assert integer_seed(2**64 + 3, 1) == 2263628127646922383  # values wrap at 64 bits
    assert integer_seed(0, -1) == 1971300718473379373
    sampler = EpochShuffleSampler(10, seed=3)
    sampler.set_epoch(2)
    assert [i for _, i in sampler] == [2, 6, 5, 8, 1, 3, 4, 7, 0, 9]
    data = SyntheticCIFAR(4, seed=5, image_size=8, mean=None)
    assert data.labels.tolist() == [1, 0, 2, 3]
    assert int(data.images.sum()) == 92833
    augmented = SyntheticCIFAR(
        4, seed=5, image_size=8, mean=None, transform=RandomResizedCropFlip(8)
    )
    assert float(augmented[(3, 1)][0].sum()) == pytest.approx(74.45423889160156, abs=0, rel=1e-7)


def test_the_two_mixers_give_unrelated_seeds_for_equal_inputs() -> None:
    assert integer_seed(0, 0) != tagged_seed(0, 0)
    assert tagged_seed("probes", 0, 0, "trace") != tagged_seed("batch", 0, 0)


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True, 2**63, None])
def test_check_seed_rejects_what_is_not_a_seed(seed) -> None:
    with pytest.raises(ConfigurationError, match=r"^seed must be a non-negative integer \(below"):
        check_seed(seed)


def test_check_seed_accepts_integers_of_any_kind_and_returns_int() -> None:
    assert check_seed(0) == 0
    assert check_seed(2**63 - 1) == 2**63 - 1
    value = check_seed(np.int64(9))
    assert value == 9 and type(value) is int


@pytest.mark.parametrize("make", [SyntheticCIFAR, lambda n, seed: EpochShuffleSampler(n, seed)])
def test_the_data_sets_use_the_one_seed_rule(make) -> None:
    # A seed at 2**63 or above used to be taken and wrapped (2**64 + s drew what s draws).
    with pytest.raises(ConfigurationError, match=r"seed must be a non-negative integer \(below"):
        make(4, seed=2**64)
    make(4, seed=np.int64(3))  # a numpy integer (e.g. from a config) is a valid seed


def test_estimate_uses_the_one_seed_rule() -> None:
    model = torch.nn.Linear(2, 1)
    data = (torch.randn(3, 2), torch.randn(3, 1))
    with pytest.raises(InvalidOptionError, match=r"non-negative integer or None \(below 2\*\*63\)"):
        dcc.estimate(model, torch.nn.MSELoss(), data, "trace", seed=2**63)


@pytest.mark.parametrize(
    ("make", "prefix"),
    [
        (lambda seed: CurvatureMonitor(seed=seed), "CurvatureMonitor: seed"),
        (lambda seed: DataSpec("synthetic", seed=seed), "seed"),
        (lambda seed: checkpoint_settings(seed=seed), "seed"),
    ],
    ids=["monitor", "data_spec", "checkpoint_settings"],
)
@pytest.mark.parametrize("seed", [-1, True, 1.5, 2**63, 2**64])
def test_the_monitor_and_the_command_lines_settings_use_the_one_seed_rule(
    make, prefix: str, seed
) -> None:
    # Before: each took any int >= 0. The monitor hashed 2**64 like any seed; DataSpec handed
    # 2**63..2**64-1 to torch.Generator.manual_seed (taken as an unsigned 64-bit seed) and 2**64 on
    # to a late "Overflow when unpacking long long" from inside the checkpoint loader.
    message = rf"^{prefix} must be a non-negative integer \(below 2\*\*63\), got {seed!r}\.$"
    with pytest.raises(ConfigurationError, match=message):
        make(seed)


def test_the_monitor_and_the_command_lines_settings_accept_every_seed_below_2_63() -> None:
    assert CurvatureMonitor(seed=2**63 - 1).seed == 2**63 - 1
    assert CurvatureMonitor(seed=np.int64(4)).seed == 4
    assert DataSpec("synthetic", seed=2**63 - 1).seed == 2**63 - 1
    assert checkpoint_settings(seed=np.int64(4))["seed"] == 4
