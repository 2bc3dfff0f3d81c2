"""DragFlow's region-level motion supervision on a FLUX flow latent (``Dragger.dragger_step``, ICLR 2026).

Each drag moves a whole *region*: the connected part of the editor's mask that
holds the handle. At the single released timestep (t*, where inversion
stopped) the latent ``z`` is optimised with plain gradient steps so that the
double-stream features of ``z`` inside the region's moved copy equal the
unedited latent's features carried along by the same move:

    F(z)      = concat over the feature blocks of unpack(tokens), resized to the supervision grid
    A_w(x)    = x + w · d                                  (translation of the region, d = target - handle)
    R_w       = R_0 ∘ A_w⁻¹ > 0.5                          (the moved region)
    L(z)      = Σ_ops ω_op · mean( | F(z) · R_w  -  (F(z_orig) ∘ A_w⁻¹) · R_w | )
    z         ← m · (z - lr · ∇_z L) + (1 - m) · z_bg      (m: the gradient mask, z_bg: the unedited latent)

with ``w = min(1, (i + 1) / transport_steps)`` over ``transport_steps``
iterations (the map interpolated from identity to the full move), then
``intensify_steps`` more at ``w = 1``. ``mean`` runs over every element of the
``(1, C, H_f, W_f)`` feature maps (``F.l1_loss``), ``ω`` are the region weights
(1 for one region). The gradient mask ``m`` is, per region, the minimum-area
(rotated) rectangle around the region and its moved copy, unioned, resized to
the latent with a 0.5 threshold.

Coordinates: points and masks in source-image pixels, ``(x, y)``, x right and
y down. The supervision grid (``cut``) is the image at 1/s of its size (s = 2,
3 or 4 by image size, as released); a point ``p`` maps to ``round(p · cut / image)``.
Latents are FLUX's ``(1, 16, h, w)`` float32 in the model's space; features
are ``(1, hidden / 4 · blocks, H_f, W_f)``: each image token's ``hidden``
values unpacked as ``(hidden / 4, 2, 2)`` onto its 2x2 latent patch (the
release's ``decode_for_calculation``), then bilinearly resized.

Sampling (KV-Injected Sample) follows. The release also blends the
background from an unedited branch at every sampling step and conditions on
an IP-Adapter (InstantCharacter) and an MLLM prompt; those are not part of
this module (docs/methods.md, DragFlow).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F

from .attention import KVInjector
from .errors import DragInputError
from .flow import FlowCache, check_latent, released_pairing
from .flow_hooks import FEATURE_POINTS
from .flow_module import unpack

FeatureKey = tuple[int, str]
"""``(double block number, point)``, point one of :data:`dragkit.flow_hooks.FEATURE_POINTS`."""

FeaturePredictor = Callable[[torch.Tensor, float, bool], tuple["torch.Tensor | None", dict]]
"""``predict(z, t, with_velocity) -> (velocity or None, {FeatureKey: tokens (1, tokens, hidden)})``; gradients flow to ``z``."""

FeatureLoop = Callable[[FeaturePredictor, torch.Tensor], torch.Tensor]

Progress = Callable[[int, float], None]
"""``progress(iterations_done, loss)``; may raise to cancel (ComfyUI's interrupt)."""


class FlowFeatureBackend(Protocol):
    """What the supervision needs of a flow transformer besides :class:`dragkit.flow.FlowBackend`."""

    @property
    def model_key(self) -> str: ...

    def double_block_count(self) -> int: ...

    def run_features(
        self, loop: FeatureLoop, x_start: torch.Tensor, conditioning: Any, control, times: list[float],
        blocks: tuple[FeatureKey, ...], checkpointing: bool,
    ) -> torch.Tensor:
        """Run ``loop`` with autograd on, a :data:`FeaturePredictor` whose blocks call ``control`` on their keys/values.

        ``times``: the times the loop evaluates (the host's sampler machinery may want them).

        ``checkpointing``: recompute the double blocks' activations in the backward instead of keeping them.
        The loop's result comes back detached, float32, on ``x_start``'s device.
        """


@dataclass(frozen=True)
class DragFlowSettings:
    """DragFlow's released defaults (``framework/config.yaml``).

    Attributes:
        transport_steps: iterations over which the region's map goes from identity to the full move (``max_dragging_num``).
        intensify_steps: further iterations at the full move (``max_intensify_num``).
        lr: gradient step size on the latent (``lr``; ``use_optimizer: False``: plain steps).
        feature_blocks: ``(block, point)`` pairs; ``None``: :func:`default_feature_blocks` of the model.
        gradient_checkpointing: recompute the double blocks in the backward (the release enables it).
        half_step_background: the release's background, the unedited latent half a solver step ahead
            (``z_orig + (t_prev - t_curr) / 2 · v``); off: the unedited latent at t* itself (see docs/methods.md).
    """

    transport_steps: int = 50
    intensify_steps: int = 20
    lr: float = 1000.0
    feature_blocks: tuple[FeatureKey, ...] | None = None
    gradient_checkpointing: bool = True
    half_step_background: bool = False

    @property
    def iterations(self) -> int:
        return self.transport_steps + self.intensify_steps


RELEASED_FEATURE_BLOCKS = (17, 18)
"""The double blocks DragFlow reads (``DOUBLE-17-0/2``, ``DOUBLE-18-0/2``) of FLUX.1's 19: the last two."""


def default_feature_blocks(double_blocks: int) -> tuple[FeatureKey, ...]:
    """The released feature blocks on a model with ``double_blocks`` double-stream blocks.

    17 and 18 of FLUX.1's 19 are its last two; a model of another depth gets its
    last two (its only one if it has one), each at both released points.
    """
    if double_blocks < 1:
        raise DragInputError("this flow model has no double-stream blocks to read features from")
    numbers = sorted({max(double_blocks - 2, 0), double_blocks - 1})
    return tuple((number, point) for number in numbers for point in FEATURE_POINTS)


def scale_level(image_hw: tuple[int, int]) -> int:
    """The release's feature-grid divisor for an image of ``image_hw`` pixels: 4 above 1000 px mean side, 3 above 600, else 2."""
    mean_side = sum(image_hw) / 2.0
    return 4 if mean_side > 1000 else 3 if mean_side > 600 else 2


def cut_shape(latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The supervision grid ``(H_f, W_f)`` for a FLUX latent of ``latent_hw`` (image = 8x the latent, as encoded)."""
    full = (latent_hw[0] * 8, latent_hw[1] * 8)
    s = scale_level(full)
    return full[0] // s, full[1] // s


def _grow(seed: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The 8-connected part of ``allowed`` reachable from ``seed`` (both ``(H, W)`` bool)."""
    current = seed & allowed
    while True:
        grown = F.max_pool2d(current[None, None].float(), 3, 1, 1)[0, 0].bool() & allowed
        if torch.equal(grown, current):
            return current
        current = grown


def region_at(mask: torch.Tensor, x: float, y: float) -> torch.Tensor | None:
    """The filled 8-connected component of ``mask > 0.5`` holding pixel ``(x, y)``, ``(H, W)`` bool; ``None`` outside.

    "Filled": holes inside the component belong to it (the release draws each external contour filled).
    """
    inside = mask > 0.5
    h, w = inside.shape
    col, row = int(round(x)), int(round(y))
    if not (0 <= row < h and 0 <= col < w) or not inside[row, col]:
        return None
    seed = torch.zeros_like(inside)
    seed[row, col] = True
    component = _grow(seed, inside)
    border = torch.zeros_like(inside)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    outside = _grow(border, ~component)
    return ~outside


def _convex_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Andrew's monotone chain; counter-clockwise, no repeated end point."""
    pts = sorted(set(points))
    if len(pts) < 3:
        return pts

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


def min_area_rect(shape: torch.Tensor) -> torch.Tensor:
    """The pixels of the minimum-area rectangle (any rotation) around the pixel centres of ``shape``, ``(H, W)`` bool.

    Rotating calipers over the convex hull (the release: ``cv2.minAreaRect`` of the contours,
    drawn filled); a pixel is in when its centre is within half a pixel of the rectangle.
    """
    boundary = shape & ~(-F.max_pool2d(-shape[None, None].float(), 3, 1, 1)[0, 0] > 0.5)
    ys, xs = torch.nonzero(boundary | (shape & _edge(shape)), as_tuple=True)
    hull = torch.tensor(_convex_hull(list(zip(xs.tolist(), ys.tolist()))), dtype=torch.float64)  # shape is never empty
    edges = torch.roll(hull, -1, 0) - hull
    angles = torch.atan2(edges[:, 1], edges[:, 0])
    u = torch.stack([torch.cos(angles), torch.sin(angles)], 1)  # (K, 2)
    v = torch.stack([-u[:, 1], u[:, 0]], 1)
    pu, pv = hull @ u.T, hull @ v.T  # (points, K)
    lo_u, hi_u, lo_v, hi_v = pu.min(0).values, pu.max(0).values, pv.min(0).values, pv.max(0).values
    best = int(torch.argmin((hi_u - lo_u) * (hi_v - lo_v)))
    h, w = shape.shape
    gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    qu = gx * u[best, 0] + gy * u[best, 1]
    qv = gx * v[best, 0] + gy * v[best, 1]
    tol = 0.5 + 1e-9
    return (qu >= lo_u[best] - tol) & (qu <= hi_u[best] + tol) & (qv >= lo_v[best] - tol) & (qv <= hi_v[best] + tol)


def _edge(shape: torch.Tensor) -> torch.Tensor:
    """Pixels on the image's border (an object touching it has its contour there)."""
    edge = torch.zeros_like(shape)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
    return edge


def translated(region: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """``region`` moved by whole pixels ``(dx, dy)``; what leaves the image is dropped."""
    h, w = region.shape
    out = torch.zeros_like(region)
    src = region[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
    out[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    return out


def region_weights(regions: list[torch.Tensor]) -> list[float]:
    """The release's loss weights: 1 for one region; else ``clamp(1 + 0.5 / (area fraction + 0.1), 1, 5)``, normalised to sum 1."""
    if len(regions) == 1:
        return [1.0]
    raw = [min(max(1.0 + 0.5 / (float(r.float().mean()) + 0.1), 1.0), 5.0) for r in regions]
    return [r / sum(raw) for r in raw]


@dataclass(frozen=True)
class RegionOperation:
    """One moved region on the supervision grid.

    Attributes:
        region: ``(1, 1, H_f, W_f)`` float, the source region resized (bilinear, not thresholded).
        delta: ``(dx, dy)`` of the full move, whole supervision cells (``round(target) - round(handle)``).
        weight: the region's loss weight.
    """

    region: torch.Tensor
    delta: tuple[float, float]
    weight: float


@dataclass(frozen=True)
class DragFlowPlan:
    """Everything the supervision needs of the editor's input.

    Attributes:
        operations: one :class:`RegionOperation` per handle/target pair.
        cut: the supervision grid ``(H_f, W_f)``.
        editable: ``(1, 1, h, w)`` float 0/1 on the latent, the gradient mask ``m``.
    """

    operations: tuple[RegionOperation, ...]
    cut: tuple[int, int]
    editable: torch.Tensor


def plan_dragflow(mask: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor, latent_hw: tuple[int, int]) -> DragFlowPlan:
    """The regions, their moves and the gradient mask from the editor's input.

    Args:
        mask: ``(H, W)`` in 0..1 on the source image; each handle must lie in it.
        handles, targets: ``(N, 2)`` pixel ``(x, y)`` on the source image.
        latent_hw: the FLUX latent's ``(h, w)``.
    """
    if mask.dim() != 2:
        raise DragInputError(f"the mask must be (H, W), got shape {tuple(mask.shape)}")
    height, width = mask.shape
    cut = cut_shape(latent_hw)
    regions, moved = [], []
    for i, ((hx, hy), (tx, ty)) in enumerate(zip(handles.tolist(), targets.tolist())):
        region = region_at(mask, hx, hy)
        if region is None:
            raise DragInputError(
                f"handle {i + 1} at ({hx:.0f}, {hy:.0f}) is outside the mask; dragflow moves the masked region that "
                "holds each handle: paint the region to move over the handle"
            )
        regions.append(region)
        dx, dy = int(round(tx - hx)), int(round(ty - hy))
        moved.append(min_area_rect(region | translated(region, dx, dy)))
    weights = region_weights(regions)
    sy, sx = cut[0] / height, cut[1] / width
    operations = []
    for region, weight, (hx, hy), (tx, ty) in zip(regions, weights, handles.tolist(), targets.tolist()):
        delta = (float(round(tx * sx) - round(hx * sx)), float(round(ty * sy) - round(hy * sy)))
        fit = F.interpolate(region[None, None].float(), size=cut, mode="bilinear", align_corners=False)
        operations.append(RegionOperation(fit, delta, weight))
    union = torch.stack(moved).any(0).float()[None, None]
    editable = (F.interpolate(union, size=tuple(latent_hw), mode="bilinear", align_corners=False) > 0.5).float()
    return DragFlowPlan(tuple(operations), cut, editable)


def translation_grid(delta: tuple[float, float], weight: float, shape: tuple[int, int]) -> torch.Tensor:
    """The sampling grid of ``A_w⁻¹`` (``affine_grid``, align_corners False): output pixel x samples x - w·d."""
    h, w = shape
    theta = torch.tensor([[1.0, 0.0, -2.0 * delta[0] * weight / w], [0.0, 1.0, -2.0 * delta[1] * weight / h]])
    return F.affine_grid(theta[None], [1, 1, h, w], align_corners=False)


def feature_map(features: dict, blocks: tuple[FeatureKey, ...], latent_hw: tuple[int, int], cut: tuple[int, int]) -> torch.Tensor:
    """``(1, Σ hidden / 4, H_f, W_f)`` float32: each block's image tokens unpacked onto the latent and resized to ``cut``."""
    h, w = latent_hw
    tokens = (h // 2) * (w // 2)
    maps = [
        F.interpolate(unpack(features[key][:, :tokens].float(), h, w), size=cut, mode="bilinear", align_corners=False)
        for key in blocks
    ]
    return torch.cat(maps, dim=1)


def progressive_weight(iteration: int, settings: DragFlowSettings) -> float:
    """``w`` at iteration ``iteration`` (0-based): ``(i + 1) / transport_steps`` up to 1, then 1."""
    return min(1.0, (iteration + 1) / settings.transport_steps)


def region_loss(features: torch.Tensor, reference: torch.Tensor, plan: DragFlowPlan, weight: float) -> torch.Tensor:
    """``L`` for the current features and the unedited ones (both ``(1, C, H_f, W_f)``) at progressive weight ``weight``."""
    loss = features.new_zeros(())
    for op in plan.operations:
        grid = translation_grid(op.delta, weight, plan.cut).to(features.device, features.dtype)
        moved_region = F.grid_sample(op.region.to(features.device, features.dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        moved_reference = F.grid_sample(reference, grid, mode="bilinear", padding_mode="border", align_corners=False)
        inside = (moved_region > 0.5).to(features.dtype)
        loss = loss + F.l1_loss(features * inside, moved_reference * inside) * op.weight
    return loss


def supervision_gradient(
    predict: FeaturePredictor, z: torch.Tensor, t: float, reference: torch.Tensor, plan: DragFlowPlan,
    blocks: tuple[FeatureKey, ...], weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One iteration's loss and ``∇_z L`` (both detached) for latent ``z`` ``(1, C, h, w)`` at time ``t``."""
    z = z.detach().clone().requires_grad_(True)  # a copy: the input may be an inference tensor (ComfyUI)
    _, captured = predict(z, t, False)
    loss = region_loss(feature_map(captured, blocks, tuple(z.shape[-2:]), plan.cut), reference, plan, weight)
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), grad.detach()


class _ResidentCall:
    """The cache as :class:`~dragkit.attention.KVInjector` reads it, keeping each block's keys/values where they were
    first moved: every supervision pass injects the same recorded call, so an offloaded cache crosses to the
    compute device once (FLUX.1 at 1024², 13 blocks: about 0.65 GiB) instead of once per pass."""

    def __init__(self, cache: FlowCache) -> None:
        self.cache = cache
        self.layers = cache.layers
        self._moved: dict = {}

    def kv_at(self, call: int, layer, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (call, layer.index, str(device), dtype)
        if key not in self._moved:
            self._moved[key] = self.cache.kv_at(call, layer, device, dtype)
        return self._moved[key]


@dataclass
class DragFlowResult:
    """The optimised latent ``(1, C, h, w)`` at t* and the loss of every iteration."""

    latent: torch.Tensor
    losses: list[float] = field(default_factory=list)


def drag_flow(
    backend: FlowFeatureBackend,
    z: torch.Tensor,
    conditioning: Any,
    cache: FlowCache,
    plan: DragFlowPlan,
    settings: DragFlowSettings = DragFlowSettings(),
    progress: Progress | None = None,
) -> DragFlowResult:
    """DragFlow's region supervision of ``z`` at t* (``cache.schedule.t_star``).

    Args:
        backend: the model that recorded ``cache``.
        z: the latent to optimise at t*, ``(1, C, h, w)`` (DDIM Invert's, or a warped one); the unedited
            latent is the cache's ``x_star``.
        conditioning: the backend's (DragFlow: the sampling prompt at guidance 3.5).
        cache: the inversion's; its recorded keys/values of the call paired with t* (the last one,
            :func:`dragkit.flow.released_pairing`) are injected into every supervision pass, as the
            release's hooks do.
        plan: :func:`plan_dragflow`.
        settings: steps, learning rate, feature blocks, checkpointing.
        progress: called after each iteration.
    """
    check_latent(z, "latent")
    cache.check_compatible(z, backend.model_key)
    if settings.transport_steps < 1 or settings.intensify_steps < 0:
        raise DragInputError("dragflow needs at least one transport step and no negative intensify steps")
    if not math.isfinite(settings.lr) or settings.lr <= 0:
        raise DragInputError(f"the learning rate must be a positive number, got {settings.lr}")
    blocks = settings.feature_blocks or default_feature_blocks(backend.double_block_count())
    schedule = cache.schedule
    t_curr, t_prev = schedule.sigmas[schedule.skip], schedule.sigmas[schedule.skip + 1]
    call = released_pairing(len(cache.call_times), 1)[0]
    control = KVInjector(_ResidentCall(cache), cache.layers, {call})
    control.begin_step(call)
    losses: list[float] = []

    def loop(predict: FeaturePredictor, x: torch.Tensor) -> torch.Tensor:
        z_orig = cache.x_star.to(x.device, torch.float32)
        with torch.no_grad():
            velocity, captured = predict(z_orig, t_curr, settings.half_step_background)
            reference = feature_map(captured, blocks, tuple(x.shape[-2:]), plan.cut).detach()
        background = z_orig + (t_prev - t_curr) / 2 * velocity if settings.half_step_background else z_orig
        editable = plan.editable.to(x.device)
        for i in range(settings.iterations):
            loss, grad = supervision_gradient(predict, x, t_curr, reference, plan, blocks, progressive_weight(i, settings))
            x = background * (1 - editable) + (x - settings.lr * grad) * editable
            losses.append(float(loss))
            if progress is not None:
                progress(i + 1, losses[-1])
        return x

    out = backend.run_features(loop, z.to(torch.float32), conditioning, control, [t_curr], blocks, settings.gradient_checkpointing)
    return DragFlowResult(out, losses)
