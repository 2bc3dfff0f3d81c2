"""FastDrag Warp+BNNI: the one-step latent warp of a noisy latent."""

from __future__ import annotations

from ..dragkit.errors import DragInputError
from ..dragkit.fastdrag import FILLS, MODES, fastdrag_edit
from ..dragkit.geometry import LatentGeometry, resolve_editable_mask
from .common import CATEGORY, DRAG_POINTS, INPUT_LATENT, log, node_errors, require_finite, require_points
from .latent_io import require_step, with_step


class FastDragWarp:
    DESCRIPTION = (
        "FastDrag's latent warpage function: moves the masked latent cells along the drag vectors in one step "
        "(stretching toward the bounding-box circumcircle of the mask, inverse-distance weights over several "
        "handles), then fills the cells nothing landed on by bilateral nearest-neighbour interpolation. "
        "Move/copy modes shift the masked object instead. Works on z_t from DDIM Invert; sample the result with "
        "KV-Injected Sample."
    )
    CATEGORY = CATEGORY
    FUNCTION = "warp"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("z_t",)
    OUTPUT_TOOLTIPS = ("The warped latent, at the same diffusion step as the input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "latent": ("LATENT", {"tooltip": "The noisy latent z_t from DDIM Invert (FastDrag: 10 steps, strength 0.7, t* = 601)."}),
                "points": (DRAG_POINTS, {"tooltip": "Handle/target pairs, in pixels of the source image."}),
                "mode": (list(MODES), {"default": "drag", "tooltip": "drag: warp every pair (FastDrag). move: shift the masked object by the first pair and fill where it was. copy: shift a copy, keep the original."}),
                "fill": (list(FILLS), {"default": "bnni", "tooltip": "How cells left empty by the warp are filled: bnni (paper: symmetric nearest valid neighbour in four directions, inverse-distance weights), bnni_as_released (the official code exactly: its float32 warp arithmetic and causal raster BNNI), keep (the original values), zero."}),
                "patch_cells": ("INT", {"default": 12, "min": 1, "max": 64, "tooltip": "move mode: side, in latent cells, of the patch around the target that is tiled over the vacated region (12 as released)."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Editable region in source pixels (1 = editable). Absent or empty: the whole image."}),
            },
        }

    def warp(self, latent, points, mode, fill, patch_cells, mask=None):
        with node_errors("FastDrag Warp+BNNI"):
            require_points(points)
            step = require_step(latent)
            samples = require_finite(latent["samples"], INPUT_LATENT)
            if samples.shape[0] != 1:
                raise DragInputError(f"the latent holds a batch of {samples.shape[0]}; warp one image at a time")
            geometry = LatentGeometry(points.width, points.height)
            geometry.check_latent(samples.shape[-2], samples.shape[-1])
            editable, defaulted = resolve_editable_mask(mask, points.height, points.width)
            if defaulted:
                log.info("DragKit FastDrag Warp: no mask (or an empty one), so the whole image is editable")
            if mode != "drag" and points.num_pairs > 1:
                log.info("DragKit FastDrag Warp: %s mode uses only the first of %d pairs", mode, points.num_pairs)
            warped = fastdrag_edit(
                samples,
                geometry.points_to_latent(points.handles_tensor()),
                geometry.points_to_latent(points.targets_tensor()),
                geometry.mask_to_latent_any(editable),
                mode=mode,
                fill=fill,
                patch_cells=patch_cells,
            )
            require_finite(warped, "the output of the warp")
        return (with_step(warped, step.num_steps, step.step_index, step.timestep, step.sigma),)


NODE_CLASS_MAPPINGS = {"DragKitFastDragWarp": FastDragWarp}
NODE_DISPLAY_NAME_MAPPINGS = {"DragKitFastDragWarp": "FastDrag Warp+BNNI (DragKit)"}
