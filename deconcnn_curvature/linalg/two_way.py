"""Error bars for the data, not only the probes: Hutchinson over groups of samples.

Hutchinson's interval (:mod:`~deconcnn_curvature.linalg.hutchinson`) covers the probe noise only:
it is an interval for ``tr H_S``, the Hessian of the mean loss over *the batch S that was
measured*. Read as the curvature of the network on its data — the Hessian ``H̄`` of the mean loss
over the whole data set (or data distribution) the batch was drawn from — it is too narrow: a
different batch of 128 samples has a different trace. When the batch is made of ``G ≥ 2`` groups
of samples, the products of one probe with each group's Hessian cost no more than one product with
the union, and the per-group quadratic forms measure the data noise too.

**The estimator.** Probes ``z_1 … z_m`` (Rademacher), groups ``g = 1 … G`` of ``n_g`` samples
(``N = Σ n_g``, weights ``w_g = n_g / N``), ``H_g`` the Hessian of the mean loss over group ``g``
and ``H_S = Σ_g w_g H_g`` that over the union. From ``X[g, j] = z_jᵀ H_g z_j``:

- row means ``r_g = (1/m) Σ_j X[g, j]`` (a group's trace), column means
  ``c_j = Σ_g w_g X[g, j] = z_jᵀ H_S z_j`` (exactly today's Hutchinson samples), and the estimate
  ``T = (1/m) Σ_j c_j = Σ_g w_g r_g`` — the same number as Hutchinson on the union;
- ``V_probe = s²(c) / m`` with ``s²(c) = Σ_j (c_j − T)² / (m − 1)``;
- ``V_data = (1 − N/N_pop) · S²_t / N`` with
  ``S²_t = [Σ_g n_g (r_g − T)² − Σ_g n_g Σ_j e²_gj / (m(m − 1))] / (G − 1)``, where
  ``e_gj = X[g, j] − r_g − c_j + T`` (the group × probe interaction), clipped at 0;
- ``stderr = √(V_probe + V_data)``, ``stderr_probe = √V_probe``, ``stderr_data = √V_data``, and
  a Student-t interval with Welch–Satterthwaite degrees of freedom
  ``(V_probe + V_data)² / (V_probe²/(m − 1) + V_data²/(G − 1))``.

**Derivation.** Let ``t_i`` be the trace of sample ``i``'s own Hessian (so ``tr H_g`` is the mean
of ``t_i`` over group ``g``) and ``θ = tr H̄`` the target. By the law of total variance over the
draw of the samples S and then of the probes,
``Var T = E[Var(T | S)] + Var(tr H_S)``, and the two parts are uncorrelated because
``E[T | S] = tr H_S``.

*Probe part.* Given S, the ``c_j`` are i.i.d. with mean ``tr H_S`` (Hutchinson), so ``s²(c)/m`` is
unbiased for ``Var(T | S)``, hence for its expectation.

*Data part.* ``tr H_S`` is the mean of the ``t_i`` over the N samples: with S a simple random
sample of N out of a data set of ``N_pop`` samples drawn without replacement,
``Var(tr H_S) = (1 − N/N_pop) S²_pop / N`` (``S²_pop`` the data set's variance of ``t_i``, divisor
``N_pop − 1``); with samples drawn independently from a distribution (or ``N_pop`` unknown: pass
``None``), ``(1 − N/N_pop)`` is 1 and ``S²_pop`` the distribution's variance. The sample variance
``s²_t`` of the N values ``t_i`` is unbiased for ``S²_pop`` in both cases. We do not see the
``t_i``, only the noisy group traces: given S, write ``D_g = H_g − H_S``; the probe effect common
to all groups cancels in ``r_g − T = tr D_g + ε_g`` with ``ε_g = (1/m) Σ_j (z_jᵀ D_g z_j −
tr D_g)`` (because ``Σ_g w_g D_g = 0``), so ``E Σ_g n_g (r_g − T)² = Σ_g n_g (tr D_g)² +
Σ_g n_g v(D_g) / m`` with ``v(A) = Var(zᵀAz)``, and ``E Σ_j e²_gj = (m − 1) v(D_g)``: the
subtracted term removes the probe noise of the group traces exactly. Finally, when the groups are
a *random partition* of S (or each group an independent random draw), ``E Σ_g n_g (tr D_g)² =
(G − 1) s²_t`` for any group sizes (a group of n_g drawn without replacement from the N has
``Var(tr H_g − tr H_S) = (1/n_g − 1/N) s²_t``). So ``S²_t`` above is unbiased for ``S²_pop`` and
``V_data`` for ``Var(tr H_S)``. With equal group sizes ``V_probe + V_data`` is the classical
two-way crossed random-effects variance of a grand mean, ``(MS_groups + MS_probes − MS_inter) /
(G m)``.

**Assumptions.** (1) The groups' samples are a random draw from the data set or distribution the
interval is about (a shuffled loader's batches, or a random batch split into groups); batches sorted
by class or by source measure something else. (2) The loss of the union is the size-weighted mean of
the groups' losses — true for a per-sample mean loss in eval mode; BatchNorm in train mode (batch
statistics) breaks it. (3) The interval is approximate: a variance estimate from G groups carries G
− 1 degrees of freedom (hence Satterthwaite's t), and heavy tails of the per-sample traces slow the
normal approximation; with G = 2 the data part has one degree of freedom and the interval
undercovers (85 % for a nominal 95 % in ``benchmarks/data_noise.py``, 92.5–93.5 % with G = 4,
95.5–98.5 % with G = 8): use G ≥ 4. A single group (G = 1) has no data part: the result is
Hutchinson's, with ``stderr_data`` absent. Under ``torch.distributed`` the backends measure one
group (probe noise only).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from deconcnn_curvature.errors import InvalidOptionError
from deconcnn_curvature.linalg.hutchinson import TraceEstimate, check_probe_count
from deconcnn_curvature.linalg.operator import OperatorShape
from deconcnn_curvature.linalg.probes import OnProduct, ProbeLoop, check_trace_args
from deconcnn_curvature.linalg.quantiles import student_t_quantile

__all__ = [
    "GroupRecorder",
    "GroupedOperator",
    "TwoWayTrace",
    "grouped_hutchinson",
    "hutchpp_forms",
    "two_way_trace",
]


@runtime_checkable
class GroupedOperator(OperatorShape, Protocol):
    """An operator ``Σ_g w_g A_g`` whose parts can be multiplied separately.

    ``matmat_groups(V)`` returns the ``(G, dim, k)`` products ``A_g @ V``; ``group_sizes`` the
    ``n_g`` (the weights are ``n_g / Σ n``).
    """

    @property
    def group_sizes(self) -> list[int]: ...

    def matmat_groups(self, v: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class TwoWayTrace:
    """The trace of the data set's Hessian from a groups × probes matrix of quadratic forms.

    ``stderr² = stderr_probe² + stderr_data²``; ``ci`` is a Student-t interval with ``dof``
    (Welch–Satterthwaite) degrees of freedom. ``data_variance_raw`` is the unclipped estimate of
    ``stderr_data²`` (it can come out negative by chance; ``stderr_data`` is then 0).
    """

    value: float
    stderr: float
    stderr_probe: float
    stderr_data: float
    data_variance_raw: float
    dof: float
    ci: tuple[float, float]
    ci_level: float
    groups: int
    probes: int
    samples: int
    population_size: int | None
    column_means: tuple[float, ...]

    def details(self) -> dict[str, object]:
        """The parts, for a result's ``details``."""
        return {
            "stderr_probe": self.stderr_probe,
            "stderr_data": self.stderr_data,
            "data_groups": self.groups,
            "data_samples": self.samples,
            "population_size": self.population_size,
            "dof": self.dof,
            "interval": "data set's Hessian (probe and data noise)",
        }


def two_way_trace(
    forms: torch.Tensor,
    group_sizes: Sequence[int],
    *,
    population_size: int | None = None,
    ci_level: float = 0.95,
) -> TwoWayTrace:
    """Estimate ``tr H̄`` of the whole data set from ``forms[g, j] = z_jᵀ H_g z_j``.

    See the module docstring for the estimator, its derivation and assumptions.

    Args:
        forms: ``(G, m)`` quadratic forms, ``G ≥ 2`` groups and ``m ≥ 2`` probes.
        group_sizes: samples per group (``n_g``); the groups are weighted by them.
        population_size: samples in the finite data set the groups were drawn from without
            replacement (finite-population correction ``1 − N/N_pop``); ``None``: drawn from a
            distribution (or an unknown, large set), no correction.
        ci_level: confidence level of the interval.
    """
    x = torch.as_tensor(forms).detach().to("cpu", torch.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 2:
        raise InvalidOptionError(
            f"two_way_trace needs a (groups >= 2, probes >= 2) matrix, got {tuple(x.shape)}"
        )
    g_count, m = x.shape
    n = torch.as_tensor(list(group_sizes), dtype=torch.float64)
    if n.shape != (g_count,) or bool((n <= 0).any()):
        raise InvalidOptionError(
            f"group_sizes must hold {g_count} positive counts, got {list(group_sizes)}"
        )
    total = float(n.sum())
    if population_size is not None and population_size < total:
        raise InvalidOptionError(
            f"population_size ({population_size}) is smaller than the samples measured ({total:g})"
        )
    w = n / total
    rows = x.mean(dim=1)  # r_g
    cols = (w[:, None] * x).sum(dim=0)  # c_j
    grand = float((w * rows).sum())
    v_probe = float(((cols - grand) ** 2).sum()) / (m - 1) / m
    inter = x - rows[:, None] - cols[None, :] + grand
    between = float((n * (rows - grand) ** 2).sum())
    noise = float((n * (inter**2).sum(dim=1)).sum()) / (m * (m - 1))
    fpc = 1.0 if population_size is None else 1.0 - total / population_size
    v_data_raw = fpc * (between - noise) / (g_count - 1) / total
    v_data = max(0.0, v_data_raw)
    var = v_probe + v_data
    denom = v_probe**2 / (m - 1) + v_data**2 / (g_count - 1)
    dof = var**2 / denom if denom > 0 else float(m - 1)
    se = math.sqrt(var)
    if se > 0 and math.isfinite(dof):
        half = student_t_quantile(0.5 + ci_level / 2, dof) * se
        ci = (grand - half, grand + half)
    else:
        ci = (grand, grand)
    return TwoWayTrace(
        value=grand,
        stderr=se,
        stderr_probe=math.sqrt(v_probe),
        stderr_data=math.sqrt(v_data),
        data_variance_raw=v_data_raw,
        dof=dof,
        ci=ci,
        ci_level=ci_level,
        groups=g_count,
        probes=m,
        samples=int(total),
        population_size=population_size,
        column_means=tuple(cols.tolist()),
    )


def grouped_hutchinson(
    op: GroupedOperator,
    num_matvecs: int,
    *,
    generator: torch.Generator,
    block_size: int = 1,
    rtol: float | None = None,
    min_matvecs: int = 10,
    ci_level: float = 0.95,
    layer_slices: Mapping[str, slice] | None = None,
    population_size: int | None = None,
    on_product: OnProduct | None = None,
) -> TraceEstimate:
    """Hutchinson's estimator with an interval for the whole data set's Hessian.

    The probes are those :func:`~deconcnn_curvature.linalg.hutchinson.hutchinson` draws from the
    same generator, in the same order, and the value is the same (to float rounding: the union's
    product is summed from its groups'); ``stderr`` and ``ci`` come from :func:`two_way_trace` and
    cover probe *and* data noise. ``details`` holds ``stderr_probe``, ``stderr_data``,
    ``data_groups`` and the interval's degrees of freedom. The arguments are those of
    ``hutchinson`` (``rtol`` is tested against the data-aware interval; ``on_product`` reports
    the probe-only running estimate) plus ``population_size`` (see :func:`two_way_trace`). Needs
    an operator with at least 2 groups.
    """
    sizes = list(op.group_sizes)
    if len(sizes) < 2:
        raise InvalidOptionError("grouped_hutchinson needs an operator of at least 2 groups")
    check_probe_count(num_matvecs)
    check_trace_args(rtol=rtol, ci_level=ci_level, block_size=block_size)
    weights = torch.tensor(sizes, dtype=torch.float64, device=op.device)
    weights = weights / weights.sum()
    blocks: list[torch.Tensor] = []  # (G, k) quadratic forms per block, on the device
    layer_names = list(layer_slices) if layer_slices else []
    layer_acc = torch.zeros(len(layer_names), dtype=torch.float64, device=op.device)

    def forms(z: torch.Tensor) -> list[float]:
        prod = (z.unsqueeze(0) * op.matmat_groups(z)).to(torch.float64)  # (G, dim, k)
        blocks.append(prod.sum(dim=1))
        if layer_names:
            union = (weights[:, None, None] * prod).sum(dim=0)
            layer_acc.add_(torch.stack([union[layer_slices[n]].sum() for n in layer_names]))
        return (weights[:, None] * blocks[-1]).sum(dim=0).tolist()

    def estimate() -> TwoWayTrace:
        forms = torch.cat(blocks, 1)
        return two_way_trace(forms, sizes, population_size=population_size, ci_level=ci_level)

    def interval(_: list[float]) -> tuple[float, float]:
        est = estimate()
        return est.value, (est.ci[1] - est.ci[0]) / 2

    loop = ProbeLoop(op, forms, interval, method="hutchinson", budget=num_matvecs)
    samples, target_met = loop.run(
        num_matvecs,
        generator=generator,
        block_size=block_size,
        rtol=rtol,
        min_probes=max(min_matvecs, 2),
        on_product=on_product,
    )
    est = estimate()
    layers = dict(zip(layer_names, (layer_acc / len(samples)).tolist(), strict=True))
    return TraceEstimate(
        value=est.value,
        stderr=est.stderr,
        n_matvecs=len(samples),
        ci=est.ci,
        ci_level=ci_level,
        method="hutchinson",
        target_met=target_met,
        samples=est.column_means,
        layers=layers or None,
        details=est.details(),
    )


class GroupRecorder:
    """A :class:`~deconcnn_curvature.linalg.operator.LinearOperator` over a grouped operator
    that keeps what a two-way estimate needs of every product it makes.

    ``matmat(V)`` returns the union's product ``Σ_g w_g A_g V`` (from one ``matmat_groups``
    call: the same cost) and records ``V`` and the groups' Gram matrices ``Mᵀ A_g M`` over every
    vector ``M`` multiplied so far — enough to form ``tr(Qᵀ A_g Q)`` for any ``Q`` in the span
    of the multiplied vectors and the quadratic forms of each multiplied vector, per group, after
    the estimator has run (:func:`hutchpp_forms`).
    """

    def __init__(self, op: GroupedOperator) -> None:
        self.op = op
        sizes = torch.tensor(op.group_sizes, dtype=torch.float64)
        self.group_sizes = list(op.group_sizes)
        self._weights = (sizes / sizes.sum()).to(op.device)
        self._vectors: list[torch.Tensor] = []
        self._columns: list[torch.Tensor] = []  # per call: (G, K_so_far, k) = Mᵀ A_g V

    @property
    def dim(self) -> int:
        return self.op.dim

    @property
    def dtype(self) -> torch.dtype:
        return self.op.dtype

    @property
    def device(self) -> torch.device:
        return self.op.device

    @property
    def n_matvecs(self) -> int:
        return self.op.n_matvecs

    def matmat(self, v: torch.Tensor) -> torch.Tensor:
        per = self.op.matmat_groups(v)  # (G, dim, k)
        self._vectors.append(v.detach().clone())  # the operator's dtype: memory of K vectors
        everything = torch.cat(self._vectors, dim=1).to(torch.float64)  # (dim, K)
        self._columns.append(torch.einsum("dK,gdk->gKk", everything, per.to(torch.float64)))
        return (self._weights.to(per.dtype)[:, None, None] * per).sum(dim=0)

    def gram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, [Mᵀ A_g M]_g)``: every vector multiplied (float64) and the groups' Grams."""
        vectors = torch.cat(self._vectors, dim=1).to(torch.float64)
        total = vectors.shape[1]
        gram = torch.zeros(
            len(self.group_sizes), total, total, dtype=torch.float64, device=vectors.device
        )
        start = 0
        for block in self._columns:
            k = block.shape[2]
            rows = block.shape[1]
            gram[:, :rows, start : start + k] = block
            gram[:, start : start + k, :rows] = block.transpose(1, 2)
            start += k
        return vectors, gram


def hutchpp_forms(
    recorder: GroupRecorder, basis: torch.Tensor, sketch_matvecs: int, deflated: int
) -> torch.Tensor | None:
    """``X[g, j] = tr(Qᵀ A_g Q) + (P z_j)ᵀ A_g (P z_j)``: the Hutch++ estimate split by group.

    ``Q`` (``basis``) must lie in the span of the first ``sketch_matvecs`` vectors multiplied
    (it does: Hutch++ builds it from them), and the last ``deflated`` vectors multiplied must be
    the deflated probes ``P z_j``. The size-weighted mean over groups of ``X[:, j]`` is the
    union's Hutch++ sample ``j`` (plus the exact part). ``None`` when fewer than 2 deflated
    probes were drawn (a sketch spanning everything: no variance to estimate).
    """
    if deflated < 2:
        return None
    vectors, gram = recorder.gram()
    total = vectors.shape[1]
    if sketch_matvecs + deflated != total:
        raise InvalidOptionError(
            f"recorded {total} products, expected {sketch_matvecs} + {deflated} deflated"
        )
    exact = torch.zeros(gram.shape[0], dtype=torch.float64, device=gram.device)
    if basis.shape[1] and sketch_matvecs:
        sketch = vectors[:, :sketch_matvecs]
        coeffs = torch.linalg.lstsq(sketch, basis.to(torch.float64)).solution  # Q = M C
        g_s = gram[:, :sketch_matvecs, :sketch_matvecs]
        exact = torch.einsum("ki,gkl,li->g", coeffs, g_s, coeffs)
    diag = torch.diagonal(gram, dim1=1, dim2=2)[:, sketch_matvecs:]  # (G, deflated)
    return exact[:, None] + diag
