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
from .motion import all_reached, gooddrag_loss, track_points
from .optimisation import LatentOptimiser, fresh, reference_at
from .schedule import DDIMSchedule, ddim_step

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
    result = GoodDragResult(z, step_index, handles.to(torch.float32).clone())

    def loop(predict: FeaturePredictor, z_start: torch.Tensor) -> torch.Tensor:
        start, goal, keep_map, latent, unedited = fresh(z_start.device, handles, targets, keep, z_start, z_start)
        current = start.clone()
        dragging, unchanged = True, 0
        for offset in range(steps):
            reference = reference_at(predict, unedited, schedule, timesteps[step_index + offset])
            if dragging:
                optimiser = LatentOptimiser(latent, reference, settings.lr, keep_map, settings.lam)
                current, dragging, unchanged = _drag_at_step(
                    predict, optimiser, start, current, goal, settings, unchanged, result, callback
                )
                latent = optimiser.result()
            with torch.no_grad():
                eps, _ = predict(latent, reference.timestep, True)
                latent = ddim_step(latent, eps, reference.alpha, reference.alpha_prev)
            unedited = reference.next_latent
            result.denoising_steps += 1
            if not dragging:
                break
        result.handles = current.detach().cpu()
        return latent.detach()

    result.latent = backend.run_features(loop, z.to(torch.float32), conditioning, AttentionControl(), timesteps[step_index:step_index + steps])
    result.step_index = step_index + result.denoising_steps
    return result


def _drag_at_step(
    predict: FeaturePredictor,
    optimiser: LatentOptimiser,
    start: torch.Tensor,
    current: torch.Tensor,
    goal: torch.Tensor,
    settings: GoodDragSettings,
    unchanged: int,
    result: GoodDragResult,
    callback: DragCallback | None,
) -> tuple[torch.Tensor, bool, int]:
    """B drag operations at the optimiser's timestep; returns (handles, still dragging, unchanged count)."""
    original = optimiser.reference.features
    with torch.no_grad():
        current = track_points(original, optimiser.evaluate(predict, with_eps=False)[1], current, start, settings.r2)
    for _ in range(settings.drags_per_step):
        if all_reached(current, goal) or (settings.max_unchanged and unchanged >= settings.max_unchanged):
            return current, False, unchanged
        for _ in range(settings.grad_steps):
            eps, feats = optimiser.evaluate(predict)
            optimiser.step(gooddrag_loss(feats, original, current, start, goal, settings.r1, settings.beta), eps)
            result.gradient_steps += 1
        tracked = track_points(original, feats.detach(), current, start, settings.r2)
        unchanged = unchanged + 1 if torch.equal(tracked, current) else 0
        current = tracked
        result.drag_operations += 1
        if callback is not None:
            callback(result.drag_operations, settings.total_operations, current, optimiser.preview(eps))
    return current, True, unchanged
