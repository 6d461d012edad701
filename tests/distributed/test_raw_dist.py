"""Curvature under a real ``torch.distributed`` process group: 2 gloo processes on CPU.

Each rank holds an uneven shard of one seeded float64 problem (5 samples in one batch on rank 0,
11 in two batches on rank 1) and calls ``dcc.estimate`` with the same seed. What is proven:

* the distributed trace, eigenvalues and density equal a single process's on the concatenated
  shards (same seed, relative difference far below the required 1e-5), and the eigenvalues equal
  the dense Hessian's of the union — which differs from the unweighted mean of the two ranks'
  Hessians, so the sample-count weighting is what is tested;
* every rank returns bit-identical results (the same probes, the same branch decisions);
* a backend without distributed support refuses on every rank;
* a failure on one rank — in the loss, a non-finite loss, bad data, inside a backend before any
  collective or between two products — raises on *every* rank instead of hanging, the peers
  naming the failing rank and its reason, and the group stays usable afterwards.

A launch that does not finish within its deadline fails the test (see ``_ranks.launch``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from deconcnn_curvature.distributed import agree, rank_agreement
from tests.cases import dense_hessian
from tests.distributed import _ranks

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="needs torch.distributed with the gloo backend",
    ),
]


@pytest.fixture(scope="module")
def numerics(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return [p["results"] for p in _ranks.launch("numerics", tmp_path_factory.mktemp("dist"))]


@pytest.fixture(scope="module")
def failures(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _ranks.launch("failures", tmp_path_factory.mktemp("dist"))


def _single_process(key: str) -> dict[str, Any]:
    backend, quantity, extra = key.split("/", 2)
    return _ranks.measure(backend, quantity, _ranks.union_batch(), **json.loads(extra))


def _close(a: Any, b: Any, rtol: float = 1e-9) -> None:
    torch.testing.assert_close(
        torch.tensor(a, dtype=torch.float64),
        torch.tensor(b, dtype=torch.float64),
        rtol=rtol,
        atol=0,
    )


def test_the_shards_are_uneven_and_cover_the_union() -> None:
    sizes = {r: sum(b - a for a, b in spans) for r, spans in _ranks.SHARDS.items()}
    assert sizes == {0: 5, 1: 11}
    assert len(_ranks.SHARDS[1]) == 2
    assert len(_ranks.union_batch()[1]) == _ranks.N_SAMPLES


def test_every_rank_returns_bit_identical_results(numerics: list[dict[str, Any]]) -> None:
    rank0, rank1 = numerics
    assert rank0, "no distributed backend was measured"
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        # JSON floats round-trip exactly, so == is a bitwise comparison.
        assert rank0[key] == rank1[key], key


@pytest.mark.parametrize("backend", ["pyhessian", "hutchpp"])
def test_distributed_equals_single_process_on_the_union(
    numerics: list[dict[str, Any]], backend: str
) -> None:
    keys = [k for k in numerics[0] if k.startswith(f"{backend}/")]
    if not keys:
        pytest.skip(f"backend {backend!r} is not registered with distributed support yet")
    for key in keys:
        dist_result = numerics[0][key]
        single = _single_process(key)
        assert dist_result["n_hvp"] == single["n_hvp"], key
        assert dist_result["seed"] == single["seed"] == _ranks.SEED
        value, ref = dist_result["value"], single["value"]
        if isinstance(ref, dict):  # a density: same quadrature nodes and weights
            _close(value["nodes"], ref["nodes"])
            _close(value["weights"], ref["weights"])
        else:
            _close(value, ref)
        if single.get("stderr") is not None:
            _close(dist_result["stderr"], single["stderr"])
        if single.get("layers"):
            _close(list(dist_result["layers"].values()), list(single["layers"].values()))


def test_eigenvalues_are_those_of_the_union_not_of_the_mean_of_shards(
    numerics: list[dict[str, Any]],
) -> None:
    model, loss = _ranks.make_model(), _ranks.loss_fn()
    union = torch.linalg.eigvalsh(dense_hessian(model, loss, [_ranks.union_batch()]))
    per_rank = [dense_hessian(model, loss, _ranks.local_batches(r)) for r in sorted(_ranks.SHARDS)]
    unweighted = torch.linalg.eigvalsh((per_rank[0] + per_rank[1]) / 2)
    top = torch.flip(union, [0])[:2]
    # The weighting matters on these shards (so the comparison below can fail):
    assert abs(float(unweighted[-1] - union[-1])) > 1e-3 * abs(float(union[-1]))
    measured = numerics[0]["pyhessian/eigenvalues/{}"]["value"]
    torch.testing.assert_close(torch.tensor(measured, dtype=torch.float64), top, rtol=1e-8, atol=0)


def test_a_backend_without_support_refuses_on_every_rank(failures: list[dict[str, Any]]) -> None:
    for rank, outcome in enumerate(failures):
        refused = outcome["refuse"]
        assert refused["raised"] == "CurvatureError", (rank, refused)
        assert "'nodist' does not support torch.distributed" in refused["message"]
        assert "2 processes" in refused["message"]


_OWN_ERRORS = {
    "loss_raises_at_join": ("BackendFailedError", "injected: loss failed on rank 1 at call 1"),
    "loss_raises_mid_lanczos": ("BackendFailedError", "injected: loss failed on rank 1 at call 5"),
    "nan_on_one_rank": ("NonFiniteError", "the loss is nan"),
    "bad_data_on_one_rank": ("InvalidProblemError", "data holds no batches"),
    "backend_fails_early": ("BackendFailedError", "injected: early failure on rank 1"),
    "backend_fails_between_products": (
        "BackendFailedError",
        "injected: failure between products on rank 1",
    ),
}


@pytest.mark.parametrize("case", sorted(_OWN_ERRORS))
def test_a_failure_on_one_rank_raises_on_every_rank_without_hanging(
    failures: list[dict[str, Any]], case: str
) -> None:
    error, text = _OWN_ERRORS[case]
    failing = failures[1][case]
    assert failing["raised"] == error, failing
    assert text in failing["message"]
    peer = failures[0][case]
    assert peer["raised"] == "BackendFailedError", peer
    assert "1 of 2 ranks failed" in peer["message"]
    assert "rank 1:" in peer["message"] and text in peer["message"]


def test_the_group_stays_in_lockstep_after_failures(
    failures: list[dict[str, Any]], numerics: list[dict[str, Any]]
) -> None:
    after = [f["after"] for f in failures]
    assert after[0]["raised"] is None and after[1]["raised"] is None, after
    assert after[0]["value"] == after[1]["value"] == numerics[0]["pyhessian/eigenvalues/{}"]


def test_distributed_false_lets_one_rank_measure_its_own_shard_alone(
    tmp_path: Path,
) -> None:
    rank0, rank1 = _ranks.launch("local", tmp_path)
    assert rank1 == {}
    for backend, quantity in _ranks.LOCAL_PLAN:
        outcome = rank0[f"{backend}/{quantity}"]
        assert outcome["raised"] is None, (backend, quantity, outcome)
        single = _ranks.measure(backend, quantity, _ranks.local_batches(0))
        _close(outcome["value"]["value"], single["value"])
        assert "world_size" not in (outcome["value"]["details"] or {})
    # The shard's value is not the union's: the opt-out really measured local data.
    union = _ranks.measure("pyhessian", "trace", _ranks.union_batch())
    assert abs(rank0["pyhessian/trace"]["value"]["value"] - union["value"]) > 1e-6
    assert rank0["nan"]["raised"] == "NonFiniteError", rank0["nan"]


def test_every_rank_uses_rank_zeros_seed(tmp_path: Path) -> None:
    """seed=None (or different seeds) on the ranks would sum products of different probes: the
    ranks agree on rank 0's seed, and the result is the single-process one on the union."""
    import deconcnn_curvature as dcc

    rank0, rank1 = _ranks.launch("seedless", tmp_path)
    assert rank0 and rank0 == rank1  # same seeds, bit-identical values
    for backend in _ranks.distributed_backends():
        assert rank0[f"{backend}/differ"]["seed"] == 11
        for name in ("none", "differ"):
            got = rank0[f"{backend}/{name}"]
            single = dcc.estimate(
                _ranks.make_model(), _ranks.loss_fn(), _ranks.union_batch(), "trace", backend,
                seed=got["seed"], num_hvps=12,
            )  # fmt: skip
            _close(got["value"], single.value)


def test_distributed_argument_is_checked() -> None:
    import deconcnn_curvature as dcc

    with pytest.raises(dcc.InvalidOptionError, match="distributed must be True, False or None"):
        dcc.estimate(_ranks.make_model(), _ranks.loss_fn(), _ranks.union_batch(), distributed="no")


def test_without_a_process_group_agreement_is_local() -> None:
    assert not dist.is_initialized()
    with rank_agreement() as agreement:
        assert agreement is None
    assert agree(None, 3.0) == 3.0
    with pytest.raises(RuntimeError, match="local"):
        agree(RuntimeError("local"), 1.0)
