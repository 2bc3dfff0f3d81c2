"""DDIM inversion and KV-injected denoising.

Two models:

- A toy attention model whose noise prediction depends on the latent only
  through one self-attention layer's keys and values. With full KV injection
  the sampler sees exactly the keys/values the inversion saw at the same
  timestep, so the round trip must return the source to float32 round-off
  (measured: max |error| < 2e-6; asserted < 1e-4); without injection it
  cannot (error ~1e-2). This checks the loops, the timestep keying of the
  cache and the controls.
- ``micro_unet(seed=0)``, a seeded random-weight diffusers UNet, 8x8 latent.
  Every layer outside self-attention also sees the latent, so the round trip
  keeps DDIM inversion's own error, which evaluates the UNet at timestep t on
  a latent still at the previous level: measured mean |error| 0.092 at 50
  steps and 0.029 at 200 on a 16x16 latent (first order in 1/N); injection
  makes it slightly smaller, never larger. A random-weight UNet is a far
  worse denoiser than a trained one, so these bounds are loose.
"""

import pytest
import torch

from dragkit.attention import AttentionControl, AttnLayer, select_layers
from dragkit.ddim import ddim_invert, injection_timesteps, kv_sample
from dragkit.diffusers_backend import DiffusersConditioning
from dragkit.errors import DragInputError
from dragkit.schedule import DDIMSchedule, scaled_linear_alphas_cumprod


@pytest.fixture(scope="module")
def source():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 8, 8, generator=gen), DiffusersConditioning(torch.randn(1, 7, 32, generator=gen))


class ToyAttentionBackend:
    """ε(z, t) = softmax(q_t k(z)ᵀ) v(z) + e_t: the latent enters only through one layer's keys and values."""

    layer = AttnLayer(0, "up", "toy.attn1", 4)

    def __init__(self, alphas):
        gen = torch.Generator().manual_seed(7)
        self.w_k, self.w_v = torch.randn(4, 4, generator=gen), torch.randn(4, 4, generator=gen) * 0.3
        self.alphas = alphas
        self.model_key = "toy"
        self.compute_device = torch.device("cpu")

    def alphas_cumprod(self):
        return self.alphas

    def self_attention_layers(self):
        return (self.layer,)

    def run(self, loop, z_start, conditioning, control, timesteps):
        def predict_noise(z, t):
            gen = torch.Generator().manual_seed(t)
            tokens = z.flatten(2).transpose(1, 2)
            k, v = control(self.layer, tokens @ self.w_k, tokens @ self.w_v)
            q = torch.randn(tokens.shape[1], 4, generator=gen)
            mixed = torch.softmax(q @ k.transpose(1, 2) / 2, dim=-1) @ v
            return mixed.transpose(1, 2).reshape(z.shape) + torch.randn(z.shape, generator=gen)

        return loop(predict_noise, z_start)


@pytest.mark.parametrize("steps, strength", [(10, 0.7), (50, 0.7), (50, 0.75)])
def test_full_injection_reconstructs_exactly_when_attention_is_the_only_path(steps, strength):
    toy = ToyAttentionBackend(scaled_linear_alphas_cumprod())
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    schedule = DDIMSchedule(toy.alphas_cumprod(), steps, strength)
    cache = ddim_invert(toy, z0, None, schedule, (toy.layer,))
    exact = kv_sample(toy, cache.z_star, None, cache, schedule.start_index, (toy.layer,))
    plain = kv_sample(toy, cache.z_star, None, cache, schedule.start_index, ())
    assert (exact - z0).abs().max() < 1e-4
    assert (plain - z0).abs().max() > 1e-3


def test_base_control_leaves_the_toy_model_alone():
    toy = ToyAttentionBackend(scaled_linear_alphas_cumprod())
    z = torch.randn(1, 4, 8, 8)
    outs = [toy.run(lambda predict, zz: predict(zz, 101), z, None, AttentionControl(), [101]) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])


def round_trip_error(backend, source, steps, inject="all"):
    z0, cond = source
    schedule = DDIMSchedule(backend.alphas_cumprod(), steps, 0.7)
    layers = backend.self_attention_layers()
    cache = ddim_invert(backend, z0, cond, schedule, select_layers(layers, "all"))
    z = kv_sample(backend, cache.z_star, cond, cache, schedule.start_index, select_layers(layers, inject))
    return (z - z0).abs().mean().item()


def test_cache_holds_every_step_layer_and_the_trajectory(backend, source):
    z0, cond = source
    schedule = DDIMSchedule(backend.alphas_cumprod(), 10, 0.7)
    layers = select_layers(backend.self_attention_layers(), "decoder")
    steps_seen = []
    cache = ddim_invert(backend, z0, cond, schedule, layers, progress=lambda done, x0: steps_seen.append(done))
    assert steps_seen == list(range(1, 8))
    assert sorted(cache.kv) == [1, 101, 201, 301, 401, 501, 601]
    assert all(sorted(step) == [layer.index for layer in layers] for step in cache.kv.values())
    k, v = cache.kv[601][layers[0].index]
    assert k.shape == (1, 8 * 8, 32) and v.shape == k.shape
    assert sorted(cache.trajectory) == sorted(cache.kv) and torch.equal(cache.z_star, cache.trajectory[601])
    assert torch.equal(cache.source, z0)
    assert cache.kv_nbytes() == 7 * len(layers) * 2 * k.numel() * 4


def test_round_trip_on_a_unet_converges_to_the_source(backend, source):
    coarse = round_trip_error(backend, source, 20)
    fine = round_trip_error(backend, source, 80)
    assert fine < 0.12 and fine < 0.4 * coarse


def test_round_trip_without_injection_stays_close(backend, source):
    with_kv = round_trip_error(backend, source, 50, "all")
    without = round_trip_error(backend, source, 50, "none")
    assert without < 0.15 and with_kv <= without * 1.02


def test_injection_pulls_an_edited_latent_toward_the_source(backend, source):
    z0, cond = source
    schedule = DDIMSchedule(backend.alphas_cumprod(), 10, 0.7)
    layers = backend.self_attention_layers()
    cache = ddim_invert(backend, z0, cond, schedule, layers)
    edited = cache.z_star + 0.5 * torch.randn(cache.z_star.shape, generator=torch.Generator().manual_seed(3))
    plain = kv_sample(backend, edited, cond, cache, schedule.start_index, ())
    injected = kv_sample(backend, edited, cond, cache, schedule.start_index, layers)
    assert not torch.allclose(plain, injected)
    assert (injected - z0).abs().mean() < (plain - z0).abs().mean()


def test_processors_are_restored_after_a_run(backend, source):
    before = {name: type(p) for name, p in backend.unet.attn_processors.items()}
    z0, cond = source
    ddim_invert(backend, z0, cond, DDIMSchedule(backend.alphas_cumprod(), 4, 0.5), backend.self_attention_layers())
    assert {name: type(p) for name, p in backend.unet.attn_processors.items()} == before


def test_cfg_path_runs_and_differs(backend, source):
    z0, cond = source
    schedule = DDIMSchedule(backend.alphas_cumprod(), 4, 0.5)
    cache = ddim_invert(backend, z0, cond, schedule, ())
    guided = DiffusersConditioning(cond.positive, torch.zeros_like(cond.positive), cfg=3.0)
    a = kv_sample(backend, cache.z_star, cond, cache, schedule.start_index, ())
    b = kv_sample(backend, cache.z_star, guided, cache, schedule.start_index, ())
    assert torch.isfinite(b).all() and not torch.allclose(a, b)


def test_injection_range_by_fraction():
    steps = [601, 501, 401, 301, 201, 101, 1]
    assert injection_timesteps(steps, 0.0, 1.0) == set(steps)
    assert injection_timesteps(steps, 0.0, 0.5) == {601, 501, 401, 301}
    assert injection_timesteps(steps, 0.5, 1.0) == {201, 101, 1}
    with pytest.raises(DragInputError):
        injection_timesteps(steps, 0.6, 0.5)


@pytest.mark.parametrize(
    "latent, message",
    [
        (torch.randn(2, 4, 8, 8), "batch of 2"),
        (torch.full((1, 4, 8, 8), float("nan")), "NaN"),
        (torch.randn(4, 8, 8), "batch, channels"),
    ],
)
def test_bad_latents_are_refused(backend, source, latent, message):
    schedule = DDIMSchedule(backend.alphas_cumprod(), 4, 0.5)
    with pytest.raises(DragInputError, match=message):
        ddim_invert(backend, latent, source[1], schedule, ())


def test_cache_from_another_latent_size_is_refused(backend, source):
    z0, cond = source
    schedule = DDIMSchedule(backend.alphas_cumprod(), 4, 0.5)
    cache = ddim_invert(backend, z0, cond, schedule, ())
    with pytest.raises(DragInputError, match="shape"):
        kv_sample(backend, torch.randn(1, 4, 16, 8), cond, cache, schedule.start_index, ())


def test_reference_branch_on_the_unedited_latent_is_plain_denoising(backend, source):
    z0, cond = source
    schedule = DDIMSchedule(backend.alphas_cumprod(), 10, 0.7)
    layers = select_layers(backend.self_attention_layers(), "masactrl")
    assert [layer.index for layer in layers] == [2, 3]
    cache = ddim_invert(backend, z0, cond, schedule, ())
    plain = kv_sample(backend, cache.z_star, cond, cache, schedule.start_index, ())
    mutual = kv_sample(backend, cache.z_star, cond, cache, schedule.start_index, layers, kv_source="reference branch")
    assert torch.allclose(plain, mutual, atol=1e-5)
    edited = cache.z_star + 0.3 * torch.randn(cache.z_star.shape, generator=torch.Generator().manual_seed(9))
    free = kv_sample(backend, edited, cond, cache, schedule.start_index, ())
    guided = kv_sample(backend, edited, cond, cache, schedule.start_index, layers, kv_source="reference branch")
    assert not torch.allclose(free, guided)
    later = kv_sample(backend, edited, cond, cache, schedule.start_index + 2, layers, kv_source="reference branch")
    assert torch.isfinite(later).all() and later.shape == z0.shape
