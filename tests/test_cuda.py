"""The package on a CUDA GPU (every test is marked ``cuda``; skipped where no GPU is visible).

What is proven on ``cuda:0`` (and ``cuda:1`` when there are two GPUs):

* the Hessian operator's products equal the dense Hessian's (float64), sequential and batched;
* ``estimate`` gives the CPU's numbers: eigenvalues to 1e-8 (Lanczos does not depend on the probe
  stream), the trace within a statistical bound of the exact trace (CUDA and CPU generators draw
  different probes from one seed, so the two Hutchinson estimates are not bit-equal);
* the model's state is untouched, the CUDA RNG states included;
* ``result.device`` names the model's device and ``peak_memory_bytes`` is reported (> 0);
* a multiplication makes no host synchronisation (``torch.cuda.set_sync_debug_mode("error")``);
* ``cuda:1`` works and allocates nothing on ``cuda:0`` (nothing hard-codes ``'cuda'``).
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import deconcnn_curvature as dcc
from deconcnn_curvature.hvp import HessianOperator
from deconcnn_curvature.problem import build_problem, preserve_state
from tests.cases import get_case

pytestmark = pytest.mark.cuda

CUDA0 = torch.device("cuda:0")
CASE_IDS = ["mlp", "cnn", "cnn_bn_eval", "frozen_layer", "unused_param"]


def _on(device: torch.device, case_id: str) -> tuple[nn.Module, nn.Module, Any, torch.Tensor]:
    case = get_case(case_id)
    model, loss_fn, (x, y) = case.make()
    return model.to(device), loss_fn, (x.to(device), y.to(device)), case.exact


@pytest.mark.parametrize("probe_batch", [1, 4])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_products_on_cuda_equal_the_dense_hessian(case_id: str, probe_batch: int) -> None:
    model, loss_fn, batch, exact = _on(CUDA0, case_id)
    problem = build_problem(model, loss_fn, batch)
    v = torch.randn(problem.dim, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with preserve_state(model):
        op = HessianOperator(problem, probe_batch=probe_batch)
        hv = op.matmat(v.to(CUDA0))
        op.close()
    assert hv.device == CUDA0
    torch.testing.assert_close(hv.cpu(), exact @ v, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_eigenvalues_on_cuda_equal_cpu(case_id: str) -> None:
    opts = dict(k=2, tol=1e-10, max_hvps=300)
    results = {}
    for device in (torch.device("cpu"), CUDA0):
        model, loss_fn, batch, exact = _on(device, case_id)
        results[device.type] = dcc.estimate(model, loss_fn, batch, "eigenvalues", seed=5, **opts)
    top = torch.flip(torch.linalg.eigvalsh(exact), [0])[:2]
    for r in results.values():
        torch.testing.assert_close(
            torch.tensor(r.value, dtype=torch.float64), top, rtol=1e-8, atol=1e-10
        )
    torch.testing.assert_close(results["cuda"].value, results["cpu"].value, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("case_id", ["mlp", "cnn_bn_eval"])
def test_trace_on_cuda_is_within_its_error_bars_of_the_exact_trace(case_id: str) -> None:
    model, loss_fn, batch, exact = _on(CUDA0, case_id)
    exact_trace = float(torch.trace(exact))
    r = dcc.estimate(model, loss_fn, batch, "trace", seed=11, num_hvps=400, probe_batch=8)
    assert r.n_hvp == 400 and r.stderr is not None and r.stderr > 0
    # Hutchinson's standard error is itself estimated from 400 samples: 5 of them is a bound this
    # estimate misses with probability far below 1e-5; the spread check catches a zero-variance bug.
    assert abs(r.value - exact_trace) <= 5 * r.stderr, (r.value, r.stderr, exact_trace)
    assert r.stderr < 0.5 * abs(exact_trace) + 1.0
    cpu_model, cpu_loss, cpu_batch, _ = _on(torch.device("cpu"), case_id)
    c = dcc.estimate(cpu_model, cpu_loss, cpu_batch, "trace", seed=11, num_hvps=400)
    assert abs(r.value - c.value) <= 5 * math.hypot(r.stderr, c.stderr)


def test_float32_on_cuda_matches_float64_within_float_tolerance() -> None:
    model, loss_fn, batch, exact = _on(CUDA0, "cnn")
    model = model.float()
    batch = (batch[0].float(), batch[1])
    r = dcc.estimate(model, loss_fn, batch, "eigenvalues", seed=0, k=1, tol=1e-6)
    top = float(torch.linalg.eigvalsh(exact)[-1])
    assert r.value[0] == pytest.approx(top, rel=1e-4)


def _full_state(model: nn.Module) -> dict[str, Any]:
    return {
        "modes": [m.training for m in model.modules()],
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "grad_values": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "flags": [p.requires_grad for p in model.parameters()],
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "cpu_rng": torch.get_rng_state(),
        "cuda_rng": [s.clone() for s in torch.cuda.get_rng_state_all()],
        "py_rng": random.getstate(),
        "np_rng": np.random.get_state()[1].copy(),
    }


def _assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = _full_state(model)
    assert after["modes"] == before["modes"]
    assert after["flags"] == before["flags"]
    for a, b in zip(after["params"], before["params"], strict=True):
        assert torch.equal(a, b)
    for p, g in zip(model.parameters(), before["grads"], strict=True):
        assert p.grad is g  # the same tensor object
    for a, b in zip(after["grad_values"], before["grad_values"], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert after["buffers"].keys() == before["buffers"].keys()
    for name, value in before["buffers"].items():
        assert torch.equal(after["buffers"][name], value), name
    assert torch.equal(after["cpu_rng"], before["cpu_rng"])
    assert len(after["cuda_rng"]) == len(before["cuda_rng"])
    for a, b in zip(after["cuda_rng"], before["cuda_rng"], strict=True):
        assert torch.equal(a, b)
    assert after["py_rng"] == before["py_rng"]
    assert np.array_equal(after["np_rng"], before["np_rng"])


@pytest.mark.parametrize("eval_mode", [True, False])
@pytest.mark.parametrize("quantity", ["trace", "eigenvalues", "density"])
def test_state_is_preserved_on_cuda_including_the_cuda_rng(quantity: str, eval_mode: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    ).to(CUDA0)
    x = torch.randn(8, 2, 6, 6, device=CUDA0)
    y = torch.randint(0, 3, (8,), device=CUDA0)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    loss_fn(model(x), y).backward()  # a training gradient the measurement must not touch
    torch.cuda.manual_seed_all(123)
    torch.rand(3, device=CUDA0)  # advance the CUDA RNG to a non-initial state
    before = _full_state(model)
    opts: dict[str, Any] = {"eval_mode": eval_mode}
    opts.update({"trace": {"num_hvps": 8}, "eigenvalues": {"max_hvps": 10}}.get(quantity, {}))
    if quantity == "density":
        opts.update(lanczos_steps=5, num_runs=2)
    dcc.estimate(model, loss_fn, (x, y), quantity, seed=0, **opts)
    _assert_unchanged(model, before)


def test_result_names_the_device_and_reports_peak_memory() -> None:
    model, loss_fn, batch, _ = _on(CUDA0, "cnn")
    for quantity in ("trace", "eigenvalues", "density"):
        r = dcc.estimate(model, loss_fn, batch, quantity, seed=0)
        assert r.device == "cuda:0"
        assert isinstance(r.peak_memory_bytes, int) and r.peak_memory_bytes > 0
        assert r.to_dict()["peak_memory_bytes"] == r.peak_memory_bytes


def test_default_probe_batch_on_cuda_is_batched() -> None:
    model, loss_fn, batch, _ = _on(CUDA0, "mlp")
    a = dcc.estimate(model, loss_fn, batch, "trace", seed=4, num_hvps=16)
    b = dcc.estimate(model, loss_fn, batch, "trace", seed=4, num_hvps=16, probe_batch=1)
    # Same probes (drawn column by column), sequential vs batched products: equal to rounding.
    assert a.value == pytest.approx(b.value, rel=1e-10)


@pytest.mark.parametrize("probe_batch", [1, 8])
def test_a_product_makes_no_host_synchronisation(probe_batch: int) -> None:
    model, loss_fn, batch, _ = _on(CUDA0, "cnn_bn_eval")
    problem = build_problem(model, loss_fn, batch)
    v = torch.ones(problem.dim, 8, dtype=torch.float64, device=CUDA0)
    with preserve_state(model):
        op = HessianOperator(problem, probe_batch=probe_batch)  # the one sync: loss finiteness
        op.matmat(v)  # warm-up: library handles and kernels of the double backward
        torch.cuda.synchronize()
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                op.matmat(v)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        op.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_cuda_1_works_and_leaves_cuda_0_alone() -> None:
    cuda1 = torch.device("cuda:1")
    model0, loss_fn, batch0, _ = _on(CUDA0, "cnn")
    ref = dcc.estimate(model0, loss_fn, batch0, "trace", seed=2, num_hvps=16)
    del model0, batch0
    model, loss_fn, batch, _ = _on(cuda1, "cnn")
    torch.cuda.synchronize(CUDA0)
    torch.cuda.reset_peak_memory_stats(CUDA0)
    before0 = torch.cuda.memory_allocated(CUDA0)
    for quantity, opts in (("trace", {"num_hvps": 16}), ("eigenvalues", {}), ("density", {})):
        r = dcc.estimate(model, loss_fn, batch, quantity, seed=2, **opts)
        assert r.device == "cuda:1"
        assert r.peak_memory_bytes is not None and r.peak_memory_bytes > 0
        if quantity == "trace":
            # Same generator type, same seed: the same probes as on cuda:0.
            assert r.value == pytest.approx(ref.value, rel=1e-10)
    torch.cuda.synchronize(cuda1)
    assert torch.cuda.max_memory_allocated(CUDA0) == before0
    assert all(p.device == cuda1 for p in model.parameters())
