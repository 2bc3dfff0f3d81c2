"""Putting the edit back into the source image, and drawing points for a preview.

Images here are ``(H, W, 3)`` float tensors in 0..1 (one ComfyUI IMAGE
without its batch axis); masks ``(H, W)`` with 1 = editable; points ``(x, y)``
in the image's pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import DragInputError
from .geometry import LatentGeometry

HANDLE_RGB = (0.9, 0.1, 0.1)
TARGET_RGB = (0.1, 0.3, 0.95)
ARROW_RGB = (1.0, 1.0, 1.0)


def inward_feather(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """A paste weight: 0 outside the mask, rising linearly to 1 at ``radius`` pixels inside it.

    ``mask`` is ``(H, W)``; values > 0.5 count as inside. Pixels outside the
    mask get exactly 0, so the unmasked region of the source survives
    bit-for-bit. The image border does not erode the mask. Returns float32
    ``(H, W)``.
    """
    inside = (mask > 0.5).to(torch.float32)[None, None]
    if radius <= 0:
        return inside[0, 0]
    total = torch.zeros_like(inside)
    layer = inside
    for _ in range(radius):
        total += layer
        layer = -F.max_pool2d(-layer, kernel_size=3, stride=1, padding=1)
    return (total / radius)[0, 0]


def paste_edit(source: torch.Tensor, edited: torch.Tensor, mask: torch.Tensor, feather: int) -> torch.Tensor:
    """The source image with the masked region taken from ``edited``.

    Args:
        source: ``(H, W, 3)`` original image.
        edited: the decoded result, ``(H, W, 3)`` or the VAE-cropped size
            ``(8*(H//8), 8*(W//8), 3)`` (placed where VAEEncode's centre crop
            came from).
        mask: ``(H, W)`` editable region of the source.
        feather: width in pixels of the inward blend at the mask's edge.

    Returns:
        ``(H, W, 3)``: equal to ``source`` wherever ``mask`` is 0.
    """
    height, width = source.shape[:2]
    geometry = LatentGeometry(width, height)
    full = source.clone()
    h, w = edited.shape[:2]
    if (h, w) == (height, width):
        top, left = 0, 0
    elif (h, w) == (geometry.latent_height * 8, geometry.latent_width * 8):
        top, left = geometry.crop_y, geometry.crop_x
    else:
        raise DragInputError(
            f"the decoded image is {w}x{h} but the source image is {width}x{height} (width x height); "
            "connect the source image the latent was encoded from"
        )
    full[top : top + h, left : left + w] = edited.to(source.dtype)
    weight = inward_feather(mask, feather).to(source.device, source.dtype)[..., None]
    return source * (1 - weight) + full * weight


def _segment_distance(px: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance of every pixel centre ``px`` ``(H, W, 2)`` to the segment a-b (``(2,)`` each)."""
    ab = b - a
    length2 = float((ab * ab).sum())
    if length2 == 0.0:
        return (px - a).norm(dim=-1)
    t = (((px - a) * ab).sum(-1) / length2).clamp(0, 1)
    return (px - (a + t[..., None] * ab)).norm(dim=-1)


def draw_points(image: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A copy of ``image`` ``(H, W, 3)`` with an arrow per pair: white shaft, red handle, blue target.

    ``handles`` and ``targets`` are ``(N, 2)`` ``(x, y)`` pixels of this image.
    Sizes scale with the image (about 1% of the shorter side for the dots).
    Each arrow only touches the pixels of its own bounding box.
    """
    height, width = image.shape[:2]
    out = image.clone()
    radius = max(2.0, min(height, width) / 100)
    colours = {name: torch.tensor(rgb, dtype=out.dtype, device=out.device) for name, rgb in (("h", HANDLE_RGB), ("t", TARGET_RGB), ("a", ARROW_RGB))}
    for a, b in zip(handles.to(torch.float32), targets.to(torch.float32)):
        margin = 3 * radius
        x0, x1 = max(int(min(a[0], b[0]) - margin), 0), min(int(max(a[0], b[0]) + margin) + 1, width)
        y0, y1 = max(int(min(a[1], b[1]) - margin), 0), min(int(max(a[1], b[1]) + margin) + 1, height)
        ys, xs = torch.meshgrid(torch.arange(y0, y1, dtype=torch.float32), torch.arange(x0, x1, dtype=torch.float32), indexing="ij")
        px = torch.stack([xs, ys], dim=-1)
        shaft = _segment_distance(px, a, b) <= radius * 0.35
        direction = b - a
        if float(direction.norm()) > 0:
            unit = direction / direction.norm()
            normal = torch.stack([-unit[1], unit[0]])
            for side in (normal, -normal):
                wing = b - unit * radius * 2.5 + side * radius * 1.5
                shaft |= _segment_distance(px, b, wing) <= radius * 0.35
        region = out[y0:y1, x0:x1]
        region[shaft.to(out.device)] = colours["a"]
        region[((px - a).norm(dim=-1) <= radius).to(out.device)] = colours["h"]
        region[((px - b).norm(dim=-1) <= radius).to(out.device)] = colours["t"]
    return out
