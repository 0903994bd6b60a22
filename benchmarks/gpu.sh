#!/usr/bin/env bash
# loopkit on one CUDA GPU, sized for under 5 minutes on an H100-class card (most of it is
# compilation): first tests/test_cuda.py (the step's CUDA paths against eager and torch's
# own loop: CUDA graphs, Dropout masks, resume), then the speed comparison, whose table is
# printed last. loopkit_compiled runs with CUDA graphs (mode="reduce-overhead").
# The JSON, markdown and plot go to runs/bench-gpu/ (or -o DIR); exits non-zero if a test
# failed (the comparison runs anyway).
#
#   bash benchmarks/gpu.sh                 # uses .venv/bin/python (make test creates it)
#   PY=python3 bash benchmarks/gpu.sh      # another interpreter with torch (CUDA) installed
#
# On an H200 it took 276 s (2026-12-04). The larger sizes are a separate run of about 3
# minutes (benchmarks/results/gpu-sweep/):
#   python3 -m loopkit bench --device cuda --sweep-only --rounds 5 --steps 50 \
#       --compile-time '' -o runs/bench-gpu-sweep
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")' ||
    exit 1
# Inductor's on-disk cache (a rerun of this script compiles from it in seconds).
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}
# The tests in 4 processes where pytest-xdist is installed (they compile on the CPU).
parallel=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n 4")
timeout "${TESTS_TIMEOUT:-240}" "$PY" -m pytest -q -p no:cacheprovider $parallel tests/test_cuda.py
tests=$?
"$PY" -m loopkit bench --device cuda --rounds 5 --steps 50 --compile-time mlp \
    -o runs/bench-gpu "$@" || exit
[ "$tests" = 0 ] || echo "tests/test_cuda.py failed (exit $tests): see its output above" >&2
exit "$tests"
