"""Drag Points (JSON): DRAG_POINTS from text, for scripts, tests and shared workflows."""

from __future__ import annotations

from ..dragkit.points import parse_drag_points
from .common import CATEGORY, DRAG_POINTS, node_errors

EXAMPLE = '{"points": [[120, 200], [180, 200]]}'


class DragPointsFromJSON:
    DESCRIPTION = (
        "Reads handle/target pairs from JSON: Drag100/DragBench style {\"points\": [[x, y], ...]} alternating "
        "handle, target; or {\"width\", \"height\", \"pairs\": [{\"handle\": [x, y], \"target\": [x, y]}]}. "
        "Coordinates are source-image pixels, x right, y down."
    )
    CATEGORY = CATEGORY
    FUNCTION = "parse"
    RETURN_TYPES = (DRAG_POINTS,)
    RETURN_NAMES = ("points",)
    OUTPUT_TOOLTIPS = ("The validated handle/target pairs, with the size of the image they belong to.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "points_json": ("STRING", {"default": EXAMPLE, "multiline": True, "tooltip": "The points as JSON (see the node description)."}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "The image the points were placed on; gives the size when the JSON has none, and is checked against it when it has one."}),
            },
        }

    def parse(self, points_json, image=None):
        with node_errors("Drag Points (JSON)"):
            height, width = (int(image.shape[1]), int(image.shape[2])) if image is not None else (None, None)
            points = parse_drag_points(points_json, width=width, height=height)
        return (points,)


NODE_CLASS_MAPPINGS = {"DragKitPointsFromJSON": DragPointsFromJSON}
NODE_DISPLAY_NAME_MAPPINGS = {"DragKitPointsFromJSON": "Drag Points (JSON)"}
