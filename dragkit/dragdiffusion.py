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

The loop's set-up (fresh copies, reference features, Adam, the mask term,
loss scaling, preview) is :mod:`dragkit.optimisation`'s, shared with GoodDrag
and the warp refinement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .attention import AttentionControl
from .backend import DiffusionBackend, FeaturePredictor
from .errors import DragInputError
from .motion import all_reached, dragdiffusion_loss, track_points
from .optimisation import LatentOptimiser, fresh, reference_at
from .schedule import DDIMSchedule

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
    result = DragResult(z, handles.to(torch.float32).clone(), 0)

    def loop(predict: FeaturePredictor, z_start: torch.Tensor) -> torch.Tensor:
        current, goal, keep_map = fresh(z_start.device, handles, targets, keep)
        start = current.clone()
        reference = reference_at(predict, z_start, schedule, timestep)
        optimiser = LatentOptimiser(z_start, reference, settings.lr, keep_map, settings.lam)
        done = 0
        for iteration in range(settings.iterations):
            eps, feats = optimiser.evaluate(predict)
            if iteration > 0:
                current = track_points(reference.features, feats, current, start, settings.r2)
            if all_reached(current, goal):
                break
            optimiser.step(dragdiffusion_loss(feats, current, goal, settings.r1), eps)
            done = iteration + 1
            if callback is not None:
                callback(done, current, optimiser.preview(eps))
        result.handles = current.detach().cpu()
        result.iterations = done
        return optimiser.result()

    result.latent = backend.run_features(loop, z.to(torch.float32), conditioning, AttentionControl(), [timestep])
    return result
