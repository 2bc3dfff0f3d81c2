"""Known-answer behaviour of the three latent optimisers: the edit moves the content.

The model is a stand-in for the backend interface whose decoder features are
the latent itself (the engine upsamples them bilinearly to the supervision
grid) and whose ε is 0, so one DDIM step only rescales the latent. The
latent is zero except a distinctive 2x2-cell patch at the handle; the mask
is a narrow strip along the drag, so the drag's gradient (through the
bilinear upsampling) also reaches kept cells next to the strip, and only the
mask term holds them.

Measured (CPU, float32, the settings below): DragDiffusion stops after 62
iterations with the handle at (35, 29) for a target at (36, 28), the best
match of the handle's original feature is (x, y) = (35, 29), and the kept
cells move at most 0.11 (3.4 without the mask term). GoodDrag: 16 drag
operations, handle (36, 28), best match (35, 30), kept cells at most 0.12
(1.9 without the mask term).
"""

from __future__ import annotations

import pytest
import torch

from dragkit.dragdiffusion import DragDiffusionSettings, drag_diffusion
from dragkit.gooddrag import GoodDragSettings, good_drag
from dragkit.hybrid import refine_warped
from dragkit.motion import supervision_features
from dragkit.schedule import DDIMSchedule, scaled_linear_alphas_cumprod

SIZE = 16
"""Latent side in cells; the supervision grid is 4x that."""
PATCH = torch.tensor([1.0, -1.0, 0.5, 2.0])
"""The distinctive content, one value per latent channel."""
HANDLE = torch.tensor([[20.0, 28.0]])
"""Supervision-grid (x, y) inside the patch at latent rows 6-7, columns 4-5."""
TARGET = torch.tensor([[36.0, 28.0]])
"""Four latent cells to the right."""
KEPT_DRIFT = 0.2
"""Most a kept latent value may change (it moves by a few units without the mask term)."""
FOUND_WITHIN = 4
"""Supervision cells (one latent cell, the content's resolution) between the best match and the target."""


class LatentIsFeatures:
    """The backend interface with features = the latent and ε = 0; gradients flow to the latent."""

    def run_features(self, loop, z_start, conditioning, control, timesteps):
        def predict(z, timestep, with_eps):
            return (torch.zeros_like(z) if with_eps else None), z

        with torch.enable_grad():
            return loop(predict, z_start.clone()).detach()


def source_latent() -> torch.Tensor:
    z = torch.zeros(1, 4, SIZE, SIZE)
    z[0, :, 6:8, 4:6] = PATCH[:, None, None]
    return z


def strip_keep() -> torch.Tensor:
    """Latent cells to keep: everything but rows 6-7, columns 4-9 (the patch and its path)."""
    keep = torch.ones(SIZE, SIZE)
    keep[6:8, 4:10] = 0
    return keep


def best_match(latent: torch.Tensor) -> torch.Tensor:
    """Supervision-grid (x, y) whose feature is nearest (L1) to the source's feature at the handle."""
    grid = (SIZE * 4, SIZE * 4)
    template = supervision_features(source_latent(), grid)[0, :, int(HANDLE[0, 1]), int(HANDLE[0, 0])]
    cost = (supervision_features(latent, grid)[0] - template[:, None, None]).abs().sum(0)
    row, col = divmod(int(cost.argmin()), grid[1])
    return torch.tensor([float(col), float(row)])


def kept_drift(latent: torch.Tensor) -> float:
    """Largest change of a kept cell (the source is 0 there, and ε = 0 keeps 0 at every step)."""
    return float(latent[0][:, strip_keep().bool()].abs().max())


def schedule(strength: float) -> DDIMSchedule:
    return DDIMSchedule(scaled_linear_alphas_cumprod(), 50, strength)


def run_dragdiffusion(lam: float):
    sched = schedule(0.7)
    return drag_diffusion(LatentIsFeatures(), source_latent(), None, sched, sched.start_index, HANDLE, TARGET,
                          strip_keep(), DragDiffusionSettings(iterations=80, lr=0.1, lam=lam))


def run_gooddrag(lam: float):
    sched = schedule(0.75)
    return good_drag(LatentIsFeatures(), source_latent(), None, sched, sched.start_index, HANDLE, TARGET,
                     strip_keep(), GoodDragSettings(lr=0.1, lam=lam))


@pytest.mark.parametrize("run", [run_dragdiffusion, run_gooddrag], ids=["dragdiffusion", "gooddrag"])
def test_the_patch_moves_to_the_target_and_the_rest_is_kept(run):
    result = run(lam=1.0)
    assert (result.handles - TARGET).norm() < 2
    assert (best_match(result.latent) - TARGET[0]).abs().max() <= FOUND_WITHIN
    assert kept_drift(result.latent) < KEPT_DRIFT


@pytest.mark.parametrize("run", [run_dragdiffusion, run_gooddrag], ids=["dragdiffusion", "gooddrag"])
def test_without_the_mask_term_kept_cells_drift(run):
    """The check above can fail: with λ = 0 the same drag moves kept cells by far more than the tolerance."""
    assert kept_drift(run(lam=0.0).latent) > 5 * KEPT_DRIFT


def test_refine_warp_restores_the_patch_at_the_target_and_the_kept_cells():
    """A warp that left a faded copy at the target, a ghost at the handle and a stray write on a kept cell.

    The refinement restores the patch at the target, and the mask term (the
    only force on the stray cell, far from every patch) takes the stray
    value back to the source's. Measured: the target cells end within 0.05
    of the patch, the stray cell within 0.1 of 0 (it stays at 1 with λ = 0).
    """
    warped = torch.zeros(1, 4, SIZE, SIZE)
    warped[0, :, 6:8, 8:10] = 0.5 * PATCH[:, None, None]
    warped[0, :, 6:8, 4:6] = 0.5 * PATCH[:, None, None]
    warped[0, :, 12, 2] = 1.0
    sched = schedule(0.7)
    result = refine_warped(LatentIsFeatures(), warped, source_latent(), None, sched, sched.start_index, HANDLE,
                           TARGET, strip_keep(), DragDiffusionSettings(iterations=40, lr=0.1, lam=1.0))
    at_target = result.latent[0, :, 6:8, 8:10]
    assert (at_target - PATCH[:, None, None]).abs().max() < 0.2
    assert (best_match(result.latent) - TARGET[0]).abs().max() <= FOUND_WITHIN
    assert result.latent[0, :, 12, 2].abs().max() < KEPT_DRIFT
    assert result.handles.tolist() == TARGET.tolist()
