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
from .motion import appearance_loss
from .optimisation import LatentOptimiser, fresh, reference_at
from .schedule import DDIMSchedule


REFINE_DEFAULTS = DragDiffusionSettings(iterations=10, r2=0)
"""The refinement's defaults: DragDiffusion's lr, λ and r1, ten iterations; nothing is tracked (r2 unused)."""


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
    settings: DragDiffusionSettings = REFINE_DEFAULTS,
    callback: IterationCallback | None = None,
) -> DragResult:
    """Refine ``z_warped`` toward the source's appearance around the moved handles.

    ``z_source`` is the unwarped latent at the same step (the inversion's);
    ``settings.iterations``, ``lr``, ``lam`` and ``r1`` apply (``r2`` is not
    used: nothing is tracked). Returns the refined latent with the targets
    as the final handles.
    """
    timestep = schedule.timesteps[step_index]

    def loop(predict: FeaturePredictor, z_start: torch.Tensor) -> torch.Tensor:
        origin, goal, keep_map, source = fresh(z_start.device, handles, targets, keep, z_source)
        reference = reference_at(predict, source, schedule, timestep)
        optimiser = LatentOptimiser(z_start, reference, settings.lr, keep_map, settings.lam)
        for iteration in range(settings.iterations):
            eps, feats = optimiser.evaluate(predict)
            optimiser.step(appearance_loss(feats, reference.features, goal, origin, settings.r1), eps)
            if callback is not None:
                callback(iteration + 1, goal, optimiser.preview(eps))
        return optimiser.result()

    refined = backend.run_features(loop, z_warped.to(torch.float32), conditioning, AttentionControl(), [timestep])
    return DragResult(refined, targets.to(torch.float32).cpu(), settings.iterations)
