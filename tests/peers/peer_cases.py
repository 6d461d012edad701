"""The peers' test problems, rebuilt here: every recipe of curvlinops' ``test/cases.py`` and
``test/kfac_cases.py`` and every DiagHessian setting of BackPACK's test suite
(``test/extensions/secondorder``), as architecture, loss, data shapes and seed — our own code.

Each :class:`PeerCase` builds a float64 model, its loss and a list of ``(inputs, targets)``
batches from a seeded generator (inputs uniform in [0, 1) as in both suites; regression targets
uniform, class targets uniform integers). A recipe with ``reduction="sum"`` appears twice: as
itself (every backend must refuse it: curvature is defined here for the mean loss) and as
``<id>-as-mean``, the same problem with the mean-reduced loss, which is measured. Devices are
not multiplied out: everything runs on the CPU.
"""

from __future__ import annotations

import functools
import itertools
from collections import UserDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("backpack")  # BackPACK's own Pad and Slicing modules are in its recipes
from backpack.custom_module.pad import Pad
from backpack.custom_module.slicing import Slicing

__all__ = ["ALL_CASES", "MEASURED", "SUM_REDUCED", "PeerCase"]

Batches = list[tuple[Any, torch.Tensor]]
DataFn = Callable[[torch.Generator], Batches]
D64 = torch.float64


@dataclass(frozen=True)
class PeerCase:
    """One peer test problem. ``backpack`` is None where our BackPACK backend must equal the
    dense Hessian, else a regex of its refusal (the reason); ``backpack_f32`` adds a float32 check
    for layers BackPACK runs only in float32."""

    id: str
    source: str  # "curvlinops cases.py" | "curvlinops kfac_cases.py" | "BackPACK DiagHessian"
    build: Callable[[], nn.Module]
    loss: Callable[[], nn.Module]
    data: DataFn
    backpack: str | None = None
    backpack_f32: bool = False
    seed: int = 0

    @property
    def reduction(self) -> str:
        return self.loss().reduction

    def make(self) -> tuple[nn.Module, nn.Module, Batches]:
        """A fresh float64 model (initialised from ``seed``, global RNG left alone), loss and
        batches (from a generator seeded with ``seed``)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = self.build().double()
        return model, self.loss(), self.data(torch.Generator().manual_seed(self.seed))


# -- data recipes ------------------------------------------------------------------------------
def _x(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=g, dtype=D64)


def _cls(g: torch.Generator, shape: Sequence[int], classes: int) -> torch.Tensor:
    return torch.randint(0, classes, tuple(shape), generator=g)


def classify(sizes: Sequence[Sequence[int]], classes: int, target: Sequence[int] = ()) -> DataFn:
    """Batches of inputs ``sizes[i]`` with class targets of shape ``(n, *target)``."""
    return lambda g: [(_x(g, *s), _cls(g, (s[0], *target), classes)) for s in sizes]


def regress(sizes: Sequence[Sequence[int]], target: Sequence[int]) -> DataFn:
    """Batches of inputs ``sizes[i]`` with uniform targets of shape ``(n, *target)``."""
    return lambda g: [(_x(g, *s), _x(g, s[0], *target)) for s in sizes]


def as_dicts(data: DataFn) -> DataFn:
    """The first batch's input as a ``UserDict({"x": ...})``, the others as ``{"x": ...}``."""

    def make(g: torch.Generator) -> Batches:
        batches = data(g)
        return [(UserDict({"x": x}) if i == 0 else {"x": x}, y) for i, (x, y) in enumerate(batches)]

    return make


def loader_batches(n: int, batch: int, classes: int, *, shuffle: bool, drop_last: bool) -> DataFn:
    """What a ``DataLoader`` over ``n`` samples yields (features 10), drawn with our generator:
    the batches are handed over as a list, so the dense reference sees the same ones."""

    def make(g: torch.Generator) -> Batches:
        x, y = _x(g, n, 10), _cls(g, (n,), classes)
        order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
        stop = n - n % batch if drop_last else n
        return [(x[order[i : i + batch]], y[order[i : i + batch]]) for i in range(0, stop, batch)]

    return make


# -- models ------------------------------------------------------------------------------------
class DictInput(nn.Module):
    """A model reading its input from ``batch["x"]`` (curvlinops' dict-input recipe)."""

    def __init__(self, out: int, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 5), act(), nn.Linear(5, out))

    def forward(self, batch: Any) -> torch.Tensor:
        return self.net(batch["x"])


class SharedWeights(nn.Module):
    """Layers applied along extra (weight-sharing) axes of the input, then the output reshaped
    for the loss: ``"classes-first"`` moves the last axis to axis 1 (for cross-entropy over a
    sequence), ``"mean"`` averages the extra axes away, ``"keep"`` leaves it."""

    def __init__(self, *layers: nn.Module, head: str = "keep") -> None:
        super().__init__()
        self.body = nn.Sequential(*layers)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if self.head == "classes-first":
            return out.movedim(-1, 1)
        if self.head == "mean":
            return out.flatten(1, -2).mean(1)
        return out


class ConvChannelsLast(nn.Module):
    """``Conv2d(3, 2, 4, padding=2)`` with its output as (batch, h, w, channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 4, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).permute(0, 2, 3, 1)


class FunctionalMLP(nn.Module):
    """A two-layer ReLU network written with ``F.linear`` on raw parameters (curvlinops' case of
    a plain function with a parameter dict)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.rand(5, 10)), nn.Parameter(torch.rand(5))
        self.w2, self.b2 = nn.Parameter(torch.rand(3, 5)), nn.Parameter(torch.rand(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.relu(F.linear(x, self.w1, self.b1)), self.w2, self.b2)


def _bn_mlp() -> nn.Module:
    bn = nn.BatchNorm1d(5)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(5))
        bn.bias.copy_(torch.rand(5))
    return nn.Sequential(nn.Linear(10, 5), bn, nn.ReLU(), nn.Linear(5, 2))


def mlp(*sizes: int, act: type[nn.Module] | None = nn.ReLU) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            if act is not None and i < len(sizes) - 2:
                layers.append(act())
        return nn.Sequential(*layers)

    return build


def _frozen_head(body: Sequence[nn.Module], features: int, classes: int = 5) -> nn.Module:
    head = nn.Linear(features, classes)
    head.requires_grad_(False)  # as in BackPACK's settings: only the layers under test train
    return nn.Sequential(*body, nn.Flatten(), head)


def _features(body: Callable[[], Sequence[nn.Module]], shape: Sequence[int]) -> int:
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        return nn.Sequential(*body())(torch.zeros(*shape)).flatten(1).shape[1]


def frozen_head_cnn(body: Callable[[], Sequence[nn.Module]], shape: Sequence[int]):
    feat = _features(body, shape)
    return lambda: _frozen_head(body(), feat)


# -- losses ------------------------------------------------------------------------------------
def ce(reduction: str = "mean") -> Callable[[], nn.Module]:
    return lambda: nn.CrossEntropyLoss(reduction=reduction)


def mse(reduction: str = "mean") -> Callable[[], nn.Module]:
    return lambda: nn.MSELoss(reduction=reduction)


def bce(reduction: str = "mean") -> Callable[[], nn.Module]:
    return lambda: nn.BCEWithLogitsLoss(reduction=reduction)


# -- refusal reasons of our BackPACK backend (regexes) ----------------------------------------
BP_DICT = r"computes `getitem` outside a layer module"
BP_BN = r"\(BatchNorm1d\) is a normalisation layer"
BP_MSE_ND = r"MSELoss rule needs 2-D outputs"
BP_BCE = r"BCEWithLogitsLoss rule needs outputs of shape \(batch, 1\)"
BP_MOVE = r"tensor method `\.movedim\(\)`"
BP_MEAN = r"tensor method `\.flatten\(\)`|tensor method `\.mean\(\)`"
BP_PERMUTE = r"tensor method `\.permute\(\)`"
BP_RAW = r"uses the tensor attribute 'w1'"
BP_AVG64 = r"rule fails in float64"


# -- curvlinops: test/cases.py -----------------------------------------------------------------
CL = "curvlinops cases.py"
_CL_TWO = [(3, 10), (4, 10)]
_CL_SEQ = [(3, 5, 10), (4, 5, 10)]
CURVLINOPS_CASES: list[PeerCase] = [
    PeerCase("cl-mlp-ce", CL, mlp(10, 5, 3), ce(), classify(_CL_TWO, 3)),
    PeerCase("cl-mlp-ce-sum", CL, mlp(10, 5, 3), ce("sum"), classify(_CL_TWO, 3)),
    PeerCase("cl-mlp-bce-1out-soft", CL, mlp(10, 5, 1), bce(), regress(_CL_TWO, (1,))),
    PeerCase("cl-mlp-bce-2out-soft", CL, mlp(10, 5, 2), bce(), regress(_CL_TWO, (2,)), BP_BCE),
    PeerCase(
        "cl-mlp-bce-2out-soft-sum", CL, mlp(10, 5, 2), bce("sum"), regress(_CL_TWO, (2,)), BP_BCE
    ),
    PeerCase("cl-mlp-mse", CL, mlp(8, 5, 3), mse(), regress([(2, 8), (6, 8)], (3,))),
    PeerCase("cl-mlp-mse-sum", CL, mlp(8, 5, 3), mse("sum"), regress([(2, 8), (6, 8)], (3,))),
    PeerCase("cl-dict-ce", CL, lambda: DictInput(3), ce(), as_dicts(classify(_CL_TWO, 3)), BP_DICT),
    PeerCase(
        "cl-dict-bce-1out-soft",
        CL,
        lambda: DictInput(1),
        bce(),
        as_dicts(regress(_CL_TWO, (1,))),
        BP_DICT,
    ),
    PeerCase(
        "cl-dict-mse", CL, lambda: DictInput(2), mse(), as_dicts(regress(_CL_TWO, (2,))), BP_DICT
    ),
    PeerCase(
        "cl-seq-ce",
        CL,
        lambda: SharedWeights(*mlp(10, 5, 3)(), head="classes-first"),
        ce(),
        classify(_CL_SEQ, 3, (5,)),
        BP_MOVE,
    ),
    PeerCase(
        "cl-seq-ce-sum",
        CL,
        lambda: SharedWeights(*mlp(10, 5, 3)(), head="classes-first"),
        ce("sum"),
        classify(_CL_SEQ, 3, (5,)),
        BP_MOVE,
    ),
    PeerCase("cl-seq-bce-soft", CL, mlp(10, 5, 2), bce(), regress(_CL_SEQ, (5, 2)), BP_BCE),
    PeerCase(
        "cl-seq-bce-soft-sum", CL, mlp(10, 5, 2), bce("sum"), regress(_CL_SEQ, (5, 2)), BP_BCE
    ),
    PeerCase(
        "cl-seq-mse", CL, mlp(8, 5, 3), mse(), regress([(2, 5, 8), (6, 5, 8)], (5, 3)), BP_MSE_ND
    ),
    PeerCase(
        "cl-seq-mse-sum",
        CL,
        mlp(8, 5, 3),
        mse("sum"),
        regress([(2, 5, 8), (6, 5, 8)], (5, 3)),
        BP_MSE_ND,
    ),
    PeerCase(
        "cl-functional-mse", CL, FunctionalMLP, mse(), regress([(3, 10), (4, 10)], (3,)), BP_RAW
    ),
    PeerCase(
        "cl-cnn-ce",
        CL,
        lambda: nn.Sequential(
            nn.Conv2d(1, 3, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(3, 6, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(24, 10),
        ),
        ce(),
        classify([(5, 1, 20, 20), (5, 1, 20, 20)], 10),
    ),
    PeerCase(
        "cl-dropout-ce",
        CL,
        lambda: nn.Sequential(nn.Linear(10, 5), nn.Dropout(), nn.ReLU(), nn.Linear(5, 2)),
        ce(),
        loader_batches(12, 3, 2, shuffle=False, drop_last=False),
    ),
    PeerCase(
        "cl-batchnorm-ce",
        CL,
        _bn_mlp,
        ce(),
        loader_batches(12, 3, 2, shuffle=True, drop_last=False),
        BP_BN,
    ),
    PeerCase(
        "cl-drop-last-ce",
        CL,
        mlp(10, 5, 2),
        ce(),
        loader_batches(12, 5, 2, shuffle=True, drop_last=True),
    ),
]

# -- curvlinops: test/kfac_cases.py ------------------------------------------------------------
KF = "curvlinops kfac_cases.py"


def _both(case: PeerCase) -> list[PeerCase]:
    """kfac_cases.py runs its regression recipes with reduction mean and sum."""
    summed = replace(case, id=f"{case.id}-sum", loss=mse("sum"))
    return [case, summed]


KFAC_CASES: list[PeerCase] = [
    *_both(
        PeerCase(
            "kf-deep-linear-1out-mse",
            KF,
            mlp(6, 3, 1, act=None),
            mse(),
            regress([(2, 6), (5, 6)], (1,)),
        )
    ),
    *_both(
        PeerCase(
            "kf-deep-linear-3out-mse",
            KF,
            mlp(5, 4, 3, act=None),
            mse(),
            regress([(1, 5), (7, 5)], (3,)),
        )
    ),
    *_both(
        PeerCase(
            "kf-dict-deep-linear-mse",
            KF,
            lambda: DictInput(3, nn.Identity),
            mse(),
            as_dicts(regress([(1, 10), (7, 10)], (3,))),
            BP_DICT,
        )
    ),
    *_both(
        PeerCase(
            "kf-shared-expand-mse",
            KF,
            mlp(5, 4, 3, act=None),
            mse(),
            regress([(2, 4, 8, 5), (7, 4, 8, 5)], (4, 8, 3)),
            BP_MSE_ND,
        )
    ),
    *_both(
        PeerCase(
            "kf-shared-reduce-mse",
            KF,
            lambda: SharedWeights(nn.Linear(5, 4), nn.Linear(4, 3), head="mean"),
            mse(),
            regress([(1, 4, 8, 5), (7, 4, 8, 5)], (3,)),
            BP_MEAN,
        )
    ),
    *_both(
        PeerCase(
            "kf-conv-expand-mse",
            KF,
            ConvChannelsLast,
            mse(),
            regress([(2, 3, 8, 8), (7, 3, 8, 8)], (9, 9, 2)),
            BP_PERMUTE,
        )
    ),
    *_both(
        PeerCase(
            "kf-conv-reduce-mse",
            KF,
            lambda: nn.Sequential(
                nn.Conv2d(3, 2, 4, padding=2), nn.AdaptiveAvgPool2d(1), nn.Flatten()
            ),
            mse(),
            regress([(1, 3, 8, 8), (8, 3, 8, 8)], (2,)),
            BP_AVG64,
            backpack_f32=True,
        )
    ),
    PeerCase("kf-one-datum-ce", KF, mlp(5, 4, 3, act=None), ce(), classify([(1, 5)], 3)),
    PeerCase("kf-one-datum-ce-sum", KF, mlp(5, 4, 3, act=None), ce("sum"), classify([(1, 5)], 3)),
    PeerCase(
        "kf-one-datum-bce", KF, mlp(4, 3, 2, act=None), bce(), regress([(1, 4)], (2,)), BP_BCE
    ),
    PeerCase(
        "kf-one-datum-bce-sum",
        KF,
        mlp(4, 3, 2, act=None),
        bce("sum"),
        regress([(1, 4)], (2,)),
        BP_BCE,
    ),
    *_both(
        PeerCase(
            "kf-single-linear-1out-mse",
            KF,
            lambda: nn.Linear(6, 1),
            mse(),
            regress([(5, 6), (5, 6)], (1,)),
        )
    ),
    *_both(
        PeerCase(
            "kf-single-linear-3out-mse",
            KF,
            lambda: nn.Linear(5, 3),
            mse(),
            regress([(7, 5), (7, 5)], (3,)),
        )
    ),
    *_both(
        PeerCase(
            "kf-single-shared-expand-mse",
            KF,
            lambda: nn.Linear(5, 3),
            mse(),
            regress([(7, 4, 8, 5), (7, 4, 8, 5)], (4, 8, 3)),
            BP_MSE_ND,
        )
    ),
    *_both(
        PeerCase(
            "kf-single-shared-reduce-mse",
            KF,
            lambda: SharedWeights(nn.Linear(5, 3), head="mean"),
            mse(),
            regress([(8, 4, 8, 5), (8, 4, 8, 5)], (3,)),
            BP_MEAN,
        )
    ),
    *_both(
        PeerCase(
            "kf-single-conv-expand-mse",
            KF,
            ConvChannelsLast,
            mse(),
            regress([(7, 3, 8, 8), (7, 3, 8, 8)], (9, 9, 2)),
            BP_PERMUTE,
        )
    ),
    *_both(
        PeerCase(
            "kf-single-conv-reduce-mse",
            KF,
            lambda: nn.Sequential(
                nn.Conv2d(3, 2, 4, padding=2), nn.AdaptiveAvgPool2d(1), nn.Flatten()
            ),
            mse(),
            regress([(8, 3, 8, 8), (8, 3, 8, 8)], (2,)),
            BP_AVG64,
            backpack_f32=True,
        )
    ),
]

# -- BackPACK: DiagHessian settings (test/extensions/secondorder) ------------------------------
BP = "BackPACK DiagHessian"
_ACTS = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.LogSigmoid, nn.ELU, nn.SELU)
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def _args(args: Sequence[Any]) -> str:
    return "-".join(str(a).replace(" ", "").replace(",", "x") for a in args)


def _act_case(act: type[nn.Module], bias: bool, suffix: str = "") -> PeerCase:
    body = lambda: [nn.Conv2d(3, 2, 2, bias=bias), act()]  # noqa: E731
    return PeerCase(
        f"bp-act-{act.__name__}-{'bias' if bias else 'nobias'}{suffix}",
        BP,
        frozen_head_cnn(body, (3, 3, 7, 7)),
        ce(),
        classify([(3, 3, 7, 7)], 5),
    )


def _pool_case(shape: tuple[int, ...], pool: type[nn.Module], args: tuple[Any, ...]) -> PeerCase:
    conv = _CONV[len(shape) - 2]
    body = lambda: [conv(3, 2, 2), nn.ReLU(), pool(*args)]  # noqa: E731
    avg = "Avg" in pool.__name__
    return PeerCase(
        f"bp-{pool.__name__}-{_args(args)}",
        BP,
        frozen_head_cnn(body, shape),
        ce("sum"),
        classify([shape], 5),
        BP_AVG64 if avg else None,
        backpack_f32=avg,
    )


def _conv_case(shape: tuple[int, ...], conv: type[nn.Module], args: tuple[Any, ...]) -> PeerCase:
    body = lambda: [conv(*args), nn.ReLU()]  # noqa: E731
    return PeerCase(
        f"bp-{conv.__name__}-{_args(args)}",
        BP,
        frozen_head_cnn(body, shape),
        ce("sum"),
        classify([shape], 5),
    )


_LIN_EXTRA = [(3, 4, 5), (3, 4, 2, 5), (3, 4, 2, 3, 5)]
BACKPACK_CASES: list[PeerCase] = [
    PeerCase(
        "bp-example-linear-ce",
        BP,
        lambda: nn.Sequential(nn.Linear(10, 5)),
        ce(),
        classify([(3, 10)], 5),
    ),
    PeerCase("bp-deep-linear-ce", BP, mlp(10, 7, 5, act=None), ce(), classify([(3, 10)], 5)),
    PeerCase("bp-mlp-relu-ce-sum", BP, mlp(10, 7, 5), ce("sum"), classify([(3, 10)], 5)),
    PeerCase(
        "bp-mlp-sigmoid-mse", BP, mlp(10, 7, 5, act=nn.Sigmoid), mse(), regress([(3, 10)], (5,))
    ),
    *[_act_case(act, bias) for act in _ACTS for bias in (True, False)],
    *[
        _pool_case(shape, pool, args)
        for pool, d in [(nn.MaxPool1d, 1), (nn.MaxPool2d, 2), (nn.MaxPool3d, 3)]
        for shape, args in [
            ((3, 3, *[7] * d) if d > 1 else (3, 3, 7), (2, 1)),
            ((3, 3, *[7] * d), (2, 1, 0, 2)),
            ((3, 3, *[7] * d), (2, 1, 0, 2, False, True)),
        ]
    ],
    *[
        _pool_case(shape, pool, args)
        for pool, d in [(nn.AvgPool1d, 1), (nn.AvgPool2d, 2), (nn.AvgPool3d, 3)]
        for shape, args in [
            ((3, 3, *[11 if d == 2 else 7] * d), (2, 1)),
            ((3, 3, *[7] * d), (2, 1, 0, True)),
            ((3, 3, *[7] * d), (2, 1, 0, False)),
        ]
    ],
    *[
        _conv_case(shape, _CONV[len(shape) - 2], args)
        for shape, args in [
            ((3, 3, 7), (3, 2, 2)),
            ((3, 2, 7), (2, 3, 2, 2, 0, 2)),
            ((3, 3, 7), (3, 2, 2, 2, 1)),
            ((3, 3, 8), (3, 6, 2, 4, 2, 3)),
            ((3, 3, 7), (3, 2, 2, 4, 2, 1, 1, False)),
            ((3, 3, 7, 7), (3, 2, 2)),
            ((3, 2, 7, 7), (2, 3, 2, 2, 0, 2)),
            ((3, 3, 7, 7), (3, 2, 2, 2, 1)),
            ((3, 3, 8, 8), (3, 6, 2, 4, 2, 3)),
            ((3, 3, 7, 7), (3, 2, 2, 4, 2, 1, 1, False)),
            ((3, 3, 2, 7, 7), (3, 2, 2)),
            ((3, 2, 3, 7, 7), (2, 3, 2, 2, 0, 2)),
            ((3, 3, 2, 7, 7), (3, 2, 2, 3, 2)),
            ((3, 3, 4, 8, 8), (3, 6, 2, 4, 2, 3)),
            ((3, 3, 2, 7, 7), (3, 2, 2, 4, 2, 1, 1, False)),
            # grouped convolutions (the last argument)
            ((3, 6, 7), (6, 4, 2, 1, 0, 1, 2)),
            ((3, 6, 7, 5), (6, 3, 2, 1, 0, 1, 3)),
            ((3, 4, 7, 5, 6), (4, 2, 2, 1, 0, 2, 2)),
        ]
    ],
    *[
        _conv_case(shape, _CONV_T[len(shape) - 2], args)
        for shape, args in [
            ((3, 3, 7), (3, 2, 2)),
            ((3, 2, 7), (2, 3, 2, 2, 0, 0, 1, True, 2)),
            ((3, 3, 7), (3, 2, 2, 2, 1)),
            ((3, 3, 8), (3, 6, 2, 4, 2, 0, 1, True, 3)),
            ((3, 3, 7), (3, 2, 2, 4, 2, 0, 1, False)),
            ((3, 3, 7, 7), (3, 2, 2)),
            ((3, 2, 9, 9), (2, 4, 2, 1, 0, 0, 1, True, 2)),
            ((3, 3, 7, 7), (3, 2, 2, 2, 1)),
            ((3, 3, 7, 7), (3, 2, 2, 4, 2, 0, 1, False)),
            ((3, 3, 2, 7, 7), (3, 2, 2)),
            ((3, 2, 3, 5, 5), (2, 3, 2, 2, 2, 0, 1, True, 2)),
            ((3, 3, 2, 7, 7), (3, 2, 2, 4, 2, 0, 1, False)),
            # grouped transposed convolutions (groups before the bias flag)
            ((3, 6, 8), (6, 3, 2, 4, 2, 0, 3, True, 3)),
            ((3, 4, 9, 9), (4, 2, 2, 1, 0, 0, 2, True, 2)),
            ((3, 4, 3, 5, 5), (4, 2, (2, 2, 1), 2, 2, 0, 2, True, 2)),
        ]
    ],
    PeerCase(
        "bp-linear-1extra-mse",
        BP,
        lambda: nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2), nn.Flatten()),
        mse(),
        regress([_LIN_EXTRA[0]], (8,)),
    ),
    PeerCase(
        "bp-linear-2extra-mse",
        BP,
        lambda: nn.Sequential(nn.Linear(5, 3), nn.Sigmoid(), nn.Linear(3, 2), nn.Flatten()),
        mse(),
        regress([_LIN_EXTRA[1]], (16,)),
    ),
    PeerCase(
        "bp-linear-3extra-mse-sum",
        BP,
        lambda: nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2), nn.Flatten()),
        mse("sum"),
        regress([_LIN_EXTRA[2]], (48,)),
    ),
    PeerCase(
        "bp-linear-1extra-ce",
        BP,
        lambda: nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2), nn.Flatten()),
        ce(),
        classify([_LIN_EXTRA[0]], 8),
    ),
    PeerCase(
        "bp-linear-2extra-ce",
        BP,
        lambda: nn.Sequential(nn.Linear(5, 3), nn.Sigmoid(), nn.Linear(3, 2), nn.Flatten()),
        ce(),
        classify([_LIN_EXTRA[1]], 16),
    ),
    PeerCase(
        "bp-linear-3extra-ce-sum",
        BP,
        lambda: nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2), nn.Flatten()),
        ce("sum"),
        classify([_LIN_EXTRA[2]], 48),
    ),
    PeerCase(
        "bp-multi-d-ce-sum", BP, mlp(5, 3, 2), ce("sum"), classify([(3, 4, 2, 3, 5)], 4, (2, 3, 2))
    ),
    PeerCase(
        "bp-pad-constant0-mse",
        BP,
        lambda: nn.Sequential(
            nn.Conv2d(3, 2, 2),
            Pad((1, 1, 0, 2), mode="constant", value=0.0),
            nn.Conv2d(2, 2, 3, stride=2),
            nn.Flatten(),
            nn.Linear(8, 2),
        ),
        mse(),
        regress([(5, 3, 4, 4)], (2,)),
    ),
    PeerCase(
        "bp-pad-constant1-ce",
        BP,
        lambda: nn.Sequential(
            nn.Conv2d(3, 2, 3, padding=1),
            nn.ReLU(),
            Pad((1, 1, 2, 0, 1, 2), mode="constant", value=1.0),
            nn.Conv2d(5, 2, 3, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8, 3),
        ),
        ce(),
        classify([(5, 3, 4, 4)], 3),
    ),
    PeerCase(
        "bp-slicing-ce",
        BP,
        lambda: nn.Sequential(
            nn.Conv2d(3, 2, 2, padding=1),
            Slicing((slice(None), 0, slice(None, None, 2), slice(0, 2))),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(6, 4),
        ),
        ce(),
        classify([(3, 3, 4, 5)], 4),
    ),
    PeerCase(
        "bp-slicing-twice-mse",
        BP,
        lambda: nn.Sequential(
            nn.Conv2d(3, 2, 2, padding=1),
            Slicing((slice(None), slice(None), 2)),
            nn.ReLU(),
            Slicing((slice(None), 1)),
            nn.Linear(6, 4),
        ),
        mse(),
        regress([(3, 3, 4, 5)], (4,)),
    ),
    PeerCase("bp-bce-soft-labels", BP, mlp(6, 4, 1), bce(), regress([(3, 6)], (1,))),
    PeerCase(
        "bp-bce-binary-labels-sum",
        BP,
        mlp(6, 4, 1),
        bce("sum"),
        lambda g: [(_x(g, 3, 6), _cls(g, (3, 1), 2).double())],
    ),
    # settings only the DiagHessian suite adds
    _act_case(nn.LogSigmoid, True, "-diagh"),
    _act_case(nn.LogSigmoid, False, "-diagh"),
    *[
        _pool_case(shape, pool, (2,))
        for shape, pool in [
            ((3, 3, 7), nn.AdaptiveAvgPool1d),
            ((3, 3, 11, 11), nn.AdaptiveAvgPool2d),
            ((3, 3, 7, 7, 7), nn.AdaptiveAvgPool3d),
        ]
    ],
]


def _as_mean(case: PeerCase) -> PeerCase:
    loss = {nn.CrossEntropyLoss: ce, nn.MSELoss: mse, nn.BCEWithLogitsLoss: bce}[type(case.loss())]
    return replace(case, id=f"{case.id.removesuffix('-sum')}-as-mean", loss=loss("mean"))


#: Every recipe, as the peers wrote it (sum-reduced ones included), by source suite.
ALL_CASES: list[PeerCase] = CURVLINOPS_CASES + KFAC_CASES + BACKPACK_CASES
#: The recipes with a sum-reduced loss: refused by every backend.
SUM_REDUCED: list[PeerCase] = [c for c in ALL_CASES if c.reduction == "sum"]
#: What is measured: the mean-reduced recipes, and each sum-reduced one with the mean loss
#: (unless the same problem is already in the table with the mean loss).
_MEAN = [c for c in ALL_CASES if c.reduction == "mean"]
MEASURED: list[PeerCase] = _MEAN + [
    _as_mean(c) for c in SUM_REDUCED if c.id.removesuffix("-sum") not in {m.id for m in _MEAN}
]


@functools.cache
def by_id(case_id: str) -> PeerCase:
    return next(c for c in [*ALL_CASES, *MEASURED] if c.id == case_id)
