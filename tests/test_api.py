"""The public entry points and every user error they raise (message content asserted).

Every error is a :class:`deconcnn_curvature.CurvatureError` subclass whose message says what was
wrong, the value received and how to fix it. Nothing here computes a number it could get wrong:
numerical checks against dense Hessians live in tests/backends/test_pyhessian.py.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from cases import get_case
from torch import nn

import deconcnn_curvature as dcc
from deconcnn_curvature import errors
from deconcnn_curvature.backends.pyhessian import PyHessianBackend


@pytest.fixture
def mlp() -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    return get_case("mlp").make()


def _raises(exc: type[Exception], *patterns: str, **call: Any) -> str:
    """Call dcc.estimate(**call), expect ``exc`` (a CurvatureError), check every pattern."""
    with pytest.raises(exc) as info:
        dcc.estimate(**call)
    assert isinstance(info.value, dcc.CurvatureError)
    msg = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, msg), (pattern, msg)
    return msg


def test_every_public_error_derives_from_curvature_error() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, dcc.CurvatureError), name
        assert getattr(dcc, name) is cls
    assert issubclass(dcc.DuplicateBackendError, dcc.PluginError)


def test_unknown_backend_suggests_lists_and_points_to_the_command(mlp) -> None:
    model, loss_fn, batch = mlp
    _raises(
        dcc.UnknownBackendError,
        r"unknown backend 'pyhesian'",
        r"Did you mean 'pyhessian'\?",
        r"Known backends: .*pyhessian",
        r"`deconcnn-curv list-backends`",
        model=model,
        loss_fn=loss_fn,
        data=batch,
        backend="pyhesian",
    )
    with pytest.raises(dcc.UnknownBackendError) as info:
        dcc.get_backend("zzzz")
    assert "Did you mean" not in str(info.value)  # nothing close: no wild guess


def test_quantity_not_supported_names_backends_that_support_it(mlp) -> None:
    class NormOnly(dcc.Backend):
        name = "norm-only"
        quantities = frozenset({"hessian_norm"})

        def compute(self, problem, quantity, *, seed, options):  # pragma: no cover
            raise NotImplementedError

    from deconcnn_curvature import registry

    registry.get_registry()._register(NormOnly, "test")
    model, loss_fn, batch = mlp
    _raises(
        dcc.UnsupportedQuantityError,
        r"backend 'pyhessian' cannot compute quantity 'hessian_norm'",
        r"it computes: density, eigenvalues, trace",
        r"Backends that compute it: norm-only\.",
        model=model,
        loss_fn=loss_fn,
        data=batch,
        quantity="hessian_norm",
        backend="pyhessian",
    )


def test_unknown_quantity_lists_the_known_ones(mlp) -> None:
    model, loss_fn, batch = mlp
    _raises(
        dcc.UnsupportedQuantityError,
        r"unknown quantity 'tr'",
        r"known quantities: .*eigenvalues.*trace",
        model=model,
        loss_fn=loss_fn,
        data=batch,
        quantity="tr",
    )


@pytest.mark.parametrize(
    ("quantity", "options", "exc", "patterns"),
    [
        (
            "trace",
            {"bogus": 1},
            dcc.InvalidOptionError,
            [r"unknown option\(s\) 'bogus'", r"its options are: .*num_hvps"],
        ),
        (
            "trace",
            {"k": 2},
            dcc.InvalidOptionError,
            [r"option 'k' .* applies to eigenvalues only, not to 'trace'; drop it"],
        ),
        (
            "eigenvalues",
            {"num_hvps": 10},
            dcc.InvalidOptionError,
            [r"'num_hvps' .* applies to trace only"],
        ),
        ("trace", {"num_hvps": -3}, dcc.InvalidOptionError, [r"'num_hvps'", r">= 2, got -3"]),
        ("trace", {"num_hvps": 1.5}, dcc.InvalidOptionError, [r"must be an integer, got 1.5"]),
        ("trace", {"num_hvps": True}, dcc.InvalidOptionError, [r"must be an integer, got True"]),
        ("trace", {"rtol": 0}, dcc.InvalidOptionError, [r"'rtol'", r"must be > 0, got 0"]),
        ("trace", {"rtol": float("nan")}, dcc.InvalidOptionError, [r"must be finite"]),
        ("trace", {"ci_level": 1.0}, dcc.InvalidOptionError, [r"'ci_level'", r"<= 0.9999"]),
        ("trace", {"probe_batch": 0}, dcc.InvalidOptionError, [r"'probe_batch'", r">= 1"]),
        ("trace", {"eval_mode": "yes"}, dcc.InvalidOptionError, [r"true or false, got 'yes'"]),
        ("trace", {"num_hvps": None}, dcc.InvalidOptionError, [r"must not be None"]),
        ("eigenvalues", {"k": 0}, dcc.InvalidOptionError, [r"'k'", r"must be >= 1, got 0"]),
        (
            "eigenvalues",
            {"k": 84},
            dcc.InvalidOptionError,
            [r"'k' \(84\) exceeds the number of trainable parameters \(83\); pass k <= 83"],
        ),
        (
            "eigenvalues",
            {"k": 5, "max_hvps": 3},
            dcc.InvalidOptionError,
            [r"'max_hvps' \(3\) is smaller than k \(5\)", r"pass max_hvps >= 5"],
        ),
        ("density", {"num_runs": 0}, dcc.InvalidOptionError, [r"'num_runs'", r">= 1"]),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_options(mlp, quantity, options, exc, patterns) -> None:
    model, loss_fn, batch = mlp
    _raises(exc, *patterns, model=model, loss_fn=loss_fn, data=batch, quantity=quantity, **options)


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True, 2**70 * 1.0])
def test_invalid_seed(mlp, seed) -> None:
    model, loss_fn, batch = mlp
    _raises(
        dcc.InvalidOptionError,
        r"seed must be a non-negative integer or None",
        re.escape(repr(seed)),
        model=model,
        loss_fn=loss_fn,
        data=batch,
        seed=seed,
    )


def test_model_without_trainable_parameters(mlp) -> None:
    model, loss_fn, batch = mlp
    for p in model.parameters():
        p.requires_grad_(False)
    _raises(
        dcc.InvalidProblemError,
        r"no trainable parameters",
        r"unfreeze",
        model=model,
        loss_fn=loss_fn,
        data=batch,
    )


def test_not_a_model_and_not_a_loss(mlp) -> None:
    model, loss_fn, batch = mlp
    _raises(
        dcc.InvalidProblemError, r"torch.nn.Module, got str", model="m", loss_fn=loss_fn, data=batch
    )
    _raises(
        dcc.InvalidProblemError, r"loss_fn must be callable", model=model, loss_fn=3, data=batch
    )


@pytest.mark.parametrize("quantity", ["trace", "eigenvalues", "density"])
def test_non_finite_loss_is_an_error_never_a_nan(mlp, quantity: str) -> None:
    model, loss_fn, (x, y) = mlp
    x = x.clone()
    x[3, 2] = float("nan")
    _raises(
        dcc.NonFiniteError,
        r"the loss is nan on batch 0",
        r"Check the data",
        model=model,
        loss_fn=loss_fn,
        data=(x, y),
        quantity=quantity,
    )
    with torch.no_grad():
        model[0].weight.fill_(float("inf"))
    _raises(dcc.NonFiniteError, r"non-finite", model=model, loss_fn=loss_fn, data=(x * 0, y))


def test_finite_loss_with_non_finite_curvature_is_an_error() -> None:
    class SqrtOfSquare(nn.Module):
        """Finite output and loss, but the gradient of sqrt(w²) at w = 0 is 0/0."""

        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.sqrt(self.w**2).sum()

    x = torch.ones(4, 3, dtype=torch.float64)
    for quantity in ("trace", "eigenvalues", "density"):
        _raises(
            dcc.NonFiniteError,
            r"Hessian-vector product was not finite although the loss is",
            model=SqrtOfSquare(),
            loss_fn=nn.MSELoss(),
            data=(x, x),
            quantity=quantity,
        )


def test_sum_reduced_and_non_scalar_losses(mlp) -> None:
    model, _, batch = mlp
    _raises(
        dcc.InvalidProblemError,
        r"reduction='sum'",
        r"mean-reduced",
        model=model,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        data=batch,
    )
    _raises(
        dcc.InvalidProblemError,
        r"scalar .* got \(12,\)",
        r"\.mean\(\)",
        model=model,
        loss_fn=lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"),
        data=batch,
    )


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ("tensor", r"an \(inputs, targets\) batch or an iterable of batches, got Tensor"),
        (42, r"got int"),
        (None, r"data is None"),
        ([], r"holds no batches"),
        ("one-tuple", r"batch 0 is a Tensor; each batch must be an \(inputs, targets\) pair"),
        ("triple", r"batch 0 is a tuple; each batch must be an \(inputs, targets\) pair"),
        ("empty", r"batch 0 is empty"),
        ("scalar-target", r"cannot tell the batch size"),
    ],
)
def test_data_that_is_not_a_batch(mlp, data, pattern: str) -> None:
    model, loss_fn, (x, y) = mlp
    named = {
        "tensor": x,
        "one-tuple": (x,),
        "triple": [(x, y, y)],
        "empty": (x[:0], y[:0]),
        "scalar-target": [(3.0, 1.0)],
    }
    data = named[data] if isinstance(data, str) else data
    _raises(dcc.InvalidProblemError, pattern, model=model, loss_fn=loss_fn, data=data)


def test_estimate_under_inference_mode(mlp) -> None:
    model, loss_fn, batch = mlp
    with torch.inference_mode():
        _raises(
            dcc.InvalidProblemError,
            r"inference_mode",
            r"training hook",
            model=model,
            loss_fn=loss_fn,
            data=batch,
        )


def test_errors_in_user_code_are_wrapped_with_the_cause(mlp) -> None:
    model, loss_fn, (x, y) = mlp
    with pytest.raises(dcc.BackendFailedError) as info:
        dcc.estimate(model, loss_fn, (x, y.double()), "trace")  # CE wants class indices
    msg = str(info.value)
    assert "backend 'pyhessian' failed computing 'trace'" in msg and "RuntimeError" in msg
    assert isinstance(info.value.__cause__, RuntimeError)


# -- resolve / list / get ------------------------------------------------------------------------
def test_resolve_returns_the_class_and_complete_options() -> None:
    cls, opts = dcc.resolve("trace", "pyhessian", {"num_hvps": 7})
    assert cls is PyHessianBackend
    assert opts == {
        "num_hvps": 7,
        "rtol": None,
        "min_hvps": 10,
        "ci_level": 0.95,
        "data_groups": None,
        "population_size": None,
        "probe_batch": None,
        "retain_graphs": False,
    }
    _, opts = dcc.resolve("eigenvalues")
    assert opts["k"] == 1 and "num_hvps" not in opts
    with pytest.raises(dcc.InvalidOptionError):
        dcc.resolve("eigenvalues", options={"k": -1})


def test_backend_defaults_to_pyhessian_and_the_env_var_overrides(
    mlp, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, loss_fn, batch = mlp
    assert dcc.get_backend() is PyHessianBackend
    assert dcc.estimate(model, loss_fn, batch, num_hvps=4).backend == "pyhessian"
    monkeypatch.setenv("DECONCNN_CURVATURE_BACKEND", "nope")
    with pytest.raises(dcc.UnknownBackendError, match="'nope'"):
        dcc.estimate(model, loss_fn, batch)
    monkeypatch.setenv("DECONCNN_CURVATURE_BACKEND", "pyhessian")
    assert dcc.get_backend().name == "pyhessian"


def test_list_backends_reports_pyhessian() -> None:
    rows = {r["name"]: r for r in dcc.list_backends()}
    r = rows["pyhessian"]
    assert r["available"] is True and r["reason"] is None
    assert r["plugin"] == "builtin:pyhessian"
    assert r["quantities"] == ["density", "eigenvalues", "trace"]
    assert r["exact"] is False and r["distributed"] is True
    assert {o["name"] for o in r["options"]} >= {"num_hvps", "k", "rtol"}
    # the host's arguments, not a backend's options
    assert [o["name"] for o in r["host_arguments"]] == ["eval_mode", "seed", "distributed"]
    assert not {o["name"] for o in r["options"]} & {"eval_mode", "seed", "distributed"}
    for row in rows.values():
        assert set(row) >= {"name", "plugin", "available", "reason", "quantities", "exact"}


def test_public_result_fields() -> None:
    model, loss_fn, batch = get_case("mlp").make()
    r = dcc.estimate(model, loss_fn, batch, "trace", backend="pyhessian", seed=0, num_hvps=5)
    assert isinstance(r, dcc.CurvatureResult)
    assert isinstance(r.value, float) and isinstance(r.stderr, float)
    assert r.n_hvp == 5 and r.seconds > 0 and r.peak_memory_bytes is None
    with pytest.raises(AttributeError):
        r.value = 0.0  # frozen


def test_a_bad_default_backend_from_the_environment_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DECONCNN_CURVATURE_BACKEND", "pyhesian")
    with pytest.raises(dcc.UnknownBackendError, match=r"comes from \$DECONCNN_CURVATURE_BACKEND"):
        dcc.resolve("trace")
    with pytest.raises(dcc.UnknownBackendError) as named:
        dcc.resolve("trace", "pyhesian")  # named by the caller: no environment hint
    assert "DECONCNN_CURVATURE_BACKEND" not in str(named.value)
