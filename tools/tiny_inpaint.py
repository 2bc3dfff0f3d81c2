"""Tiny seeded inpainting models that ComfyUI's own loaders detect, for the warp + inpaint workflows.

Every file is built from a seed the first time a test (or the runner) asks
for it and cached in :func:`tools.tiny_models.cache_dir`, like the other tiny
models; weights follow :func:`tools.tiny_models.seeded_tensor`'s rule (the
values depend only on the seed, the tensor's name and its shape, so both
hosts build the same file). All need ComfyUI importable (``COMFYUI_PATH``);
each was checked to load on ComfyUI 0.3.64 and 0.33.0.

* :func:`tiny_sd15_inpaint_checkpoint_path`: an SD1.5-inpainting checkpoint.
  The tiny SD1.5 UNet's shape (:func:`tools.tiny_models.sd15_ldm_unet_config`:
  4 levels of 320 channels) with **9 input channels** (latent 4 + mask 1 +
  masked-image latent 4), fp16; CheckpointLoaderSimple detects SD15 and,
  because ``in_channels > 4``, an inpainting model (the sampler then feeds
  InpaintModelConditioning's ``concat_latent_image`` and mask). The TAESD VAE
  and CLIP-L text encoder are the tiny SD1.5 checkpoint's own tensors
  (:func:`tools.tiny_models.tiny_checkpoint_path`). ~410 MB.
* :func:`tiny_lcm_lora_path`: a rank-4 LoRA on every attention projection of
  that UNet, in ComfyUI's generic ``diffusion_model.<module>.lora_up/down``
  keys (LoraLoader applies it), standing in for the LCM-LoRA.
* :func:`tiny_sdxl_inpaint_checkpoint_path`: the tiny SDXL UNet
  (:data:`tools.tiny_sdxl_sd2.SDXL_LDM_UNET`) with 9 input channels (detected
  as SDXL, inpainting), with the tiny SDXL checkpoint's CLIP-L + CLIP-G and
  TAESD. ~2.2 GB.
* :func:`tiny_flux_fill_path`: a FLUX.1 Fill diffusion model for UNETLoader.
  ComfyUI 0.3.64 reads only the block counts, ``in_channels``
  (``img_in.weight``: 384 = 96 x 2 x 2 for Fill: 16 latent + 16 masked-image
  latent + 64 mask channels, patchified 2x2), ``vec_in_dim`` and the guidance
  embedding from a FLUX state dict and fixes the width (hidden 3072, 24 heads,
  T5 context 4096, MLP ratio 4), so the tiny model keeps FLUX's width and has
  one double-stream block and no single-stream block (FLUX.1: 19 + 38): 409 M
  parameters, bf16, 818 MB. Both hosts detect ``FluxInpaint`` (``in_channels``
  96, guidance embedding). Norm scales are stored as ``*_norm.scale`` like the
  released files (0.33.0 renames them to ``.weight`` on load).
* :func:`tiny_flux_vae_path`: the FLUX VAE's stand-in for VAELoader: a seeded
  TAESD with **16** latent channels (8x down-scale, the FLUX latent's shape;
  VAELoader builds a TAESD from ``taesd_encoder.* / taesd_decoder.*`` keys).
* :func:`tiny_clip_l_path`: the tiny SD1.5 checkpoint's CLIP-L as a
  stand-alone text-encoder file (``text_model.*`` keys, plus a seeded
  ``text_projection``).

Text conditioning for the tiny FLUX: both hosts build T5-XXL from a fixed
4.7 G-parameter config whatever the file holds, so DualCLIPLoader (clip_l +
t5xxl, type flux) cannot load a tiny T5. Tests and the runner therefore swap
the workflow's DualCLIPLoader for a native ``CLIPLoader`` of the tiny CLIP-L
with type ``sd3`` (:func:`use_tiny_flux_text_encoder`): ComfyUI's SD3 text
encoder without T5 pads CLIP-L's (77, 768) hidden states to (77, 4096) -- the
width of FLUX's T5 context -- and gives a 2048-wide pooled vector (CLIP-L's
768 + CLIP-G's 1280 zeros). That is why the tiny FLUX's ``vector_in`` takes
2048 inputs, not FLUX.1's 768 (768 from CLIP-L alone); everything after the
text encoder (FluxGuidance, InpaintModelConditioning, KSampler, the model's
Fill concatenation, VAEDecode) runs as with the real models.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .tiny_models import seeded_fill_, seeded_tensor, sd15_ldm_unet_config, tiny_checkpoint_path
from .tiny_sdxl_sd2 import SDXL_LDM_UNET, _cached, _state_dict, tiny_sdxl_checkpoint_path

VERSION = "v1"
"""Bump when a file's contents change, so cached files are rebuilt."""

INPAINT_IN_CHANNELS = 9
"""An SD1.5/SDXL inpainting UNet's input: noisy latent (4), mask (1), masked image's latent (4)."""

FLUX_HIDDEN = 3072
FLUX_FILL_PROBE = {
    "img_in.weight": (FLUX_HIDDEN, 384),
    "txt_in.weight": (FLUX_HIDDEN, 4096),
    "vector_in.in_layer.weight": (FLUX_HIDDEN, 2048),
    "guidance_in.in_layer.weight": (FLUX_HIDDEN, 256),
    "double_blocks.0.img_attn.norm.key_norm.scale": (128,),
}
"""The tensors ComfyUI's FLUX detection reads (``comfy.model_detection.detect_unet_config``): the host's own
detection turns them into the model config, and the host's model class gives every other tensor's name and shape."""

FLUX_LATENT_CHANNELS = 16
LORA_RANK = 4
LORA_UP_SCALE = 0.1
"""Factor on the tiny LoRA's up weights: a small, visible change to the UNet."""

TINY_CLIP_TYPE = "sd3"
"""CLIPLoader type that conditions the tiny FLUX from the tiny CLIP-L (see the module docstring)."""

SDXL_TEXT_ENCODER_PREFIX = "conditioner."
SD15_TEXT_ENCODER_PREFIX = "cond_stage_model."
_UNET_FIXED = ("image_size", "use_spatial_transformer", "legacy", "use_temporal_attention", "use_temporal_resblock")
_ATTENTION = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def _copied(path: Path, prefix: str) -> dict:
    """Every tensor of the safetensors file ``path`` whose key starts with ``prefix`` (keys unchanged)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def sd15_inpaint_unet_config() -> dict:
    """The tiny SD1.5-inpainting UNet in ComfyUI's ldm ``UNetModel`` keyword arguments (9 input channels)."""
    config = {k: v for k, v in sd15_ldm_unet_config(4).items() if k not in _UNET_FIXED}
    return {**config, "in_channels": INPAINT_IN_CHANNELS}


def tiny_sd15_inpaint_checkpoint_path(seed: int = 0) -> Path:
    """The cached tiny SD1.5-inpainting checkpoint (see the module docstring; built once in ~10 s)."""

    def build() -> dict:
        return {**_state_dict(sd15_inpaint_unet_config(), seed),
                **_copied(tiny_checkpoint_path(seed), SD15_TEXT_ENCODER_PREFIX)}

    return _cached(f"dragkit-tiny-sd15-inpaint-{VERSION}-s{seed}.safetensors", build)


def tiny_sdxl_inpaint_checkpoint_path(seed: int = 0) -> Path:
    """The cached tiny SDXL-inpainting checkpoint, with SDXL's text encoders (built once: ~30 s, 2.2 GB)."""

    def build() -> dict:
        return {**_state_dict({**SDXL_LDM_UNET, "in_channels": INPAINT_IN_CHANNELS}, seed),
                **_copied(tiny_sdxl_checkpoint_path(seed, with_clip=True), SDXL_TEXT_ENCODER_PREFIX)}

    return _cached(f"dragkit-tiny-sdxl-inpaint-{VERSION}-s{seed}.safetensors", build)


def lcm_lora_state_dict(seed: int = 0) -> dict:
    """The tiny LoRA: rank 4 on every attention q/k/v/out of the tiny inpainting UNet (fp16).

    Keys ``diffusion_model.<module>.lora_down.weight`` (rank x in),
    ``.lora_up.weight`` (out x rank, scaled by :data:`LORA_UP_SCALE`) and
    ``.alpha`` (= rank): ComfyUI's generic LoRA format.
    """
    from safetensors import safe_open

    out = {}
    with safe_open(str(tiny_sd15_inpaint_checkpoint_path(seed)), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys() if _ATTENTION.search(k)}
    for key, (rows, cols) in sorted(shapes.items()):
        module = key[len("model."):-len(".weight")]
        out[f"{module}.lora_down.weight"] = seeded_tensor(f"{module}.lora_down.weight", (LORA_RANK, cols), seed)
        up = seeded_tensor(f"{module}.lora_up.weight", (rows, LORA_RANK), seed) * LORA_UP_SCALE
        out[f"{module}.lora_up.weight"] = up
        out[f"{module}.alpha"] = torch.tensor(float(LORA_RANK))
    return {k: v.to(torch.float16) if v.dim() else v for k, v in out.items()}


def tiny_lcm_lora_path(seed: int = 0) -> Path:
    """The cached tiny LoRA for the tiny SD1.5-inpainting UNet (a few MB)."""
    return _cached(f"dragkit-tiny-lora-sd15-inpaint-{VERSION}-s{seed}.safetensors", lambda: lcm_lora_state_dict(seed))


def flux_fill_state_dict(seed: int = 0) -> dict:
    """The tiny FLUX.1 Fill state dict (bf16, keys of a released ``flux1-fill-dev.safetensors``). Imports comfy."""
    from dragrun import comfy_host

    comfy_host.prepare_comfy_imports()
    import comfy.ldm.flux.model
    import comfy.model_detection
    import comfy.ops

    probe = {k: torch.empty(shape, device="meta") for k, shape in FLUX_FILL_PROBE.items()}
    config = comfy.model_detection.detect_unet_config(probe, "")
    with torch.device("meta"):
        model = comfy.ldm.flux.model.Flux(**config, operations=comfy.ops.disable_weight_init)
    out = {}
    for name, tensor in model.state_dict().items():
        key = re.sub(r"_norm\.weight$", "_norm.scale", name)  # the file's name for a QK-norm scale
        fill_name = re.sub(r"_norm\.scale$", "_norm.weight", key)  # filled as a norm weight: 1 + 0.1 randn
        out[key] = seeded_tensor(fill_name, tensor.shape, seed).to(torch.bfloat16)
    return out


def tiny_flux_fill_path(seed: int = 0) -> Path:
    """The cached tiny FLUX.1 Fill diffusion model (built once: ~10 s, 818 MB)."""
    return _cached(f"dragkit-tiny-flux-fill-{VERSION}-s{seed}.safetensors", lambda: flux_fill_state_dict(seed))


def flux_vae_state_dict(seed: int = 0) -> dict:
    """A seeded TAESD with 16 latent channels, keys as VAELoader reads them (fp32)."""
    from dragrun import comfy_host

    comfy_host.prepare_comfy_imports()
    from comfy.taesd.taesd import TAESD

    vae = seeded_fill_(TAESD(latent_channels=FLUX_LATENT_CHANNELS), seed + 1)
    return {k: v.detach().to(torch.float32).contiguous() for k, v in vae.state_dict().items()}


def tiny_flux_vae_path(seed: int = 0) -> Path:
    """The cached 16-channel tiny VAE standing in for FLUX's ``ae.safetensors``."""
    return _cached(f"dragkit-tiny-flux-vae-{VERSION}-s{seed}.safetensors", lambda: flux_vae_state_dict(seed))


def clip_l_state_dict(seed: int = 0) -> dict:
    """The tiny SD1.5 checkpoint's CLIP-L as a stand-alone file: ``text_model.*`` and a seeded ``text_projection``."""
    prefix = SD15_TEXT_ENCODER_PREFIX + "transformer."
    out = {k[len(prefix):]: v for k, v in _copied(tiny_checkpoint_path(seed), prefix).items()}
    width = out["text_model.final_layer_norm.weight"].shape[0]
    out["text_projection.weight"] = seeded_tensor("text_projection.weight", (width, width), seed + 2).to(torch.float16)
    return out


def tiny_clip_l_path(seed: int = 0) -> Path:
    """The cached stand-alone tiny CLIP-L (246 MB, fp16)."""
    return _cached(f"dragkit-tiny-clip-l-{VERSION}-s{seed}.safetensors", lambda: clip_l_state_dict(seed))


def use_tiny_flux_text_encoder(prompt: dict, clip_name: str) -> list[str]:
    """Swap every DualCLIPLoader of an API ``prompt`` for a CLIPLoader of ``clip_name`` with type ``sd3`` (in place).

    The tiny FLUX's text conditioning (see the module docstring); returns the
    ids of the swapped nodes. Links from the loader's CLIP output are kept
    (both nodes have one output, CLIP).
    """
    swapped = []
    for node_id, node in prompt.items():
        if node["class_type"] == "DualCLIPLoader":
            node["class_type"] = "CLIPLoader"
            node["inputs"] = {"clip_name": clip_name, "type": TINY_CLIP_TYPE}
            swapped.append(node_id)
    return swapped



def stand_ins() -> dict:
    """What a tiny test run puts in place of each shipped placeholder model.

    ``{(loader class, input, placeholder name): (ComfyUI model folder, function giving the tiny file)}``
    for the loaders other than Load Checkpoint (see :func:`tiny_checkpoints`).
    The DualCLIPLoader entry is its first file; the node itself is swapped
    (:func:`use_tiny_flux_text_encoder`).
    """
    from .make_workflows import FLUX_CLIP_L, FLUX_DEV, FLUX_FILL, FLUX_VAE, LCM_LORA
    from .tiny_flux import tiny_flux_dev_path

    return {
        ("LoraLoader", "lora_name", LCM_LORA): ("loras", tiny_lcm_lora_path),
        ("UNETLoader", "unet_name", FLUX_FILL): ("diffusion_models", tiny_flux_fill_path),
        ("UNETLoader", "unet_name", FLUX_DEV): ("diffusion_models", tiny_flux_dev_path),
        ("VAELoader", "vae_name", FLUX_VAE): ("vae", tiny_flux_vae_path),
        ("DualCLIPLoader", "clip_name1", FLUX_CLIP_L): ("text_encoders", tiny_clip_l_path),
    }


def tiny_checkpoints() -> dict:
    """``{Load Checkpoint placeholder name: function giving the tiny checkpoint}`` for the placeholders that need
    another checkpoint than the tiny SD1.5 one (SDXL, SD1.5- and SDXL-inpainting)."""
    from . import tiny_sdxl_sd2
    from .make_workflows import SD15_INPAINT_CHECKPOINT, SDXL_CHECKPOINT, SDXL_INPAINT_CHECKPOINT

    return {
        SDXL_CHECKPOINT: lambda: tiny_sdxl_sd2.tiny_sdxl_checkpoint_path(with_clip=True),
        SD15_INPAINT_CHECKPOINT: tiny_sd15_inpaint_checkpoint_path,
        SDXL_INPAINT_CHECKPOINT: tiny_sdxl_inpaint_checkpoint_path,
    }


def stand_ins_for(nodes: list) -> list[tuple[str, str, str, Path]]:
    """``(loader class, input, model folder, tiny file)`` for each UI-format node naming a placeholder of
    :func:`stand_ins` in its widgets (the files are built if not cached)."""
    found = []
    for (loader, name, placeholder), (folder, build) in stand_ins().items():
        if any(n.get("type") == loader and placeholder in (n.get("widgets_values") or []) for n in nodes):
            found.append((loader, name, folder, build()))
    return found


def apply_stand_ins(prompt: dict, found: list) -> None:
    """Point an API ``prompt``'s loaders at the tiny files of :func:`stand_ins_for` (in place)."""
    for loader, name, _, path in found:
        if loader == "DualCLIPLoader":
            use_tiny_flux_text_encoder(prompt, path.name)
            continue
        for node in prompt.values():
            if node["class_type"] == loader:
                node["inputs"][name] = path.name
