"""Data groups: per-batch products of the Hessian operator and the ``pyhessian``
backend's data-aware trace interval, against dense Hessians built by plain double backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deconcnn_curvature as dcc
from deconcnn_curvature.hvp import HessianOperator
from deconcnn_curvature.linalg.hutchinson import hutchinson
from deconcnn_curvature.linalg.operator import make_generator, rademacher
from deconcnn_curvature.linalg.two_way import two_way_trace
from deconcnn_curvature.problem import build_problem, preserve_state


def _setup(n: int = 60, seed: int = 0) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(n, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    return model, nn.CrossEntropyLoss(), x, y


def _dense(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The Hessian of the mean loss over (x, y): one double-backward row per parameter."""
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    rows = [
        torch.cat([r.reshape(-1) for r in torch.autograd.grad(flat[i], params, retain_graph=True)])
        for i in range(flat.numel())
    ]
    return torch.stack(rows)


def _probes(seed: int, dim: int, m: int) -> torch.Tensor:
    gen = make_generator(seed, "cpu")
    return torch.cat(
        [rademacher(dim, 1, generator=gen, dtype=torch.float64, device="cpu") for _ in range(m)], 1
    )


def test_matmat_groups_are_each_batchs_dense_hessian_and_weigh_up_to_matmat() -> None:
    model, loss_fn, x, y = _setup()
    sizes = [11, 30, 19]
    batches = list(zip(x.split(sizes), y.split(sizes), strict=True))
    dense = [_dense(model, loss_fn, xb, yb) for xb, yb in batches]
    problem = build_problem(model, loss_fn, batches)
    v = torch.randn(problem.dim, 5, dtype=torch.float64)
    for probe_batch in (1, 3):
        with preserve_state(model):
            op = HessianOperator(problem, probe_batch=probe_batch)
            per = op.matmat_groups(v)
            union = op.matmat(v)
        assert op.group_sizes == sizes and op.n_matvecs == 10
        for b in range(3):
            torch.testing.assert_close(per[b], dense[b] @ v, rtol=1e-10, atol=1e-12)
        weights = torch.tensor(sizes, dtype=torch.float64) / 60
        torch.testing.assert_close((weights[:, None, None] * per).sum(0), union)


def test_split_batch_value_is_the_plain_trace_and_the_interval_is_the_dense_two_way_one() -> None:
    model, loss_fn, x, y = _setup(64)
    plain = dcc.estimate(model, loss_fn, (x, y), "trace", seed=3, num_hvps=12)
    grouped = dcc.estimate(model, loss_fn, (x, y), "trace", seed=3, num_hvps=12, data_groups=4)
    assert "stderr_data" not in plain.details  # one batch: today's result
    assert grouped.value == pytest.approx(plain.value, rel=1e-12)
    assert grouped.details["stderr_probe"] == pytest.approx(plain.stderr, rel=1e-10)
    assert grouped.n_hvp == plain.n_hvp == 12
    assert grouped.details["data_groups"] == 4
    assert grouped.details["data_split"] == "one batch split"
    # Exact: the two-way estimate of the dense groups' quadratic forms with the same probes.
    z = _probes(3, plain.dim, 12)
    forms = torch.stack(
        [
            (z * (_dense(model, loss_fn, xb, yb) @ z)).sum(0)
            for xb, yb in zip(x.tensor_split(4), y.tensor_split(4), strict=True)
        ]
    )
    expected = two_way_trace(forms, [16] * 4)
    assert grouped.stderr == pytest.approx(expected.stderr, rel=1e-8)
    assert grouped.details["stderr_data"] == pytest.approx(
        expected.stderr_data, rel=1e-6, abs=1e-12
    )
    assert grouped.ci == pytest.approx(expected.ci, rel=1e-8)
    assert grouped.stderr**2 == pytest.approx(
        grouped.details["stderr_probe"] ** 2 + grouped.details["stderr_data"] ** 2
    )


def test_batches_are_the_groups_and_data_groups_1_keeps_todays_result_exactly() -> None:
    model, loss_fn, x, y = _setup(48)
    batches = list(zip(x.split(16), y.split(16), strict=True))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grouped = dcc.estimate(model, loss_fn, batches, "trace", seed=1, num_hvps=10)
    assert grouped.details["data_groups"] == 3 and grouped.details["data_split"] == "batches"
    single = dcc.estimate(model, loss_fn, batches, "trace", seed=1, num_hvps=10, data_groups=1)
    problem = build_problem(model, loss_fn, batches)
    with preserve_state(model):
        today = hutchinson(HessianOperator(problem), 10, generator=make_generator(1, "cpu"))
    assert (single.value, single.stderr, single.ci) == (today.value, today.stderr, today.ci)
    assert "stderr_data" not in single.details and "stderr_probe" not in single.details
    assert grouped.value == pytest.approx(today.value, rel=1e-12)
    assert model.training and all(p.grad is None for p in model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


@pytest.mark.parametrize(
    ("data", "opts", "match"),
    [
        ("one", {"data_groups": 65}, r"'data_groups' \(65\) exceeds the 64 samples"),
        ("three", {"data_groups": 2}, r"does not match the 3 batches given"),
        ("one", {"data_groups": 4, "population_size": 10}, r"'population_size' \(10\) is smaller"),
        ("one", {"data_groups": 4, "eval_mode": False}, r"changes a train-mode model's batch"),
    ],
)
def test_data_groups_that_cannot_be_honoured_are_refused_with_the_fix(
    data: str, opts: dict[str, object], match: str
) -> None:
    model, loss_fn, x, y = _setup(64)
    batch = (x, y) if data == "one" else list(zip(x.split(22), y.split(22), strict=True))
    with pytest.raises(dcc.InvalidOptionError, match=match):
        dcc.estimate(model, loss_fn, batch, "trace", seed=0, num_hvps=4, **opts)


def test_eval_mode_conflict_is_caught_by_resolve_before_any_work() -> None:
    with pytest.raises(dcc.InvalidOptionError, match="data_groups=1 with eval_mode=false"):
        dcc.resolve("trace", "pyhessian", {"data_groups": 4, "eval_mode": False})
    dcc.resolve("trace", "pyhessian", {"data_groups": 1, "eval_mode": False})


def test_class_weighted_loss_cannot_be_split() -> None:
    model, _, x, y = _setup(40)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    with pytest.raises(dcc.InvalidOptionError, match="cannot be split into data groups"):
        dcc.estimate(model, loss_fn, (x, y), "trace", seed=0, num_hvps=4, data_groups=4)


def test_hutchpp_trace_and_eigenvalues_carry_the_data_interval() -> None:
    model, loss_fn, x, y = _setup(64)
    kw = {"seed": 4, "num_hvps": 20}
    plain = dcc.estimate(model, loss_fn, (x, y), "trace", "hutchpp", **kw)
    grouped = dcc.estimate(model, loss_fn, (x, y), "trace", "hutchpp", data_groups=4, **kw)
    assert "stderr_data" not in plain.details
    assert grouped.value == pytest.approx(plain.value, rel=1e-9)
    assert grouped.n_hvp == plain.n_hvp == 20
    d = grouped.details
    assert d["data_groups"] == 4 and d["data_split"] == "one batch split"
    assert d["stderr_probe"] == pytest.approx(plain.stderr, rel=1e-8)
    assert grouped.stderr**2 == pytest.approx(d["stderr_probe"] ** 2 + d["stderr_data"] ** 2)
    eig_plain = dcc.estimate(model, loss_fn, (x, y), "eigenvalues", "hutchpp", **kw)
    eig = dcc.estimate(model, loss_fn, (x, y), "eigenvalues", "hutchpp", data_groups=4, **kw)
    torch.testing.assert_close(
        torch.tensor(eig.value), torch.tensor(eig_plain.value), rtol=1e-8, atol=0
    )
    assert eig.also["trace"].value == pytest.approx(grouped.value, rel=1e-12)
    assert eig.also["trace"].stderr == pytest.approx(grouped.stderr, rel=1e-12)
    assert eig.also["trace"].details["stderr_data"] == pytest.approx(d["stderr_data"])
    dense = _dense(model, loss_fn, x, y)
    top = float(torch.linalg.eigvalsh(dense).max())
    assert eig.value[0] == pytest.approx(top, rel=1e-3)


def test_hutchpp_data_groups_on_batches_and_its_refusals() -> None:
    model, loss_fn, x, y = _setup(48)
    batches = list(zip(x.split(16), y.split(16), strict=True))
    r = dcc.estimate(model, loss_fn, batches, "trace", "hutchpp", seed=0, num_hvps=12)
    assert r.details["data_groups"] == 3 and r.details["data_split"] == "batches"
    one = dcc.estimate(
        model, loss_fn, batches, "trace", "hutchpp", seed=0, num_hvps=12, data_groups=1
    )
    assert "stderr_data" not in one.details and one.value == pytest.approx(r.value, rel=1e-9)
    with pytest.raises(dcc.InvalidOptionError, match="eval_mode=false"):
        dcc.resolve("eigenvalues", "hutchpp", {"data_groups": 4, "eval_mode": False})


def test_non_finite_products_are_refused_whole_and_per_group() -> None:
    # A finite loss, sqrt of the mean square, at a zero residual: its gradient is 0/0.
    model = nn.Linear(3, 3, bias=False).double()
    nn.init.zeros_(model.weight)

    def root_mean_square(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((out - target) ** 2).mean().sqrt()

    x = torch.ones(4, 3, dtype=torch.float64)
    y = torch.zeros(4, 3, dtype=torch.float64)
    problem = build_problem(model, root_mean_square, [(x[:2], y[:2]), (x[2:], y[2:])])
    v = torch.ones(problem.dim, 2, dtype=torch.float64)
    message = r"^a Hessian-vector product was not finite although the loss is; "
    with preserve_state(model):
        op = HessianOperator(problem)
        with pytest.raises(dcc.NonFiniteError, match=message):
            op.matmat(v)
        with pytest.raises(dcc.NonFiniteError, match=message):
            op.matmat_groups(v)
