"""Backend lookup: built once, did-you-mean, quantity support, the default backend."""

from __future__ import annotations

import threading

import pytest

import deconcnn_curvature as dcc
from deconcnn_curvature import registry
from deconcnn_curvature.backends.pyhessian import PyHessianBackend
from deconcnn_curvature.registry import (
    DEFAULT_BACKEND,
    ENV_BACKEND,
    Registry,
    default_backend_name,
    get_registry,
    reset_registry,
)


def _backend(name: str, quantities: set[str]) -> type[dcc.Backend]:
    def compute(self, problem, quantity, *, seed, options):  # pragma: no cover
        raise NotImplementedError

    return type(
        f"B_{name}",
        (dcc.Backend,),
        {"name": name, "quantities": frozenset(quantities), "compute": compute},
    )


def test_registry_is_built_once_and_reset_rebuilds_it() -> None:
    first = get_registry()
    assert get_registry() is first
    reset_registry()
    second = get_registry()
    assert second is not first and second.names() == first.names()


def test_concurrent_first_use_builds_one_registry() -> None:
    reset_registry()
    seen: list[Registry] = []
    threads = [threading.Thread(target=lambda: seen.append(get_registry())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(r) for r in seen}) == 1


def test_builtin_pyhessian_is_registered_through_the_hook() -> None:
    reg = get_registry()
    assert reg.get("pyhessian") is PyHessianBackend
    assert reg.entries["pyhessian"].plugin == "builtin:pyhessian"
    assert reg.names() == sorted(reg.names())


def test_did_you_mean_picks_the_closest_name() -> None:
    reg = Registry()
    for name in ("pyhessian", "hutchpp", "backpack"):
        reg._register(_backend(name, {"trace"}), "p")
    for typo, suggestion in [
        ("hutchp", "hutchpp"),
        ("PyHessian", "pyhessian"),
        ("backpak", "backpack"),
    ]:
        with pytest.raises(dcc.UnknownBackendError, match=f"Did you mean '{suggestion}'"):
            reg.get(typo)
    with pytest.raises(dcc.UnknownBackendError) as info:
        Registry().get("anything")
    assert "Known backends: (none)" in str(info.value)


def test_supporting_and_check_quantity() -> None:
    reg = Registry()
    reg._register(_backend("a", {"trace", "density"}), "p")
    reg._register(_backend("b", {"trace"}), "p")
    assert reg.supporting("trace") == ["a", "b"]
    assert reg.supporting("density") == ["a"]
    reg.check_quantity(reg.get("a"), "density")
    with pytest.raises(dcc.UnsupportedQuantityError, match=r"Backends that compute it: a\."):
        reg.check_quantity(reg.get("b"), "density")
    with pytest.raises(dcc.UnsupportedQuantityError, match="No registered backend computes it"):
        reg.check_quantity(reg.get("b"), "diagonal")


def test_describe_all_adds_plugin_and_marks_conflicts() -> None:
    reg = Registry()
    reg._register(_backend("x", {"trace"}), "first")
    reg._register(_backend("x", {"trace"}), "second")
    (row,) = reg.describe_all()
    assert row["plugin"] == "first" and row["available"] is False
    assert row["reason"] == "name registered by several plugins: first, second"
    assert reg.conflicts == {"x": ["first", "second"]}


def test_default_backend_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_backend_name() == DEFAULT_BACKEND == "pyhessian"
    monkeypatch.setenv(ENV_BACKEND, "hutchpp")
    assert default_backend_name() == "hutchpp"
    monkeypatch.setenv(ENV_BACKEND, "")  # empty means unset
    assert default_backend_name() == "pyhessian"


def test_process_registry_can_be_replaced_for_a_test(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = Registry()
    reg._register(_backend("only", {"trace"}), "p")
    registry.set_registry(reg)
    assert [r["name"] for r in dcc.list_backends()] == ["only"]
    with pytest.raises(dcc.UnknownBackendError, match="Known backends: only"):
        dcc.get_backend("pyhessian")
