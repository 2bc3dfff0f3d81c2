"""The set-up the three latent optimisers share (DragDiffusion, GoodDrag, the warp refinement).

Each of them optimises a noisy VP latent ``(1, C, h, w)`` at one timestep t
with Adam, against two fixed things computed from a reference latent (the
unedited or source latent at the same t): its decoder features on the
supervision grid (what motion supervision and tracking compare with), and
its next DDIM step z⁰_{t-1} (what the mask term holds the kept cells to):

    loss = motion term + λ Σ |(z_{t-1} − z⁰_{t-1}) ⊙ keep|

:func:`reference_at` computes the fixed part (:class:`Reference`),
:class:`LatentOptimiser` owns the leaf latent, the optimiser, the loss
scaling and the mask term, and :func:`keep_map` turns an editable mask into
the latent map of kept cells with one rule for every node.

The latent, the loss and the optimiser state are float32 whatever the
model's compute dtype; with fp16 compute the loss is scaled dynamically
(halved on overflow and the step skipped) like a GradScaler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backend import FeaturePredictor
from .geometry import LATENT_DOWNSCALE, LatentGeometry
from .motion import mask_regularisation, supervision_features, supervision_grid
from .schedule import DDIMSchedule, ddim_step, predicted_x0


def fresh(device: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """float32 copies of ``tensors`` on ``device``.

    A host may hand in tensors made in inference mode (ComfyUI does), and
    autograd may not save those for backward; copies made inside the loop can.
    """
    return [t.to(device, torch.float32).clone() for t in tensors]


@dataclass(frozen=True)
class Reference:
    """What an optimisation step at ``timestep`` compares with.

    Attributes:
        timestep: the UNet timestep t.
        alpha, alpha_prev: ᾱ_t and ᾱ of the next (lower) step.
        features: the reference latent's features ``(1, C_f, H, W)`` on the
            supervision grid, detached, in the model's compute dtype.
        next_latent: the reference latent's DDIM step z⁰_{t-1}, VP ``(1, C, h, w)`` float32.
    """

    timestep: int
    alpha: float
    alpha_prev: float
    features: torch.Tensor
    next_latent: torch.Tensor


def reference_at(predict: FeaturePredictor, z: torch.Tensor, schedule: DDIMSchedule, timestep: int) -> Reference:
    """One gradient-free UNet pass over the reference latent ``z`` (VP ``(1, C, h, w)``) at ``timestep``."""
    alpha, alpha_prev = schedule.alpha(timestep), schedule.alpha_prev(timestep)
    with torch.no_grad():
        eps, feats = predict(z, timestep, True)
        features = supervision_features(feats, supervision_grid(z)).detach()
        next_latent = ddim_step(z, eps, alpha, alpha_prev)
    return Reference(timestep, alpha, alpha_prev, features, next_latent)


class LatentOptimiser:
    """Adam on a fresh leaf copy of a latent at one timestep, with the mask term and loss scaling.

    Args:
        z: VP latent ``(1, C, h, w)`` to start from (copied).
        reference: the fixed targets at this timestep (:func:`reference_at`).
        lr: Adam's learning rate.
        keep: ``(h, w)`` float32 map of latent cells to keep, on ``z``'s device.
        lam: λ of the mask term; the term is off when λ = 0 or nothing is kept.
    """

    def __init__(self, z: torch.Tensor, reference: Reference, lr: float, keep: torch.Tensor, lam: float) -> None:
        self.latent = z.detach().clone().requires_grad_(True)
        self.reference = reference
        self.keep = keep
        self.lam = lam
        self.mask_on = bool(keep.any()) and lam > 0
        self._optimiser = torch.optim.Adam([self.latent], lr=lr)
        self._scaler = LossScale(enabled=reference.features.dtype == torch.float16)

    def evaluate(self, predict: FeaturePredictor, with_eps: bool | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(eps or None, features on the supervision grid)`` of the current latent, with gradients.

        ε is computed when ``with_eps`` says so; by default only when the mask
        term needs it.
        """
        eps, feats = predict(self.latent, self.reference.timestep, self.mask_on if with_eps is None else with_eps)
        return eps, supervision_features(feats, supervision_grid(self.latent))

    def step(self, motion_loss: torch.Tensor, eps: torch.Tensor | None) -> None:
        """One Adam step on ``motion_loss`` plus the mask term of the current latent's ε."""
        loss = motion_loss
        if self.mask_on:
            z_prev = ddim_step(self.latent, eps, self.reference.alpha, self.reference.alpha_prev)
            loss = loss + mask_regularisation(z_prev, self.reference.next_latent, self.keep, self.lam)
        self._scaler.step(loss, self.latent, self._optimiser)

    def preview(self, eps: torch.Tensor | None) -> torch.Tensor | None:
        """The x0 prediction (VP) of the current latent for a live preview, when ε was computed."""
        return None if eps is None else predicted_x0(self.latent.detach(), eps.detach(), self.reference.alpha)

    def result(self) -> torch.Tensor:
        """The optimised latent, detached."""
        return self.latent.detach()


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


def keep_map(geometry: LatentGeometry, editable: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The ``(h, w)`` float32 latent map of cells the mask term keeps, and whether it was widened.

    ``editable`` is the ``(H, W)`` source-pixel mask (1 = editable, not
    empty). As released, the mask goes nearest to the supervision grid and
    nearest again to the latent grid (:meth:`LatentGeometry.mask_to_latent`).
    A small painted region can vanish in that downsampling, which would keep
    (freeze) every cell; then every latent cell whose 8x8 pixel block the
    mask touches (> 0.5) is editable instead, and the second value is True
    so the caller can say so. The release drops the mask term in that case.
    """
    editable_cells = geometry.mask_to_latent(editable)
    widened = not bool(editable_cells.any())
    if widened:
        painted = (geometry.crop_image_grid(editable) > 0.5).to(torch.float32)[None, None]
        editable_cells = F.max_pool2d(painted, LATENT_DOWNSCALE)[0, 0] > 0
    return (~editable_cells).to(torch.float32), widened
