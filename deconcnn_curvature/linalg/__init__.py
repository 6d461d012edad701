"""The numerics, free of ``torch.nn``: linear operators and the estimators that run on them.

Every estimator is a plain function over a :class:`LinearOperator` (anything that multiplies a block
of vectors), so each one is tested on small dense matrices with known spectra before it meets a
network. The Hessian of a network is just one such operator (:mod:`deconcnn_curvature.hvp`).
"""

from deconcnn_curvature.linalg.hutchinson import (
    TraceEstimate,
    TraceProgress,
    hutchinson,
    trace_progress,
)
from deconcnn_curvature.linalg.hutchpp import (
    HutchppResult,
    LowRankSketch,
    RitzEstimate,
    hutchpp,
    hutchpp_with_sketch,
    refined_top_eigenvalues,
    sketch_top_eigenvalues,
)
from deconcnn_curvature.linalg.lanczos import EigenEstimate, lanczos_top_eigenvalues
from deconcnn_curvature.linalg.operator import DenseOperator, LinearOperator, rademacher
from deconcnn_curvature.linalg.slq import slq_density

__all__ = [
    "DenseOperator",
    "EigenEstimate",
    "HutchppResult",
    "LinearOperator",
    "LowRankSketch",
    "RitzEstimate",
    "TraceEstimate",
    "TraceProgress",
    "hutchinson",
    "hutchpp",
    "hutchpp_with_sketch",
    "lanczos_top_eigenvalues",
    "rademacher",
    "refined_top_eigenvalues",
    "sketch_top_eigenvalues",
    "slq_density",
    "trace_progress",
]
