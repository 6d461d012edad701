"""Data groups of batches whose inputs are not a plain tensor: every tensor of a mapping (any
``Mapping``, rebuilt with its own type), tuple or list is split along the samples; what cannot be
split is refused in one line before any product. Checked against dense Hessians."""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

import deconcnn_curvature as dcc
from deconcnn_curvature.errors import InvalidOptionError


class _Pair(NamedTuple):
    x: torch.Tensor
    z: torch.Tensor


class _TwoInputNet(nn.Module):
    """Reads ``inputs["x"]`` and ``inputs["z"]`` (or ``inputs[0]``, ``inputs[1]``), and insists
    on the container type it was given, as a user's model may."""

    def __init__(self, kind: type) -> None:
        super().__init__()
        self.kind = kind
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(2, 2)

    def forward(self, inputs: Any) -> torch.Tensor:
        assert type(inputs) is self.kind, type(inputs)
        x, z = (inputs["x"], inputs["z"]) if isinstance(inputs, Mapping) else inputs
        return torch.tanh(self.a(x)) + self.b(z)


def _problem(kind: type, n: int = 6) -> tuple[nn.Module, Any, Any, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = _TwoInputNet(kind).double()
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    z = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    y = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    if issubclass(kind, Mapping):
        inputs: Any = kind({"x": x, "z": z})
    else:
        inputs = _Pair(x, z) if kind is _Pair else kind((x, z))
    return model, inputs, (x, z), y


def _dense(model: nn.Module, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = list(model.parameters())
    out = torch.tanh(model.a(x)) + model.b(z)
    grads = torch.autograd.grad(nn.functional.mse_loss(out, y), params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    rows = [
        torch.cat([r.reshape(-1) for r in torch.autograd.grad(flat[i], params, retain_graph=True)])
        for i in range(flat.numel())
    ]
    return torch.stack(rows)


KINDS = [dict, collections.UserDict, collections.OrderedDict, tuple, list, _Pair]


@pytest.mark.parametrize("groups", [2, 6], ids=["halves", "one-sample-each"])
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_grouped_hutchpp_equals_the_dense_hessian_for_any_input_container(
    kind: type, groups: int
) -> None:
    model, inputs, (x, z), y = _problem(kind)
    dense = _dense(model, x, z, y)
    exact_eig = torch.linalg.eigvalsh(dense).flip(0)[:2]
    dim = dense.shape[0]
    loss = nn.MSELoss()
    res = dcc.estimate(
        model,
        loss,
        [(inputs, y)],
        "eigenvalues",
        "hutchpp",
        k=2,
        num_hvps=3 * dim,
        max_hvps=3 * dim,
        data_groups=groups,
    )
    assert res.details["converged"] is True, res.details
    torch.testing.assert_close(
        torch.tensor(res.value, dtype=torch.float64), exact_eig, rtol=1e-6, atol=1e-9
    )
    trace = res.also["trace"]
    torch.testing.assert_close(trace.value, float(dense.trace()), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_grouped_pyhessian_trace_equals_the_dense_trace_for_any_input_container(
    kind: type,
) -> None:
    model, inputs, (x, z), y = _problem(kind)
    dense = _dense(model, x, z, y)
    # Rademacher probes: the groups' estimates average the batch's; with probes fixed by the
    # seed, the grouped estimate equals the ungrouped one computed from the same probes.
    ungrouped = dcc.estimate(
        model, nn.MSELoss(), [(inputs, y)], "trace", "pyhessian", num_hvps=40, data_groups=1
    )
    grouped = dcc.estimate(
        model, nn.MSELoss(), [(inputs, y)], "trace", "pyhessian", num_hvps=40, data_groups=3
    )
    assert grouped.details["data_groups"] == 3, grouped.details
    torch.testing.assert_close(grouped.value, ungrouped.value, rtol=1e-10, atol=1e-12)
    assert abs(ungrouped.value - float(dense.trace())) < 4 * ungrouped.stderr + 1e-9


def _refusal(inputs: Any, y: Any, model: nn.Module) -> str:
    with pytest.raises(InvalidOptionError) as info:
        dcc.estimate(model, nn.MSELoss(), [(inputs, y)], "trace", "hutchpp", data_groups=2)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_what_cannot_be_split_is_refused_in_one_line_naming_it_and_the_fix() -> None:
    model, _, (x, z), y = _problem(dict)

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, inputs: Any) -> torch.Tensor:
            return self.net({"x": inputs["x"] * inputs["scale"], "z": inputs["z"]})

    message = _refusal({"x": x, "z": z, "scale": 2.0}, y, Scaled())
    assert "inputs['scale'] is a float" in message and "data_groups=1" in message
    message = _refusal({"x": x, "z": z, "scale": torch.tensor(2.0)}, y, Scaled())
    assert "inputs['scale'] is a 0-dimensional tensor" in message
    message = _refusal({"x": x, "z": z[:4]}, y, model)
    assert "inputs['z'] has 4 rows" in message and "6 samples" in message
    message = _refusal({"x": x, "z": z}, y[:5], model)
    assert "inputs['x'] has 6 rows" in message and "5 samples" in message


def test_none_in_the_inputs_goes_to_every_group() -> None:
    model, _, (x, z), y = _problem(dict)

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, inputs: Any) -> torch.Tensor:
            assert inputs["mask"] is None
            return self.net({"x": inputs["x"], "z": inputs["z"]})

    inputs = {"x": x, "z": z, "mask": None}
    dense = _dense(model, x, z, y)
    res = dcc.estimate(
        Masked(), nn.MSELoss(), [(inputs, y)], "trace", "hutchpp", num_hvps=42, data_groups=3
    )
    torch.testing.assert_close(res.value, float(dense.trace()), rtol=1e-8, atol=1e-10)
