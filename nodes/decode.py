"""VAE Decode (DragKit): decode, keep the unmasked source exactly, and draw the points.

The paste, the feathered blend and the preview run on the VAE's device (the
GPU on a GPU machine); the two output images are copied to the host once, at
the end (ComfyUI's VAE.decode hands its pixels to the CPU, so they go back
once for the compositing).
"""

from __future__ import annotations

import torch

from ..dragkit.compositing import draw_points, paste_edit
from ..dragkit.errors import DragInputError
from ..dragkit.geometry import LatentGeometry, resolve_editable_mask
from ..dragkit.points import DragPoints
from .common import (CATEGORY, DRAG_POINTS, INPUT_LATENT, log, node_errors, require_finite, require_points,
                     save_temp_png)
from .latent_io import read_step


RESULT_UI_KEY = "dragkit_result"
"""Key of the node's ``ui``: the decoded image in the temp folder, shown by the Drag Points Editor upstream of it."""


class DragVAEDecode:
    DESCRIPTION = (
        "Decodes the edited latent. With the source image and mask connected, every pixel outside the mask is the "
        "source's exactly and the edit is blended in over a feathered band inside the mask edge. With points "
        "connected, the preview output shows the drag arrows."
    )
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("image", "preview")
    OUTPUT_TOOLTIPS = (
        "The edited image (at the source image's size when the source is connected).",
        "The edited image with handle (red) -> target (blue) arrows drawn, for checking the edit.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("VAE", {"tooltip": "The VAE of the checkpoint."}),
                "latent": ("LATENT", {"tooltip": "The edited clean latent, e.g. from KV-Injected Sample."}),
                "feather": ("INT", {"default": 8, "min": 0, "max": 256, "tooltip": "Width in pixels of the blend band inside the mask edge (0 = hard edge). Pixels outside the mask stay the source's exactly."}),
            },
            "optional": {
                "source_image": ("IMAGE", {"tooltip": "The original image; connect it with the mask to keep the unmasked region exactly."}),
                "mask": ("MASK", {"tooltip": "The editable region (1 = editable). Absent or empty with a source image: the whole image is taken from the edit."}),
                "points": (DRAG_POINTS, {"tooltip": "Drag points to draw on the preview output."}),
            },
        }

    def decode(self, vae, latent, feather, source_image=None, mask=None, points=None):
        with node_errors("VAE Decode (DragKit)"):
            samples = require_finite(latent["samples"], INPUT_LATENT)
            if samples.shape[0] != 1:
                raise DragInputError(f"the latent holds a batch of {samples.shape[0]}; decode one edited image")
            if read_step(latent) is not None:
                log.warning("DragKit VAE Decode: this latent is still noisy (it has a diffusion step); denoise it first")
            decoded = vae.decode(samples)
            decoded = decoded.reshape(-1, *decoded.shape[-3:])[:1]
            image = require_finite(decoded[0], "the output of the VAE decode").to(vae.device)
            if source_image is not None:
                image = self._paste(source_image, image, mask, feather)
            elif mask is not None:
                raise DragInputError("a mask is connected but no source image; connect the source image too")
            preview = image
            if points is not None:
                preview = self._draw(image, points, source_image is not None)
        return (image[None].contiguous().cpu(), preview[None].contiguous().cpu())

    def run(self, vae, latent, feather, source_image=None, mask=None, points=None):
        """The node: ``decode``, plus the image in ``ui`` so a Drag Points Editor upstream can show the result."""
        image, preview = self.decode(vae, latent, feather, source_image, mask, points)
        return {"ui": {RESULT_UI_KEY: [save_temp_png((image[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy(), "dragkit_result")]}, "result": (image, preview)}

    @staticmethod
    def _paste(source_image: torch.Tensor, image: torch.Tensor, mask, feather: int) -> torch.Tensor:
        if source_image.shape[0] != 1:
            raise DragInputError(f"the source image is a batch of {source_image.shape[0]}; connect one image")
        source = source_image[0, ..., :3].to(image.device, torch.float32)
        height, width = source.shape[:2]
        editable, defaulted = resolve_editable_mask(mask, height, width)
        if defaulted and mask is not None:
            log.info("DragKit VAE Decode: the mask is empty, so the whole image is editable")
        return paste_edit(source, image.to(torch.float32), editable.to(image.device), feather)

    @staticmethod
    def _draw(image: torch.Tensor, points: DragPoints, at_source_size: bool) -> torch.Tensor:
        require_points(points)
        handles, targets = points.handles_tensor(), points.targets_tensor()
        if not at_source_size:
            geometry = LatentGeometry(points.width, points.height)
            offset = torch.tensor([geometry.crop_x, geometry.crop_y], dtype=torch.float32)
            handles, targets = handles - offset, targets - offset
        return draw_points(image, handles, targets)


NODE_CLASS_MAPPINGS = {"DragKitVAEDecode": DragVAEDecode}
NODE_DISPLAY_NAME_MAPPINGS = {"DragKitVAEDecode": "VAE Decode (DragKit)"}
