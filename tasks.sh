#!/usr/bin/env bash
# One entry point for people and CI. Each task sets up what it needs, idempotently:
#   bash tasks.sh demo [hydra overrides...]   the main job: a small deconCNN-shaped training run with curvature on
#   bash tasks.sh test [pytest args...]       lint + the whole test suite (it builds the docs strictly too)
#   bash tasks.sh docs [serve]                build the docs site into site/ (mkdocs build --strict), or serve it
#   bash tasks.sh setup                       only create/refresh the virtual environment
# Environment: VENV (default .venv), PYTHON (default python3.11 or python3),
#   TORCH_SPEC (default torch==2.13.0; ignored when the venv already has a torch, e.g. your CUDA build).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo ">> creating $VENV with $PYTHON" >&2
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
  fi
  local py="$VENV/bin/python" stamp="$VENV/.deconcnn-installed"
  if ! "$py" -c "import torch" 2>/dev/null; then
    echo ">> installing $TORCH_SPEC (install your CUDA build of torch into $VENV first to use a GPU)" >&2
    "$py" -m pip install -q "$TORCH_SPEC"
  fi
  # Pin whatever torch is installed, so no extra (BackPACK pulls torchvision) can swap it out.
  local constraints="$VENV/constraints.txt"
  # Read from the installed metadata: importing torch before numpy is installed warns "Failed to
  # initialize NumPy".
  "$py" -c "from importlib.metadata import version; print('torch==' + version('torch').split('+')[0])" > "$constraints"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo ">> installing deconcnn-curvature[all] (torch pinned: $(cat "$constraints"))" >&2
    "$py" -m pip install -q -c "$constraints" -e ".[all]"
    # BackPACK requires torchvision but only imports it in its examples; a torchvision that does
    # not match the installed torch breaks `import lightning` (torchmetrics imports it when present).
    if ! "$py" -c "import torchvision" 2>/dev/null; then
      echo ">> removing torchvision (does not load against this torch; nothing here needs it)" >&2
      "$py" -m pip uninstall -y -q torchvision
    fi
    touch "$stamp"
  fi
}

task=${1:-help}
shift || true
case "$task" in
  setup) setup ;;
  demo)
    setup
    exec "$VENV/bin/deconcnn-curv" train +preset=demo "$@"
    ;;
  test)
    setup
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  docs)
    setup
    if [ "${1:-}" = serve ]; then
      shift
      NO_MKDOCS_2_WARNING=1 exec "$VENV/bin/mkdocs" serve --strict "$@"
    fi
    NO_MKDOCS_2_WARNING=1 exec "$VENV/bin/mkdocs" build --strict "$@"
    ;;
  *)
    sed -n '2,9p' "$0"
    exit 2
    ;;
esac
