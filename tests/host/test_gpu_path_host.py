"""The GPU path's guards, checked on the CPU in a real ComfyUI with the tiny checkpoint.

- No full copy of a UNet weight is kept for backward in a LoRA step or a
  motion-supervision iteration (saved-tensor hooks): the memory that used to
  double the model on the GPU.
- Every node that outputs a latent or an image refuses non-finite values and
  says which stage made them.
"""

import pytest
import torch

pytestmark = pytest.mark.host

POSITIVE_SEED = 1


def positive():
    return [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(POSITIVE_SEED)), {}]]


def weight_copies(saved: list[torch.Tensor], module: torch.nn.Module) -> list[str]:
    """Names of ``module``'s weights of which ``saved`` holds a copy (same shape and values, other storage)."""
    own = {p.untyped_storage().data_ptr() for p in module.parameters()}
    by_shape: dict = {}
    for name, param in module.named_parameters():
        if param.numel() >= 64:
            by_shape.setdefault((tuple(param.shape), param.dtype), []).append((name, param))
    found = []
    for tensor in saved:
        if tensor.untyped_storage().data_ptr() in own:
            continue
        for name, param in by_shape.get((tuple(tensor.shape), tensor.dtype), []):
            if torch.equal(tensor.detach(), param.detach()):
                found.append(name)
    return found


def test_a_lora_step_keeps_no_copy_of_the_weights(comfy_inproc, tiny_comfy_models):
    pack = comfy_inproc.pack
    model = tiny_comfy_models.model
    unet = model.model.diffusion_model
    options = repr(model.model_options)
    config = pack.dragkit.lora.LoRATrainingConfig(steps=1, batch=2, rank=2)
    trainer = pack.nodes.comfy_lora.ComfyLoRATrainer(model, positive(), config)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    try:
        with torch.inference_mode():
            trainer.prepare(tuple(latent.shape))
            saved = pack.nodes.comfy_autograd.saved_tensors(lambda: trainer.train(latent))
        assert saved, "the step saved activations for backward"
        assert trainer.reserved_bytes > 0, "the backward memory was measured with the probe steps"
        assert weight_copies(saved, unet) == []
        name, weight = next((n, w) for n, w in unet.named_parameters() if w.numel() >= 64)
        assert name in weight_copies(saved + [weight.detach().clone()], unet), "the same check finds a copy"
        adapted = [m for _, m in pack.nodes.comfy_lora.attention_projections(model.model)]
        assert all(m._forward_hooks for m in adapted)
    finally:
        trainer.close()
    assert not any(m._forward_hooks for m in unet.modules()), "close() removes every adapter hook"
    assert repr(model.model_options) == options, "the MODEL's patches are untouched"
    assert not any(p.is_inference() for p in unet.parameters()), "weights were made autograd-safe in place"


def test_a_motion_supervision_iteration_keeps_no_copy_of_the_weights(comfy_inproc, tiny_comfy_models, monkeypatch):
    pack = comfy_inproc.pack
    measured = []
    real = pack.nodes.comfy_autograd.backward_memory
    monkeypatch.setattr(pack.nodes.comfy_autograd, "backward_memory",
                        lambda *args: measured.append(real(*args)) or measured[-1])
    model = tiny_comfy_models.model
    unet = model.model.diffusion_model
    backend = pack.nodes.comfy_backend.ComfyBackend(model)
    conditioning = pack.nodes.comfy_backend.ComfyConditioning(positive())
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    saved = []
    parameters_before = sum(p.numel() for p in unet.parameters())

    def loop(predict, z_start):
        latent = z_start.detach().clone().requires_grad_(True)

        def iteration():
            eps, feats = predict(latent, 681, True)
            (eps.sum() + feats.float().square().mean()).backward()

        saved.extend(pack.nodes.comfy_autograd.saved_tensors(iteration))
        assert latent.grad is not None and torch.isfinite(latent.grad).all()
        return latent.detach()

    with torch.inference_mode():
        backend.run_features(loop, z, conditioning, pack.dragkit.attention.AttentionControl(), [681])
    assert saved and weight_copies(saved, unet) == []
    assert sum(p.numel() for p in unet.parameters()) == parameters_before
    assert len(measured) == 1 and measured[0] > 0, "the probe ran through the guider's model before the loop"


def test_backward_memory_is_measured_and_grows_with_the_latent(comfy_inproc, tiny_comfy_models):
    autograd = comfy_inproc.pack.nodes.comfy_autograd
    unet = tiny_comfy_models.model.model.diffusion_model
    with torch.inference_mode(False):
        autograd.make_weights_autograd_safe(unet, "cpu")
    calls = []

    def probe(h, w):
        calls.append((h, w))
        x = torch.zeros(1, 4, h, w, requires_grad=True)
        unet(x, torch.tensor([500.0]), context=positive()[0][0]).sum().backward()

    with torch.inference_mode(False), torch.enable_grad():
        small = autograd.backward_memory(probe, unet, (16, 16))
        large = autograd.backward_memory(probe, unet, (64, 64))
    assert calls == [(8, 8), (16, 16)] * 2
    assert 0 < small < large and large >= 16 * small * 0.9, "at least linear in the token count"


class OverflowingVAE:
    """Stands in for an fp16 VAE whose decoder overflows: every pixel NaN."""

    device = torch.device("cpu")

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        return torch.full((samples.shape[0], samples.shape[2] * 8, samples.shape[3] * 8, 3), float("nan"))


def nan_latent(shape=(1, 4, 8, 8)):
    samples = torch.zeros(shape)
    samples[0, 0, 0, 0] = float("nan")
    return samples


@pytest.fixture(scope="module")
def inverted(comfy_inproc, tiny_comfy_models):
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 3}
    return comfy_inproc.run_node("DragKitDDIMInvert", model=tiny_comfy_models.model, latent=latent, positive=positive(),
                                 steps=10, strength=0.7, cache_layers="decoder", cache_device="auto")


def poisoned(host, latent: dict, samples: torch.Tensor) -> dict:
    """A LATENT at ``latent``'s step holding ``samples`` (as if a node upstream had made them)."""
    latent_io = host.pack.nodes.latent_io
    step = latent_io.read_step(latent)
    return latent_io.with_step(samples, step.num_steps, step.step_index, step.timestep, step.sigma)


def test_each_node_refuses_a_non_finite_input_latent(comfy_inproc, tiny_comfy_models, inverted):
    z_t, cache = inverted
    model = tiny_comfy_models.model
    points = comfy_inproc.pack.dragkit.points.parse_drag_points('{"points": [[16, 24], [40, 24]]}', 64, 64)
    runs = {
        "DDIM Invert": lambda: comfy_inproc.run_node(
            "DragKitDDIMInvert", model=model, latent={"samples": nan_latent()}, positive=positive(), steps=10,
            strength=0.7, cache_layers="none", cache_device="auto"),
        "FastDrag Warp+BNNI": lambda: comfy_inproc.run_node(
            "DragKitFastDragWarp", latent=poisoned(comfy_inproc, z_t, nan_latent()), points=points, mode="drag", fill="bnni",
            patch_cells=12),
        "KV-Injected Sample": lambda: comfy_inproc.run_node(
            "DragKitKVInjectedSample", model=model, latent=poisoned(comfy_inproc, z_t, nan_latent()), attn_cache=cache,
            positive=positive(), kv_source="inversion cache", inject_layers="decoder", inject_start=0.0, inject_end=1.0),
        "VAE Decode (DragKit)": lambda: comfy_inproc.run_node(
            "DragKitVAEDecode", vae=tiny_comfy_models.vae, latent={"samples": nan_latent()}, feather=0),
    }
    for node, run in runs.items():
        with pytest.raises(ValueError) as err:
            with torch.inference_mode():
                run()
        message = str(err.value)
        assert message.startswith(f"[{node}] the input latent (made upstream of this node) holds 1 non-finite"), message


def test_non_finite_values_name_the_stage_that_made_them(comfy_inproc, tiny_comfy_models, inverted):
    z_t, cache = inverted
    step = next(iter(cache.kv))
    layer = next(iter(cache.kv[step]))
    k, v = cache.kv[step][layer]
    broken = type(cache)(**{**cache.__dict__, "kv": {**cache.kv, step: {**cache.kv[step], layer: (k * float("nan"), v)}}})
    with pytest.raises(ValueError, match=r"^\[KV-Injected Sample\] the output of KV-injected denoising holds \d+ non-finite"):
        with torch.inference_mode():
            comfy_inproc.run_node("DragKitKVInjectedSample", model=tiny_comfy_models.model, latent=z_t, attn_cache=broken,
                                  positive=positive(), kv_source="inversion cache", inject_layers="decoder",
                                  inject_start=0.0, inject_end=1.0)
    with pytest.raises(ValueError, match=r"^\[VAE Decode \(DragKit\)\] the output of the VAE decode holds 12288 non-finite"):
        with torch.inference_mode():
            comfy_inproc.run_node("DragKitVAEDecode", vae=OverflowingVAE(), latent={"samples": torch.zeros(1, 4, 8, 8)},
                                  feather=0)
    huge = {"samples": torch.full((1, 4, 8, 8), 3e38)}
    with pytest.raises(ValueError, match=r"^\[DDIM Invert\] the output of DDIM inversion .* holds \d+ non-finite"):
        with torch.inference_mode():
            comfy_inproc.run_node("DragKitDDIMInvert", model=tiny_comfy_models.model, latent=huge, positive=positive(),
                                  steps=10, strength=0.7, cache_layers="none", cache_device="auto")


def test_a_probe_that_cannot_run_falls_back_to_an_estimate(comfy_inproc, tiny_comfy_models, caplog):
    autograd = comfy_inproc.pack.nodes.comfy_autograd
    model = tiny_comfy_models.model

    def refusing_probe(h, w):
        raise ValueError(f"this patch needs a bigger latent than {h}x{w}")

    with torch.inference_mode(False):
        need = autograd.prepare_for_backward(model, refusing_probe, (1, 4, 8, 8))
    forward_space = model.model.memory_required([1, 4, 8, 8])
    assert need == int(int(autograd.FALLBACK_FACTOR * forward_space) + forward_space)
    assert "could not measure the backward memory (ValueError: this patch needs a bigger latent" in caplog.text
