#!/usr/bin/env bash
# Run a shipped workflow headless (the README's main job) with the set-up's Python:
#
#   bash scripts/run_workflow.sh workflows/fastdrag.json --sample samples/art_0 --out out/
#
# Arguments go to `python -m dragrun.run_workflow` (see its --help); relative
# paths are relative to where you run it. VENV: the virtual environment the
# set-up made (default: .venv in this repository). COMFYUI_PATH: the ComfyUI
# to run; unset, the newest tested one that scripts/test.sh got (scripts/comfyui.sh).
set -euo pipefail
here="$(pwd)"
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
    echo "error: no virtual environment at $venv. Set this repository up first (it installs this pack's and" >&2
    echo "ComfyUI's requirements into .venv, then runs the tests), from $root:" >&2
    echo "  bash scripts/test.sh" >&2
    echo "(add --setup-only to install without running the tests)" >&2
    exit 2
fi
# shellcheck source=scripts/comfyui.sh
. "$root/scripts/comfyui.sh"
use_comfyui "$root" "$here" || exit 2
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$venv/bin/python" -m dragrun.run_workflow "$@"
