"""Run a module whose in-process ComfyUI starts in the host's VRAM mode, as ComfyUI's ``main.py`` would start it.

    python -m tools.comfy_vram {default,no-dynamic-vram} MODULE [ARGS...]

ComfyUI decides its model patcher at start-up, in ``main.py``: on a host with
Dynamic VRAM (0.33.0: ``comfy-aimdo``, an NVIDIA GPU, torch 2.8 or newer, and
none of ``--disable-dynamic-vram``, ``--highvram``, ``--gpu-only``,
``--novram``, ``--cpu``) it initialises comfy-aimdo for every device and makes
``ModelPatcherDynamic`` the core patcher. The benchmark and the GPU check's
capture check import ComfyUI in-process (:mod:`tools.comfy_host`), which
never runs ``main.py``; this runs that part of the start-up first (mirroring
ComfyUI 0.33.0 ``main.py``: ``comfy_aimdo.control.init`` /
``init_devices``, ``comfy.model_patcher.CoreModelPatcher``,
``comfy.memory_management.aimdo_enabled``), then ``MODULE`` as ``__main__``.
``no-dynamic-vram`` sets the host's ``--disable-dynamic-vram`` flag instead.

The outcome is in ``DRAGKIT_HOST_VRAM`` for the module to report:
``dynamic`` or ``static: <why>``.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

MODES = ("default", "no-dynamic-vram")
"""``default``: what the host does when started plainly; ``no-dynamic-vram``: started with ``--disable-dynamic-vram``."""

ENV_VAR = "DRAGKIT_HOST_VRAM"


def host_flags(comfyui: Path) -> dict:
    """What the host at ``comfyui`` offers, read from its ``comfy/cli_args.py``: ``dynamic_vram`` (it has Dynamic
    VRAM, on by default where supported) and ``disable_flag`` (it takes ``--disable-dynamic-vram``)."""
    try:
        text = (Path(comfyui) / "comfy" / "cli_args.py").read_text(errors="replace")
    except OSError:
        return {"dynamic_vram": False, "disable_flag": False}
    return {"dynamic_vram": "def enables_dynamic_vram" in text, "disable_flag": '"--disable-dynamic-vram"' in text}


def start(mode: str, cuda: bool) -> str:
    """Import ComfyUI's start-up modules and apply ``mode`` before any model exists; returns the state
    (``dynamic`` or ``static: <why>``). ``cuda``: False for a CPU run (``--tiny``), where ComfyUI runs ``--cpu``.

    As in ``main.py``, comfy-aimdo is initialised before torch is imported.
    """
    from tools.comfy_host import prepare_comfy_imports

    prepare_comfy_imports(cpu=not cuda)
    import comfy.cli_args as cli

    if mode == "no-dynamic-vram":
        if not hasattr(cli.args, "disable_dynamic_vram"):
            raise SystemExit("this ComfyUI has no --disable-dynamic-vram flag")
        cli.args.disable_dynamic_vram = True
        return "static: --disable-dynamic-vram"
    if not hasattr(cli, "enables_dynamic_vram"):
        return "static: this ComfyUI has no Dynamic VRAM"
    if not cuda:
        return "static: a CPU run (--cpu)"
    if not cli.enables_dynamic_vram():
        return "static: the host's flags turn it off"
    import comfy_aimdo.control

    comfy_aimdo.control.init()
    import torch

    if not torch.cuda.is_available():
        return "static: no CUDA device"
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher

    if not mm.is_nvidia():
        return "static: not an NVIDIA GPU"
    if mm.torch_version_numeric < (2, 8):
        return "static: torch older than 2.8"
    if not comfy_aimdo.control.init_devices([device.index for device in mm.get_all_torch_devices()]):
        return "static: comfy-aimdo did not initialise"
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    return "dynamic"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] not in MODES:
        raise SystemExit(f"usage: python -m tools.comfy_vram {{{','.join(MODES)}}} MODULE [ARGS...]")
    mode, module, rest = argv[0], argv[1], argv[2:]
    os.environ[ENV_VAR] = start(mode, cuda="--tiny" not in rest)
    print(f"ComfyUI VRAM mode {mode}: {os.environ[ENV_VAR]}", file=sys.stderr)
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
