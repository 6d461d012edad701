"""The Hydra configs shipped with the package: a copy of the repository's ``configs/``.

Installed (non-editable) packages have no repository folder, so ``deconcnn-curv train`` composes
from here; Hydra users can add it to their search path with
``hydra.searchpath=[pkg://deconcnn_curvature.conf]``. Never edit these files: edit ``configs/`` and
copy them over with ``python -m deconcnn_curvature.conf`` (a test checks that the two trees are
identical).
"""
