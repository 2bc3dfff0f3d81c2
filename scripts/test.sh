#!/usr/bin/env bash
# Set up a virtual environment (once) and run the test suite.
#
#   bash scripts/test.sh [pytest args]                # set up, then every test
#   bash scripts/test.sh --setup-only                 # set up only (what the main job needs)
#   COMFYUI_PATH=/path/to/ComfyUI bash scripts/test.sh   # against another ComfyUI
#
# Pytest arguments go to pytest; when none of them names a file or folder,
# the whole of tests/ runs (e.g. `-m host`: the host tests only;
# `tests/host/test_workflows.py`: that file only).
#
# Environment:
#   VENV           where the virtual environment lives (default: .venv)
#   TORCH_SPEC     the torch requirement installed when torch is missing
#                  (default: torch==2.13.0, a CPU build where one is on disk)
#   DRAGKIT_TEST_WORKERS  pytest workers (default 2; 1: no pytest-xdist)
#   COMFYUI_PATH   the ComfyUI the host tests run against; its requirements are
#                  installed into the environment too (what the headless runner
#                  needs). Unset: ComfyUI 0.33.0, the newest tested version, got
#                  once into ~/.cache/dragkit (scripts/comfyui.sh); "none": no
#                  ComfyUI, the engine tests only
set -euo pipefail
here="$(pwd)"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1   # progress reaches a pipe or a log as it happens, not in 8 kB lumps

setup_only=0
args=()
for arg in "$@"; do
    if [ "$arg" = "--setup-only" ]; then setup_only=1; else args+=("$arg"); fi
done

step_start=$SECONDS
step() { step_start=$SECONDS; echo "[set-up] $*"; }
done_step() { echo "[set-up]   done in $((SECONDS - step_start)) s"; }
# pip's own lines, less the ones a second run or this machine's index settings print for every package.
pip_install() {
    "$py" -m pip install --progress-bar off "$@" 2>&1 \
        | { grep --line-buffered -v -e '^Requirement already satisfied' -e '^Looking in ' -e "^WARNING: Location '" || true; }
}

# shellcheck source=scripts/comfyui.sh
. scripts/comfyui.sh
use_comfyui "$(pwd)" "$here" || exit 2

venv="${VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    step "making the virtual environment $venv (a few seconds)"
    python3 -m venv "$venv"
    done_step
fi
py="$venv/bin/python"
# What this environment was last set up from: when nothing changed (and torch imports), pip is not asked again.
stamp_file="$venv/.dragkit-set-up"
stamp="$({ cat requirements.txt requirements-cluster.txt tests/requirements.txt; echo "${TORCH_SPEC:-torch==2.13.0}"
           [ -z "${COMFYUI_PATH:-}" ] || cat "$COMFYUI_PATH/requirements.txt"; } | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && "$py" -c "import torch" 2>/dev/null; then
    echo "[set-up] requirements unchanged since this environment's last set-up: nothing to install"
    echo "[set-up]   (delete $stamp_file to have pip check them again)"
else
    rm -f "$stamp_file"
    "$py" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || echo "[set-up] note: could not upgrade pip; going on with $("$py" -m pip --version)"
    if ! "$py" -c "import torch" 2>/dev/null; then
        step "installing ${TORCH_SPEC:-torch==2.13.0} (about 200 MB for a CPU build, several GB for a CUDA one; 1-5 min)"
        pip_install "${TORCH_SPEC:-torch==2.13.0}"
        done_step
    fi
    step "installing this pack's and the tests' requirements (diffusers, peft, pytest, ray, ...; 1-2 min, seconds once installed)"
    pip_install -r tests/requirements.txt
    done_step
    if [ -n "${COMFYUI_PATH:-}" ]; then
        step "installing the requirements of ComfyUI at $COMFYUI_PATH (about 40 packages; its torchvision brings the"
        echo "[set-up]   torch build it was made for, with NVIDIA's CUDA libraries: about 4 GB and 2-5 min the first time)"
        pip_install -r "$COMFYUI_PATH/requirements.txt" websocket-client
        done_step
    fi
    echo "$stamp" > "$stamp_file"
fi

if [ "$setup_only" = 1 ]; then
    echo "[set-up] ready: $venv"
    if [ -n "${COMFYUI_PATH:-}" ]; then
        echo "[set-up] run the main job with: bash scripts/run_workflow.sh workflows/fastdrag.json --sample samples/art_0 --out out/"
    else
        echo "[set-up] with COMFYUI_PATH=none ComfyUI's requirements were not installed: the main job and the host tests need them." >&2
    fi
    exit 0
fi

# The whole of tests/ unless an argument names a file or folder (a test id: path::name).
paths=(tests)
for arg in ${args[@]+"${args[@]}"}; do
    case "$arg" in -*) continue ;; esac
    if [ -e "${arg%%::*}" ]; then paths=(); break; fi
done

# Two pytest workers (pytest-xdist) by default: most tests run tiny models, where one Python thread is the
# limit, so two cores finish the suite in about half the time. Whole files go to one worker (--dist loadfile),
# so a file's module-scoped server, browser or model is made once, in the order tests/conftest.py collects
# them (--no-loadscope-reorder): the longest files first, so the workers finish together.
workers="${DRAGKIT_TEST_WORKERS:-2}"
parallel=()
[ "$workers" -gt 1 ] && parallel=(-n "$workers" --dist loadfile --no-loadscope-reorder)
for arg in ${args[@]+"${args[@]}"}; do
    case "$arg" in -n|-n[0-9]*|--numprocesses*) parallel=(); workers="(as given)" ;; esac   # the caller's -n wins
done
if [ "${#parallel[@]}" -gt 0 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
    # The cores shared out among the workers (and the servers and benchmarks they start): torch's default of one
    # thread per core in each process oversubscribes them, and its spinning threads then slow every test down.
    OMP_NUM_THREADS=$(( $(nproc) / workers > 0 ? $(nproc) / workers : 1 ))
    export OMP_NUM_THREADS
fi
echo "[tests] pytest on $workers worker(s) (DRAGKIT_TEST_WORKERS): one line per test as it ends; the first host"
echo "[tests] test builds the tiny test checkpoints into ${DRAGKIT_TEST_CACHE:-~/.cache/dragkit-tests} (about 7 GB, 2 min, once)"
status=0
"$py" -m pytest -v --durations=15 ${parallel[@]+"${parallel[@]}"} ${paths[@]+"${paths[@]}"} ${args[@]+"${args[@]}"} \
    || status=$?

if [ -z "${COMFYUI_PATH:-}" ]; then
    echo "note: COMFYUI_PATH=none, so ComfyUI's requirements were not installed and the host tests" >&2
    echo "      skipped; the headless runner needs both: bash scripts/test.sh" >&2
elif ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
        && ! command -v google-chrome >/dev/null 2>&1 && [ -z "${DRAGKIT_CHROMIUM:-}" ]; then
    echo "note: no Chromium found, so the browser tests skipped (Debian: apt-get install chromium)." >&2
fi
exit "$status"
