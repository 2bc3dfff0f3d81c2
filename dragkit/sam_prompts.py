"""Drag handles as SAM3 point prompts, and the SAM mask combined with the painted one.

SAM3 point prompts (ComfyUI's ``SAM3_Detect``, ``positive_coords``) are JSON
``[{"x": x, "y": y}, ...]`` in **pixels of the image SAM3_Detect is given**
(it divides by that image's width and height itself). DragKit points are
``(x, y)`` pixel indices of the image they were placed on (pixel centres at
integers, ``0 <= x <= width - 1``). When SAM3 sees that same image the
coordinates pass through unchanged; when it sees a resized copy (stretched to
``width`` x ``height``, no crop), each pixel centre maps to the same place:
``x' = (x + 0.5) * width / points.width - 0.5`` (and y likewise).

The mask combination follows Inpaint4Drag's optional SAM refinement (its
``refine_mask``: the SAM mask kept only within the painted mask dilated by a
``k`` x ``k`` square, plus the painted mask eroded by the same square), next
to a plain union and a replacement.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from .errors import DragInputError
from .points import DragPoints

COMBINE_MODES = ("union", "replace", "refine (Inpaint4Drag)")
"""How the SAM mask and the painted mask combine (see :func:`combine_sam_mask`)."""

DEFAULT_KERNEL = 21
"""Inpaint4Drag's default refinement kernel (its UI's slider: 11..51, step 2)."""


def sam3_positive_points(points: DragPoints, width: int | None = None, height: int | None = None) -> list[dict]:
    """The handles as SAM3 positive points ``[{"x", "y"}, ...]``, in pixels of a ``width`` x ``height`` image.

    ``width``/``height`` are the size of the image SAM3_Detect is given (default:
    the points' own image). Integral coordinates are written as ints (the form
    ComfyUI's points editors write). Raises :class:`DragInputError` when there is
    no pair or a handle lies outside the points' image.
    """
    if points.num_pairs == 0:
        raise DragInputError("no handles: place at least one handle/target pair on the object to select")
    width = points.width if width is None else int(width)
    height = points.height if height is None else int(height)
    if width < 1 or height < 1:
        raise DragInputError(f"the image SAM3 sees must be at least 1x1 pixels, got {width}x{height}")
    prompts = []
    for index, (x, y) in enumerate(points.handles):
        if not (0 <= x <= points.width - 1 and 0 <= y <= points.height - 1):
            raise DragInputError(
                f"handle {index + 1} at ({x:g}, {y:g}) lies outside the {points.width}x{points.height} image "
                "the points were placed on"
            )
        prompts.append({"x": _number(_rescale(x, points.width, width)), "y": _number(_rescale(y, points.height, height))})
    return prompts


def sam3_points_json(points: DragPoints, width: int | None = None, height: int | None = None) -> str:
    """:func:`sam3_positive_points` as the JSON text SAM3_Detect's ``positive_coords`` takes."""
    return json.dumps(sam3_positive_points(points, width, height))


def _rescale(value: float, old: int, new: int) -> float:
    """A pixel-index coordinate of an ``old``-pixel axis on the same axis resized to ``new`` pixels."""
    if old == new:
        return float(value)
    return (value + 0.5) * new / old - 0.5


def _number(value: float) -> int | float:
    rounded = round(value, 4)
    return int(rounded) if rounded == int(rounded) else rounded


def combine_sam_mask(painted: torch.Tensor | None, sam: torch.Tensor, mode: str = "union",
                     kernel: int = DEFAULT_KERNEL) -> torch.Tensor:
    """The region to move from the painted mask and SAM3's mask, as an ``(H, W)`` float mask of 0/1.

    Args:
        painted: ``(H, W)`` or ``(1, H, W)``, > 0.5 = painted; ``None`` or all
            zero = nothing painted.
        sam: ``(H, W)`` or ``(N, H, W)`` SAM masks (N objects or one image's
            masks), > 0.5 = inside; the N masks are unioned.
        mode: ``union`` = painted OR SAM; ``replace`` = SAM alone;
            ``refine (Inpaint4Drag)`` = (SAM AND painted dilated by ``kernel``)
            OR painted eroded by ``kernel`` (square kernel; the image border
            neither grows nor erodes the mask, as OpenCV's defaults). With
            nothing painted, union and refine give the SAM mask.
        kernel: odd side of the square kernel of the refine mode (>= 1).

    Raises:
        DragInputError: unknown mode, even or non-positive kernel, shapes that
            do not match, NaN values, or an empty result where SAM found nothing
            and nothing was painted (an empty region would move the whole image).
    """
    if mode not in COMBINE_MODES:
        raise DragInputError(f"mode must be one of {', '.join(COMBINE_MODES)}, got {mode!r}")
    if kernel < 1 or kernel % 2 == 0:
        raise DragInputError(f"the kernel must be an odd number of pixels >= 1, got {kernel}")
    sam_region = _binary(sam, "the SAM mask", allow_batch=True)
    height, width = sam_region.shape
    painted_region = None if painted is None else _binary(painted, "the painted mask", allow_batch=False)
    if painted_region is not None and painted_region.shape != sam_region.shape:
        raise DragInputError(
            f"the SAM mask is {width}x{height} but the painted mask is {painted_region.shape[1]}x"
            f"{painted_region.shape[0]} (width x height); give SAM3 the image the points were placed on"
        )
    if painted_region is None or not painted_region.any() or mode == "replace":
        region = sam_region
    elif mode == "union":
        region = sam_region | painted_region
    else:
        region = (sam_region & _dilate(painted_region, kernel)) | ~_dilate(~painted_region, kernel)
    if not region.any():
        raise DragInputError(
            "SAM3 found nothing at the handles and nothing is painted, so there is no region to move: click the "
            "handles on the object, lower SAM3's threshold, or paint the region in the editor"
        )
    return region.to(torch.float32)


def _binary(mask: torch.Tensor, what: str, allow_batch: bool) -> torch.Tensor:
    """``mask`` as an ``(H, W)`` bool tensor (> 0.5); a batch is unioned when ``allow_batch``."""
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3):
        raise DragInputError(f"{what} must be a MASK (H, W) or (N, H, W), got {getattr(mask, 'shape', mask)!r}")
    if mask.dim() == 3:
        if mask.shape[0] != 1 and not allow_batch:
            raise DragInputError(f"{what} holds {mask.shape[0]} masks; connect one")
        if mask.shape[0] == 0:
            return torch.zeros(mask.shape[1:], dtype=torch.bool)
        mask = mask.amax(dim=0)
    values = mask.detach().to("cpu", torch.float32)
    if not torch.isfinite(values).all():
        raise DragInputError(f"{what} contains NaN or infinite values")
    return values > 0.5


def _dilate(region: torch.Tensor, kernel: int) -> torch.Tensor:
    """``region`` (H, W bool) dilated by a ``kernel`` x ``kernel`` square; outside the image counts as empty."""
    grown = F.max_pool2d(region[None, None].to(torch.float32), kernel, stride=1, padding=kernel // 2)
    return grown[0, 0] > 0.5
