"""The state guard: after any curvature call, training state is exactly as it was.

:func:`snapshot` captures everything a curvature call could disturb — per-module training flags,
every parameter (object and value), every ``.grad`` (object, value, None-ness, no graph attached),
``requires_grad`` flags, every buffer (object and value) and the global RNG states — and
:func:`assert_unchanged` compares a later snapshot with it. Other test modules import both.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from cases import CASES, Case, get_case
from torch import nn

import deconcnn_curvature as dcc
from deconcnn_curvature.errors import InvalidProblemError
from deconcnn_curvature.problem import build_problem, preserve_state

QUANTITY_OPTIONS: dict[str, dict[str, Any]] = {
    "trace": {"num_hvps": 6},
    "eigenvalues": {"k": 2, "max_hvps": 30},
    "density": {"lanczos_steps": 6, "num_runs": 2},
}


@dataclass
class Snapshot:
    modes: list[tuple[str, bool]]
    params: list[tuple[str, torch.Tensor, torch.Tensor, bool]]
    grads: list[tuple[str, torch.Tensor | None, torch.Tensor | None]]
    buffers: list[tuple[str, torch.Tensor, torch.Tensor]]
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    py_rng: Any
    np_rng: Any


def snapshot(model: nn.Module) -> Snapshot:
    """Everything about ``model`` and the global RNGs that training depends on."""
    return Snapshot(
        modes=[(n, m.training) for n, m in model.named_modules()],
        params=[
            (n, p, p.detach().clone(), p.requires_grad)
            for n, p in model.named_parameters(remove_duplicate=False)
        ],
        grads=[
            (n, p.grad, None if p.grad is None else p.grad.detach().clone())
            for n, p in model.named_parameters(remove_duplicate=False)
        ],
        buffers=[(n, b, b.detach().clone()) for n, b in model.named_buffers()],
        torch_rng=torch.get_rng_state(),
        cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        py_rng=random.getstate(),
        np_rng=np.random.get_state(),
    )


def assert_unchanged(before: Snapshot, model: nn.Module) -> None:
    """Fail with the first difference between ``before`` and the state of ``model`` now."""
    after = snapshot(model)
    assert after.modes == before.modes, "module training flags changed"
    assert len(after.params) == len(before.params)
    for (n, p0, v0, rg0), (_, p1, _, rg1) in zip(before.params, after.params, strict=True):
        assert p1 is p0, f"parameter {n} was replaced"
        assert torch.equal(p1.detach(), v0), f"parameter {n} changed value"
        assert rg1 == rg0, f"requires_grad of {n} changed"
    for (n, g0, v0), (_, g1, _) in zip(before.grads, after.grads, strict=True):
        if g0 is None:
            assert g1 is None, f".grad of {n} was None and is now set"
            continue
        assert g1 is g0, f".grad of {n} is a different tensor object"
        assert torch.equal(g1, v0), f".grad of {n} changed value"
        assert g1.grad_fn is None and not g1.requires_grad, f".grad of {n} carries a graph"
    assert [n for n, *_ in after.buffers] == [n for n, *_ in before.buffers]
    for (n, b0, v0), (_, b1, _) in zip(before.buffers, after.buffers, strict=True):
        assert b1 is b0, f"buffer {n} was replaced"
        assert torch.equal(b1, v0), f"buffer {n} changed value"
    assert torch.equal(after.torch_rng, before.torch_rng), "torch CPU RNG state changed"
    if before.cuda_rng is not None:
        assert after.cuda_rng is not None
        assert all(torch.equal(a, b) for a, b in zip(after.cuda_rng, before.cuda_rng, strict=True))
    assert after.py_rng == before.py_rng, "python random state changed"
    a, b = after.np_rng, before.np_rng
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2:] == b[2:], "numpy state changed"


def _some_grads(model: nn.Module) -> None:
    """Give every other parameter a .grad (the rest stay None)."""
    for i, p in enumerate(model.parameters()):
        if i % 2 == 0:
            p.grad = torch.full_like(p, 0.5 + i)


def _train_mode(case: Case) -> bool:
    return case.id == "cnn_bn_eval"  # handed over in train mode, with BatchNorm


@pytest.mark.parametrize("quantity", list(QUANTITY_OPTIONS))
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_every_case_and_quantity_leaves_state_unchanged(case: Case, quantity: str) -> None:
    model, loss_fn, batch = case.make()
    if _train_mode(case):
        model.train()
    _some_grads(model)
    random.seed(1)
    np.random.seed(1)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. the create_graph=True reference-cycle warning
        dcc.estimate(model, loss_fn, batch, quantity, seed=0, **QUANTITY_OPTIONS[quantity])
    assert_unchanged(before, model)


def test_batchnorm_in_train_mode_keeps_running_stats_and_mode() -> None:
    model, loss_fn, batch = get_case("cnn_bn_eval").make()
    model.train()
    bn = model[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    for eval_mode in (True, False):  # False runs forward passes in train mode: stats would move
        for q, opts in QUANTITY_OPTIONS.items():
            before = snapshot(model)
            dcc.estimate(model, loss_fn, batch, q, seed=0, eval_mode=eval_mode, **opts)
            assert_unchanged(before, model)
    assert model.training and bn.training
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == int(stats[2])


def test_call_between_backward_and_step_leaves_the_training_update_unchanged() -> None:
    case = get_case("cnn_bn_eval")

    def step(measure: bool) -> list[torch.Tensor]:
        model, loss_fn, (x, y) = case.make()
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            if measure:
                grads = [p.grad for p in model.parameters()]
                values = [g.clone() for g in grads]
                before = snapshot(model)
                for q, opts in QUANTITY_OPTIONS.items():
                    dcc.estimate(model, loss_fn, (x, y), q, seed=0, **opts)
                assert_unchanged(before, model)
                for p, g, v in zip(model.parameters(), grads, values, strict=True):
                    assert p.grad is g and torch.equal(p.grad, v)
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(step(False), step(True), strict=True):
        assert torch.equal(a, b)


def test_frozen_parameters_keep_requires_grad_false_and_their_grads() -> None:
    model, loss_fn, batch = get_case("frozen_layer").make()
    model[0].weight.grad = torch.ones_like(model[0].weight)  # a frozen param with a stale grad
    before = snapshot(model)
    dcc.estimate(model, loss_fn, batch, "eigenvalues", seed=0)
    assert_unchanged(before, model)
    assert not model[0].weight.requires_grad


def test_tied_parameters_are_measured_once_and_restored() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 4).double()
    model = nn.Sequential(lin, nn.Tanh(), lin)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    before = snapshot(model)
    r = dcc.estimate(model, nn.MSELoss(), (x, y), "trace", seed=0, num_hvps=4)
    assert r.dim == 20
    assert_unchanged(before, model)


# -- preserve_state itself ----------------------------------------------------------------------
def test_preserve_state_restores_after_an_exception_and_undoes_everything_it_can() -> None:
    model, _, _ = get_case("cnn_bn_eval").make()
    model.train()
    _some_grads(model)
    before = snapshot(model)
    bn = model[1]
    with pytest.raises(RuntimeError, match="boom"), preserve_state(model):
        assert not model.training and torch.is_grad_enabled()
        assert all(p.grad is None for p in model.parameters())  # nothing can accumulate
        bn.running_mean.add_(1.0)  # in-place change
        bn.running_var = torch.zeros(3, dtype=torch.float64)  # buffer replaced
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = torch.zeros_like(p)
        torch.rand(3)
        random.random()
        np.random.rand()
        raise RuntimeError("boom")
    assert_unchanged(before, model)


def test_preserve_state_keeps_mode_when_eval_mode_false() -> None:
    model, _, _ = get_case("cnn_bn_eval").make()
    model.train()
    with preserve_state(model, eval_mode=False):
        assert model.training
    with torch.no_grad(), preserve_state(model):
        assert torch.is_grad_enabled() and not model.training
    assert model.training


def test_inference_mode_is_refused_with_a_fix() -> None:
    model, loss_fn, batch = get_case("mlp").make()
    before = snapshot(model)
    with torch.inference_mode(), pytest.raises(InvalidProblemError, match="inference_mode"):
        dcc.estimate(model, loss_fn, batch, "trace")
    assert_unchanged(before, model)


# -- build_problem ------------------------------------------------------------------------------
def test_build_problem_collects_trainable_parameters_in_order() -> None:
    model, loss_fn, batch = get_case("frozen_layer").make()
    problem = build_problem(model, loss_fn, [batch, batch])
    assert problem.names == ["2.weight", "2.bias"]
    assert problem.dim == 27 and problem.num_samples == 24
    assert problem.batch_weights() == [0.5, 0.5]
    assert problem.slices() == {"2.weight": slice(0, 24), "2.bias": slice(24, 27)}
    assert problem.dtype == torch.float64 and problem.device == torch.device("cpu")


def test_build_problem_accepts_generators_lists_and_dataloaders() -> None:
    model, loss_fn, (x, y) = get_case("mlp").make()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    assert [len(b[1]) for b in build_problem(model, loss_fn, loader).batches] == [5, 5, 2]
    gen = ((x[i : i + 6], y[i : i + 6]) for i in (0, 6))
    assert len(build_problem(model, loss_fn, gen).batches) == 2
    assert len(build_problem(model, loss_fn, [x, y]).batches) == 1  # a list pair is one batch


def test_a_batch_with_paired_inputs_is_measured_as_a_list_of_one_batch() -> None:
    """((x1, x2), y) reads as two batches (an ambiguity of the format): the error says how to
    pass it, and the list form gives the dense Hessian's trace."""
    from cases import dense_hessian

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)

        def forward(self, xs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return torch.tanh(self.a(xs[0]) + self.b(xs[1]))

    torch.manual_seed(0)
    model = TwoInputs().double()
    x1, x2 = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    loss = nn.CrossEntropyLoss()
    with pytest.raises(InvalidProblemError, match=r"pass it as a list of one batch"):
        dcc.estimate(model, loss, ((x1, x2), y))
    exact = torch.linalg.eigvalsh(dense_hessian(model, loss, [((x1, x2), y)])).flip(0)[:3]
    result = dcc.estimate(model, loss, [((x1, x2), y)], "eigenvalues", k=3, tol=1e-12, max_hvps=28)
    torch.testing.assert_close(torch.tensor(result.value, dtype=torch.float64), exact)


def test_a_callers_autocast_does_not_lower_the_precision_of_the_measurement() -> None:
    """Inside torch.autocast(bfloat16) the numbers are those computed without it."""
    case = get_case("cnn")
    model, loss_fn, batch = case.make()
    model = model.float()
    batch = (batch[0].float(), batch[1])
    plain = dcc.estimate(model, loss_fn, batch, "eigenvalues", k=2, tol=1e-8, max_hvps=60)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = dcc.estimate(model, loss_fn, batch, "eigenvalues", k=2, tol=1e-8, max_hvps=60)
        assert torch.is_autocast_cpu_enabled()  # the caller's context is left as it was
    torch.testing.assert_close(
        torch.tensor(inside.value), torch.tensor(plain.value), rtol=1e-6, atol=0
    )


def test_losses_that_are_not_per_sample_means_refuse_several_batches() -> None:
    """A class-weighted CrossEntropyLoss (or ignore_index targets) over several batches would be
    combined by sample count into the wrong Hessian; one batch is measured exactly."""
    from cases import dense_hessian

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x = torch.randn(10, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    two = [(x[:3], y[:3]), (x[3:], y[3:])]
    with pytest.raises(InvalidProblemError, match="class weights is not a mean over samples"):
        dcc.estimate(model, weighted, two)
    with pytest.raises(InvalidProblemError, match="ignore_index=2"):
        dcc.estimate(model, nn.CrossEntropyLoss(ignore_index=2), two)
    dcc.estimate(model, nn.CrossEntropyLoss(ignore_index=7), two, num_hvps=4)  # none ignored
    exact = torch.linalg.eigvalsh(dense_hessian(model, weighted, [(x, y)])).flip(0)[:1]
    one = dcc.estimate(model, weighted, (x, y), "eigenvalues", tol=1e-12, max_hvps=15)
    torch.testing.assert_close(torch.tensor(one.value, dtype=torch.float64), exact)


@pytest.mark.parametrize("shuffle", [False, True], ids=["in-order", "shuffled"])
@pytest.mark.parametrize("backend", ["pyhessian", "hutchpp", "backpack"])
def test_a_dataloader_as_data_leaves_the_global_rngs_as_they_were(
    backend: str, shuffle: bool
) -> None:
    """Iterating a DataLoader draws from the global torch RNG (a sampler's seed, a shuffle's
    permutation) whether or not it shuffles: the batches must be read inside the RNG guard."""
    if not dcc.get_backend(backend).availability().available:
        pytest.skip(f"{backend} is not installed")
    model, loss_fn, (x, y) = get_case("mlp").make()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=shuffle
    )
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    before = snapshot(model)
    expected_draw = torch.rand(3)  # what training would draw next
    torch.set_rng_state(before.torch_rng)
    dcc.estimate(model, loss_fn, loader, "trace", backend, seed=0)
    assert_unchanged(before, model)
    torch.testing.assert_close(torch.rand(3), expected_draw, rtol=0, atol=0)
