"""A backend that changes the model's parameters is caught by the state guard: the parameters
are restored (when a copy was affordable) and the measurement fails naming the backend and its
plugin. The backends here are real third-party plugins, registered in-process through the
``register_backends`` hook."""

from __future__ import annotations

import types
from collections.abc import Callable

import pytest
import torch
from cases import get_case
from test_problem import assert_unchanged, snapshot
from torch import nn

import deconcnn_curvature as dcc
from deconcnn_curvature import problem as problem_module
from deconcnn_curvature import registry
from deconcnn_curvature.errors import BackendFailedError
from deconcnn_curvature.hookspecs import hookimpl
from deconcnn_curvature.registry import Registry


def _tampering_backend(name: str, tamper: Callable[[nn.Module], None]) -> type[dcc.Backend]:
    def compute(self, problem, quantity, *, seed, options):  # type: ignore[no-untyped-def]
        tamper(problem.model)
        return dcc.CurvatureResult(value=1.0, stderr=0.0, n_hvp=0, exact=True, method="fake")

    return type(
        f"B_{name}",
        (dcc.Backend,),
        {"name": name, "quantities": frozenset({"trace"}), "exact": True, "compute": compute},
    )


def _install(monkeypatch: pytest.MonkeyPatch, cls: type[dcc.Backend]) -> None:
    @hookimpl
    def register_backends(register):  # type: ignore[no-untyped-def]
        register(cls)

    plugin = types.ModuleType("tampering_plugin")
    plugin.register_backends = register_backends  # type: ignore[attr-defined]
    monkeypatch.setattr(registry, "_registry", Registry.build(extra_plugins=(plugin,)))


def _data_add(model: nn.Module) -> None:
    with torch.no_grad():
        next(iter(model.parameters())).data.add_(1.0)  # bypasses the version counter


def _in_place_no_grad(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)


def _swap_elements(model: nn.Module) -> None:
    with torch.no_grad():
        w = next(iter(model.parameters())).data.view(-1)
        w[0], w[1] = w[1].clone(), w[0].clone()  # same values, other places


def _replace_parameter(model: nn.Module) -> None:
    name, p = next(iter(model.named_parameters()))
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner), attr, nn.Parameter(p.detach() + 1.0))


@pytest.mark.parametrize(
    "tamper",
    [_data_add, _in_place_no_grad, _swap_elements, _replace_parameter],
    ids=lambda f: f.__name__.strip("_"),
)
def test_a_backend_changing_parameters_fails_naming_it_and_the_model_is_restored(
    monkeypatch: pytest.MonkeyPatch, tamper: Callable[[nn.Module], None]
) -> None:
    _install(monkeypatch, _tampering_backend("tamperer", tamper))
    model, loss_fn, batch = get_case("mlp").make()
    before = snapshot(model)
    with pytest.raises(BackendFailedError) as info:
        dcc.estimate(model, loss_fn, batch, "trace", "tamperer")
    message = str(info.value)
    assert "\n" not in message
    assert "backend 'tamperer' (plugin tampering_plugin) changed the model's parameters" in message
    assert "restored" in message and "NOT" not in message
    assert_unchanged(before, model)


def test_a_model_too_large_to_copy_is_reported_as_not_restored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _install(monkeypatch, _tampering_backend("tamperer", _data_add))
    monkeypatch.setattr(problem_module, "PARAMETER_BACKUP_BYTES", 0)
    model, loss_fn, batch = get_case("mlp").make()
    with pytest.raises(BackendFailedError, match=r"NOT restored .* reload the model"):
        dcc.estimate(model, loss_fn, batch, "trace", "tamperer")


@pytest.mark.parametrize("backend", ["pyhessian", "hutchpp", "backpack"])
def test_the_builtin_backends_pass_the_parameter_guard(backend: str) -> None:
    if not dcc.get_backend(backend).availability().available:
        pytest.skip(f"{backend} is not installed")
    model, loss_fn, batch = get_case("mlp").make()
    before = snapshot(model)
    dcc.estimate(model, loss_fn, batch, "trace", backend)
    assert_unchanged(before, model)


def test_a_forward_that_changes_its_own_parameters_is_named() -> None:
    class Clipping(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                self.fc.weight.clamp_(-0.01, 0.01)
            return self.fc(x)

    model = Clipping()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    before = snapshot(model)
    with pytest.raises(BackendFailedError, match=r"the model's forward pass changed the model"):
        dcc.estimate(model, nn.CrossEntropyLoss(), (x, y))
    assert_unchanged(before, model)


def test_a_lazy_module_is_materialised_by_the_first_forward_not_reported() -> None:
    model = nn.Sequential(nn.LazyLinear(3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    result = dcc.estimate(model, nn.CrossEntropyLoss(), (x, y), "trace", "hutchpp", num_hvps=15)
    assert model[0].weight.shape == (3, 4) and result.value > 0


@pytest.mark.cuda
def test_on_cuda_a_tampering_backend_is_caught_and_the_parameters_restored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _install(monkeypatch, _tampering_backend("tamperer", _data_add))
    model, loss_fn, (x, y) = get_case("mlp").make()
    model = model.cuda()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(BackendFailedError, match="have been restored"):
        dcc.estimate(model, loss_fn, (x.cuda(), y.cuda()), "trace", "tamperer")
    for p, v in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), v)
