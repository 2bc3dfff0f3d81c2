"""Motion-Supervision Optimize: DragDiffusion's and GoodDrag's latent optimisation with point tracking."""

from __future__ import annotations

import dataclasses

from ..dragkit.dragdiffusion import DragDiffusionSettings, drag_diffusion
from ..dragkit.gooddrag import GoodDragSettings, good_drag
from ..dragkit.hybrid import REFINE_DEFAULTS, refine_warped
from ..dragkit.errors import DragInputError
from ..dragkit.geometry import LatentGeometry, resolve_editable_mask
from ..dragkit.optimisation import keep_map
from .comfy_backend import ComfyBackend, ComfyConditioning, is_flux
from .common import ATTN_CACHE, CATEGORY, DRAG_POINTS, INPUT_LATENT, log, node_errors, require_cache, require_finite, require_points
from .invert import check_conditioning, preview_progress
from .latent_io import require_step, with_step
from .model_family import require_unet
from .optimize_flux import RELEASED, optimize_dragflow

MODES = ("dragdiffusion", "gooddrag", "refine_warp", "dragflow")
PREVIEW_EVERY = 5
METHOD_DEFAULT = -1
"""Widget value meaning "the chosen method's default" (lr, λ, r1, r2 differ between the methods)."""

DD = DragDiffusionSettings()
GD = GoodDragSettings()
"""The methods' defaults: every default below is read from these (and :data:`REFINE_DEFAULTS`)."""


def _settings(defaults, **knobs):
    """``defaults`` with the knobs that are not :data:`METHOD_DEFAULT` replaced."""
    return dataclasses.replace(defaults, **{k: v for k, v in knobs.items() if v != METHOD_DEFAULT})


def schedule_latent(cache, timestep: int):
    """The unedited (inverted) latent at ``timestep`` from the cache's trajectory."""
    if timestep not in cache.trajectory:
        raise DragInputError(f"the attention cache has no inverted latent at timestep {timestep}; use the same DDIM Invert")
    return cache.trajectory[timestep]


def check_drag_steps(drag_steps: int, step_index: int, num_steps: int) -> None:
    """Raise unless GoodDrag's ``drag_steps`` denoising steps from ``step_index`` leave a step to sample."""
    left = num_steps - step_index
    if drag_steps >= left:
        fix = f"use drag_steps of at most {left - 1}" if left > 1 else "invert with a higher strength"
        raise DragInputError(
            f"gooddrag: drag_steps={drag_steps} reaches the end of the schedule: the latent is {left} of "
            f"{num_steps} steps from clean (DDIM Invert's steps and strength), so nothing would be left for "
            f"KV-Injected Sample; {fix}"
        )


class MotionSupervisionOptimize:
    DESCRIPTION = (
        "Optimises the noisy latent with motion supervision on the UNet's decoder features so the content at each "
        "handle moves toward its target, tracking the handles as it goes and keeping the unmasked region through a "
        "regulariser on the next denoising step. dragdiffusion: up to `iterations` steps at t* (stops when every "
        "handle is within 4 px of its target). gooddrag: alternates B drag operations (J steps each, pulling toward "
        "the original features) with one denoising step over the first T steps; its output is T steps later. "
        "Sample the result with KV-Injected Sample, kv_source 'reference branch', inject_layers 'masactrl'. "
        "dragflow (FLUX): DragFlow's region supervision at t*: each masked region holding a handle is moved toward "
        "its target in the last two double-stream blocks' features (plain gradient steps, the background locked); "
        "sample with KV-Injected Sample, kv_source 'inversion cache'. DragFlow's IP-Adapter (InstantCharacter) and "
        "MLLM-written prompt are not inputs yet (left for later): wire the editing prompt yourself."
    )
    CATEGORY = CATEGORY
    FUNCTION = "optimize"
    RETURN_TYPES = ("LATENT", DRAG_POINTS)
    RETURN_NAMES = ("z_t", "tracked_points")
    OUTPUT_TOOLTIPS = (
        "The optimised latent, at the same diffusion step as the input.",
        "The points with the handles where tracking found them at the end (for display); dragflow does not track: "
        "its points come out unchanged.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model (with the per-image LoRA, if any)."}),
                "latent": ("LATENT", {"tooltip": "z_t from DDIM Invert (DragDiffusion: 50 steps, strength 0.7), or a warped latent (hybrid)."}),
                "attn_cache": (ATTN_CACHE, {"tooltip": "The attention cache of the same DDIM Invert (gives the schedule)."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt used for inversion."}),
                "points": (DRAG_POINTS, {"tooltip": "Handle/target pairs in source-image pixels."}),
                "mode": (list(MODES), {"default": MODES[0], "tooltip": "dragdiffusion: motion supervision at t* with tracking (DragDiffusion). gooddrag: alternating drag and denoising with information-preserving supervision (GoodDrag; invert with strength 0.75). refine_warp: after FastDrag Warp, pull the features around each target toward the source's around its handle (a few iterations; the hybrid). dragflow: DragFlow's region-level supervision on a FLUX MODEL (needs the mask)."}),
                "iterations": ("INT", {"default": DD.iterations, "min": 1, "max": 1000, "tooltip": f"dragdiffusion: most optimisation steps (it stops earlier when every handle arrived); refine_warp: the number of steps (about {REFINE_DEFAULTS.iterations})."}),
                "lr": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 10000.0, "step": 0.001, "tooltip": f"Adam learning rate on the latent (dragflow: plain gradient step size); -1 = the method's default (dragdiffusion {DD.lr}, gooddrag {GD.lr}, dragflow {RELEASED.lr:g})."}),
                "lam": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 100.0, "step": 0.01, "tooltip": f"λ, weight of the term that keeps the unmasked region (a sum over the latent); -1 = the method's default ({DD.lam}, {GD.lam})."}),
                "r1": ("INT", {"default": -1, "min": -1, "max": 16, "tooltip": f"Motion-supervision patch radius in supervision cells (2 px each); -1 = the method's default ({DD.r1}, {GD.r1})."}),
                "r2": ("INT", {"default": -1, "min": -1, "max": 32, "tooltip": f"Point-tracking search radius in supervision cells; -1 = the method's default ({DD.r2}, {GD.r2})."}),
                "drag_steps": ("INT", {"default": GD.drag_steps, "min": 1, "max": 100, "tooltip": "gooddrag: T, the number of denoising steps during which dragging happens."}),
                "drags_per_step": ("INT", {"default": GD.drags_per_step, "min": 1, "max": 100, "tooltip": "gooddrag: B, drag operations per denoising step (K = T x B in all)."}),
                "grad_steps": ("INT", {"default": GD.grad_steps, "min": 1, "max": 100, "tooltip": "gooddrag: J, Adam steps per drag operation before the handles are tracked."}),
                "beta": ("FLOAT", {"default": GD.beta, "min": 0.1, "max": 32.0, "step": 0.1, "tooltip": "gooddrag: β, the largest step (supervision cells) of the pulled patch toward the target."}),
                "max_unchanged": ("INT", {"default": GD.max_unchanged, "min": 0, "max": 1000, "tooltip": "gooddrag: stop dragging after this many drag operations in a row left the handles in place (0 = never)."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Editable region in source pixels (1 = editable). Absent or empty: the whole image, and no keep term."}),
                "feature_level": ("INT", {"default": METHOD_DEFAULT, "min": METHOD_DEFAULT, "max": 8, "tooltip": "The decoder level whose output gives the supervision features, 0 = lowest resolution; -1 = the penultimate level, the methods' choice (SD1.5: 2 of 0-3, 640 channels at latent resolution; SDXL: 1 of 0-2, the same role). Lower levels are more semantic and coarser."}),
                "transport_steps": ("INT", {"default": RELEASED.transport_steps, "min": 1, "max": 1000, "tooltip": f"dragflow: iterations over which each region's move grows from none to the full handle-to-target move (released: {RELEASED.transport_steps})."}),
                "intensify_steps": ("INT", {"default": RELEASED.intensify_steps, "min": 0, "max": 1000, "tooltip": f"dragflow: further iterations at the full move (released: {RELEASED.intensify_steps})."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": RELEASED.gradient_checkpointing, "tooltip": "dragflow: recompute the double-stream blocks' activations in the backward instead of keeping them (less memory, about one more forward of those blocks per step; the release enables it)."}),
            },
        }

    def optimize(self, model, latent, attn_cache, positive, points, mode, iterations, lr, lam, r1, r2,
                 drag_steps=GD.drag_steps, drags_per_step=GD.drags_per_step, grad_steps=GD.grad_steps, beta=GD.beta,
                 max_unchanged=GD.max_unchanged, mask=None, feature_level=METHOD_DEFAULT,
                 transport_steps=RELEASED.transport_steps, intensify_steps=RELEASED.intensify_steps,
                 gradient_checkpointing=RELEASED.gradient_checkpointing):
        if mode == "dragflow":
            return optimize_dragflow(model, latent, attn_cache, positive, points, lr, mask, transport_steps,
                                     intensify_steps, gradient_checkpointing)
        with node_errors("Motion-Supervision Optimize"):
            if is_flux(model):
                raise DragInputError(f"mode {mode} works on UNets (SD1.x/SD2.x/SDXL); on a FLUX MODEL choose mode dragflow")
            require_unet(model, "Motion supervision on decoder features")
            require_points(points)
            require_cache(attn_cache)
            step = require_step(latent)
            if step.num_steps != attn_cache.schedule.num_steps:
                raise DragInputError("the latent and the attention cache come from different schedules")
            check_conditioning(positive, model)
            if mode == "gooddrag":
                check_drag_steps(drag_steps, step.step_index, step.num_steps)
            samples = latent["samples"]
            geometry = LatentGeometry(points.width, points.height)
            geometry.check_latent(samples.shape[-2], samples.shape[-1])
            editable, defaulted = resolve_editable_mask(mask, points.height, points.width)
            if defaulted:
                log.info("DragKit Motion-Supervision Optimize: no mask (or an empty one): the whole image is editable")
            if defaulted:
                keep = editable.new_zeros(samples.shape[-2:])
            else:
                keep, widened = keep_map(geometry, editable)
                if widened:
                    log.info(
                        "DragKit Motion-Supervision Optimize: the mask is too small to cover a whole latent cell; "
                        "every latent cell it touches is editable (%d cells)", int((keep == 0).sum()),
                    )
            if mode not in MODES:
                raise DragInputError(f"mode must be one of {MODES}, got {mode!r}")
            backend = ComfyBackend(model, None if feature_level == METHOD_DEFAULT else feature_level)
            z = require_finite(backend.latent_to_vp(samples, step.sigma), INPUT_LATENT)
            handles = geometry.points_to_supervision(points.handles_tensor())
            targets = geometry.points_to_supervision(points.targets_tensor())
            schedule = attn_cache.schedule
            if mode == "dragdiffusion":
                settings = _settings(DD, iterations=iterations, lr=lr, lam=lam, r1=r1, r2=r2)
                progress = preview_progress(model, iterations, every=PREVIEW_EVERY)
                result = drag_diffusion(
                    backend, z, ComfyConditioning(positive), schedule, step.step_index, handles, targets, keep, settings,
                    lambda done, tracked, x0: progress(done, x0),
                )
                latent_out, index, tracked = result.latent, step.step_index, result.handles
                log.info("DragKit Motion-Supervision Optimize: DragDiffusion, %d iterations", result.iterations)
            elif mode == "refine_warp":
                settings = _settings(REFINE_DEFAULTS, iterations=iterations, lr=lr, lam=lam, r1=r1)
                source = schedule_latent(attn_cache, step.timestep)
                progress = preview_progress(model, iterations, every=PREVIEW_EVERY)
                result = refine_warped(
                    backend, z, source, ComfyConditioning(positive), schedule, step.step_index, handles, targets, keep,
                    settings, lambda done, tracked, x0: progress(done, x0),
                )
                latent_out, index, tracked = result.latent, step.step_index, result.handles
            else:
                settings = _settings(
                    GD, drag_steps=drag_steps, drags_per_step=drags_per_step, grad_steps=grad_steps, lr=lr, lam=lam,
                    r1=r1, r2=r2, beta=beta, max_unchanged=max_unchanged,
                )
                progress = preview_progress(model, settings.total_operations, every=PREVIEW_EVERY)
                result = good_drag(
                    backend, z, ComfyConditioning(positive), schedule, step.step_index, handles, targets, keep, settings,
                    lambda done, total, tracked, x0: progress(done, x0),
                )
                latent_out, index, tracked = result.latent, result.step_index, result.handles
                log.info(
                    "DragKit Motion-Supervision Optimize: GoodDrag, %d drag operations, %d gradient steps, %d denoising steps",
                    result.drag_operations, result.gradient_steps, result.denoising_steps,
                )
            require_finite(latent_out, f"the output of {mode} optimisation")
        moved = points.with_handles(geometry.supervision_to_points(tracked))
        timestep = schedule.timesteps[index]
        sigma = backend.sigma(timestep)
        return (with_step(backend.vp_to_latent(latent_out, sigma), step.num_steps, index, timestep, sigma), moved)


NODE_CLASS_MAPPINGS = {"DragKitMotionSupervisionOptimize": MotionSupervisionOptimize}
NODE_DISPLAY_NAME_MAPPINGS = {"DragKitMotionSupervisionOptimize": "Motion-Supervision Optimize (DragKit)"}
