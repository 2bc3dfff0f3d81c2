"""DDIM Invert, KV-Injected Sample and VAE Decode in a real ComfyUI (in-process), and against diffusers.

Measured on the tiny SD1.5-shaped checkpoint (seed 0, 8x8 latent, CPU):
- ᾱ from the MODEL's model_sampling vs the float64 scaled_linear schedule:
  max relative difference ~1e-7 (ComfyUI stores σ in float32).
- ComfyUI backend vs diffusers backend on the same weights and conditioning:
  z_t* max |difference| ~3e-5 after 35 inversion steps, reconstructions ~3e-5
  (asserted < 1e-3).
"""

import math

import pytest
import torch

from dragkit.diffusers_backend import DiffusersBackend, DiffusersConditioning
from dragkit.schedule import scaled_linear_alphas_cumprod

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def engine(comfy_inproc):
    """The pack's own engine modules (the same objects its nodes use)."""
    return comfy_inproc.pack.dragkit


@pytest.fixture(scope="module")
def conditioning():
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(5))
    return context, [[context, {}]]


@pytest.fixture(scope="module")
def source_latent():
    return {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6)) * 4}


def run(host, node_id, **inputs):
    return host.run_node(node_id, **inputs)


def invert(host, model, latent, positive, steps=20, strength=0.7, layers="decoder", policy="auto"):
    return run(host, "DragKitDDIMInvert", model=model, latent=latent, positive=positive, steps=steps,
               strength=strength, cache_layers=layers, cache_device=policy)


def sample(host, model, latent, cache, positive, layers="decoder", **extra):
    return run(host, "DragKitKVInjectedSample", model=model, latent=latent, attn_cache=cache, positive=positive,
               kv_source="inversion cache", inject_layers=layers, inject_start=0.0, inject_end=1.0, **extra)[0]


def test_alphas_come_from_the_model(comfy_inproc, tiny_comfy_models):
    backend = comfy_inproc.pack.nodes.comfy_backend.ComfyBackend(tiny_comfy_models.model)
    ours, reference = backend.alphas_cumprod(), scaled_linear_alphas_cumprod()
    assert ((ours - reference).abs() / reference).max() < 1e-6


def test_invert_then_sample_reconstructs_and_ksampler_advanced_resumes(comfy_inproc, tiny_comfy_models, source_latent, conditioning):
    model = tiny_comfy_models.model
    z_t, cache = invert(comfy_inproc, model, source_latent, conditioning[1])
    assert cache.schedule.t_star == 651 and len(cache.kv) == 14
    assert len(cache.layers) == 6 and all(layer.stage == "up" for layer in cache.layers)
    out = sample(comfy_inproc, model, z_t, cache, conditioning[1])
    error = (out["samples"] - source_latent["samples"]).abs().mean() / source_latent["samples"].abs().mean()
    assert error < 0.3  # measured 0.24 at 20 steps: DDIM inversion's own error on a random-weight UNet
    ksampler = comfy_inproc.nodes.KSamplerAdvanced()
    with torch.inference_mode():
        (resumed,) = ksampler.sample(model, "disable", 0, 20, 1.0, "ddim", "ddim_uniform", conditioning[1],
                                     conditioning[1], z_t, 6, 10000, "disable")
    # Against our sampler without injection: KSamplerAdvanced's last step goes to σ = 0 where ours stops
    # at ᾱ[0] (σ ≈ 0.03, as the references), so the two differ by about σ·ε, a few percent of the latent.
    plain = sample(comfy_inproc, model, z_t, cache, conditioning[1], layers="none")
    assert (resumed["samples"] - plain["samples"]).abs().mean() / source_latent["samples"].abs().mean() < 0.1


def test_backends_agree_on_the_same_weights(comfy_inproc, engine, tiny_comfy_models, tiny_sd15_diffusers, source_latent, conditioning):
    model = tiny_comfy_models.model
    z_t, cache = invert(comfy_inproc, model, source_latent, conditioning[1], steps=20, strength=0.7, layers="all")
    comfy_out = sample(comfy_inproc, model, z_t, cache, conditioning[1], layers="all")

    diffusers = DiffusersBackend(tiny_sd15_diffusers.eval())
    schedule = engine.schedule.DDIMSchedule(scaled_linear_alphas_cumprod(), 20, 0.7)
    from dragkit.ddim import ddim_invert, kv_sample

    z0 = source_latent["samples"] * 0.18215
    d_cond = DiffusersConditioning(conditioning[0])
    d_cache = ddim_invert(diffusers, z0, d_cond, schedule, diffusers.self_attention_layers())
    d_out = kv_sample(diffusers, d_cache.z_star, d_cond, d_cache, schedule.start_index, diffusers.self_attention_layers())

    sigma = schedule.sigma(schedule.t_star)
    comfy_z_star = z_t["samples"] * 0.18215 / math.sqrt(1 + sigma**2)
    assert [layer.channels for layer in cache.layers] == [layer.channels for layer in diffusers.self_attention_layers()]
    assert (comfy_z_star - d_cache.z_star).abs().max() < 1e-3
    assert (comfy_out["samples"] * 0.18215 - d_out).abs().max() < 1e-3


def test_the_shared_model_is_not_patched(comfy_inproc, tiny_comfy_models, source_latent, conditioning):
    model = tiny_comfy_models.model
    before = repr(model.model_options)
    z_t, cache = invert(comfy_inproc, model, source_latent, conditioning[1], steps=4, strength=0.5)
    sample(comfy_inproc, model, z_t, cache, conditioning[1])
    assert repr(model.model_options) == before


def test_cfg_and_injection_range_change_the_result(comfy_inproc, tiny_comfy_models, source_latent, conditioning):
    model = tiny_comfy_models.model
    z_t, cache = invert(comfy_inproc, model, source_latent, conditioning[1], steps=10, strength=0.7)
    plain = sample(comfy_inproc, model, z_t, cache, conditioning[1])
    negative = [[torch.zeros(1, 77, 768), {}]]
    guided = sample(comfy_inproc, model, z_t, cache, conditioning[1], negative=negative, cfg=4.0)
    assert torch.isfinite(guided["samples"]).all()
    assert not torch.allclose(plain["samples"], guided["samples"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"steps": 3, "strength": 0.1}, "inverts round"),
        ({"latent": {"samples": torch.randn(2, 4, 8, 8)}}, "batch of 2"),
        ({"latent": {"samples": torch.full((1, 4, 8, 8), float("nan"))}}, "NaN"),
        ({"positive": [[torch.randn(2, 77, 768), {}]]}, "batch of 2"),
        ({"layers": "decoder, 99"}, "outside"),
    ],
)
def test_invert_errors_name_the_node(comfy_inproc, tiny_comfy_models, source_latent, conditioning, change, message):
    inputs = {"latent": source_latent, "positive": conditioning[1]} | change
    with pytest.raises(ValueError, match=r"^\[DDIM Invert\] .*" + message):
        invert(comfy_inproc, tiny_comfy_models.model, **inputs)


def test_sample_errors_name_the_node(comfy_inproc, tiny_comfy_models, source_latent, conditioning):
    model = tiny_comfy_models.model
    z_t, cache = invert(comfy_inproc, model, source_latent, conditioning[1], steps=10, strength=0.7, layers="8-")
    with pytest.raises(ValueError, match=r"^\[KV-Injected Sample\] .*does not know its diffusion step"):
        sample(comfy_inproc, model, source_latent, cache, conditioning[1])
    with pytest.raises(ValueError, match=r"^\[KV-Injected Sample\] .*were not cached"):
        sample(comfy_inproc, model, z_t, cache, conditioning[1], layers="decoder")
    other = {"samples": torch.randn(1, 4, 16, 8)}
    z_other, _ = invert(comfy_inproc, model, other, conditioning[1], steps=10, strength=0.7)
    with pytest.raises(ValueError, match=r"^\[KV-Injected Sample\] .*shape"):
        sample(comfy_inproc, model, z_other, cache, conditioning[1], layers="none")
    changed = dict(z_t, samples=z_t["samples"] + 1)
    with pytest.raises(ValueError, match="does not know its diffusion step"):
        sample(comfy_inproc, model, changed, cache, conditioning[1], layers="none")


def test_cancel_stops_inversion(comfy_inproc, tiny_comfy_models, source_latent, conditioning):
    import comfy.model_management as mm

    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            invert(comfy_inproc, tiny_comfy_models.model, source_latent, conditioning[1], steps=10)
    finally:
        mm.interrupt_current_processing(False)


def test_decode_keeps_unmasked_source_and_draws_points(comfy_inproc, tiny_comfy_models):
    vae = tiny_comfy_models.vae
    source = torch.rand(1, 70, 100, 3)
    with torch.inference_mode():
        latent = comfy_inproc.nodes.VAEEncode().encode(vae, source)[0]
    assert latent["samples"].shape[-2:] == (8, 12)
    mask = torch.zeros(1, 70, 100)
    mask[0, 20:50, 30:70] = 1
    points = comfy_inproc.pack.dragkit.points.parse_drag_points('{"points": [[40, 30], [60, 35]]}', 100, 70)
    out = run(comfy_inproc, "DragKitVAEDecode", vae=vae, latent=latent, feather=4,
              source_image=source, mask=mask, points=points)
    image, preview = out["result"]
    assert out["ui"]["dragkit_result"][0]["type"] == "temp"  # shown by the Drag Points Editor upstream
    assert image.shape == (1, 70, 100, 3)
    assert torch.equal(image[0][mask[0] == 0], source[0][mask[0] == 0])
    assert not torch.equal(image, source)
    assert preview[0, 30, 40].tolist() == pytest.approx([0.9, 0.1, 0.1])
    with pytest.raises(ValueError, match=r"^\[VAE Decode \(DragKit\)\] .*mask is 100x60"):
        run(comfy_inproc, "DragKitVAEDecode", vae=vae, latent=latent, feather=4, source_image=source,
            mask=torch.ones(1, 60, 100))


def test_reference_branch_mode_runs_at_batch_two(comfy_inproc, tiny_comfy_models, source_latent, conditioning):
    model = tiny_comfy_models.model
    z_t, cache = invert(comfy_inproc, model, source_latent, conditioning[1], steps=10, strength=0.7, layers="none")
    plain = sample(comfy_inproc, model, z_t, cache, conditioning[1], layers="none")
    mutual = run(comfy_inproc, "DragKitKVInjectedSample", model=model, latent=z_t, attn_cache=cache,
                 positive=conditioning[1], kv_source="reference branch", inject_layers="masactrl",
                 inject_start=0.0, inject_end=1.0)[0]
    assert mutual["samples"].shape == plain["samples"].shape
    assert torch.allclose(mutual["samples"], plain["samples"], atol=1e-3)
