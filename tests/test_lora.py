"""The LoRA training loop (dragkit.lora) and its diffusers/peft side (dragkit.lora_diffusers), on the micro UNet.

Measured (micro UNet, 8x8 latent, batch 4, rank 4, lr 1e-2, 2 shared CPU cores):
held-out ε-MSE on the trained latent (16 fixed draws) falls from ~1.3 (base)
to ~0.9 after 12 steps; a step takes ~0.2-0.8 s depending on load.
"""

import pytest
import torch

from dragkit.errors import DragInputError
from dragkit.lora import LoRATrainingConfig, train_lora
from dragkit.lora_diffusers import (
    eps_predictor,
    load_lora,
    lora_modules,
    lora_state_dict,
    save_lora,
    train_lora_diffusers,
)
from dragkit.schedule import scaled_linear_alphas_cumprod
from tools.tiny_models import micro_unet

CONFIG = LoRATrainingConfig(steps=12, rank=4, alpha=4.0, lr=1e-2, batch=4, seed=3)


@pytest.fixture(scope="module")
def data():
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(2))
    return z0, ctx


def base_checksum(unet) -> float:
    return sum(float(p.double().sum()) + float(p.double().abs().sum()) for n, p in unet.named_parameters() if "lora_" not in n)


@pytest.fixture(scope="module")
def trained(data):
    z0, ctx = data
    unet = micro_unet(0)
    before = base_checksum(unet)
    calls = []
    result = train_lora_diffusers(unet, z0, ctx, CONFIG, progress=lambda done, loss: calls.append((done, loss)))
    return unet, result, before, calls


def held_out_loss(unet, z0, ctx, draws=16):
    """ε-MSE on fixed (t, ε) draws; also returns the ε predictions."""
    gen = torch.Generator().manual_seed(99)
    alphas = scaled_linear_alphas_cumprod()
    t = torch.randint(0, 1000, (draws,), generator=gen)
    eps = torch.randn((draws,) + tuple(z0.shape[1:]), generator=gen)
    a = alphas[t].float().view(-1, 1, 1, 1)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
    with torch.no_grad():
        pred = eps_predictor(unet, ctx, alphas)(z_t, t)
    return float(torch.nn.functional.mse_loss(pred, eps)), pred


def test_adapter_targets_every_attention_projection(trained):
    unet, _, _, _ = trained
    names = [name for name, _ in lora_modules(unet)]
    attention = [n for n, m in unet.named_modules() if n.endswith((".attn1", ".attn2"))]
    assert len(names) == 4 * len(attention)
    assert all(name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0") for name in names)
    assert all(p.dtype == torch.float32 for n, p in unet.named_parameters() if "lora_" in n)


def test_loss_falls_and_lora_changes_eps(trained, data):
    unet, result, _, calls = trained
    z0, ctx = data
    assert len(result.losses) == CONFIG.steps and [c[0] for c in calls] == list(range(1, CONFIG.steps + 1))
    trained_loss, trained_eps = held_out_loss(unet, z0, ctx)
    unet.disable_adapters()
    try:
        base_loss, base_eps = held_out_loss(unet, z0, ctx)
    finally:
        unet.enable_adapters()
    assert trained_loss < 0.9 * base_loss, (base_loss, trained_loss)
    assert (trained_eps - base_eps).abs().mean() > 1e-2


def test_base_weights_unchanged(trained):
    unet, _, before, _ = trained
    assert base_checksum(unet) == before
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)


def test_deterministic_for_a_seed(data):
    z0, ctx = data
    config = LoRATrainingConfig(steps=3, rank=4, alpha=4.0, lr=1e-2, batch=2, seed=7)
    runs = []
    for _ in range(2):
        unet = micro_unet(0)
        result = train_lora_diffusers(unet, z0, ctx, config)
        runs.append((result.losses, lora_state_dict(unet)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    other = micro_unet(0)
    changed = train_lora_diffusers(other, z0, ctx, LoRATrainingConfig(steps=3, rank=4, alpha=4.0, lr=1e-2, batch=2, seed=8))
    assert changed.losses != runs[0][0]


def test_save_load_round_trip(trained, data, tmp_path):
    unet, _, _, _ = trained
    z0, ctx = data
    path = save_lora(unet, tmp_path / "sub" / "lora.safetensors")
    assert path.is_file() and not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    sd = lora_state_dict(unet)
    assert all(k.startswith("lora_unet_") for k in sd)
    assert float(next(v for k, v in sd.items() if k.endswith(".alpha"))) == CONFIG.alpha
    fresh = micro_unet(0)
    loaded = load_lora(fresh, path)
    assert len(loaded) == len(lora_modules(unet))
    _, expected = held_out_loss(unet, z0, ctx)
    _, got = held_out_loss(fresh, z0, ctx)
    assert (expected - got).abs().max() < 1e-6


def test_progress_exception_stops_training():
    weight = torch.nn.Parameter(torch.zeros(4))

    def predict(z_t, t):
        return z_t * weight.view(1, -1, 1, 1)

    class Stop(Exception):
        pass

    seen = []

    def progress(done, loss):
        seen.append(done)
        if done == 2:
            raise Stop

    with pytest.raises(Stop):
        train_lora(predict, [weight], torch.zeros(1, 4, 2, 2), scaled_linear_alphas_cumprod(),
                   LoRATrainingConfig(steps=10, batch=2), progress=progress)
    assert seen == [1, 2]


def test_posterior_std_is_sampled():
    weight = torch.nn.Parameter(torch.zeros(4))
    seen = []

    def predict(z_t, t):
        seen.append(z_t.detach().clone())
        return z_t * weight.view(1, -1, 1, 1)

    mean = torch.zeros(1, 4, 2, 2)
    config = LoRATrainingConfig(steps=1, batch=2, seed=1)
    alphas = torch.ones(1000, dtype=torch.float64)  # ᾱ = 1: z_t = z0
    train_lora(predict, [weight], mean, alphas, config)
    train_lora(predict, [weight], mean, alphas, config, latent_std=torch.full_like(mean, 0.5))
    assert torch.equal(seen[0], torch.zeros_like(seen[0]))
    assert 0.2 < float(seen[1].std()) < 1.0


@pytest.mark.parametrize(
    "change, message",
    [({"steps": 0}, "steps"), ({"rank": 0}, "rank"), ({"lr": 0.0}, "learning rate"), ({"batch": 0}, "batch"),
     ({"alpha": -1.0}, "alpha")],
)
def test_config_errors(change, message):
    with pytest.raises(DragInputError, match=message):
        LoRATrainingConfig(**change).validate()


def test_latent_must_be_one_image():
    with pytest.raises(DragInputError, match="one image"):
        train_lora(lambda z, t: z, [torch.nn.Parameter(torch.zeros(1))], torch.zeros(2, 4, 2, 2),
                   scaled_linear_alphas_cumprod(), LoRATrainingConfig(steps=1))
