"""Slow per-cell re-creations of FastDrag's released loops: the tests' oracle and the benchmark's baseline.

Written from the equations (METHODS.md "FastDrag", docs/reference-implementations.md 2.3-2.4), not from the
released code, with the release's cost structure: one Python iteration per (handle, masked cell) doing 0-d
tensor arithmetic, a Python list of the destinations written so far, and a raster loop over every cell for
BNNI that probes one cell at a time. Two of the release's behaviours are left out on purpose, as in
:mod:`dragkit.fastdrag`: a cell exactly on a handle gets stretch factor 1 (the release hits a NaN there), and
the empty cells are an explicit mask (the release tests channel 0 == 0).

Conventions as in :mod:`dragkit.fastdrag`: ``z`` is ``(1, C, h, w)``, points ``(N, 2)`` latent ``(x, y)``,
masks ``(h, w)`` bool indexed ``[row, col]``.
"""

from __future__ import annotations

import torch

DIRECTIONS = ((0, -1), (0, 1), (-1, 0), (1, 0))
"""(row step, column step) of the BNNI probes: left, right, up, down (the release's order)."""


def warp_loops(
    z: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, empty: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LWF one masked cell at a time; returns ``(warped (1, C, h, w), null_mask (h, w))``."""
    height, width = mask.shape
    handles = handles.to(torch.float64)
    targets = targets.to(torch.float64)
    cells = [(r, c) for r in range(height) for c in range(width) if bool(mask[r, c])]
    centre, radius = _circle(cells)
    out = z.clone()
    if empty:
        for r, c in cells:
            out[0, :, r, c] = 0
    written = []
    for r, c in cells:
        move = _displacement(torch.tensor([c, r], dtype=torch.float64), handles, targets, centre, radius)
        dest_r = min(max(int(torch.round(r + move[1])), 0), height - 1)
        dest_c = min(max(int(torch.round(c + move[0])), 0), width - 1)
        if (dest_r, dest_c) in written:
            continue
        written.append((dest_r, dest_c))
        out[0, :, dest_r, dest_c] = z[0, :, r, c]
    null_mask = torch.zeros(height, width, dtype=torch.bool)
    if empty:
        for r, c in cells:
            null_mask[r, c] = (r, c) not in written
    return out, null_mask


def _circle(cells: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre ``(x, y)`` and radius of the circumcircle of the cells' bounding box."""
    rows = [r for r, _ in cells]
    cols = [c for _, c in cells]
    corner = torch.tensor([min(cols), min(rows)], dtype=torch.float64)
    centre = torch.tensor([(min(cols) + max(cols)) / 2, (min(rows) + max(rows)) / 2], dtype=torch.float64)
    return centre, torch.linalg.norm(centre - corner)


def _displacement(
    cell: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor
) -> torch.Tensor:
    """``v(C)``: the weighted sum over handles of ``s_i(C) (B_i - A_i)``, as ``(dx, dy)``."""
    weights = [1 / (torch.linalg.norm(cell - a) + 1e-4) for a in handles]
    total = sum(weights)
    move = torch.zeros(2, dtype=torch.float64)
    for a, b, weight in zip(handles, targets, weights):
        move = move + (weight / total) * _stretch(cell, a, centre, radius) * (b - a)
    return move


def _stretch(cell: torch.Tensor, handle: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """``s = 1 - |AC|/|AP|`` clamped into [0, 1]; 1 when the cell is the handle."""
    to_cell = cell - handle
    dist = torch.linalg.norm(to_cell)
    if dist == 0:
        return torch.tensor(1.0, dtype=torch.float64)
    from_centre = handle - centre
    l0 = torch.dot(to_cell, from_centre) / dist
    l1 = torch.sqrt(torch.clamp(radius**2 - torch.dot(from_centre, from_centre) + l0**2, min=0))
    to_exit = l1 - l0
    if to_exit <= 0:
        return torch.tensor(0.0, dtype=torch.float64)
    return torch.clamp(1 - dist / to_exit, 0, 1)


def bnni_loops(z: torch.Tensor, null_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """BNNI one cell at a time.

    ``causal=False``: the paper's symmetric fill (probes read the unfilled
    tensor). ``causal=True``: the release's raster fill, whose probes read the
    tensor being filled, so filled cells count as neighbours.
    """
    height, width = null_mask.shape
    out = z.clone()
    source = out if causal else z
    usable = ~null_mask
    for r in range(height):
        for c in range(width):
            if not null_mask[r, c]:
                continue
            hits = _probe(source, usable, r, c)
            if hits:
                out[0, :, r, c] = sum(w * v for w, v in hits) / sum(w for w, _ in hits)
                if causal:
                    usable[r, c] = True
    return out


def _probe(x: torch.Tensor, usable: torch.Tensor, r: int, c: int) -> list[tuple[float, torch.Tensor]]:
    """``(1/k, value)`` of the nearest usable cell in each direction that has one."""
    height, width = usable.shape
    hits = []
    for dr, dc in DIRECTIONS:
        k = 1
        while 0 <= r + k * dr < height and 0 <= c + k * dc < width:
            if usable[r + k * dr, c + k * dc]:
                hits.append((1 / k, x[0, :, r + k * dr, c + k * dc]))
                break
            k += 1
    return hits


def fastdrag_loops(
    z: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, fill: str
) -> torch.Tensor:
    """Warp then fill, like ``dragkit.fastdrag.fastdrag_edit(mode="drag")``, one cell at a time."""
    warped, null_mask = warp_loops(z, handles, targets, mask, empty=fill != "keep")
    if fill == "bnni":
        return bnni_loops(warped, null_mask, causal=False)
    if fill == "bnni_as_released":
        return bnni_loops(warped, null_mask, causal=True)
    return warped
