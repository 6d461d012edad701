"""compare() is a library function; the CLI only presents its rows."""

from __future__ import annotations

import torch
from torch import nn

import deconcnn_curvature as dcc


def _problem():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    return model, nn.CrossEntropyLoss(), (torch.randn(6, 3), torch.randint(0, 2, (6,)))


def test_compare_returns_one_row_per_backend_with_the_same_seed() -> None:
    model, loss_fn, batch = _problem()
    rows = dcc.compare(
        model, loss_fn, batch, "trace", ["pyhessian", "hutchpp"], seed=3,
        options={"num_hvps": 6, "k": 2},
    )  # fmt: skip
    assert [r["backend"] for r in rows] == ["pyhessian", "hutchpp"]
    assert all(r["status"] == "ok" and r["reason"] is None for r in rows)
    assert all(r["ignored_options"] == ["k"] for r in rows)  # k is not a trace option
    alone = dcc.estimate(model, loss_fn, batch, "trace", "pyhessian", seed=3, num_hvps=6)
    assert rows[0]["result"].value == alone.value and rows[0]["result"].n_hvp == 6


def test_compare_turns_a_backend_that_cannot_run_into_a_row() -> None:
    model, loss_fn, batch = _problem()
    rows = dcc.compare(model, loss_fn, batch, "eigenvalues", ["pyhessian", "backpack"], seed=0)
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"] == "unsupported" and rows[1]["result"] is None
    assert "eigenvalues" in rows[1]["reason"]


def test_density_is_a_library_function_the_cli_presents() -> None:
    model, loss_fn, batch = _problem()
    dens, eig = dcc.density(model, loss_fn, batch, "pyhessian", k=2, seed=1)
    assert dens.quantity == "density" and abs(sum(dens.value.weights) - 1.0) < 1e-9
    assert eig is not None and len(eig.value) == 2 and eig.value[0] >= eig.value[1]
    alone = dcc.estimate(model, loss_fn, batch, "eigenvalues", "pyhessian", seed=1, k=2)
    assert eig.value == alone.value
    none_marked = dcc.density(model, loss_fn, batch, "pyhessian", k=0, seed=1)[1]
    assert none_marked is None
