# Sourced by scripts/test.sh and scripts/run_workflow.sh: which ComfyUI they use.
#
#   COMFYUI_PATH=/path/to/ComfyUI   that checkout (any version)
#   COMFYUI_PATH=none               no ComfyUI: the engine tests only (the host tests skip)
#   COMFYUI_PATH unset or empty     ComfyUI $DRAGKIT_TESTED_COMFYUI (the newest tested version) in
#                                   $DRAGKIT_HOME/ComfyUI-<version> (default ~/.cache/dragkit), got
#                                   the first time from ../shared/hosts' tarball where there is one,
#                                   else by a shallow git clone of its tag, and reused afterwards
#
# use_comfyui ROOT CALLER_DIR sets and exports COMFYUI_PATH (absolute, a relative one taken from
# CALLER_DIR; empty for "none") and prints a line saying which ComfyUI it is; it returns 2 with a
# message when COMFYUI_PATH is not a checkout or the default cannot be got.

DRAGKIT_TESTED_COMFYUI="0.33.0"

use_comfyui() {
    local root="$1" caller="$2" version="$DRAGKIT_TESTED_COMFYUI"
    if [ "${COMFYUI_PATH:-}" = none ]; then
        COMFYUI_PATH=""
        export COMFYUI_PATH
        echo "[comfyui] COMFYUI_PATH=none: no ComfyUI (the host tests skip; the main job needs one)"
        return 0
    fi
    if [ -n "${COMFYUI_PATH:-}" ]; then
        case "$COMFYUI_PATH" in /*) ;; *) COMFYUI_PATH="$caller/$COMFYUI_PATH" ;; esac
        if [ ! -f "$COMFYUI_PATH/main.py" ] || [ ! -f "$COMFYUI_PATH/requirements.txt" ]; then
            echo "error: COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI checkout (no main.py / requirements.txt)." >&2
            echo "Leave COMFYUI_PATH unset to use ComfyUI $version, which this script gets itself." >&2
            return 2
        fi
        export COMFYUI_PATH
        echo "[comfyui] ComfyUI at $COMFYUI_PATH (COMFYUI_PATH)"
        return 0
    fi
    local home="${DRAGKIT_HOME:-$HOME/.cache/dragkit}"
    local dest="$home/ComfyUI-$version"
    if [ -f "$dest/main.py" ]; then
        echo "[comfyui] ComfyUI $version at $dest (the newest tested version; COMFYUI_PATH=... picks another)"
    else
        mkdir -p "$home"
        local partial
        partial="$(mktemp -d "$home/.ComfyUI-$version.partial.XXXXXX")"
        local tarball="$root/../shared/hosts/ComfyUI-$version.tar.gz"
        if [ -f "$tarball" ]; then
            echo "[comfyui] unpacking ComfyUI $version from $tarball into $dest (once; about 10 s)"
            tar -xzf "$tarball" -C "$partial" && mv "$partial/ComfyUI-$version" "$partial/tree"
        else
            echo "[comfyui] getting ComfyUI $version: git clone --depth 1 --branch v$version into $dest (once; about 30 s)"
            git clone --quiet --depth 1 --branch "v$version" https://github.com/Comfy-Org/ComfyUI "$partial/tree"
        fi
        if [ ! -f "$partial/tree/main.py" ]; then
            rm -rf "$partial"
            echo "error: could not get ComfyUI $version into $dest; get any ComfyUI yourself and set COMFYUI_PATH to it:" >&2
            echo "  git clone https://github.com/Comfy-Org/ComfyUI ../ComfyUI && COMFYUI_PATH=../ComfyUI bash scripts/test.sh" >&2
            return 2
        fi
        # The move is atomic: a run stopped half-way leaves no half-unpacked ComfyUI at $dest (a run
        # beside this one may have put its own there first: that one is used).
        mv -T "$partial/tree" "$dest" 2>/dev/null
        rm -rf "$partial"
        if [ ! -f "$dest/main.py" ]; then
            echo "error: could not move ComfyUI $version into $dest" >&2
            return 2
        fi
        echo "[comfyui] ComfyUI $version is at $dest (reused from now on; COMFYUI_PATH=... picks another)"
    fi
    COMFYUI_PATH="$dest"
    export COMFYUI_PATH
}
