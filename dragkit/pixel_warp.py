"""Inpaint4Drag's bidirectional pixel warp, in pure torch on the image's device.

The masked regions of an image move along the drag vectors in pixel space;
the returned inpaint mask says what an inpainting model must fill: what the
move uncovered, plus a band along the moved regions' edges
(``../shared/METHODS.md``, "Warp and inpaint"; where we differ from the
released code: ``docs/pixel-warp.md``).

Conventions
-----------
- Images are ComfyUI IMAGE tensors ``(B, H, W, C)``; every image of the batch
  gets the same warp (the points and mask belong to all of them).
- Points are ``(N, 2)`` tensors of pixel ``(x, y)``: x the column, y the row.
  Pixel ``(row, col)`` has its centre at ``(x, y) = (col, row)``; its corners
  are at half-integer coordinates.
- Masks are ``(H, W)`` tensors indexed ``[row, col]``; True (or > 0.5) means
  editable.
- "Raster order" is top to bottom, then left to right.

The algorithm (one region at a time, bottom-up: in the reverse order of each
region's first pixel in raster order, which is the order OpenCV lists the
release's contours in; a later region's paste overwrites an earlier one's, so
where targets overlap the upper region wins):

1. **Regions**: the 8-connected components of the mask after filling its
   holes (what filling OpenCV's external contours gives; the background is
   4-connected). A region's handles are the handles whose nearest pixel
   (``round``, half to even) is one of its pixels. A region without a handle
   stays where it is; a handle outside every region moves nothing.
2. **Forward**: the displacement of a point ``p`` is the inverse-distance
   weighted mean ``sum_k w_k d_k`` over its ``k = 4`` nearest handles of the
   region (fewer if fewer), ``w_k ~ 1/(|p - h_k| + 1e-6)``, ``d_k = t_k - h_k``.
   Every region pixel goes to ``round(p + IDW(p))``. The region's contour is
   the closed chain of pixel edges around it; each of its corners goes to
   the nearest corner of ``p + IDW(p)``, and the **target region** is the
   even-odd fill of the moved chain (pixel centres inside it), clipped to the
   image.
3. **Backward** (no holes): every target pixel ``q`` takes its colour from
   ``round(q + b(q))``, where ``b`` is the same IDW over the ``k = 4``
   nearest moved region pixels of the vectors taking each moved pixel back
   to its source. ``exact`` uses all moved pixels (exact nearest neighbours
   on an integer grid, :func:`grid_idw`; ties at equal distance go to the
   smaller ``(dy, dx)`` offset, then the earlier source pixel in raster
   order); ``as_released`` uses 100 of them picked by raster index
   (``linspace``), nearest first as ``topk`` orders them
   (:func:`released_idw`, also its forward map). A target pixel whose source
   lies outside the image is left as it is (its own colour, or an earlier
   region's paste) and joins the inpaint mask.
4. **Inpaint mask** = ``dilate(S and not T, k x k) or band(T, k) or
   (target pixels without a source)``, with ``S``/``T`` the unions of the
   moved regions' sources/targets and ``band`` the moved contour drawn as
   OpenCV draws a line ``k`` thick: the lattice disc ``dx^2 + dy^2 <= r^2``,
   ``r = (k + 1) / 2`` (``k = 1``: ``r = 0``, the pixel itself), around every
   boundary pixel (a 4-neighbour outside) of every target region that has a
   pixel in the image. The boundary is taken on the target before clipping
   (:func:`fill_polygons` on the image grown by ``r + 1``), so the band runs
   along the image border where a target ends there, and not where the
   border cut it. ``k = 0``: no dilation and no band; an even ``k`` is raised
   to the next odd one (as released). Both ``neighbours`` options use this
   band.

Precision: the geometry is float32 and int64 on the image's device (pixel
coordinates up to 16384 are exact in float32); colours are gathered, never
mixed, so the image keeps its dtype and values bit for bit.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import DragInputError
from .geometry import point_pairs

NEIGHBOURS = ("exact", "as_released")
"""Reference pixels of the backward map: all moved pixels (exact) or 100 of them (as released)."""

NEAREST = 4
"""``k`` of the inverse-distance interpolation (nearest handles, nearest moved pixels)."""

IDW_EPS = 1e-6
"""Added to distances in the inverse-distance weights (as released)."""

RELEASED_REFERENCES = 100
"""Moved pixels the released backward map subsamples to (by raster index)."""

DEFAULT_BAND = 5
"""Default ``k``: the dilation kernel and the thickness of the moved contour, in pixels."""

_CHUNK_ELEMENTS = 1 << 22
"""Most ``queries x candidates`` pairs one distance/gather step holds at once."""

_FEW_REFERENCES = 16
"""Up to this many references :func:`released_idw` compares every point with every one."""

_TILE = 4
"""Side of the tiles :func:`_tiled_nearest` bins points into, in pixels."""

_NARROW = 8
"""Tiles with at most this many candidates are searched in a narrower batch of their own (most of them)."""

_MAX_OFFSETS = 1 << 16
"""Largest neighbour disc :func:`grid_idw` searches before it compares the remaining queries with every reference."""

_CROSS = ((-1, 0), (1, 0), (0, -1), (0, 1))


@dataclass(frozen=True)
class PixelWarp:
    """The result of :func:`pixel_warp`.

    Attributes:
        image: ``(B, H, W, C)`` warped images, same dtype and device as the input.
        inpaint_mask: ``(H, W)`` bool, True where the inpainting model must paint.
        source_mask: ``(H, W)`` bool union of the regions that moved.
        target_mask: ``(H, W)`` bool union of where they landed (clipped to the image).
        moved_pairs: indices of the pairs whose handle lies in a region (they moved it).
        ignored_pairs: indices of the pairs whose handle lies outside every region.
        still_regions: how many regions have no handle (they stay where they are).
    """

    image: torch.Tensor
    inpaint_mask: torch.Tensor
    source_mask: torch.Tensor
    target_mask: torch.Tensor
    moved_pairs: tuple[int, ...]
    ignored_pairs: tuple[int, ...]
    still_regions: int


def pixel_warp(
    image: torch.Tensor,
    mask: torch.Tensor | None,
    handles: torch.Tensor,
    targets: torch.Tensor,
    band: int = DEFAULT_BAND,
    neighbours: str = "exact",
) -> PixelWarp:
    """Warp the masked regions of ``image`` along the drag vectors (module docstring, steps 1-4).

    Args:
        image: ``(B, H, W, C)`` images, any dtype and device.
        mask: ``(H, W)`` editable region (bool, or > 0.5); ``None`` or empty:
            the whole image is one region.
        handles, targets: ``(N, 2)`` pixel ``(x, y)``; handles inside the
            image, targets at most one image side outside it (what lands
            outside the image is clipped).
        band: ``k`` of the inpaint mask (>= 0; even values become the next odd).
        neighbours: ``exact`` or ``as_released`` (the backward map's references).

    Returns:
        :class:`PixelWarp`.

    Raises:
        DragInputError: bad shapes or values, a handle outside the image, or
            no handle inside any region.
    """
    if neighbours not in NEIGHBOURS:
        raise DragInputError(f"unknown neighbours option {neighbours!r}; choose one of {', '.join(NEIGHBOURS)}")
    if isinstance(band, bool) or not isinstance(band, int) or band < 0:
        raise DragInputError(f"band must be a whole number >= 0, got {band!r}")
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or min(image.shape) < 1:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise DragInputError(f"the image must be a (B, H, W, C) tensor with every side >= 1, got {shape}")
    batch, height, width, channels = image.shape
    device = image.device
    handles, targets = _checked_pairs(handles, targets, height, width, device)
    editable = _checked_mask(mask, height, width, device)

    labels, region_count = region_labels(editable)
    handle_pixels = torch.round(handles).long()
    handle_labels = labels[handle_pixels[:, 1], handle_pixels[:, 0]]
    inside = handle_labels >= 0
    if not bool(inside.any()):
        raise DragInputError(
            "no handle lies inside the mask, so nothing moves; paint the mask over the parts to move "
            "(or remove the mask: the whole image is then one region)"
        )
    region_ids = torch.unique(handle_labels[inside]).tolist()

    flat = height * width
    index = torch.arange(flat, device=device)
    no_source = torch.zeros(flat, dtype=torch.bool, device=device)
    sources = torch.zeros(height, width, dtype=torch.bool, device=device)
    landed = torch.zeros_like(sources)
    kernel = released_band(band)
    reach = band_radius(kernel)
    margin = reach + 1 if kernel else 0
    edges = torch.zeros(height + 2 * margin, width + 2 * margin, dtype=torch.bool, device=device)
    drags = targets - handles
    rows, cols = torch.nonzero(editable.any(1)).flatten(), torch.nonzero(editable.any(0)).flatten()
    area = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))  # every region's box (holes filled inside it)
    for region_id in sorted(region_ids, reverse=True):  # OpenCV's contour order: the upper region is pasted last
        region = labels[area] == region_id
        chosen = handle_labels == region_id
        box, top, left, queries, source_xy = _move_region(
            region, (area[1].start, area[0].start), (height, width), handles[chosen], drags[chosen], neighbours, margin
        )
        sources[area] |= region
        if queries.shape[0] == 0:
            continue
        landed.view(-1).index_fill_(0, queries[:, 1] * width + queries[:, 0], True)
        if kernel:
            rows, cols = box.shape
            edges[top + margin : top + margin + rows, left + margin : left + margin + cols] |= _boundary(box)
        valid = (
            (source_xy[:, 0] >= 0) & (source_xy[:, 0] < width) & (source_xy[:, 1] >= 0) & (source_xy[:, 1] < height)
        )
        query_flat = queries[:, 1] * width + queries[:, 0]
        if bool(valid.all()):
            index.index_copy_(0, query_flat, source_xy[:, 1] * width + source_xy[:, 0])
        else:
            index.index_copy_(0, query_flat[valid], source_xy[valid, 1] * width + source_xy[valid, 0])
        no_source.index_copy_(0, query_flat, ~valid)

    pasted = torch.nonzero(landed.view(-1)).flatten()
    colours = image.reshape(batch, flat, channels)
    warped = colours.clone().index_copy_(1, pasted, colours.index_select(1, _take(index, pasted))).reshape(image.shape)
    uncovered = sources & ~landed
    if kernel:
        band_mask = _dilated_in_box(edges, reach, functools.partial(dilate_disc, radius=reach))
        uncovered = _dilated_in_box(uncovered, kernel // 2, functools.partial(dilate, kernel=kernel))
        uncovered |= band_mask[margin : margin + height, margin : margin + width]
    inpaint = uncovered | no_source.reshape(height, width)
    return PixelWarp(
        image=warped,
        inpaint_mask=inpaint,
        source_mask=sources,
        target_mask=landed,
        moved_pairs=tuple(torch.nonzero(inside).flatten().tolist()),
        ignored_pairs=tuple(torch.nonzero(~inside).flatten().tolist()),
        still_regions=region_count - len(region_ids),
    )


def _move_region(
    region: torch.Tensor,
    origin: tuple[int, int],
    size: tuple[int, int],
    handles: torch.Tensor,
    drags: torch.Tensor,
    neighbours: str,
    margin: int,
) -> tuple[torch.Tensor, int, int, torch.Tensor, torch.Tensor]:
    """Forward and backward map of one region.

    Args:
        region: ``(h, w)`` bool, one region, in a part of the image whose top-left pixel is ``origin``
            ``(x, y)``; the image is ``size`` ``(H, W)``.
        handles, drags: ``(n, 2)`` float32 pixel ``(x, y)`` handles of the region and ``t - h``.
        neighbours: see :func:`pixel_warp`.
        margin: how far past each image side the target is filled, in pixels.

    Returns:
        ``(box, top, left, queries, sources)``: the target region in the
        box of rows ``top..`` and columns ``left..`` of the image grown by
        ``margin`` (``(h, w)`` bool; the target's own edge, not the image
        border, bounds it within ``margin`` of the image), the target pixels
        inside the image ``(Q, 2)`` int64 ``(x, y)`` in raster order, and each
        one's source pixel ``(Q, 2)`` int64 (possibly outside the image).
    """
    height, width = size
    local = _xy(region)
    low, high = local.min(0).values, local.max(0).values
    corners, chain = contour_edges(region[int(low[1]) : int(high[1]) + 1, int(low[0]) : int(high[0]) + 1])
    offset = local.new_tensor(origin)
    pixels = local + offset
    corners = corners + (low + offset).float()
    if neighbours == "exact":
        displacement, handle_distance = _idw(pixels.float(), handles, drags, NEAREST)
        moved = torch.round(pixels.float() + displacement).long()
        moved_corners = corners + idw(corners, handles, drags)
    else:
        moved = torch.round(pixels.float() + released_idw(pixels.float(), handles, drags)).long()
        moved_corners = corners + released_idw(corners, handles, drags)
    moved_corners = torch.round(moved_corners + 0.5) - 0.5
    (left, top), (right, bottom) = (moved_corners.min(0).values + 0.5).long().tolist(), (moved_corners.max(0).values + 0.5).long().tolist()
    top, left = max(top, -margin), max(left, -margin)
    bottom, right = min(bottom, height + margin), min(right, width + margin)
    empty = pixels.new_zeros(0, 2)
    if bottom <= top or right <= left:
        return torch.zeros(0, 0, dtype=torch.bool, device=region.device), top, left, empty, empty
    shift = moved_corners.new_tensor([left, top])
    start, end = _take(moved_corners, chain[:, 0]) - shift, _take(moved_corners, chain[:, 1]) - shift
    box = fill_polygons(start, end, bottom - top, right - left)
    row, col = max(top, 0), max(left, 0)
    inside = box[row - top : min(bottom, height) - top, col - left : min(right, width) - left]
    queries = _xy(inside) + pixels.new_tensor([col, row]) if inside.numel() else empty
    back = pixels - moved
    if queries.shape[0] == 0:
        source = empty
    elif neighbours == "exact":
        source = exact_sources(queries, moved, back, handle_distance)
    else:
        source = torch.round(queries.float() + released_idw(queries.float(), moved.float(), back.float())).long()
    return box, top, left, queries, source


# ---------------------------------------------------------------- regions


def connected_components(mask: torch.Tensor, connectivity: int = 8) -> torch.Tensor:
    """Label the connected components of a ``(H, W)`` bool mask.

    Works on runs (the consecutive set pixels of a row): a run touches the
    runs of the next row whose column spans overlap its own (with
    8-connectivity: its own grown by one column, for the diagonal
    neighbours); those form a contiguous range of that row's runs, found by
    binary search. The runs' components come from min-label propagation
    along these pairs with pointer jumping (each run starts with its own
    index and takes the smallest label among its pairs, then its label's
    label), until nothing changes; every pixel then takes its run's label.

    Args:
        mask: ``(H, W)`` bool.
        connectivity: 8 (with diagonals) or 4.

    Returns:
        ``(H, W)`` int64: each component's pixels hold the raster index of
        its first pixel; -1 outside the mask.
    """
    height, width = mask.shape
    device = mask.device
    padded = F.pad(mask, (1, 1), value=False)
    first = torch.nonzero((mask & ~padded[:, :-2]).reshape(-1)).flatten()  # raster index of each run's first pixel
    last = torch.nonzero((mask & ~padded[:, 2:]).reshape(-1)).flatten()
    if first.numel() == 0:
        return torch.full((height, width), -1, dtype=torch.long, device=device)
    row = torch.div(first, width, rounding_mode="floor")
    stride = width + 2  # keys row * stride + column + 1: a column grown by one stays within its row
    start_key, end_key = first + 2 * row + 1, last + 2 * row + 1
    grow = 1 if connectivity == 8 else 0
    low = torch.searchsorted(end_key, start_key + stride - grow)  # the first next-row run ending at or after the span
    high = torch.searchsorted(start_key, end_key + stride + grow, right=True)  # past the last one starting within it
    count = (high - low).clamp(min=0)
    runs = torch.arange(first.numel(), device=device)
    upper = torch.repeat_interleave(runs, count)
    lower = _take(low, upper) + torch.arange(upper.numel(), device=device) - _take(torch.cumsum(count, 0) - count, upper)
    label = runs
    while True:
        smallest = torch.minimum(_take(label, upper), _take(label, lower))
        update = label.scatter_reduce(0, upper, smallest, reduce="amin").scatter_reduce_(0, lower, smallest, reduce="amin")
        update = _take(update, _take(update, update))
        if torch.equal(update, label):
            break
        label = update
    run = torch.cumsum(torch.zeros(height * width, dtype=torch.long, device=device).index_fill_(0, first, 1), 0) - 1
    return torch.where(mask.reshape(-1), _take(_take(first, label), run.clamp(min=0)), -1).reshape(height, width)


def fill_holes(mask: torch.Tensor) -> torch.Tensor:
    """``(H, W)`` bool mask with every background area the image border cannot reach (4-connected) set."""
    outside = connected_components(F.pad(~mask, (1, 1, 1, 1), value=True), connectivity=4) == 0
    return ~outside[1:-1, 1:-1]


def region_labels(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Regions of a ``(H, W)`` bool mask: 8-connected components of the hole-filled mask.

    Works on the mask's bounding box.

    Returns:
        ``(labels, count)``: ``(H, W)`` int64 labels, equal within a region
        and ordered like the regions' first pixels in raster order, -1
        outside every region; and the number of regions.
    """
    height, width = mask.shape
    if bool(mask.all()):
        return torch.zeros(height, width, dtype=torch.long, device=mask.device), 1
    labels = torch.full((height, width), -1, dtype=torch.long, device=mask.device)
    rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
    if rows.numel() == 0:
        return labels, 0
    box = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
    crop = connected_components(mask[box], connectivity=8)
    index = torch.arange(crop.numel(), device=mask.device)
    count = int((crop.reshape(-1) == index).sum())
    if count != euler_number(mask[box]):  # holes: label the filled mask instead
        crop = connected_components(fill_holes(mask[box]), connectivity=8)
        count = int((crop.reshape(-1) == index).sum())
    labels[box] = crop
    return labels, count


def euler_number(mask: torch.Tensor) -> int:
    """Components minus holes of a ``(H, W)`` bool mask (8-connected set, 4-connected background).

    Counted from its 2 x 2 windows (the mask padded by one unset pixel):
    ``(Q1 - Q3 - 2 QD) / 4`` with ``Q1``/``Q3`` the windows holding one/three
    set pixels and ``QD`` those holding two diagonal ones (Gray, 1971).
    """
    padded = F.pad(mask, (1, 1, 1, 1), value=False).to(torch.uint8)
    a, b, c, d = padded[:-1, :-1], padded[:-1, 1:], padded[1:, :-1], padded[1:, 1:]
    total = a + b + c + d
    ones, threes = int((total == 1).sum()), int((total == 3).sum())
    diagonal = int(((total == 2) & (a == d)).sum())
    return (ones - threes - 2 * diagonal) // 4


# ---------------------------------------------------------------- contours and fill


def contour_edges(region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixel edges between a region and the rest (the image border counts as outside).

    Args:
        region: ``(H, W)`` bool.

    Returns:
        ``(corners, chain)``: ``(K, 2)`` float32 pixel ``(x, y)`` of the
        corners used (half-integers) and ``(E, 2)`` int64 indices into
        ``corners`` of each edge's two ends. The edges form closed chains, and
        the pixel centres inside them (even-odd) are exactly the region.
    """
    height, width = region.shape
    padded = F.pad(region, (1, 1, 1, 1), value=False)
    vertical = padded[1:-1, 1:] != padded[1:-1, :-1]  # (H, W+1): edge left of column j, rows i..i+1
    horizontal = padded[1:, 1:-1] != padded[:-1, 1:-1]  # (H+1, W): edge above row i, columns j..j+1
    stride = width + 1
    rows, cols = torch.nonzero(vertical, as_tuple=True)
    vertical_ends = torch.stack([rows * stride + cols, (rows + 1) * stride + cols], dim=1)
    rows, cols = torch.nonzero(horizontal, as_tuple=True)
    horizontal_ends = torch.stack([rows * stride + cols, rows * stride + cols + 1], dim=1)
    used, chain = torch.unique(torch.cat([vertical_ends, horizontal_ends]), return_inverse=True)
    corners = torch.stack([used % stride, torch.div(used, stride, rounding_mode="floor")], dim=1).float() - 0.5
    return corners, chain


def fill_polygons(start: torch.Tensor, end: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Even-odd fill of closed polygons given as edges, sampled at pixel centres, clipped to the image.

    Scanline rasterisation: each edge crossing the row through pixel centres
    ``y = r`` toggles every pixel to the right of the crossing; a pixel is
    inside when it was toggled an odd number of times. Edges are half-open
    in y (``min(y0, y1) <= r < max(y0, y1)``); with corners on the
    half-integer lattice no vertex lies on a scanline.

    Args:
        start, end: ``(E, 2)`` float pixel ``(x, y)`` of every edge's ends.
        height, width: the image size.

    Returns:
        ``(height, width)`` bool.
    """
    device = start.device
    x0, y0, x1, y1 = start[:, 0], start[:, 1], end[:, 0], end[:, 1]
    first = torch.ceil(torch.minimum(y0, y1)).long().clamp(min=0)
    last = (torch.ceil(torch.maximum(y0, y1)).long() - 1).clamp(max=height - 1)
    counts = (last - first + 1).clamp(min=0)
    edge = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts)
    offsets = torch.cumsum(counts, 0) - counts
    rows = _take(first, edge) + torch.arange(edge.numel(), device=device) - _take(offsets, edge)
    ex0, ey0 = _take(x0, edge), _take(y0, edge)
    crossing = ex0 + (rows - ey0) * (_take(x1, edge) - ex0) / (_take(y1, edge) - ey0)
    columns = (torch.floor(crossing).long() + 1).clamp(0, width)
    toggles = torch.zeros(height * (width + 1), dtype=torch.int32, device=device)
    toggles.index_add_(0, rows * (width + 1) + columns, torch.ones_like(columns, dtype=torch.int32))
    parity = torch.cumsum(toggles.reshape(height, width + 1), dim=1, dtype=torch.int32)[:, :width] & 1
    return parity.bool()


def _boundary(region: torch.Tensor) -> torch.Tensor:
    """Pixels of ``region`` with a 4-neighbour that is not in it (past the array's edge counts as not in it)."""
    height, width = region.shape
    padded = F.pad(region, (1, 1, 1, 1), value=False)
    edge = torch.zeros_like(region)
    for dy, dx in _CROSS:
        edge |= ~padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
    return region & edge


def dilate(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """``(H, W)`` bool mask dilated by a ``kernel x kernel`` square (odd ``kernel``): shifted ORs, rows then columns."""
    for dim in (1, 0):
        mask = _grow(mask, dim, kernel // 2)
    return mask


def band_radius(kernel: int) -> int:
    """How far OpenCV's line of odd thickness ``kernel`` reaches from its centre line, in pixels.

    A line thicker than 1 is a rectangle of half-width ``kernel / 2 + 0.5``
    with a filled circle of radius ``(kernel + 1) // 2`` on every vertex;
    thickness 1 (or 0) is the one-pixel line itself (radius 0).
    """
    return (kernel + 1) // 2 if kernel > 1 else 0


def dilate_disc(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """``(H, W)`` bool mask dilated by the lattice disc ``dx^2 + dy^2 <= radius^2`` (OpenCV's filled circle).

    Each row of the disc is a horizontal run of half-width ``isqrt(radius^2 - dy^2)``:
    rows grown one column at a time, then ORed in shifted by ``dy``.
    """
    if radius == 0:
        return mask
    height = mask.shape[0]
    grown = [mask]
    for _ in range(radius):
        grown.append(_grow(grown[-1], 1, 1))
    out = grown[radius].clone()
    for dy in range(1, min(radius, height - 1) + 1):
        run = grown[math.isqrt(radius * radius - dy * dy)]
        out[dy:].logical_or_(run[: height - dy])
        out[: height - dy].logical_or_(run[dy:])
    return out


def _dilated_in_box(mask: torch.Tensor, reach: int, dilation) -> torch.Tensor:
    """``dilation(mask)`` for a dilation reaching ``reach`` pixels, computed inside the set pixels' box grown by ``reach``."""
    rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
    if rows.numel() == 0:
        return mask
    height, width = mask.shape
    top, left = max(int(rows[0]) - reach, 0), max(int(cols[0]) - reach, 0)
    bottom, right = min(int(rows[-1]) + reach + 1, height), min(int(cols[-1]) + reach + 1, width)
    out = torch.zeros_like(mask)
    out[top:bottom, left:right] = dilation(mask[top:bottom, left:right])
    return out


def _grow(mask: torch.Tensor, dim: int, reach: int) -> torch.Tensor:
    """``mask`` ORed with itself shifted by ``1..reach`` both ways along ``dim`` (a ``1 x (2 reach + 1)`` square)."""
    size = mask.shape[dim]
    grown = mask.clone()
    for step in range(1, min(reach, size - 1) + 1):
        grown.narrow(dim, step, size - step).logical_or_(mask.narrow(dim, 0, size - step))
        grown.narrow(dim, 0, size - step).logical_or_(mask.narrow(dim, step, size - step))
    return grown


# ---------------------------------------------------------------- inverse-distance interpolation


def idw(points: torch.Tensor, references: torch.Tensor, vectors: torch.Tensor, k: int = NEAREST) -> torch.Tensor:
    """``sum_j w_j v_j`` over each point's ``k`` nearest references, ``w_j ~ 1/(|p - r_j| + 1e-6)``.

    Compares every point with every reference (for the handles, and the
    released 100-reference backward map). Ties at equal distance go to the
    earlier reference.

    Args:
        points: ``(P, 2)`` float ``(x, y)``.
        references: ``(R, 2)`` float ``(x, y)``, ``R >= 1``.
        vectors: ``(R, 2)`` float.
        k: neighbours (``min(k, R)`` are used).

    Returns:
        ``(P, 2)`` float32 interpolated vectors.
    """
    return _idw(points, references, vectors, k)[0]


def _idw(points: torch.Tensor, references: torch.Tensor, vectors: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`idw`, and each point's ``(P,)`` float32 distance to its nearest reference."""
    references, vectors = references.float(), vectors.float()
    nearest = min(k, references.shape[0])
    rows = max(1, _CHUNK_ELEMENTS // references.shape[0])
    values, closest = [], []
    for chunk in points.float().split(rows):
        distance = torch.hypot(chunk[:, None, 0] - references[:, 0], chunk[:, None, 1] - references[:, 1])
        if nearest == references.shape[0]:
            weights = 1 / (distance + IDW_EPS)
            chosen = vectors[None]
        else:
            order = torch.argsort(distance, dim=1, stable=True)[:, :nearest]
            weights = 1 / (distance.gather(1, order) + IDW_EPS)
            chosen = _take(vectors, order)
        weights = weights / weights.sum(1, keepdim=True)
        values.append(_weighted_sum(weights, chosen))
        closest.append(distance.min(1).values)
    if not values:
        return points.new_zeros(0, 2, dtype=torch.float32), points.new_zeros(0, dtype=torch.float32)
    return torch.cat(values), torch.cat(closest)


def released_idw(points: torch.Tensor, references: torch.Tensor, vectors: torch.Tensor, k: int = NEAREST) -> torch.Tensor:
    """:func:`idw` as the released code computes it, for ``neighbours="as_released"``.

    More than :data:`RELEASED_REFERENCES` references are first subsampled
    by raster index (``linspace`` over their indices, truncated). The
    ``min(k, R)`` nearest references are taken nearest first and their
    weighted vectors summed in that order (what ``topk`` then ``sum`` give).
    The release's distances come from ``torch.cdist`` (a matrix product,
    a little off the exact ones); ours are exact, so a pixel may differ where
    two references lie at almost the same distance or a sum lands within
    float error of a ``.5`` rounding (``docs/pixel-warp.md``).

    Where references lie at equal distances among the ``k`` nearest (not at
    the ``k``-th), ``topk``'s order among them only changes the order of
    the sum (equal distances, equal weights): in the last bits. Those rows
    keep the order found; the ones whose value lies within that error
    (``2^-19`` of the points' and vectors' magnitude) of a half-integer, where
    ``round(p + value)`` could change for a point ``p`` on the integer or
    half-integer lattice (pixels, pixel corners), are ranked by ``topk``.

    Args:
        points: ``(P, 2)`` float32 ``(x, y)`` (integer or half-integer
            values, for the rounding guarantee above).
        references: ``(R, 2)`` float32 ``(x, y)``, ``R >= 1``.
        vectors: ``(R, 2)`` float32.
        k: neighbours.

    Returns:
        ``(P, 2)`` float32 interpolated vectors (the one vector itself when ``R = 1``).
    """
    if points.shape[0] == 0:
        return points.new_zeros(0, 2)
    if references.shape[0] == 1:
        return vectors.float().expand(points.shape[0], 2)
    if references.shape[0] > RELEASED_REFERENCES:
        pick = torch.linspace(0, references.shape[0] - 1, RELEASED_REFERENCES, device=references.device).long()
        references, vectors = references.index_select(0, pick), vectors.index_select(0, pick)
    nearest = min(k, references.shape[0])
    if references.shape[0] <= nearest:
        distance, order = _ranked_all(points, references)
    elif references.shape[0] <= _FEW_REFERENCES:
        distance = torch.hypot(points[:, None, 0] - references[:, 0], points[:, None, 1] - references[:, 1])
        distance, order = torch.topk(distance, nearest, dim=1, largest=False)
    else:
        distance, order, unsettled = _tiled_nearest(points, references, nearest)
        weights = 1.0 / (distance + IDW_EPS)
        weights = weights / weights.sum(dim=1, keepdim=True)
        value = _weighted_sum(weights, _take(vectors, order))
        if unsettled.numel():  # ties among the k nearest, summed in the order found
            part = value.index_select(0, unsettled)
            scale = points.index_select(0, unsettled).abs().amax(1) + vectors.abs().max() + 1
            off_half = (part - torch.floor(part) - 0.5).abs().amin(1)
            close = unsettled[off_half <= scale * 2.0**-19]
            if close.numel():  # near a rounding: the order topk gives (the same distances, so the same weights)
                _rank_ties_with_topk(points, references, close, distance, order)
                value.index_copy_(0, close, _weighted_sum(weights.index_select(0, close), _take(vectors, order.index_select(0, close))))
        return value
    weights = 1.0 / (distance + IDW_EPS)
    weights = weights / weights.sum(dim=1, keepdim=True)
    return _weighted_sum(weights, _take(vectors, order))


def _ranked_all(points: torch.Tensor, references: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every reference of each point, nearest first, as ``topk`` of all of them ranks them (a few references).

    An odd-even transposition sort, elementwise over the points (``topk``
    along rows of two to four is slow); points with two references at the
    same distance are ranked by ``topk`` itself, whose order among equals the
    summation order then follows.

    Returns:
        ``(distance, order)``: ``(P, R)`` float32 and int64.
    """
    count = references.shape[0]
    value = [torch.hypot(points[:, 0] - references[j, 0], points[:, 1] - references[j, 1]) for j in range(count)]
    index = [torch.full_like(value[0], j, dtype=torch.long) for j in range(count)]
    for step in range(count):
        for j in range(step % 2, count - 1, 2):
            swap = value[j + 1] < value[j]
            value[j], value[j + 1] = torch.where(swap, value[j + 1], value[j]), torch.where(swap, value[j], value[j + 1])
            index[j], index[j + 1] = torch.where(swap, index[j + 1], index[j]), torch.where(swap, index[j], index[j + 1])
    distance, order = torch.stack(value, 1), torch.stack(index, 1)
    _rank_ties_with_topk(points, references, torch.nonzero((distance[:, 1:] == distance[:, :-1]).any(1)).flatten(), distance, order)
    return distance, order


def _rank_ties_with_topk(
    points: torch.Tensor, references: torch.Tensor, tied: torch.Tensor, distance: torch.Tensor, order: torch.Tensor
) -> None:
    """Rows ``tied`` of ``(distance, order)`` (``(P, k)``) replaced by ``topk`` over every reference.

    ``topk``'s order among equal distances depends on the whole row, and that
    order is the summation order of the weighted vectors: such rows are ranked
    on the whole row, as the release ranks them.
    """
    if tied.numel():
        again = points.index_select(0, tied)
        full = torch.hypot(again[:, None, 0] - references[:, 0], again[:, None, 1] - references[:, 1])
        full_distance, full_order = torch.topk(full, distance.shape[1], dim=1, largest=False)
        distance.index_copy_(0, tied, full_distance)
        order.index_copy_(0, tied, full_order)


def _tiled_nearest(points: torch.Tensor, references: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` nearest references of each point, nearest first, searching only near each point's tile.

    The points are binned into :data:`_TILE` x :data:`_TILE` tiles. A
    reference among the ``k`` nearest of a point ``q`` of a tile with centre
    ``c`` and half-diagonal ``h`` lies within ``d_k(q) <= d_k(c) + h`` of
    ``q``, so within ``d_k(c) + 2h`` of ``c``: only those (plus one pixel for
    float error) are compared, typically a sixth of them.

    Args:
        points: ``(P, 2)`` float32 integer-valued ``(x, y)``.
        references: ``(R, 2)`` float32, ``R >= k``.

    Returns:
        ``(distance, order, unsettled)``: ``(P, k)`` float32 distances and
        int64 reference indices; rows with equal distances at the ``k``-th
        are ranked by ``topk`` over every reference (:func:`_rank_ties_with_topk`),
        and ``unsettled`` ``(U,)`` int64 lists the rows with equal distances
        only among the ``k`` nearest (ranked in the order found).
    """
    low = points.min(0).values
    tile = torch.div(points - low, _TILE, rounding_mode="floor").long()
    columns = int(tile[:, 0].max()) + 1
    cell = tile[:, 1] * columns + tile[:, 0]
    occupied = torch.bincount(cell, minlength=(int(tile[:, 1].max()) + 1) * columns) > 0
    used = torch.nonzero(occupied).flatten()  # the tiles holding points
    which = _take(torch.cumsum(occupied, 0) - 1, cell)  # each point's tile among them
    centres = low + (torch.stack([used % columns, torch.div(used, columns, rounding_mode="floor")], 1).float() + 0.5) * _TILE - 0.5
    to_centre = torch.hypot(centres[:, None, 0] - references[:, 0], centres[:, None, 1] - references[:, 1])
    reach = torch.topk(to_centre, k, dim=1, largest=False).values[:, -1] + _TILE * math.sqrt(2) + 1
    near = to_centre <= reach[:, None]
    counts = near.sum(1)
    width = int(counts.max())
    tile_of, near_reference = torch.nonzero(near, as_tuple=True)  # by tile, then reference index
    slot = tile_of * width + torch.arange(tile_of.numel(), device=points.device) - _take(torch.cumsum(counts, 0) - counts, tile_of)
    candidates = torch.zeros(used.numel() * width, dtype=torch.long, device=points.device).index_copy_(0, slot, near_reference)
    candidates = candidates.reshape(-1, width)  # each tile's references, ascending, then 0 (unusable)
    usable = torch.zeros(used.numel() * width, dtype=torch.bool, device=points.device).index_fill_(0, slot, True).reshape(-1, width)
    reference_x, reference_y = references[:, 0].contiguous(), references[:, 1].contiguous()
    distance = points.new_empty(points.shape[0], k)
    order = torch.empty(points.shape[0], k, dtype=torch.long, device=points.device)
    unsettled = []
    narrow = _take(counts, which) <= _NARROW
    for group, columns in ((torch.nonzero(narrow).flatten(), min(width, _NARROW)), (torch.nonzero(~narrow).flatten(), width)):
        for part in group.split(max(1, _CHUNK_ELEMENTS // columns)):
            chunk, cells = points.index_select(0, part), _take(which, part)
            pick = _take(candidates[:, :columns].contiguous(), cells)
            found = torch.hypot(chunk[:, 0, None] - _take(reference_x, pick), chunk[:, 1, None] - _take(reference_y, pick))
            found = torch.where(_take(usable[:, :columns].contiguous(), cells), found, float("inf"))
            found, j = torch.topk(found, min(k + 1, columns), dim=1, largest=False)
            distance.index_copy_(0, part, found[:, :k].contiguous())
            order.index_copy_(0, part, pick.gather(1, j[:, :k]))
            if found.shape[1] > k:  # equal distances at the k-th: which references count is topk's choice
                straddle = found[:, k - 1] == found[:, k]
                _rank_ties_with_topk(points, references, part[straddle], distance, order)
            else:
                straddle = torch.zeros_like(found[:, 0], dtype=torch.bool)
            unsettled.append(part[(found[:, 1:k] == found[:, : k - 1]).any(1) & ~straddle])
    return distance, order, torch.cat(unsettled)


def _weighted_sum(weights: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``sum_j weights[:, j] * vectors[:, j]``, added in the order of ``j`` (what ``sum(1)`` does for a few terms).

    Args:
        weights: ``(P, k)`` float, ``k`` small (the nearest neighbours).
        vectors: ``(P, k, 2)`` or ``(1, k, 2)`` float.

    Returns:
        ``(P, 2)``: one ``(P, 2)`` product per term instead of a ``(P, k, 2)`` one reduced along its middle dimension.
    """
    out = weights[:, 0, None] * vectors[:, 0]
    for j in range(1, weights.shape[1]):
        out = out + weights[:, j, None] * vectors[:, j]
    return out


def exact_sources(queries: torch.Tensor, moved: torch.Tensor, back: torch.Tensor, priority: torch.Tensor) -> torch.Tensor:
    """The ``exact`` backward map: each target pixel's source pixel ``round(q + grid_idw(q))``.

    The references are the moved pixels, one per pixel: where several region
    pixels land on the same pixel, the one of smallest ``priority`` (the
    distance to the nearest handle), so where the forward map folds the
    region over itself a handle's own content, not a mean of everything that
    landed there, comes back (ties: the earlier pixel in raster order).

    A query holding a reference at its own pixel takes that reference's
    source directly: its weight ``1 / 1e-6`` outweighs the other three
    (``<= 1`` each) a million times, so the IDW lies within
    ``3e-6 * max|v_j - v_0|`` (< 0.2 for vectors under 2^15) plus float error
    of the integer ``v_0`` and rounds to it. Only the other queries (where
    the move stretched the region) are interpolated.

    Args:
        queries: ``(Q, 2)`` int64 ``(x, y)`` target pixels, distinct.
        moved: ``(R, 2)`` int64 ``(x, y)`` moved positions, in raster order of their sources, ``R >= 1``.
        back: ``(R, 2)`` int64 vectors from each moved position back to its source.
        priority: ``(R,)`` float.

    Returns:
        ``(Q, 2)`` int64 ``(x, y)`` source pixels.
    """
    count = moved.shape[0]
    low = moved.min(0).values
    size = moved.max(0).values - low + 1
    width, height = int(size[0]), int(size[1])
    cells = (moved[:, 1] - low[1]) * width + (moved[:, 0] - low[0])
    best = priority.new_full((height * width,), float("inf")).scatter_reduce_(0, cells, priority, reduce="amin")
    index = torch.arange(count, device=moved.device)
    candidate = torch.where(priority == _take(best, cells), index, count)
    owner = torch.full_like(best, count, dtype=torch.long).scatter_reduce_(0, cells, candidate, reduce="amin")
    kept = torch.nonzero(_take(owner, cells) == index).flatten()
    local = queries - low
    on_box = (local[:, 0] >= 0) & (local[:, 0] < width) & (local[:, 1] >= 0) & (local[:, 1] < height)
    at = torch.where(on_box, _take(owner, torch.where(on_box, local[:, 1] * width + local[:, 0], 0)), count)
    hit = at < count
    source = _take(moved + back, at.clamp(max=count - 1))
    if not bool(hit.all()):
        value = grid_idw(queries, _take(moved, kept), _take(back, kept), wanted=~hit)
        source = torch.where(hit[:, None], source, torch.round(queries.float() + value).long())
    return source


def grid_idw(
    queries: torch.Tensor, references: torch.Tensor, vectors: torch.Tensor, k: int = NEAREST, wanted: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`idw` of integer points over their exact ``k`` nearest integer references, without an all-pairs search.

    Every query walks the lattice offsets in the order of ``(|o|^2, dy, dx)``
    and takes the references it finds (several may share a pixel; they are
    taken in their given order) until it has ``k``. Offsets of length <= 1
    are walked first for every query (one gather per offset); the few
    queries that then hold fewer than ``k`` (at the region's edge, in holes
    of the moved region) search discs of radius 2, 4, 8, ... (a disc
    holding ``k`` references decides a query: every other reference is
    farther), and past :data:`_MAX_OFFSETS` offsets are compared with every
    reference in the same order (:func:`_ordered_idw`). Up to
    :data:`_CHUNK_ELEMENTS` query-reference pairs, every query is compared
    with every reference instead.

    Args:
        queries: ``(Q, 2)`` int64 ``(x, y)``, distinct.
        references: ``(R, 2)`` int64 ``(x, y)``, ``R >= 1``.
        vectors: ``(R, 2)`` int64 vectors.
        k: neighbours (all references when ``R <= k``).
        wanted: ``(Q,)`` bool, the queries to interpolate (the others get 0);
            the choice between the two searches above still counts all ``Q``,
            so each query gets the same value bit for bit whichever others
            are wanted.

    Returns:
        ``(Q, 2)`` float32 interpolated vectors.
    """
    device = queries.device
    nearest = min(k, references.shape[0])
    all_pairs = queries.shape[0] * references.shape[0] <= _CHUNK_ELEMENTS
    out = torch.zeros(queries.shape[0], 2, device=device)
    chosen = torch.arange(queries.shape[0], device=device) if wanted is None else torch.nonzero(wanted).flatten()
    if chosen.numel() == 0:
        return out
    queries = queries.index_select(0, chosen)
    if all_pairs:
        return out.index_copy_(0, chosen, _ordered_idw(queries, references, vectors, nearest))
    grid = _ReferenceGrid(queries, references, vectors, nearest)
    value, pending = grid.unit_disc()
    radius = 2
    while pending.numel():
        offsets, distance = _disc(radius, device)
        if offsets.shape[0] > _MAX_OFFSETS:
            value[pending] = _ordered_idw(queries[pending], references, vectors, nearest)
            break
        found, decided = grid.search(queries[pending], offsets, distance)
        value[pending[decided]] = found[decided]
        pending = pending[~decided]
        radius *= 2
    return out.index_copy_(0, chosen, value)


class _ReferenceGrid:
    """Integer references counted into the grid spanning them and the queries (:func:`grid_idw`)."""

    def __init__(self, queries: torch.Tensor, references: torch.Tensor, vectors: torch.Tensor, nearest: int) -> None:
        self.queries, self.nearest = queries, nearest
        self.low = torch.minimum(references.min(0).values, queries.min(0).values)
        size = torch.maximum(references.max(0).values, queries.max(0).values) - self.low + 1
        self.width, self.height = int(size[0]), int(size[1])
        cells = self._cells(references)
        self.counts = torch.bincount(cells, minlength=self.height * self.width)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        if int(self.counts.max()) == 1:  # one reference per cell: its cell's start is its place
            sorted_vectors = torch.empty_like(vectors).index_copy_(0, _take(self.starts, cells), vectors)
        else:
            sorted_vectors = _take(vectors, torch.argsort(cells, stable=True))
        self.prefix = F.pad(torch.cumsum(sorted_vectors, 0), (0, 0, 1, 0))

    def _cells(self, points: torch.Tensor) -> torch.Tensor:
        return (points[:, 1] - self.low[1]) * self.width + (points[:, 0] - self.low[0])

    def unit_disc(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Walk the offsets of length <= 1 for every query (all offsets gathered at once, summed in their order).

        Returns:
            ``(out, pending)``: ``(Q, 2)`` float32 values of the queries holding
            ``k`` references within distance 1 (0 elsewhere) and the ``(P,)``
            indices of the other queries.
        """
        offsets, distance = _disc(1, self.queries.device)
        x = self.queries[:, None, 0] - self.low[0] + offsets[:, 0]
        y = self.queries[:, None, 1] - self.low[1] + offsets[:, 1]
        on_grid = (x >= 0) & (x < self.width) & (y >= 0) & (y < self.height)
        cell = torch.where(on_grid, y * self.width + x, 0)
        count = torch.where(on_grid, _take(self.counts, cell), 0)
        before = torch.cumsum(count, 1) - count  # references the earlier offsets hold
        take = torch.minimum((self.nearest - before).clamp(min=0), count).to(torch.int32)
        first = _take(self.starts, cell)
        picked = (_take(self.prefix, first + take) - _take(self.prefix, first)).float()  # exact integer sums
        weights = (1 / (distance.double() + IDW_EPS)).float()
        total = torch.zeros(x.shape[0], 2, device=x.device)
        weight = torch.zeros(x.shape[0], device=x.device)
        for j in range(offsets.shape[0]):  # added in the offsets' order, one term at a time
            total += weights[j] * picked[:, j]
            weight += weights[j] * take[:, j]
        decided = count.sum(1) >= self.nearest
        out = torch.where(decided[:, None], total / weight.clamp(min=IDW_EPS)[:, None], 0.0)
        return out, torch.nonzero(~decided).flatten()

    def search(self, queries: torch.Tensor, offsets: torch.Tensor, distance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Walk a whole disc of ``offsets`` for each query.

        Returns:
            ``(value, decided)``: ``(P, 2)`` float32 and ``(P,)`` bool (the disc held ``k`` references).
        """
        rows = max(1, _CHUNK_ELEMENTS // offsets.shape[0])
        values, decided = [], []
        weights = 1 / (distance + IDW_EPS)
        for chunk in queries.split(rows):
            x = chunk[:, None, 0] - self.low[0] + offsets[:, 0]
            y = chunk[:, None, 1] - self.low[1] + offsets[:, 1]
            on_grid = (x >= 0) & (x < self.width) & (y >= 0) & (y < self.height)
            cell = torch.where(on_grid, y * self.width + x, 0)
            count = torch.where(on_grid, _take(self.counts, cell), 0)
            before = torch.cumsum(count, 1) - count
            take = torch.minimum((self.nearest - before).clamp(min=0), count)
            first = _take(self.starts, cell)
            picked = (_take(self.prefix, first + take) - _take(self.prefix, first)).float()
            values.append((weights[:, None] * picked).sum(1) / (weights * take).sum(1, keepdim=True).clamp(min=IDW_EPS))
            decided.append(count.sum(1) >= self.nearest)
        return torch.cat(values), torch.cat(decided)


def _ordered_idw(queries: torch.Tensor, references: torch.Tensor, vectors: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`grid_idw`'s rule by comparing every query with every reference (same tie order)."""
    rows = max(1, _CHUNK_ELEMENTS // references.shape[0])
    out = []
    for chunk in queries.split(rows):
        dx = references[None, :, 0] - chunk[:, None, 0]
        dy = references[None, :, 1] - chunk[:, None, 1]
        order = torch.arange(references.shape[0], device=queries.device).expand_as(dx)
        for key in (dx, dy, dx * dx + dy * dy):
            order = order.gather(1, torch.argsort(key.gather(1, order), dim=1, stable=True))
        order = order[:, :k]
        distance = torch.sqrt((dx * dx + dy * dy).gather(1, order).double()).float()
        weights = 1 / (distance + IDW_EPS)
        weights = weights / weights.sum(1, keepdim=True)
        out.append(_weighted_sum(weights, _take(vectors, order).float()))
    return torch.cat(out)


@functools.lru_cache(maxsize=32)
def _disc(radius: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Lattice offsets ``(x, y)`` with ``|o| <= radius``, ordered by ``(|o|^2, dy, dx)``, and their lengths."""
    span = torch.arange(-radius, radius + 1)
    dy, dx = torch.meshgrid(span, span, indexing="ij")
    dy, dx = dy.flatten(), dx.flatten()
    squared = dx * dx + dy * dy
    keep = squared <= radius * radius
    dy, dx, squared = dy[keep], dx[keep], squared[keep]
    key = (squared * (2 * radius + 1) + (dy + radius)) * (2 * radius + 1) + (dx + radius)
    order = torch.argsort(key)
    offsets = torch.stack([dx[order], dy[order]], dim=1).to(device)
    return offsets, squared[order].double().sqrt().float().to(device)


# ---------------------------------------------------------------- input checks


def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]`` for an integer ``index`` of any shape along dim 0 (``index_select``: several times faster than indexing on the CPU)."""
    return values.index_select(0, index.reshape(-1)).reshape(index.shape + values.shape[1:])


def _xy(mask: torch.Tensor) -> torch.Tensor:
    """``(P, 2)`` int64 ``(x, y)`` of the set pixels of a ``(H, W)`` mask, in raster order."""
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return torch.stack([cols, rows], dim=1)


def _checked_pairs(
    handles: torch.Tensor, targets: torch.Tensor, height: int, width: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, 2)`` float32 handles and targets on ``device``; handles inside the image, all finite."""
    handles, targets = point_pairs(handles, targets, "pixel", torch.float32, device)
    outside = (handles[:, 0] < -0.5) | (handles[:, 0] >= width - 0.5) | (handles[:, 1] < -0.5) | (handles[:, 1] >= height - 0.5)
    if bool(outside.any()):
        i = int(torch.nonzero(outside)[0])
        x, y = handles[i].tolist()
        raise DragInputError(
            f"handle {i + 1} at (x={x:g}, y={y:g}) is outside the {width}x{height} image; place it on the image"
        )
    far = (targets[:, 0] < -width) | (targets[:, 0] > 2 * width) | (targets[:, 1] < -height) | (targets[:, 1] > 2 * height)
    if bool(far.any()):
        i = int(torch.nonzero(far)[0])
        x, y = targets[i].tolist()
        raise DragInputError(
            f"target {i + 1} at (x={x:g}, y={y:g}) lies more than one image side outside the {width}x{height} image"
        )
    return handles, targets


def _checked_mask(mask: torch.Tensor | None, height: int, width: int, device: torch.device) -> torch.Tensor:
    """The ``(H, W)`` bool editable region on ``device``: > 0.5 (or True); absent or empty means everything."""
    if mask is None:
        return torch.ones(height, width, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (height, width):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise DragInputError(f"the mask must be ({height}, {width}) (rows, columns) like the image, got {shape}")
    if mask.is_floating_point() and not bool(torch.isfinite(mask).all()):
        raise DragInputError("the mask contains NaN or infinite values")
    editable = (mask > 0.5).to(device)
    return editable if bool(editable.any()) else torch.ones_like(editable)


def released_band(band: int) -> int:
    """The kernel the released code uses for ``band``: an even value becomes the next odd one, 0 stays 0."""
    return band + 1 if band > 0 and band % 2 == 0 else band

