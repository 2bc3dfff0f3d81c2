#!/usr/bin/env bash
# One command that proves the GPU path (see tools/gpu_check.py):
#
#   COMFYUI_PATH=/path/to/ComfyUI bash scripts/gpu_check.sh [--out DIR]          # CUDA machine, ~8 min (H100, est.)
#   COMFYUI_PATH=/path/to/ComfyUI bash scripts/gpu_check.sh --sdxl [--out DIR]   # SDXL at 1024², ~6 min (est.)
#   bash scripts/gpu_check.sh --tiny [--sdxl]                                   # CPU pipeline check (CI: --tiny)
#
# The default run: CUDA tests, the SD1.5 workflows, the SD1.5 benchmark, then
# the *_sdxl workflows on a real-size random SDXL checkpoint. --sdxl: the SDXL
# benchmark at 1024², then the *_sdxl workflows at 1024², alone (both runs
# together would not fit one 10-minute device call).
#
# Python: $PYTHON, else .venv/bin/python (made by scripts/test.sh), else python3.
# On a machine without network, wheels carried in .whl/ (made by
# scripts/prepare_gpu_carry.sh: diffusers, av, torchsde, trampoline,
# importlib_metadata, ComfyUI's frontend package) are installed into a
# scratch folder when those imports fail.
set -euo pipefail
cd "$(dirname "$0")/.."

py="${PYTHON:-}"
if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
if ! "$py" -c "import diffusers, torchsde, av, comfyui_frontend_package" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    site="$(mktemp -d)/site"
    "$py" -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$py" -m tools.gpu_check "$@"
