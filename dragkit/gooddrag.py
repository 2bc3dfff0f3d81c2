"""GoodDrag: alternating drag and denoising (AlDD) with information-preserving motion supervision.

METHODS.md, "GoodDrag". Over the first ``drag_steps`` (T) denoising steps
after the edited latent's step, each step does ``drags_per_step`` (B) drag
operations on the latent at that step and then one DDIM step. A drag
operation is ``grad_steps`` (J) Adam steps (lr 0.02) followed by one point
tracking. Each gradient step minimises

    Σ_i (2r1)² · mean|F(h_i + q + β_i d_i) − sg(F⁰_t(h⁰_i + q))|  +  λ Σ |(z_{t-1} − z⁰_{t-1}) ⊙ (1 − M)|

with β_i = min(β, distance to target), F⁰_t the unedited latent's features
at the same timestep around the original handle (information preserving),
z⁰_{t-1} the unedited latent's next step, r1 = 4, λ = 0.2. Tracking uses
F⁰_t at the original handles and a ±r2 window (r2 = 12); it also runs once at
the start of every denoising step. Dragging ends for good when every handle
is within 2 cells of its target, or after ``max_unchanged`` drag operations in
a row left the handles where they were (10; 0 = never).

The unedited latent is denoised alongside without gradients; its features
and next steps are the targets above. The result states the step it reached
(start + number of denoising steps done), where sampling resumes (use
KV-Injected Sample's reference-branch mode, which switches mutual
self-attention on from there as GoodDrag does after dragging ends).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .attention import AttentionControl
from .backend import DiffusionBackend, FeaturePredictor
from .errors import DragInputError
from .motion import (
    LossScale,
    all_reached,
    gooddrag_loss,
    mask_regularisation,
    mask_term_on,
    supervision_features,
    supervision_grid,
    track_points,
)
from .schedule import DDIMSchedule, ddim_step, predicted_x0

DragCallback = Callable[[int, int, torch.Tensor, "torch.Tensor | None"], None]
"""``callback(drag_operations_done, total_operations, handles, x0_prediction or None)``; may raise to cancel."""


@dataclass(frozen=True)
class GoodDragSettings:
    """GoodDrag's knobs (defaults as released in the UI)."""

    drag_steps: int = 7
    drags_per_step: int = 10
    grad_steps: int = 3
    lr: float = 0.02
    lam: float = 0.2
    r1: int = 4
    r2: int = 12
    beta: float = 4.0
    max_unchanged: int = 10

    def __post_init__(self) -> None:
        if min(self.drag_steps, self.drags_per_step, self.grad_steps) < 1:
            raise DragInputError("GoodDrag's T (drag steps), B (drags per step) and J (gradient steps) must be at least 1")
        if not self.lr > 0 or self.beta <= 0:
            raise DragInputError("the learning rate and β must be positive")
        if self.lam < 0 or self.r1 < 0 or self.r2 < 0 or self.max_unchanged < 0:
            raise DragInputError("λ, r1, r2 and the early-stop count must not be negative")

    @property
    def total_operations(self) -> int:
        """K = T · B drag operations at most."""
        return self.drag_steps * self.drags_per_step


@dataclass
class GoodDragResult:
    """The latent after the drag phase and what the phase did.

    Attributes:
        latent: VP latent at ``schedule.timesteps[step_index]``, ``(1, C, h, w)``.
        step_index: the step reached (the input's + ``denoising_steps``).
        handles: final tracked handles, supervision-grid ``(x, y)``.
        drag_operations, gradient_steps, denoising_steps: counts.
    """

    latent: torch.Tensor
    step_index: int
    handles: torch.Tensor
    drag_operations: int = 0
    gradient_steps: int = 0
    denoising_steps: int = 0


def good_drag(
    backend: DiffusionBackend,
    z: torch.Tensor,
    conditioning: Any,
    schedule: DDIMSchedule,
    step_index: int,
    handles: torch.Tensor,
    targets: torch.Tensor,
    keep: torch.Tensor,
    settings: GoodDragSettings = GoodDragSettings(),
    callback: DragCallback | None = None,
) -> GoodDragResult:
    """Run GoodDrag's drag phase from the noisy latent ``z`` at ``schedule.timesteps[step_index]``.

    ``handles``/``targets`` are ``(N, 2)`` supervision-grid ``(x, y)``;
    ``keep`` is the ``(h, w)`` latent map of cells to keep (all zeros: no
    mask term). See the module docstring for the algorithm.
    """
    timesteps = schedule.timesteps
    steps = min(settings.drag_steps, len(timesteps) - step_index)
    if steps < 1:
        raise DragInputError("the latent is already at the last step; GoodDrag needs steps left to drag in")
    grid = supervision_grid(z)
    use_mask = mask_term_on(keep, settings.lam)
    result = GoodDragResult(z, step_index, handles.to(torch.float32).clone())

    def loop(predict: FeaturePredictor, z_start: torch.Tensor) -> torch.Tensor:
        # Fresh copies: tensors a host made in inference mode may not be saved for backward.
        start = handles.to(z_start.device, torch.float32).clone()
        current = start.clone()
        goal = targets.to(z_start.device, torch.float32).clone()
        keep_map = keep.to(z_start.device, torch.float32).clone()
        latent = z_start.detach().clone()
        unedited = z_start.detach().clone()
        dragging, unchanged = True, 0
        for offset in range(steps):
            t = timesteps[step_index + offset]
            alpha, alpha_prev = schedule.alpha(t), schedule.alpha_prev(t)
            with torch.no_grad():
                eps_u, feats_u = predict(unedited, t, True)
                original = supervision_features(feats_u, grid).detach()
                unedited_next = ddim_step(unedited, eps_u, alpha, alpha_prev)
            if dragging:
                latent, current, dragging, unchanged = _drag_at_step(
                    predict, latent, t, alpha, alpha_prev, original, unedited_next, start, current, goal, keep_map,
                    use_mask, grid, settings, unchanged, result, callback,
                )
            with torch.no_grad():
                eps, _ = predict(latent, t, True)
                latent = ddim_step(latent, eps, alpha, alpha_prev)
            unedited = unedited_next
            result.denoising_steps += 1
            if not dragging:
                break
        result.handles = current.detach().cpu()
        return latent.detach()

    result.latent = backend.run_features(loop, z.to(torch.float32), conditioning, AttentionControl(), timesteps[step_index:step_index + steps])
    result.step_index = step_index + result.denoising_steps
    return result


def _drag_at_step(
    predict, latent, t, alpha, alpha_prev, original, unedited_next, start, current, goal, keep_map,
    use_mask, grid, settings: GoodDragSettings, unchanged: int, result: GoodDragResult, callback,
):
    """B drag operations at timestep ``t``; returns (latent, handles, still dragging, unchanged count)."""
    latent = latent.detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([latent], lr=settings.lr)
    scaler: LossScale | None = None
    with torch.no_grad():
        current = track_points(original, supervision_features(predict(latent, t, False)[1], grid), current, start, settings.r2)
    for _ in range(settings.drags_per_step):
        if all_reached(current, goal) or (settings.max_unchanged and unchanged >= settings.max_unchanged):
            return latent.detach(), current, False, unchanged
        for _ in range(settings.grad_steps):
            eps, feats = predict(latent, t, use_mask)
            feats = supervision_features(feats, grid)
            scaler = scaler or LossScale(enabled=feats.dtype == torch.float16)
            loss = gooddrag_loss(feats, original, current, start, goal, settings.r1, settings.beta)
            if use_mask:
                loss = loss + mask_regularisation(ddim_step(latent, eps, alpha, alpha_prev), unedited_next, keep_map, settings.lam)
            scaler.step(loss, latent, optimiser)
            result.gradient_steps += 1
        tracked = track_points(original, feats.detach(), current, start, settings.r2)
        unchanged = unchanged + 1 if torch.equal(tracked, current) else 0
        current = tracked
        result.drag_operations += 1
        if callback is not None:
            preview = None if eps is None else predicted_x0(latent.detach(), eps.detach(), alpha)
            callback(result.drag_operations, settings.total_operations, current, preview)
    return latent.detach(), current, True, unchanged
