"""The tiny seeded test models, and the tiny SD1.5 checkpoint as ComfyUI sees it.

Host tests here load the checkpoint with ComfyUI's own CheckpointLoaderSimple
(in-process, CPU) and check that ComfyUI's UNet and the diffusers UNet built
from the same seed predict the same noise.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from tools import tiny_models
from tools.tiny_models import (
    micro_unet,
    micro_vae,
    sd15_ldm_unet_config,
    seeded_tensor,
    tiny_sd15_unet,
)

# Measured on CPU (torch 2.14, ComfyUI 0.3.64, sub-quadratic attention vs diffusers' SDPA):
# max |eps_comfy - eps_diffusers| = 4.2e-6 (direct diffusion_model call) and 6.1e-6
# (apply_model with sigma) for outputs of std ~0.65. The tolerance leaves ~5x headroom.
BACKEND_ATOL = 3e-5

SD15_LEVELS4_PARAMS = 73_657_924


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Micro models (no host)


def test_micro_unet_is_deterministic_per_seed():
    a, b, c = micro_unet(0), micro_unet(0), micro_unet(1)
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert _same_state(sa, sb)
    differing = sum(not torch.equal(sa[k], sc[k]) for k in sa)
    assert differing == len(sa)

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ya, yb, yc = (m(x, 10, ctx).sample for m in (a, b, c))
    assert ya.shape == (2, 4, 8, 8)
    assert torch.isfinite(ya).all()
    assert torch.equal(ya, yb)
    assert not torch.allclose(ya, yc)
    assert 0.05 < ya.std().item() < 20


def test_micro_unet_shape_and_mode():
    unet = micro_unet()
    assert not unet.training
    assert not any(p.requires_grad for p in unet.parameters())
    assert tuple(unet.config.block_out_channels) == (32, 64)
    assert unet.config.cross_attention_dim == 32
    assert tiny_models.count_parameters(unet) < 2_000_000
    with torch.no_grad():
        y = unet(torch.randn(1, 4, 16, 12), torch.tensor([999]), torch.randn(1, 3, 32)).sample
    assert y.shape == (1, 4, 16, 12)


def test_building_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    micro_unet(3)
    micro_vae(3)
    assert torch.equal(state, torch.get_rng_state())


def test_seeded_fill_rule():
    unet = micro_unet(5)
    sd = unet.state_dict()
    for name in ("conv_in.weight", "conv_in.bias", "down_blocks.0.resnets.0.norm1.weight"):
        assert torch.equal(sd[name], seeded_tensor(name, sd[name].shape, 5))
    norm = sd["down_blocks.0.resnets.0.norm1.weight"]
    assert abs(norm.mean().item() - 1) < 0.1 and norm.std().item() > 0.01
    w = sd["down_blocks.0.resnets.0.conv1.weight"]
    assert w.std().item() == pytest.approx(1 / math.sqrt(w[0].numel()), rel=0.1)


def test_micro_vae_shapes_and_determinism():
    a, b, c = micro_vae(0), micro_vae(0), micro_vae(1)
    assert _same_state(_state(a), _state(b))
    assert not _same_state(_state(a), _state(c))
    img = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        lat = a.encode(img).latent_dist.mean
        lat_b = b.encode(img).latent_dist.mean
        out = a.decode(lat).sample
    assert lat.shape == (1, 4, 8, 6)
    assert torch.equal(lat, lat_b)
    assert out.shape == (1, 3, 64, 48)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# Tiny SD1.5-shaped UNet (no host)


def test_tiny_sd15_unet_structure(tiny_sd15_diffusers):
    unet = tiny_sd15_diffusers
    cfg = unet.config
    assert tiny_models.count_parameters(unet) == SD15_LEVELS4_PARAMS
    assert cfg.cross_attention_dim == 768 and not cfg.use_linear_projection
    assert tuple(cfg.block_out_channels) == (320,) * 4
    assert [type(b).__name__ for b in unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    # decoder self-attention lives in up blocks 1..3 (the last three of four), as in SD1.5
    self_attn = [n for n, _ in unet.named_modules() if n.endswith("attn1")]
    # 3 encoder + 1 middle + 6 decoder (two per CrossAttnUp block, as each up block has
    # layers_per_block + 1 res blocks), in SD1.5's order (SD1.5: 6 + 1 + 9)
    assert len(self_attn) == 10
    assert [".".join(n.split(".")[:4]) for n in self_attn if n.startswith("up_blocks")] == [
        f"up_blocks.{b}.attentions.{i}" for b in (1, 2, 3) for i in (0, 1)
    ]
    attn = unet.up_blocks[2].attentions[0].transformer_blocks[0].attn1
    assert attn.heads == 8 and attn.inner_dim // attn.heads == 40
    # weights follow the seeded fill rule (determinism without a second build)
    sd = unet.state_dict()
    for name in ("conv_in.weight", "up_blocks.3.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                 "mid_block.resnets.1.norm2.bias"):
        assert torch.equal(sd[name], seeded_tensor(name, sd[name].shape, 0))


def test_tiny_sd15_unet_forward(tiny_sd15_diffusers):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = tiny_sd15_diffusers(x, torch.tensor([500, 500]), ctx).sample
        y2 = tiny_sd15_diffusers(x, torch.tensor([500, 500]), ctx).sample
    assert y.shape == (2, 4, 8, 8)
    assert torch.isfinite(y).all()
    assert torch.equal(y, y2)
    assert 0.05 < y.std().item() < 20


def test_tiny_sd15_two_levels_and_other_seed():
    unet = tiny_sd15_unet(seed=1, levels=2)
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D", "CrossAttnUpBlock2D"]
    name = "conv_in.weight"
    assert torch.equal(unet.state_dict()[name], seeded_tensor(name, (320, 4, 3, 3), 1))
    assert not torch.equal(unet.state_dict()[name], seeded_tensor(name, (320, 4, 3, 3), 0))
    with torch.no_grad():
        y = unet(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 77, 768)).sample
    assert y.shape == (1, 4, 8, 8)
    with pytest.raises(ValueError):
        tiny_models.sd15_unet_config(levels=1)


def test_checkpoint_cache_name_has_version_seed_and_levels(monkeypatch, tmp_path):
    monkeypatch.setenv(tiny_models.CACHE_ENV, str(tmp_path))
    assert tiny_models.cache_dir() == tmp_path
    name = tiny_models.tiny_checkpoint_name(seed=3, levels=2)
    assert tiny_models.CHECKPOINT_VERSION in name and "s3" in name and "l2" in name
    monkeypatch.delenv(tiny_models.CACHE_ENV)
    assert tiny_models.cache_dir().name == "dragkit-tests"


# ---------------------------------------------------------------------------------------------
# The checkpoint in ComfyUI (host)


@pytest.mark.host
def test_checkpoint_is_detected_as_sd15(tiny_comfy_models):
    import comfy.supported_models

    config = tiny_comfy_models.model.model.model_config
    assert type(config) is comfy.supported_models.SD15
    expected = sd15_ldm_unet_config(4)
    detected = config.unet_config
    for key in ("model_channels", "context_dim", "num_res_blocks", "channel_mult", "transformer_depth",
                "transformer_depth_output", "transformer_depth_middle", "use_linear_in_transformer",
                "num_heads"):
        assert detected[key] == expected[key], key


@pytest.mark.host
def test_checkpoint_loads_without_missing_or_unexpected_keys(tiny_comfy_models):
    messages = tiny_comfy_models.log.messages(logging.DEBUG)
    bad = [m for m in messages
           if any(s in m for s in ("unet missing", "unet unexpected", "Missing VAE keys", "Leftover VAE keys",
                                   "clip unexpected", "left over keys", "no CLIP/text encoder",
                                   "not a checkpoint file"))]
    # The only tolerated gap is CLIP's text_projection, which no SD1.x checkpoint can provide
    # (it only feeds the projected pooled output, unused by SD1.x).
    bad += [m for m in messages
            if m.startswith("clip missing") and m != "clip missing: ['clip_l.transformer.text_projection.weight']"]
    assert not bad, "\n".join(bad)
    assert tiny_comfy_models.clip is not None and tiny_comfy_models.vae is not None


@pytest.mark.host
def test_comfy_unet_has_exactly_the_diffusers_weights(tiny_comfy_models, tiny_sd15_diffusers):
    comfy_sd = tiny_comfy_models.model.model.diffusion_model.state_dict()
    converted = tiny_models.diffusers_to_ldm_unet_state_dict(tiny_sd15_diffusers.state_dict(), levels=4)
    assert set(comfy_sd) == set(converted)
    different = [k for k in converted if not torch.equal(comfy_sd[k], converted[k])]
    assert not different, different[:10]


@pytest.mark.host
@pytest.mark.parametrize("t", [1, 500, 980])
def test_comfy_and_diffusers_predict_the_same_noise(tiny_comfy_models, tiny_sd15_diffusers, t):
    import comfy.model_management

    patcher = tiny_comfy_models.model
    comfy.model_management.load_models_gpu([patcher])
    base = patcher.model
    gen = torch.Generator().manual_seed(t)
    z = torch.randn(2, 4, 8, 8, generator=gen)
    ctx = torch.randn(2, 77, 768, generator=gen)
    timesteps = torch.full((2,), float(t))
    with torch.inference_mode():
        eps_ref = tiny_sd15_diffusers(z, timesteps, ctx).sample
        # 1) the ldm UNet called directly: checks the weight conversion
        eps_direct = base.diffusion_model(z, timesteps, context=ctx)
        # 2) through apply_model, which takes the VE latent x = z * sqrt(1 + sigma^2) and sigma
        sigma = base.model_sampling.sigma(timesteps)
        assert torch.equal(base.model_sampling.timestep(sigma).float(), timesteps)
        s = sigma.view(-1, 1, 1, 1)
        x = z * torch.sqrt(1 + s**2)
        denoised = base.apply_model(x, sigma, c_crossattn=ctx)
        eps_apply = (x - denoised) / s
    assert eps_ref.std().item() > 0.05
    assert (eps_direct - eps_ref).abs().max().item() < BACKEND_ATOL
    assert (eps_apply - eps_ref).abs().max().item() < BACKEND_ATOL


@pytest.mark.host
def test_vae_encode_decode_shapes(tiny_comfy_models, comfy_nodes):
    image = torch.rand(1, 64, 48, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        (latent,) = comfy_nodes.VAEEncode().encode(tiny_comfy_models.vae, image)
        (decoded,) = comfy_nodes.VAEDecode().decode(tiny_comfy_models.vae, latent)
    samples = latent["samples"]
    assert samples.shape == (1, 4, 8, 6)
    assert torch.isfinite(samples).all()
    assert decoded.shape == (1, 64, 48, 3)
    assert torch.isfinite(decoded).all()
    assert decoded.min().item() >= 0 and decoded.max().item() <= 1


@pytest.mark.host
def test_clip_text_encode(tiny_comfy_models, comfy_nodes):
    with torch.inference_mode():
        (cond,) = comfy_nodes.CLIPTextEncode().encode(tiny_comfy_models.clip, "a photo of a cat")
    assert len(cond) == 1
    emb, extra = cond[0]
    assert emb.shape == (1, 77, 768)
    assert torch.isfinite(emb).all()
    assert extra["pooled_output"].shape == (1, 768)
    assert torch.isfinite(extra["pooled_output"]).all()


# ---------------------------------------------------------------------------------------------
# The ControlNet and the upscale model in ComfyUI (host)


def test_controlnet_and_upscaler_cache_names_have_their_versions():
    name = tiny_models.tiny_controlnet_name(seed=2)
    assert tiny_models.CONTROLNET_VERSION in name and "s2" in name
    name = tiny_models.tiny_upscaler_name(seed=2)
    assert tiny_models.UPSCALER_VERSION in name and f"x{tiny_models.UPSCALER_SCALE}" in name and "s2" in name


@pytest.mark.host
def test_controlnet_loads_as_sd15_with_every_key_and_acting_zero_convs(comfy_nodes, tiny_controlnet):
    import comfy.controlnet
    import comfy.model_detection
    import comfy.supported_models
    import comfy.utils

    from dragrun.comfy_host import capture_logs

    with capture_logs(logging.DEBUG) as logs:
        control = comfy.controlnet.load_controlnet(str(tiny_controlnet))
    assert not [m for m in logs.messages() if "controlnet keys" in m or "could not detect" in m]
    assert isinstance(control, comfy.controlnet.ControlNet)
    net = control.control_model
    assert len(net.zero_convs) == len(net.input_blocks) == 8  # one per input block of the tiny UNet
    assert all(conv[0].weight.abs().sum() > 0 for conv in net.zero_convs)
    assert net.middle_block_out[0].weight.abs().sum() > 0
    sd = comfy.utils.load_torch_file(str(tiny_controlnet), safe_load=True)
    config = comfy.model_detection.model_config_from_unet(sd, "control_model.", True)
    assert type(config) is comfy.supported_models.SD15


@pytest.mark.host
def test_upscaler_is_detected_by_spandrel(comfy_nodes, tiny_upscaler):
    import comfy.utils
    from spandrel import ImageModelDescriptor, ModelLoader

    model = ModelLoader().load_from_state_dict(comfy.utils.load_torch_file(str(tiny_upscaler), safe_load=True))
    assert isinstance(model, ImageModelDescriptor) and model.architecture.id == "Compact"
    assert model.scale == tiny_models.UPSCALER_SCALE
    image = torch.rand(1, 3, 10, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(image)
    nearest = torch.nn.functional.interpolate(image, scale_factor=tiny_models.UPSCALER_SCALE, mode="nearest")
    assert out.shape == nearest.shape
    assert 0 < float((out - nearest).abs().mean()) < 0.1  # measured 0.04: close to the input, not equal
