"""FastDrag Warp+BNNI: the one-step latent warp of a noisy or a clean latent, of any channel count."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dragkit.errors import DragInputError
from ..dragkit.fastdrag import FILLS, MODES, fastdrag_edit
from ..dragkit.geometry import LatentGeometry, resolve_editable_mask
from .common import CATEGORY, DRAG_POINTS, INPUT_LATENT, log, node_errors, require_finite, require_points
from .latent_io import STEP_KEY, read_step, with_step


class FastDragWarp:
    DESCRIPTION = (
        "FastDrag's latent warpage function: moves the masked latent cells along the drag vectors in one step "
        "(stretching toward the bounding-box circumcircle of the mask, inverse-distance weights over several "
        "handles), then fills the cells nothing landed on by bilateral nearest-neighbour interpolation. "
        "Move/copy modes shift the masked object instead. Works on z_t from DDIM Invert (sample the result with "
        "KV-Injected Sample), or on a clean VAE Encode latent of any model and channel count (SD 4, SD3/FLUX 16): the "
        "output then carries a noise mask over the cells the warp changed, for a native KSampler with denoise < 1."
    )
    CATEGORY = CATEGORY
    FUNCTION = "warp"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("z_t",)
    OUTPUT_TOOLTIPS = (
        "The warped latent: at the same diffusion step as a z_t input; for a clean input, a clean latent with a noise "
        "mask over the changed cells (grown by one cell) unless the input already had one.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "latent": ("LATENT", {"tooltip": "The noisy latent z_t from DDIM Invert (FastDrag: 10 steps, strength 0.7, t* = 601), or a clean VAE Encode latent of any model (4 or 16 channels, one image; a one-frame video latent works too)."}),
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
            step = read_step(latent)
            samples = require_finite(latent["samples"], INPUT_LATENT)
            image_latent = _single_image(samples)
            geometry = LatentGeometry(points.width, points.height)
            geometry.check_latent(image_latent.shape[-2], image_latent.shape[-1])
            editable, defaulted = resolve_editable_mask(mask, points.height, points.width)
            if defaulted:
                log.info("DragKit FastDrag Warp: no mask (or an empty one), so the whole image is editable")
            if mode != "drag" and points.num_pairs > 1:
                log.info("DragKit FastDrag Warp: %s mode uses only the first of %d pairs", mode, points.num_pairs)
            latent_mask = geometry.mask_to_latent_any(editable)
            warped = fastdrag_edit(
                image_latent,
                geometry.points_to_latent(points.handles_tensor()),
                geometry.points_to_latent(points.targets_tensor()),
                latent_mask,
                mode=mode,
                fill=fill,
                patch_cells=patch_cells,
            )
            require_finite(warped, "the output of the warp")
        if step is not None:
            return (with_step(warped.reshape(samples.shape), step.num_steps, step.step_index, step.timestep, step.sigma),)
        log.info("DragKit FastDrag Warp: a clean latent (no DDIM Invert step): the output is clean, for a native sampler")
        out = {key: value for key, value in latent.items() if key != STEP_KEY}
        out["samples"] = warped.reshape(samples.shape)
        if "noise_mask" not in out:
            out["noise_mask"] = changed_cells(image_latent, warped, latent_mask.to(warped.device))
        return (out,)


def _single_image(samples: torch.Tensor) -> torch.Tensor:
    """The ``(1, C, h, w)`` latent of one image: ``samples`` itself, or a one-frame ``(1, C, 1, h, w)`` video latent's frame."""
    if samples.dim() == 5 and samples.shape[2] == 1:
        samples = samples[:, :, 0]
    if samples.dim() != 4:
        raise DragInputError(
            f"the latent has shape {tuple(samples.shape)}; the warp takes one image latent (1, channels, height, width)"
            + (" (a video latent of several frames is not supported)" if samples.dim() == 5 else "")
        )
    if samples.shape[0] != 1:
        raise DragInputError(f"the latent holds a batch of {samples.shape[0]}; warp one image at a time")
    return samples


def changed_cells(before: torch.Tensor, after: torch.Tensor, latent_mask: torch.Tensor) -> torch.Tensor:
    """``(1, 1, h, w)`` float32 noise mask: cells the warp changed or that are editable, grown by one cell (3x3)."""
    changed = (before != after).any(1)[0] | latent_mask
    grown = F.max_pool2d(changed[None, None].to(torch.float32), 3, stride=1, padding=1)
    return grown.cpu()


NODE_CLASS_MAPPINGS = {"DragKitFastDragWarp": FastDragWarp}
NODE_DISPLAY_NAME_MAPPINGS = {"DragKitFastDragWarp": "FastDrag Warp+BNNI (DragKit)"}
