#!/usr/bin/env bash
# Prepare what the lent GPU machine needs (it has no network; see the
# README's "GPU check"): wheels for Python 3.12 in .whl/ and a ComfyUI copy
# without its history, models and large tokenizers in .comfyui/ (both ignored
# by git; about 58 MB together, under the device tool's 64 MiB carry limit).
#
#   bash scripts/prepare_gpu_carry.sh /path/to/ComfyUI
#
# Then, on the device: COMFYUI_PATH=.comfyui bash scripts/gpu_check.sh --out "$OUT"
# carrying .whl and .comfyui.
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:?usage: bash scripts/prepare_gpu_carry.sh /path/to/ComfyUI}"
[ -f "$src/main.py" ] || { echo "$src is not a ComfyUI checkout (no main.py)" >&2; exit 2; }

frontend="$(grep -E '^comfyui-frontend-package' "$src/requirements.txt")"  # main.py exits without it
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl av torchsde trampoline diffusers importlib_metadata "$frontend"

rm -rf .comfyui
mkdir -p .comfyui
tar -C "$src" -cf - --exclude=./.git --exclude=./comfy_api_nodes --exclude=./tests-unit --exclude=./models \
    --exclude='./comfy/text_encoders/*_tokenizer' --exclude='__pycache__' . | tar -C .comfyui -xf -
mkdir -p .comfyui/models
du -sh .whl .comfyui
