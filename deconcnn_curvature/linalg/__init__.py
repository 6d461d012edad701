"""The numerics, free of ``torch.nn``: linear operators and the estimators that run on them.

Every estimator is a plain function over a :class:`LinearOperator` (anything that multiplies a block
of vectors), so each one is tested on small dense matrices with known spectra before it meets a
network. The Hessian of a network is just one such operator (:mod:`deconcnn_curvature.hvp`).

- :mod:`~deconcnn_curvature.linalg.probes`: the probe loop and stopping rule the trace estimators
  share;
- :mod:`~deconcnn_curvature.linalg.hutchinson`, :mod:`~deconcnn_curvature.linalg.two_way`,
  :mod:`~deconcnn_curvature.linalg.hutchpp`: trace estimators;
- :mod:`~deconcnn_curvature.linalg.lanczos`, :mod:`~deconcnn_curvature.linalg.ritz`: top
  eigenvalues; :mod:`~deconcnn_curvature.linalg.slq`: the spectral density.

Every invalid argument raises :class:`~deconcnn_curvature.errors.InvalidOptionError` (a
``ValueError``).
"""

from deconcnn_curvature.linalg.hutchinson import TraceEstimate, hutchinson
from deconcnn_curvature.linalg.hutchpp import (
    HutchppResult,
    LowRankSketch,
    hutchpp,
    hutchpp_with_sketch,
)
from deconcnn_curvature.linalg.lanczos import EigenEstimate, lanczos_top_eigenvalues
from deconcnn_curvature.linalg.operator import DenseOperator, LinearOperator, rademacher
from deconcnn_curvature.linalg.probes import OnProduct, TraceProgress
from deconcnn_curvature.linalg.ritz import (
    RitzEstimate,
    refined_top_eigenvalues,
    sketch_top_eigenvalues,
)
from deconcnn_curvature.linalg.slq import slq_density

__all__ = [
    "DenseOperator",
    "EigenEstimate",
    "HutchppResult",
    "LinearOperator",
    "LowRankSketch",
    "OnProduct",
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
]
