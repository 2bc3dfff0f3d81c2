#!/usr/bin/env bash
# Set up a virtual environment (once) and run the test suite.
#
#   COMFYUI_PATH=../ComfyUI bash scripts/test.sh [pytest args]
#
# Environment:
#   VENV           where the virtual environment lives (default: .venv)
#   TORCH_SPEC     the torch requirement installed when torch is missing
#                  (default: torch==2.13.0, a CPU build where one is on disk)
#   COMFYUI_PATH   a ComfyUI checkout: its requirements are installed into the
#                  environment too (what the headless runner needs) and the
#                  host tests run; without it they skip
set -euo pipefail
here="$(pwd)"
cd "$(dirname "$0")/.."

if [ -n "${COMFYUI_PATH:-}" ]; then
    case "$COMFYUI_PATH" in /*) ;; *) COMFYUI_PATH="$here/$COMFYUI_PATH" ;; esac
    if [ ! -f "$COMFYUI_PATH/main.py" ] || [ ! -f "$COMFYUI_PATH/requirements.txt" ]; then
        echo "error: COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI checkout (no main.py / requirements.txt)." >&2
        echo "Get one with: git clone https://github.com/Comfy-Org/ComfyUI ../ComfyUI" >&2
        exit 2
    fi
    export COMFYUI_PATH
fi

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

status=0
"$py" -m pytest tests "$@" || status=$?

if [ -z "${COMFYUI_PATH:-}" ]; then
    echo "note: COMFYUI_PATH is not set, so ComfyUI's requirements were not installed and the host tests" >&2
    echo "      skipped; the headless runner needs both: COMFYUI_PATH=../ComfyUI bash scripts/test.sh" >&2
elif ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
        && ! command -v google-chrome >/dev/null 2>&1 && [ -z "${DRAGKIT_CHROMIUM:-}" ]; then
    echo "note: no Chromium found, so the browser tests skipped (Debian: apt-get install chromium)." >&2
fi
exit "$status"
