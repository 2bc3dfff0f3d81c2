#!/usr/bin/env bash
# Set up a virtual environment (once) and run the test suite.
#
#   bash scripts/test.sh [pytest args]
#
# Environment:
#   VENV           where the virtual environment lives (default: .venv)
#   TORCH_SPEC     the torch requirement installed when torch is missing
#                  (default: torch==2.13.0, a CPU build where one is on disk)
#   COMFYUI_PATH   a ComfyUI checkout: enables the host tests, and its
#                  requirements are installed into the environment too
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip >/dev/null
if ! "$py" -c "import torch" 2>/dev/null; then
    "$py" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
"$py" -m pip install --quiet -r tests/requirements.txt
if [ -n "${COMFYUI_PATH:-}" ]; then
    "$py" -m pip install --quiet -r "$COMFYUI_PATH/requirements.txt" websocket-client
fi
exec "$py" -m pytest tests "$@"
