"""The optional ``backpack`` backend: the exact Hessian diagonal and trace through BackPACK.

BackPACK (Dangel, Kunstner, Hennig, "BackPACK: Packing more into backprop", ICLR 2020) extends
backpropagation with second-order quantities. Its ``DiagHessian`` extension backpropagates a
symmetric factorisation of the loss Hessian with respect to each layer's output, adding the
residual terms of non-linear activations, and returns ``diag ∇²_θ L`` for every parameter of a
supported layer (Dangel, Harmeling, Hennig, "Modular block-diagonal curvature approximations for
feedforward architectures", AISTATS 2020). Its sum is the **exact** trace: no probes, no standard
error. Quantities:

- ``"trace"``: ``Σ_i H_ii``, exact, with the trace of each parameter tensor in ``layers``.
- ``"diagonal"``: ``{name: H_ii shaped like the parameter}`` for every trainable parameter.

What this backend guarantees on top of BackPACK:

- **The caller's module is never touched.** BackPACK's ``extend()`` installs hooks and writes
  ``input0``/``output``/``diag_h`` attributes in place, so it is applied to a ``copy.deepcopy``
  of the model (frozen parameters stay frozen; the copy's ``.grad`` are its own), and to a copy
  of the loss module.
- **Unsupported models are refused before any work**, naming the first unsupported module (its
  dotted path and type), the reason, and pointing to ``pyhessian``/``hutchpp``. Which layer and
  loss types BackPACK handles is asked of BackPACK itself (:func:`has_diag_hessian_rule`, through
  the public ``DiagHessian.set_module_extension``), so every type its ``DiagHessian`` maps —
  ``ConvTranspose3d``, ``AvgPool3d``, its own ``Pad`` and ``Slicing`` modules,
  ``BCEWithLogitsLoss`` — is accepted, and a bare layer may be the whole model. What BackPACK
  maps but computes wrongly or not at all is refused with the reason, from one table
  (:func:`_known_limitation`): average pooling in float64 (its rule builds float32 tensors and
  fails), ``padding_mode`` other than ``"zeros"`` and ``divisor_override`` (its rules ignore them
  and return a wrong diagonal), ``padding="same"``/``"valid"`` strings and transposed convolutions
  with ``output_padding`` (its rules fail); soft cross-entropy targets must sum to 1 per sample
  (:func:`_check_targets`). The forward is traced with ``torch.fx`` (every type
  BackPACK maps is a leaf of the trace) so that operations BackPACK cannot see — residual sums,
  functional activations, tensor arithmetic, reused layers with parameters — are found
  statically, even inside custom modules; BatchNorm (in any mode) is refused with its own
  message. Calls to ``flatten`` and parameter-free layers used twice are handed to BackPACK's own
  converter (``extend(..., use_converter=True)``), whose failures are reported, not hidden. Any
  error BackPACK raises while backpropagating its quantities is reported as an unsupported model,
  naming the layer it was working on.
- When ``torch.fx`` cannot trace the forward (data-dependent control flow), the layers are still
  checked by type, and before measuring, BackPACK runs on one sample and its diagonal is compared
  with exact autograd Hessian-vector products on one coordinate of every parameter tensor; any
  disagreement refuses the model.
- ``channels_last`` models and inputs are measured: the copy and each batch's inputs are made
  contiguous first (BackPACK's rules reshape with ``view``, which fails on that layout).
- Several batches give the Hessian of the mean loss over all samples (per-batch diagonals
  weighted by batch size); under ``torch.distributed`` one all-reduce weighted by sample count
  gives the diagonal over every rank's samples.

BackPACK is imported lazily, inside :meth:`BackpackBackend.compute`, so this module imports (and
the backend is listed, as unavailable) without it.
"""

from __future__ import annotations

import copy
import functools
import math
import operator
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import fx, nn

from deconcnn_curvature.backend import Backend, Option
from deconcnn_curvature.distributed import agree, world_size
from deconcnn_curvature.errors import NonFiniteError, UnsupportedModelError
from deconcnn_curvature.hookspecs import hookimpl
from deconcnn_curvature.problem import CurvatureProblem, _batch_size, check_finite_loss
from deconcnn_curvature.results import CurvatureResult

__all__ = [
    "BackpackBackend",
    "has_diag_hessian_rule",
    "register_backends",
    "supported_layers",
    "supported_losses",
]

#: Layers this backend removes from the traced copy before BackPACK sees it: they compute nothing
#: (BackPACK has no rule for them).
PASS_THROUGH: tuple[type[nn.Module], ...] = (nn.Identity,)

#: Average pooling: BackPACK 1.7.1's rules build float32 tensors and fail on float64 inputs
#: ("expected scalar type Double but found Float"); checked against BackPACK itself in the tests.
_FLOAT32_ONLY = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_AVG_POOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


@functools.cache
def has_diag_hessian_rule(module_type: type) -> bool:
    """Whether BackPACK's ``DiagHessian`` extension maps ``module_type`` to a rule (exact class:
    BackPACK does not look at base classes). Asked of BackPACK through its public API:
    ``set_module_extension`` refuses (``ValueError``) a type that already has a rule; the probe is
    a fresh extension object, thrown away. Needs BackPACK installed."""
    from backpack.extensions import DiagHessian

    try:
        DiagHessian().set_module_extension(module_type, None)  # type: ignore[arg-type]
    except ValueError:
        return True
    return False


def _candidate_types() -> list[type[nn.Module]]:
    import backpack.custom_module as custom

    found: list[type[nn.Module]] = []
    namespaces = [vars(nn)] + [
        vars(getattr(custom, name)) for name in dir(custom) if not name.startswith("_")
    ]
    for namespace in namespaces:
        for obj in namespace.values():
            if isinstance(obj, type) and issubclass(obj, nn.Module) and obj not in found:
                found.append(obj)
    return found


def _is_loss_type(module_type: type) -> bool:
    return module_type.__module__ == "torch.nn.modules.loss"


def supported_layers() -> tuple[type[nn.Module], ...]:
    """The layer types BackPACK's ``DiagHessian`` has rules for (``torch.nn`` and BackPACK's own
    ``backpack.custom_module``), as BackPACK itself reports them, plus :data:`PASS_THROUGH`.
    Limitations within these types are listed by :func:`_known_limitation`."""
    found = [t for t in _candidate_types() if has_diag_hessian_rule(t) and not _is_loss_type(t)]
    return tuple(sorted(found + list(PASS_THROUGH), key=lambda t: t.__name__))


def supported_losses() -> tuple[type[nn.Module], ...]:
    """The loss modules BackPACK's ``DiagHessian`` has rules for, as BackPACK itself reports."""
    found = [t for t in _candidate_types() if _is_loss_type(t) and has_diag_hessian_rule(t)]
    return tuple(sorted(found, key=lambda t: t.__name__))


def _known_limitation(module: nn.Module, dtype: torch.dtype | None) -> str | None:
    """Why BackPACK 1.7.1 cannot measure this layer exactly although it maps its type (None: it
    can). Each entry was found by comparing BackPACK with a dense Hessian (see the tests)."""
    name = type(module).__name__
    if isinstance(module, _FLOAT32_ONLY) and dtype == torch.float64:
        return (
            f"BackPACK's {name} rule fails in float64 (it builds float32 tensors: \"expected "
            'scalar type Double but found Float"); measure the model in float32'
        )
    if isinstance(module, _CONV + _CONV_TRANSPOSE):
        if module.padding_mode != "zeros":
            return (
                f"padding_mode={module.padding_mode!r}: BackPACK's {name} rule assumes zero "
                "padding and would return a wrong diagonal"
            )
        if isinstance(module.padding, str):
            return f"padding={module.padding!r}: BackPACK's {name} rule needs numeric padding"
    if isinstance(module, _CONV_TRANSPOSE) and any(module.output_padding):
        return (
            f"output_padding={tuple(module.output_padding)}: BackPACK's {name} rule fails on "
            "it (its unfolded shapes disagree)"
        )
    if isinstance(module, _AVG_POOL) and getattr(module, "divisor_override", None) is not None:
        return (
            f"divisor_override={module.divisor_override}: BackPACK's {name} rule ignores it and "
            "would return a wrong diagonal"
        )
    return None


_NORM_LAYERS = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

_ALTERNATIVES = (
    "Use backend='pyhessian' or backend='hutchpp' for this model (both work on any "
    "differentiable network), e.g. `deconcnn-curv estimate CKPT --backend pyhessian`."
)
_INSTALL = "pip install 'deconcnn-curvature[backpack]'"


# -- static model analysis (no BackPACK needed) ------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """How to hand a model to BackPACK: traced by torch.fx (statically verified) or not."""

    graph: fx.Graph | None  # traced forward of the deep copy it was made from; None: untraceable
    root: nn.Module  # the deep copy the graph refers to
    convert: bool  # needs BackPACK's converter (flatten calls, reused parameter-free layers)
    untraced_reason: str | None = None
    static: bool = True  # checked completely before running (False: verify against autograd)


def _describe(path: str, module: nn.Module) -> str:
    where = f"'{path}'" if path else "the model itself"
    return f"{where} ({type(module).__name__})"


def _refuse(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"backend 'backpack' cannot handle this model: {what}. {_ALTERNATIVES}"
    )


def _check_layer(path: str, module: nn.Module, dtype: torch.dtype | None) -> None:
    """Raise unless BackPACK computes an exact Hessian diagonal through this (leaf) layer."""
    if isinstance(module, _NORM_LAYERS):
        raise _refuse(
            f"{_describe(path, module)} is a normalisation layer; BackPACK has no exact Hessian "
            "rule for it (BatchNorm is refused in train and in eval mode alike). deconCNN models "
            "qualify only with `norm_type: none`"
        )
    if type(module) in PASS_THROUGH:
        return
    if not has_diag_hessian_rule(type(module)):
        raise _refuse(
            f"{_describe(path, module)} has no rule in BackPACK's DiagHessian extension "
            f"(it has rules for: {', '.join(t.__name__ for t in supported_layers())})"
        )
    reason = _known_limitation(module, dtype)
    if reason is not None:
        raise _refuse(f"{_describe(path, module)}: {reason}")


def _param_dtype(model: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.requires_grad), None)


def _check_shared_parameters(model: nn.Module) -> None:
    owners: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            continue
        if id(p) in owners:
            raise _refuse(
                f"parameter '{name}' is the same tensor as '{owners[id(p)]}' (tied weights); "
                "BackPACK computes one diagonal per layer and would miss the cross terms"
            )
        owners[id(p)] = name


def _enclosing(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "the model's own forward"
    path, (_, cls) = list(stack.items())[-1]
    name = getattr(cls, "__name__", str(cls))
    return f"the forward of '{path}' ({name})"


def _op_name(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        return f"the tensor method `.{target}()`"
    if target is operator.add or target is operator.iadd or target is torch.add:
        return "`+` (a residual sum or other tensor addition)"
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)
    module = getattr(target, "__module__", None)
    return f"`{module}.{name}`" if module and module != "_operator" else f"`{name}`"


def _is_flatten(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten"
    )


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with every layer type BackPACK maps kept as one call (BackPACK's own
    ``Pad`` and ``Slicing`` live outside ``torch.nn`` and would otherwise be traced into)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return has_diag_hessian_rule(type(m)) or super().is_leaf_module(m, module_qualified_name)


def _is_single_layer(model: nn.Module) -> bool:
    """A model that is one layer (``nn.Linear(5, 3)``, a ``Pad``): checked as a layer, as fx
    would trace into its forward and find its parameters used outside a layer."""
    return not isinstance(model, _CONTAINERS) and not any(True for _ in model.children())


def _deepcopy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as exc:
        raise _refuse(
            f"the model cannot be deep-copied ({type(exc).__name__}: {exc}); this backend works on "
            "a copy so that BackPACK's hooks never touch the module being trained"
        ) from exc


def _plan(model: nn.Module) -> _Plan:
    """Check the whole model statically and decide how BackPACK will see it (see module doc)."""
    if not isinstance(model, nn.Module):
        return _Plan(None, model, False, "not a module")  # build_problem reports this
    _check_shared_parameters(model)
    dtype = _param_dtype(model)
    root = _deepcopy(model)  # fx may add attributes to the module it traces
    if _is_single_layer(root) and (
        has_diag_hessian_rule(type(root)) or isinstance(root, _NORM_LAYERS)
    ):
        _check_layer("", root, dtype)
        return _Plan(None, root, False)
    try:
        graph = _Tracer().trace(root)
    except Exception as exc:
        # Untraceable (e.g. data-dependent control flow): check every layer by type, in order.
        for path, module in root.named_modules():
            if isinstance(module, _CONTAINERS):
                continue
            if any(True for _ in module.children()):
                if any(p.requires_grad for p in module.parameters(recurse=False)):
                    raise _refuse(
                        f"{_describe(path, module)} holds parameters of its own that are not in a "
                        "supported layer, and its forward cannot be traced to check how they "
                        "are used"
                    ) from exc
                continue
            if type(module) in PASS_THROUGH:
                raise _refuse(
                    f"{_describe(path, module)}: nn.Identity is supported only in models whose "
                    "forward torch.fx can trace (it is removed from the traced copy), and this "
                    f"one cannot be traced ({type(exc).__name__}: {exc})"
                ) from exc
            _check_layer(path, module, dtype)
        return _Plan(None, root, False, f"{type(exc).__name__}: {exc}".strip(), static=False)

    convert = False
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            if not isinstance(node.args[0], fx.Node):
                raise _refuse(
                    "its forward returns a "
                    f"{type(node.args[0]).__name__}; BackPACK needs a single output tensor"
                )
            continue
        if node.op == "call_module":
            module = root.get_submodule(node.target)
            _check_layer(node.target, module, dtype)
            if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
                raise _refuse(
                    f"{_describe(node.target, module)} is called with extra arguments; "
                    "BackPACK layers take one tensor"
                )
            calls[node.target] = calls.get(node.target, 0) + 1
            if calls[node.target] > 1:
                if any(True for _ in module.parameters()):
                    raise _refuse(
                        f"{_describe(node.target, module)} is called {calls[node.target]} times "
                        "in one forward pass; BackPACK keeps one input per layer, so a layer "
                        "with parameters must not be reused"
                    )
                convert = True
            continue
        if _is_flatten(node):
            convert = True
            continue
        if node.op == "get_attr":
            raise _refuse(
                f"{_enclosing(node)} uses the tensor attribute '{node.target}' directly (a "
                "parameter or buffer outside a supported layer), which BackPACK cannot see"
            )
        raise _refuse(
            f"{_enclosing(node)} computes {_op_name(node)} outside a layer module; BackPACK only "
            "sees nn.Module layers chained one after another, so residual sums, functional "
            "activations (F.relu) and tensor arithmetic are not supported"
        )
    return _Plan(graph, root, convert)


def _without_identities(plan: _Plan) -> nn.Module:
    """A GraphModule over ``plan.root`` with ``nn.Identity`` calls removed (BackPACK has no rule
    for them; they compute nothing). Parameter names are those of the original model."""
    assert plan.graph is not None
    gm = fx.GraphModule(plan.root, plan.graph)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and type(gm.get_submodule(node.target)) in PASS_THROUGH:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _check_loss(loss_fn: Any) -> None:
    if not isinstance(loss_fn, nn.Module) or not has_diag_hessian_rule(type(loss_fn)):
        got = type(loss_fn).__name__ if isinstance(loss_fn, nn.Module) else repr(loss_fn)
        names = " or ".join(f"nn.{t.__name__}" for t in supported_losses())
        raise UnsupportedModelError(
            f"backend 'backpack' needs the loss as a module BackPACK's DiagHessian has a rule for "
            f"({names}; BackPACK extends the loss layer too); got {got}. Pass one of those, or "
            f"{_ALTERNATIVES[0].lower()}{_ALTERNATIVES[1:]}"
        )
    if isinstance(loss_fn, nn.CrossEntropyLoss) and (
        loss_fn.weight is not None or loss_fn.ignore_index != -100
    ):
        raise UnsupportedModelError(
            "backend 'backpack' supports nn.CrossEntropyLoss without class weights and with "
            f"the default ignore_index (-100); got weight={loss_fn.weight is not None}, "
            f"ignore_index={loss_fn.ignore_index}. {_ALTERNATIVES}"
        )
    if isinstance(loss_fn, nn.BCEWithLogitsLoss) and (
        loss_fn.weight is not None or loss_fn.pos_weight is not None
    ):
        raise UnsupportedModelError(
            "backend 'backpack' supports nn.BCEWithLogitsLoss without weight and pos_weight "
            f"(BackPACK's rule has neither); got weight={loss_fn.weight is not None}, "
            f"pos_weight={loss_fn.pos_weight is not None}. {_ALTERNATIVES}"
        )


def _check_targets(loss: nn.Module, targets: Any, index: int) -> None:
    """BackPACK's cross-entropy rule takes the Hessian of soft-label cross-entropy to be that of
    one distribution per sample, i.e. targets summing to 1 over the classes; for other soft targets
    it would return a wrong diagonal (the Hessian scales with the sum)."""
    if not (
        isinstance(loss, nn.CrossEntropyLoss)
        and isinstance(targets, torch.Tensor)
        and targets.is_floating_point()
        and targets.ndim >= 2
    ):
        return
    sums = targets.sum(1)
    tol = 100 * torch.finfo(targets.dtype).eps
    worst = float((sums - 1).abs().max()) if sums.numel() else 0.0
    if worst > tol:
        raise UnsupportedModelError(
            f"backend 'backpack' needs soft cross-entropy targets that sum to 1 over the classes "
            f"(BackPACK's rule assumes it and would return a wrong diagonal); batch {index} has a "
            f"row whose sum is {worst:.3g} away from 1. Normalise the targets "
            f"or {_ALTERNATIVES[0].lower()}{_ALTERNATIVES[1:]}"
        )


def _check_output(loss: nn.Module, out: torch.Tensor) -> None:
    """The output shapes BackPACK's loss rules take: (batch, features) for MSE, (batch, 1) for
    BCEWithLogitsLoss (BackPACK raises on anything else)."""
    if isinstance(loss, nn.MSELoss) and out.ndim != 2:
        need = "2-D outputs (batch, features)"
    elif isinstance(loss, nn.BCEWithLogitsLoss) and (out.ndim != 2 or out.shape[1] != 1):
        need = "outputs of shape (batch, 1): one logit per sample"
    else:
        return
    raise UnsupportedModelError(
        f"BackPACK's {type(loss).__name__} rule needs {need}; the model returned shape "
        f"{tuple(out.shape)}. Reshape the output or {_ALTERNATIVES[0].lower()}{_ALTERNATIVES[1:]}"
    )


# -- running BackPACK ---------------------------------------------------------------------------
@contextmanager
def _quiet_hooks() -> Iterator[None]:
    """Hide torch's note that a full backward hook fires on the first layer (whose input does not
    require grad): expected here, and not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


class _Tracker:
    """Records which layer BackPACK's backward hook is working on, to name it in errors."""

    def __init__(self, module: nn.Module) -> None:
        self.current: str | None = None
        self._handles = []
        for path, sub in module.named_modules():
            if path and not any(True for _ in sub.children()):
                self._handles.append(sub.register_full_backward_pre_hook(self._hook(path, sub)))

    def _hook(self, path: str, sub: nn.Module) -> Any:
        def hook(_module: nn.Module, _grad_output: Any) -> None:
            self.current = f"{path!r} ({type(sub).__name__})"

        return hook


def _translate(exc: Exception, tracker: _Tracker | None, converted: bool) -> UnsupportedModelError:
    where = f" at layer {tracker.current}" if tracker and tracker.current else ""
    how = " after BackPACK's converter (extend(..., use_converter=True))" if converted else ""
    said = str(exc).rstrip(".")
    return UnsupportedModelError(
        f"BackPACK's DiagHessian failed{where}{how}: {type(exc).__name__}: {said}. The model "
        f"uses something BackPACK does not support. {_ALTERNATIVES}"
    )


def _no_inplace(module: nn.Module) -> None:
    """Turn in-place activations off in the copy (same function; BackPACK needs the input kept)."""
    for sub in module.modules():
        if getattr(sub, "inplace", False) is True:
            sub.inplace = False


def _contiguous(module: nn.Module) -> None:
    """Store the copy's parameters and buffers in the default (contiguous) memory format.

    BackPACK's rules reshape with ``view``, which fails on ``channels_last`` tensors ("view size
    is not compatible with input tensor's size and stride"); the layout changes no value, so the
    copy (and, in :func:`_diag_of_batch`, each batch's inputs) is made contiguous instead."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if not t.is_contiguous():
                t.data = t.data.contiguous()


@dataclass
class _Extended:
    module: nn.Module
    loss: nn.Module
    params: dict[str, torch.Tensor]
    tracker: _Tracker
    converted: bool


def _extend(problem: CurvatureProblem, plan: _Plan) -> _Extended:
    import backpack

    root = plan.root
    if plan.graph is not None:
        root = _without_identities(plan)
    _no_inplace(root)
    _contiguous(root)
    try:
        with warnings.catch_warnings():
            # The converter warns about graph nodes it leaves unconverted; our plan admits none,
            # so such a warning is a failure to report, not to print.
            warnings.filterwarnings("error", message="Encountered node that may break")
            if plan.graph is not None:
                module = backpack.extend(root, use_converter=plan.convert)
            else:
                # BackPACK would hook the custom containers too and then find no rule for them;
                # extend the layers only (the forward passes tensors between them as it likes).
                module = root
                for sub in root.modules():
                    if not any(True for _ in sub.children()):
                        backpack.extend(sub)
    except Exception as exc:
        raise _translate(exc, None, plan.convert) from exc
    loss = backpack.extend(copy.deepcopy(problem.loss_fn))
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    return _Extended(module, loss, params, _Tracker(module), plan.convert)


def _diag_of_batch(
    ext: _Extended,
    names: list[str],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    what: str,
    *,
    trial: bool = False,
) -> dict[str, torch.Tensor | None]:
    """BackPACK's Hessian diagonal of the mean loss on one batch, per trainable parameter
    (``None``: the parameter does not influence the loss). In a ``trial`` every error of the
    forward or backward pass is reported as an unsupported model."""
    import backpack
    from backpack.extensions import DiagHessian

    for p in ext.params.values():
        p.grad = None
    inputs = inputs.contiguous()  # channels_last inputs: see _contiguous
    try:
        out = ext.module(inputs)
    except RuntimeError as exc:
        if trial:
            raise _translate(exc, ext.tracker, ext.converted) from exc
        raise
    _check_output(ext.loss, out)
    loss = ext.loss(out, targets)
    check_finite_loss(loss, what)
    try:
        with backpack.backpack(DiagHessian()):
            loss.backward()
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # the forward ran: a failure here is one of BackPACK's rules
        raise _translate(exc, ext.tracker, ext.converted) from exc
    diag: dict[str, torch.Tensor | None] = {}
    for name in names:
        p = ext.params.get(name)
        d = getattr(p, "diag_h", None) if p is not None else None
        if d is None:
            if p is not None and p.grad is not None:
                raise _refuse(
                    f"parameter '{name}' reaches the loss through an operation BackPACK cannot "
                    "see, so it computed no Hessian diagonal for it"
                )
            diag[name] = None  # the parameter does not influence the loss: zero curvature
        else:
            del p.diag_h
            diag[name] = d.detach()
    for p in ext.params.values():
        p.grad = None
    return diag


def _verify(problem: CurvatureProblem, ext: _Extended) -> dict[str, Any]:
    """Compare BackPACK's diagonal on one sample with exact autograd HVPs (one coordinate per
    parameter tensor: its largest diagonal entry). Raise when they disagree."""
    inputs, targets = problem.batches[0]
    x1, y1 = inputs[:1], targets[:1]
    diag = _diag_of_batch(ext, problem.names, x1, y1, "the verification sample", trial=True)
    ref = copy.deepcopy(problem.model)
    ref_params = dict(ref.named_parameters())
    params = [ref_params[n] for n in problem.names]
    loss = copy.deepcopy(problem.loss_fn)(ref(x1), y1)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    tol = 1e-8 if problem.dtype == torch.float64 else 1e-3
    worst = 0.0
    checked = 0
    for name, p, g in zip(problem.names, params, grads, strict=True):
        d = diag[name]
        if g is None or not g.requires_grad:
            exact = 0.0
            idx = 0
            got = 0.0 if d is None else float(d.reshape(-1)[0])
        else:
            flat = d.reshape(-1) if d is not None else torch.zeros(p.numel(), dtype=p.dtype)
            idx = int(flat.abs().argmax())
            e = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
            e[idx] = 1.0
            (hv,) = torch.autograd.grad(
                g, p, grad_outputs=e.view_as(p), retain_graph=True, allow_unused=True
            )
            exact = 0.0 if hv is None else float(hv.reshape(-1)[idx])
            got = float(flat[idx])
            checked += 1
        scale = max(abs(exact), abs(got), 1e-12)
        err = abs(got - exact) / scale
        worst = max(worst, err)
        if err > tol and abs(got - exact) > 1e-10:
            raise _refuse(
                f"BackPACK's Hessian diagonal disagrees with autograd on parameter '{name}' "
                f"(entry {idx}: {got:.6g} vs exact {exact:.6g}); the forward uses an operation "
                "BackPACK cannot see"
            )
    return {"verify_hvps": checked, "verify_max_rel_error": worst}


class BackpackBackend(Backend):
    """The exact Hessian diagonal and trace through BackPACK's ``DiagHessian`` extension.

    Supported models are chains of the layers :func:`supported_layers` lists (possibly inside
    custom modules, with ``flatten`` calls, or one such layer alone), with a loss
    :func:`supported_losses` lists. Everything else is refused before any work by
    :meth:`validate_model` (or, for the loss, at the start of :meth:`compute`) with the module's
    path, type and the reason.
    """

    name = "backpack"
    description = "BackPACK DiagHessian: exact Hessian diagonal and trace (plain CNNs/MLPs only)"
    quantities = frozenset({"trace", "diagonal"})
    exact = True
    requires = ("backpack",)
    install_hint = _INSTALL
    supports_distributed = True
    options = (
        Option(
            "verify",
            bool,
            False,
            "before measuring, compare BackPACK's diagonal on one sample with exact autograd "
            "HVPs (one entry per parameter tensor); always on for models torch.fx cannot trace",
        ),
    )

    @classmethod
    def validate_model(cls, model: Any) -> None:
        """Refuse, before any work, a model BackPACK cannot differentiate exactly (see module doc).

        Raises:
            UnsupportedModelError: naming the first unsupported module (dotted path and type) and
                suggesting ``backend="pyhessian"`` or ``"hutchpp"``.
        """
        from importlib.util import find_spec

        if find_spec("backpack") is None:
            return  # nothing to ask; the registry refuses the backend with the install command
        _plan(model)

    def compute(
        self,
        problem: CurvatureProblem,
        quantity: str,
        *,
        seed: int,
        options: Mapping[str, Any],
    ) -> CurvatureResult:
        del seed  # exact: nothing random
        _check_loss(problem.loss_fn)
        for i, (inputs, targets) in enumerate(problem.batches):
            _check_targets(problem.loss_fn, targets, i)
            if not isinstance(inputs, torch.Tensor):
                raise UnsupportedModelError(
                    f"backend 'backpack' needs each batch's inputs as one tensor; batch {i} has "
                    f"{type(inputs).__name__}. {_ALTERNATIVES}"
                )
        plan = _plan(problem.model)
        shapes = {n: p.shape for n, p in zip(problem.names, problem.params, strict=True)}
        details: dict[str, Any] = {
            "extension": "DiagHessian",
            "backpack_version": _backpack_version(),
            "converter": plan.convert,
            "traced": plan.graph is not None,
        }
        if plan.untraced_reason is not None:
            details["untraced_reason"] = plan.untraced_reason
        sizes = [_batch_size(x, y) for x, y in problem.batches]
        acc = {
            n: torch.zeros(s, dtype=problem.dtype, device=problem.device) for n, s in shapes.items()
        }
        failure: BaseException | None = None
        try:  # local, sample-weighted sums; every rank then agrees before any payload collective
            with _quiet_hooks():
                ext = _extend(problem, plan)
                if options["verify"] or not plan.static:
                    details.update(_verify(problem, ext))
                for b, ((inputs, targets), n_b) in enumerate(
                    zip(problem.batches, sizes, strict=True)
                ):
                    diag = _diag_of_batch(ext, problem.names, inputs, targets, f"batch {b}")
                    for name, d in diag.items():
                        if d is not None:
                            acc[name].add_(d, alpha=float(n_b))
                del ext
        except Exception as exc:
            failure = exc
        # Raises on every rank if any rank failed; otherwise the global sample count.
        total = agree(failure, float(sum(sizes)), device=problem.device)
        if world_size() > 1:
            acc = _all_reduce(acc, problem)
            details["world_size"] = dist.get_world_size()
        for n in problem.names:
            acc[n] = acc[n] / total
        layers = {n: float(acc[n].sum(dtype=torch.float64)) for n in problem.names}
        bad = [n for n in problem.names if not bool(torch.isfinite(acc[n]).all())]
        if bad:
            raise NonFiniteError(
                f"the Hessian diagonal is not finite for {', '.join(bad)}. Check the model and "
                "data (diverged parameters, NaN inputs, a loss that overflows)."
            )
        trace = math.fsum(layers.values())
        common = dict(
            backend=self.name,
            quantity=quantity,
            stderr=0.0,
            n_hvp=0,
            seconds=0.0,
            seed=None,
            device=str(problem.device),
            exact=True,
            method="backpack-diag-hessian",
            dim=problem.dim,
            layers=layers,
        )
        if quantity == "trace":
            return CurvatureResult(value=trace, details=details, **common)
        if quantity == "diagonal":
            return CurvatureResult(value=acc, details={**details, "trace": trace}, **common)
        raise AssertionError(f"unhandled quantity {quantity!r}")  # the registry checked it


def _all_reduce(acc: dict[str, torch.Tensor], problem: CurvatureProblem) -> dict[str, torch.Tensor]:
    """The per-parameter sums of every rank, in one all-reduce of the flattened diagonal."""
    flat = torch.cat([acc[n].reshape(-1) for n in problem.names])
    buf = flat.to(_comm_device(problem))
    dist.all_reduce(buf)
    flat = buf.to(problem.device)
    out: dict[str, torch.Tensor] = {}
    start = 0
    for n in problem.names:
        k = acc[n].numel()
        out[n] = flat[start : start + k].view(acc[n].shape)
        start += k
    return out


def _comm_device(problem: CurvatureProblem) -> torch.device:
    backend = str(dist.get_backend()).lower()
    return torch.device("cpu") if ("gloo" in backend or "mpi" in backend) else problem.device


def _backpack_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("backpack-for-pytorch")
    except PackageNotFoundError:
        return None


@hookimpl
def register_backends(register: Any) -> None:
    register(BackpackBackend)
