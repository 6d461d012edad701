"""Eigenvalue and density bases are sized before they are allocated: a measurement that would keep
more vectors of the parameters' size than the device's memory holds is refused in one line, with
the estimate and the fix, before any product."""

from __future__ import annotations

import time

import pytest
import torch
from test_problem import assert_unchanged, snapshot
from torch import nn

import deconcnn_curvature as dcc
from deconcnn_curvature.errors import InvalidOptionError
from deconcnn_curvature.problem import (
    available_memory,
    build_problem,
    check_vector_memory,
    kept_vectors,
)

HUGE = 1_000_000  # steps: with a million parameters, 4.0e12 bytes of float32 vectors


@pytest.mark.parametrize(
    ("backend", "quantity", "option"),
    [
        ("pyhessian", "eigenvalues", "max_hvps"),
        ("pyhessian", "density", "lanczos_steps"),
        ("hutchpp", "eigenvalues", "max_hvps"),
    ],
)
def test_a_basis_larger_than_memory_is_refused_before_any_product(
    backend: str, quantity: str, option: str
) -> None:
    available = available_memory(torch.device("cpu"))
    assert available is not None and available < 4 * 10**12, "this machine holds 4 TB?"
    model = nn.Linear(1000, 1000)  # 1,001,000 parameters
    x, y = torch.randn(4, 1000), torch.randint(0, 1000, (4,))
    before = snapshot(model)
    start = time.perf_counter()
    with pytest.raises(InvalidOptionError) as info:
        dcc.estimate(model, nn.CrossEntropyLoss(), (x, y), quantity, backend, **{option: HUGE})
    message = str(info.value)
    assert time.perf_counter() - start < 5  # no product was made
    assert "\n" not in message
    assert f"would keep {HUGE} vectors of the 1,001,000 parameters in float32: 3729.0 GiB" in (
        message
    )
    assert f"lower option {option!r}" in message and "--device" in message
    assert_unchanged(before, model)


def test_the_estimate_is_parameters_times_vectors_times_element_size() -> None:
    model = nn.Linear(99, 10).double()  # 1000 parameters, 8 bytes each
    problem = build_problem(model, nn.MSELoss(), (torch.randn(3, 99).double(), torch.randn(3, 10)))
    vectors, option = kept_vectors(
        dcc.get_backend("pyhessian"), "eigenvalues", {"max_hvps": 10}, 1000
    )
    assert (vectors, option) == (10, "max_hvps")
    check_vector_memory(problem, 10, option, backend="b", quantity="eigenvalues", available=90_000)
    with pytest.raises(
        InvalidOptionError, match=r"float64: 78.1 KiB, but cpu has 78.1 KiB available"
    ) as info:
        check_vector_memory(
            problem, 10, option, backend="b", quantity="eigenvalues", available=80_000
        )
    assert "e.g. max_hvps=5 fits" in str(info.value)
    # a Krylov basis never exceeds the dimension; a trace keeps no basis
    assert (
        kept_vectors(dcc.get_backend("pyhessian"), "eigenvalues", {"max_hvps": 5000}, 1000)[0]
        == 1000
    )
    assert kept_vectors(dcc.get_backend("pyhessian"), "trace", {"num_hvps": 100}, 1000) == (0, None)


@pytest.mark.cuda
def test_on_cuda_the_estimate_is_compared_with_the_gpus_free_memory() -> None:
    free = available_memory(torch.device("cuda"))
    assert free is not None and 0 < free <= torch.cuda.get_device_properties(0).total_memory
    model = nn.Linear(1000, 1000).cuda()
    x, y = torch.randn(4, 1000, device="cuda"), torch.randint(0, 1000, (4,), device="cuda")
    steps = int(free // (1_001_000 * 4)) + 10  # just more than the GPU holds
    with pytest.raises(InvalidOptionError, match=r"but cuda:0 has .* available; lower option"):
        dcc.estimate(
            model, nn.CrossEntropyLoss(), (x, y), "density", "pyhessian", lanczos_steps=steps
        )
