"""DDIM Invert: image latent -> noisy latent z_t* and the attention cache."""

from __future__ import annotations

import latent_preview

from ..dragkit.attention import CACHE_POLICIES, LAYER_SPEC_HELP, select_layers
from ..dragkit.ddim import ddim_invert
from ..dragkit.errors import DragInputError
from ..dragkit.flow import FlowSchedule, flow_invert
from ..dragkit.flow_hooks import FLUX_LAYER_HELP, select_flux_layers
from ..dragkit.schedule import DDIMSchedule
from .comfy_backend import ComfyBackend, ComfyConditioning, ComfyFlowBackend, check_conditioning_fits, flux_guidance, is_flux, reference_shapes
from .common import ATTN_CACHE, CATEGORY, INPUT_LATENT, log, node_errors, progress_reporter, require_finite
from .latent_io import read_step, with_step
from .model_family import require_unet


def check_conditioning(conditioning: list, model, name: str = "positive") -> None:
    """Raise unless a CONDITIONING holds prompt embeddings for one image that fit ``model``'s UNet (or FLUX)."""
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
    if is_flux(model):
        check_flux_conditioning(model, conditioning, name)
    else:
        check_conditioning_fits(model, conditioning, name)


def check_flux_conditioning(model, conditioning: list, name: str = "positive") -> float:
    """Raise unless a CONDITIONING fits a FLUX MODEL (text width, pooled vector, guidance); returns its guidance.

    FLUX.1 takes T5 tokens ``context_in_dim`` (4096) wide and a pooled CLIP-L
    vector (ComfyUI 0.3.64 and 0.33.0 ``model_base.Flux.extra_conds``:
    ``pooled_output`` becomes ``y``).
    """
    base = model.model
    width = base.model_config.unet_config.get("context_in_dim")
    for cond, options in conditioning:
        if width is not None and cond.shape[-1] != width:
            raise DragInputError(
                f"the {name} conditioning's prompt embeddings are {cond.shape[-1]} wide but this FLUX MODEL takes {width}: "
                "encode the prompt with FLUX's text encoders (DualCLIPLoader type flux)"
            )
        if options.get("pooled_output") is None:
            raise DragInputError(f"the {name} conditioning has no pooled text embedding, which FLUX needs: encode it with CLIP Text Encode")
    return flux_guidance(conditioning, name)


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
        "point does not re-run it. On a FLUX MODEL it runs DragFlow's flow inversion instead (FireFlow solver, "
        "about one model call per step; 25 steps at strength 0.76 as released, prompt at FluxGuidance 1.0) and "
        "records the keys/values of the chosen transformer blocks at every model call ('non-ridge' as released)."
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
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "N, the number of DDIM steps of the full schedule (50 for DragDiffusion/GoodDrag, 10 for FastDrag, 25 for DragFlow on FLUX)."}),
                "strength": ("FLOAT", {"default": 0.7, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": "Inversion strength: round(strength x steps) steps are inverted (0.7 DragDiffusion/FastDrag, 0.75 GoodDrag, 0.76 = 19 of 25 DragFlow on FLUX)."}),
                "cache_layers": ("STRING", {"default": "decoder", "tooltip": "Self-attention layers whose keys/values are cached. " + LAYER_SPEC_HELP + " On FLUX: " + FLUX_LAYER_HELP}),
                "cache_device": (list(CACHE_POLICIES), {"default": "auto", "tooltip": "Where the cache lives: auto keeps caches up to 512 MiB next to the model (fast re-edits) and offloads larger ones to CPU memory; compute_device always keeps it there; offload always uses CPU memory."}),
            }
        }

    def invert(self, model, latent, positive, steps, strength, cache_layers, cache_device):
        if is_flux(model):
            return invert_flux(model, latent, positive, steps, strength, cache_layers, cache_device)
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


def check_flux_latent(model, samples, what: str = INPUT_LATENT) -> None:
    """Raise unless LATENT ``samples`` have the FLUX latent's channels (16)."""
    channels = model.model.latent_format.latent_channels
    if samples.dim() != 4 or samples.shape[1] != channels:
        raise DragInputError(
            f"{what} has shape {tuple(samples.shape)} but this FLUX MODEL's latents have {channels} channels: encode the "
            "image with FLUX's VAE (ae.safetensors)"
        )


def invert_flux(model, latent, positive, steps, strength, cache_layers, cache_device):
    """DDIM Invert on a FLUX MODEL: DragFlow's flow inversion (FireFlow) with per-call key/value recording.

    ``steps`` is N of the flow schedule and round(strength x N) steps are
    inverted (DragFlow: 25 steps, 19 inverted = strength 0.76); the LATENT
    returned is the flow latent at t* (unscaled) and knows its step.
    """
    with node_errors("DDIM Invert"):
        if read_step(latent) is not None:
            raise DragInputError("this latent is already noisy (it came from DDIM Invert); connect the VAE Encode latent")
        check_conditioning(positive, model)
        guidance = flux_guidance(positive)
        check_flux_latent(model, latent["samples"])
        backend = ComfyFlowBackend(model)
        layers = select_flux_layers(backend.kv_layers(), cache_layers)
        schedule = FlowSchedule.from_strength(backend.sigmas(steps), strength)
        x0 = require_finite(backend.latent_in(latent["samples"]), INPUT_LATENT)
        progress = preview_progress(model, schedule.num_inversion_steps)
        cache = flow_invert(backend, x0, ComfyConditioning(positive), schedule, layers, cache_device, progress)
        require_finite(cache.x_star, "the output of flow inversion (the model's velocities)")
        cache.references = reference_shapes(positive)
    t_star = schedule.t_star
    log.info(
        "DragKit DDIM Invert (FLUX, %s): %d of %d steps, t*=%.4f, guidance %g%s; cache: %s",
        schedule.solver, schedule.num_inversion_steps, steps, t_star, guidance,
        "" if guidance == 1.0 else " (DragFlow inverts at 1.0: FluxGuidance 1.0 on this prompt)", cache.describe(),
    )
    samples = backend.latent_out(cache.x_star)
    return (with_step(samples, steps, schedule.skip, round(t_star * 1000), t_star), cache)


NODE_CLASS_MAPPINGS = {"DragKitDDIMInvert": DDIMInvert}
NODE_DISPLAY_NAME_MAPPINGS = {"DragKitDDIMInvert": "DDIM Invert (DragKit)"}
