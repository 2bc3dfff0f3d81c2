"""Warp then refine (ours, METHODS.md "Hybrids"): a few supervision steps after FastDrag's warp.

FastDrag's warp already moved each handle's content to its target. The
refinement optimises the warped latent so the features around every target
match the *source* features around the original handle at the same timestep
(GoodDrag's information-preserving target with the handles already moved),
while the unmasked region is held to the source's next DDIM step as in
DragDiffusion:

    Σ_i (2r1+1)² · mean|F(t_i + q) − sg(F_src(h_i + q))|  +  λ Σ |(z_{t-1} − z⁰_{t-1}) ⊙ (1 − M)|

Points are supervision-grid ``(x, y)``; latents VP ``(1, C, h, w)``.
"""

from __future__ import annotations

from typing import Any

import torch

from .attention import AttentionControl
from .backend import DiffusionBackend, FeaturePredictor
from .dragdiffusion import DragDiffusionSettings, DragResult, IterationCallback
from .motion import (
    LossScale,
    appearance_loss,
    mask_regularisation,
    mask_term_on,
    supervision_features,
    supervision_grid,
)
from .schedule import DDIMSchedule, ddim_step, predicted_x0


def refine_warped(
    backend: DiffusionBackend,
    z_warped: torch.Tensor,
    z_source: torch.Tensor,
    conditioning: Any,
    schedule: DDIMSchedule,
    step_index: int,
    handles: torch.Tensor,
    targets: torch.Tensor,
    keep: torch.Tensor,
    settings: DragDiffusionSettings = DragDiffusionSettings(iterations=10),
    callback: IterationCallback | None = None,
) -> DragResult:
    """Refine ``z_warped`` toward the source's appearance around the moved handles.

    ``z_source`` is the unwarped latent at the same step (the inversion's);
    ``settings.iterations``, ``lr``, ``lam`` and ``r1`` apply (``r2`` is not
    used: nothing is tracked). Returns the refined latent with the targets
    as the final handles.
    """
    timestep = schedule.timesteps[step_index]
    alpha, alpha_prev = schedule.alpha(timestep), schedule.alpha_prev(timestep)
    grid = supervision_grid(z_warped)
    use_mask = mask_term_on(keep, settings.lam)
    source = z_source.to(torch.float32)

    def loop(predict: FeaturePredictor, z_start: torch.Tensor) -> torch.Tensor:
        # Fresh copies: tensors a host made in inference mode may not be saved for backward.
        origin = handles.to(z_start.device, torch.float32).clone()
        goal = targets.to(z_start.device, torch.float32).clone()
        keep_map = keep.to(z_start.device, torch.float32).clone()
        with torch.no_grad():
            eps_source, feats_source = predict(source.to(z_start.device).clone(), timestep, True)
            source_features = supervision_features(feats_source, grid).detach()
            source_next = ddim_step(source.to(z_start.device), eps_source, alpha, alpha_prev)
        latent = z_start.detach().clone().requires_grad_(True)
        optimiser = torch.optim.Adam([latent], lr=settings.lr)
        scaler = LossScale(enabled=feats_source.dtype == torch.float16)
        for iteration in range(settings.iterations):
            eps, feats = predict(latent, timestep, use_mask)
            loss = appearance_loss(supervision_features(feats, grid), source_features, goal, origin, settings.r1)
            if use_mask:
                loss = loss + mask_regularisation(ddim_step(latent, eps, alpha, alpha_prev), source_next, keep_map, settings.lam)
            scaler.step(loss, latent, optimiser)
            if callback is not None:
                preview = None if eps is None else predicted_x0(latent.detach(), eps.detach(), alpha)
                callback(iteration + 1, goal, preview)
        return latent.detach()

    refined = backend.run_features(loop, z_warped.to(torch.float32), conditioning, AttentionControl(), [timestep])
    return DragResult(refined, targets.to(torch.float32).cpu(), settings.iterations)
