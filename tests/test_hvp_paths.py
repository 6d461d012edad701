"""Every way of computing one Hessian-vector product (``HessianOperator(hvp_path=...)``)
gives the products of a dense Hessian built by plain double-backward autograd: BatchNorm in eval
mode, frozen and unused parameters, a negative-curvature loss, several batches (graphs retained
or rebuilt), probes one at a time and in blocks, Dropout in train mode, and the environment
variable that forces a path."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from cases import CASES, Case, get_case
from torch import nn

import deconcnn_curvature as dcc
from deconcnn_curvature.errors import InvalidOptionError
from deconcnn_curvature.hvp import ENV_HVP_PATH, HVP_PATHS, HessianOperator, resolve_hvp_path
from deconcnn_curvature.problem import build_problem, preserve_state

ROOT = Path(__file__).resolve().parent.parent
CASE_IDS = [c.id for c in CASES]


def double_backward_hessian(
    model: nn.Module, loss_fn: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Ground truth: differentiate each entry of the flat gradient of the sample-weighted mean
    loss once more (one row per parameter entry); unused parameters give zero rows."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(len(y) for _, y in batches)
    loss = sum(loss_fn(model(x), y) * (len(y) / total) for x, y in batches)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    flat = torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )
    rows = []
    for i in range(flat.numel()):
        if not flat[i].requires_grad:
            rows.append(torch.zeros_like(flat))
            continue
        row = torch.autograd.grad(flat[i], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (r if r is not None else torch.zeros_like(p)).reshape(-1)
                    for r, p in zip(row, params, strict=True)
                ]
            )
        )
    return torch.stack(rows).detach()


def _split(batch: tuple[torch.Tensor, torch.Tensor], parts: int) -> list:
    x, y = batch
    return list(zip(x.chunk(parts), y.chunk(parts), strict=True))


def _operator_matrix(
    case: Case, path: str, *, probe_batch: int = 1, parts: int = 1, retain: bool = False
) -> tuple[torch.Tensor, torch.Tensor, HessianOperator]:
    model, loss_fn, batch = case.make()
    batches = _split(batch, parts)
    with preserve_state(model):
        exact = double_backward_hessian(model, loss_fn, batches)
    problem = build_problem(model, loss_fn, batches)
    with preserve_state(model):
        op = HessianOperator(problem, probe_batch=probe_batch, retain_graphs=retain, hvp_path=path)
        eye = torch.eye(problem.dim, dtype=problem.dtype)
        got = op.matmat(eye)
        op.close()
    return got, exact, op


def test_the_ground_truth_agrees_with_the_case_table() -> None:
    """The double-backward dense Hessian is the same matrix as tests/cases.py's."""
    for case in CASES:
        model, loss_fn, batch = case.make()
        torch.testing.assert_close(double_backward_hessian(model, loss_fn, [batch]), case.exact)


@pytest.mark.parametrize("path", HVP_PATHS)
@pytest.mark.parametrize("case_id", CASE_IDS)
@pytest.mark.parametrize("probe_batch", [1, 4], ids=["seq", "block4"])
def test_every_path_multiplies_by_the_dense_hessian(
    case_id: str, path: str, probe_batch: int
) -> None:
    got, exact, op = _operator_matrix(get_case(case_id), path, probe_batch=probe_batch)
    assert op.hvp_path == path
    torch.testing.assert_close(got, exact, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("path", HVP_PATHS)
@pytest.mark.parametrize("retain", [False, True], ids=["rebuild", "retain"])
@pytest.mark.parametrize("case_id", ["cnn_bn_eval", "unused_param"])
def test_every_path_with_several_batches(case_id: str, path: str, retain: bool) -> None:
    got, exact, _ = _operator_matrix(get_case(case_id), path, probe_batch=3, parts=3, retain=retain)
    torch.testing.assert_close(got, exact, rtol=1e-9, atol=1e-10)


class _DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("probe_batch", [1, 4])
def test_forward_over_reverse_replays_the_dropout_masks(probe_batch: int) -> None:
    """Measured in train mode, each product of forward-over-reverse runs its own forward pass:
    the RNG state is replayed so every product sees the masks of the double backward's graph,
    and the operator stays one fixed symmetric matrix."""
    torch.manual_seed(0)
    model = _DropoutNet().double()
    x = torch.randn(10, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    problem = build_problem(model, nn.CrossEntropyLoss(), (x, y), eval_mode=False)
    mats = {}
    with preserve_state(model):
        for path in HVP_PATHS:
            op = HessianOperator(problem, probe_batch=probe_batch, hvp_path=path)
            mats[path] = op.matmat(torch.eye(problem.dim, dtype=torch.float64))
    torch.testing.assert_close(mats["forward_over_reverse"], mats["double_backward"])
    torch.testing.assert_close(mats["forward_over_reverse"], mats["forward_over_reverse"].T)


@pytest.mark.parametrize("path", HVP_PATHS)
@pytest.mark.parametrize("probe_batch", [1, 4], ids=["seq", "block4"])
def test_every_path_with_batchnorm_in_train_mode(path: str, probe_batch: int) -> None:
    """``eval_mode=False``: BatchNorm normalises with the batch statistics and updates its
    running statistics in place at every forward pass, which torch.func refuses on a captured
    buffer; the forward-over-reverse path updates copies instead. Products equal the dense
    Hessian of the train-mode loss; the buffers are untouched."""
    model, loss_fn, batch = get_case("cnn_bn_eval").make()
    model.train()
    before = copy.deepcopy(model.state_dict())
    with preserve_state(model):
        exact = double_backward_hessian(model, loss_fn, [batch])
    problem = build_problem(model, loss_fn, batch, eval_mode=False)
    with preserve_state(model):
        op = HessianOperator(problem, probe_batch=probe_batch, hvp_path=path)
        got = op.matmat(torch.eye(problem.dim, dtype=problem.dtype))
    torch.testing.assert_close(got, exact, rtol=1e-9, atol=1e-10)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_the_environment_variable_forces_a_path_and_training_is_undisturbed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, loss_fn, batch = get_case("cnn_bn_eval").make()
    model.train()
    before = copy.deepcopy(model.state_dict())
    results = {}
    for path in ("auto", *HVP_PATHS):
        monkeypatch.setenv(ENV_HVP_PATH, path)
        results[path] = dcc.estimate(model, loss_fn, batch, "trace", seed=3, num_hvps=6)
    assert model.training and all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    values = [r.value for r in results.values()]
    assert values == pytest.approx([values[0]] * len(values), rel=1e-10)


def test_default_path_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_HVP_PATH, raising=False)
    for device in ("cpu", "cuda"):
        assert resolve_hvp_path(None, torch.device(device)) == "double_backward"
    monkeypatch.setenv(ENV_HVP_PATH, "Forward-Over-Reverse")
    assert resolve_hvp_path(None, torch.device("cpu")) == "forward_over_reverse"
    assert resolve_hvp_path("double_backward", torch.device("cpu")) == "double_backward"


def test_an_unknown_path_is_named_with_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_HVP_PATH, "reverse_over_forward")
    model, loss_fn, batch = get_case("mlp").make()
    with pytest.raises(InvalidOptionError) as info:
        dcc.estimate(model, loss_fn, batch, "trace", seed=0, num_hvps=2)
    message = str(info.value)
    assert ENV_HVP_PATH in message and "'reverse_over_forward'" in message
    assert "auto, double_backward, forward_over_reverse" in message


def test_peak_memory_of_hutchpp_is_within_1_5x_of_pyhessian() -> None:
    """Hutchpp's peak memory against raw PyHessian's on the same batch, each measured
    in a fresh process (peak resident memory above the level before the call, sampled every
    millisecond). The README's compare table read 449 vs 104 MiB because PyHessian ran second in
    the same process and reused the memory hutchpp's run had freed; measured apart, the rest of
    the gap was the import of ``scipy.stats`` for two quantiles (195 vs 130 MiB here before,
    ~134 vs ~128 after). The default path (double backward) is measured: forward-over-reverse's
    first call also loads torch.func's machinery (~+60 MiB), see benchmarks/hvp_paths.py."""
    path = "double_backward"
    script = textwrap.dedent(
        f"""
        import json, os, sys, threading
        import torch
        from torch import nn
        torch.set_num_threads(1)
        os.environ[{ENV_HVP_PATH!r}] = {path!r}
        import deconcnn_curvature as dcc
        from pyhessian import hessian
        from deconcnn_curvature.training.resnet_cifar import small_cnn

        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

        torch.manual_seed(0)
        model = small_cnn(width=16).eval()
        x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
        loss_fn = nn.CrossEntropyLoss()
        which = sys.argv[1]
        base = rss(); peak = [base]; stop = threading.Event()
        def sample():
            while not stop.wait(0.001):
                peak[0] = max(peak[0], rss())
        t = threading.Thread(target=sample, daemon=True); t.start()
        if which == "hutchpp":
            dcc.estimate(model, loss_fn, (x, y), "trace", "hutchpp", seed=0, num_hvps=20)
        else:
            hessian(model, loss_fn, data=(x, y), cuda=False).trace(maxIter=20, tol=0.0)
        stop.set(); t.join()
        print(json.dumps(max(peak[0], rss()) - base))
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DECONCNN_CURVATURE_PLUGINS": ""}

    def peak(which: str) -> int:
        proc = subprocess.run(
            [sys.executable, "-c", script, which],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return int(proc.stdout.strip().splitlines()[-1])

    ours, theirs = peak("hutchpp"), peak("pyhessian")
    assert theirs > 20 * 2**20, theirs  # the measurement sees the gradient graph at all
    assert ours <= 1.5 * theirs, (ours / 2**20, theirs / 2**20)


@pytest.mark.cuda
@pytest.mark.parametrize("path", HVP_PATHS)
@pytest.mark.parametrize("probe_batch", [1, 4], ids=["seq", "block4"])
@pytest.mark.parametrize("case_id", ["cnn_bn_eval", "unused_param", "frozen_layer"])
def test_every_path_on_cuda_multiplies_by_the_dense_hessian(
    case_id: str, path: str, probe_batch: int
) -> None:
    case = get_case(case_id)
    model, loss_fn, (x, y) = case.make()
    device = torch.device("cuda:0")
    model.to(device)
    batches = [(x[:6].to(device), y[:6].to(device)), (x[6:].to(device), y[6:].to(device))]
    problem = build_problem(model, loss_fn, batches)
    v = torch.randn(problem.dim, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with preserve_state(model):
        op = HessianOperator(problem, probe_batch=probe_batch, hvp_path=path)
        hv = op.matmat(v.to(device))
        op.close()
    assert hv.device == device
    torch.testing.assert_close(hv.cpu(), case.exact @ v, rtol=1e-9, atol=1e-11)


@pytest.mark.distributed
def test_forward_over_reverse_under_a_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 gloo ranks with uneven shards, every distributed backend and quantity of
    tests/distributed's numerics scenario, products forced through forward-over-reverse: the
    same numbers as one process on the union with the default double backward."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with the gloo backend")
    from tests.distributed import _ranks

    monkeypatch.setenv(ENV_HVP_PATH, "forward_over_reverse")
    rank0, rank1 = (p["results"] for p in _ranks.launch("numerics", tmp_path, timeout=240.0))
    monkeypatch.delenv(ENV_HVP_PATH)
    assert rank0 and rank0 == rank1
    for key, got in rank0.items():
        backend, quantity, extra = key.split("/", 2)
        ref = _ranks.measure(backend, quantity, _ranks.union_batch(), **json.loads(extra))
        assert got["n_hvp"] == ref["n_hvp"], key
        value, expected = got["value"], ref["value"]
        if isinstance(expected, dict):
            value, expected = (
                value["nodes"] + value["weights"],
                expected["nodes"] + expected["weights"],
            )
        torch.testing.assert_close(
            torch.tensor(value, dtype=torch.float64),
            torch.tensor(expected, dtype=torch.float64),
            rtol=1e-8,
            atol=1e-10,
            msg=key,
        )
