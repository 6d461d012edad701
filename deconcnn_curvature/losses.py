"""The loss names every front end accepts (the monitor's ``loss_fn``, the CLI's ``--loss``): one
table, each name building a mean-reduced torch loss."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from torch import nn

__all__ = ["DEFAULT_LOSS", "LOSSES", "ONE_HOT_LOSSES"]

#: Short loss name → the mean-reduced torch loss class.
LOSSES: Mapping[str, Callable[[], nn.Module]] = MappingProxyType(
    {
        "cross_entropy": nn.CrossEntropyLoss,
        "mse": nn.MSELoss,
        "nll": nn.NLLLoss,
        "bce_with_logits": nn.BCEWithLogitsLoss,
    }
)
#: The losses whose targets are float one-hot vectors shaped like the outputs, not class indices.
ONE_HOT_LOSSES: frozenset[str] = frozenset({"mse", "bce_with_logits"})
#: The loss of a classifier checkpoint when none is named.
DEFAULT_LOSS = "cross_entropy"
