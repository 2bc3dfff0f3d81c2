"""Drag pairs as Wan-Move point tracks: each handle travels to its target over N video frames.

Wan-Move (ComfyUI 0.33.0: ``WanMoveTracksFromCoords`` -> ``WanMoveTrackToVideo``)
takes tracks as JSON: a list of tracks, each a list of ``{"x": x, "y": y}``,
one per frame, in **pixels of the video frame** (``width`` x ``height``).
WanMoveTrackToVideo makes that frame from the start image with ComfyUI's
``common_upscale(..., "center")``: the image is centre-cropped to the video's
aspect ratio, then resized. :class:`FrameMap` applies the same crop and scale
to DragKit's ``(x, y)`` pixel indices (pixel centres kept in place).

Tracks (``(frames, tracks, 2)``, video pixels, x then y):

* one **moving** track per pair: frame ``i`` at ``handle + e(i / (frames - 1)) *
  (target - handle)`` with the easing ``e`` (``e(0) = 0``, ``e(1) = 1``,
  non-decreasing), so frame 0 is the handle and the last frame the target;
* a few **static** tracks (the same point on every frame) on a ``grid`` x
  ``grid`` lattice of the video frame, kept only where the moving region never
  passes: a lattice point is dropped when the mask, shifted along any pair's
  drag (17 steps from 0 to the full move), covers it. Wan-Move copies each
  track's first-frame feature along the track, so static tracks hold the
  background still. Without a mask (or an empty one) the whole image is the
  region, as for Drag Warp, and there are no static tracks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from .errors import DragInputError
from .points import DragPoints

EASINGS = ("linear", "ease_in", "ease_out", "ease_in_out")
"""Timing of the move along each track (the names of ComfyUI's Generate Video Tracks)."""

SWEEP_STEPS = 17
"""Positions along each drag at which the moving mask is tested against a static point."""

MAX_FRAMES = 1024


def ease(t: torch.Tensor, easing: str) -> torch.Tensor:
    """The fraction of the move done at times ``t`` in [0, 1] (monotone, 0 at 0 and 1 at 1)."""
    if easing == "linear":
        return t
    if easing == "ease_in":
        return t * t
    if easing == "ease_out":
        return 1 - (1 - t) ** 2
    if easing == "ease_in_out":
        return t * t * (3 - 2 * t)
    raise DragInputError(f"easing must be one of {', '.join(EASINGS)}, got {easing!r}")


@dataclass(frozen=True)
class FrameMap:
    """Source-image pixels -> video-frame pixels, as ``common_upscale(image, width, height, ..., "center")`` maps them.

    The source (``source_width`` x ``source_height``) is cropped by ``crop_x``
    columns on the left and right (or ``crop_y`` rows top and bottom) to the
    video's aspect ratio, then scaled to ``width`` x ``height``.
    """

    source_width: int
    source_height: int
    width: int
    height: int

    @property
    def crop_x(self) -> int:
        old, new = self.source_width / self.source_height, self.width / self.height
        return round((self.source_width - self.source_width * (new / old)) / 2) if old > new else 0

    @property
    def crop_y(self) -> int:
        old, new = self.source_width / self.source_height, self.width / self.height
        return round((self.source_height - self.source_height * (old / new)) / 2) if old < new else 0

    def to_video(self, xy: torch.Tensor) -> torch.Tensor:
        """``(..., 2)`` source pixel indices -> video pixel indices (pixel centres kept: ``(x + 0.5) * s - 0.5``)."""
        sx = self.width / (self.source_width - 2 * self.crop_x)
        sy = self.height / (self.source_height - 2 * self.crop_y)
        x = (xy[..., 0] + 0.5 - self.crop_x) * sx - 0.5
        y = (xy[..., 1] + 0.5 - self.crop_y) * sy - 0.5
        return torch.stack([x, y], dim=-1)

    def to_source(self, xy: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_video`."""
        sx = self.width / (self.source_width - 2 * self.crop_x)
        sy = self.height / (self.source_height - 2 * self.crop_y)
        return torch.stack([(xy[..., 0] + 0.5) / sx - 0.5 + self.crop_x,
                            (xy[..., 1] + 0.5) / sy - 0.5 + self.crop_y], dim=-1)


def drag_tracks(points: DragPoints, frames: int, width: int, height: int, easing: str = "linear",
                mask: torch.Tensor | None = None, grid: int = 4) -> tuple[torch.Tensor, int]:
    """The Wan-Move tracks of the drag pairs (module docstring).

    Args:
        points: the pairs, in pixels of the source image.
        frames: number of video frames (>= 2).
        width, height: the video frame's size (WanMoveTrackToVideo's width and height).
        easing: one of :data:`EASINGS`.
        mask: ``(H, W)`` or ``(1, H, W)`` region that moves, > 0.5 inside, at the source image's size.
        grid: side of the static-track lattice (0 = no static tracks).

    Returns:
        ``(tracks, moving)``: ``(frames, moving + static, 2)`` float64 video pixels (moving tracks first, in pair
        order), and the number of moving tracks.

    Raises:
        DragInputError: no pairs, a bad frame count, size or grid, a mask of another size, or a point that the
        centre crop leaves outside the video frame.
    """
    if points.num_pairs == 0:
        raise DragInputError("no drag pairs: place at least one handle and target")
    if not 2 <= frames <= MAX_FRAMES:
        raise DragInputError(f"frames must be between 2 and {MAX_FRAMES}, got {frames}")
    if width < 1 or height < 1:
        raise DragInputError(f"the video frame must be at least 1x1 pixels, got {width}x{height}")
    if grid < 0:
        raise DragInputError(f"grid must be >= 0, got {grid}")
    frame_map = FrameMap(points.width, points.height, int(width), int(height))
    handles = frame_map.to_video(points.handles_tensor(torch.float64))
    targets = frame_map.to_video(points.targets_tensor(torch.float64))
    for what, xy in (("handle", handles), ("target", targets)):
        for index, (x, y) in enumerate(xy.tolist()):
            if not (-0.5 <= x <= width - 0.5 and -0.5 <= y <= height - 0.5):
                raise DragInputError(
                    f"{what} {index + 1} lies outside the {width}x{height} video frame: the image "
                    f"({points.width}x{points.height}) is centre-cropped to the video's aspect ratio; pick a width "
                    "and height with the image's aspect ratio, or place the points nearer the centre"
                )
    limit = torch.tensor([width - 1, height - 1], dtype=torch.float64)
    handles, targets = handles.clamp(min=0).minimum(limit), targets.clamp(min=0).minimum(limit)
    times = ease(torch.linspace(0, 1, frames, dtype=torch.float64), easing)
    moving = handles[None] + times[:, None, None] * (targets - handles)[None]
    static = _static_points(points, frame_map, mask, grid)
    tracks = torch.cat([moving, static[None].expand(frames, -1, -1)], dim=1)
    return tracks, points.num_pairs


def _static_points(points: DragPoints, frame_map: FrameMap, mask: torch.Tensor | None, grid: int) -> torch.Tensor:
    """``(S, 2)`` video-pixel lattice points the moving region never covers (none without a mask)."""
    region = _region(mask, points.width, points.height)
    if region is None or grid == 0:
        return torch.zeros(0, 2, dtype=torch.float64)
    steps = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    ys, xs = torch.meshgrid(steps * frame_map.height - 0.5, steps * frame_map.width - 0.5, indexing="ij")
    lattice = torch.stack([xs.flatten(), ys.flatten()], dim=-1)
    source = frame_map.to_source(lattice)
    moves = points.targets_tensor(torch.float64) - points.handles_tensor(torch.float64)
    fractions = torch.linspace(0, 1, SWEEP_STEPS, dtype=torch.float64)
    # a lattice point p is covered when region[p - f * move] holds for some pair and fraction f
    probes = source[:, None, None, :] - fractions[None, None, :, None] * moves[None, :, None, :]
    col, row = probes[..., 0].round().long(), probes[..., 1].round().long()
    inside = (col >= 0) & (col < points.width) & (row >= 0) & (row < points.height)
    covered = torch.zeros_like(inside)
    covered[inside] = region[row[inside], col[inside]]
    return lattice[~covered.flatten(1).any(dim=1)]


def _region(mask: torch.Tensor | None, width: int, height: int) -> torch.Tensor | None:
    """The moving region as ``(height, width)`` bool, or None when absent or empty (the whole image moves)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3) or (mask.dim() == 3 and mask.shape[0] != 1):
        raise DragInputError(f"the mask must be one MASK (H, W) or (1, H, W), got {getattr(mask, 'shape', mask)!r}")
    values = mask.reshape(mask.shape[-2:]).detach().to("cpu", torch.float32)
    if tuple(values.shape) != (height, width):
        raise DragInputError(f"the mask is {values.shape[1]}x{values.shape[0]} but the points were placed on a "
                             f"{width}x{height} image (width x height); connect the editor's mask")
    if not torch.isfinite(values).all():
        raise DragInputError("the mask contains NaN or infinite values")
    region = values > 0.5
    return region if region.any() else None


def tracks_json(tracks: torch.Tensor, digits: int = 2) -> str:
    """``(frames, N, 2)`` tracks as WanMoveTracksFromCoords' JSON: N lists of ``frames`` ``{"x", "y"}``."""
    rows = tracks.permute(1, 0, 2).tolist()
    return json.dumps([[{"x": round(x, digits), "y": round(y, digits)} for x, y in track] for track in rows])


def check_wan_frames(frames: int) -> None:
    """Refuse a frame count Wan 2.1 cannot end on: it needs 4k + 1 frames (the VAE packs 4 frames per latent frame
    after the first, and Wan-Move reads the tracks at frames 0, 4, 8, ...), so the last frame is the target."""
    if frames < 5 or (frames - 1) % 4:
        raise DragInputError(f"frames must be 4k + 1 (5, 9, ..., 81) for Wan 2.1, got {frames}")
