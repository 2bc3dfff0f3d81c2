"""Drag Points to SAM3 Points and Combine SAM3 Mask: the region to move from clicks on the object (SAM3).

ComfyUI 0.33.0's ``SAM3_Detect`` segments the object under point prompts;
these two nodes put the Drag Points Editor's handles into it and its mask back
into the warp (``dragkit/sam_prompts.py`` holds the logic).
"""

from __future__ import annotations

from ..dragkit.errors import DragInputError
from ..dragkit.sam_prompts import COMBINE_MODES, DEFAULT_KERNEL, combine_sam_mask, sam3_points_json
from .common import CATEGORY, DRAG_POINTS, node_errors, require_points

POINTS_NODE = "Drag Points to SAM3 Points"
COMBINE_NODE = "Combine SAM3 Mask"


class DragPointsToSAM3Points:
    DESCRIPTION = (
        "The handles of the drag pairs as SAM3 positive point prompts: connect positive_coords to SAM3 Detect "
        "(ComfyUI >= 0.33) so it segments the object you clicked. Coordinates are pixels of the image SAM3 Detect "
        "is given: connect that image here when it is not the one the points were placed on (a resized copy)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "convert"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("positive_coords",)
    OUTPUT_TOOLTIPS = (
        "JSON [{\"x\": .., \"y\": ..}, ...]: one positive point per handle, in pixels of the image SAM3 Detect sees.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "points": (DRAG_POINTS, {"tooltip": "Handle/target pairs (e.g. from the Drag Points Editor); each handle "
                                                    "becomes a positive point on the object to select."}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "The image SAM3 Detect is given, when it is a resized copy of the one "
                                               "the points were placed on (stretched, not cropped); absent = the same "
                                               "image."}),
            },
        }

    def convert(self, points, image=None):
        with node_errors(POINTS_NODE):
            require_points(points)
            width = height = None
            if image is not None:
                if image.dim() != 4:
                    raise DragInputError(f"the image must be a ComfyUI IMAGE (batch, height, width, channels), got "
                                         f"{tuple(image.shape)}")
                height, width = int(image.shape[1]), int(image.shape[2])
            return (sam3_points_json(points, width, height),)


class CombineSAM3Mask:
    DESCRIPTION = (
        "The region to move from SAM3's mask of the clicked object and the mask painted in the Drag Points Editor: "
        "union (either), replace (SAM3's alone) or refine (Inpaint4Drag's SAM refinement: SAM3's mask within the "
        "painted mask grown by kernel, plus the painted mask shrunk by kernel). Feed it to Drag Warp (pixels)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "combine"
    RETURN_TYPES = ("MASK",)
    RETURN_NAMES = ("mask",)
    OUTPUT_TOOLTIPS = ("The region to move (1 = inside), at the image's size.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "sam_mask": ("MASK", {"tooltip": "SAM3 Detect's masks (several are unioned), at the image's size."}),
                "mode": (list(COMBINE_MODES), {"default": COMBINE_MODES[0], "tooltip": "union: painted OR SAM3; "
                         "replace: SAM3 alone (painting is ignored); refine (Inpaint4Drag): SAM3 within the painted "
                         "mask grown by kernel, OR the painted mask shrunk by kernel. Nothing painted: SAM3's mask."}),
                "kernel": ("INT", {"default": DEFAULT_KERNEL, "min": 1, "max": 101, "step": 2, "tooltip": "Side of the "
                           "square (pixels, odd) by which refine grows and shrinks the painted mask; Inpaint4Drag's "
                           "default 21. Unused by union and replace."}),
            },
            "optional": {
                "painted_mask": ("MASK", {"tooltip": "The mask painted in the Drag Points Editor (its mask output); "
                                                     "absent or empty = nothing painted."}),
            },
        }

    def combine(self, sam_mask, mode, kernel, painted_mask=None):
        with node_errors(COMBINE_NODE):
            return (combine_sam_mask(painted_mask, sam_mask, mode, kernel)[None],)


NODE_CLASS_MAPPINGS = {"DragKitPointsToSAM3": DragPointsToSAM3Points, "DragKitCombineSAM3Mask": CombineSAM3Mask}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DragKitPointsToSAM3": "Drag Points to SAM3 Points (DragKit)",
    "DragKitCombineSAM3Mask": "Combine SAM3 Mask (DragKit)",
}
