"""DDIM Invert: image latent -> noisy latent z_t* and the attention cache."""

from __future__ import annotations

import latent_preview

from ..dragkit.attention import CACHE_POLICIES, LAYER_SPEC_HELP, select_layers
from ..dragkit.ddim import ddim_invert
from ..dragkit.errors import DragInputError
from ..dragkit.schedule import DDIMSchedule
from .comfy_backend import ComfyBackend, ComfyConditioning, check_conditioning_fits
from .common import ATTN_CACHE, CATEGORY, INPUT_LATENT, log, node_errors, progress_reporter, require_finite
from .latent_io import read_step, with_step
from .model_family import require_unet


def check_conditioning(conditioning: list, model, name: str = "positive") -> None:
    """Raise unless a CONDITIONING holds prompt embeddings for one image that fit ``model``'s UNet."""
    if not isinstance(conditioning, list) or not conditioning:
        raise DragInputError(f"the {name} conditioning is empty; connect a CLIP Text Encode")
    if len(conditioning) > 1:
        count = {2: "two", 3: "three"}.get(len(conditioning), str(len(conditioning)))
        raise DragInputError(
            f"the {name} conditioning holds {count} prompts (e.g. joined by Conditioning (Combine)) but drag editing "
            "uses one; connect one CLIP Text Encode"
        )
    for cond, _ in conditioning:
        if cond.shape[0] != 1:
            raise DragInputError(
                f"the {name} conditioning has a batch of {cond.shape[0]} but drag editing edits one image; "
                "encode one prompt"
            )
    check_conditioning_fits(model, conditioning, name)


def preview_progress(model, total: int, every: int = 1):
    """A ``progress(done, x0)`` callback: progress bar, Cancel, and a latent preview every ``every`` steps.

    ``x0`` is the predicted clean latent (VP, scaled), or ``None`` for no preview.
    """
    report = progress_reporter(total)
    preview = latent_preview.prepare_callback(model, total)

    def progress(done: int, x0) -> None:
        report(done)
        if x0 is not None and done % every == 0:
            preview(done - 1, x0, None, total)

    return progress


class DDIMInvert:
    DESCRIPTION = (
        "Inverts an image latent with deterministic DDIM to the noise level where drag editing happens "
        "(t* = timesteps[N - round(strength x N)]), recording the latent trajectory and the self-attention "
        "keys/values of the source image for KV-Injected Sample. Does not depend on the points, so moving a "
        "point does not re-run it."
    )
    CATEGORY = CATEGORY
    FUNCTION = "invert"
    RETURN_TYPES = ("LATENT", ATTN_CACHE)
    RETURN_NAMES = ("z_t", "attn_cache")
    OUTPUT_TOOLTIPS = (
        "The inverted latent at t*. It knows its step: feed it to FastDrag Warp, Motion-Supervision Optimize or "
        "KV-Injected Sample, or finish it with KSamplerAdvanced (add_noise disable, scheduler ddim_uniform, the "
        "same steps, start_at_step = N - round(strength x N)).",
        "Keys/values per recorded step and layer, the schedule, the latent trajectory and the source latent.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model (with any LoRA already applied)."}),
                "latent": ("LATENT", {"tooltip": "The source image's latent, from VAE Encode."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt describing the image (an empty prompt works)."}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "N, the number of DDIM steps of the full schedule (50 for DragDiffusion/GoodDrag, 10 for FastDrag)."}),
                "strength": ("FLOAT", {"default": 0.7, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": "Inversion strength: round(strength x steps) steps are inverted (0.7 DragDiffusion/FastDrag, 0.75 GoodDrag)."}),
                "cache_layers": ("STRING", {"default": "decoder", "tooltip": "Self-attention layers whose keys/values are cached. " + LAYER_SPEC_HELP}),
                "cache_device": (list(CACHE_POLICIES), {"default": "auto", "tooltip": "Where the cache lives: auto keeps caches up to 512 MiB next to the model (fast re-edits) and offloads larger ones to CPU memory; compute_device always keeps it there; offload always uses CPU memory."}),
            }
        }

    def invert(self, model, latent, positive, steps, strength, cache_layers, cache_device):
        with node_errors("DDIM Invert"):
            require_unet(model, "DDIM inversion with attention caching")
            if read_step(latent) is not None:
                raise DragInputError("this latent is already noisy (it came from DDIM Invert); connect the VAE Encode latent")
            check_conditioning(positive, model)
            backend = ComfyBackend(model)
            layers = select_layers(backend.self_attention_layers(), cache_layers)
            schedule = DDIMSchedule(backend.alphas_cumprod(), steps, strength)
            backend.check_timesteps(schedule.inversion_timesteps())
            z0 = require_finite(backend.latent_to_vp(latent["samples"], 0.0), INPUT_LATENT)
            progress = preview_progress(model, schedule.num_inversion_steps)
            cache = ddim_invert(backend, z0, ComfyConditioning(positive), schedule, layers, cache_device, progress)
            require_finite(cache.z_star, "the output of DDIM inversion (the model's noise predictions)")
        sigma = backend.sigma(schedule.t_star)
        samples = backend.vp_to_latent(cache.z_star, sigma)
        log.info(
            "DragKit DDIM Invert: %d of %d steps, t*=%d; cache: %s",
            schedule.num_inversion_steps, steps, schedule.t_star, cache.describe(),
        )
        return (with_step(samples, steps, schedule.start_index, schedule.t_star, sigma), cache)


NODE_CLASS_MAPPINGS = {"DragKitDDIMInvert": DDIMInvert}
NODE_DISPLAY_NAME_MAPPINGS = {"DragKitDDIMInvert": "DDIM Invert (DragKit)"}
