"""Seeds: the one rule for a valid seed, and the two seed mixers, side by side.

:func:`check_seed` is what every host argument called ``seed`` must satisfy (``estimate()``'s and
the data sets'): an integer in ``[0, 2**63)``, so that it fits a ``torch.Generator`` and mixes
without wrapping around.

Two mixers derive child seeds, and both must keep their exact outputs, because those outputs are
recorded: :func:`tagged_seed` makes the Lightning monitor's probe seeds (written to every
``curvature.jsonl`` record and carried, with the batch indices it draws, in checkpoints, so a
resumed run measures what an uninterrupted one would), and :func:`integer_seed` makes the data
sets' streams (the synthetic images, the epoch orders, each image's augmentation). Changing either
would change numbers users already hold, so neither is rewritten in terms of the other.

Why two streams of seeds never get in each other's way (domain separation): the monitor's inputs
always begin with a string tag naming the purpose (``"probes"``, ``"batch"``), so within that
mixer the probe and batch streams are separated by the tag, and they are hashed with BLAKE2b
(Aumasson et al., 2013) over the tuple's ``repr`` (stable across processes and Python versions);
the data sets' inputs are plain integers chained through the splitmix64 finaliser (Steele, Lea &
Flood, OOPSLA 2014), each data set separating its own streams by position and by a leading
constant (the split index, the epoch). The two functions are different mixing functions over
different argument types, so equal user seeds (``seed=0`` for the monitor and the data) give
unrelated child seeds, as they should: the curvature batch and the probes must not track the
training data's augmentation.
"""

from __future__ import annotations

import hashlib
import numbers
from typing import Any

from deconcnn_curvature.errors import ConfigurationError

__all__ = ["SEED_LIMIT", "check_seed", "integer_seed", "tagged_seed"]

#: Seeds are integers in ``[0, SEED_LIMIT)``.
SEED_LIMIT = 2**63
_MASK63 = (1 << 63) - 1
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def check_seed(
    seed: Any,
    *,
    error: type[Exception] = ConfigurationError,
    or_none: bool = False,
    name: str = "seed",
) -> int:
    """``seed`` as an ``int`` if it is an integer in ``[0, 2**63)``, else ``error`` saying so.

    ``or_none`` only adds "or None" to the message, for callers that accept ``None`` (and decide
    themselves what it means) before calling this. ``name`` is what the message calls the seed,
    e.g. ``"CurvatureMonitor: seed"`` for a setting users write under that name.
    """
    integral = isinstance(seed, numbers.Integral) and not isinstance(seed, bool)
    if not integral or not 0 <= seed < SEED_LIMIT:
        alternative = " or None" if or_none else ""
        raise error(
            f"{name} must be a non-negative integer{alternative} (below 2**63), got {seed!r}."
        )
    return int(seed)


def tagged_seed(*parts: Any) -> int:
    """A 63-bit seed determined by ``parts``, a tag first (the Lightning monitor's mixer).

    BLAKE2b (8-byte digest) of ``repr(parts)``, little-endian, top bit cleared.
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def integer_seed(*values: int) -> int:
    """Combine integers into one 63-bit seed (the data sets' mixer): the splitmix64 finaliser
    applied after each value is added to the state."""
    state = _GOLDEN
    for value in values:
        state = (state ^ (int(value) & _MASK64)) & _MASK64
        state = (state + _GOLDEN) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1
