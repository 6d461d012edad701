"""Models nobody here wrote, measured against dense Hessians.

Ground truth is a dense Hessian built by plain double-backward autograd, one row per gradient
entry (:func:`autograd_hessian`) and checked by central finite differences of the gradient on a
few entries (:func:`assert_matches_finite_differences`): ``torch.func.hessian`` (used by
``tests/cases.py``) returns a wrong, asymmetric Hessian through LayerNorm, so it is not used here.

- attention (``nn.TransformerEncoderLayer``, Lightning's demo ``Transformer``): every measurement
  selects PyTorch's math attention kernel itself (the fused kernels have no double backward) and
  restores the caller's kernel settings afterwards;
- models whose outputs the loss cannot take (a tuple, a dict) are refused before any product with
  a message naming the fix; a ``forward`` of several arguments is measured through a batch whose
  inputs are a tuple, with a one-line wrapper.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import deconcnn_curvature as dcc
from deconcnn_curvature.problem import preserve_state


# -- dense ground truth -------------------------------------------------------------------------
def _trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _flat_grad(
    model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], inputs: Any, targets: Any
) -> torch.Tensor:
    params = _trainable(model)
    loss = loss_fn(model(inputs), targets)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def autograd_hessian(
    model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], inputs: Any, targets: Any
) -> torch.Tensor:
    """The Hessian of ``loss_fn(model(inputs), targets)`` w.r.t. the trainable parameters (in
    ``parameters()`` order), one double-backward row per gradient entry, math attention kernel."""
    params = _trainable(model)
    with sdpa_kernel(SDPBackend.MATH):
        g = _flat_grad(model, loss_fn, inputs, targets)
        rows = []
        for i in range(g.numel()):
            row = torch.autograd.grad(g[i], params, retain_graph=True, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (r if r is not None else torch.zeros_like(p)).reshape(-1)
                        for r, p in zip(row, params, strict=True)
                    ]
                )
            )
    return torch.stack(rows).detach()


def assert_matches_finite_differences(
    hessian: torch.Tensor,
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    inputs: Any,
    targets: Any,
    *,
    n: int = 6,
    h: float = 1e-5,
) -> None:
    """Columns of ``hessian`` equal central differences of the gradient (float64 models)."""
    params = _trainable(model)
    flat = [p.view(-1) for p in params]
    offsets = torch.cumsum(torch.tensor([0] + [p.numel() for p in params]), 0)
    # the largest diagonal entries (where the curvature is) and a few others
    cols = torch.cat([hessian.diagonal().abs().topk(n // 2).indices, torch.arange(n - n // 2) * 7])
    assert float(hessian.abs().max()) > 0
    for col in cols.tolist():
        k = int(torch.searchsorted(offsets, col, right=True)) - 1
        j = col - int(offsets[k])
        diffs = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                flat[k][j] += sign * h
            with sdpa_kernel(SDPBackend.MATH):
                diffs.append(_flat_grad(model, loss_fn, inputs, targets).detach())
            with torch.no_grad():
                flat[k][j] -= sign * h
        fd = (diffs[0] - diffs[1]) / (2 * h)
        torch.testing.assert_close(hessian[:, col], fd, rtol=1e-5, atol=1e-7)


def _top(hessian: torch.Tensor, k: int) -> torch.Tensor:
    return torch.linalg.eigvalsh(hessian).flip(0)[:k]


# -- attention ----------------------------------------------------------------------------------
class EncoderClassifier(nn.Module):
    """torch's encoder layer (self-attention, LayerNorm), a linear head on the mean token."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            d_model=4, nhead=2, dim_feedforward=4, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(dim=1))


def _encoder_problem(device: str = "cpu") -> tuple[nn.Module, nn.Module, tuple[Any, Any]]:
    torch.manual_seed(0)
    model = EncoderClassifier().double().eval().to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 4, generator=g, dtype=torch.float64).to(device)
    y = torch.randint(0, 3, (6,), generator=g).to(device)
    return model, nn.CrossEntropyLoss(), (x, y)


class Pair(nn.Module):
    """Measures a model whose ``forward`` takes several arguments: a batch's inputs are one tuple,
    passed on as the arguments (``forward(inputs) -> net(*inputs)``)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.net(*inputs)


def _demo_transformer_problem() -> tuple[nn.Module, Callable[..., torch.Tensor], list[Any]]:
    """Lightning's demo Transformer (nn.Transformer: encoder and decoder, causal masks), tiny.

    Its ``forward(inputs, target)`` returns log-probabilities of shape (batch·length, vocab), the
    demo's loss is ``F.nll_loss(output, target.view(-1))``."""
    from lightning.pytorch.demos import Transformer

    torch.manual_seed(0)
    net = Transformer(vocab_size=4, ninp=2, nhead=2, nhid=4, nlayers=1, dropout=0.0)
    model = Pair(net.double().eval())
    g = torch.Generator().manual_seed(2)
    src, tgt = torch.randint(0, 4, (3, 4), generator=g), torch.randint(0, 4, (3, 4), generator=g)
    return model, F.nll_loss, [((src, tgt), tgt.reshape(-1))]


def test_dense_reference_of_an_encoder_layer_is_symmetric_and_matches_finite_differences() -> None:
    model, loss_fn, (x, y) = _encoder_problem()
    exact = autograd_hessian(model, loss_fn, x, y)
    torch.testing.assert_close(exact, exact.T, rtol=0, atol=1e-12)
    assert_matches_finite_differences(exact, model, loss_fn, x, y)


def test_encoder_layer_trace_and_lambda_max_equal_the_dense_hessian() -> None:
    """Before: BackendFailedError 'derivative for aten::_scaled_dot_product_flash_attention_for_
    cpu_backward is not implemented'. Now: the math kernel, and the dense Hessian's numbers."""
    model, loss_fn, batch = _encoder_problem()
    exact = autograd_hessian(model, loss_fn, *batch)
    dim = exact.shape[0]
    # Hutch++ with a sketch as wide as the space is exact: it takes the whole trace from QᵀHQ.
    trace = dcc.estimate(model, loss_fn, batch, "trace", "hutchpp", seed=0, num_hvps=3 * dim + 3)
    torch.testing.assert_close(trace.value, float(exact.trace()), rtol=1e-9, atol=0)
    assert trace.details["sdpa_kernel"] == "math"
    eig = dcc.estimate(model, loss_fn, batch, "eigenvalues", k=2, tol=1e-12, max_hvps=200)
    torch.testing.assert_close(
        torch.tensor(eig.value, dtype=torch.float64), _top(exact, 2), rtol=1e-8, atol=0
    )
    assert eig.details["converged"] is True and eig.details["sdpa_kernel"] == "math"
    hutch = dcc.estimate(model, loss_fn, batch, "trace", seed=0, num_hvps=100)
    assert abs(hutch.value - float(exact.trace())) <= 4 * hutch.stderr


@functools.cache
def _demo_transformer_exact() -> torch.Tensor:
    model, loss_fn, data = _demo_transformer_problem()
    return autograd_hessian(model, loss_fn, *data[0])


def test_lightning_demo_transformer_trace_and_lambda_max_equal_the_dense_hessian() -> None:
    model, loss_fn, data = _demo_transformer_problem()
    (inputs, targets) = data[0]
    exact = _demo_transformer_exact()
    torch.testing.assert_close(exact, exact.T, rtol=0, atol=1e-12)
    assert_matches_finite_differences(exact, model, loss_fn, inputs, targets, n=4)
    eig = dcc.estimate(model, loss_fn, data, "eigenvalues", k=2, tol=1e-12, max_hvps=300)
    torch.testing.assert_close(
        torch.tensor(eig.value, dtype=torch.float64), _top(exact, 2), rtol=1e-8, atol=0
    )
    n = 3 * exact.shape[0] + 3  # a sketch as wide as the space: Hutch++ is exact
    full = dcc.estimate(model, loss_fn, data, "trace", "hutchpp", seed=0, num_hvps=n)
    torch.testing.assert_close(full.value, float(exact.trace()), rtol=1e-9, atol=0)
    trace = dcc.estimate(model, loss_fn, data, "trace", seed=0, num_hvps=100)
    assert trace.details["sdpa_kernel"] == "math"
    assert abs(trace.value - float(exact.trace())) <= 4 * trace.stderr
    assert trace.stderr < 0.2 * abs(float(exact.trace()))  # the bound above is not vacuous


def _sdpa_flags() -> tuple[bool, ...]:
    b = torch.backends.cuda
    return (
        b.flash_sdp_enabled(),
        b.mem_efficient_sdp_enabled(),
        b.math_sdp_enabled(),
        b.cudnn_sdp_enabled(),
    )


def test_the_math_kernel_is_selected_inside_and_the_callers_setting_restored_after() -> None:
    model, loss_fn, batch = _encoder_problem()
    before = _sdpa_flags()
    with preserve_state(model):
        assert _sdpa_flags() == (False, False, True, False)
    assert _sdpa_flags() == before
    # A caller who chose other kernels (here: only the flash kernel) gets them back, after a
    # measurement that succeeded and after one that failed.
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        chosen = _sdpa_flags()
        dcc.estimate(model, loss_fn, batch, "trace", num_hvps=2)
        assert _sdpa_flags() == chosen
        with pytest.raises(dcc.InvalidProblemError):
            dcc.estimate(model, lambda out, y: out.sum(dim=1), batch, "trace", num_hvps=2)
        assert _sdpa_flags() == chosen
    assert _sdpa_flags() == before


@pytest.mark.cuda
def test_encoder_layer_on_cuda_equals_the_dense_hessian() -> None:
    """On CUDA the fused kernels have no double backward either. In float32, where CUDA picks a
    fused kernel (memory-efficient, flash or cuDNN; none takes float64), the numbers match the
    float64 dense Hessian to float32 accuracy."""
    model, loss_fn, (x, y) = _encoder_problem()
    exact = autograd_hessian(model, loss_fn, x, y)
    model = model.float().to("cuda")
    batch = (x.float().to("cuda"), y.to("cuda"))
    eig = dcc.estimate(model, loss_fn, batch, "eigenvalues", k=2, tol=1e-6, max_hvps=200)
    torch.testing.assert_close(
        torch.tensor(eig.value, dtype=torch.float64), _top(exact, 2), rtol=1e-4, atol=0
    )
    dim = exact.shape[0]
    trace = dcc.estimate(model, loss_fn, batch, "trace", "hutchpp", seed=0, num_hvps=3 * dim + 3)
    torch.testing.assert_close(trace.value, float(exact.trace()), rtol=1e-4, atol=0)
    assert trace.details["sdpa_kernel"] == "math" and trace.device.startswith("cuda")


# -- memory layouts -----------------------------------------------------------------------------
def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 2, 2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    ).double()


@pytest.mark.parametrize("layout", ["model", "input", "both"])
def test_backpack_measures_channels_last_exactly(layout: str) -> None:
    """Before: BackendFailedError 'view size is not compatible with input tensor's size and
    stride'. Now: BackPACK's copy and the inputs are made contiguous; the exact trace and diagonal
    of the dense Hessian, and the caller's model and inputs keep their layout."""
    pytest.importorskip("backpack")
    model, loss_fn = _small_cnn().eval(), nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 2, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    exact = autograd_hessian(model, loss_fn, x, y)
    if layout in ("model", "both"):
        model = model.to(memory_format=torch.channels_last)
    if layout in ("input", "both"):
        x = x.contiguous(memory_format=torch.channels_last)
    strides = [p.stride() for p in model.parameters()]
    trace = dcc.estimate(model, loss_fn, (x, y), "trace", backend="backpack")
    torch.testing.assert_close(trace.value, float(exact.trace()), rtol=1e-10, atol=0)
    diag = dcc.estimate(model, loss_fn, (x, y), "diagonal", backend="backpack")
    got = torch.cat([d.reshape(-1) for d in diag.value.values()])
    torch.testing.assert_close(got, exact.diagonal(), rtol=1e-9, atol=1e-12)
    assert [p.stride() for p in model.parameters()] == strides
    assert x.is_contiguous(memory_format=torch.channels_last) == (layout != "model")
    eig = dcc.estimate(model, loss_fn, (x, y), "eigenvalues", k=1, tol=1e-12, max_hvps=100)
    torch.testing.assert_close(eig.value[0], float(_top(exact, 1)[0]), rtol=1e-9, atol=0)


# -- outputs the loss cannot take; forwards of several arguments ---------------------------------
class TupleOut(nn.Module):
    """Logits and an auxiliary output, as many published models return."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
        self.head, self.aux = nn.Linear(6, 3), nn.Linear(6, 2)
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor) -> Any:
        h = self.body(x)
        if self.as_dict:
            return {"logits": self.head(h), "aux": self.aux(h)}
        return self.head(h), self.aux(h)


def _tuple_problem(as_dict: bool) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = TupleOut(as_dict).double().train()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    return model, (x, torch.randint(0, 3, (7,), generator=g))


@pytest.mark.parametrize(
    ("as_dict", "described", "fix"),
    [
        (False, "a tuple of 2 (Tensor(7, 3), Tensor(7, 2))", "F.cross_entropy(out[0], y)"),
        (True, "a dict with keys 'logits', 'aux'", "F.cross_entropy(out['logits'], y)"),
    ],
    ids=["tuple", "dict"],
)
@pytest.mark.parametrize("backend", ["pyhessian", "hutchpp"])
def test_outputs_the_loss_cannot_take_are_refused_before_any_product_with_the_fix(
    as_dict: bool, described: str, fix: str, backend: str
) -> None:
    """Before: BackendFailedError wrapping torch's 'cross_entropy_loss(): argument 'input' (position
    1) must be Tensor, not tuple'. Now: one forward pass, then a message naming the fix; and the
    fix gives the dense Hessian's numbers."""
    model, batch = _tuple_problem(as_dict)
    forwards, backwards = [], []
    model.register_forward_hook(lambda *_: forwards.append(1))
    model.head.register_full_backward_hook(lambda *_: backwards.append(1))
    with pytest.raises(dcc.InvalidProblemError) as info:
        dcc.estimate(model, nn.CrossEntropyLoss(), batch, "trace", backend, num_hvps=6)
    message = str(info.value)
    assert f"the model returns {described}, which loss_fn (CrossEntropyLoss) cannot take" in message
    assert f"loss_fn=lambda out, y: {fix}" in message and "\n" not in message
    assert forwards == [1] and backwards == []
    assert model.training  # the state guard restored the mode

    def pick(out: Any, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out["logits"] if as_dict else out[0], y)

    exact = autograd_hessian(model.eval(), pick, *batch)
    assert_matches_finite_differences(exact, model, pick, *batch, n=4)
    model.train()
    eig = dcc.estimate(model, pick, batch, "eigenvalues", k=1, tol=1e-12, max_hvps=120)
    torch.testing.assert_close(eig.value[0], float(_top(exact, 1)[0]), rtol=1e-9, atol=0)
    n = 3 * exact.shape[0] + 3  # a sketch as wide as the space: Hutch++ is exact
    trace = dcc.estimate(model, pick, batch, "trace", "hutchpp", num_hvps=n)
    torch.testing.assert_close(trace.value, float(exact.trace()), rtol=1e-9, atol=0)


def test_a_forward_of_several_arguments_is_named_with_the_supported_form() -> None:
    """Before: BackendFailedError "forward() missing 1 required positional argument: 'target'".
    Now: the rule (inputs are passed as one object) and the wrapper; the wrapped model is measured
    exactly (test_lightning_demo_transformer_trace_and_lambda_max_equal_the_dense_hessian)."""
    model, loss_fn, data = _demo_transformer_problem()
    net = model.net  # Lightning's demo Transformer: forward(inputs, target, mask=None)
    for batch in (data, [(data[0][0][0], data[0][1])]):  # a tuple of inputs, one tensor
        with pytest.raises(dcc.InvalidProblemError) as info:
            dcc.estimate(net, loss_fn, batch, "trace", num_hvps=3)
        message = str(info.value)
        assert "the model's forward takes 2 arguments (inputs, target)" in message
        assert "forward(inputs) returns net(*inputs)" in message and "[((x1, x2), y)]" in message


def test_the_documented_forms_of_both_shapes_give_the_dense_hessians_numbers() -> None:
    """The Python guide's ``Unpack`` wrapper (a forward of several arguments) and its loss that
    picks the logits out of a tuple output, on Lightning's demo Transformer and a tuple model."""
    root = Path(__file__).resolve().parent.parent
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    text = "\n".join(p.read_text(encoding="utf-8") for p in pages)
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "Unpack" in b)
    namespace: dict[str, Any] = {"nn": nn, "F": F, "torch": torch, "dcc": dcc}
    exec(block.split("src, tgt = torch.randn")[0], namespace)  # the classes, as written
    demo, loss_fn, data = _demo_transformer_problem()
    r = dcc.estimate(namespace["Unpack"](demo.net), loss_fn, data, "eigenvalues")
    top = _top(_demo_transformer_exact(), 1)
    torch.testing.assert_close(r.value[0], float(top[0]), rtol=1e-6, atol=0)

    model, (x, y) = _tuple_problem(False)

    def pick(out: Any, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out[0], y)

    r = dcc.estimate(model, pick, (x, y), "eigenvalues")
    top = _top(autograd_hessian(model.eval(), pick, x, y), 1)
    torch.testing.assert_close(r.value[0], float(top[0]), rtol=1e-6, atol=0)
