"""``python -m deconcnn_curvature``: the ``deconcnn-curv`` command line."""

from deconcnn_curvature.cli import main

if __name__ == "__main__":
    main()
