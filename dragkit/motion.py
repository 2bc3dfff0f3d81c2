"""Motion supervision and point tracking on UNet feature maps (DragDiffusion, GoodDrag).

Feature maps are ``(1, C, H, W)`` at the supervision grid (half the image
resolution; see :mod:`dragkit.geometry`). Points are ``(N, 2)`` float tensors
of ``(x, y)`` grid coordinates, x = column, y = row; handles are integer-valued
(tracking returns whole cells), shifted patches are sampled bilinearly between
cell centres. Patches and search windows are clipped to the map (a patch at
the edge has fewer cells; its mean is over those), so handles on the border
work. Sampling coordinates, losses and tracking costs are float32 whatever
the features' dtype.

Losses follow METHODS.md: a pair whose handle is within ``reach`` (2 cells)
of its target contributes nothing; the patch term is the L1 mean over the
patch times the released weight ((2r1+1)² for DragDiffusion, (2r1)² for
GoodDrag). Each loss reads the points on the host once and samples every
patch in one call, so an iteration waits for the device once per loss, not
once per pair (the per-pair means, hence the loss, are unchanged bit for
bit; an fp16 feature gradient may sum the pairs in another order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .geometry import SUPERVISION_PER_LATENT

REACHED = 2.0
"""A handle within this many supervision cells of its target has arrived."""


def patch_cells(radius: int, height: int, width: int, *centres: torch.Tensor) -> torch.Tensor:
    """Offsets ``(K, 2)`` ``(x, y)`` of the square patch of radius ``radius`` that stay inside the map.

    An offset ``q`` of ``-r..r`` in each direction is kept when ``centre + q``
    lies inside the ``height`` x ``width`` map for every one of the integer
    ``centres``: near the edge the patch shrinks to the cells that exist (as
    DragDiffusion releases it), instead of counting edge cells twice. When two
    patches are compared (GoodDrag, the warp refinement) both centres are given
    so the patches keep the same shape. ``K`` is at least 1.
    """
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    ys, xs = torch.meshgrid(offsets, offsets, indexing="ij")
    cells = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)
    inside = torch.ones(cells.shape[0], dtype=torch.bool)
    for centre in centres:
        x, y = float(centre[0]), float(centre[1])
        inside &= (cells[:, 0] + x >= 0) & (cells[:, 0] + x <= width - 1) & (cells[:, 1] + y >= 0) & (cells[:, 1] + y <= height - 1)
    return cells[inside].to(centres[0].device)


def sample_features(features: torch.Tensor, points_xy: torch.Tensor) -> torch.Tensor:
    """Bilinear samples ``(C, P)`` float32 of ``features`` ``(1, C, H, W)`` at ``(P, 2)`` cell coordinates.

    Cell ``(x, y)`` is the centre of column x, row y; points are clamped into
    the map. Coordinates and weights stay float32 whatever the features'
    dtype, and the four neighbours are read as stored, so integer points return
    the stored values exactly (also in fp16) and gradients reach ``features``.
    """
    _, _, height, width = features.shape
    points = points_xy.to(features.device, torch.float32)
    x = points[:, 0].clamp(0, width - 1)
    y = points[:, 1].clamp(0, height - 1)
    x0, y0 = x.floor(), y.floor()
    wx, wy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=width - 1), (y0 + 1).clamp(max=height - 1)
    maps = features[0]

    def at(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return maps[:, rows, cols].to(torch.float32)

    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top * (1 - wy) + bottom * wy


def unit_directions(handles: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors ``(N, 2)`` from handles toward targets, and the distances ``(N,)`` (0-length: zero vector)."""
    delta = targets.to(torch.float32) - handles.to(torch.float32)
    distance = delta.norm(dim=-1)
    return delta / distance.clamp(min=1e-8)[:, None], distance


def _on_device(points: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Host ``(K_i, 2)`` point lists joined into one ``(ΣK_i, 2)`` tensor on ``device``, in one copy.

    To a GPU the copy goes from pinned memory and does not wait for the
    device: the losses below read their points on the host once per call
    (one synchronisation) and send every patch back in this single copy,
    instead of a round trip per pair.
    """
    joined = torch.cat(points)
    if device.type == "cuda":
        joined = joined.pin_memory()
    return joined.to(device, non_blocking=True)


def _patch_means(features: torch.Tensor, moved: list[torch.Tensor], fixed: list[torch.Tensor],
                 fixed_features: torch.Tensor, weight: int) -> torch.Tensor:
    """Σ_i weight · mean|F(moved_i) − sg(F_fixed(fixed_i))| over pairs i, sampling every patch in one call per map.

    ``moved``/``fixed`` are host ``(K_i, 2)`` points (the same K_i per pair);
    each pair's mean is taken over its own contiguous ``(C, K_i)`` block, as
    if sampled alone.
    """
    loss = features.new_zeros((), dtype=torch.float32)
    if not moved:
        return loss
    sizes = [len(points) for points in moved]
    points = _on_device(moved + fixed, features.device)
    total = sum(sizes)
    shifted = sample_features(features, points[:total]).split(sizes, dim=1)
    reference = sample_features(fixed_features, points[total:]).detach().split(sizes, dim=1)
    for now, then in zip(shifted, reference):
        loss = loss + weight * (now.contiguous() - then.contiguous()).abs().mean()
    return loss


def dragdiffusion_loss(features: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """DragDiffusion's motion supervision term.

    For each pair not yet within :data:`REACHED` of its target: the features
    on the patch shifted one cell toward the target (bilinear) are pulled
    toward the detached features on the patch at the current handle;
    L1 mean times the patch size (2r+1)², summed over pairs.

    Args:
        features: current features ``(1, C, H, W)`` (with gradient).
        handles: current handles ``(N, 2)``, integer-valued grid ``(x, y)``.
        targets: targets ``(N, 2)`` grid ``(x, y)``.
        radius: r1.
    """
    _, _, height, width = features.shape
    directions, distance = unit_directions(handles, targets)
    pairs = torch.cat([handles.to(torch.float32), directions, distance[:, None]], dim=1).cpu()
    moved, fixed = [], []
    for handle, direction, dist in zip(pairs[:, :2], pairs[:, 2:4], pairs[:, 4]):
        if dist < REACHED:
            continue
        cells = handle + patch_cells(radius, height, width, handle)
        moved.append(cells + direction)
        fixed.append(cells)
    return _patch_means(features, moved, fixed, features, (2 * radius + 1) ** 2)


def gooddrag_loss(
    features: torch.Tensor,
    original_features: torch.Tensor,
    handles: torch.Tensor,
    initial_handles: torch.Tensor,
    targets: torch.Tensor,
    radius: int = 4,
    max_step: float = 4.0,
) -> torch.Tensor:
    """GoodDrag's information-preserving motion supervision term.

    For each pair not yet within :data:`REACHED` of its target: the features
    on the patch around ``handle + min(max_step, distance) · d`` (bilinear)
    are pulled toward the **original** features (unedited latent, same
    timestep) on the patch around the **initial** handle; L1 mean times
    (2r)² as released, summed over pairs.
    """
    _, _, height, width = features.shape
    directions, distance = unit_directions(handles, targets)
    pairs = torch.cat(
        [handles.to(torch.float32), initial_handles.to(torch.float32), directions, distance[:, None]], dim=1
    ).cpu()
    moved, fixed = [], []
    for handle, start, direction, dist in zip(pairs[:, :2], pairs[:, 2:4], pairs[:, 4:6], pairs[:, 6]):
        if dist < REACHED:
            continue
        offsets = patch_cells(radius, height, width, start, handle)
        moved.append(handle + offsets + direction * min(max_step, float(dist)))
        fixed.append(start + offsets)
    return _patch_means(features, moved, fixed, original_features, (2 * radius) ** 2)


def appearance_loss(
    features: torch.Tensor, source_features: torch.Tensor, at: torch.Tensor, source_at: torch.Tensor, radius: int
) -> torch.Tensor:
    """Pull the patches of ``features`` around ``at`` toward ``source_features`` around ``source_at``.

    Σ_i (2r+1)² · mean|F(at_i + q) − sg(F_src(source_at_i + q))| over integer
    patches; used by the warp-then-refine hybrid, where the warp has already
    put each handle's content at its target.
    """
    _, _, height, width = features.shape
    points = torch.cat([at.to(torch.float32), source_at.to(torch.float32)], dim=1).cpu()
    moved, fixed = [], []
    for point, origin in zip(points[:, :2], points[:, 2:]):
        offsets = patch_cells(radius, height, width, point, origin)
        moved.append(point + offsets)
        fixed.append(origin + offsets)
    return _patch_means(features, moved, fixed, source_features, (2 * radius + 1) ** 2)


def track_points(
    original_features: torch.Tensor,
    features: torch.Tensor,
    handles: torch.Tensor,
    initial_handles: torch.Tensor,
    radius: int,
) -> torch.Tensor:
    """Move each handle to the cell of its search window that best matches its original feature.

    For handle i the template is ``original_features`` at ``initial_handles[i]``;
    the window is the (2r+1)² cells around ``handles[i]`` clipped to the map;
    the distance is L1 over channels, summed in float32 (an fp16 sum over
    hundreds of channels rounds near-ties the wrong way); ties go to the first
    cell in raster order. Returns integer-valued ``(N, 2)`` grid ``(x, y)``.
    All handles at once on the features' device, with no copy to the host.
    """
    _, _, height, width = features.shape
    with torch.no_grad():
        offsets = torch.arange(-radius, radius + 1, device=features.device)
        dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
        window = torch.stack([dx.reshape(-1), dy.reshape(-1)], dim=-1)  # (K, 2) (x, y), raster order
        centres = handles.to(features.device).long()
        candidates = centres[:, None, :] + window[None]  # (N, K, 2)
        inside = ((candidates[..., 0] >= 0) & (candidates[..., 0] < width)
                  & (candidates[..., 1] >= 0) & (candidates[..., 1] < height))
        xs = candidates[..., 0].clamp(0, width - 1)
        ys = candidates[..., 1].clamp(0, height - 1)
        starts = initial_handles.to(features.device).long()
        templates = original_features[0][:, starts[:, 1], starts[:, 0]].float()  # (C, N)
        cost = (features[0][:, ys, xs].float() - templates[:, :, None]).abs().sum(0)  # (N, K)
        best = cost.masked_fill(~inside, float("inf")).argmin(dim=1)
        tracked = candidates[torch.arange(len(best), device=best.device), best]
    return tracked.to(device=handles.device, dtype=torch.float32).reshape(-1, 2)


def all_reached(handles: torch.Tensor, targets: torch.Tensor) -> bool:
    """Whether every handle is within :data:`REACHED` cells of its target."""
    return bool((unit_directions(handles, targets)[1] < REACHED).all())


def mask_regularisation(z_prev: torch.Tensor, z_prev_original: torch.Tensor, keep: torch.Tensor, weight: float) -> torch.Tensor:
    """λ Σ |(z_{t-1} − z⁰_{t-1}) ⊙ (1 − M)|: a sum over the latent, as released.

    ``keep`` is the ``(h, w)`` latent-resolution map of cells to keep
    (1 − editable mask); latents are ``(1, C, h, w)``.
    """
    return weight * ((z_prev.float() - z_prev_original.float()).abs() * keep.to(z_prev.device, torch.float32)).sum()


def supervision_grid(latent: torch.Tensor) -> tuple[int, int]:
    """``(height, width)`` of the supervision grid of a ``(1, C, h, w)`` latent (:data:`SUPERVISION_PER_LATENT` cells per latent cell)."""
    return latent.shape[-2] * SUPERVISION_PER_LATENT, latent.shape[-1] * SUPERVISION_PER_LATENT


def supervision_features(features: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Upsample ``(B, C, h_f, w_f)`` UNet features bilinearly (align_corners=False) to the supervision grid."""
    return F.interpolate(features, size=grid_hw, mode="bilinear", align_corners=False)

