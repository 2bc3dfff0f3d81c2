#!/usr/bin/env bash
# Run a shipped workflow headless (the README's main job) with the set-up's Python:
#
#   COMFYUI_PATH=/path/to/ComfyUI bash scripts/run_workflow.sh workflows/fastdrag.json --sample samples/art_0 --out out/
#
# Arguments go to `python -m tools.run_workflow` (see its --help); relative
# paths are relative to where you run it. VENV: the virtual environment the
# set-up made (default: .venv in this repository).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
    echo "error: no virtual environment at $venv. Set this repository up first (it installs this pack's and" >&2
    echo "ComfyUI's requirements into .venv, then runs the tests), from $root:" >&2
    echo "  COMFYUI_PATH=${COMFYUI_PATH:-../ComfyUI} bash scripts/test.sh" >&2
    if [ -z "${COMFYUI_PATH:-}" ]; then
        echo "(no ComfyUI yet? git clone https://github.com/Comfy-Org/ComfyUI ../ComfyUI)" >&2
    fi
    exit 2
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$venv/bin/python" -m tools.run_workflow "$@"
