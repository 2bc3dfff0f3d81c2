"""Tiny seeded Wan 2.1 I2V (Wan-Move) stand-ins that ComfyUI's own loaders detect, for ``drag_to_video_wanmove``.

Built from a seed the first time a test asks and cached in
:func:`tools.tiny_models.cache_dir` (values from :func:`tools.tiny_models.seeded_tensor`'s
rule). Need ComfyUI >= 0.33 importable (``COMFYUI_PATH``).

* :func:`tiny_wan_i2v_path`: the Wan-Move diffusion model for UNETLoader. Wan-Move's
  released model is a Wan 2.1 I2V 14B; ComfyUI reads its size from the state dict
  (``comfy.model_detection``: width from ``head.modulation``, heads = width / 128,
  FFN width, block count, input channels from ``patch_embedding``; ``i2v`` from
  ``img_emb.proj.0.bias``). The tiny one: width 128 (1 head), FFN 256, one block,
  36 input channels (16 noisy latent + 4 mask + 16 start-image latent, as
  WanMoveTrackToVideo's ``concat_latent_image`` / ``concat_mask`` feed it), the
  CLIP-vision projection from 1280 (CLIP ViT-H's width); fp16, 2.8 M parameters (5.5 MB).
  The text projection takes 4096 inputs: Wan's ``text_dim`` is fixed (UMT5-XXL's width).
* :func:`tiny_wan_vae_path`: a Wan 2.1 VAE for VAELoader with base width 8
  (released: 96; VAELoader reads it from ``decoder.head.0.gamma``), 16 latent channels,
  the released 4x temporal and 8x spatial compression.

What has no tiny stand-in, and what the tests do instead:

* the text encoder: ``CLIPLoader`` type ``wan`` builds UMT5-XXL (5.7 G parameters)
  from a fixed config whatever the file holds, as T5-XXL for FLUX. The tests swap it
  for a ``CLIPLoader`` of the tiny CLIP-L with type ``sd3`` (:func:`use_tiny_wan_text_encoder`,
  as :func:`tools.tiny_inpaint.use_tiny_flux_text_encoder` does for FLUX): ComfyUI's SD3
  text encoder without T5 pads CLIP-L's (77, 768) states to (77, 4096), Wan's context width;
* CLIP vision: ``CLIPVisionLoader`` picks a fixed config (ViT-H, 632 M parameters) from the
  keys, not the shapes. WanMoveTrackToVideo's ``clip_vision_output`` is optional and Wan's
  image cross-attention then reads the text context (``context_img_len`` None), so the tests
  remove Load CLIP Vision and CLIP Vision Encode (:func:`drop_clip_vision`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tiny_inpaint import TINY_CLIP_TYPE
from .tiny_models import seeded_fill_
from .tiny_sdxl_sd2 import _cached

VERSION = "v1"
"""Bump when a file's contents change, so cached files are rebuilt."""

WAN_CONFIG = {"model_type": "i2v", "dim": 128, "ffn_dim": 256, "num_heads": 1, "num_layers": 1, "in_dim": 36,
              "out_dim": 16, "text_dim": 4096}
"""The tiny Wan's ``comfy.ldm.wan.model.WanModel`` arguments (what ComfyUI's detection reads back from the file)."""

WAN_VAE_DIM = 8


def wan_i2v_state_dict(seed: int = 0) -> dict:
    """The tiny Wan 2.1 I2V state dict (fp16, the released files' key names). Imports comfy."""
    from dragrun import comfy_host

    comfy_host.prepare_comfy_imports()
    import comfy.ldm.wan.model
    import comfy.ops

    with torch.device("meta"):
        model = comfy.ldm.wan.model.WanModel(**WAN_CONFIG, operations=comfy.ops.disable_weight_init)
    model = seeded_fill_(model.to_empty(device="cpu"), seed)
    return {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}


def tiny_wan_i2v_path(seed: int = 0) -> Path:
    """The cached tiny Wan 2.1 I2V (Wan-Move) diffusion model (a few MB)."""
    return _cached(f"dragkit-tiny-wan21-i2v-{VERSION}-s{seed}.safetensors", lambda: wan_i2v_state_dict(seed))


def wan_vae_state_dict(seed: int = 0) -> dict:
    """A seeded Wan 2.1 VAE of base width :data:`WAN_VAE_DIM` (fp32), keys as VAELoader reads them. Imports comfy."""
    from dragrun import comfy_host

    comfy_host.prepare_comfy_imports()
    import comfy.ldm.wan.vae

    vae = comfy.ldm.wan.vae.WanVAE(dim=WAN_VAE_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True], image_channels=3, conv_out_channels=3,
                                   dropout=0.0)
    vae = seeded_fill_(vae, seed + 1)
    return {k: v.detach().to(torch.float32).contiguous() for k, v in vae.state_dict().items()}


def tiny_wan_vae_path(seed: int = 0) -> Path:
    """The cached tiny Wan 2.1 VAE."""
    return _cached(f"dragkit-tiny-wan21-vae-{VERSION}-s{seed}.safetensors", lambda: wan_vae_state_dict(seed))


def use_tiny_wan_text_encoder(prompt: dict, clip_name: str) -> list[str]:
    """Point every CLIPLoader of type ``wan`` at ``clip_name`` with type ``sd3`` (in place); returns their ids."""
    swapped = []
    for node_id, node in prompt.items():
        if node["class_type"] == "CLIPLoader" and node["inputs"].get("type") == "wan":
            node["inputs"].update(clip_name=clip_name, type=TINY_CLIP_TYPE)
            swapped.append(node_id)
    return swapped


def drop_clip_vision(prompt: dict) -> list[str]:
    """Remove CLIPVisionLoader and CLIPVisionEncode from an API ``prompt`` and every input linked to them (in place)."""
    dropped = [i for i, n in prompt.items() if n["class_type"] in ("CLIPVisionLoader", "CLIPVisionEncode")]
    for node_id in dropped:
        del prompt[node_id]
    for node in prompt.values():
        for name in [k for k, v in node["inputs"].items() if isinstance(v, list) and v[0] in dropped]:
            del node["inputs"][name]
    return dropped
