"""A real-size SDXL checkpoint with random weights, built through ComfyUI's own classes (nothing downloaded).

The SDXL counterpart of :mod:`tools.sd15_random`, for the 1024² speed, memory
and GPU-path checks: ComfyUI's SDXL ``UNetModel`` (2.6 G parameters), the
CLIP-L and OpenCLIP-G text encoders of its ``SDXLClipModel`` (0.8 G) and the
SD VAE (SDXL's has the same architecture), each built on the meta device and
allocated with :func:`tools.sd15_random.materialise_random` weights in
``dtype`` (6.9 GB in fp16). The tensors are keyed by ComfyUI's own SDXL
saving rules (``comfy.supported_models.SDXL.process_*_state_dict_for_saving``),
so CheckpointLoaderSimple detects the file as SDXL and loads every tensor.

``python -m tools.sdxl_random --out DIR [--seed S] [--device cuda]`` writes
:func:`checkpoint_name` into ``DIR`` (filling on the GPU when asked is much
faster than on a CPU) and prints its path. Needs ComfyUI importable
(``COMFYUI_PATH``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .sd15_random import SD_VAE_DDCONFIG, materialise_random, write_files_cli, write_random
from .tiny_sdxl_sd2 import SDXL_LDM_UNET as TINY_SDXL_LDM_UNET

SDXL_LDM_UNET = dict(TINY_SDXL_LDM_UNET, channel_mult=[1, 2, 4], image_size=32, use_spatial_transformer=True,
                     legacy=False)
"""SDXL's UNet in ComfyUI's ldm ``UNetModel`` keyword arguments: the tiny SDXL's blocks at 320/640/1280 channels."""

PARTS = ("unet", "vae", "clip")
"""The checkpoint's modules, in the order their seeds follow ``seed`` (unet ``seed``, vae ``seed + 1``, ...)."""


def checkpoint_name(seed: int, dtype: torch.dtype) -> str:
    return f"dragkit-random-sdxl-s{seed}-{str(dtype).removeprefix('torch.')}.safetensors"


def meta_modules(dtype: torch.dtype = torch.float16) -> dict[str, torch.nn.Module]:
    """``{"unet", "vae", "clip"}``: ComfyUI's SDXL ``UNetModel``, ``AutoencoderKL`` and ``SDXLClipModel`` on the meta
    device in ``dtype`` (no memory; :func:`checkpoint_tensors` of their state dicts has the file's keys and shapes)."""
    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.sdxl_clip import SDXLClipModel

    with torch.device("meta"):
        modules = {
            "unet": UNetModel(**SDXL_LDM_UNET, operations=comfy.ops.disable_weight_init),
            "vae": AutoencoderKL(ddconfig=SD_VAE_DDCONFIG, embed_dim=4),
            "clip": SDXLClipModel(device="meta"),
        }
    for part, module in modules.items():
        if any(True for _ in module.buffers()):
            raise RuntimeError(f"ComfyUI's SDXL {part} has buffers, which random filling would leave uninitialised")
    return {part: module.to(dtype) for part, module in modules.items()}


def checkpoint_tensors(unet: dict, vae: dict, clip: dict) -> dict:
    """The single-file checkpoint's tensors from the three modules' state dicts, keyed by ComfyUI's SDXL saving rules
    (``model.diffusion_model.*``, ``first_stage_model.*``, ``conditioner.embedders.0/1.*``)."""
    from comfy.supported_models import SDXL

    config = SDXL(SDXL_LDM_UNET)
    sd = config.process_unet_state_dict_for_saving(unet)
    sd.update(config.process_vae_state_dict_for_saving(vae))
    sd.update(config.process_clip_state_dict_for_saving(clip))
    return sd


def checkpoint_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu") -> dict:
    """The checkpoint's tensors (CPU, contiguous); weights filled on ``device`` one module at a time."""
    parts = {}
    for offset, (part, module) in enumerate(meta_modules(dtype).items()):
        module = materialise_random(module, torch.device(device), seed + offset)
        parts[part] = {key: value.to("cpu") for key, value in module.state_dict().items()}
        del module
    return {key: value.contiguous() for key, value in checkpoint_tensors(**parts).items()}


def write_checkpoint(path, seed: int = 0, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu") -> Path:
    """Write the random SDXL checkpoint to ``path`` atomically; returns the path."""
    return write_random(path, checkpoint_state_dict, "dragkit_random_sdxl", seed, dtype, device)


def main(argv: list[str] | None = None) -> int:
    return write_files_cli("Write a real-size SDXL checkpoint with random weights.",
                           ((checkpoint_name, write_checkpoint),), argv)


if __name__ == "__main__":
    raise SystemExit(main())
