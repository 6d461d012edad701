"""The Hessian of a network's loss as a linear operator, multiplied through PyHessian.

The gradient graph of each batch is built once with ``torch.autograd.grad(create_graph=True)`` —
never ``backward()``, so no parameter's ``.grad`` is written — and every Hessian-vector product is a
second differentiation of that graph via :func:`pyhessian.utils.hessian_vector_product` (the same
primitive PyHessian's own estimators use). A block of probes can instead be multiplied in one
vectorised call (``is_grads_batched=True``); both paths give the same products to float tolerance.

Parameters that do not influence the loss ("unused") have zero rows and columns: they are kept in
the operator's dimension (they are trainable, with zero curvature) but never differentiated, which
is what makes PyHessian's own HVP crash on them.

Under an initialised ``torch.distributed`` process group of more than one process
(``distributed=True``), each rank multiplies the same probes with its local batches, scaled by
``local samples / global samples``, and one all-reduce of that sum gives the product with the
Hessian of the mean loss over the union of all ranks' samples. The reduced products are identical
on every rank, so estimators built on them take the same branches and return bit-identical numbers
everywhere. A failure on one rank never leaves the others waiting: see
:func:`deconcnn_curvature.distributed.rank_agreement`.

**How one product is computed** is the operator's ``hvp_path``:

- ``"double_backward"`` (the default on every device): the second differentiation of the gradient
  graph described above, built once per batch and reused by every product;
- ``"forward_over_reverse"``: ``torch.func.jvp`` over ``torch.func.grad`` of the loss through
  ``torch.func.functional_call`` (Pearlmutter's R-operator), one forward and backward pass per
  product and no graph kept; ``probe_batch > 1`` maps it over the probes with ``torch.func.vmap``.

Both give the same products to float tolerance. ``benchmarks/hvp_paths.py`` measured the
double backward as the cheaper one on the CPU (2.6–2.8 gradients per product on
``resnet18_cifar`` width 1/8, batch 128, against 3.6–3.7 for forward-over-reverse), hence the
default. ``hvp_path=None`` reads the environment variable :data:`ENV_HVP_PATH`
(``DECONCNN_CURVATURE_HVP_PATH``), so a path can be forced for every measurement of a run
without touching the code (``"auto"`` = the default).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from deconcnn_curvature.distributed import check_backend_device, current_agreement
from deconcnn_curvature.errors import (
    BackendFailedError,
    InvalidOptionError,
    InvalidProblemError,
    NonFiniteError,
)
from deconcnn_curvature.problem import CurvatureProblem, _batch_size, check_finite_loss

__all__ = ["ENV_HVP_PATH", "HVP_PATHS", "HessianOperator", "resolve_hvp_path"]

#: How one Hessian-vector product can be computed (see the module docstring).
HVP_PATHS = ("double_backward", "forward_over_reverse")
#: Environment variable read when ``hvp_path`` is not given: a name from :data:`HVP_PATHS` or
#: ``auto`` (empty = ``auto``).
ENV_HVP_PATH = "DECONCNN_CURVATURE_HVP_PATH"


def resolve_hvp_path(hvp_path: str | None, device: torch.device) -> str:
    """The product path to use: ``hvp_path``, else :data:`ENV_HVP_PATH`, else the device's
    default (``"double_backward"``: the fastest measured on the CPU, and today's on CUDA, where
    ``benchmarks/hvp_paths.py --device cuda`` is the measurement to make before changing it)."""
    source = "hvp_path"
    if hvp_path is None:
        hvp_path, source = os.environ.get(ENV_HVP_PATH, "") or "auto", ENV_HVP_PATH
    value = str(hvp_path).strip().lower().replace("-", "_")
    if value == "auto":
        return "double_backward"
    if value not in HVP_PATHS:
        raise InvalidOptionError(
            f"{source} must be one of auto, {', '.join(HVP_PATHS)}; got {hvp_path!r}. Unset "
            f"{ENV_HVP_PATH} (or pass hvp_path='auto') for the default."
        )
    return value


class HessianOperator:
    """``H = ∇²_θ L(θ)`` for a :class:`~deconcnn_curvature.problem.CurvatureProblem`.

    Args:
        problem: the model, loss, batches and trainable parameters (call inside
            :func:`~deconcnn_curvature.problem.preserve_state`).
        probe_batch: how many probes one autograd call multiplies. ``1`` uses PyHessian's
            sequential product; ``> 1`` uses a vectorised batched product.
        retain_graphs: with several batches, keep every batch's gradient graph in memory (fast) or
            rebuild them on each ``matmat`` (memory of one batch). A single batch is always kept.
        distributed: all-reduce products across the default process group.
        hvp_path: how one product is computed: ``"double_backward"``, ``"forward_over_reverse"``,
            ``"auto"``, or ``None`` (the :data:`ENV_HVP_PATH` environment variable, else auto);
            see :func:`resolve_hvp_path`. Every path gives the same products to float tolerance.
    """

    def __init__(
        self,
        problem: CurvatureProblem,
        *,
        probe_batch: int = 1,
        retain_graphs: bool = False,
        distributed: bool = False,
        hvp_path: str | None = None,
    ) -> None:
        self.problem = problem
        self.probe_batch = max(1, int(probe_batch))
        self.hvp_path = resolve_hvp_path(hvp_path, problem.device)
        self._functional = (
            _ForwardOverReverse(problem) if self.hvp_path == "forward_over_reverse" else None
        )
        self._n = 0
        self._slices = list(problem.slices().values())
        self._shapes = [p.shape for p in problem.params]
        self._dim = problem.dim
        # -- distributed: the agreement of the enclosing estimate() call, or our own.
        self._agreement = current_agreement(problem.device) if distributed else None
        self._distributed = self._agreement is not None
        if self._distributed:
            check_backend_device(problem.device)
        sizes = [_batch_size(x, y) for x, y in problem.batches]
        self._sizes = sizes
        local = float(sum(sizes))
        self._keep = retain_graphs or len(problem.batches) == 1
        # RNG state before each batch's first forward pass: a rebuilt graph replays it, so a model
        # measured in train mode (eval_mode=False) sees the same Dropout masks on every rebuild and
        # the operator stays one fixed symmetric matrix. The state guard restores the global RNG.
        self._rng: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._graphs: list[tuple[list[int], list[torch.Tensor]]] | None = None
        failure: Exception | None = None
        try:
            if self._keep:
                self._graphs = [self._gradient_graph(b) for b in range(len(problem.batches))]
        except Exception as exc:
            failure = exc
        if self._agreement is not None:
            # Every rank joins here, failed or not: the global sample count (a status all-reduce).
            self._total = self._agreement.status(failure, local)
        elif failure is not None:
            raise failure
        else:
            self._total = local

    # -- LinearOperator protocol --------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def dtype(self) -> torch.dtype:
        return self.problem.dtype

    @property
    def device(self) -> torch.device:
        return self.problem.device

    @property
    def n_matvecs(self) -> int:
        return self._n

    def matmat(self, v: torch.Tensor) -> torch.Tensor:
        """``H @ v`` for a ``(dim, k)`` block ``v``."""
        if v.ndim != 2 or v.shape[0] != self._dim:
            raise ValueError(f"expected a ({self._dim}, k) block, got {tuple(v.shape)}")
        k = v.shape[1]
        out = torch.zeros_like(v)
        failure: Exception | None = None
        try:
            for b in range(len(self.problem.batches)):
                live, grads = (
                    self._graphs[b] if self._graphs is not None else self._gradient_graph(b)
                )
                if live:
                    weight = self._sizes[b] / self._total
                    for start in range(0, k, self.probe_batch):
                        cols = slice(start, min(k, start + self.probe_batch))
                        out[:, cols] += weight * self._product(live, grads, v[:, cols])
                del live, grads
        except Exception as exc:
            failure = exc
        if self._agreement is not None:
            # A status first (did every rank compute its share?), then the one payload all-reduce.
            self._agreement.status(failure)
            dist.all_reduce(out)
        elif failure is not None:
            raise failure
        self._n += k
        # After the all-reduce, so every rank of a process group raises together.
        return _finite_products(out)

    def close(self) -> None:
        """Free the retained gradient graphs."""
        self._graphs = None

    # -- per-batch products (data-noise error bars) -------------------------------------------
    @property
    def group_sizes(self) -> list[int]:
        """Samples in each of this process's batches: the groups of :meth:`matmat_groups`."""
        return list(self._sizes)

    def matmat_groups(self, v: torch.Tensor) -> torch.Tensor:
        """``H_b @ v`` for every batch ``b``: a ``(B, dim, k)`` tensor.

        ``H_b`` is the Hessian of batch ``b``'s mean loss, so ``Σ_b (n_b / N) H_b @ v`` is
        :meth:`matmat`'s product: the same autograd calls, at the same cost (``k`` products are
        counted). Used by :func:`~deconcnn_curvature.linalg.two_way.grouped_hutchinson` for an
        interval that covers the data noise. Not available under a process group.
        """
        if self._distributed:
            raise BackendFailedError(
                "per-batch products are not available under torch.distributed; measure without "
                "data groups (data_groups=1)."
            )
        if v.ndim != 2 or v.shape[0] != self._dim:
            raise ValueError(f"expected a ({self._dim}, k) block, got {tuple(v.shape)}")
        k = v.shape[1]
        out = v.new_zeros((len(self.problem.batches), *v.shape))
        for b in range(len(self.problem.batches)):
            live, grads = self._graphs[b] if self._graphs is not None else self._gradient_graph(b)
            if live:
                for start in range(0, k, self.probe_batch):
                    cols = slice(start, min(k, start + self.probe_batch))
                    out[b, :, cols] = self._product(live, grads, v[:, cols])
            del live, grads
        self._n += k
        return _finite_products(out)

    # -- internals ----------------------------------------------------------------------------
    def _gradient_graph(self, b: int) -> tuple[list[int], list[torch.Tensor]]:
        problem = self.problem
        inputs, targets = problem.batches[b]
        first_build = b not in self._rng
        self._replay_rng(b)
        if self._functional is not None:
            # Forward-over-reverse keeps no graph: what a batch needs is a closure that replays
            # its RNG state before each product's forward pass (checked once here, like a graph).
            if first_build:
                with torch.no_grad():
                    _check_loss(problem.loss_fn(problem.model(inputs), targets), b, finite=True)
            return self._functional.prepare(b, lambda: self._replay_rng(b))
        loss = problem.loss_fn(problem.model(inputs), targets)
        # The finiteness check is a host synchronisation on CUDA: once per batch, not at every
        # rebuild (a rebuild replays the same parameters, inputs and RNG state).
        _check_loss(loss, b, finite=first_build)
        grads = torch.autograd.grad(loss, problem.params, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        return live, [grads[i] for i in live]

    def _replay_rng(self, b: int) -> None:
        cuda = self.problem.device.type == "cuda"
        saved = self._rng.get(b)
        if saved is None:
            cuda_state = torch.cuda.get_rng_state(self.problem.device) if cuda else None
            self._rng[b] = (torch.get_rng_state(), cuda_state)
            return
        torch.set_rng_state(saved[0])
        if saved[1] is not None:
            torch.cuda.set_rng_state(saved[1], self.problem.device)

    def _product(self, live: list[int], grads: list[torch.Tensor], v: torch.Tensor) -> torch.Tensor:
        if self._functional is not None:
            return self._functional.product(grads, v, self.probe_batch)
        params = [self.problem.params[i] for i in live]
        k = v.shape[1]
        if k == 1:
            vecs = [v[self._slices[i], 0].view(self._shapes[i]) for i in live]
            # Imported here, where it is used: `import deconcnn_curvature` must not need PyHessian
            # (the backends' own "pyhessian is missing" message could never show otherwise).
            from pyhessian.utils import hessian_vector_product

            try:
                hv = hessian_vector_product(grads, params, vecs)
            except RuntimeError as exc:
                if "appears to not have been used" not in str(exc):
                    raise
                # A parameter reaches the loss only linearly: its Hessian rows are zero.
                hv = torch.autograd.grad(
                    grads, params, grad_outputs=vecs, retain_graph=True, allow_unused=True
                )
            cols = [h.reshape(-1, 1) if h is not None else None for h in hv]
        else:
            vecs = [v[self._slices[i]].T.reshape(k, *self._shapes[i]) for i in live]
            hv = torch.autograd.grad(
                grads,
                params,
                grad_outputs=vecs,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
            cols = [h.reshape(k, -1).T if h is not None else None for h in hv]
        out = torch.zeros_like(v)
        for i, col in zip(live, cols, strict=True):
            if col is not None:
                out[self._slices[i]] = col
        return out


def _finite_products(out: torch.Tensor) -> torch.Tensor:
    """``out`` (Hessian-vector products, whole or per batch), or :class:`NonFiniteError`.

    Caught here, not by each estimator: Lanczos would otherwise fail inside eigh on a NaN
    tridiagonal matrix and surface as an unrelated linear-algebra error.
    """
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteError(
            "a Hessian-vector product was not finite although the loss is; the curvature "
            "is undefined at these parameters (e.g. sqrt or log at 0, overflow). Check the "
            "model, its parameters and the data."
        )
    return out


def _check_loss(loss: object, b: int, *, finite: bool) -> None:
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise InvalidProblemError(
            f"loss_fn must return a scalar (mean-reduced) loss tensor, got {shape}; reduce it "
            "with .mean() over the batch."
        )
    if finite:
        check_finite_loss(loss, f"batch {b}")


class _FunctionalBatch:
    """One batch's loss as a function of the trainable parameters (no graph is kept), and how to
    replay the RNG state of its first forward pass (the same Dropout masks at every product)."""

    def __init__(
        self,
        loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        replay_rng: Callable[[], None],
    ) -> None:
        self.loss_of = loss_of
        self.replay_rng = replay_rng


class _ForwardOverReverse:
    """``H v = ∂/∂ε ∇L(θ + εv)`` by ``torch.func.jvp`` over ``torch.func.grad`` (Pearlmutter's
    R-operator, forward-mode over reverse-mode), through ``torch.func.functional_call`` on the
    trainable parameters; every other parameter and buffer is the module's own. ``k > 1`` probes
    are mapped with ``torch.func.vmap`` (one Dropout mask for all of them: ``randomness="same"``).
    Unused parameters get zero rows, as in the double backward."""

    def __init__(self, problem: CurvatureProblem) -> None:
        self.problem = problem
        self.names = list(problem.names)
        self.slices = list(problem.slices().values())
        self.shapes = [p.shape for p in problem.params]

    def prepare(self, b: int, replay_rng: Callable[[], None]) -> tuple[list[int], list]:
        problem = self.problem
        inputs, targets = problem.batches[b]

        def loss_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
            # Buffers are copied inside the transformed function: a model measured in train mode
            # (eval_mode=False) updates BatchNorm's running statistics in place, which torch.func
            # refuses on a captured tensor; the copies take the update and are dropped (the
            # output uses the batch statistics, so the product is unaffected).
            buffers = {n: b.clone() for n, b in problem.model.named_buffers()}
            out = torch.func.functional_call(
                problem.model, (params, buffers), (inputs,), strict=False
            )
            return problem.loss_fn(out, targets)

        return list(range(len(problem.params))), [_FunctionalBatch(loss_of, replay_rng)]

    def product(self, state: list, v: torch.Tensor, probe_batch: int) -> torch.Tensor:
        (batch,) = state
        primals = {n: p.detach() for n, p in zip(self.names, self.problem.params, strict=True)}
        grad_fn = torch.func.grad(batch.loss_of)

        def hvp(tangents: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return torch.func.jvp(grad_fn, (primals,), (tangents,))[1]

        k = v.shape[1]
        out = torch.empty_like(v)
        if k == 1 or probe_batch == 1:
            for j in range(k):
                tangents = {
                    n: v[sl, j].reshape(shape)
                    for n, sl, shape in zip(self.names, self.slices, self.shapes, strict=True)
                }
                batch.replay_rng()
                hv = hvp(tangents)
                for n, sl in zip(self.names, self.slices, strict=True):
                    out[sl, j] = hv[n].reshape(-1)
            return out
        tangents = {
            n: v[sl].T.reshape(k, *shape)
            for n, sl, shape in zip(self.names, self.slices, self.shapes, strict=True)
        }
        batch.replay_rng()
        hv = torch.func.vmap(hvp, randomness="same")(tangents)
        for n, sl in zip(self.names, self.slices, strict=True):
            out[sl] = hv[n].reshape(k, -1).T
        return out
