"""Every default a user meets, declared once, with the context it holds in and its reason.

Two contexts differ on purpose: ``offline`` is a one-off measurement (:func:`deconcnn_curvature.
estimate`, the ``deconcnn-curv`` commands), ``monitor`` a measurement repeated during training by
:class:`~deconcnn_curvature.monitor.CurvatureMonitor`, where its cost is paid every
``compute_every_n_steps`` steps. The Python signatures, the YAML files (``null``: this default),
the CLI's ``--help`` and ``docs/defaults.md`` read this table; ``tests/test_defaults_table.py``
checks every other place against it.

A value that depends on the backend is a mapping of backend name to value; a backend it does not
name (a plugin) gets its own declared default (:data:`BACKEND_DECLARED`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["BACKEND_DECLARED", "DEFAULTS", "MONITOR", "OFFLINE", "Default", "default"]

OFFLINE = "offline"
MONITOR = "monitor"
#: The value is the backend's own option default (``deconcnn-curv list-backends --json``).
BACKEND_DECLARED = "the backend's declared default"


@dataclass(frozen=True)
class Default:
    """One setting's default in one context: its ``value`` and the one-line ``reason``."""

    setting: str
    context: str
    value: Any
    reason: str


_HUTCHPP_MONITOR = (
    "hutchpp 10 products on 64 samples: the cheapest point of the measured cost/accuracy "
    "frontier, 4.2 % of a bare training step at the 500-step cadence; 20 products on the same "
    "64 samples cost 7.0 % and were no more accurate on any criterion (30 draws; "
    "benchmarks/cost_accuracy.py)"
)

DEFAULTS: tuple[Default, ...] = (
    Default("num_hvps", OFFLINE, BACKEND_DECLARED,
            "a one-off measurement can afford the backend's own budget"),
    Default("num_hvps", MONITOR, {"pyhessian": 50, "hutchpp": 10},
            "pyhessian 50: deconCNN's own curvature.num_samples; " + _HUTCHPP_MONITOR),
    Default("hessian_batch_size", MONITOR, {"pyhessian": 128, "hutchpp": 64, "*": 128},
            "128: deconCNN's curvature batch; hutchpp 64: with its 10 products (num_hvps)"),
    Default("batch_size", OFFLINE, 128, "the monitor's curvature batch, so the numbers compare"),
    Default("num_batches", OFFLINE, 1, "one batch, as the monitor measures"),
    Default("rtol", OFFLINE, None, "off: the budget is spent exactly, so the cost is known"),
    Default("rtol", MONITOR, None, "off: the budget is spent exactly, so the cost is known"),
    Default("k", OFFLINE, 1, "λ_max, the number deconCNN logs"),
    Default("k", MONITOR, 1, "λ_max, the number deconCNN logs (curvature/lambda_max)"),
    Default("data_groups", OFFLINE, None,
            "the batches given: one batch measures that batch's Hessian (probe noise only)"),
    Default("data_groups", MONITOR, 4,
            "the small curvature batch stands for the training set: 4 groups make the interval "
            "cover the data noise too (it covered the full-data trace in 23-29 of 30 draws)"),
    Default("seed", OFFLINE, 0, "repeatable: the same command gives the same number"),
    Default("seed", MONITOR, 0, "repeatable: a resumed run measures what an unbroken one would"),
    Default("eval_mode", OFFLINE, True,
            "BatchNorm with running statistics, Dropout off: the network as it predicts"),
    Default("eval_mode", MONITOR, True,
            "BatchNorm with running statistics, Dropout off: the network as it predicts"),
    Default("compute_every_n_steps", MONITOR, 500, "deconCNN's cadence"),
    Default("loss", OFFLINE, "cross_entropy", "the loss of a CIFAR classifier"),
    Default("input_shape", OFFLINE, (3, 32, 32), "one CIFAR image, the reference run's data"),
)  # fmt: skip

_BY_KEY: Mapping[tuple[str, str], Default] = {(d.setting, d.context): d for d in DEFAULTS}


def default(setting: str, context: str, backend: str | None = None) -> Any:
    """The default of ``setting`` in ``context`` (for ``backend`` where it depends on it);
    :data:`BACKEND_DECLARED` (or ``None`` where the monitor passes nothing) means the backend's
    own declared value."""
    value = _BY_KEY[(setting, context)].value
    if isinstance(value, Mapping):
        return value.get(backend, value.get("*", BACKEND_DECLARED)) if backend else value
    return value


def declared(setting: str) -> dict[str, Any]:
    """The built-in backends' own defaults of ``setting`` (``num_hvps``: of their budget option),
    read from their declarations."""
    from deconcnn_curvature.registry import builtin_backends

    found = {}
    for cls in builtin_backends():
        name = cls.budget_option("trace") if setting == "num_hvps" else setting
        option = cls.option_map().get(name) if name else None
        if option is not None:
            found[cls.name] = option.default
    return found


def markdown() -> str:
    """The table as the Markdown of ``docs/defaults.md`` (the test checks the page against it)."""
    lines = [
        "| setting | context | default | why |",
        "|---|---|---|---|",
    ]
    for d in DEFAULTS:
        if d.value == BACKEND_DECLARED:
            shown = "the backend's own: " + ", ".join(
                f"{name} {value}" for name, value in declared(d.setting).items()
            )
        elif isinstance(d.value, Mapping):
            shown = ", ".join(
                f"{'other backends' if k == '*' else k} {v}" for k, v in d.value.items()
            )
        else:
            shown = "unset" if d.value is None else str(d.value)
        lines.append(f"| `{d.setting}` | {d.context} | {shown} | {d.reason} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m deconcnn_curvature.defaults: the table of docs/defaults.md
    print(markdown(), end="")
