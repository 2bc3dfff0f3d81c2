"""Real-size SD1.5 models with random weights, built through ComfyUI's own classes (nothing downloaded).

The compute and memory of a model do not depend on its values, so these are
what speed, memory and GPU-path checks run on:

- :func:`comfy_sd15_modules`: the SD1.5 UNet (860 M parameters) and SD VAE as
  ComfyUI's ``UNetModel`` / ``AutoencoderKL``, weights by :func:`fill_random_`;
- :func:`write_checkpoint`: a single-file SD1.5 checkpoint (UNet, VAE and a
  CLIP-L text encoder, random, in ``dtype``) that ComfyUI's
  CheckpointLoaderSimple detects as SD1.5 -- 2.1 GB in fp16;
- :func:`write_controlnet`: an SD1.5 ControlNet of the same size, zero-convs
  random too so it acts.

``python -m tools.sd15_random --out DIR [--seed S] [--device cuda]`` writes
:func:`checkpoint_name` and :func:`controlnet_name` into ``DIR`` (filling on
the GPU when asked is much faster than on a CPU) and prints their paths. Needs ComfyUI importable (``COMFYUI_PATH``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dragkit.atomic import save_safetensors_atomic

SD15_LDM_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
    channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1, context_dim=768,
    num_heads=8, use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False,
)
"""SD1.5's UNet in ComfyUI's ldm ``UNetModel`` keyword arguments."""

SD_VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}
"""The SD VAE in ComfyUI's ldm ``AutoencoderKL`` terms (``embed_dim`` 4)."""


def checkpoint_name(seed: int, dtype: torch.dtype) -> str:
    return f"dragkit-random-sd15-s{seed}-{str(dtype).removeprefix('torch.')}.safetensors"


def controlnet_name(seed: int, dtype: torch.dtype) -> str:
    return f"dragkit-random-controlnet-sd15-s{seed}-{str(dtype).removeprefix('torch.')}.safetensors"


@torch.no_grad()
def fill_random_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights in place: N(0, 0.02) matrices and kernels, unit scales (1-d weights), zero biases.

    The rule keeps activations finite through a real-size UNet, VAE and text
    encoder; values come from one generator on the module's device seeded
    with ``seed``.
    """
    device = next(module.parameters()).device
    generator = torch.Generator(device=device).manual_seed(int(seed))
    for name, param in module.named_parameters():
        if not param.is_floating_point():
            continue
        if param.dim() > 1:
            param.normal_(0.0, 0.02, generator=generator)
        else:
            param.fill_(1.0 if name.endswith("weight") else 0.0)
    return module


def materialise_random(module: torch.nn.Module, device: torch.device, seed: int) -> torch.nn.Module:
    """``module`` built on the meta device, allocated on ``device`` with :func:`fill_random_` weights."""
    return fill_random_(module.to_empty(device=device), seed)


def comfy_sd15_modules(seed: int = 0, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(unet, vae)``: ComfyUI's SD1.5 ``UNetModel`` and ``AutoencoderKL``, random, float32 on ``device``."""
    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    device = torch.device(device)
    with torch.device("meta"):
        unet = UNetModel(**SD15_LDM_UNET, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
        vae = AutoencoderKL(ddconfig=SD_VAE_DDCONFIG, embed_dim=4)
    return materialise_random(unet, device, seed), materialise_random(vae, device, seed + 1)


def checkpoint_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu") -> dict:
    """The checkpoint's tensors (CPU, ``dtype``), keyed as single-file SD1.5 checkpoints are."""
    from comfy import sd1_clip

    unet, vae = comfy_sd15_modules(seed, device)
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    sd.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    del unet, vae
    with torch.device("meta"):
        clip = sd1_clip.SD1ClipModel(device="meta", dtype=torch.float32)
    clip = materialise_random(clip, torch.device(device), seed + 2)
    for key, value in clip.state_dict().items():
        if key == "clip_l.transformer.text_projection.weight":
            continue  # real SD1.5 checkpoints have none; ComfyUI cannot load it from one
        sd["cond_stage_model." + key[len("clip_l."):]] = value
    return {k: (v.to(dtype) if v.is_floating_point() else v).to("cpu").contiguous() for k, v in sd.items()}


def controlnet_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu") -> dict:
    """An SD1.5 ControlNet's tensors (CPU, ``dtype``), keys ``control_model.*``; every tensor random."""
    import comfy.cldm.cldm
    import comfy.ops

    config = dict(SD15_LDM_UNET)
    config.pop("out_channels")
    with torch.device("meta"):
        net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, **config)
    net = materialise_random(net, torch.device(device), seed + 3)
    return {"control_model." + k: v.to(dtype).to("cpu").contiguous() for k, v in net.state_dict().items()}


def write_random(path, state_dict, tag: str, seed: int, dtype: torch.dtype, device: str | torch.device) -> Path:
    """Write ``state_dict(seed, dtype, device)`` to ``path`` atomically, with ``tag``, the seed and dtype as metadata;
    returns the path."""
    path = Path(path)
    save_safetensors_atomic(state_dict(seed, dtype, device), path, {tag: "1", "seed": str(seed), "dtype": str(dtype)})
    return path


def write_checkpoint(path, seed: int = 0, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu") -> Path:
    """Write the random SD1.5 checkpoint to ``path`` atomically; returns the path."""
    return write_random(path, checkpoint_state_dict, "dragkit_random_sd15", seed, dtype, device)


def write_controlnet(path, seed: int = 0, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu") -> Path:
    """Write the random SD1.5 ControlNet to ``path`` atomically; returns the path."""
    return write_random(path, controlnet_state_dict, "dragkit_random_controlnet_sd15", seed, dtype, device)


def write_files_cli(description: str, files, argv: list[str] | None = None) -> int:
    """The command line of a random-model writer: ``--out DIR [--seed S] [--device D] [--dtype T]``; writes each
    ``(name(seed, dtype), write(path, seed, dtype, device))`` of ``files`` that is not there yet and prints its path."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True, help="folder for the files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where to fill the weights (cuda is much faster)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    args = parser.parse_args(argv)
    from dragrun import comfy_host

    comfy_host.prepare_comfy_imports()
    dtype = getattr(torch, args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, write in files:
        target = args.out / name(args.seed, dtype)
        if not target.is_file():
            write(target, args.seed, dtype, args.device)
        print(target)
    return 0


def main(argv: list[str] | None = None) -> int:
    return write_files_cli("Write a real-size SD1.5 checkpoint and ControlNet with random weights.",
                           ((checkpoint_name, write_checkpoint), (controlnet_name, write_controlnet)), argv)


if __name__ == "__main__":
    raise SystemExit(main())
