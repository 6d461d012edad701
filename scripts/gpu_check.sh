#!/usr/bin/env bash
# The prepared GPU check: the card, the cuda-marked tests, and the benchmarks — HVP/gradient
# time ratio with probe_batch 1 vs 8, peak memory vs raw PyHessian on the same batch (resnet18_cifar,
# width 1.0, batch 128), and the monitoring overhead ratio (one monitor measurement in training steps,
# in gpu_hvp.json; benchmarks/monitor_overhead.py too when it can target the GPU), every HVP path
# (double backward, forward-over-reverse, batched, curvlinops, raw PyHessian) as a ratio to a
# gradient with hutchpp's peak memory vs PyHessian's (benchmarks/hvp_paths.py, hvp_paths.json),
# and seconds per measurement vs accuracy at deconCNN's settings (benchmarks/cost_accuracy.py).
# Each step is capped by STEP_TIMEOUT_S; never part of CI.
#
#   bash scripts/gpu_check.sh                  on a CUDA machine
#   bash scripts/gpu_check.sh --cpu            the same steps on CPU at tiny sizes (checks the logic)
#   bash scripts/gpu_check.sh --fetch-wheels   where PyPI is reachable: put the pure-Python
#                                              dependencies a bare CUDA image lacks (PyHessian) in
#                                              .whl/, for a machine without network access
#
# Environment: PYTHON (the interpreter; default: .venv/bin/python if its torch fits the mode, else
# python3), OUT (folder for the log and JSON; default benchmarks/results), STEP_TIMEOUT_S (per step).
# Nothing is installed into an existing environment: a missing dependency goes into a private
# --target folder on PYTHONPATH (a venv made from a venv's python would not see that venv's CUDA
# torch), from .whl/ if it holds wheels, else from PyPI. The package itself is used from this
# checkout through PYTHONPATH.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)

MODE=gpu
case "${1:-}" in
  --cpu) MODE=cpu ;;
  --fetch-wheels)
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "pyhessian==0.1" || exit 1
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    ls -l .whl
    echo "carry .whl to the device machine (run's carry: [\".whl\"])"
    exit 0
    ;;
  "") ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac

OUTDIR=${OUT:-$REPO/benchmarks/results}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
STEP_TIMEOUT_S=${STEP_TIMEOUT_S:-170}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg DECONCNN_CURVATURE_PLUGINS=""
START=$(date +%s)
declare -A RC=()
declare -A SECONDS_TAKEN=()

say() { printf '\n== %s (t=%ss)\n' "$*" "$(( $(date +%s) - START ))"; }

step() {  # step NAME COMMAND... : run with a timeout, record exit status and duration
  local name=$1 t0 rc
  shift
  t0=$(date +%s)
  timeout --kill-after=10 "$STEP_TIMEOUT_S" "$@"
  rc=$?
  RC[$name]=$rc
  SECONDS_TAKEN[$name]=$(( $(date +%s) - t0 ))
  [ "$rc" -eq 124 ] && echo "!! step $name timed out after ${STEP_TIMEOUT_S}s"
  echo "-- step $name: exit $rc in ${SECONDS_TAKEN[$name]}s"
}

# ---------------------------------------------------------------------------------------- card
say "card"
if [ "$MODE" = gpu ]; then
  nvidia-smi || echo "!! nvidia-smi failed"
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv \
    > "$OUTDIR/.card.csv" 2>/dev/null || true
else
  echo "--cpu: no card"
fi

# ---------------------------------------------------------------------------------------- python
say "python"
want_cuda=$([ "$MODE" = gpu ] && echo 1 || echo 0)
fits() {  # does interpreter $1 have a torch that suits the mode?
  "$1" -c "import sys, torch; sys.exit(0 if (not $want_cuda or torch.cuda.is_available()) else 1)" \
    2>/dev/null
}
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in "$REPO/.venv/bin/python" "$(command -v python3 || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && fits "$candidate"; then PY=$candidate; break; fi
  done
fi
if [ -z "$PY" ] || ! fits "$PY"; then
  echo "!! no Python with a torch that sees a CUDA GPU (set PYTHON=..., or use --cpu)"
  exit 2
fi
echo "python: $PY"
SITE=${TMPDIR:-/tmp}/deconcnn-gpu-check-site
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
missing=$("$PY" - <<'EOF'
import importlib.util
specs = {"pyhessian": "pyhessian==0.1", "pluggy": "pluggy>=1.5,<2", "click": "click>=8.1,<9",
         "rich": "rich>=13", "scipy": "scipy>=1.11", "numpy": "numpy>=1.26", "pytest": "pytest>=8"}
print(" ".join(s for m, s in specs.items() if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "missing: $missing -> $SITE"
  mkdir -p "$SITE"
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl
  else
    # shellcheck disable=SC2086  # one argument per requirement
    "$PY" -m pip install -q --no-deps --target "$SITE" $missing
  fi || { echo "!! could not install: $missing (run --fetch-wheels where PyPI is reachable)"; exit 3; }
fi
"$PY" - <<'EOF' || exit 3
import torch, pyhessian, deconcnn_curvature as dcc
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.device_count()} GPU(s)")
print(f"deconcnn_curvature from {dcc.__file__}")
for b in dcc.list_backends():
    print(f"  backend {b['name']:<10} available={b['available']} distributed={b['distributed']}")
EOF

# ---------------------------------------------------------------------------------------- tests
say "pytest -m cuda"
mapfile -t cuda_files < <(grep -rlE --include='test_*.py' 'mark\.cuda' tests | sort)
echo "files with cuda-marked tests: ${cuda_files[*]}"
step tests "$PY" -m pytest -m cuda -p no:cacheprovider -q -rs --continue-on-collection-errors \
  "${cuda_files[@]}"

# ---------------------------------------------------------------------------------------- benchmarks
say "benchmark: HVP cost and memory (benchmarks/gpu_hvp.py)"
if [ "$MODE" = gpu ]; then
  step gpu_hvp "$PY" benchmarks/gpu_hvp.py --device cuda --out "$OUTDIR/gpu_hvp.json"
else
  step gpu_hvp "$PY" benchmarks/gpu_hvp.py --device cpu --quick --out "$OUTDIR/gpu_hvp.json"
fi

say "benchmark: every HVP path as a ratio to a gradient, hutchpp memory (benchmarks/hvp_paths.py)"
# resnet18_cifar at deconCNN's width 1.0 and batch 128 (plus the tiny CNN); torch.compile is left
# out here to hold the 5-minute budget (run the script without --no-compile for that row).
if [ "$MODE" = gpu ]; then
  step hvp_paths "$PY" benchmarks/hvp_paths.py --device cuda --width 1.0 --batch 128 --reps 5 \
    --probes 8 --no-compile --memory --out "$OUTDIR/hvp_paths.json"
else
  step hvp_paths "$PY" benchmarks/hvp_paths.py --device cpu --quick --no-compile --memory \
    --out "$OUTDIR/hvp_paths.json"
fi

say "benchmark: monitoring overhead (benchmarks/monitor_overhead.py)"
# gpu_hvp.json's monitor_measurement already holds the CUDA overhead of one measurement at the
# monitor's defaults; this whole-Lightning-run benchmark is run too when it can target the device.
if [ -f benchmarks/monitor_overhead.py ]; then
  help=$("$PY" benchmarks/monitor_overhead.py --help 2>&1 || true)
  args=()
  grep -q -- '--out' <<<"$help" && args+=(--out "$OUTDIR/monitor_overhead.json")
  if [ "$MODE" = gpu ] && ! grep -q -- '--device' <<<"$help"; then
    echo "monitor_overhead.py has no --device flag (it times CPU runs): skipped on the GPU"
    RC[monitor_overhead]=skipped
  elif [ "$MODE" = cpu ] && ! grep -q -- '--quick' <<<"$help"; then
    echo "--cpu: monitor_overhead.py has no --quick flag; skipped (minutes on CPU)"
    RC[monitor_overhead]=skipped
  else
    if [ "$MODE" = gpu ]; then args+=(--device cuda); else args+=(--quick); fi
    echo "args: ${args[*]}"
    step monitor_overhead "$PY" benchmarks/monitor_overhead.py "${args[@]}"
    if ! grep -q -- '--out' <<<"$help"; then  # collect what it wrote into benchmarks/results/
      newest=$(ls -t benchmarks/results/monitor_overhead*.json 2>/dev/null | head -1)
      if [ -n "$newest" ] && [ "$OUTDIR" != "$REPO/benchmarks/results" ]; then
        cp "$newest" "$OUTDIR/"
      fi
    fi
  fi
else
  echo "benchmarks/monitor_overhead.py is not there; skipped"
  RC[monitor_overhead]=absent
fi

say "benchmark: cost vs accuracy at deconCNN's settings (benchmarks/cost_accuracy.py)"
# Seconds per measurement (trace + λ_max; 50 products on 128 samples is deconCNN's setting, target
# < 3 s) and the share of training time every 500 steps, against the full-data values, at steps 0
# and 30 of a training run of resnet18_cifar at full width (1.0) on 1024 synthetic samples.
if [ "$MODE" = gpu ]; then
  step cost_accuracy "$PY" benchmarks/cost_accuracy.py --device cuda --width 1.0 \
    --population 1024 --checkpoints 0 30 --num-hvps 20 50 --batch-sizes 64 128 --draws 2 \
    --ref-hvps 90 --ref-max-hvps 40 --threads 4 --out "$OUTDIR/cost_accuracy.json"
else
  step cost_accuracy "$PY" benchmarks/cost_accuracy.py --quick --out "$OUTDIR/cost_accuracy.json"
fi

# ---------------------------------------------------------------------------------------- summary
say "summary"
steps_json=""
for name in tests gpu_hvp hvp_paths monitor_overhead cost_accuracy; do
  steps_json+="\"$name\": {\"exit\": \"${RC[$name]:-not run}\", \"seconds\": ${SECONDS_TAKEN[$name]:-null}}, "
done
MODE=$MODE OUTDIR=$OUTDIR STEPS="{${steps_json%, }}" TOTAL=$(( $(date +%s) - START )) "$PY" - <<'EOF'
import json, os, pathlib, torch
out = pathlib.Path(os.environ["OUTDIR"])
card = out / ".card.csv"
summary = {
    "mode": os.environ["MODE"],
    "card": card.read_text().strip().splitlines() if card.exists() else None,
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "steps": json.loads(os.environ["STEPS"]),
    "total_seconds": int(os.environ["TOTAL"]),
}
bench = out / "gpu_hvp.json"
if bench.exists():
    summary["gpu_hvp_ratios"] = json.loads(bench.read_text())["ratios"]
    summary["gpu_hvp_peak_memory_bytes"] = json.loads(bench.read_text())["peak_memory_bytes"]
    summary["monitor_measurement"] = json.loads(bench.read_text())["monitor_measurement"]
paths = out / "hvp_paths.json"
if paths.exists():
    data = json.loads(paths.read_text())
    summary["hvp_paths_ratios"] = {m: r["ratio"] for m, r in data["models"].items()}
    summary["hvp_paths_memory_ratio"] = {
        m: r["ratio_to_pyhessian"] for m, r in data["memory"].items()
    }
cost = out / "cost_accuracy.json"
if cost.exists():
    summary["seconds_per_measurement"] = {
        r["name"]: round(r["seconds_per_measurement"], 3)
        for r in json.loads(cost.read_text())["results"]
    }
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
EOF
rm -f "$OUTDIR/.card.csv"
status=0
for name in tests gpu_hvp hvp_paths cost_accuracy; do
  [ "${RC[$name]:-1}" = 0 ] || status=1
done
case "${RC[monitor_overhead]:-}" in 0|skipped|absent) ;; *) status=1 ;; esac
echo "gpu_check: $([ $status = 0 ] && echo OK || echo FAILED) in $(( $(date +%s) - START ))s; files in $OUTDIR"
exit $status
