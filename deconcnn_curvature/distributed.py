"""Agreement among the ranks of a ``torch.distributed`` process group.

A curvature computation spans :func:`world_size` processes (1 without a process group or inside
:func:`local_only`). Every collective a measurement makes goes through :func:`rank_agreement`, so a
failure on one rank never leaves the others waiting in a collective they will not all make.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.distributed as dist

from deconcnn_curvature.errors import BackendFailedError, InvalidProblemError

__all__ = ["RankAgreement", "agree", "local_only", "rank_agreement", "world_size"]


# == Distributed agreement ===========================================================
# Every collective of a distributed measurement is either a *status* — one all-reduce of the
# fixed-shape ``[failed, value]`` — or a *payload* (the products), and a payload is only sent
# after a status in which no rank failed. A rank that fails anywhere (preparing its data, in its
# local products, in backend code between products) takes part in exactly one more status, with
# its flag set, and stops. Every other rank's next collective is a status too, so it sees the flag
# and stops as well: all ranks make the same sequence of collective calls, and none is ever left
# waiting in one its peers will not make.

_ACTIVE: contextvars.ContextVar[RankAgreement | None] = contextvars.ContextVar(
    "deconcnn_curvature_rank_agreement", default=None
)
#: Bytes of each failing rank's reason shared with its peers.
_REASON_BYTES = 480


#: Set by :func:`local_only`: this context ignores the process group.
_LOCAL: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "deconcnn_curvature_local_only", default=False
)


def world_size() -> int:
    """Processes a curvature computation here spans: the default process group's size, or 1
    without one (or inside :func:`local_only`)."""
    if _LOCAL.get():
        return 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


_world_size = world_size


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Compute with this process's data alone, as if there were no process group: no
    collective is made, so one rank may measure while the others do not (``estimate(...,
    distributed=False)``)."""
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def check_backend_device(device: torch.device) -> None:
    backend = str(dist.get_backend()).lower()
    if device.type == "cpu" and backend == "nccl":
        raise InvalidProblemError(
            "the default process group uses the 'nccl' backend, which cannot all-reduce the CPU "
            "model's Hessian-vector products; initialise it with backend='gloo' (or "
            "'cpu:gloo,cuda:nccl'), or move the model to its rank's GPU."
        )


class RankAgreement:
    """Lockstep failure agreement among the ranks of the default process group.

    :meth:`status` is the only collective it makes: an all-reduce of ``[failed, value]`` that
    returns the sum of ``value`` over ranks when no rank failed and raises on *every* rank when one
    did — the failing rank re-raises its own exception, the others a
    :class:`~deconcnn_curvature.errors.BackendFailedError` carrying the failing rank's reason.
    After a failed status the agreement is ``terminated`` and makes no further collective.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.terminated = False
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def _tensor_device(self) -> torch.device:
        # The same device type on every rank, or the collectives would go to different backends.
        backend = str(dist.get_backend()).lower()
        if "gloo" in backend or "mpi" in backend or "cpu" in backend:
            return torch.device("cpu")
        if self.device is not None and self.device.type != "cpu":
            return self.device
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def status(self, failure: BaseException | None, value: float = 0.0) -> float:
        """All-reduce ``[failed, value]``: the global sum of ``value``, or raise on every rank."""
        if self.terminated:
            raise BackendFailedError(
                "this distributed computation was already abandoned after a failure on a rank; "
                "start a new one (a new estimate() call)."
            )
        device = self._tensor_device()
        flags = torch.tensor(
            [1.0 if failure is not None else 0.0, float(value)], dtype=torch.float64, device=device
        )
        dist.all_reduce(flags)
        failed, total = flags.tolist()  # the one host synchronisation of a status
        if failed == 0:
            return total
        self.terminated = True
        reasons = self._share_reasons(failure, device)
        if failure is not None:
            raise failure
        who = ", ".join(f"rank {r}: {text}" for r, text in reasons)
        raise BackendFailedError(
            f"{len(reasons)} of {self.world_size} ranks failed during a distributed curvature "
            f"computation ({who}); every rank abandons it together, so no rank is left waiting."
        )

    def _share_reasons(
        self, failure: BaseException | None, device: torch.device
    ) -> list[tuple[int, str]]:
        # Symmetric: every rank knows a rank failed, so every rank takes part in this one too.
        table = torch.zeros(self.world_size, _REASON_BYTES, dtype=torch.int32, device=device)
        if failure is not None:
            text = f"{type(failure).__name__}: {failure}".encode()[:_REASON_BYTES]
            table[self.rank, : len(text)] = torch.tensor(list(text), dtype=torch.int32)
        dist.all_reduce(table)
        out = []
        for rank, row in enumerate(table.cpu().tolist()):
            raw = bytes(b for b in row if b)
            if raw:
                out.append((rank, raw.decode(errors="replace")))
        return out


def current_agreement(device: torch.device | None) -> RankAgreement | None:
    """The active agreement (see :func:`rank_agreement`), a new one, or ``None`` (one process)."""
    if _world_size() <= 1:
        return None
    agreement = _ACTIVE.get()
    if agreement is None:
        # An operator used outside estimate(): its own failures are still agreed on.
        agreement = RankAgreement(device)
    elif agreement.device is None:
        agreement.device = device
    return agreement


def agree(
    failure: BaseException | None = None,
    value: float = 0.0,
    *,
    device: torch.device | None = None,
) -> float:
    """One status exchange, for a backend that makes its own collectives.

    Call it on every rank right before each of the backend's payload all-reduces, passing the
    exception this rank's local work raised (``None`` if it succeeded) and a number to sum over
    ranks (e.g. the local sample count): it returns the sum, or raises on every rank if any rank
    failed. Without a process group of more than one rank it returns ``value`` (or raises
    ``failure``).
    """
    agreement = current_agreement(device)
    if agreement is None:
        if failure is not None:
            raise failure
        return float(value)
    return agreement.status(failure, value)


@contextlib.contextmanager
def rank_agreement(
    device: torch.device | None = None, *, enabled: bool = True
) -> Iterator[RankAgreement | None]:
    """Make the body fail on every rank, or on none, under a ``torch.distributed`` process group.

    Every rank must enter the block (it is collective). Inside, operators built with
    ``distributed=True`` agree on each step (see :class:`RankAgreement`). On leaving, one more
    status is exchanged: a rank whose body raised sends its failure flag (if it has not already),
    so the other ranks raise too — wherever they were, their next collective is a status. Nested
    blocks join the outermost one. Without a process group of more than one rank (or with
    ``enabled=False``) it does nothing and yields ``None``.

    Args:
        device: where status tensors live when the backend cannot use CPU tensors (NCCL): the
            model's device; default the current CUDA device.
        enabled: ``False`` turns it off (for a code path that makes no collective).
    """
    if not enabled or _world_size() <= 1:
        yield None
        return
    current = _ACTIVE.get()
    if current is not None:
        yield current
        return
    agreement = RankAgreement(device)
    token = _ACTIVE.set(agreement)
    try:
        yield agreement
    except Exception as exc:
        _ACTIVE.reset(token)
        if not agreement.terminated:
            try:
                agreement.status(exc)
            except Exception as raised:
                if raised is not exc:
                    raise
        raise
    else:
        _ACTIVE.reset(token)
        if not agreement.terminated:
            agreement.status(None)
