#!/usr/bin/env bash
# Create or refresh the virtual environment with loopkit and its dev tools.
#
# It never replaces a torch you already have: if $PYTHON can import torch (from the system,
# a conda env or another venv), the new venv is given a .pth file pointing at that torch's
# site-packages, and that torch is pinned while installing. Otherwise it installs
# $TORCH_SPEC (default torch==2.13.0, a CPU build where pip finds one locally). Elsewhere,
# pass the CPU wheel index explicitly to avoid a multi-GB CUDA download:
#   TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" make test
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_PIP_ARGS=${TORCH_PIP_ARGS:-}

torch_version() { "$1" -c 'import torch; print(torch.__version__)' 2>/dev/null || true; }

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
py="$VENV/bin/python"
user_torch=$(torch_version "$PYTHON")
if [ -n "$user_torch" ] && [ -z "$(torch_version "$py")" ]; then
  site=$("$PYTHON" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
  venv_site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$site" > "$venv_site/_loopkit_user_torch.pth"
  echo "venv: using the torch $user_torch that $PYTHON has ($site)"
fi
have=$(torch_version "$py")
if [ -z "$have" ]; then
  # shellcheck disable=SC2086
  "$py" -m pip install --quiet $TORCH_PIP_ARGS "$TORCH_SPEC"
  have=$(torch_version "$py")
fi
echo "torch==$have" > "$VENV/keep-torch.txt"
"$py" -m pip install --quiet -c "$VENV/keep-torch.txt" -e ".[dev]"
touch "$VENV/.installed"
echo "venv: $VENV ready (torch $have)"
