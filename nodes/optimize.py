"""Motion-Supervision Optimize: DragDiffusion's latent optimisation with point tracking."""

from __future__ import annotations

from ..dragkit.attention import AttnCache
from ..dragkit.dragdiffusion import DragDiffusionSettings, drag_diffusion
from ..dragkit.errors import DragInputError
from ..dragkit.geometry import LatentGeometry, resolve_editable_mask
from ..dragkit.points import DragPoints
from .comfy_backend import ComfyBackend, ComfyConditioning
from .common import ATTN_CACHE, CATEGORY, DRAG_POINTS, log, node_errors
from .invert import check_conditioning, preview_progress
from .latent_io import read_step, with_step

MODES = ("dragdiffusion",)
PREVIEW_EVERY = 5


class MotionSupervisionOptimize:
    DESCRIPTION = (
        "DragDiffusion: optimises the noisy latent with motion supervision on the UNet's decoder features so the "
        "content at each handle moves toward its target, tracking the handles as it goes and keeping the "
        "unmasked region through a regulariser on the next denoising step. Stops when every handle is within "
        "2 supervision cells (4 px) of its target. Sample the result with KV-Injected Sample."
    )
    CATEGORY = CATEGORY
    FUNCTION = "optimize"
    RETURN_TYPES = ("LATENT", DRAG_POINTS)
    RETURN_NAMES = ("z_t", "tracked_points")
    OUTPUT_TOOLTIPS = (
        "The optimised latent, at the same diffusion step as the input.",
        "The points with the handles where tracking found them at the end (for display).",
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
                "mode": (list(MODES), {"default": MODES[0], "tooltip": "dragdiffusion: motion supervision at t* with tracking (DragDiffusion)."}),
                "iterations": ("INT", {"default": 80, "min": 1, "max": 1000, "tooltip": "Most optimisation steps (it stops earlier when every handle arrived)."}),
                "lr": ("FLOAT", {"default": 0.01, "min": 0.0001, "max": 1.0, "step": 0.001, "tooltip": "Adam learning rate on the latent."}),
                "lam": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 100.0, "step": 0.01, "tooltip": "λ, weight of the term that keeps the unmasked region (a sum over the latent)."}),
                "r1": ("INT", {"default": 1, "min": 0, "max": 16, "tooltip": "Motion-supervision patch radius in supervision cells (2 px each)."}),
                "r2": ("INT", {"default": 3, "min": 0, "max": 32, "tooltip": "Point-tracking search radius in supervision cells."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Editable region in source pixels (1 = editable). Absent or empty: the whole image, and no keep term."}),
            },
        }

    def optimize(self, model, latent, attn_cache, positive, points, mode, iterations, lr, lam, r1, r2, mask=None):
        with node_errors("Motion-Supervision Optimize"):
            if not isinstance(points, DragPoints):
                raise DragInputError("points must come from a DragKit points node")
            if not isinstance(attn_cache, AttnCache):
                raise DragInputError("attn_cache is not an attention cache from DDIM Invert")
            step = read_step(latent)
            if step is None:
                raise DragInputError("this latent does not know its diffusion step; connect z_t from DDIM Invert or FastDrag Warp")
            if step.num_steps != attn_cache.schedule.num_steps:
                raise DragInputError("the latent and the attention cache come from different schedules")
            check_conditioning(positive)
            samples = latent["samples"]
            geometry = LatentGeometry(points.width, points.height)
            geometry.check_latent(samples.shape[-2], samples.shape[-1])
            editable, defaulted = resolve_editable_mask(mask, points.height, points.width)
            if defaulted:
                log.info("DragKit Motion-Supervision Optimize: no mask (or an empty one): the whole image is editable")
            keep = (~geometry.mask_to_latent(editable)).float() if not defaulted else editable.new_zeros(samples.shape[-2:])
            settings = DragDiffusionSettings(iterations=iterations, lr=lr, lam=lam, r1=r1, r2=r2)
            backend = ComfyBackend(model)
            progress = preview_progress(model, iterations, every=PREVIEW_EVERY)

            z = backend.latent_to_vp(samples, step.sigma)
            result = drag_diffusion(
                backend, z, ComfyConditioning(positive), attn_cache.schedule, step.step_index,
                geometry.points_to_supervision(points.handles_tensor()),
                geometry.points_to_supervision(points.targets_tensor()),
                keep, settings, lambda done, handles, x0: progress(done, x0),
            )
        log.info("DragKit Motion-Supervision Optimize: %d iterations", result.iterations)
        out = backend.vp_to_latent(result.latent, step.sigma)
        tracked = points.with_handles(geometry.supervision_to_points(result.handles))
        return (with_step(out, step.num_steps, step.step_index, step.timestep, step.sigma), tracked)


NODE_CLASS_MAPPINGS = {"DragKitMotionSupervisionOptimize": MotionSupervisionOptimize}
NODE_DISPLAY_NAME_MAPPINGS = {"DragKitMotionSupervisionOptimize": "Motion-Supervision Optimize (DragKit)"}
