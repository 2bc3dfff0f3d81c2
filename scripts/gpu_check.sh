#!/usr/bin/env bash
# One command that proves the GPU path inside one device call (tools/gpu_check.py; docs/gpu-check.md):
#
#   bash scripts/gpu_check.sh --budget 540                  # CUDA machine: key numbers first, as 540 s allow
#   bash scripts/gpu_check.sh --budget 540 --only workflows  # a second call: what the first had no time for
#   bash scripts/gpu_check.sh --sdxl --budget 540           # SDXL at 1024²
#   bash scripts/gpu_check.sh --tiny                        # the same steps on the tiny models on a CPU (CI)
#
# Python: $PYTHON, else .venv/bin/python (made by scripts/test.sh), else python3.
# On a machine without network (the lent GPU machine), what scripts/prepare_gpu_carry.sh made is used:
# the wheels in .whl/ are installed into a scratch folder when ComfyUI's or the benchmark's imports fail, and
# COMFYUI_PATH=.comfyui (a folder holding the ComfyUI-<version>.tar.xz it made) is unpacked there and used:
#
#   COMFYUI_PATH=.comfyui bash scripts/gpu_check.sh --budget 540     # on the device, carrying .whl and .comfyui
set -euo pipefail
cd "$(dirname "$0")/.."
export DRAGKIT_GPU_CHECK_T0="${DRAGKIT_GPU_CHECK_T0:-$(date +%s.%N)}"  # the --budget counts from here

py="${PYTHON:-}"
if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
scratch=""
if ! "$py" -c "import diffusers, torchsde, av, pydantic, spandrel, kornia" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    scratch="$(mktemp -d -t dragkit-gpu-check-XXXXXX)"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$scratch/site" .whl/*.whl
    export PYTHONPATH="$scratch/site${PYTHONPATH:+:$PYTHONPATH}"
    echo "installed $(ls .whl/*.whl | wc -l) carried wheels into $scratch/site" >&2
fi
if [ -n "${COMFYUI_PATH:-}" ] && [ ! -f "$COMFYUI_PATH/main.py" ] && compgen -G "$COMFYUI_PATH/ComfyUI-*.tar.xz" >/dev/null; then
    tarball="$(ls "$COMFYUI_PATH"/ComfyUI-*.tar.xz | head -1)"
    scratch="${scratch:-$(mktemp -d -t dragkit-gpu-check-XXXXXX)}"
    mkdir -p "$scratch/ComfyUI"
    tar -C "$scratch/ComfyUI" -xJf "$tarball"
    export COMFYUI_PATH="$scratch/ComfyUI"
    echo "unpacked $tarball into $COMFYUI_PATH" >&2
fi
export PYTHONUNBUFFERED=1
exec "$py" -m tools.gpu_check "$@"
