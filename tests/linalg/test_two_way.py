"""The groups × probes trace estimator (linalg/two_way.py) on synthetic matrices with known
variance components, and grouped Hutchinson on dense grouped operators."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from deconcnn_curvature.linalg.hutchinson import hutchinson
from deconcnn_curvature.linalg.hutchpp import hutchpp_with_sketch
from deconcnn_curvature.linalg.operator import (
    DenseOperator,
    LinearOperator,
    OperatorShape,
    make_generator,
    rademacher,
)
from deconcnn_curvature.linalg.two_way import (
    GroupedOperator,
    GroupRecorder,
    grouped_hutchinson,
    hutchpp_forms,
    two_way_trace,
)

MU = 5.0


def _crossed(
    gen: torch.Generator, sizes: list[int], m: int, s_data: float, s_probe: float, s_inter: float
) -> torch.Tensor:
    """``X[g, j] = μ + a_g + b_j + e_gj`` with the per-sample scaling of a mean over ``n_g``
    samples: ``Var a_g = s_data² / n_g``, ``Var b_j = s_probe²``, ``Var e_gj = s_inter² / n_g``."""
    n = torch.tensor(sizes, dtype=torch.float64)
    a = torch.randn(len(sizes), 1, generator=gen, dtype=torch.float64) * s_data / n.sqrt()[:, None]
    b = torch.randn(1, m, generator=gen, dtype=torch.float64) * s_probe
    e = torch.randn(len(sizes), m, generator=gen, dtype=torch.float64) * s_inter
    return MU + a + b + e / n.sqrt()[:, None]


def _true_variance(
    sizes: list[int], m: int, s_data: float, s_probe: float, s_inter: float
) -> float:
    total = sum(sizes)
    return s_data**2 / total + s_probe**2 / m + s_inter**2 / (total * m)


@pytest.mark.parametrize(
    ("sizes", "m"),
    [([32, 32, 32, 32], 20), ([10, 40, 25, 7, 46], 12)],
    ids=["balanced", "unequal-groups"],
)
def test_variance_parts_are_unbiased_for_their_components(sizes: list[int], m: int) -> None:
    s_data, s_probe, s_inter = 20.0, 1.5, 8.0
    total = sum(sizes)
    gen = torch.Generator().manual_seed(11)
    reps = 3000
    data_raw, probe_var, values = [], [], []
    for _ in range(reps):
        est = two_way_trace(_crossed(gen, sizes, m, s_data, s_probe, s_inter), sizes)
        data_raw.append(est.data_variance_raw)
        probe_var.append(est.stderr_probe**2)
        values.append(est.value)
        assert est.stderr**2 == pytest.approx(est.stderr_probe**2 + est.stderr_data**2)
    truth_data = s_data**2 / total
    truth_probe = s_probe**2 / m + s_inter**2 / (total * m)

    def within(samples: list[float], truth: float, what: str) -> None:
        mean = math.fsum(samples) / reps
        se = math.sqrt(math.fsum((s - mean) ** 2 for s in samples) / (reps - 1) / reps)
        assert abs(mean - truth) <= 4 * se, (what, mean, truth, se)

    within(data_raw, truth_data, "data part")
    within(probe_var, truth_probe, "probe part")
    # The estimates' own spread: the total variance is that of the grand mean.
    spread = math.fsum((v - MU) ** 2 for v in values) / reps
    true_total = _true_variance(sizes, m, s_data, s_probe, s_inter)
    assert abs(spread / true_total - 1) <= 4 * math.sqrt(2 / reps), (spread, true_total)


def test_interval_covers_at_its_level_where_the_probe_only_interval_does_not() -> None:
    sizes, m = [32] * 4, 30
    gen = torch.Generator().manual_seed(5)
    reps = 2000
    t_probe = float(stats.t.ppf(0.975, m - 1))
    covered = probe_covered = 0
    for _ in range(reps):
        est = two_way_trace(_crossed(gen, sizes, m, 20.0, 1.5, 8.0), sizes)
        covered += est.ci[0] <= MU <= est.ci[1]
        probe_covered += abs(est.value - MU) <= t_probe * est.stderr_probe
        assert 1 <= est.dof <= (m - 1) + (len(sizes) - 1) + 1e-9
    # Binomial sd at 0.95 and 2000 reps: 0.005.
    assert 0.93 <= covered / reps <= 0.975, covered / reps
    assert probe_covered / reps < 0.6, probe_covered / reps


def test_no_data_noise_gives_the_probe_interval_and_fpc_shrinks_the_data_part() -> None:
    gen = torch.Generator().manual_seed(2)
    x = MU + torch.randn(1, 40, generator=gen, dtype=torch.float64).expand(4, 40)
    est = two_way_trace(x, [16] * 4)
    assert est.stderr_data == 0.0 and est.data_variance_raw == pytest.approx(0.0, abs=1e-12)
    assert est.dof == pytest.approx(39.0)
    probe_only = hutchinson_like(x[0])
    assert est.stderr == pytest.approx(probe_only)
    y = _crossed(gen, [16] * 4, 40, 30.0, 0.5, 1.0)
    free = two_way_trace(y, [16] * 4)
    finite = two_way_trace(y, [16] * 4, population_size=128)
    assert free.stderr_data > 0
    assert finite.data_variance_raw == pytest.approx(free.data_variance_raw * (1 - 64 / 128))
    whole = two_way_trace(y, [16] * 4, population_size=64)  # the whole data set was measured
    assert whole.stderr_data == 0.0 and whole.stderr == pytest.approx(whole.stderr_probe)


def hutchinson_like(samples: torch.Tensor) -> float:
    return float(samples.std()) / math.sqrt(samples.numel())


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="groups >= 2"):
        two_way_trace(torch.ones(1, 5), [3])
    with pytest.raises(ValueError, match="positive counts"):
        two_way_trace(torch.ones(2, 5), [3, 0])
    with pytest.raises(ValueError, match="population_size"):
        two_way_trace(torch.ones(2, 5), [3, 3], population_size=5)


class GroupedDense:
    """``Σ_g w_g A_g`` with per-group products (the HessianOperator's grouped interface)."""

    def __init__(self, mats: list[torch.Tensor], sizes: list[int]) -> None:
        self.mats, self.sizes, self._n = mats, sizes, 0
        w = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
        self.union = sum(wi * a for wi, a in zip(w, mats, strict=True))

    dim = property(lambda self: self.mats[0].shape[0])
    dtype = property(lambda self: torch.float64)
    device = property(lambda self: torch.device("cpu"))
    n_matvecs = property(lambda self: self._n)
    group_sizes = property(lambda self: list(self.sizes))

    def matmat_groups(self, v: torch.Tensor) -> torch.Tensor:
        self._n += v.shape[1]
        return torch.stack([a @ v for a in self.mats])


def _grouped(seed: int = 0, dim: int = 30) -> GroupedDense:
    gen = torch.Generator().manual_seed(seed)
    mats = []
    for _ in range(3):
        b = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
        mats.append(b @ b.T / dim + torch.diag(torch.rand(dim, generator=gen, dtype=torch.float64)))
    return GroupedDense(mats, [5, 9, 6])


@pytest.mark.parametrize("block_size", [1, 4])
def test_grouped_hutchinson_has_hutchinsons_probes_value_and_probe_stderr(block_size: int) -> None:
    op = _grouped()
    layers = {"a": slice(0, 10), "b": slice(10, 30)}
    est = grouped_hutchinson(
        op, 25, generator=make_generator(7, "cpu"), block_size=block_size, layer_slices=layers
    )
    plain = hutchinson(
        DenseOperator(op.union), 25, generator=make_generator(7, "cpu"), layer_slices=layers
    )
    assert est.value == pytest.approx(plain.value, rel=1e-12)
    torch.testing.assert_close(torch.tensor(est.samples), torch.tensor(plain.samples))
    assert est.details["stderr_probe"] == pytest.approx(plain.stderr, rel=1e-10)
    assert est.stderr >= plain.stderr and est.details["data_groups"] == 3
    assert est.layers == pytest.approx(plain.layers, rel=1e-10)
    assert est.n_matvecs == op.n_matvecs == 25


def test_grouped_hutchinson_forms_are_the_groups_quadratic_forms() -> None:
    op = _grouped(3)
    est = grouped_hutchinson(op, 6, generator=make_generator(1, "cpu"))
    gen = make_generator(1, "cpu")
    z = torch.cat(
        [rademacher(op.dim, 1, generator=gen, dtype=op.dtype, device="cpu") for _ in range(6)], 1
    )
    forms = torch.stack([(z * (a @ z)).sum(0) for a in op.mats])
    expected = two_way_trace(forms, op.sizes)
    assert est.stderr == pytest.approx(expected.stderr, rel=1e-12)
    assert est.ci == pytest.approx(expected.ci, rel=1e-12)


def test_grouped_hutchinson_rtol_stops_on_the_data_aware_interval() -> None:
    op = _grouped(1)
    est = grouped_hutchinson(
        op, 400, generator=make_generator(0, "cpu"), rtol=0.2, min_matvecs=10, block_size=5
    )
    half = (est.ci[1] - est.ci[0]) / 2
    assert est.target_met is True and est.n_matvecs < 400
    assert half <= 0.2 * (abs(est.value) - half)


@pytest.mark.parametrize("fraction", [None, 0.667], ids=["adaptive", "published"])
def test_hutchpp_forms_are_the_groups_exact_and_deflated_parts(fraction: float | None) -> None:
    # Outliers, so that the sketch keeps a few directions.
    gen = torch.Generator().manual_seed(4)
    dim = 40
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    mats = []
    for _ in range(3):
        lam = torch.rand(dim, generator=gen, dtype=torch.float64)
        lam[:3] += torch.tensor([50.0, 30.0, 20.0], dtype=torch.float64) * (
            1 + torch.rand(3, generator=gen, dtype=torch.float64)
        )
        mats.append((q * lam) @ q.T)
    op = GroupedDense(mats, [5, 9, 6])
    recorder = GroupRecorder(op)
    run = hutchpp_with_sketch(
        recorder, 24, generator=make_generator(2, "cpu"), sketch_fraction=fraction
    )
    d = run.trace.details
    s, g = int(d["sketch_matvecs"]), int(d["deflated_probes"])
    assert run.sketch.rank >= 1 and g >= 3
    forms = hutchpp_forms(recorder, run.sketch.basis, s, g)
    basis = run.sketch.basis
    exact = torch.stack([torch.trace(basis.T @ a @ basis) for a in mats])
    vectors, _ = recorder.gram()
    deflated = vectors[:, s:]
    torch.testing.assert_close(
        basis.T @ deflated, torch.zeros(basis.shape[1], g, dtype=torch.float64), atol=1e-10, rtol=0
    )
    dense = torch.stack([(deflated * (a @ deflated)).sum(0) for a in mats])
    torch.testing.assert_close(forms, exact[:, None] + dense, rtol=1e-9, atol=1e-9)
    w = torch.tensor([5, 9, 6], dtype=torch.float64) / 20
    torch.testing.assert_close(
        (w[:, None] * forms).sum(0),
        d["exact_part"] + torch.tensor(run.trace.samples, dtype=torch.float64),
        rtol=1e-9,
        atol=1e-9,
    )
    tw = two_way_trace(forms, [5, 9, 6])
    assert tw.value == pytest.approx(run.trace.value, rel=1e-9)
    assert tw.stderr_probe == pytest.approx(run.trace.stderr, rel=1e-8)


def test_both_operator_contracts_share_one_statement_of_the_operator_shape() -> None:
    grouped = _grouped()
    dense = DenseOperator(grouped.union)
    assert isinstance(grouped, GroupedOperator) and not isinstance(grouped, LinearOperator)
    assert isinstance(dense, LinearOperator) and not isinstance(dense, GroupedOperator)
    assert isinstance(grouped, OperatorShape) and isinstance(dense, OperatorShape)

    class ShapeOnlyMissing:  # multiplies both ways but does not state dim/dtype/device/n_matvecs
        group_sizes = property(lambda self: [1])

        def matmat(self, v: torch.Tensor) -> torch.Tensor:
            return v

        def matmat_groups(self, v: torch.Tensor) -> torch.Tensor:
            return v[None]

    assert not isinstance(ShapeOnlyMissing(), GroupedOperator)
    assert not isinstance(ShapeOnlyMissing(), LinearOperator)
