"""DragDiffusion's optimisation on a tiny seeded diffusers UNet (8x8 latent, 32x32 supervision grid)."""

import pytest
import torch

from dragkit.attention import AttentionControl
from dragkit.backend import feature_level
from dragkit.diffusers_backend import DiffusersBackend, DiffusersConditioning
from dragkit.dragdiffusion import DragDiffusionSettings, drag_diffusion
from dragkit.errors import DragInputError
from dragkit.hybrid import refine_warped
from dragkit.schedule import DDIMSchedule, ddim_step


@pytest.fixture(scope="module")
def setup(backend):
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(1, 4, 8, 8, generator=gen)
    cond = DiffusersConditioning(torch.randn(1, 7, 32, generator=gen))
    return z, cond, DDIMSchedule(backend.alphas_cumprod(), 50, 0.7)


def run(backend, setup, keep=None, **settings):
    z, cond, schedule = setup
    keep = torch.zeros(8, 8) if keep is None else keep
    seen = []
    result = drag_diffusion(
        backend, z, cond, schedule, schedule.start_index,
        torch.tensor([[10.0, 12.0]]), torch.tensor([[20.0, 12.0]]), keep,
        DragDiffusionSettings(**settings), callback=lambda done, handles, preview: seen.append((done, handles.clone())),
    )
    return result, seen


def test_features_are_the_penultimate_decoder_block_and_can_stop_early(backend, setup):
    z, cond, schedule = setup
    block = backend.feature_block()
    assert block is backend.unet.up_blocks[0]
    outputs = {}

    def loop(predict, z_start):
        outputs["full"] = predict(z_start, 681, True)
        outputs["early"] = predict(z_start, 681, False)
        return z_start

    backend.run_features(loop, z, cond, AttentionControl(), [681])
    eps, feats = outputs["full"]
    assert eps.shape == z.shape and feats.shape == (1, 64, 8, 8)
    assert outputs["early"][0] is None and torch.equal(outputs["early"][1], feats)


def test_feature_level_is_the_penultimate_by_default_and_can_be_chosen(backend):
    assert [feature_level(levels) for levels in (2, 3, 4)] == [0, 1, 2]  # micro UNet, SDXL, SD1.5
    assert feature_level(4, 0) == 0 and feature_level(3, 1) == 1
    for levels, chosen in ((4, 3), (3, 2), (3, -1)):
        with pytest.raises(DragInputError, match=f"feature_level {chosen} is not available.*choose 0 .* to {levels - 2}"):
            feature_level(levels, chosen)
    other = DiffusersBackend(backend.unet, feature_level=0)
    assert other.feature_block() is backend.unet.up_blocks[0]
    with pytest.raises(DragInputError, match="feature_level 1 is not available"):
        DiffusersBackend(backend.unet, feature_level=1).feature_block()


def test_optimisation_runs_and_reports_each_iteration(backend, setup):
    weights = {k: v.clone() for k, v in backend.unet.state_dict().items()}
    flags = [p.requires_grad for p in backend.unet.parameters()]
    result, seen = run(backend, setup, iterations=6)
    assert result.iterations == 6 and [done for done, _ in seen] == list(range(1, 7))
    assert torch.isfinite(result.latent).all() and not torch.equal(result.latent, setup[0])
    assert result.handles.shape == (1, 2) and (result.handles >= 0).all() and (result.handles <= 31).all()
    assert all(torch.equal(v, backend.unet.state_dict()[k]) for k, v in weights.items())
    assert [p.requires_grad for p in backend.unet.parameters()] == flags
    assert all(p.grad is None for p in backend.unet.parameters())


def test_reached_handles_stop_before_any_step(backend, setup):
    z, cond, schedule = setup
    result = drag_diffusion(backend, z, cond, schedule, schedule.start_index, torch.tensor([[10.0, 12.0]]),
                            torch.tensor([[11.0, 13.0]]), torch.zeros(8, 8))
    assert result.iterations == 0 and torch.equal(result.latent, z)


def test_large_lambda_keeps_the_unmasked_part_of_the_previous_step(backend, setup):
    """With λ = 1e3 the unmasked cells of z_{t*-1} stay put up to Adam's step size.

    Measured over 8 iterations (lr 0.01): mean |change| outside the mask 0.080 with
    λ = 0 and 0.0038 with λ = 1e3 (Adam moves every element by about lr per step,
    so the kept cells jitter at that scale instead of freezing exactly).
    """
    z, cond, schedule = setup
    t = schedule.timesteps[schedule.start_index]
    keep = torch.ones(8, 8)
    keep[2:6, 1:7] = 0

    def prev_step(latent):
        eps = {}

        def loop(predict, z_start):
            eps["e"] = predict(z_start, t, True)[0]
            return z_start

        backend.run_features(loop, latent, cond, AttentionControl(), [t])
        return ddim_step(latent, eps["e"], schedule.alpha(t), schedule.alpha_prev(t))

    base = prev_step(z)
    free, _ = run(backend, setup, keep=keep, iterations=8, lam=0.0)
    held, _ = run(backend, setup, keep=keep, iterations=8, lam=1e3)
    outside = keep.bool().expand(1, 4, 8, 8)
    moved_free = (prev_step(free.latent) - base).abs()[outside].mean()
    moved_held = (prev_step(held.latent) - base).abs()[outside].mean()
    assert moved_free > 0.02 and moved_held < 0.1 * moved_free and moved_held < 0.01


def test_bad_settings():
    with pytest.raises(DragInputError):
        DragDiffusionSettings(iterations=0)
    with pytest.raises(DragInputError):
        DragDiffusionSettings(lr=0)


def test_warp_then_refine_runs_the_requested_iterations(backend, setup):
    z, cond, schedule = setup
    warped = z.roll(2, dims=-1)
    seen = []
    result = refine_warped(backend, warped, z, cond, schedule, schedule.start_index, torch.tensor([[10.0, 12.0]]),
                           torch.tensor([[18.0, 12.0]]), torch.ones(8, 8), DragDiffusionSettings(iterations=4),
                           callback=lambda done, handles, preview: seen.append((done, preview is not None)))
    assert seen == [(1, True), (2, True), (3, True), (4, True)]
    assert torch.isfinite(result.latent).all() and not torch.equal(result.latent, warped)
    assert result.handles.tolist() == [[18.0, 12.0]] and result.iterations == 4
