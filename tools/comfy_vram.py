"""Run a module whose in-process ComfyUI starts in the host's VRAM mode, as ComfyUI's ``main.py`` would start it.

    python -m tools.comfy_vram {default,no-dynamic-vram} [--disable-async-offload] MODULE [ARGS...]

ComfyUI decides its model patcher at start-up, in ``main.py``: on a host with
Dynamic VRAM (0.33.0: ``comfy-aimdo``, an NVIDIA GPU, torch 2.8 or newer, and
none of ``--disable-dynamic-vram``, ``--highvram``, ``--gpu-only``,
``--novram``, ``--cpu``) it initialises comfy-aimdo for every device and makes
``ModelPatcherDynamic`` the core patcher. The benchmark and the GPU check's
capture check import ComfyUI in-process (:mod:`dragrun.comfy_host`), which
never runs ``main.py``; this runs that part of the start-up first (mirroring
ComfyUI 0.33.0 ``main.py``: ``comfy_aimdo.control.init`` /
``init_devices``, ``comfy.model_patcher.CoreModelPatcher``,
``comfy.memory_management.aimdo_enabled``), then ``MODULE`` as ``__main__``.
The comfy-aimdo calls (:func:`init_aimdo`, :func:`init_aimdo_devices`) are
those of comfy-aimdo 0.4.13 (ComfyUI 0.33.0's pin) and 0.5.5 (0.36.0's),
which take the same arguments there.
``no-dynamic-vram`` sets the host's ``--disable-dynamic-vram`` flag instead;
``--disable-async-offload`` sets that flag of the host (0.33+: no offload
streams; the default on NVIDIA is two) before ``comfy.model_management``
counts its streams.

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

HOST_FLAGS = ("--disable-async-offload",)
"""ComfyUI start-up flags that may come between the mode and the module, set on ``comfy.cli_args.args``."""

DYNAMIC_VRAM_SINCE = (0, 33)
"""The first ComfyUI version with Dynamic VRAM (``comfy.model_patcher.ModelPatcherDynamic``, comfy-aimdo)."""

NO_DYNAMIC_VRAM = "ComfyUI < 0.33 has no Dynamic VRAM"
"""The reason a test of Dynamic VRAM skips on an older host (the floor host, 0.3.64)."""


def version_has_dynamic_vram(version: str) -> bool:
    """Whether ComfyUI ``version`` (``"0.33.0"``) is at or above :data:`DYNAMIC_VRAM_SINCE`."""
    return tuple(int(part) for part in version.split(".")[:2]) >= DYNAMIC_VRAM_SINCE


def aimdo_version() -> str:
    """The version of the comfy-aimdo this process imports (its ``comfy_aimdo/_version.py``; 0.4.13 and 0.5.5 both
    have one)."""
    from comfy_aimdo import _version

    return _version.__version__


def host_flags(comfyui: Path) -> dict:
    """What the host at ``comfyui`` offers, read from its ``comfy/cli_args.py``: ``dynamic_vram`` (it has Dynamic
    VRAM, on by default where supported), ``disable_flag`` (it takes ``--disable-dynamic-vram``) and
    ``async_offload_flag`` (it takes ``--disable-async-offload``: 0.33+, where offload streams are on by default)."""
    try:
        text = (Path(comfyui) / "comfy" / "cli_args.py").read_text(errors="replace")
    except OSError:
        return {"dynamic_vram": False, "disable_flag": False, "async_offload_flag": False}
    return {"dynamic_vram": "def enables_dynamic_vram" in text, "disable_flag": '"--disable-dynamic-vram"' in text,
            "async_offload_flag": '"--disable-async-offload"' in text}


def start(mode: str, cuda: bool, flags: tuple = ()) -> str:
    """Import ComfyUI's start-up modules and apply ``mode`` and ``flags`` (of :data:`HOST_FLAGS`) before any model
    exists; returns the state (``dynamic`` or ``static: <why>``). ``cuda``: False for a CPU run (``--tiny``), where
    ComfyUI runs ``--cpu``.

    As in ``main.py``, comfy-aimdo is initialised before torch is imported.
    """
    from dragrun.comfy_host import prepare_comfy_imports

    prepare_comfy_imports(cpu=not cuda)
    import comfy.cli_args as cli

    for flag in flags:
        name = flag.lstrip("-").replace("-", "_")
        if not hasattr(cli.args, name):
            raise SystemExit(f"this ComfyUI has no {flag} flag")
        setattr(cli.args, name, True)

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
    init_aimdo(cli.args)
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
    if not init_aimdo_devices(cli.args, [device.index for device in mm.get_all_torch_devices()]):
        return "static: comfy-aimdo did not initialise"
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    return "dynamic"


def init_aimdo(args) -> bool:
    """Load comfy-aimdo's library as ComfyUI 0.33.0's ``main.py`` does before torch is imported: the simple VRAM
    headroom from ``--reserve-vram`` (GiB), NVML pressure unless ``--disable-nvml-pressure``."""
    import comfy_aimdo.control

    reserve = getattr(args, "reserve_vram", None)
    return bool(comfy_aimdo.control.init(simple_vram_headroom=None if reserve is None else int(reserve * 2**30),
                                         nvml_pressure=not getattr(args, "disable_nvml_pressure", False)))


def init_aimdo_devices(args, indices: list[int]) -> bool:
    """Start comfy-aimdo on the devices ``indices`` with ``--vram-headroom`` (GiB) each, as ``main.py`` does; whether
    it did."""
    import comfy_aimdo.control

    headroom = int((getattr(args, "vram_headroom", 0) or 0) * 2**30)
    return bool(comfy_aimdo.control.init_devices([(index, headroom) for index in indices]))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    flags: tuple = ()
    while len(argv) > 1 and argv[1] in HOST_FLAGS:
        flags, argv = flags + (argv[1],), argv[:1] + argv[2:]
    if len(argv) < 2 or argv[0] not in MODES:
        raise SystemExit(f"usage: python -m tools.comfy_vram {{{','.join(MODES)}}} [{' '.join(HOST_FLAGS)}] MODULE "
                         "[ARGS...]")
    mode, module, rest = argv[0], argv[1], argv[2:]
    os.environ[ENV_VAR] = start(mode, "--tiny" not in rest, flags)
    print(f"ComfyUI VRAM mode {mode}{''.join(' ' + f for f in flags)}: {os.environ[ENV_VAR]}", file=sys.stderr)
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
