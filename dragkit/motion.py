"""Motion supervision and point tracking on UNet feature maps (DragDiffusion, GoodDrag).

Feature maps are ``(1, C, H, W)`` at the supervision grid (half the image
resolution; see :mod:`dragkit.geometry`). Points are ``(N, 2)`` float tensors
of ``(x, y)`` grid coordinates, x = column, y = row; handles are integer-valued
(tracking returns whole cells), shifted patches are sampled bilinearly between
cell centres. Patches and search windows are clipped to the map, so handles on
the border work.

Losses follow METHODS.md: a pair whose handle is within ``reach`` (2 cells)
of its target contributes nothing; the patch term is the L1 mean over the
patch times the released weight ((2r1+1)² for DragDiffusion, (2r1)² for
GoodDrag).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .geometry import SUPERVISION_PER_LATENT

REACHED = 2.0
"""A handle within this many supervision cells of its target has arrived."""


def patch_grid(centre: torch.Tensor, radius: int, height: int, width: int) -> torch.Tensor:
    """Cell coordinates ``((2r+1)², 2)`` ``(x, y)`` of the square patch around an integer ``centre``, clipped to the map."""
    offsets = torch.arange(-radius, radius + 1, device=centre.device, dtype=torch.float32)
    ys, xs = torch.meshgrid(offsets, offsets, indexing="ij")
    cells = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1) + centre.to(torch.float32)
    limit = torch.tensor([width - 1, height - 1], device=centre.device, dtype=torch.float32)
    return torch.minimum(cells.clamp(min=0), limit)


def sample_features(features: torch.Tensor, points_xy: torch.Tensor) -> torch.Tensor:
    """Bilinear samples ``(C, P)`` of ``features`` ``(1, C, H, W)`` at ``(P, 2)`` cell coordinates.

    Cell ``(x, y)`` is the centre of column x, row y, so integer points return
    the stored values exactly; points are clamped into the map.
    """
    _, _, height, width = features.shape
    scale = torch.tensor([max(width - 1, 1), max(height - 1, 1)], device=points_xy.device, dtype=torch.float32)
    grid = (points_xy.to(torch.float32) / scale * 2 - 1).to(features.dtype)
    out = F.grid_sample(features, grid[None, None], mode="bilinear", padding_mode="border", align_corners=True)
    return out[0, :, 0, :]


def unit_directions(handles: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors ``(N, 2)`` from handles toward targets, and the distances ``(N,)`` (0-length: zero vector)."""
    delta = targets.to(torch.float32) - handles.to(torch.float32)
    distance = delta.norm(dim=-1)
    return delta / distance.clamp(min=1e-8)[:, None], distance


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
    loss = features.new_zeros((), dtype=torch.float32)
    for handle, direction, dist in zip(handles, directions, distance):
        if dist < REACHED:
            continue
        cells = patch_grid(handle, radius, height, width)
        anchor = sample_features(features, cells).detach()
        shifted = sample_features(features, cells + direction)
        loss = loss + (2 * radius + 1) ** 2 * (shifted.float() - anchor.float()).abs().mean()
    return loss


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
    loss = features.new_zeros((), dtype=torch.float32)
    for handle, start, direction, dist in zip(handles, initial_handles, directions, distance):
        if dist < REACHED:
            continue
        reference = sample_features(original_features, patch_grid(start, radius, height, width)).detach()
        moved = patch_grid(handle, radius, height, width) + direction * min(max_step, float(dist))
        shifted = sample_features(features, moved)
        loss = loss + (2 * radius) ** 2 * (shifted.float() - reference.float()).abs().mean()
    return loss


def appearance_loss(
    features: torch.Tensor, source_features: torch.Tensor, at: torch.Tensor, source_at: torch.Tensor, radius: int
) -> torch.Tensor:
    """Pull the patches of ``features`` around ``at`` toward ``source_features`` around ``source_at``.

    Σ_i (2r+1)² · mean|F(at_i + q) − sg(F_src(source_at_i + q))| over integer
    patches; used by the warp-then-refine hybrid, where the warp has already
    put each handle's content at its target.
    """
    _, _, height, width = features.shape
    loss = features.new_zeros((), dtype=torch.float32)
    for point, origin in zip(at, source_at):
        moved = sample_features(features, patch_grid(point, radius, height, width))
        reference = sample_features(source_features, patch_grid(origin, radius, height, width)).detach()
        loss = loss + (2 * radius + 1) ** 2 * (moved.float() - reference.float()).abs().mean()
    return loss


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
    the distance is L1 over channels; ties go to the first cell in raster
    order. Returns integer-valued ``(N, 2)`` grid ``(x, y)``.
    """
    _, channels, height, width = features.shape
    tracked = []
    with torch.no_grad():
        for handle, start in zip(handles, initial_handles):
            template = original_features[0, :, int(start[1]), int(start[0])]
            x0, x1 = max(int(handle[0]) - radius, 0), min(int(handle[0]) + radius, width - 1)
            y0, y1 = max(int(handle[1]) - radius, 0), min(int(handle[1]) + radius, height - 1)
            window = features[0, :, y0 : y1 + 1, x0 : x1 + 1]
            cost = (window - template[:, None, None]).abs().sum(0)
            best = int(torch.argmin(cost.reshape(-1)))
            cols = x1 - x0 + 1
            tracked.append([x0 + best % cols, y0 + best // cols])
    return torch.tensor(tracked, dtype=torch.float32, device=handles.device).reshape(-1, 2)


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


def mask_term_on(keep: torch.Tensor, lam: float) -> bool:
    """Whether the mask regularisation applies: some latent cell is kept and λ > 0."""
    return bool(keep.any()) and lam > 0


def supervision_features(features: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Upsample ``(B, C, h_f, w_f)`` UNet features bilinearly (align_corners=False) to the supervision grid."""
    return F.interpolate(features, size=grid_hw, mode="bilinear", align_corners=False)


class LossScale:
    """Dynamic loss scaling for one parameter: grow after clean steps, halve and skip on overflow."""

    def __init__(self, enabled: bool) -> None:
        self.scale = 2.0**10 if enabled else 1.0
        self.enabled = enabled
        self.clean = 0

    def step(self, loss: torch.Tensor, latent: torch.Tensor, optimiser: torch.optim.Optimizer) -> None:
        optimiser.zero_grad(set_to_none=True)
        (loss * self.scale).backward()
        grad = latent.grad
        if self.enabled and not torch.isfinite(grad).all():
            self.scale /= 2
            self.clean = 0
            return
        grad.div_(self.scale)
        optimiser.step()
        self.clean += 1
        if self.enabled and self.clean % 200 == 0:
            self.scale *= 2
