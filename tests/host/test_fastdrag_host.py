"""FastDrag in a real ComfyUI: the warp node, the LCM set-up, and the released schedule.

FastDrag's released setup is an LCM-distilled UNet used as a plain ε-model on
a 10-step DDIM schedule (strength 0.7, warp at t = 601). In ComfyUI that is a
checkpoint plus an LCM LoRA through LoraLoaderModelOnly: the LoRA changes the
weights, not the noise schedule, so DDIM Invert evaluates exactly the
released timesteps. ModelSamplingDiscrete "lcm" remaps timesteps (19, 39, ...)
and the nodes warn about it.
"""

import logging

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def lcm_style_lora(tmp_path_factory, tiny_comfy_models, comfy_nodes):
    """A small LoRA (kohya keys) on every attention projection of the tiny UNet, in a loras folder."""
    import folder_paths

    folder = tmp_path_factory.mktemp("loras")
    unet = tiny_comfy_models.model.model.diffusion_model
    generator = torch.Generator().manual_seed(11)
    tensors = {}
    for name, module in unet.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q")):
            key = "lora_unet_" + name.replace(".", "_")
            out_features, in_features = module.weight.shape
            tensors[f"{key}.lora_down.weight"] = torch.randn(4, in_features, generator=generator) * 0.05
            tensors[f"{key}.lora_up.weight"] = torch.randn(out_features, 4, generator=generator) * 0.05
            tensors[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(folder / "lcm_style_lora.safetensors"))
    folder_paths.add_model_folder_path("loras", str(folder))
    return "lcm_style_lora.safetensors"


def test_released_schedule_with_a_lora_loaded_the_comfyui_way(comfy_inproc, tiny_comfy_models, lcm_style_lora, caplog):
    with torch.inference_mode():
        (patched,) = comfy_inproc.nodes.LoraLoaderModelOnly().load_lora_model_only(tiny_comfy_models.model, lcm_style_lora, 1.0)
    positive = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)), {}]]
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))}
    with caplog.at_level(logging.WARNING):
        z_t, cache = comfy_inproc.run_node("DragKitDDIMInvert", model=patched, latent=latent, positive=positive, steps=10,
                                          strength=0.7, cache_layers="decoder", cache_device="auto")
    assert cache.schedule.inversion_timesteps() == [1, 101, 201, 301, 401, 501, 601]
    assert cache.schedule.t_star == 601 and sorted(cache.kv) == [1, 101, 201, 301, 401, 501, 601]
    assert "evaluates timestep" not in caplog.text
    z_plain, _ = comfy_inproc.run_node("DragKitDDIMInvert", model=tiny_comfy_models.model, latent=latent, positive=positive,
                                      steps=10, strength=0.7, cache_layers="none", cache_device="auto")
    assert not torch.allclose(z_t["samples"], z_plain["samples"]), "the LoRA must act"


def test_lcm_model_sampling_patch_is_reported(comfy_inproc, tiny_comfy_models, caplog):
    import comfy_extras.nodes_model_advanced as advanced

    with torch.inference_mode():
        (lcm,) = advanced.ModelSamplingDiscrete().patch(tiny_comfy_models.model, "lcm", False)
    positive = [[torch.randn(1, 77, 768), {}]]
    with caplog.at_level(logging.WARNING):
        comfy_inproc.run_node("DragKitDDIMInvert", model=lcm, latent={"samples": torch.randn(1, 4, 8, 8)}, positive=positive,
                              steps=10, strength=0.7, cache_layers="none", cache_device="auto")
    assert "leave that patch out" in caplog.text


def test_warp_node_keeps_the_step_and_moves_content(comfy_inproc, tiny_comfy_models):
    positive = [[torch.randn(1, 77, 768), {}]]
    latent = {"samples": torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(3))}
    z_t, cache = comfy_inproc.run_node("DragKitDDIMInvert", model=tiny_comfy_models.model, latent=latent, positive=positive,
                                      steps=10, strength=0.7, cache_layers="decoder", cache_device="auto")
    points = comfy_inproc.pack.dragkit.points.parse_drag_points('{"points": [[40, 48], [72, 48]]}', 128, 96)
    mask = torch.zeros(1, 96, 128)
    mask[0, 24:72, 24:104] = 1
    (warped,) = comfy_inproc.run_node("DragKitFastDragWarp", latent=z_t, points=points, mode="drag", fill="bnni",
                                      patch_cells=12, mask=mask)
    step = comfy_inproc.pack.nodes.latent_io.read_step(warped)
    assert step is not None and step.timestep == 601
    samples = warped["samples"]
    assert torch.isfinite(samples).all()
    assert torch.equal(samples[..., 6, 9], z_t["samples"][..., 6, 5])
    assert torch.equal(samples[..., 0, :], z_t["samples"][..., 0, :])
    (out,) = comfy_inproc.run_node("DragKitKVInjectedSample", model=tiny_comfy_models.model, latent=warped, attn_cache=cache,
                                   positive=positive, kv_source="inversion cache", inject_layers="decoder",
                                   inject_start=0.0, inject_end=1.0)
    assert torch.isfinite(out["samples"]).all()


def test_warp_node_errors(comfy_inproc):
    parse = comfy_inproc.pack.dragkit.points.parse_drag_points
    with_step = comfy_inproc.pack.nodes.latent_io.with_step
    latent = with_step(torch.randn(1, 4, 12, 16), 10, 3, 601, 1.0)
    small = parse('{"points": [[10, 10], [20, 10]]}', 64, 48)
    with pytest.raises(ValueError, match=r"^\[FastDrag Warp\+BNNI\] .*encodes to a 8x6 latent"):
        comfy_inproc.run_node("DragKitFastDragWarp", latent=latent, points=small, mode="drag", fill="bnni", patch_cells=12)
    points = parse('{"points": [[10, 10], [20, 10]]}', 128, 96)
    with pytest.raises(ValueError, match=r"^\[FastDrag Warp\+BNNI\] .*a video latent of several frames"):
        comfy_inproc.run_node("DragKitFastDragWarp", latent={"samples": torch.randn(1, 16, 2, 12, 16)}, points=points,
                              mode="drag", fill="bnni", patch_cells=12)
    with pytest.raises(ValueError, match=r"^\[FastDrag Warp\+BNNI\] .*mask is 100x96"):
        comfy_inproc.run_node("DragKitFastDragWarp", latent=latent, points=points, mode="drag", fill="bnni", patch_cells=12,
                              mask=torch.ones(1, 96, 100))
