"""KV-Injected Sample: denoise a (possibly edited) z_t with the inversion's keys/values injected."""

from __future__ import annotations

from ..dragkit.attention import LAYER_SPEC_HELP, select_layers
from ..dragkit.ddim import KV_SOURCES, kv_sample
from ..dragkit.errors import DragInputError
from ..dragkit.flow import FlowCache, flow_sample
from ..dragkit.flow_hooks import FLUX_LAYER_HELP, select_flux_layers
from .comfy_backend import ComfyBackend, ComfyConditioning, ComfyFlowBackend, is_flux, reference_shapes
from .common import ATTN_CACHE, CATEGORY, INPUT_LATENT, log, node_errors, require_cache, require_finite
from .invert import check_conditioning, check_flux_latent, preview_progress
from .latent_io import clean_latent, require_step
from .model_family import require_unet


def check_inputs(model, latent, schedule, positive, negative, cfg):
    """The noisy latent's step, after checking it and the prompts against the cache's ``schedule`` and ``model``."""
    step = require_step(latent)
    if step.num_steps != schedule.num_steps:
        raise DragInputError(
            f"the latent is on a {step.num_steps}-step schedule but the attention cache on a "
            f"{schedule.num_steps}-step one; use the cache of the same DDIM Invert"
        )
    if cfg != 1.0 and negative is None:
        raise DragInputError(f"cfg is {cfg} but no negative conditioning is connected")
    check_conditioning(positive, model)
    if negative is not None and cfg != 1.0:
        check_conditioning(negative, model, "negative")
    return step


class KVInjectedSample:
    DESCRIPTION = (
        "Denoises a noisy latent from its step to a clean latent with deterministic DDIM, replacing the keys and "
        "values of the chosen self-attention layers by the source image's: recorded by DDIM Invert at the same "
        "timestep (FastDrag's consistency preservation), or from the unedited latent denoised alongside "
        "(mutual self-attention, DragDiffusion/GoodDrag). Runs through ComfyUI's sampler machinery, so ControlNet "
        "in the conditioning and model patches still act. On a FLUX MODEL it runs DragFlow's flow sampling (the "
        "solver of DDIM Invert, prompt at FluxGuidance 3.5 as released), the recorded keys/values of the chosen "
        "blocks fully replacing the model's, paired with the recorded model calls as DragFlow does."
    )
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The denoised latent; decode it with VAE Decode (DragKit) or any VAE Decode.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The same diffusion model DDIM Invert used (ControlNet goes in the conditioning)."}),
                "latent": ("LATENT", {"tooltip": "A noisy latent that knows its step: from DDIM Invert, FastDrag Warp or Motion-Supervision Optimize."}),
                "attn_cache": (ATTN_CACHE, {"tooltip": "The attention cache from DDIM Invert of the source image."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt; may carry a ControlNet."}),
                "kv_source": (list(KV_SOURCES), {"default": KV_SOURCES[0], "tooltip": "Where injected keys/values come from: 'inversion cache' = recorded by DDIM Invert at the same timestep (cheap; FastDrag); 'reference branch' = the unedited latent denoised alongside at batch 2, mutual self-attention (DragDiffusion, GoodDrag; use inject_layers 'masactrl')."}),
                "inject_layers": ("STRING", {"default": "decoder", "tooltip": "Self-attention layers whose keys/values are replaced (they must be cached). 'none' samples without injection. " + LAYER_SPEC_HELP + " On FLUX: " + FLUX_LAYER_HELP}),
                "inject_start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Fraction of the sampling steps, from the first, at which injection starts."}),
                "inject_end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Fraction of the sampling steps at which injection ends (1 = through the last step)."}),
            },
            "optional": {
                "negative": ("CONDITIONING", {"tooltip": "Negative prompt; used only when cfg is not 1 (off by default, like the references)."}),
                "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 30.0, "step": 0.1, "tooltip": "Classifier-free guidance scale; 1 = conditional branch only (the methods' default)."}),
            },
        }

    def sample(self, model, latent, attn_cache, positive, kv_source, inject_layers, inject_start, inject_end, negative=None, cfg=1.0):
        if is_flux(model):
            return sample_flux(model, latent, attn_cache, positive, kv_source, inject_layers, inject_start, inject_end, negative, cfg)
        with node_errors("KV-Injected Sample"):
            require_unet(model, "KV-injected sampling")
            if isinstance(attn_cache, FlowCache):
                raise DragInputError("this attention cache was recorded on a FLUX model; invert with this UNet MODEL in DDIM Invert")
            require_cache(attn_cache)
            step = check_inputs(model, latent, attn_cache.schedule, positive, negative, cfg)
            schedule = attn_cache.schedule
            backend = ComfyBackend(model)
            layers = select_layers(backend.self_attention_layers(), inject_layers)
            timesteps = schedule.denoising_timesteps(step.step_index)
            backend.check_timesteps(timesteps)
            z = require_finite(backend.latent_to_vp(latent["samples"], step.sigma), INPUT_LATENT)
            conditioning = ComfyConditioning(positive, negative, cfg)
            progress = preview_progress(model, len(timesteps))
            z0 = kv_sample(
                backend, z, conditioning, attn_cache, step.step_index, layers, inject_start, inject_end, progress, kv_source
            )
            require_finite(z0, "the output of KV-injected denoising")
        log.info(
            "DragKit KV-Injected Sample: %d steps from t=%d, %d layers injected",
            len(timesteps), step.timestep, len(layers),
        )
        return (clean_latent(backend.vp_to_latent(z0, 0.0)),)


def sample_flux(model, latent, attn_cache, positive, kv_source, inject_layers, inject_start, inject_end, negative, cfg):
    """KV-Injected Sample on a FLUX MODEL: DragFlow's flow sampling with the recorded keys/values fully replacing the model's."""
    with node_errors("KV-Injected Sample"):
        if not isinstance(attn_cache, FlowCache):
            raise DragInputError(
                "this attention cache was recorded on a UNet (SD1.x/SD2.x/SDXL) model; invert the image with this FLUX "
                "MODEL in DDIM Invert"
            )
        if kv_source != "inversion cache":
            raise DragInputError(
                "kv_source 'reference branch' (mutual self-attention) is for UNets; on FLUX choose 'inversion cache' "
                "(DragFlow's injection)"
            )
        schedule = attn_cache.schedule
        step = check_inputs(model, latent, schedule, positive, negative, cfg)
        check_flux_latent(model, latent["samples"], "the latent")
        attn_cache.check_references(reference_shapes(positive))
        backend = ComfyFlowBackend(model)
        layers = select_flux_layers(backend.kv_layers(), inject_layers)
        x = require_finite(backend.latent_in(latent["samples"]), INPUT_LATENT)
        progress = preview_progress(model, schedule.num_steps - step.step_index)
        conditioning = ComfyConditioning(positive, negative, cfg)
        x0 = flow_sample(backend, x, conditioning, attn_cache, step.step_index, layers, inject_start, inject_end, progress)
        require_finite(x0, "the output of KV-injected flow sampling")
    log.info(
        "DragKit KV-Injected Sample (FLUX, %s): %d steps from t=%.4f, %d blocks injected",
        schedule.solver, schedule.num_steps - step.step_index, step.sigma, len(layers),
    )
    return (clean_latent(backend.latent_out(x0)),)


NODE_CLASS_MAPPINGS = {"DragKitKVInjectedSample": KVInjectedSample}
NODE_DISPLAY_NAME_MAPPINGS = {"DragKitKVInjectedSample": "KV-Injected Sample (DragKit)"}
