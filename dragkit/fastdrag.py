"""FastDrag's one-step latent edit: the latent warpage function (LWF), BNNI and object moving.

Everything here works on one latent and is pure torch.

Conventions
-----------
- ``z`` is a ``(1, C, h, w)`` floating tensor on any device.
- Points are ``(N, 2)`` tensors of latent ``(x, y)``: x is the column, y the
  row, in latent cells (quarter-cell steps, as
  :meth:`~dragkit.geometry.LatentGeometry.points_to_latent` makes them).
  Latent cell ``(row, col)`` sits at ``(x, y) = (col, row)``; a point is inside
  the latent when ``0 <= x < w`` and ``0 <= y < h``.
- Masks are ``(h, w)`` tensors indexed ``[row, col]``; True (or > 0) means
  editable (:meth:`~dragkit.geometry.LatentGeometry.mask_to_latent_any`).
- Row-major order means top to bottom, then left to right.

Precision: the warp's geometry (stretch factors, weights, destinations) is
computed in float64 on the CPU whatever the latent's device and dtype, so the
same points and mask give the same destinations everywhere (MPS has no
float64, and fp32 on a GPU could round a destination that sits at .5 the other
way). The ``as_released`` arithmetic (fill ``bnni_as_released``) instead
repeats the release's float32 formulas in its order of operations on the CPU
(:func:`released_destinations`), so destinations that sit at .5 in exact
arithmetic round as the release rounds them. Latent values are moved, never
mixed, by the warp; BNNI mixes them in float32 (float64 for a float64 latent)
and returns the latent's dtype.
"""

from __future__ import annotations

import math

import torch

from .errors import DragInputError
from .geometry import point_pairs

MODES = ("drag", "move", "copy")
"""``drag``: FastDrag's warp of every pair. ``move``/``copy``: shift the masked object by the first pair."""

FILLS = ("bnni", "bnni_as_released", "keep", "zero")
"""How the cells the warp leaves empty are filled (``drag`` mode only)."""

BNNI_MODES = ("paper", "as_released")
"""The two BNNI variants of :func:`bnni_fill`."""

ARITHMETICS = ("exact", "as_released")
"""How :func:`latent_warp` computes destinations: float64 (exact), or the release's float32 (:func:`released_destinations`)."""

PAIRWISE_DISTANCE_EPS = 1e-6
"""``torch.nn.PairwiseDistance``'s default eps, which the release's circle radius includes."""

HANDLE_WEIGHT_EPS = 1e-4
"""Added to the cell-handle distance in the inverse-distance handle weights (as released)."""

RELEASED_PATCH_CELLS = 12
"""Side, in latent cells, of the patch tiled over a moved object's old place (as released)."""

_GEOMETRY = dict(dtype=torch.float64, device="cpu")


def fastdrag_edit(
    z: torch.Tensor,
    handles: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "drag",
    fill: str = "bnni",
    patch_cells: int = RELEASED_PATCH_CELLS,
) -> torch.Tensor:
    """FastDrag's latent edit of ``z``: validate, then warp and fill, or move/copy the object.

    Args:
        z: ``(1, C, h, w)`` latent (any device and floating dtype).
        handles, targets: ``(N, 2)`` latent ``(x, y)``; ``handles[i]`` moves to ``targets[i]``.
        mask: ``(h, w)`` editable cells, at least one (the caller turns an
            empty mask into a full one).
        mode: ``drag`` warps every pair (:func:`latent_warp`); ``move`` and
            ``copy`` use **only the first pair** and ignore the others
            (:func:`object_move`); ``fill`` does not apply to them.
        fill: ``bnni`` (paper BNNI), ``bnni_as_released`` (the release's float32
            warp arithmetic and its causal raster BNNI), ``keep`` (the masked cells keep their original values
            under the warped ones: nothing is emptied) or ``zero`` (empty cells
            stay 0).
        patch_cells: ``move`` mode: side of the tiled patch, in latent cells.

    Returns:
        The edited ``(1, C, h, w)`` latent, same device and dtype. Pairs whose
        handle equals their target pin content; if every pair used does, the
        result equals ``z``.

    Raises:
        DragInputError: unknown mode/fill, bad shapes, non-finite values,
            points outside the latent, or an empty mask.
    """
    if mode not in MODES:
        raise DragInputError(f"unknown FastDrag mode {mode!r}; choose one of {', '.join(MODES)}")
    if fill not in FILLS:
        raise DragInputError(f"unknown FastDrag fill {fill!r}; choose one of {', '.join(FILLS)}")
    _check_latent(z)
    height, width = z.shape[-2:]
    handles, targets = _checked_pairs(handles, targets, height, width)
    mask = _checked_mask(mask, height, width)
    if mode == "drag":
        if torch.equal(handles, targets):
            return z.clone()
        arithmetic = "as_released" if fill == "bnni_as_released" else "exact"
        warped, null_mask = _warp(z, handles, targets, mask, fill != "keep", arithmetic)
        if fill == "bnni":
            return _bnni(warped, null_mask, "paper")
        if fill == "bnni_as_released":
            return _bnni(warped, null_mask, "as_released")
        return warped
    _check_patch_cells(patch_cells)
    if torch.equal(handles[0], targets[0]):
        return z.clone()
    return _object_move(z, handles[0], targets[0], mask, mode, patch_cells, paint_last=False)


def latent_warp(
    z: torch.Tensor,
    handles: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    empty: bool = True,
    arithmetic: str = "exact",
) -> tuple[torch.Tensor, torch.Tensor]:
    """FastDrag's latent warpage function (LWF).

    Every masked cell ``C`` moves by ``v(C)`` (:func:`displacement_field`) to
    ``D = round(C + v(C))`` (round half to even), clamped into the grid. The
    masked cells are first emptied (set to 0); then, in row-major order over
    the masked cells, each writes its **original** value (all channels) to
    its ``D`` unless an earlier cell already wrote there (first writer wins).
    Writes may land outside the mask. Masked cells nobody wrote stay empty.

    Args:
        z: ``(1, C, h, w)`` latent.
        handles, targets: ``(N, 2)`` latent ``(x, y)``.
        mask: ``(h, w)`` editable cells, at least one.
        empty: ``False`` skips the emptying (fill "keep", the release's
            "ori"): unwritten masked cells keep their original values and the
            null mask is all False.
        arithmetic: ``exact`` (float64, :func:`displacements`) or
            ``as_released`` (:func:`released_destinations`: the release's
            float32 rounding, and a cell exactly on a handle writes nothing).

    Returns:
        ``(warped, null_mask)``: the ``(1, C, h, w)`` warped latent (empty
        cells are 0) and the ``(h, w)`` bool mask of empty cells, both on
        ``z``'s device.
    """
    _check_latent(z)
    height, width = z.shape[-2:]
    handles, targets = _checked_pairs(handles, targets, height, width)
    if arithmetic not in ARITHMETICS:
        raise DragInputError(f"unknown warp arithmetic {arithmetic!r}; choose one of {', '.join(ARITHMETICS)}")
    return _warp(z, handles, targets, _checked_mask(mask, height, width), empty, arithmetic)


def displacement_field(handles: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The LWF's displacement ``v(C)`` at every cell of the grid (see :func:`displacements`).

    Args:
        handles, targets: ``(N, 2)`` latent ``(x, y)``.
        mask: ``(h, w)`` editable cells, at least one.

    Returns:
        ``(h, w, 2)`` float64 CPU tensor of ``(dx, dy)`` in latent cells,
        indexed ``[row, col]``; 0 outside the circle.
    """
    mask = mask.to("cpu") > 0
    return displacements(handles, targets, mask, cell_grid(*mask.shape))


def displacements(
    handles: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, cells: torch.Tensor
) -> torch.Tensor:
    """The LWF's displacement ``v(C) = sum_i wbar_i(C) s_i(C) (B_i - A_i)`` of the given cells.

    ``s_i`` are the stretch factors of :func:`stretch_factors` for the circle
    O of :func:`mask_circle`, ``wbar_i`` the weights of :func:`handle_weights`.
    The warp uses it at the masked cells, which all lie in O.

    Args:
        handles, targets: ``(N, 2)`` latent ``(x, y)`` (``A_i``, ``B_i``).
        mask: ``(h, w)`` editable cells (defines O), at least one.
        cells: ``(..., 2)`` latent ``(x, y)`` of the cells.

    Returns:
        ``(..., 2)`` float64 CPU ``(dx, dy)`` in latent cells.
    """
    handles = handles.to(**_GEOMETRY)
    cells = cells.to(**_GEOMETRY)
    offsets, dist = _offsets(handles, cells)
    centre, radius_sq = mask_circle(mask)
    stretch = _stretch(offsets, dist, handles, centre, radius_sq, _inside(cells, centre, radius_sq))
    drags = targets.to(**_GEOMETRY) - handles
    return torch.einsum("n...,nd->...d", stretch * _weights(dist), drags)


def mask_circle(mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Circle O of the LWF: the circumcircle of the bounding box of the masked cells.

    Args:
        mask: ``(h, w)`` editable cells, at least one.

    Returns:
        ``(centre, radius_sq)``: the box centre as a ``(2,)`` float64 CPU
        ``(x, y)`` tensor and the squared radius (centre to the box's
        ``(row_min, col_min)`` corner), exact for these half-cell values.
    """
    rows, cols = torch.nonzero(mask.to("cpu") > 0, as_tuple=True)
    row_min, row_max = int(rows.min()), int(rows.max())
    col_min, col_max = int(cols.min()), int(cols.max())
    centre = torch.tensor([(col_min + col_max) / 2, (row_min + row_max) / 2], **_GEOMETRY)
    return centre, float((centre[0] - col_min) ** 2 + (centre[1] - row_min) ** 2)


def stretch_factors(handles: torch.Tensor, centre: torch.Tensor, radius_sq: float, cells: torch.Tensor) -> torch.Tensor:
    """Stretch factor ``s_i(C) = 1 - |A_i C| / |A_i P|`` of every handle and cell.

    ``P`` is where the ray from handle ``A_i`` through cell ``C`` leaves the
    circle: with ``e = (C - A)/|C - A|``, ``L0 = e . (A - O)`` and
    ``L1 = sqrt(R^2 - |A - O|^2 + L0^2)``, ``|AP| = L1 - L0``. So ``s`` is 1
    at the handle (also when ``C == A`` exactly: no NaN) and falls linearly
    to 0 on the circle. Our choice where the formula leaves ``[0, 1]``: ``s``
    is clamped into ``[0, 1]`` and is 0 for every cell outside the circle
    (the release's ``|PC|/|AP|`` would grow again there; masked cells are
    never outside it).

    Args:
        handles: ``(N, 2)`` latent ``(x, y)``.
        centre: ``(2,)`` ``(x, y)`` of O.
        radius_sq: ``R^2`` in cells^2.
        cells: ``(..., 2)`` latent ``(x, y)``, e.g. :func:`cell_grid`.

    Returns:
        ``(N, ...)`` float64 CPU factors in ``[0, 1]``.
    """
    handles = handles.to(**_GEOMETRY)
    cells = cells.to(**_GEOMETRY)
    centre = centre.to(**_GEOMETRY)
    offsets, dist = _offsets(handles, cells)
    return _stretch(offsets, dist, handles, centre, radius_sq, _inside(cells, centre, radius_sq))


def handle_weights(handles: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Normalised handle weights ``w_i(C) = 1/(|C - A_i| + 1e-4)`` over the ``N`` handles.

    Args:
        handles: ``(N, 2)`` latent ``(x, y)``.
        cells: ``(..., 2)`` latent ``(x, y)``.

    Returns:
        ``(N, ...)`` float64 CPU weights summing to 1 over ``N`` at every cell.
    """
    return _weights(_offsets(handles.to(**_GEOMETRY), cells.to(**_GEOMETRY))[1])


def cell_grid(height: int, width: int) -> torch.Tensor:
    """``(h, w, 2)`` float64 CPU ``(x, y)`` = ``(col, row)`` of every cell, indexed ``[row, col]``."""
    ys, xs = torch.meshgrid(torch.arange(height, **_GEOMETRY), torch.arange(width, **_GEOMETRY), indexing="ij")
    return torch.stack([xs, ys], dim=-1)


def _offsets(handles: torch.Tensor, cells: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``((dx, dy), dist)``: ``C - A_i`` per component and ``|C - A_i|``, each ``(N, ...)``."""
    shape = (-1,) + (1,) * (cells.dim() - 1)
    dx = cells[..., 0] - handles[:, 0].reshape(shape)
    dy = cells[..., 1] - handles[:, 1].reshape(shape)
    return (dx, dy), torch.hypot(dx, dy)


def _inside(cells: torch.Tensor, centre: torch.Tensor, radius_sq: float) -> torch.Tensor:
    """``(...)`` bool: the cell lies in the closed circle."""
    return (cells[..., 0] - centre[0]) ** 2 + (cells[..., 1] - centre[1]) ** 2 <= radius_sq


def _stretch(
    offsets: tuple[torch.Tensor, torch.Tensor],
    dist: torch.Tensor,
    handles: torch.Tensor,
    centre: torch.Tensor,
    radius_sq: float,
    inside: torch.Tensor,
) -> torch.Tensor:
    """:func:`stretch_factors` from precomputed offsets ``(N, ...)`` and the ``(...)`` inside test."""
    shape = (-1,) + (1,) * (dist.dim() - 1)
    from_x = (handles[:, 0] - centre[0]).reshape(shape)
    from_y = (handles[:, 1] - centre[1]).reshape(shape)
    on_handle = dist == 0
    l0 = (offsets[0] * from_x + offsets[1] * from_y) / torch.where(on_handle, 1.0, dist)
    l1 = (radius_sq - (from_x**2 + from_y**2) + l0**2).clamp(min=0).sqrt()
    to_exit = l1 - l0
    ahead = to_exit > 0
    factor = (1 - dist / torch.where(ahead, to_exit, 1.0)).clamp(0, 1)
    return torch.where(on_handle, 1.0, torch.where(ahead & inside, factor, 0.0))


def _weights(dist: torch.Tensor) -> torch.Tensor:
    """Inverse-distance handle weights from ``(N, ...)`` distances, normalised over ``N``."""
    weights = 1 / (dist + HANDLE_WEIGHT_EPS)
    return weights / weights.sum(0)


def bnni_fill(z: torch.Tensor, null_mask: torch.Tensor, mode: str = "paper") -> torch.Tensor:
    """Bilateral nearest-neighbour interpolation (BNNI) of the empty cells of a warped latent.

    The empty set is the explicit ``null_mask`` (the release instead tests
    channel 0 == 0 over the whole latent; the two agree unless a latent
    value, original or filled, is exactly 0).

    - ``paper``: each null cell becomes the mean of the nearest non-null cell
      to its left, right, up and down in ``z`` (before any filling), weighted
      by ``1/k`` with ``k`` the distance in cells; directions without one are
      dropped.
    - ``as_released``: the release's causal raster variant. Cells are visited
      in row-major order and each null cell searches the tensor as filled so
      far, so an already-filled cell to its left or above counts as a
      neighbour (weight 1), while right and down hits are original cells.

    In both modes a null cell with no neighbour in any direction keeps its
    value in ``z`` (0 after :func:`latent_warp`).

    Args:
        z: ``(1, C, h, w)`` latent.
        null_mask: ``(h, w)`` bool, True = empty cell to fill.
        mode: ``paper`` or ``as_released``.

    Returns:
        The filled ``(1, C, h, w)`` latent, same device and dtype.
    """
    if mode not in BNNI_MODES:
        raise DragInputError(f"unknown BNNI mode {mode!r}; choose one of {', '.join(BNNI_MODES)}")
    _check_latent(z)
    height, width = z.shape[-2:]
    if tuple(null_mask.shape) != (height, width):
        raise DragInputError(
            f"the null mask is {tuple(null_mask.shape)} but the latent is {height}x{width} (rows x columns)"
        )
    return _bnni(z, null_mask.to(device=z.device, dtype=torch.bool), mode)


def object_move(
    z: torch.Tensor,
    handle: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "move",
    patch_cells: int = RELEASED_PATCH_CELLS,
    paint_last: bool = False,
) -> torch.Tensor:
    """FastDrag's object moving/copying: shift the masked region by whole latent cells.

    The shift is ``(dx, dy) = trunc(target - handle)`` in latent cells
    (toward zero, as released). The latent shifted by it (zero padding) is
    pasted wherever the equally shifted mask is set. ``copy`` keeps the
    original under the old position. ``move`` first fills the whole original
    mask region with :func:`tiled_patch` around the target, then pastes the
    object on top, so only the vacated cells show the patch. The release
    paints the patch after pasting, which also covers the part of the moved
    object that overlaps its old place; ``paint_last=True`` does that.

    Args:
        z: ``(1, C, h, w)`` latent.
        handle, target: ``(2,)`` latent ``(x, y)``.
        mask: ``(h, w)`` object cells, at least one (hard edges: the release
            blends by its fractional mask instead).
        mode: ``move`` or ``copy``.
        patch_cells: side of the tiled patch in cells (``move``).
        paint_last: paint the patch after pasting (the release's order).

    Returns:
        The edited ``(1, C, h, w)`` latent, same device and dtype.
    """
    if mode not in ("move", "copy"):
        raise DragInputError(f"object_move mode must be 'move' or 'copy', got {mode!r}")
    _check_patch_cells(patch_cells)
    _check_latent(z)
    height, width = z.shape[-2:]
    handle, target = torch.as_tensor(handle).reshape(1, 2), torch.as_tensor(target).reshape(1, 2)
    handles, targets = _checked_pairs(handle, target, height, width)
    mask = _checked_mask(mask, height, width)
    return _object_move(z, handles[0], targets[0], mask, mode, patch_cells, paint_last)


def tiled_patch(z: torch.Tensor, centre: torch.Tensor, patch_cells: int = RELEASED_PATCH_CELLS) -> torch.Tensor:
    """The latent tiled with a ``patch_cells``-wide patch of itself centred on ``centre``.

    The patch spans rows ``floor(y - p/2) .. floor(y + p/2) - 1`` and the same
    for columns with ``x``, clipped to the latent (so it is smaller near a
    border; at least one cell), as released. It is repeated from the
    latent's top-left corner: ``out[row, col] = patch[row % ph, col % pw]``.

    Args:
        z: ``(1, C, h, w)`` latent.
        centre: ``(2,)`` latent ``(x, y)``.
        patch_cells: ``p``, at least 1.

    Returns:
        ``(1, C, h, w)`` tensor like ``z``.
    """
    height, width = z.shape[-2:]
    x, y = (float(v) for v in centre.reshape(2))
    rows = _patch_span(y, patch_cells, height)
    cols = _patch_span(x, patch_cells, width)
    row_index = rows.start + torch.arange(height, device=z.device) % len(rows)
    col_index = cols.start + torch.arange(width, device=z.device) % len(cols)
    return z[:, :, row_index][:, :, :, col_index]


def _warp(
    z: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, empty: bool, arithmetic: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`latent_warp` on validated inputs (points float64 CPU, mask bool CPU)."""
    batch, channels, height, width = z.shape
    written, sources = _first_writers(handles, targets, mask, arithmetic)
    source = torch.arange(height * width)
    source[written] = sources
    null_mask = torch.zeros(height * width, dtype=torch.bool)
    if empty:
        null_mask[mask.reshape(-1)] = True
        null_mask[written] = False
    null_mask = null_mask.reshape(height, width).to(z.device)
    warped = z.reshape(batch, channels, height * width)[:, :, source.to(z.device)].reshape(z.shape)
    return torch.where(null_mask, 0.0, warped), null_mask


def _first_writers(
    handles: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, arithmetic: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Destinations written by the warp and the masked cell that writes each.

    Args:
        handles, targets: ``(N, 2)`` float64 latent ``(x, y)``.
        mask: ``(h, w)`` bool CPU mask, at least one cell.
        arithmetic: one of :data:`ARITHMETICS`.

    Returns:
        ``(written, sources)``: ``(K,)`` int64 flat (row-major) indices of the
        written cells and of their first writers (smallest row-major index).
    """
    height, width = mask.shape
    if arithmetic == "as_released":
        sources, dest_rows, dest_cols = released_destinations(handles, targets, mask)
    else:
        sources = torch.nonzero(mask.reshape(-1)).squeeze(1)
        rows, cols = sources // width, sources % width
        step = displacements(handles, targets, mask, torch.stack([cols, rows], dim=1))
        dest_rows = torch.round(rows + step[:, 1]).clamp(0, height - 1).long()
        dest_cols = torch.round(cols + step[:, 0]).clamp(0, width - 1).long()
    unwritten = height * width
    first = torch.full((height * width,), unwritten, dtype=torch.long)
    first.scatter_reduce_(0, dest_rows * width + dest_cols, sources, reduce="amin")
    written = torch.nonzero(first < unwritten).squeeze(1)
    return written, first[written]


def released_destinations(
    handles: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LWF's destinations with the release's float32 arithmetic, for bit-exact comparison.

    The same warp as :func:`displacements` + rounding, computed the way the
    official code computes it: in float32 (row, col) order, the circle's
    radius as ``PairwiseDistance`` gives it (``|O - corner + 1e-6|``), the
    stretch factor as ``|PC| / |AP|`` with ``AP = (L1 - L0) e`` and
    ``PC = AC - AP``, per-handle weights ``1/(|C - A_i| + 1e-4)`` normalised
    by their sum, then ``round(C + v)`` (half to even) clamped into the grid.
    Rounding can differ from the exact arithmetic where ``C + v`` sits at
    .5 (e.g. 30.500002 instead of 30.5). Where the formula is NaN (a cell
    exactly on a handle, or a handle outside the circle) the release skips
    the cell; so does this (the release crashes when that cell is the first
    masked one). The norms, products and sums use the same torch float32
    operations on the same layouts as the release's per-cell code, so the
    results are bit-identical to it on the CPU.

    Args:
        handles, targets: ``(N, 2)`` latent ``(x, y)`` (quarter-cell values).
        mask: ``(h, w)`` bool CPU mask, at least one cell.

    Returns:
        ``(sources, dest_rows, dest_cols)``: ``(K,)`` int64 flat row-major
        indices of the masked cells that write, in row-major order, and their
        destination rows and columns.
    """
    height, width = mask.shape
    cells = torch.nonzero(mask)
    corner = cells.min(0).values.to(torch.float32)
    centre = (corner + cells.max(0).values.to(torch.float32)) / 2
    radius = torch.pairwise_distance(centre, corner, p=2.0, eps=PAIRWISE_DISTANCE_EPS)
    a = handles.flip(-1).to(torch.float32)
    shift = targets.flip(-1).to(torch.float32) - a
    to_handle = a - centre
    handle_dist = torch.linalg.vector_norm(to_handle, dim=-1)
    ac = cells[:, None, :] - a[None]
    dist = torch.linalg.vector_norm(ac, dim=-1)
    unit = ac / dist[..., None]
    l0 = (ac * to_handle[None]).sum(-1) / dist
    l1 = torch.sqrt(radius**2 - handle_dist**2 + l0**2)
    ap = (l1 - l0)[..., None] * unit
    pc = ac - ap
    factor = torch.linalg.vector_norm(pc, dim=-1) / torch.linalg.vector_norm(ap, dim=-1)
    moves = factor[..., None] * shift[None]
    weights = 1 / (dist + HANDLE_WEIGHT_EPS)
    weights = weights / weights.sum(-1, keepdim=True)
    move = (weights[:, None, :] * moves.transpose(1, 2).contiguous()).sum(-1)
    dest = torch.round(cells + move)
    ok = torch.isfinite(dest).all(-1)
    dest = dest[ok].long()
    rows = dest[:, 0].clamp(0, height - 1)
    cols = dest[:, 1].clamp(0, width - 1)
    return (cells[ok, 0] * width + cells[ok, 1]), rows, cols


def _bnni(z: torch.Tensor, null_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """:func:`bnni_fill` on validated inputs; works on the null cells' bounding box plus a one-cell ring."""
    if not bool(null_mask.any()):
        return z.clone()
    rows, cols = _window(null_mask)
    work = torch.promote_types(z.dtype, torch.float32)
    x = z[0, :, rows, cols].to(work)
    null = null_mask[rows, cols]
    filled = _bnni_paper(x, null) if mode == "paper" else _bnni_released(x, null)
    out = z.clone()
    out[0, :, rows, cols] = filled.to(z.dtype)
    return out


def _window(null_mask: torch.Tensor) -> tuple[slice, slice]:
    """Rows and columns of the null cells' bounding box grown by one cell (clipped).

    Cells outside the box are never null, so the ring holds every neighbour
    any null cell can find, and the fill of the window equals the fill of the
    whole latent.
    """
    rows, cols = torch.nonzero(null_mask, as_tuple=True)
    height, width = null_mask.shape
    row_span = slice(max(int(rows.min()) - 1, 0), min(int(rows.max()) + 2, height))
    col_span = slice(max(int(cols.min()) - 1, 0), min(int(cols.max()) + 2, width))
    return row_span, col_span


def _nearest_valid(valid: torch.Tensor, dim: int, after: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest valid cell strictly before/after each invalid cell along ``dim``.

    Args:
        valid: ``(h, w)`` bool.
        dim: 0 (along columns: up/down) or 1 (along rows: left/right).
        after: search toward higher indices (right/down) instead of lower.

    Returns:
        ``(index, found)``, both ``(h, w)``: the index along ``dim`` (clamped
        into range where none was found) and whether one was found. Meaningful
        at invalid cells; at a valid cell the index is the cell itself.
    """
    size = valid.shape[dim]
    shape = [1, 1]
    shape[dim] = size
    position = torch.arange(size, device=valid.device).reshape(shape).expand_as(valid)
    if after:
        candidate = torch.where(valid, position, size).flip(dim)
        index = torch.cummin(candidate, dim).values.flip(dim)
        found = index < size
    else:
        index = torch.cummax(torch.where(valid, position, -1), dim).values
        found = index >= 0
    return index.clamp(0, size - 1), found


def _neighbour(x: torch.Tensor, valid: torch.Tensor, dim: int, after: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Value and ``1/k`` weight of the nearest valid cell in one direction.

    Args:
        x: ``(C, h, w)`` values.
        valid: ``(h, w)`` bool.
        dim, after: direction, as in :func:`_nearest_valid`.

    Returns:
        ``(values, weight)``: ``(C, h, w)`` and ``(h, w)``; the weight is 0 at
        valid cells and where no valid cell lies that way.
    """
    index, found = _nearest_valid(valid, dim, after)
    size = valid.shape[dim]
    shape = [1, 1]
    shape[dim] = size
    position = torch.arange(size, device=valid.device).reshape(shape)
    steps = (index - position).abs().clamp(min=1).to(x.dtype)
    weight = torch.where(found & ~valid, 1 / steps, 0.0)
    values = x.gather(dim + 1, index.expand_as(x))
    return values, weight


def _bnni_paper(x: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """Symmetric BNNI of ``x`` ``(C, h, w)`` at the ``(h, w)`` null cells."""
    valid = ~null
    total = torch.zeros_like(x)
    weight_sum = torch.zeros_like(x[0])
    for dim, after in ((1, False), (1, True), (0, False), (0, True)):
        values, weight = _neighbour(x, valid, dim, after)
        total += weight * values
        weight_sum += weight
    fill = weight_sum > 0
    return torch.where(fill, total / torch.where(fill, weight_sum, 1.0), x)


def _bnni_released(x: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """Causal raster BNNI of ``x`` ``(C, h, w)`` at the ``(h, w)`` null cells, without a per-cell loop.

    In the raster scan a cell's right and down hits are original cells (not
    visited yet). A null cell is filled iff it has any hit, and "filled or
    original" spreads right and down from every original cell and every null
    cell with a right or down hit, so the cells that end up usable are the 2-D
    prefix-OR of those seeds. Hence a left or up hit, when there is one, is
    always the adjacent cell (weight 1), and each filled cell solves
    ``x[r, c] = alpha x[r, c-1] + u x[r-1, c] + const`` with weights known in
    advance. Each row is then one matrix product with the row's
    first-order-recurrence matrix, one row after the other.
    """
    valid = ~null
    right, w_right = _neighbour(x, valid, 1, True)
    down, w_down = _neighbour(x, valid, 0, True)
    seeds = valid | (w_right > 0) | (w_down > 0)
    usable = torch.cummax(torch.cummax(seeds.to(torch.uint8), 0).values, 1).values.bool()
    left_link = torch.zeros_like(null)
    left_link[:, 1:] = usable[:, :-1]
    up_link = torch.zeros_like(null)
    up_link[1:] = usable[:-1]
    filled = null & usable
    left_link &= filled
    up_link &= filled
    weight_sum = left_link.to(x.dtype) + up_link.to(x.dtype) + w_right + w_down
    weight_sum = torch.where(filled, weight_sum, 1.0)
    alpha = left_link / weight_sum
    up_gain = up_link / weight_sum
    const = torch.where(filled, (w_right * right + w_down * down) / weight_sum, x)
    transfer = _row_recurrence_matrices(alpha)
    previous = torch.zeros_like(x[:, 0])
    rows = []
    for r in range(x.shape[1]):
        previous = (const[:, r] + up_gain[r] * previous) @ transfer[r].T
        rows.append(previous)
    return torch.stack(rows, dim=1)


def _row_recurrence_matrices(alpha: torch.Tensor) -> torch.Tensor:
    """Matrices solving ``y[c] = alpha[c] y[c-1] + b[c]`` along each row as ``y = M b``.

    Args:
        alpha: ``(h, w)`` coefficients in ``[0, 1)``; ``alpha[:, 0]`` must be 0.

    Returns:
        ``(h, w, w)``: ``M[r, j, k] = prod(alpha[r, k+1 .. j])`` for ``k <= j``, else 0.
    """
    width = alpha.shape[1]
    index = torch.arange(width, device=alpha.device)
    later = index[:, None] > index[None, :]
    factors = torch.where(later, alpha[:, :, None], 1.0)
    return torch.cumprod(factors, dim=1) * (~later.T)


def _object_move(
    z: torch.Tensor,
    handle: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    patch_cells: int,
    paint_last: bool,
) -> torch.Tensor:
    """:func:`object_move` on validated inputs (points float64 CPU, mask bool CPU)."""
    dx, dy = (int(v) for v in torch.trunc(target - handle))
    mask = mask.to(z.device)
    moved_mask = _shift(mask, dy, dx)
    moved = _shift(z, dy, dx)
    out = z.clone()
    if mode == "move":
        patch = tiled_patch(z, target, patch_cells)
        if not paint_last:
            out = torch.where(mask, patch, out)
        out = torch.where(moved_mask, moved, out)
        if paint_last:
            out = torch.where(mask, patch, out)
        return out
    return torch.where(moved_mask, moved, out)


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``x`` ``(..., h, w)`` moved ``dy`` rows down and ``dx`` columns right, zero-padded."""
    height, width = x.shape[-2:]
    out = torch.zeros_like(x)
    src_rows = slice(max(-dy, 0), max(height - max(dy, 0), 0))
    dst_rows = slice(max(dy, 0), max(height - max(-dy, 0), 0))
    src_cols = slice(max(-dx, 0), max(width - max(dx, 0), 0))
    dst_cols = slice(max(dx, 0), max(width - max(-dx, 0), 0))
    out[..., dst_rows, dst_cols] = x[..., src_rows, src_cols]
    return out


def _patch_span(centre: float, patch_cells: int, size: int) -> range:
    """Indices ``floor(c - p/2) .. floor(c + p/2) - 1`` clipped into ``0 .. size-1``, at least one."""
    start = max(math.floor(centre - patch_cells / 2), 0)
    stop = min(math.floor(centre + patch_cells / 2), size)
    return range(start, max(stop, start + 1))


def _check_latent(z: torch.Tensor) -> None:
    if not isinstance(z, torch.Tensor) or z.dim() != 4 or z.shape[0] != 1:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise DragInputError(f"FastDrag edits one latent of shape (1, C, h, w), got {shape}")
    if not z.is_floating_point():
        raise DragInputError(f"the latent must be a floating-point tensor, got {z.dtype}")
    if z.shape[-1] < 1 or z.shape[-2] < 1 or z.shape[1] < 1:
        raise DragInputError(f"the latent is empty: shape {tuple(z.shape)}")
    if not bool(torch.isfinite(z).all()):
        raise DragInputError("the latent contains NaN or infinite values; check the inversion that produced it")


def _checked_pairs(
    handles: torch.Tensor, targets: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated ``(N, 2)`` float64 CPU handles and targets inside the ``height`` x ``width`` latent."""
    handles, targets = point_pairs(handles, targets, "latent", **_GEOMETRY)
    for kind, points in (("handle", handles), ("target", targets)):
        outside = (points[:, 0] < 0) | (points[:, 0] >= width) | (points[:, 1] < 0) | (points[:, 1] >= height)
        if bool(outside.any()):
            i = int(torch.nonzero(outside)[0])
            x, y = points[i].tolist()
            raise DragInputError(
                f"{kind} {i + 1} at latent (x={x:g}, y={y:g}) is outside the {width}x{height} latent "
                f"(x must be in [0, {width}), y in [0, {height})); place the points on the image this latent came from"
            )
    return handles, targets


def _checked_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The ``(h, w)`` mask as a bool CPU tensor (True or > 0 = editable), with at least one cell."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or tuple(mask.shape) != (height, width):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise DragInputError(
            f"the latent mask must be ({height}, {width}) (rows, columns) like the latent, got {shape}"
        )
    mask = mask.detach().to("cpu")
    if mask.is_floating_point() and not bool(torch.isfinite(mask).all()):
        raise DragInputError("the mask contains NaN or infinite values")
    mask = mask > 0
    if not bool(mask.any()):
        raise DragInputError(
            "the mask covers no latent cell; paint the region to edit (an absent mask means the whole image)"
        )
    return mask


def _check_patch_cells(patch_cells: int) -> None:
    if isinstance(patch_cells, bool) or not isinstance(patch_cells, int) or patch_cells < 1:
        raise DragInputError(f"patch_cells must be a whole number >= 1, got {patch_cells!r}")
