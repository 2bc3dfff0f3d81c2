"""Tiny seeded FLUX.1 [dev]-like models for the FLUX tests (CPU), in ComfyUI's (= BFL's) layout.

* :func:`small_flux_state_dict` / :func:`small_flux_patcher`: a FLUX.1 [dev]
  of :data:`SMALL_FLUX` shape -- 64 input channels (16 latent channels x 2x2
  patches), guidance embedding, 2 double- and 3 single-stream blocks, but
  hidden 64 (2 heads of 32) and narrow text inputs, so one model call takes
  milliseconds. ComfyUI's FLUX detection would fix the width at 3072, so the
  patcher is built from the config directly (ComfyUI's own ``Flux`` model
  class and model sampling, shift 1.15 as FLUX.1 [dev]); its state dict has
  BFL's key names, so the same tensors load into BFL's reference model.
* :func:`tiny_flux_dev_path`: a FLUX.1 [dev] diffusion-model file UNETLoader
  detects as ``Flux`` (64 input channels, guidance embedding) on ComfyUI
  0.3.64 and 0.33.0: FLUX's fixed width (hidden 3072, T5 context 4096), one
  double- and one single-stream block, ``vector_in`` 2048 wide for the tiny
  CLIP-L's SD3-style pooled output (see :mod:`tools.tiny_inpaint`), bf16.

Weights follow :func:`tools.tiny_models.seeded_tensor` (values depend on the
seed, the tensor's name and its shape). All need ComfyUI importable.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .tiny_models import seeded_tensor
from .tiny_sdxl_sd2 import _cached

VERSION = "v1"

WEIGHT_SCALE = 1.0
"""Factor on the seeded matrices (~N(0, 0.02))."""

SMALL_FLUX = {
    "vec_in_dim": 24,
    "context_in_dim": 40,
    "hidden_size": 64,
    "mlp_ratio": 4.0,
    "num_heads": 2,
    "depth": 2,
    "depth_single_blocks": 3,
    "axes_dim": [8, 12, 12],
}
"""How the small FLUX differs from the host's detected FLUX.1 [dev] config (:func:`small_flux_config`; BFL ``FluxParams`` names)."""

TINY_DEV_PROBE = {
    "img_in.weight": (3072, 64),
    "txt_in.weight": (3072, 4096),
    "vector_in.in_layer.weight": (3072, 2048),
    "guidance_in.in_layer.weight": (3072, 256),
    "double_blocks.0.img_attn.norm.key_norm.scale": (128,),
    "single_blocks.0.linear1.weight": (3072 * 3 + 12288, 3072),
}
"""The tensors ComfyUI's FLUX detection reads, for a FLUX.1 [dev] with one double and one single block."""


def _prepare():
    from dragrun import comfy_host

    comfy_host.prepare_comfy_imports()


def _seeded(model: torch.nn.Module, seed: int, dtype: torch.dtype) -> dict:
    out = {}
    for name, tensor in model.state_dict().items():
        fill_name = re.sub(r"_norm\.scale$", "_norm.weight", name)  # a norm scale is filled as a norm weight (1 + noise)
        value = seeded_tensor(fill_name, tensor.shape, seed)
        if name.endswith(".weight") and value.dim() == 2:
            value = value * WEIGHT_SCALE
        out[name] = value.to(dtype)
    return out


def small_flux_config() -> dict:
    """The host's ``unet_config`` for a FLUX.1 [dev] (detected from :data:`TINY_DEV_PROBE`) with :data:`SMALL_FLUX`'s sizes."""
    _prepare()
    import comfy.model_detection

    probe = {k: torch.empty(shape, device="meta") for k, shape in TINY_DEV_PROBE.items()}
    return {**comfy.model_detection.detect_unet_config(probe, ""), **SMALL_FLUX}


def small_flux_state_dict(seed: int = 0) -> dict:
    """The small FLUX's weights (float32), keys as in BFL's and ComfyUI's ``Flux``."""
    _prepare()
    import comfy.ldm.flux.model
    import comfy.ops

    config = {k: v for k, v in small_flux_config().items() if k != "image_model"}
    with torch.device("meta"):
        model = comfy.ldm.flux.model.Flux(**config, operations=comfy.ops.disable_weight_init)
    return _seeded(model, seed, torch.float32)


def small_flux_patcher(seed: int = 0):
    """A ComfyUI MODEL (ModelPatcher) of the small FLUX on the CPU, float32, with FLUX.1 [dev]'s model sampling."""
    _prepare()
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher

    model_config = comfy.model_detection.model_config_from_unet_config(small_flux_config())
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "", device=torch.device("cpu"))
    model.load_model_weights(small_flux_state_dict(seed), "")
    device = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def tiny_flux_dev_state_dict(seed: int = 0) -> dict:
    """The loader-detected tiny FLUX.1 [dev] (bf16, keys of a released ``flux1-dev.safetensors``)."""
    _prepare()
    import comfy.ldm.flux.model
    import comfy.model_detection
    import comfy.ops

    probe = {k: torch.empty(shape, device="meta") for k, shape in TINY_DEV_PROBE.items()}
    config = comfy.model_detection.detect_unet_config(probe, "")
    with torch.device("meta"):
        model = comfy.ldm.flux.model.Flux(**config, operations=comfy.ops.disable_weight_init)
    out = {}
    for name, tensor in _seeded(model, seed, torch.bfloat16).items():
        out[re.sub(r"_norm\.weight$", "_norm.scale", name)] = tensor  # the released files' name for a QK-norm scale
    return out


def tiny_flux_dev_path(seed: int = 0) -> Path:
    """The cached tiny FLUX.1 [dev] diffusion model for UNETLoader (built once: ~15 s, ~1.1 GB)."""
    return _cached(f"dragkit-tiny-flux-dev-{VERSION}-s{seed}.safetensors", lambda: tiny_flux_dev_state_dict(seed))
