"""Drag Warp (pixels): Inpaint4Drag's bidirectional pixel warp, feeding any inpainting model."""

from __future__ import annotations

import torch

from ..dragkit.errors import DragInputError
from ..dragkit.geometry import resolve_editable_mask
from ..dragkit.pixel_warp import DEFAULT_BAND, NEIGHBOURS, pixel_warp
from .common import CATEGORY, DRAG_POINTS, log, node_errors, require_finite, require_points

NODE_NAME = "Drag Warp (pixels)"

MIN_SIDE = 8
"""Smallest image side: one latent cell of the VAE the inpainting model encodes with."""


class PixelWarp:
    DESCRIPTION = (
        "Inpaint4Drag's warp: every region of the mask moves along the drag vectors in pixel space (inverse-distance "
        "weights over the region's handles, a forward map of its contour and a backward map of every target pixel, so "
        "the moved region has no holes). Outputs the warped image and the mask an inpainting model must fill: what the "
        "move uncovered plus a band along the moved edges. Connect both to InpaintModelConditioning (or VAE Encode "
        "(for Inpainting)) and a KSampler with any inpainting model: SD1.5/SDXL inpainting, FLUX.1 Fill. A region with "
        "no handle stays still; a handle outside every region is ignored; what moves past the image border is cut off."
    )
    CATEGORY = CATEGORY
    FUNCTION = "warp"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "inpaint_mask")
    OUTPUT_TOOLTIPS = (
        "The warped image (same size, dtype and device as the input; every image of a batch gets the same warp).",
        "1 where the inpainting model must paint: the uncovered area dilated by band x band, the moved edges drawn "
        "band pixels thick, and moved pixels whose source lies outside the image.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The image to edit (the one the points were placed on)."}),
                "points": (DRAG_POINTS, {"tooltip": "Handle/target pairs, in pixels of the image. A region moves with the handles that lie on it."}),
                "band": ("INT", {"default": DEFAULT_BAND, "min": 0, "max": 63, "step": 1, "tooltip": "k, in pixels: the uncovered area is dilated by a k x k square and the moved edges are drawn k pixels thick in the inpaint mask. 0 = neither. Even values are raised to the next odd one (as released). 5 as released."}),
                "neighbours": (list(NEIGHBOURS), {"default": NEIGHBOURS[0], "tooltip": "Backward map: exact = the 4 nearest of all moved pixels (one per pixel where the region folds: the one nearest a handle); as_released = the 4 nearest of 100 moved pixels picked by raster index, as the official code does."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "The regions to move, in image pixels (> 0.5 = inside). Each connected region, holes filled, moves with its own handles. Absent or empty: the whole image is one region."}),
            },
        }

    def warp(self, image, points, band, neighbours, mask=None):
        with node_errors(NODE_NAME):
            require_points(points)
            if image.dim() != 4:
                raise DragInputError(f"the image must be a ComfyUI IMAGE (batch, height, width, channels), got {tuple(image.shape)}")
            height, width = int(image.shape[1]), int(image.shape[2])
            if height < MIN_SIDE or width < MIN_SIDE:
                raise DragInputError(
                    f"the image is {width}x{height} pixels; it must be at least {MIN_SIDE}x{MIN_SIDE} (one latent cell) "
                    "for the inpainting model that follows"
                )
            points.check_image_size(width, height)
            require_finite(image, "the input image")
            editable, defaulted = resolve_editable_mask(mask, height, width)
            if defaulted:
                log.info("DragKit %s: no mask (or an empty one), so the whole image is one region", NODE_NAME)
            result = pixel_warp(
                image,
                editable.to(image.device),
                points.handles_tensor(),
                points.targets_tensor(),
                band=band,
                neighbours=neighbours,
            )
        if result.ignored_pairs:
            log.warning(
                "DragKit %s: pair(s) %s have their handle outside every masked region and move nothing",
                NODE_NAME, ", ".join(str(i + 1) for i in result.ignored_pairs),
            )
        if result.still_regions:
            log.info("DragKit %s: %d masked region(s) have no handle and stay where they are", NODE_NAME, result.still_regions)
        return (result.image, result.inpaint_mask[None].to(torch.float32))


NODE_CLASS_MAPPINGS = {"DragKitPixelWarp": PixelWarp}
NODE_DISPLAY_NAME_MAPPINGS = {"DragKitPixelWarp": "Drag Warp (pixels) (DragKit)"}
