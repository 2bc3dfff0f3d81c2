"""The real-size random SDXL checkpoint (tools/sdxl_random.py) is what ComfyUI's loader takes for SDXL.

Checked on the meta device (keys and shapes, no memory): a real write is
6.9 GB, which the GPU check makes (``scripts/gpu_check.sh``).
"""

import pytest
import torch

from tools import sdxl_random


@pytest.fixture(scope="module")
def meta_checkpoint(comfy_nodes):
    modules = sdxl_random.meta_modules(torch.float16)
    return modules, sdxl_random.checkpoint_tensors(**{part: m.state_dict() for part, m in modules.items()})


def shapes(state_dict):
    return {key: tuple(value.shape) for key, value in state_dict.items()}


def test_comfyui_detects_sdxl_and_builds_the_unet_that_was_written(meta_checkpoint):
    import comfy.model_detection
    import comfy.supported_models
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    modules, sd = meta_checkpoint
    config = comfy.model_detection.model_config_from_unet(dict(sd), "model.diffusion_model.")
    assert type(config) is comfy.supported_models.SDXL
    assert config.unet_config["channel_mult"] == [1, 2, 4]
    with torch.device("meta"):
        built = UNetModel(**config.unet_config)
    prefix = "model.diffusion_model."
    written = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    assert shapes(written) == shapes(built.state_dict())
    assert 2.56e9 < sum(p.numel() for p in modules["unet"].parameters()) < 2.58e9
    assert all(v.dtype == torch.float16 for k, v in sd.items() if not k.endswith("position_ids"))


def test_every_text_encoder_tensor_loads(meta_checkpoint):
    """CLIP-L and OpenCLIP-G: ComfyUI's key conversion gives SDXLClipModel's own keys and shapes, less only what
    ComfyUI's loader itself tolerates missing (as in real SDXL checkpoints: CLIP-L's projection and logit scale)."""
    import comfy.model_detection

    modules, sd = meta_checkpoint
    config = comfy.model_detection.model_config_from_unet(dict(sd), "model.diffusion_model.")
    loaded, expected = shapes(config.process_clip_state_dict(dict(sd))), shapes(modules["clip"].state_dict())
    assert set(expected) - set(loaded) == {"clip_l.transformer.text_projection.weight", "clip_l.logit_scale"}
    assert set(loaded) - set(expected) == {"clip_l.transformer.text_model.embeddings.position_ids"}
    assert all(loaded[key] == expected[key] for key in set(loaded) & set(expected))
    assert 0.81e9 < sum(p.numel() for p in modules["clip"].parameters()) < 0.83e9


def test_vae_is_the_sd_vae(meta_checkpoint):
    modules, sd = meta_checkpoint
    vae = {k.removeprefix("first_stage_model."): v for k, v in sd.items() if k.startswith("first_stage_model.")}
    assert shapes(vae) == shapes(modules["vae"].state_dict()) and len(vae) == 248
    assert {key.split(".")[0] for key in sd} == {"model", "first_stage_model", "conditioner"}
