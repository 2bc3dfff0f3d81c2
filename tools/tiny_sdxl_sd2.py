"""Tiny seeded SDXL and SD2.x (v-prediction) checkpoints that ComfyUI's CheckpointLoaderSimple detects.

ComfyUI 0.3.64 detects a family from the UNet's shape (``comfy/supported_models.py``):

- **SDXL**: ``model_channels`` 320, linear transformer projections,
  ``transformer_depth`` ``[0, 0, 2, 2, 10, 10]`` (so two res blocks per level and
  ten transformer blocks at the deepest of three levels), context 2048 and a
  2816-wide ``adm`` input (pooled CLIP-G + size embeddings). The channel
  multipliers are not part of the match, so every level here keeps 320
  channels (SDXL: 320/640/1280): 283 M parameters instead of 2.6 G, the same
  block structure, layer roles and conditioning.
- **SD2.x**: ``model_channels`` 320, linear projections, context 1024, no
  ``adm``; v-prediction when the bias of
  ``output_blocks.11.1.transformer_blocks.0.norm1`` has a standard deviation
  above 0.09, which this builder sets (``v_prediction=True``). Four levels of
  320 channels with attention in the top three, like SD1.5/SD2.

Both files hold the UNet (fp16, ``model.diffusion_model.*``) and a seeded
TAESD VAE (``first_stage_model.*``). Without a text encoder tests build the
CONDITIONING themselves (SDXL: ``pooled_output``, ``width``, ``height``);
``tiny_sdxl_checkpoint_path(with_clip=True)`` adds SDXL's real-size text
encoders (CLIP-L and CLIP-G, ``comfy.sdxl_clip.SDXLClipModel``, seeded, fp16:
817 M parameters, 1.6 GB) in the keys of a released SDXL checkpoint, so
CheckpointLoaderSimple returns a CLIP whose CLIPTextEncode gives the
``(1, 77, 2048)`` prompt embedding and the ``(1, 1280)`` pooled output.
Written atomically into :func:`tools.tiny_models.cache_dir`; needs ComfyUI
importable (``COMFYUI_PATH``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dragkit.atomic import save_safetensors_atomic

from .tiny_models import cache_dir, seeded_fill_

VERSION = "v1"

SDXL_LDM_UNET = dict(
    in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2], channel_mult=[1, 1, 1],
    transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], context_dim=2048, num_head_channels=64,
    use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=2816,
)
"""The tiny SDXL UNet in ComfyUI's ldm ``UNetModel`` keyword arguments."""

SD2_LDM_UNET = dict(
    in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 1, 1, 1],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], context_dim=1024, num_head_channels=64,
    use_linear_in_transformer=True,
)
"""The tiny SD2.x UNet in ComfyUI's ldm ``UNetModel`` keyword arguments."""

V_PREDICTION_MARKER = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
"""The tensor whose spread ComfyUI's SD20.model_type reads to tell v-prediction from ε."""


def _state_dict(unet_config: dict, seed: int, v_prediction: bool = False) -> dict:
    from dragrun import comfy_host

    comfy_host.prepare_comfy_imports()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.taesd.taesd import TAESD

    with torch.device("meta"):
        unet = UNetModel(image_size=32, use_spatial_transformer=True, legacy=False, use_temporal_attention=False,
                         use_temporal_resblock=False, operations=comfy.ops.disable_weight_init, **unet_config)
    unet = seeded_fill_(unet.to_empty(device="cpu"), seed)
    sd = {"model.diffusion_model." + k: v.to(torch.float16).contiguous() for k, v in unet.state_dict().items()}
    marker = "model.diffusion_model." + V_PREDICTION_MARKER
    if v_prediction:
        generator = torch.Generator().manual_seed(seed)
        sd[marker] = (0.3 * torch.randn(sd[marker].shape, generator=generator)).to(torch.float16)
    vae = seeded_fill_(TAESD(), seed + 1)
    sd.update({"first_stage_model." + k: v.detach().to(torch.float32).contiguous() for k, v in vae.state_dict().items()})
    return sd


def _sdxl_clip_state_dict(seed: int) -> dict:
    """SDXL's text encoders, seeded, fp16, in a released SDXL checkpoint's keys.

    ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L, transformers
    layout) and ``conditioner.embedders.1.model.*`` (CLIP-G, OpenCLIP layout:
    fused ``in_proj`` q/k/v, ``text_projection`` as ``(1280, 1280)`` input x
    output). The layout is ComfyUI's own SDXL checkpoint saver's
    (``supported_models.SDXL.process_clip_state_dict_for_saving``), the inverse
    of what its loader reads; CLIP-L's ``text_projection`` and ``logit_scale``
    are left out as that saver and released checkpoints do.
    """
    from dragrun import comfy_host

    comfy_host.prepare_comfy_imports()
    import comfy.sdxl_clip
    import comfy.supported_models

    clip = seeded_fill_(comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float16), seed)
    clip_sd = {k: v.detach() for k, v in clip.state_dict().items()}
    saved = comfy.supported_models.SDXL(dict(SDXL_LDM_UNET)).process_clip_state_dict_for_saving(clip_sd)
    return {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in saved.items()}


def _cached(name: str, build) -> Path:
    path = cache_dir() / name
    if not path.is_file():
        save_safetensors_atomic(build(), path, {"dragkit_tiny": name})
    return path


def tiny_sdxl_checkpoint_path(seed: int = 0, with_clip: bool = False) -> Path:
    """The cached tiny SDXL checkpoint (built the first time: ~10 s, 570 MB).

    ``with_clip``: with SDXL's CLIP-L and CLIP-G text encoders, seeded with
    ``seed + 2`` (another file: ~35 s the first time on 2 CPU cores, 2.2 GB).
    """
    if not with_clip:
        return _cached(f"dragkit-tiny-sdxl-{VERSION}-s{seed}.safetensors", lambda: _state_dict(SDXL_LDM_UNET, seed))
    return _cached(f"dragkit-tiny-sdxl-clip-{VERSION}-s{seed}.safetensors",
                   lambda: {**_state_dict(SDXL_LDM_UNET, seed), **_sdxl_clip_state_dict(seed + 2)})


def tiny_sd2_v_checkpoint_path(seed: int = 0) -> Path:
    """The cached tiny SD2.x v-prediction checkpoint (built the first time: a few seconds)."""
    return _cached(f"dragkit-tiny-sd2v-{VERSION}-s{seed}.safetensors",
                   lambda: _state_dict(SD2_LDM_UNET, seed, v_prediction=True))
