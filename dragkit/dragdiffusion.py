"""DragDiffusion's latent optimisation: motion supervision of z_t* with point tracking.

METHODS.md, "DragDiffusion": at most ``iterations`` Adam steps on the noisy
latent z_t* (lr 0.01). Each step evaluates the UNet once at t* for both ε and
the penultimate decoder block's features F (bilinearly upsampled to the
half-resolution supervision grid), tracks the handles against the original
features (from the second step on), stops when every handle is within 2
cells of its target, and otherwise minimises

    Σ_i (2r1+1)² · mean|F(h_i + q + d_i) − sg(F(h_i + q))|  +  λ Σ |(z_{t*-1} − z⁰_{t*-1}) ⊙ (1 − M)|

where z_{t*-1} is one DDIM step of the current latent and z⁰_{t*-1} the same
step of the unedited one. Points are supervision-grid ``(x, y)``; the mask
term uses the ``(h, w)`` latent map of cells to keep.

The latent and the loss are float32 whatever the model's compute dtype; with
fp16 compute the loss is scaled dynamically (halved on overflow, the step
skipped) like a GradScaler.
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
    dragdiffusion_loss,
    mask_regularisation,
    mask_term_on,
    supervision_features,
    supervision_grid,
    track_points,
)
from .schedule import DDIMSchedule, ddim_step, predicted_x0

IterationCallback = Callable[[int, torch.Tensor, "torch.Tensor | None"], None]
"""``callback(iterations_done, handles, x0_prediction or None)``; may raise to cancel.

``x0_prediction`` (VP scaled latent) is there when the step computed ε (the
mask term is on); it is meant for a live preview."""


@dataclass(frozen=True)
class DragDiffusionSettings:
    """The knobs of DragDiffusion's optimisation (defaults as released)."""

    iterations: int = 80
    lr: float = 0.01
    lam: float = 0.1
    r1: int = 1
    r2: int = 3

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise DragInputError(f"iterations must be at least 1, got {self.iterations}")
        if not self.lr > 0:
            raise DragInputError(f"the learning rate must be positive, got {self.lr}")
        if self.lam < 0 or self.r1 < 0 or self.r2 < 0:
            raise DragInputError("lambda, r1 and r2 must not be negative")


@dataclass
class DragResult:
    """The optimised latent (VP, ``(1, C, h, w)`` float32), the final handles (grid ``(x, y)``) and iterations run."""

    latent: torch.Tensor
    handles: torch.Tensor
    iterations: int


def drag_diffusion(
    backend: DiffusionBackend,
    z: torch.Tensor,
    conditioning: Any,
    schedule: DDIMSchedule,
    step_index: int,
    handles: torch.Tensor,
    targets: torch.Tensor,
    keep: torch.Tensor,
    settings: DragDiffusionSettings = DragDiffusionSettings(),
    callback: IterationCallback | None = None,
) -> DragResult:
    """Optimise the noisy latent ``z`` so content moves from ``handles`` to ``targets``.

    Args:
        backend: the model.
        z: VP latent at ``schedule.timesteps[step_index]``, ``(1, C, h, w)``.
        conditioning: the backend's conditioning (cfg 1).
        schedule: the DDIM schedule of ``z``.
        step_index: index of ``z``'s timestep.
        handles, targets: ``(N, 2)`` supervision-grid ``(x, y)`` (integer-valued handles).
        keep: ``(h, w)`` latent map of cells to keep (1 − editable mask); all
            zeros switches the mask term off.
        settings: iterations, lr, λ, r1, r2.
        callback: called after each iteration.
    """
    timestep = schedule.timesteps[step_index]
    alpha, alpha_prev = schedule.alpha(timestep), schedule.alpha_prev(timestep)
    grid = supervision_grid(z)
    use_mask = mask_term_on(keep, settings.lam)
    initial = handles.to(torch.float32).clone()
    targets = targets.to(torch.float32)
    result = DragResult(z, initial.clone(), 0)

    def loop(predict: FeaturePredictor, z_start: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            eps0, feats0 = predict(z_start, timestep, True)
            original = supervision_features(feats0, grid).detach()
            z_prev_original = ddim_step(z_start, eps0, alpha, alpha_prev)
        latent = z_start.detach().clone().requires_grad_(True)
        optimiser = torch.optim.Adam([latent], lr=settings.lr)
        scaler = LossScale(enabled=feats0.dtype == torch.float16)
        # Fresh copies: tensors a host made in inference mode may not be saved for backward.
        current = initial.to(z_start.device).clone()
        start = current.clone()
        goal = targets.to(z_start.device).clone()
        keep_map = keep.to(z_start.device, torch.float32).clone()
        done = 0
        for iteration in range(settings.iterations):
            eps, feats = predict(latent, timestep, use_mask)
            feats = supervision_features(feats, grid)
            if iteration > 0:
                current = track_points(original, feats, current, start, settings.r2)
            if all_reached(current, goal):
                break
            loss = dragdiffusion_loss(feats, current, goal, settings.r1)
            if use_mask:
                z_prev = ddim_step(latent, eps, alpha, alpha_prev)
                loss = loss + mask_regularisation(z_prev, z_prev_original, keep_map, settings.lam)
            scaler.step(loss, latent, optimiser)
            done = iteration + 1
            if callback is not None:
                preview = None if eps is None else predicted_x0(latent.detach(), eps.detach(), alpha)
                callback(done, current, preview)
        result.handles = current.detach().cpu()
        result.iterations = done
        return latent.detach()

    result.latent = backend.run_features(loop, z.to(torch.float32), conditioning, AttentionControl(), [timestep])
    return result
