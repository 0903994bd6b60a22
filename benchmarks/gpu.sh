#!/usr/bin/env bash
# The comparison on one CUDA GPU (sized for under 5 minutes on an H100-class card; most of
# it is compilation). loopkit_compiled runs with CUDA graphs (mode="reduce-overhead").
# Prints its table last; the JSON, markdown and plot go to runs/bench-gpu/.
#
#   bash benchmarks/gpu.sh                 # uses .venv/bin/python (make test creates it)
#   PY=python bash benchmarks/gpu.sh       # another interpreter with torch (CUDA) installed
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")'
# Inductor's on-disk cache (a rerun of this script compiles from it in seconds).
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}
"$PY" -m loopkit bench --device cuda --rounds 5 --steps 50 --compile-time mlp \
    -o runs/bench-gpu "$@"
