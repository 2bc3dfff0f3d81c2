"""The DDIM schedule: timesteps, t*, ᾱ_prev and the DDIM step."""

import math

import pytest
import torch

from dragkit.errors import DragInputError
from dragkit.schedule import DDIMSchedule, ddim_step, scaled_linear_alphas_cumprod

ALPHAS = scaled_linear_alphas_cumprod()


@pytest.mark.parametrize(
    "steps, strength, n, t_star",
    [(50, 0.7, 35, 681), (50, 0.75, 38, 741), (10, 0.7, 7, 601), (50, 1.0, 50, 981), (4, 0.625, 2, 251)],
)
def test_t_star_matches_the_references(steps, strength, n, t_star):
    schedule = DDIMSchedule(ALPHAS, steps, strength)
    assert schedule.num_inversion_steps == n
    assert schedule.t_star == t_star
    assert schedule.inversion_timesteps()[-1] == t_star
    assert schedule.denoising_timesteps()[0] == t_star
    assert len(schedule.inversion_timesteps()) == n == len(schedule.denoising_timesteps())


def test_leading_spacing_and_alpha_prev():
    schedule = DDIMSchedule(ALPHAS, 50, 0.7)
    assert schedule.timesteps[:3] == [981, 961, 941] and schedule.timesteps[-1] == 1
    assert schedule.alpha_prev(1) == float(ALPHAS[0])
    assert schedule.alpha_prev(21) == float(ALPHAS[1])
    assert schedule.index_of(681) == 15 and schedule.index_of(1) == 49
    with pytest.raises(DragInputError):
        schedule.index_of(682)


def test_sd15_alphas_match_known_values():
    assert float(ALPHAS[0]) == pytest.approx(0.99915, abs=1e-5)
    assert float(ALPHAS[999]) == pytest.approx(0.0046, abs=1e-4)
    schedule = DDIMSchedule(ALPHAS, 50, 0.7)
    assert schedule.sigma(999) == pytest.approx(14.6146, abs=1e-3)


@pytest.mark.parametrize("steps, strength", [(1, 0.3), (3, 0.1), (0, 0.5), (1001, 0.5), (10, 0.0), (10, 1.5)])
def test_bad_settings_are_refused(steps, strength):
    with pytest.raises(DragInputError):
        DDIMSchedule(ALPHAS, steps, strength)


def test_ddim_step_up_then_down_is_identity_for_fixed_eps():
    z = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    eps = torch.randn_like(z)
    up = ddim_step(z, eps, 0.9, 0.3)
    assert torch.allclose(ddim_step(up, eps, 0.3, 0.9), z, atol=1e-12)
    expected = math.sqrt(0.3) * (z - math.sqrt(0.1) * eps) / math.sqrt(0.9) + math.sqrt(0.7) * eps
    assert torch.allclose(up, expected)
