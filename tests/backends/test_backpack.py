"""The optional ``backpack`` backend: exact Hessian diagonal and trace against dense Hessians.

The first tests run without BackPACK (they simulate its absence); every other test needs it and is
skipped cleanly, through ``pytest.importorskip``, where it is not installed.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import Case, dense_hessian, get_case
from torch import nn

import deconcnn_curvature as dcc
from deconcnn_curvature.backends.backpack import BackpackBackend, supported_layers
from deconcnn_curvature.registry import reset_registry

INSTALL = "pip install 'deconcnn-curvature[backpack]'"

try:  # BackPACK's own layer modules; the tests that use them need BackPACK anyway
    from backpack.custom_module.pad import Pad
    from backpack.custom_module.slicing import Slicing
except ImportError:  # pragma: no cover - without BackPACK
    Pad = Slicing = None


@pytest.fixture
def bp() -> object:
    return pytest.importorskip("backpack")


# -- without BackPACK --------------------------------------------------------------------------
def test_absent_backpack_is_listed_unavailable_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "backpack", None)  # find_spec now reports it missing
    reset_registry()
    row = next(r for r in dcc.list_backends() if r["name"] == "backpack")
    assert row["available"] is False
    assert row["reason"] == "missing module(s): backpack"
    assert row["install"] == INSTALL
    assert row["quantities"] == ["diagonal", "trace"]
    assert row["exact"] is True
    model, loss_fn, batch = get_case("mlp").make()
    for quantity in ("trace", "diagonal"):
        with pytest.raises(dcc.BackendUnavailableError) as err:
            dcc.estimate(model, loss_fn, batch, quantity, backend="backpack")
        assert INSTALL in str(err.value) and "backpack" in str(err.value)


@pytest.mark.slow
def test_module_imports_and_registers_without_backpack() -> None:
    code = (
        "import sys; sys.modules['backpack'] = None\n"
        "import deconcnn_curvature.backends.backpack as m\n"
        "import deconcnn_curvature as dcc\n"
        "row = next(r for r in dcc.list_backends() if r['name'] == 'backpack')\n"
        "assert row['available'] is False, row\n"
        "assert 'backpack' not in {k for k, v in sys.modules.items() if v is not None}\n"
        "print('ok')\n"
    )
    env = {**os.environ, "DECONCNN_CURVATURE_PLUGINS": ""}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# -- helpers -----------------------------------------------------------------------------------
def _diag_of(result: dcc.CurvatureResult) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in result.value.values()])


def _assert_exact(model, loss_fn, batches, *, rtol: float = 1e-5) -> dcc.CurvatureResult:
    """Trace and diagonal from the backend equal the dense Hessian's (relative error <= rtol)."""
    data = batches[0] if len(batches) == 1 else batches
    dense_model = copy.deepcopy(model).double().eval()
    dense_batches = [(x.double(), y.double() if y.is_floating_point() else y) for x, y in batches]
    h = dense_hessian(dense_model, loss_fn, dense_batches)
    exact_diag = h.diagonal()
    tr = dcc.estimate(model, loss_fn, data, "trace", backend="backpack")
    dg = dcc.estimate(model, loss_fn, data, "diagonal", backend="backpack")
    assert tr.exact and tr.stderr == 0.0 and tr.n_hvp == 0 and tr.method == "backpack-diag-hessian"
    assert abs(tr.value - exact_diag.sum().item()) <= rtol * abs(exact_diag.sum().item())
    got = _diag_of(dg).double()
    assert got.shape == exact_diag.shape
    torch.testing.assert_close(got, exact_diag, rtol=0, atol=rtol * exact_diag.abs().max().item())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(dg.value) == names
    for (_, p), d in zip(
        [(n, p) for n, p in model.named_parameters() if p.requires_grad],
        dg.value.values(),
        strict=True,
    ):
        assert d.shape == p.shape and d.dtype == p.dtype
    assert list(tr.layers) == names
    assert sum(tr.layers.values()) == pytest.approx(tr.value, rel=1e-12, abs=1e-12)
    return tr


def _mse_case() -> Case:
    return Case(
        "mse", lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), (6,), "mse"
    )


# -- exactness ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case_id", ["mlp", "cnn", "frozen_layer", "unused_param", "mse"])
def test_trace_and_diagonal_equal_the_dense_hessian(bp, case_id: str) -> None:
    case = _mse_case() if case_id == "mse" else get_case(case_id)
    model, loss_fn, batch = case.make()
    _assert_exact(model, loss_fn, [batch])


def test_diagonal_of_an_unused_parameter_is_zero(bp) -> None:
    model, loss_fn, batch = get_case("unused_param").make()
    r = dcc.estimate(model, loss_fn, batch, "diagonal", backend="backpack")
    assert torch.equal(r.value["unused"], torch.zeros(4, dtype=torch.float64))


def test_several_batches_equal_the_concatenated_batch(bp) -> None:
    model, loss_fn, (x, y) = get_case("cnn").make()
    parts = list(zip(x.split([5, 4, 3]), y.split([5, 4, 3]), strict=True))
    whole = dcc.estimate(model, loss_fn, (x, y), "diagonal", backend="backpack")
    split = dcc.estimate(model, loss_fn, parts, "diagonal", backend="backpack")
    torch.testing.assert_close(_diag_of(split), _diag_of(whole), rtol=1e-12, atol=1e-14)
    _assert_exact(model, loss_fn, parts)


def test_deconcnn_small_cnn_in_float32(bp) -> None:
    """The deconCNN-shaped plain CNN (norm_type none: Identity, ReLU, MaxPool, AdaptiveAvgPool)."""
    from deconcnn_curvature.training.resnet_cifar import small_cnn

    torch.manual_seed(0)
    model = small_cnn(num_classes=4, width=4).eval()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 4, (6,), generator=g))
    _assert_exact(model, nn.CrossEntropyLoss(), [batch])


_D64, _F32 = torch.float64, torch.float32


def _conv2(mid: nn.Module, feat: int) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.Tanh(), mid, nn.Flatten(), nn.Linear(feat, 3)
    )


def _mlp(act: nn.Module) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(nn.Linear(6, 5), act, nn.Linear(5, 3))


#: A tiny model around each supported layer type (with its input shape and dtype).
ZOO: dict[type[nn.Module], tuple[Callable[[], nn.Module], tuple[int, ...], torch.dtype]] = {
    nn.Linear: (_mlp(nn.Tanh()), (6,), _D64),
    nn.Conv1d: (
        lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)),
        (2, 8),
        _D64,
    ),
    nn.Conv2d: (_conv2(nn.Identity(), 48), (2, 6, 6), _D64),
    nn.Conv3d: (
        lambda: nn.Sequential(nn.Conv3d(2, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)),
        (2, 4, 4, 4),
        _D64,
    ),
    nn.ConvTranspose1d: (
        lambda: nn.Sequential(
            nn.ConvTranspose1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(30, 3)
        ),
        (2, 8),
        _D64,
    ),
    nn.ConvTranspose2d: (
        lambda: nn.Sequential(
            nn.ConvTranspose2d(2, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)
        ),
        (2, 3, 3),
        _D64,
    ),
    nn.ReLU: (_mlp(nn.ReLU()), (6,), _D64),
    nn.LeakyReLU: (_mlp(nn.LeakyReLU(0.2)), (6,), _D64),
    nn.Sigmoid: (_mlp(nn.Sigmoid()), (6,), _D64),
    nn.Tanh: (_mlp(nn.Tanh()), (6,), _D64),
    nn.ELU: (_mlp(nn.ELU()), (6,), _D64),
    nn.SELU: (_mlp(nn.SELU()), (6,), _D64),
    nn.LogSigmoid: (_mlp(nn.LogSigmoid()), (6,), _D64),
    nn.Flatten: (_conv2(nn.Identity(), 48), (2, 6, 6), _D64),
    nn.MaxPool1d: (
        lambda: nn.Sequential(
            nn.Conv1d(2, 3, 3), nn.Tanh(), nn.MaxPool1d(2), nn.Flatten(), nn.Linear(9, 3)
        ),
        (2, 8),
        _D64,
    ),
    nn.MaxPool2d: (_conv2(nn.MaxPool2d(2), 12), (2, 6, 6), _D64),
    nn.MaxPool3d: (
        lambda: nn.Sequential(
            nn.Conv3d(2, 2, 3), nn.Tanh(), nn.MaxPool3d(2), nn.Flatten(), nn.Linear(2, 3)
        ),
        (2, 4, 4, 4),
        _D64,
    ),
    nn.AvgPool1d: (
        lambda: nn.Sequential(
            nn.Conv1d(2, 3, 3), nn.Tanh(), nn.AvgPool1d(2), nn.Flatten(), nn.Linear(9, 3)
        ),
        (2, 8),
        _F32,
    ),
    nn.AvgPool2d: (_conv2(nn.AvgPool2d(2), 12), (2, 6, 6), _F32),
    nn.AdaptiveAvgPool1d: (
        lambda: nn.Sequential(
            nn.Conv1d(2, 3, 3),
            nn.Tanh(),
            nn.AdaptiveAvgPool1d(3),
            nn.Flatten(),
            nn.Linear(9, 3),
        ),
        (2, 8),
        _F32,
    ),
    nn.AdaptiveAvgPool2d: (_conv2(nn.AdaptiveAvgPool2d(2), 12), (2, 6, 6), _F32),
    nn.Dropout: (_conv2(nn.Dropout(0.3), 48), (2, 6, 6), _D64),
    nn.ZeroPad2d: (
        lambda: nn.Sequential(
            nn.ZeroPad2d(1), nn.Conv2d(2, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(72, 3)
        ),
        (2, 6, 6),
        _D64,
    ),
    nn.Identity: (_conv2(nn.Identity(), 48), (2, 6, 6), _D64),
    nn.ConvTranspose3d: (
        lambda: nn.Sequential(
            nn.ConvTranspose3d(2, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(54, 3)
        ),
        (2, 2, 2, 2),
        _D64,
    ),
    nn.AvgPool3d: (
        lambda: nn.Sequential(
            nn.Conv3d(2, 2, 2), nn.Tanh(), nn.AvgPool3d(2), nn.Flatten(), nn.Linear(2, 3)
        ),
        (2, 3, 3, 3),
        _F32,
    ),
    nn.AdaptiveAvgPool3d: (
        lambda: nn.Sequential(
            nn.Conv3d(2, 2, 2),
            nn.Tanh(),
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
            nn.Linear(2, 3),
        ),
        (2, 3, 3, 3),
        _F32,
    ),
}
if Pad is not None:
    ZOO[Pad] = (
        lambda: nn.Sequential(
            Pad((1, 2), mode="reflect"),
            nn.Conv1d(2, 2, 3),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(14, 3),
        ),
        (2, 6),
        _D64,
    )
    ZOO[Slicing] = (
        lambda: nn.Sequential(
            nn.Linear(6, 6), nn.Sigmoid(), Slicing((slice(None), slice(1, 5))), nn.Linear(4, 3)
        ),
        (6,),
        _D64,
    )


def test_every_supported_layer_has_a_dense_check(bp) -> None:
    assert set(ZOO) == set(supported_layers())


@pytest.mark.parametrize("layer", list(ZOO), ids=lambda t: t.__name__)
def test_each_supported_layer_is_exact(bp, layer: type[nn.Module]) -> None:
    build, shape, dtype = ZOO[layer]
    torch.manual_seed(0)
    model = build().to(dtype).eval()
    assert any(type(m) is layer for m in model.modules())
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(5, *shape, generator=g).to(dtype), torch.randint(0, 3, (5,), generator=g))
    _assert_exact(model, nn.CrossEntropyLoss(), [batch])


_AVG_POOLS = [
    (nn.AvgPool1d(2), nn.Conv1d(2, 2, 3), (2, 8)),
    (nn.AvgPool2d(2), nn.Conv2d(2, 2, 3), (2, 6, 6)),
    (nn.AvgPool3d(2), nn.Conv3d(2, 2, 3), (2, 4, 4, 4)),
    (nn.AdaptiveAvgPool1d(2), nn.Conv1d(2, 2, 3), (2, 8)),
    (nn.AdaptiveAvgPool2d(2), nn.Conv2d(2, 2, 3), (2, 6, 6)),
    (nn.AdaptiveAvgPool3d(1), nn.Conv3d(2, 2, 3), (2, 4, 4, 4)),
]


def _raw_backpack(model: nn.Module, loss_fn: nn.Module, x, y) -> torch.Tensor:
    """BackPACK 1.7.1 alone (a copy of the model extended in place): its Hessian diagonal."""
    from backpack import backpack, extend
    from backpack.extensions import DiagHessian

    m, lf = extend(copy.deepcopy(model)), extend(copy.deepcopy(loss_fn))
    with backpack(DiagHessian()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        lf(m(x), y).backward()
    return torch.cat([p.diag_h.reshape(-1) for p in m.parameters()])


@pytest.mark.parametrize(("pool", "conv", "shape"), _AVG_POOLS, ids=lambda v: type(v).__name__)
def test_avg_pool_in_float64_is_refused_because_backpack_itself_fails(bp, pool, conv, shape):
    model = nn.Sequential(conv, pool, nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(3, *shape)
    model(x)  # materialise the lazy layer
    model = nn.Sequential(*[m for m in model]).double()
    x, y = x.double(), torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="expected scalar type Double but found Float"):
        _raw_backpack(model, nn.CrossEntropyLoss(), x, y)
    name = type(pool).__name__
    with pytest.raises(dcc.UnsupportedModelError, match=rf"'1' \({name}\).*fails in float64"):
        BackpackBackend.validate_model(model)
    BackpackBackend.validate_model(model.float())


# -- what BackPACK computes although older versions of this backend refused it -----------------
def _bce_problem() -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    return model, nn.BCEWithLogitsLoss(), (x, torch.randint(0, 2, (6, 1), generator=g).double())


def test_a_bare_layer_as_the_whole_model_is_exact(bp) -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (7,)))
    r = _assert_exact(model, nn.CrossEntropyLoss(), [batch], rtol=1e-10)
    assert "verify_hvps" not in r.details  # checked statically: nothing to verify


def test_bce_with_logits_with_one_output_is_exact(bp) -> None:
    model, loss_fn, batch = _bce_problem()
    _assert_exact(model, loss_fn, [batch], rtol=1e-10)


def test_bce_with_logits_with_several_outputs_is_refused_with_the_shape(bp) -> None:
    model, loss_fn, (x, _) = _bce_problem()
    model[2] = nn.Linear(3, 2).double()
    y = torch.zeros(6, 2, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="scalar-valued"):
        _raw_backpack(model, loss_fn, x, y)
    with pytest.raises(dcc.UnsupportedModelError, match=r"shape \(batch, 1\).*\(6, 2\)"):
        dcc.estimate(model, loss_fn, (x, y), backend="backpack")


def test_bce_with_logits_with_pos_weight_is_refused(bp) -> None:
    model, _, batch = _bce_problem()
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.ones(1, dtype=torch.float64))
    with pytest.raises(dcc.UnsupportedModelError, match=r"pos_weight=True"):
        dcc.estimate(model, loss_fn, batch, backend="backpack")


# -- layers BackPACK maps but computes wrongly or not at all ------------------------------------
def _conv_head(conv: nn.Module, feat: int) -> nn.Module:
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(feat, 3)).double()


LIMITATIONS = [
    pytest.param(
        lambda: _conv_head(nn.Conv1d(2, 2, 3, padding=1, padding_mode="reflect"), 12),
        (2, 6),
        "wrong",
        r"padding_mode='reflect'.*wrong diagonal",
        id="conv-reflect",
    ),
    pytest.param(
        lambda: _conv_head(nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"), 50),
        (2, 5, 5),
        "wrong",
        r"padding_mode='circular'",
        id="conv-circular",
    ),
    pytest.param(
        lambda: nn.Sequential(
            nn.Conv2d(2, 2, 2),
            nn.Tanh(),
            nn.AvgPool2d(2, divisor_override=3),
            nn.Flatten(),
            nn.Linear(8, 3),
        ).float(),
        (2, 5, 5),
        "wrong",
        r"divisor_override=3.*wrong diagonal",
        id="avgpool-divisor-override",
    ),
    pytest.param(
        lambda: _conv_head(nn.Conv2d(2, 2, 3, padding="same"), 50),
        (2, 5, 5),
        "fails",
        r"padding='same'.*numeric padding",
        id="conv-padding-same",
    ),
    pytest.param(
        lambda: _conv_head(nn.ConvTranspose2d(2, 2, 3, stride=2, output_padding=1), 128),
        (2, 3, 3),
        "fails",
        r"output_padding=\(1, 1\)",
        id="conv-transpose-output-padding",
    ),
]


@pytest.mark.parametrize(("build", "shape", "raw", "pattern"), LIMITATIONS)
def test_a_layer_backpack_gets_wrong_or_fails_on_is_refused_with_the_reason(
    bp, build, shape, raw: str, pattern: str
) -> None:
    torch.manual_seed(0)
    model = build()
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, *shape, generator=g).to(dtype)
    y = torch.randint(0, 3, (5,), generator=g)
    if raw == "wrong":  # the reason is true: BackPACK alone returns a wrong diagonal
        dense = dense_hessian(
            copy.deepcopy(model).double(), nn.CrossEntropyLoss(), [(x.double(), y)]
        )
        got = _raw_backpack(model, nn.CrossEntropyLoss(), x, y).double()
        assert (got - dense.diagonal()).abs().max() > 1e-2 * dense.diagonal().abs().max()
    else:
        with pytest.raises((RuntimeError, TypeError)):
            _raw_backpack(model, nn.CrossEntropyLoss(), x, y)
    with pytest.raises(dcc.UnsupportedModelError, match=pattern) as err:
        dcc.estimate(model, nn.CrossEntropyLoss(), (x, y), backend="backpack")
    assert "backend='pyhessian'" in str(err.value)


def test_soft_cross_entropy_targets_must_sum_to_one(bp) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    p = torch.rand(5, 3, generator=g, dtype=torch.float64)
    loss_fn = nn.CrossEntropyLoss()
    _assert_exact(model, loss_fn, [(x, p / p.sum(1, keepdim=True))], rtol=1e-10)
    # Unnormalised: the Hessian scales with each row's sum, BackPACK's rule assumes 1.
    dense = dense_hessian(model, loss_fn, [(x, p)]).diagonal()
    raw = _raw_backpack(model, loss_fn, x, p)
    assert (raw - dense).abs().max() > 0.1 * dense.abs().max()
    with pytest.raises(dcc.UnsupportedModelError, match=r"sum to 1 over the classes.*batch 0"):
        dcc.estimate(model, loss_fn, (x, p), backend="backpack")


def test_an_error_inside_backpacks_backward_is_reported_as_an_unsupported_model(bp) -> None:
    # AdaptiveAvgPool2d whose input size is no multiple of its output: BackPACK's rule raises.
    model = nn.Sequential(
        nn.Conv2d(2, 2, 2), nn.Tanh(), nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(18, 3)
    )
    x, y = torch.randn(4, 2, 6, 6), torch.tensor([0, 1, 2, 0])
    with pytest.raises(dcc.UnsupportedModelError, match=r"at layer '2' \(AdaptiveAvgPool2d\)"):
        dcc.estimate(model, nn.CrossEntropyLoss(), (x, y), backend="backpack")


# -- models the converter or the checks handle ------------------------------------------------
class _FlattenCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(48, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.act(self.conv(x)), 1))


class _ReusedActivation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.act = nn.Tanh()
        self.fc1 = nn.Linear(48, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv(x)).flatten(1)
        return self.fc2(self.act(self.fc1(h)))


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten())
        self.fc = nn.Linear(48, 3)
        self.functional = functional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if float(h.detach().sum()) > 1e9:  # never true; forces eager execution
            h = h * 0
        if self.functional:
            h = F.softplus(h)  # invisible to BackPACK
        return self.fc(h)


def _cnn_batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return (
        torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (n,), generator=g),
    )


@pytest.mark.parametrize("cls", [_FlattenCall, _ReusedActivation])
def test_custom_forward_goes_through_the_converter(bp, cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = cls().double().eval()
    r = _assert_exact(model, nn.CrossEntropyLoss(), [_cnn_batch()])
    assert r.details["converter"] is True and r.details["traced"] is True
    if cls is _FlattenCall:
        assert model.act.inplace is True  # switched off in the copy only


def test_untraceable_model_is_verified_against_autograd_then_exact(bp) -> None:
    torch.manual_seed(0)
    model = _Untraceable().double().eval()
    r = _assert_exact(model, nn.CrossEntropyLoss(), [_cnn_batch()])
    assert r.details["traced"] is False and "untraced_reason" in r.details
    assert r.details["verify_hvps"] == 4 and r.details["verify_max_rel_error"] < 1e-8


def test_untraceable_model_with_an_invisible_op_is_refused(bp) -> None:
    torch.manual_seed(0)
    model = _Untraceable(functional=True).double().eval()
    with pytest.raises(dcc.UnsupportedModelError, match=r"pyhessian.*hutchpp"):
        dcc.estimate(model, nn.CrossEntropyLoss(), _cnn_batch(), backend="backpack")


def test_verify_option_reports_agreement(bp) -> None:
    model, loss_fn, batch = get_case("cnn").make()
    r = dcc.estimate(model, loss_fn, batch, backend="backpack", verify=True)
    assert r.details["verify_hvps"] == 4 and r.details["verify_max_rel_error"] < 1e-10


# -- refusals, before any work -----------------------------------------------------------------
class _TinyResNet(nn.Module):
    """Stem with BatchNorm, then one residual block (BatchNorm variant) or without norms."""

    def __init__(self, bn: bool) -> None:
        super().__init__()
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
        self.stem = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), norm(4), nn.ReLU())
        self.block = _Block(norm)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))


class _Block(nn.Module):
    def __init__(self, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = norm(4)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)) + x)


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 6)
        self.fc2.weight = self.fc1.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class _ReusedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(6, 6), nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.fc(x)))


class _RawParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale


class _TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x), x


def _resnet(norm_type: str) -> nn.Module:
    from deconcnn_curvature.training.resnet_cifar import resnet18_cifar

    return resnet18_cifar(width_mult=0.125, norm_type=norm_type)


REFUSALS = [
    pytest.param(lambda: _TinyResNet(bn=True), r"'stem\.1' \(BatchNorm2d\)", id="tiny-resnet-bn"),
    pytest.param(lambda: _TinyResNet(bn=False), r"'block' \(_Block\).*`\+`", id="tiny-resnet-sum"),
    pytest.param(lambda: _resnet("batchnorm"), r"'bn1' \(BatchNorm2d\)", id="resnet18-bn"),
    pytest.param(lambda: _resnet("none"), r"'layer1\.0' \(BasicBlock\).*residual", id="resnet18"),
    pytest.param(lambda: get_case("cnn_bn_eval").make()[0], r"'1' \(BatchNorm2d\)", id="bn-eval"),
    pytest.param(
        lambda: get_case("cnn_bn_eval").make()[0].train(), r"'1' \(BatchNorm2d\)", id="bn-train"
    ),
    pytest.param(_Functional, r"model's own forward.*relu", id="functional-relu"),
    pytest.param(_Tied, r"'fc2\.weight'.*'fc1\.weight'.*tied", id="tied"),
    pytest.param(_ReusedLinear, r"'fc' \(Linear\) is called 2 times", id="reused-linear"),
    pytest.param(_RawParameter, r"tensor attribute 'scale'", id="raw-parameter"),
    pytest.param(_TupleOut, r"returns a tuple", id="tuple-output"),
    pytest.param(
        lambda: nn.Sequential(nn.Linear(6, 4), nn.GELU(), nn.Linear(4, 3)),
        r"'1' \(GELU\) has no rule in BackPACK's DiagHessian",
        id="gelu",
    ),
]


@pytest.mark.parametrize(("build", "pattern"), REFUSALS)
def test_unsupported_model_is_refused_before_any_work(build, pattern: str) -> None:
    model = build()
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(dcc.UnsupportedModelError, match=pattern) as err:
        BackpackBackend.validate_model(model)
    message = str(err.value)
    assert "backend='pyhessian'" in message and "backend='hutchpp'" in message
    assert calls == []
    handle.remove()


@pytest.mark.parametrize(("build", "pattern"), REFUSALS[:4])
def test_estimate_refuses_resnets_with_the_module_named(bp, build, pattern: str) -> None:
    # The refusal comes before any forward pass, so the batch's shape does not matter.
    batch = (torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(dcc.UnsupportedModelError, match=pattern):
        dcc.estimate(build(), nn.CrossEntropyLoss(), batch, backend="backpack")


@pytest.mark.parametrize(
    ("loss_fn", "pattern"),
    [
        (get_case("negative_trace").make()[1], r"NegativeCurvatureLoss"),
        (nn.CrossEntropyLoss(weight=torch.ones(3, dtype=torch.float64)), r"class weights"),
        (nn.CrossEntropyLoss(ignore_index=0), r"ignore_index=0"),
        (F.cross_entropy, r"BCEWithLogitsLoss or nn\.CrossEntropyLoss or nn\.MSELoss;"),
        (nn.L1Loss(), r"got L1Loss"),
    ],
    ids=["custom-loss", "ce-weight", "ce-ignore-index", "functional", "l1"],
)
def test_unsupported_loss_is_refused(bp, loss_fn, pattern: str) -> None:
    model, _, batch = get_case("mlp").make()
    with pytest.raises(dcc.UnsupportedModelError, match=pattern) as err:
        dcc.estimate(model, loss_fn, batch, backend="backpack")
    assert "pyhessian" in str(err.value)


def test_mse_with_non_2d_output_is_refused(bp) -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3)).double()
    x, _ = _cnn_batch()
    y = torch.zeros(6, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(dcc.UnsupportedModelError, match=r"2-D outputs.*\(6, 3, 4, 4\)"):
        dcc.estimate(model, nn.MSELoss(), (x, y), backend="backpack")


# -- the caller's model is untouched -----------------------------------------------------------
def _snapshot(model: nn.Module) -> dict[str, object]:
    subs = dict(model.named_modules())
    return {
        "hooks": {
            name: (
                list(m._forward_hooks),
                list(m._forward_pre_hooks),
                list(m._backward_hooks),
                list(m._backward_pre_hooks),
                m._is_full_backward_hook,
            )
            for name, m in subs.items()
        },
        "dict_keys": {name: sorted(vars(m)) for name, m in subs.items()},
        "modes": {name: m.training for name, m in subs.items()},
        "params": {
            n: (p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()
        },
        "grads": {
            n: (p.grad, None if p.grad is None else p.grad.clone())
            for n, p in model.named_parameters()
        },
        "buffers": {n: (b, b.clone()) for n, b in model.named_buffers()},
        "param_attrs": {n: sorted(vars(p)) for n, p in model.named_parameters()},
    }


def _assert_same(before: dict, after: dict) -> None:
    assert after["hooks"] == before["hooks"]
    assert after["dict_keys"] == before["dict_keys"]
    assert after["modes"] == before["modes"]
    assert after["param_attrs"] == before["param_attrs"]
    for n, (p, v, rg) in before["params"].items():
        q, w, rg2 = after["params"][n]
        assert q is p and torch.equal(w, v) and rg2 == rg
    for n, (g, v) in before["grads"].items():
        g2, v2 = after["grads"][n]
        assert g2 is g
        assert (v is None and v2 is None) or torch.equal(v2, v)
    for n, (b, v) in before["buffers"].items():
        b2, v2 = after["buffers"][n]
        assert b2 is b and torch.equal(v2, v)


@pytest.mark.parametrize("quantity", ["trace", "diagonal"])
@pytest.mark.parametrize(
    "build", [_FlattenCall, _Untraceable, lambda: get_case("frozen_layer").make()[0]]
)
def test_callers_model_is_bit_for_bit_unchanged_without_leftover_hooks(
    bp, build, quantity: str
) -> None:
    torch.manual_seed(0)
    model = build().double().train()
    frozen = isinstance(model, nn.Sequential)
    x = torch.randn(4, 6, dtype=torch.float64) if frozen else _cnn_batch(4)[0]
    y = torch.tensor([0, 1, 2, 0])
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(model(x), y).backward()  # a training gradient in flight
    user_calls = []
    model.register_forward_hook(lambda *_: user_calls.append(1))
    before = _snapshot(model)
    loss_before = _snapshot(loss_fn)
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    dcc.estimate(model, loss_fn, (x, y), quantity, backend="backpack", verify=True)
    _assert_same(before, _snapshot(model))
    _assert_same(loss_before, _snapshot(loss_fn))
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2])
    assert not any(hasattr(m, "_backpack_extend") for m in model.modules())
    assert not any(hasattr(m, "input0") or hasattr(m, "output") for m in model.modules())


# -- results -----------------------------------------------------------------------------------
def test_diagonal_result_serialises_to_json(bp) -> None:
    model, loss_fn, batch = get_case("cnn").make()
    r = dcc.estimate(model, loss_fn, batch, "diagonal", backend="backpack")
    d = json.loads(json.dumps(r.to_dict()))
    assert d["exact"] is True and d["stderr"] == 0.0 and d["quantity"] == "diagonal"
    assert np.array(d["value"]["0.weight"]).shape == (3, 2, 3, 3)
    assert d["details"]["trace"] == pytest.approx(sum(d["layers"].values()))
    flat = np.concatenate([np.ravel(v) for v in d["value"].values()])
    np.testing.assert_allclose(flat, get_case("cnn").exact.diagonal().numpy(), rtol=1e-10)


def test_exact_trace_lies_in_pyhessian_99_percent_interval(bp) -> None:
    model, loss_fn, batch = get_case("cnn").make()
    exact = dcc.estimate(model, loss_fn, batch, backend="backpack").value
    est = dcc.estimate(
        model,
        loss_fn,
        batch,
        backend="pyhessian",
        seed=0,
        num_hvps=800,
        ci_level=0.99,
        probe_batch=40,
    )
    lo, hi = est.ci
    assert lo <= exact <= hi, (exact, est.ci)
    assert hi - lo < 0.4 * abs(exact)  # an interval narrow enough to mean something


def test_options_are_validated(bp) -> None:
    model, loss_fn, batch = get_case("mlp").make()
    with pytest.raises(dcc.InvalidOptionError, match="num_hvps"):
        dcc.estimate(model, loss_fn, batch, backend="backpack", num_hvps=10)
    with pytest.raises(dcc.UnsupportedQuantityError, match="eigenvalues"):
        dcc.estimate(model, loss_fn, batch, "eigenvalues", backend="backpack")


# -- torch.distributed --------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, loss_fn, (x, y) = get_case("cnn").make()
        sizes = [7, 5]
        start = sum(sizes[:rank])
        part = (x[start : start + sizes[rank]], y[start : start + sizes[rank]])
        r = dcc.estimate(model, loss_fn, part, "diagonal", backend="backpack")
        torch.save({"diag": _diag_of(r), "world": r.details["world_size"]}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_distributed_diagonal_is_that_of_all_ranks_samples(bp, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'store'}"
    out = str(tmp_path / "res")
    mp.spawn(_ddp_worker, args=(2, init, out), nprocs=2, join=True)
    exact = get_case("cnn").exact.diagonal()
    for rank in range(2):
        res = torch.load(f"{out}.{rank}")
        assert res["world"] == 2
        torch.testing.assert_close(res["diag"], exact, rtol=0, atol=1e-10 * exact.abs().max())


def _ddp_failing_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, loss_fn, (x, y) = get_case("cnn").make()
        if rank == 1:
            x = x[:, :, :4]  # wrong spatial size: BackPACK's forward fails on this rank only
        try:
            dcc.estimate(model, loss_fn, (x[:6], y[:6]), "trace", backend="backpack")
            outcome = "returned"
        except dcc.CurvatureError as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        except Exception as exc:
            outcome = f"raw {type(exc).__name__}: {exc}"
        with open(f"{out}.{rank}", "w") as fh:
            fh.write(outcome)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_distributed_failure_on_one_rank_raises_on_every_rank_without_hanging(
    bp, tmp_path: Path
) -> None:
    import time

    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'store'}"
    out = str(tmp_path / "res")
    ctx = mp.spawn(_ddp_failing_worker, args=(2, init, out), nprocs=2, join=False)
    deadline = time.monotonic() + 90
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a failure on one rank left the other rank hanging")
    outcomes = [Path(f"{out}.{r}").read_text() for r in range(2)]
    assert all(o != "returned" and not o.startswith("raw") for o in outcomes), outcomes
    assert "rank 1" in outcomes[0], outcomes[0]


@pytest.mark.parametrize("backend", ["backpack", "pyhessian"])
def test_a_non_finite_loss_is_refused_with_one_message_by_both_loss_checks(bp, backend) -> None:
    model, loss_fn, (x, y) = get_case("mlp").make()
    x = x.clone()
    x[3, 2] = float("nan")
    data = [(x[:6], y[:6]), (x[6:], y[6:])]  # nan in batch 0 only
    expected = (
        r"^the loss is nan on batch 0; curvature of a non-finite loss is undefined\. "
        r"Check the data and the model's parameters \(diverged training\?\)\.$"
    )
    with pytest.raises(dcc.NonFiniteError, match=expected):
        dcc.estimate(model, loss_fn, data, "trace", backend=backend, seed=0)
