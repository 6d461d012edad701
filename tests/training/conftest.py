"""Fail with the fix, not torchvision's traceback, when Lightning cannot be imported here.

The tests below import ``lightning`` directly; importing the guard first turns a broken
torchvision (installed next to a torch it was not built for) into one readable error.
"""

from __future__ import annotations

import deconcnn_curvature.monitor.lightning_import  # noqa: F401  (raises LightningUnavailableError)
