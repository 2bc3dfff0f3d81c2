"""Every node on a tiny SDXL and a tiny SD2.x v-prediction checkpoint, loaded by ComfyUI itself.

The checkpoints (:mod:`tools.tiny_sdxl_sd2`) have the families' block
structure and conditioning; ComfyUI's loader must detect them as SDXL and
SD2.x-v. Latents are 8x8 (64x64 images) to keep a CPU run short.
"""

import pytest
import torch

from tools import tiny_sdxl_sd2

pytestmark = pytest.mark.host

SIDE = 64


def load(path):
    import comfy.sd

    with torch.inference_mode():
        model, _, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=False)[:3]
    return model, vae


@pytest.fixture(scope="module")
def sdxl(comfy_inproc):
    return load(tiny_sdxl_sd2.tiny_sdxl_checkpoint_path())


@pytest.fixture(scope="module")
def sd2v(comfy_inproc):
    return load(tiny_sdxl_sd2.tiny_sd2_v_checkpoint_path())


def sdxl_conditioning(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 2048, generator=gen),
             {"pooled_output": torch.randn(1, 1280, generator=gen), "width": SIDE, "height": SIDE}]]


def sd2_conditioning(seed=1):
    return [[torch.randn(1, 77, 1024, generator=torch.Generator().manual_seed(seed)), {}]]


def source_latent(seed=2):
    return {"samples": torch.randn(1, 4, SIDE // 8, SIDE // 8, generator=torch.Generator().manual_seed(seed)) * 2}


def test_comfyui_detects_the_families(sdxl, sd2v):
    import comfy.model_sampling

    assert type(sdxl[0].model).__name__ == "SDXL"
    assert type(sd2v[0].model.model_config).__name__ == "SD20"
    assert isinstance(sd2v[0].get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION)


def test_sdxl_layers_by_role(comfy_inproc, sdxl):
    backend = comfy_inproc.pack.nodes.comfy_backend.ComfyBackend(sdxl[0])
    layers = backend.self_attention_layers()
    decoder = [layer for layer in layers if layer.stage == "up"]
    assert len(layers) == 70 and len(decoder) == 36  # 2x2 + 2x10 encoder, 10 middle, 3x2 + 3x10 decoder
    select = comfy_inproc.pack.dragkit.attention.select_layers
    assert select(layers, "decoder") == tuple(decoder)
    mutual = select(layers, "masactrl")
    assert len(mutual) == 6 and {layer.downscale for layer in mutual} == {2}, "the finer decoder attention level"
    unet = sdxl[0].model.diffusion_model
    index = comfy_inproc.pack.nodes.comfy_backend._feature_block_index(unet)
    assert index == 6, "features: the output of the middle of SDXL's three decoder levels (after its upsample)"


def test_every_node_runs_on_sdxl(comfy_inproc, sdxl):
    model, vae = sdxl
    pack, positive = comfy_inproc.pack, sdxl_conditioning()
    z_t, cache = comfy_inproc.run_node("DragKitDDIMInvert", model=model, latent=source_latent(), positive=positive,
                                       steps=10, strength=0.7, cache_layers="decoder", cache_device="auto")
    assert len(cache.layers) == 36
    points = pack.dragkit.points.parse_drag_points('{"points": [[20, 30], [40, 30]]}', SIDE, SIDE)
    (warped,) = comfy_inproc.run_node("DragKitFastDragWarp", latent=z_t, points=points, mode="drag", fill="bnni",
                                      patch_cells=12)
    (edited,) = comfy_inproc.run_node("DragKitKVInjectedSample", model=model, latent=warped, attn_cache=cache,
                                      positive=positive, kv_source="inversion cache", inject_layers="decoder",
                                      inject_start=0.0, inject_end=1.0)
    optimise = pack.nodes.optimize.MotionSupervisionOptimize()
    for mode, latent, knobs in (("dragdiffusion", z_t, {}), ("refine_warp", warped, {}),
                                ("gooddrag", z_t, dict(drag_steps=1, drags_per_step=1, grad_steps=1, beta=4.0,
                                                       max_unchanged=0))):
        with torch.inference_mode():
            out, tracked = optimise.optimize(model, latent, cache, positive, points, mode, 2, -1, -1, -1, -1, **knobs)
        assert torch.isfinite(out["samples"]).all() and tracked.num_pairs == 1, mode
    (mutual,) = comfy_inproc.run_node("DragKitKVInjectedSample", model=model, latent=out, attn_cache=cache,
                                      positive=positive, kv_source="reference branch", inject_layers="masactrl",
                                      inject_start=0.0, inject_end=1.0)
    decoded = comfy_inproc.run_node("DragKitVAEDecode", vae=vae, latent=edited, feather=2, points=points)
    image, preview = decoded["result"] if isinstance(decoded, dict) else decoded
    assert image.shape == (1, SIDE, SIDE, 3) and torch.isfinite(mutual["samples"]).all()


def test_lora_fine_tune_on_sdxl_loads_back_with_lora_loader(comfy_inproc, sdxl):
    model, vae = sdxl
    node = comfy_inproc.pack.nodes.lora.LoRAFineTune()
    image = torch.rand(1, SIDE, SIDE, 3, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        adapted, _ = node.finetune(model, vae, image, sdxl_conditioning(), 2, 4, 4.0, 1e-2, 1, 0, "", False)
    patched = [key for key in adapted.patches if ".attn1." in key or ".attn2." in key]
    assert len(patched) == 70 * 2 * 4, "to_q/k/v/out of every self- and cross-attention layer"


def test_v_prediction_inversion_round_trip(comfy_inproc, sd2v):
    model, _ = sd2v
    positive, latent = sd2_conditioning(), source_latent()
    z_t, cache = comfy_inproc.run_node("DragKitDDIMInvert", model=model, latent=latent, positive=positive, steps=20,
                                       strength=0.7, cache_layers="decoder", cache_device="auto")
    (out,) = comfy_inproc.run_node("DragKitKVInjectedSample", model=model, latent=z_t, attn_cache=cache,
                                   positive=positive, kv_source="inversion cache", inject_layers="decoder",
                                   inject_start=0.0, inject_end=1.0)
    error = (out["samples"] - latent["samples"]).abs().mean() / latent["samples"].abs().mean()
    assert error < 0.3, error  # the SD1.5 host test's bound (tests/host/test_foundation_nodes.py)


def sd15_conditioning(seed=1):
    return [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed)), {}]]


@pytest.mark.parametrize(
    "family, conditioning, message",
    [
        ("sdxl", sd15_conditioning, r"prompt embeddings are 768 wide but this SDXL MODEL takes 2048"),
        ("sdxl", lambda: [[sdxl_conditioning()[0][0], {}]], r"no pooled text embedding, which this SDXL MODEL needs"),
        ("sd2v", sdxl_conditioning, r"prompt embeddings are 2048 wide but this SD20 MODEL takes 1024"),
    ],
)
def test_conditioning_of_another_family_is_a_clear_node_error(comfy_inproc, request, family, conditioning, message):
    model, vae = request.getfixturevalue(family)
    positive = conditioning()
    with pytest.raises(ValueError, match=r"^\[DDIM Invert\] the positive conditioning.*" + message):
        comfy_inproc.run_node("DragKitDDIMInvert", model=model, latent=source_latent(), positive=positive, steps=10,
                              strength=0.7, cache_layers="decoder", cache_device="auto")
    right = sdxl_conditioning() if family == "sdxl" else sd2_conditioning()
    z_t, cache = comfy_inproc.run_node("DragKitDDIMInvert", model=model, latent=source_latent(), positive=right,
                                       steps=4, strength=0.5, cache_layers="decoder", cache_device="auto")
    with pytest.raises(ValueError, match=r"^\[KV-Injected Sample\] the negative conditioning.*" + message):
        comfy_inproc.run_node("DragKitKVInjectedSample", model=model, latent=z_t, attn_cache=cache, positive=right,
                              negative=positive, cfg=2.0, kv_source="inversion cache", inject_layers="decoder",
                              inject_start=0.0, inject_end=1.0)
    points = comfy_inproc.pack.dragkit.points.parse_drag_points('{"points": [[20, 30], [40, 30]]}', SIDE, SIDE)
    with pytest.raises(ValueError, match=r"^\[Motion-Supervision Optimize\] the positive conditioning.*" + message):
        with torch.inference_mode():
            comfy_inproc.pack.nodes.optimize.MotionSupervisionOptimize().optimize(
                model, z_t, cache, positive, points, "dragdiffusion", 2, -1, -1, -1, -1)
    image = torch.rand(1, SIDE, SIDE, 3, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match=r"^\[LoRA Fine-tune\] the positive conditioning.*" + message):
        with torch.inference_mode():
            comfy_inproc.pack.nodes.lora.LoRAFineTune().finetune(model, vae, image, positive, 2, 4, 4.0, 1e-2, 1, 0,
                                                                 "", False)


def test_feature_level_option_on_sdxl(comfy_inproc, sdxl):
    model, _ = sdxl
    pack, positive = comfy_inproc.pack, sdxl_conditioning()
    block_index = pack.nodes.comfy_backend._feature_block_index
    assert block_index(model.model.diffusion_model, 0) == 3, "level 0 ends with output_blocks[2]'s upsample"
    z_t, cache = comfy_inproc.run_node("DragKitDDIMInvert", model=model, latent=source_latent(), positive=positive,
                                       steps=10, strength=0.7, cache_layers="decoder", cache_device="auto")
    points = pack.dragkit.points.parse_drag_points('{"points": [[20, 30], [40, 30]]}', SIDE, SIDE)
    optimise = pack.nodes.optimize.MotionSupervisionOptimize()
    outputs = {}
    with torch.inference_mode():
        for level in (-1, 1, 0):
            outputs[level] = optimise.optimize(model, z_t, cache, positive, points, "dragdiffusion", 2, -1, -1, -1, -1,
                                               feature_level=level)[0]["samples"]
        with pytest.raises(ValueError, match=r"^\[Motion-Supervision Optimize\] feature_level 2 is not available: "
                                             r"this UNet's decoder has 3 levels"):
            optimise.optimize(model, z_t, cache, positive, points, "dragdiffusion", 2, -1, -1, -1, -1, feature_level=2)
    assert torch.equal(outputs[-1], outputs[1]), "the default is the penultimate of SDXL's three decoder levels"
    assert not torch.allclose(outputs[0], outputs[1]), "another level supervises other features"
