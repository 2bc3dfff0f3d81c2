#!/usr/bin/env bash
# Prepare what the lent GPU machine needs (it has no network; see docs/gpu-check.md): Python 3.12 wheels in .whl/
# and the ComfyUI checkout as one compressed tarball in .comfyui/ (both ignored by git), then check that they and
# the repository stay under the device tool's 64 MiB carry limit.
#
#   bash scripts/prepare_gpu_carry.sh /path/to/ComfyUI        # e.g. ComfyUI 0.33.0, the newest host
#
# Then, on the device, carrying .whl and .comfyui:   bash scripts/gpu_check.sh --budget 540
#
# Wheels: what the machine lacks for ComfyUI's import chain (av, torchsde + trampoline, pydantic + its needs),
# the benchmark's diffusers (+ importlib_metadata), the built-in nodes the ControlNet/upscale workflow uses
# (kornia + kornia_rs for Canny, spandrel for the upscale model), and the host's comfy-aimdo (Dynamic VRAM) and
# comfy-kitchen when its requirements name them. comfy-kitchen's wheel (58 MB) is repacked without its compiled
# CUDA/HIP kernels (it falls back to its triton and eager backends; they serve quantised weights, which the check
# does not load). No frontend package (22 MB): the check serves a stand-in page (tools/gpu_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:?usage: bash scripts/prepare_gpu_carry.sh /path/to/ComfyUI}"
[ -f "$src/main.py" ] || { echo "$src is not a ComfyUI checkout (no main.py)" >&2; exit 2; }
limit_mib=64

requirement() {  # the host's requirement line for a package (e.g. "av>=16.0.0"), else the bare name
    local line
    line="$(grep -iE "^$1([<>=~! ]|$)" "$src/requirements.txt" | head -1 | tr -d ' ' || true)"
    echo "${line:-$1}"
}
hosted() { grep -qiE "^$1([<>=~! ]|$)" "$src/requirements.txt"; }

download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$1" "${@:2}"
}

pinned() {  # the exact version a downloaded wheel requires of another package (Requires-Dist: name==x)
    unzip -p "$1" '*.dist-info/METADATA' | grep -iE "^Requires-Dist: $2 *==" | head -1 | sed -E 's/.*== *([^ ;,]+).*/\1/'
}

rm -rf .whl
mkdir -p .whl
download .whl "$(requirement av)" "$(requirement torchsde)" trampoline diffusers importlib_metadata typing_extensions \
    "$(requirement pydantic)" annotated_types typing_inspection "$(requirement kornia)" "$(requirement spandrel)"
download .whl "pydantic_core==$(pinned .whl/pydantic-*.whl pydantic-core)"
download .whl "$(unzip -p .whl/kornia-*.whl '*.dist-info/METADATA' | grep -iE '^Requires-Dist: kornia[-_]rs' \
    | sed -E 's/^Requires-Dist: *//; s/ *;.*//' | tr -d ' ')"
if hosted comfy-aimdo; then download .whl "$(requirement comfy-aimdo)"; fi
if hosted comfy-kitchen; then
    scratch="$(mktemp -d)"
    download "$scratch" "$(requirement comfy-kitchen)"
    python3 - "$scratch"/comfy_kitchen-*.whl .whl <<'EOF'
"""Repack a comfy-kitchen wheel without its compiled backends (_C*.so / .pyd) and their RECORD lines."""
import sys
import zipfile
from pathlib import Path

source, target = Path(sys.argv[1]), Path(sys.argv[2]) / Path(sys.argv[1]).name
compiled = lambda name: "/backends/" in name and Path(name).name.startswith("_C.") and name.endswith((".so", ".pyd"))
with zipfile.ZipFile(source) as inp, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
    for item in inp.infolist():
        if compiled(item.filename):
            continue
        data = inp.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True) if not compiled(line.split(b",")[0].decode()))
        out.writestr(item, data)
print(f"comfy-kitchen without compiled kernels: {source.stat().st_size / 2**20:.1f} MiB -> {target.stat().st_size / 2**20:.1f} MiB")
EOF
    rm -rf "$scratch"
fi

version="$(sed -nE 's/^__version__ *= *"([^"]+)".*/\1/p' "$src/comfyui_version.py" 2>/dev/null || true)"
rm -rf .comfyui
mkdir -p .comfyui
tar -C "$src" -cf - --exclude=./.git --exclude=./comfy_api_nodes --exclude=./tests-unit --exclude=./tests \
    --exclude=./models --exclude=./custom_nodes --exclude=./input --exclude=./output --exclude=./temp --exclude=./user \
    --exclude='./comfy/text_encoders/*_tokenizer' --exclude='__pycache__' --exclude='*.pyc' . \
    | xz -6 -T0 > ".comfyui/ComfyUI-${version:-unknown}.tar.xz"

du -b .whl/* .comfyui/* | sort -n | awk '{printf "%8.2f MiB  %s\n", $1 / 1048576, $2}'
repo="$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)"
untracked="$(git ls-files -z -o --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)"
carry="$(du -cb .whl .comfyui | tail -1 | cut -f1)"
total=$(( repo + ${untracked:-0} + carry ))
awk -v r="$repo" -v u="${untracked:-0}" -v c="$carry" -v t="$total" -v l="$limit_mib" 'BEGIN {
    printf "carry %.1f MiB + repository %.1f MiB + untracked %.1f MiB = %.1f MiB of the %d MiB limit\n",
        c / 1048576, r / 1048576, u / 1048576, t / 1048576, l }'
if [ "$total" -gt $(( limit_mib * 1048576 )) ]; then
    echo "too large for one device call: leave something out" >&2
    exit 1
fi
