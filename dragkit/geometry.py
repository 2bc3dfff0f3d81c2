"""How source-image pixels line up with latent cells and the supervision grid.

One rule for every node, so points and masks land on the same cells whatever
node reads them:

- **Crop.** ComfyUI's VAEEncode centre-crops an image whose side is not a
  multiple of 8: it keeps ``8 * (W // 8)`` columns starting at
  ``crop_x = (W % 8) // 2`` (rows likewise). The latent covers that crop.
- **Latent grid.** Latent cell ``(i, j)`` (row, column) covers cropped pixels
  ``8i .. 8i+7`` and ``8j .. 8j+7``; latent units are pixels / 8.
- **Supervision grid.** Motion supervision and tracking work at half the image
  resolution, i.e. 4x the latent grid (256x256 for a 512x512 image). A point
  ``(x, y)`` in source pixels goes to ``round((x - crop_x) / 2)``,
  ``round((y - crop_y) / 2)`` with round-half-to-even, like the reference
  implementations' Python ``round``, clamped into the grid.
- **Latent point coordinates** (FastDrag's warp) are supervision coordinates
  / 4, kept fractional (quarter cells).
- **Mask.** 1 = editable. Masks are given in source pixels (``H x W``),
  cropped like the image, then resized: nearest to the supervision grid, and
  from there either nearest to the latent grid (motion supervision) or
  bilinearly without antialiasing to the latent grid with every cell > 0 kept
  (FastDrag's rule). An absent or all-zero mask means the whole image is
  editable (:func:`resolve_editable_mask`).

All point tensors are ``(..., 2)`` in ``(x, y)`` order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import DragInputError

LATENT_DOWNSCALE = 8
"""Pixels per latent cell along each side (SD-family VAEs)."""

SUPERVISION_PER_LATENT = 4
"""Supervision-grid cells per latent cell along each side (half image resolution)."""


@dataclass(frozen=True)
class LatentGeometry:
    """The pixel/latent/supervision layout of one ``image_width`` x ``image_height`` image."""

    image_width: int
    image_height: int

    @classmethod
    def for_latent(cls, latent_height: int, latent_width: int) -> LatentGeometry:
        """The geometry of an image that encodes exactly to a ``latent_height`` x ``latent_width`` latent."""
        return cls(latent_width * LATENT_DOWNSCALE, latent_height * LATENT_DOWNSCALE)

    @property
    def latent_width(self) -> int:
        return self.image_width // LATENT_DOWNSCALE

    @property
    def latent_height(self) -> int:
        return self.image_height // LATENT_DOWNSCALE

    @property
    def crop_x(self) -> int:
        return (self.image_width % LATENT_DOWNSCALE) // 2

    @property
    def crop_y(self) -> int:
        return (self.image_height % LATENT_DOWNSCALE) // 2

    @property
    def supervision_width(self) -> int:
        return self.latent_width * SUPERVISION_PER_LATENT

    @property
    def supervision_height(self) -> int:
        return self.latent_height * SUPERVISION_PER_LATENT

    def check_latent(self, latent_height: int, latent_width: int, what: str = "latent") -> None:
        """Raise unless a latent of this size is what this image encodes to."""
        if (latent_height, latent_width) != (self.latent_height, self.latent_width):
            raise DragInputError(
                f"a {self.image_width}x{self.image_height} image encodes to a {self.latent_width}x{self.latent_height} "
                f"latent, but the {what} is {latent_width}x{latent_height} (width x height); "
                "use the latent of the image the points and mask were made on"
            )

    def points_to_supervision(self, points_xy: torch.Tensor) -> torch.Tensor:
        """Source pixels ``(..., 2)`` -> integer-valued supervision-grid ``(x, y)`` (float tensor)."""
        offset = torch.tensor([self.crop_x, self.crop_y], dtype=torch.float64)
        grid = torch.round((points_xy.to(torch.float64) - offset) / 2)
        limit = torch.tensor([self.supervision_width - 1, self.supervision_height - 1], dtype=torch.float64)
        return torch.minimum(grid.clamp(min=0), limit).to(torch.float32)

    def points_to_latent(self, points_xy: torch.Tensor) -> torch.Tensor:
        """Source pixels ``(..., 2)`` -> latent ``(x, y)`` in quarter-cell steps (supervision / 4)."""
        return self.points_to_supervision(points_xy) / SUPERVISION_PER_LATENT

    def supervision_to_points(self, grid_xy: torch.Tensor) -> torch.Tensor:
        """Supervision-grid ``(x, y)`` ``(..., 2)`` -> source pixels (inverse of the rounding-free map)."""
        offset = torch.tensor([self.crop_x, self.crop_y], dtype=torch.float32)
        return grid_xy.to(torch.float32) * 2 + offset

    def crop_image_grid(self, mask: torch.Tensor) -> torch.Tensor:
        """Crop an ``(H, W)`` source-pixel map the way VAEEncode crops the image."""
        if tuple(mask.shape[-2:]) != (self.image_height, self.image_width):
            raise DragInputError(
                f"the mask is {mask.shape[-1]}x{mask.shape[-2]} but the image is "
                f"{self.image_width}x{self.image_height} (width x height); paint the mask on the same image"
            )
        h = self.latent_height * LATENT_DOWNSCALE
        w = self.latent_width * LATENT_DOWNSCALE
        return mask[..., self.crop_y : self.crop_y + h, self.crop_x : self.crop_x + w]

    def mask_to_supervision(self, mask: torch.Tensor) -> torch.Tensor:
        """``(H, W)`` source mask -> ``(sup_h, sup_w)`` bool mask (nearest, after the crop)."""
        cropped = self.crop_image_grid(mask).to(torch.float32)[None, None]
        size = (self.supervision_height, self.supervision_width)
        return F.interpolate(cropped, size=size, mode="nearest")[0, 0] > 0.5

    def mask_to_latent(self, mask: torch.Tensor) -> torch.Tensor:
        """``(H, W)`` source mask -> ``(h, w)`` latent bool mask (nearest from the supervision grid)."""
        sup = self.mask_to_supervision(mask).to(torch.float32)[None, None]
        return F.interpolate(sup, size=(self.latent_height, self.latent_width), mode="nearest")[0, 0] > 0.5

    def mask_to_latent_any(self, mask: torch.Tensor) -> torch.Tensor:
        """``(H, W)`` source mask -> ``(h, w)`` latent bool mask, FastDrag's rule.

        Supervision-grid mask, bilinearly resized to the latent grid without
        antialiasing; every cell with a value > 0 counts as masked (so edge
        cells the mask only touches are included).
        """
        sup = self.mask_to_supervision(mask).to(torch.float32)[None, None]
        size = (self.latent_height, self.latent_width)
        return F.interpolate(sup, size=size, mode="bilinear", align_corners=False, antialias=False)[0, 0] > 0


def resolve_editable_mask(mask: torch.Tensor | None, height: int, width: int) -> tuple[torch.Tensor, bool]:
    """The editable region as an ``(height, width)`` float mask in 0..1, and whether it was defaulted.

    ``mask`` may be ``None``, ``(H, W)`` or ``(1, H, W)`` (a ComfyUI MASK of
    one image). An absent or all-zero mask means the whole image is editable;
    the second return value is then ``True`` so the caller can say so.
    """
    if mask is None:
        return torch.ones(height, width), True
    if mask.dim() == 3:
        if mask.shape[0] != 1:
            raise DragInputError(f"expected one mask, got a batch of {mask.shape[0]}; edit one image at a time")
        mask = mask[0]
    if mask.dim() != 2:
        raise DragInputError(f"a mask must be (H, W), got shape {tuple(mask.shape)}")
    if not torch.isfinite(mask).all():
        raise DragInputError("the mask contains NaN or infinite values")
    if tuple(mask.shape) != (height, width):
        raise DragInputError(
            f"the mask is {mask.shape[1]}x{mask.shape[0]} but the image is {width}x{height} (width x height); "
            "paint the mask on the same image"
        )
    if not (mask > 0.5).any():
        return torch.ones(height, width), True
    return mask.to(torch.float32).clamp(0, 1), False


def point_pairs(
    handles: torch.Tensor, targets: torch.Tensor, unit: str, dtype: torch.dtype, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``handles`` and ``targets`` as ``(N, 2)`` tensors of ``dtype`` on ``device``, checked to be pairs of finite ``(x, y)``.

    ``unit`` names the coordinates in the messages ("pixel", "latent").
    Raises :class:`DragInputError` for another shape, ``N < 1``, NaN or
    infinite values, or unequal counts.
    """
    checked = []
    for kind, points in (("handles", handles), ("targets", targets)):
        points = torch.as_tensor(points).detach().to(device=device, dtype=dtype)
        if points.dim() != 2 or points.shape[1] != 2 or points.shape[0] < 1:
            raise DragInputError(
                f"{kind} must be an (N, 2) tensor of {unit} (x, y) with N >= 1, got shape {tuple(points.shape)}"
            )
        if not bool(torch.isfinite(points).all()):
            raise DragInputError(f"{kind} contain NaN or infinite coordinates")
        checked.append(points)
    handles, targets = checked
    if handles.shape[0] != targets.shape[0]:
        raise DragInputError(f"{handles.shape[0]} handles but {targets.shape[0]} targets; every handle needs a target")
    return handles, targets
