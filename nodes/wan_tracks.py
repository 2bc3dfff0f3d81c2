"""Drag Points to Wan-Move Tracks: the editor's drag pairs as point tracks for Wan-Move (ComfyUI >= 0.33)."""

from __future__ import annotations

from ..dragkit.wan_tracks import EASINGS, check_wan_frames, drag_tracks, tracks_json
from .common import CATEGORY, DRAG_POINTS, log, node_errors, require_points

NODE_NAME = "Drag Points to Wan-Move Tracks"


class DragPointsToWanMoveTracks:
    DESCRIPTION = (
        "Turns handle/target pairs into Wan-Move point tracks: each handle travels to its target over the video's "
        "frames (the last frame is the drag edit), and a few static tracks outside the moving region hold the "
        "background. Connect track_coords to WanMoveTracksFromCoords and width/height to WanMoveTrackToVideo (which "
        "centre-crops the start image to that size; the tracks follow the same crop)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "tracks"
    RETURN_TYPES = ("STRING", "INT", "INT")
    RETURN_NAMES = ("track_coords", "width", "height")
    OUTPUT_TOOLTIPS = (
        "JSON for WanMoveTracksFromCoords: a list of tracks, each frames x {\"x\", \"y\"} in video pixels; the drag "
        "pairs' tracks first, then the static ones.",
        "The video width the tracks are in (connect to WanMoveTrackToVideo's width).",
        "The video height the tracks are in (connect to WanMoveTrackToVideo's height).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "points": (DRAG_POINTS, {"tooltip": "Handle/target pairs in pixels of the start image (e.g. from the "
                                                    "Drag Points Editor)."}),
                "width": ("INT", {"default": 832, "min": 16, "max": 4096, "step": 16, "tooltip": "Video width "
                          "(Wan 2.1 480p: 832). The start image is centre-cropped to width:height, then resized."}),
                "height": ("INT", {"default": 480, "min": 16, "max": 4096, "step": 16, "tooltip": "Video height "
                           "(Wan 2.1 480p: 480)."}),
                "frames": ("INT", {"default": 81, "min": 5, "max": 1021, "step": 4, "tooltip": "Number of video "
                           "frames, 4k + 1 (Wan 2.1: 81 at 16 fps). Frame 0 is the start image, the last frame "
                           "reaches the targets."}),
                "easing": (list(EASINGS), {"default": "ease_in_out", "tooltip": "Timing of the move: linear "
                           "(constant speed), ease_in (starts slowly), ease_out (ends slowly), ease_in_out (both)."}),
                "static_grid": ("INT", {"default": 4, "min": 0, "max": 16, "tooltip": "Static tracks on a grid x grid "
                                "lattice of the frame, kept where the moving region never passes (0 = none). Needs "
                                "the mask."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "The region that moves (the editor's painted mask), at the start "
                                             "image's size. Absent or empty: the whole image moves and there are no "
                                             "static tracks."}),
            },
        }

    def tracks(self, points, width, height, frames, easing, static_grid, mask=None):
        with node_errors(NODE_NAME):
            require_points(points)
            check_wan_frames(frames)
            tracks, moving = drag_tracks(points, frames, width, height, easing, mask, static_grid)
        log.info("DragKit %s: %d moving and %d static tracks over %d frames", NODE_NAME, moving,
                 tracks.shape[1] - moving, frames)
        return (tracks_json(tracks), width, height)


NODE_CLASS_MAPPINGS = {"DragKitPointsToWanMoveTracks": DragPointsToWanMoveTracks}
NODE_DISPLAY_NAME_MAPPINGS = {"DragKitPointsToWanMoveTracks": "Drag Points to Wan-Move Tracks (DragKit)"}
