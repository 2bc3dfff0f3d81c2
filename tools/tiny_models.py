"""Tiny, seeded models for fast CPU tests, and a tiny SD1.5 checkpoint for ComfyUI.

Nothing here imports ComfyUI at module level; only :func:`write_tiny_checkpoint`
(and :func:`tiny_checkpoint_path`, which calls it) import ``comfy`` lazily, and
they need ``COMFYUI_PATH`` (see :func:`dragrun.comfy_host.prepare_comfy_imports`).

Weights are deterministic: every tensor is drawn from its own CPU
``torch.Generator`` seeded from ``(seed, tensor name)``, so a model's weights
depend only on the seed, the tensor names and shapes -- not on construction
order, not on torch's default initialisers, and the global RNG is left alone.

Fill rule (:func:`seeded_fill_`): tensors with >= 2 dims get
``randn / sqrt(fan_in)`` (variance preserving, so activations stay O(1));
1-d ``*.weight`` tensors (norm scales) get ``1 + 0.1 * randn``; 1-d biases get
``0.05 * randn``; 0-d tensors get 1 for names ending in ``scale`` and 0
otherwise. Norm scales and biases are deliberately not 1 / 0, so a wrongly
mapped norm or bias shows up when two backends are compared.

Models
------
* :func:`micro_unet`: ~1 M-parameter diffusers UNet (32/64 channels) for
  algorithm tests; any latent side that is a multiple of 2 works.
* :func:`micro_vae`: tiny diffusers AutoencoderKL, 8x down-scale, 4 latent
  channels.
* :func:`tiny_sd15_unet`: a diffusers UNet with the SD1.5 *shape* that ComfyUI
  detects as SD15 (320 channels everywhere, cross-attention dim 768, 8 heads,
  conv proj_in, one res block per level). ``levels=4`` (default) has SD1.5's
  block structure: encoder 3 x CrossAttnDown + Down, decoder Up + 3 x
  CrossAttnUp, i.e. 4 decoder blocks with self-attention in the last three;
  SD1.5's 16 attention layers (6 down, 1 mid, 9 up) become 10 (3 down, 1 mid,
  6 up: two per decoder block, as decoder blocks have one more res block). Any
  latent size runs in both backends (both upsample to the skip connection's
  size; checked to agree at 12x12, 10x6 and 7x9); an 8x8 latent reaches 1x1 at
  the deepest level. 4 levels: ~80 ms per forward at 8x8 (batch 1, 2 CPU
  threads), ~120 ms at batch 2, ~0.5 s at 32x32; 2 levels: ~45 ms at 8x8.
* :func:`write_tiny_checkpoint` / :func:`tiny_checkpoint_path`: a safetensors
  SD1.5 checkpoint with the UNet of :func:`tiny_sd15_unet` in ComfyUI's ldm
  layout, a seeded TAESD VAE and a seeded CLIP-L text encoder (fp16).
* :func:`write_tiny_controlnet` / :func:`tiny_controlnet_path`: an SD1.5-style
  ControlNet (ldm layout, ``control_model.`` keys as the released
  ``control_v11p_sd15_*`` files) matching the tiny checkpoint's UNet, with
  seeded -- not zero -- zero-convs so it changes the sampler's output;
  ComfyUI's ControlNetLoader loads it.
* :func:`write_tiny_upscaler` / :func:`tiny_upscaler_path`: a 2x RealESRGAN
  Compact (SRVGGNetCompact, 8 features, 2 convs) that spandrel -- ComfyUI's
  UpscaleModelLoader -- detects.
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path

import torch

from dragkit.atomic import save_safetensors_atomic

CHECKPOINT_VERSION = "v1"
"""Bump when the checkpoint contents change, so cached files are rebuilt."""

CONTROLNET_VERSION = "v1"
"""Bump when the tiny ControlNet's contents change, so cached files are rebuilt."""

UPSCALER_VERSION = "v1"
"""Bump when the tiny upscale model's contents change, so cached files are rebuilt."""

UPSCALER_SCALE = 2
"""Up-scale factor of the tiny upscale model."""

RESIDUAL_SCALE = 0.1
"""Factor on the tiny upscale model's last conv: its output stays close to the nearest-upscaled input."""

CACHE_ENV = "DRAGKIT_TEST_CACHE"
"""Environment variable naming the cache folder of generated checkpoints."""

SD15_CONTEXT_DIM = 768
SD15_MODEL_CHANNELS = 320
SD15_HEADS = 8


# ----------------------------------------------------------------------------------------------
# Seeded weights


def _tensor_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (2**63 - 1)


def _fill_(name: str, tensor: torch.Tensor, seed: int) -> torch.Tensor:
    """Fill one floating-point tensor in place from ``(seed, name)`` (see the module docstring)."""
    if tensor.dim() == 0:
        return tensor.fill_(1.0 if name.endswith("scale") else 0.0)
    gen = torch.Generator(device="cpu").manual_seed(_tensor_seed(seed, name))
    if tensor.dim() == 1:
        if name.endswith("weight"):
            return tensor.normal_(1.0, 0.1, generator=gen)
        return tensor.normal_(0.0, 0.05, generator=gen)
    fan_in = math.prod(tensor.shape[1:])
    return tensor.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)


def seeded_tensor(name: str, shape, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The value :func:`seeded_fill_` gives a CPU tensor ``name`` of ``shape`` and ``dtype``."""
    return _fill_(name, torch.empty(tuple(shape), dtype=dtype), seed)


@torch.no_grad()
def seeded_fill_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every floating-point parameter and buffer of ``module`` (CPU) in place.

    Values depend only on ``(seed, qualified name, shape, dtype)``; see the module
    docstring. Integer buffers (e.g. position ids) are left as constructed.
    """
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    for name, tensor in sorted(tensors.items()):
        if tensor.is_floating_point():
            _fill_(name, tensor, seed)
    return module


# ----------------------------------------------------------------------------------------------
# Micro diffusers models (algorithm tests)


def micro_unet_config() -> dict:
    """Config of :func:`micro_unet` (``UNet2DConditionModel`` keyword arguments)."""
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def _build(cls, config: dict, seed: int):
    # Construct on the meta device (no default initialisation, no use of the
    # global RNG), then allocate and fill every weight from the seed. A model
    # with buffers (whose constructed values may matter) is built normally
    # under a forked RNG instead.
    with torch.device("meta"):
        model = cls(**config)
    if any(True for _ in model.buffers()):
        with torch.random.fork_rng(devices=[]):
            model = cls(**config)
    else:
        model = model.to_empty(device="cpu")
    seeded_fill_(model, seed)
    return model.eval().requires_grad_(False)


def micro_unet(seed: int = 0):
    """A ~1 M-parameter diffusers ``UNet2DConditionModel``, deterministic for ``seed``.

    Encoder: CrossAttnDown(32) + Down(64); decoder: Up(64) + CrossAttnUp(32);
    cross-attention dim 32 (conditioning is ``(B, tokens, 32)``), 8 heads of 4.
    Returned in eval mode, fp32, CPU, with ``requires_grad`` off.
    """
    from diffusers import UNet2DConditionModel

    return _build(UNet2DConditionModel, micro_unet_config(), seed)


def micro_vae_config() -> dict:
    """Config of :func:`micro_vae` (``AutoencoderKL`` keyword arguments)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )


def micro_vae(seed: int = 0):
    """A tiny diffusers ``AutoencoderKL`` (8x down-scale, 4 latent channels), seeded."""
    from diffusers import AutoencoderKL

    return _build(AutoencoderKL, micro_vae_config(), seed)


# ----------------------------------------------------------------------------------------------
# Tiny SD1.5-shaped UNet


def _check_levels(levels: int) -> int:
    levels = int(levels)
    if levels < 2:
        raise ValueError(f"levels must be >= 2 (got {levels}): the last level has no attention")
    return levels


def sd15_unet_config(levels: int = 4) -> dict:
    """Diffusers ``UNet2DConditionModel`` config of the tiny SD1.5-shaped UNet.

    ``levels`` down/up blocks of 320 channels, one res block each; attention
    (8 heads of 40, context 768, conv proj_in, depth 1) in every block but the
    deepest, plus the middle block -- SD1.5's structure with fewer channels and
    res blocks.
    """
    levels = _check_levels(levels)
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(SD15_MODEL_CHANNELS,) * levels,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=SD15_CONTEXT_DIM,
        attention_head_dim=SD15_HEADS,  # diffusers' legacy name: the number of heads
        use_linear_projection=False,
        transformer_layers_per_block=1,
        norm_num_groups=32,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def sd15_ldm_unet_config(levels: int = 4) -> dict:
    """The same UNet in ComfyUI's ldm ``UNetModel`` terms (what ComfyUI detects).

    Suitable for ``comfy.utils.unet_to_diffusers`` and, with ``num_heads=8``,
    for ``comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel``.
    """
    levels = _check_levels(levels)
    return {
        "use_checkpoint": False,
        "image_size": 32,
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": None,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": SD15_MODEL_CHANNELS,
        "num_res_blocks": [1] * levels,
        "channel_mult": [1] * levels,
        "transformer_depth": [1] * (levels - 1) + [0],
        "transformer_depth_output": [1, 1] * (levels - 1) + [0, 0],
        "transformer_depth_middle": 1,
        "context_dim": SD15_CONTEXT_DIM,
        "use_linear_in_transformer": False,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
        "num_heads": SD15_HEADS,
        "num_head_channels": -1,
    }


def tiny_sd15_unet(seed: int = 0, levels: int = 4):
    """The tiny SD1.5-shaped diffusers UNet, deterministic for ``(seed, levels)``.

    4 levels: 73.7 M parameters (295 MB fp32); 2 levels: 36.7 M. Returned in
    eval mode, fp32, CPU, ``requires_grad`` off.
    """
    from diffusers import UNet2DConditionModel

    return _build(UNet2DConditionModel, sd15_unet_config(levels), seed)


def diffusers_to_ldm_unet_state_dict(diffusers_sd: dict, levels: int = 4) -> dict:
    """Rename a :func:`tiny_sd15_unet` state dict to ComfyUI's ldm keys (no prefix).

    Uses ComfyUI's own map ``comfy.utils.unet_to_diffusers`` (imports comfy).
    Raises if a diffusers key has no ldm name or two keys collide.
    """
    import comfy.utils

    key_map = comfy.utils.unet_to_diffusers(sd15_ldm_unet_config(levels))  # diffusers -> ldm
    unmapped = sorted(k for k in diffusers_sd if k not in key_map)
    if unmapped:
        raise KeyError(f"diffusers keys without an ldm name: {unmapped[:10]} ({len(unmapped)} in all)")
    out = {}
    for key, value in diffusers_sd.items():
        ldm_key = key_map[key]
        if ldm_key in out:
            raise KeyError(f"two diffusers keys map to {ldm_key}")
        out[ldm_key] = value
    return out


# ----------------------------------------------------------------------------------------------
# The checkpoint


def _comfy_modules():
    """Import what the checkpoint writer needs from ComfyUI (``COMFYUI_PATH`` first on sys.path)."""
    from dragrun import comfy_host

    comfy_host.prepare_comfy_imports()
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ops
    import comfy.sd1_clip
    import comfy.taesd.taesd
    import comfy.utils

    return openaimodel, comfy.ops, comfy.sd1_clip, comfy.taesd.taesd


def _check_against(module: torch.nn.Module, sd: dict, what: str) -> None:
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or wrong:
        raise RuntimeError(
            f"tiny checkpoint {what}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shapes {[(k, expected[k], got[k]) for k in wrong[:5]]}"
        )


def tiny_checkpoint_state_dict(seed: int = 0, levels: int = 4, with_clip: bool = True) -> dict:
    """The full checkpoint state dict (see :func:`write_tiny_checkpoint`). Imports comfy."""
    openaimodel, ops, sd1_clip, taesd = _comfy_modules()
    sd: dict[str, torch.Tensor] = {}

    # UNet: exactly tiny_sd15_unet(seed, levels), renamed with ComfyUI's map.
    unet_sd = diffusers_to_ldm_unet_state_dict(tiny_sd15_unet(seed, levels).state_dict(), levels)
    with torch.device("meta"):
        ldm = openaimodel.UNetModel(**sd15_ldm_unet_config(levels), operations=ops.disable_weight_init)
    _check_against(ldm, unet_sd, "UNet")
    del ldm
    for k, v in unet_sd.items():
        sd["model.diffusion_model." + k] = v.detach().to(torch.float32).contiguous()

    # VAE: a seeded TAESD (8x, 4 channels); ComfyUI builds TAESD from these keys.
    vae = taesd.TAESD()
    seeded_fill_(vae, seed + 1)
    for k, v in vae.state_dict().items():
        sd["first_stage_model." + k] = v.detach().to(torch.float32).contiguous()

    # CLIP-L text encoder, fp16, under cond_stage_model. (ComfyUI re-prefixes it as clip_l.).
    if with_clip:
        clip = sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float16)
        seeded_fill_(clip, seed + 2)
        for k, v in clip.state_dict().items():
            if not k.startswith("clip_l."):
                raise RuntimeError(f"unexpected SD1ClipModel key {k}")
            if k == "clip_l.transformer.text_projection.weight":
                # Cannot be loaded from an SD1.x checkpoint: ComfyUI moves every
                # cond_stage_model.transformer.* key under text_model.; real SD1.5
                # checkpoints lack it too, and SD1.x CLIP returns the unprojected pooled output.
                continue
            key = "cond_stage_model." + k[len("clip_l."):]
            v = v.detach()
            sd[key] = (v.to(torch.float16) if v.is_floating_point() else v).contiguous()
        del clip
    return sd


def write_tiny_checkpoint(path, seed: int = 0, levels: int = 4, with_clip: bool = True) -> Path:
    """Write the tiny SD1.5 checkpoint to ``path`` (atomically) and return the path.

    Contents (every key ComfyUI's loader expects is present):

    * ``model.diffusion_model.*``: the weights of ``tiny_sd15_unet(seed, levels)``
      renamed with ``comfy.utils.unet_to_diffusers`` (fp32);
    * ``first_stage_model.taesd_encoder.* / taesd_decoder.* / vae_scale / vae_shift``:
      a TAESD seeded with ``seed + 1`` (fp32), vae_scale 1, vae_shift 0;
    * ``cond_stage_model.transformer.text_model.*`` and ``cond_stage_model.logit_scale``:
      an ``SD1ClipModel`` seeded with ``seed + 2``, fp16. ``text_projection`` is
      left out as in real SD1.5 checkpoints (ComfyUI cannot load it from one; it
      only feeds the projected pooled output, which SD1.x does not use).

    Needs ComfyUI importable (``COMFYUI_PATH``). 4 levels: 551 MB with CLIP (UNet 295 MB
    fp32, CLIP 246 MB fp16, TAESD 10 MB), 305 MB without; built in ~4 s, ~1.4 GB peak RSS.
    """

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = tiny_checkpoint_state_dict(seed, levels, with_clip)
    metadata = {
        "dragkit_tiny_checkpoint": CHECKPOINT_VERSION,
        "seed": str(seed),
        "levels": str(levels),
        "with_clip": str(bool(with_clip)),
    }
    save_safetensors_atomic(sd, path, metadata)
    return path


def cache_dir() -> Path:
    """Folder of generated test files: ``$DRAGKIT_TEST_CACHE`` or ``~/.cache/dragkit-tests``."""
    value = os.environ.get(CACHE_ENV, "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "dragkit-tests"


def tiny_checkpoint_name(seed: int = 0, levels: int = 4, with_clip: bool = True) -> str:
    """File name of the cached checkpoint (version, seed and levels in the name)."""
    clip = "" if with_clip else "-noclip"
    return f"dragkit-tiny-sd15-{CHECKPOINT_VERSION}-s{seed}-l{levels}{clip}.safetensors"


def tiny_checkpoint_path(seed: int = 0, levels: int = 4, with_clip: bool = True) -> Path:
    """Path of the cached tiny checkpoint, building it first if absent (~5 s, once)."""
    path = cache_dir() / tiny_checkpoint_name(seed, levels, with_clip)
    if not path.is_file():
        write_tiny_checkpoint(path, seed=seed, levels=levels, with_clip=with_clip)
    return path


# ----------------------------------------------------------------------------------------------
# ControlNet and upscale model (for the chaining workflow)


def tiny_controlnet_state_dict(seed: int = 0, levels: int = 4) -> dict:
    """The tiny ControlNet's state dict, keys ``control_model.*`` (see :func:`write_tiny_controlnet`). Imports comfy."""
    from dragrun import comfy_host

    comfy_host.prepare_comfy_imports()
    import comfy.cldm.cldm
    import comfy.ops

    config = sd15_ldm_unet_config(levels)
    config.pop("out_channels")
    with torch.device("meta"):
        net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, **config)
    net = net.to_empty(device="cpu")
    seeded_fill_(net, seed)
    return {"control_model." + k: v.detach().to(torch.float32).contiguous() for k, v in net.state_dict().items()}


def write_tiny_controlnet(path, seed: int = 0, levels: int = 4) -> Path:
    """Write the tiny SD1.5-style ControlNet to ``path`` (atomically) and return the path.

    ``comfy.cldm.cldm.ControlNet`` with the tiny checkpoint's UNet config
    (:func:`sd15_ldm_unet_config`, so ComfyUI detects it as SD15 and its
    residuals fit the tiny UNet's skip connections) and a 3-channel hint, every
    tensor seeded (:func:`seeded_fill_`) -- the zero-convs and
    ``middle_block_out`` included, so it acts from the first step. fp32, keys
    ``control_model.*`` like the released ``.pth`` ControlNets. 4 levels: ~40 M
    parameters, ~160 MB. Needs ComfyUI importable (``COMFYUI_PATH``).
    """
    path = Path(path)
    metadata = {"dragkit_tiny_controlnet": CONTROLNET_VERSION, "seed": str(seed), "levels": str(levels)}
    save_safetensors_atomic(tiny_controlnet_state_dict(seed, levels), path, metadata)
    return path


def tiny_controlnet_name(seed: int = 0, levels: int = 4) -> str:
    """File name of the cached tiny ControlNet (version, seed and levels in the name)."""
    return f"dragkit-tiny-controlnet-sd15-{CONTROLNET_VERSION}-s{seed}-l{levels}.safetensors"


def tiny_controlnet_path(seed: int = 0, levels: int = 4) -> Path:
    """Path of the cached tiny ControlNet, building it first if absent (a few seconds, once)."""
    path = cache_dir() / tiny_controlnet_name(seed, levels)
    if not path.is_file():
        write_tiny_controlnet(path, seed=seed, levels=levels)
    return path


def tiny_upscaler_state_dict(seed: int = 0) -> dict:
    """The tiny upscale model's state dict in RealESRGAN Compact keys (``body.<i>.weight`` / ``.bias``)."""
    from spandrel.architectures.Compact import Compact

    with torch.device("meta"):
        net = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=UPSCALER_SCALE)
    net = net.to_empty(device="cpu")
    seeded_fill_(net, seed)
    sd = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    last = f"body.{len(net.body) - 1}."
    return {k: v * RESIDUAL_SCALE if k.startswith(last) else v for k, v in sd.items()}


def write_tiny_upscaler(path, seed: int = 0) -> Path:
    """Write the tiny 2x upscale model to ``path`` (atomically) and return the path.

    RealESRGAN Compact (SRVGGNetCompact: conv, PReLU, 2 x (conv, PReLU), conv,
    pixel shuffle, plus the nearest-upsampled input), 8 features, seeded
    (:func:`seeded_fill_`, the last conv then scaled by ``RESIDUAL_SCALE``),
    fp32, ~2 k parameters. Spandrel (ComfyUI's UpscaleModelLoader) detects it
    as "Compact" with scale 2; its output is the nearest-upscaled image plus a
    small seeded residual.
    """
    path = Path(path)
    metadata = {"dragkit_tiny_upscaler": UPSCALER_VERSION, "seed": str(seed), "scale": str(UPSCALER_SCALE)}
    save_safetensors_atomic(tiny_upscaler_state_dict(seed), path, metadata)
    return path


def tiny_upscaler_name(seed: int = 0) -> str:
    """File name of the cached tiny upscale model (version, scale and seed in the name)."""
    return f"dragkit-tiny-upscaler-{UPSCALER_VERSION}-x{UPSCALER_SCALE}-s{seed}.safetensors"


def tiny_upscaler_path(seed: int = 0) -> Path:
    """Path of the cached tiny upscale model, building it first if absent."""
    path = cache_dir() / tiny_upscaler_name(seed)
    if not path.is_file():
        write_tiny_upscaler(path, seed=seed)
    return path


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
