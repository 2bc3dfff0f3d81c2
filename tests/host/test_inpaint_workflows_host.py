"""The tiny inpainting models load through ComfyUI's own loaders, and the warp + inpaint workflows are wired right.

- ``tools.tiny_inpaint``'s SD1.5- and SDXL-inpainting checkpoints are detected
  by CheckpointLoaderSimple as SD15 / SDXL inpainting models (9 input
  channels) with no missing key; the tiny LoRA (the LCM-LoRA's stand-in)
  changes the UNet's output through LoraLoader.
- The tiny FLUX.1 Fill loads with UNETLoader as ``FluxInpaint``, its VAE with
  VAELoader (16 latent channels), the tiny CLIP-L with CLIPLoader (type sd3:
  FLUX's (77, 4096) context, 2048-wide pooled); FluxGuidance ->
  InpaintModelConditioning -> KSampler -> VAEDecode runs on them.
- The shipped ``warp_inpaint_*`` workflows: Load Image -> Drag Points Editor ->
  Drag Warp (pixels) -> only ComfyUI's own nodes; FLUX Fill wired as
  ComfyUI's FLUX Fill example; and the runner runs the FLUX one without any
  model given, on the tiny stand-ins.

Runs on both hosts (``COMFYUI_PATH``: ComfyUI 0.3.64 or 0.33.0), on the CPU.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dragrun import comfy_host
from dragrun.workflow_format import ui_to_api
from tools import tiny_inpaint
from tools.make_workflows import FLUX_CLIP_L, FLUX_FILL, FLUX_T5, FLUX_VAE

pytestmark = pytest.mark.host

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
WARP_WORKFLOWS = ("warp_inpaint_sd15.json", "warp_inpaint_sdxl.json", "warp_inpaint_flux_fill.json")


def _registered(folder: str, path: Path) -> str:
    import folder_paths

    folder_paths.add_model_folder_path(folder, str(path.parent))
    return path.name


@pytest.mark.parametrize("kind, family", [("sd15", "SD15"), ("sdxl", "SDXL")])
def test_tiny_inpainting_checkpoints_are_detected_as_inpainting_models(comfy_nodes, kind, family):
    path = {"sd15": tiny_inpaint.tiny_sd15_inpaint_checkpoint_path,
            "sdxl": tiny_inpaint.tiny_sdxl_inpaint_checkpoint_path}[kind]()
    loaded = comfy_host.load_checkpoint_inproc(path)
    config = loaded.model.model.model_config
    assert type(config).__name__ == family
    assert config.unet_config["in_channels"] == tiny_inpaint.INPAINT_IN_CHANNELS and config.inpaint_model()
    # the text encoders are the tiny SD1.5 / SDXL checkpoints' own tensors (their loads are tested with them)
    missing = [m for m in loaded.log.messages(logging.DEBUG) if m.lower().startswith(("unet", "vae"))
               and ("missing" in m.lower() or "unexpected" in m.lower())]
    assert not missing, missing
    with torch.inference_mode():
        (cond,) = comfy_nodes.CLIPTextEncode().encode(loaded.clip, "a test image")
    assert torch.isfinite(cond[0][0]).all()


def _eps(model, cond, latent: torch.Tensor, concat: torch.Tensor) -> torch.Tensor:
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    sigma = torch.tensor([1.0])
    with torch.inference_mode():
        return model.model.apply_model(latent, sigma, c_concat=concat, c_crossattn=cond[0][0])


def test_tiny_lora_changes_the_inpainting_unet(comfy_nodes):
    loaded = comfy_host.load_checkpoint_inproc(tiny_inpaint.tiny_sd15_inpaint_checkpoint_path())
    lora_name = _registered("loras", tiny_inpaint.tiny_lcm_lora_path())
    with torch.inference_mode():
        model, clip = comfy_nodes.LoraLoader().load_lora(loaded.model, loaded.clip, lora_name, 1.0, 1.0)
        (cond,) = comfy_nodes.CLIPTextEncode().encode(loaded.clip, "a test image")
    layers = {key for key in model.patches}
    assert len(layers) == 80  # q, k, v, out of 20 attention layers (10 transformer blocks x 2)
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 8, 8, generator=generator)
    concat = torch.randn(1, 5, 8, 8, generator=generator)
    base, adapted = _eps(loaded.model, cond, latent, concat), _eps(model, cond, latent, concat)
    assert torch.isfinite(adapted).all()
    change = float((adapted - base).abs().mean() / base.abs().mean())
    assert 1e-3 < change < 1.0, change


def test_tiny_flux_fill_loads_with_the_core_loaders_and_inpaints(comfy_nodes):
    import comfy_extras.nodes_flux

    unet = comfy_nodes.UNETLoader().load_unet(_registered("diffusion_models", tiny_inpaint.tiny_flux_fill_path()),
                                              "default")[0]
    vae = comfy_nodes.VAELoader().load_vae(_registered("vae", tiny_inpaint.tiny_flux_vae_path()))[0]
    clip = comfy_nodes.CLIPLoader().load_clip(_registered("text_encoders", tiny_inpaint.tiny_clip_l_path()),
                                              tiny_inpaint.TINY_CLIP_TYPE)[0]
    assert type(unet.model.model_config).__name__ == "FluxInpaint"
    assert unet.model.model_config.unet_config["in_channels"] == 96  # 384 = (16 + 16 + 64) x 2 x 2
    assert vae.latent_channels == tiny_inpaint.FLUX_LATENT_CHANNELS
    image = torch.rand(1, 64, 48, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 64, 48)
    mask[:, 16:40, 8:32] = 1.0
    with torch.inference_mode():
        (cond,) = comfy_nodes.CLIPTextEncode().encode(clip, "a test image")
        assert cond[0][0].shape == (1, 77, 4096) and cond[0][1]["pooled_output"].shape == (1, 2048)
        guidance = comfy_extras.nodes_flux.FluxGuidance()
        guided = guidance.append(cond, 30.0) if hasattr(guidance, "append") else guidance.execute(cond, 30.0)
        guided = guided[0] if isinstance(guided, tuple) else guided.result[0]
        assert guided[0][1]["guidance"] == 30.0
        positive, negative, latent = comfy_nodes.InpaintModelConditioning().encode(guided, cond, image, vae, mask, False)
        assert latent["samples"].shape == (1, 16, 8, 6) and "noise_mask" not in latent
        (sampled,) = comfy_nodes.KSampler().sample(unet, 0, 1, 1.0, "euler", "normal", positive, negative, latent, 1.0)
        (decoded,) = comfy_nodes.VAEDecode().decode(vae, sampled)
    assert torch.isfinite(sampled["samples"]).all() and decoded.shape == (1, 64, 48, 3)


def _downstream(prompt: dict, start: str) -> set[str]:
    """Ids of every node that reads (directly or not) from node ``start``."""
    found, frontier = set(), {start}
    while frontier:
        frontier = {i for i, n in prompt.items() for v in n["inputs"].values()
                    if isinstance(v, list) and len(v) == 2 and v[0] in frontier} - found
        found |= frontier
    return found


@pytest.mark.parametrize("name", WARP_WORKFLOWS)
def test_warp_inpaint_workflows_use_only_native_nodes_after_the_warp(comfy_server, name):
    prompt = ui_to_api(json.loads((WORKFLOWS / name).read_text()), comfy_server.object_info())
    ids = {n["class_type"]: i for i, n in prompt.items()}
    load, editor, warp = ids["LoadImage"], ids["DragKitPointsEditor"], ids["DragKitPixelWarp"]
    assert prompt[editor]["inputs"]["image"] == [load, 0] and prompt[warp]["inputs"]["image"] == [load, 0]
    assert prompt[warp]["inputs"]["points"] == [editor, 1] and prompt[warp]["inputs"]["mask"] == [editor, 2]
    after = _downstream(prompt, warp)
    assert not [prompt[i]["class_type"] for i in after if prompt[i]["class_type"].startswith("DragKit")]
    condition = prompt[ids["InpaintModelConditioning"]]["inputs"]
    assert condition["pixels"] == [warp, 0] and condition["mask"] == [warp, 1]
    composite = prompt[ids["ImageCompositeMasked"]]["inputs"]
    assert composite["destination"] == [warp, 0] and composite["mask"] == [warp, 1]
    assert composite["source"] == [ids["VAEDecode"], 0]
    assert prompt[ids["SaveImage"]]["inputs"]["images"] == [ids["ImageCompositeMasked"], 0]
    sampler = prompt[ids["KSampler"]]["inputs"]
    assert sampler["latent_image"] == [ids["InpaintModelConditioning"], 2]
    if name == "warp_inpaint_sd15.json":  # the fast set-up: LCM-LoRA, lcm sampling, 8 steps, low cfg
        assert prompt[ids["LoraLoader"]]["inputs"]["model"] == [ids["CheckpointLoaderSimple"], 0]
        assert prompt[ids["ModelSamplingDiscrete"]]["inputs"]["sampling"] == "lcm"
        assert sampler["model"] == [ids["ModelSamplingDiscrete"], 0]
        assert (sampler["sampler_name"], sampler["steps"], sampler["cfg"]) == ("lcm", 8, 1.5)
        assert condition["noise_mask"] is True
    if name == "warp_inpaint_flux_fill.json":  # as ComfyUI's FLUX Fill example
        clip = prompt[ids["DualCLIPLoader"]]["inputs"]
        assert (clip["clip_name1"], clip["clip_name2"], clip["type"]) == (FLUX_CLIP_L, FLUX_T5, "flux")
        assert prompt[ids["UNETLoader"]]["inputs"]["unet_name"] == FLUX_FILL
        assert prompt[ids["VAELoader"]]["inputs"]["vae_name"] == FLUX_VAE
        assert prompt[ids["DifferentialDiffusion"]]["inputs"]["model"] == [ids["UNETLoader"], 0]
        assert sampler["model"] == [ids["DifferentialDiffusion"], 0] and sampler["cfg"] == 1.0
        assert prompt[ids["FluxGuidance"]]["inputs"]["guidance"] == 30.0
        assert condition["positive"] == [ids["FluxGuidance"], 0] and condition["noise_mask"] is False


def test_runner_runs_the_flux_fill_workflow_on_the_tiny_stand_ins(tmp_path, comfyui, capsys):
    """No model given: the runner links the tiny FLUX Fill, VAE and CLIP-L and swaps DualCLIPLoader for CLIPLoader.

    The edit is a pure shift by the drag (8, 2) of a textured square: every moved pixel outside the inpaint mask
    (Drag Warp (pixels)'s, computed here by the engine on the same input) is the source pixel shifted by the drag,
    and every pixel outside the mask and the moved region is the input's.
    """
    from dragkit.pixel_warp import pixel_warp
    from dragrun.run_workflow import main

    rng = np.random.default_rng(5)
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[16:40, 16:40] = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "image.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:40, 16:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    (tmp_path / "points.json").write_text(json.dumps({"points": [[28, 28], [36, 30]]}))
    argv = [str(WORKFLOWS / "warp_inpaint_flux_fill.json"), "--image", str(tmp_path / "image.png"),
            "--mask", str(tmp_path / "mask.png"), "--points", str(tmp_path / "points.json"),
            "--out", str(tmp_path / "out"), "--device", "cpu", "--set", "KSampler.steps=1"]
    assert main(argv) == 0, capsys.readouterr().err
    [edited] = [p for p in (tmp_path / "out").glob("dragkit_warp_inpaint_flux*.png")]
    result = np.asarray(Image.open(edited).convert("RGB"))
    assert result.shape == (64, 64, 3)
    warp = pixel_warp(torch.from_numpy(image)[None], torch.from_numpy(mask > 0),
                      torch.tensor([[28.0, 28.0]]), torch.tensor([[36.0, 30.0]]))
    inpaint, target = warp.inpaint_mask.numpy(), warp.target_mask.numpy()
    assert target.sum() == 24 * 24 and target[18:42, 24:48].all()  # the square moved by (8, 2)
    kept = target & ~inpaint
    assert kept.sum() > 200  # the moved square's inside, past the band
    shifted = np.zeros_like(image)
    shifted[18:42, 24:48] = image[16:40, 16:40]
    assert np.array_equal(result[kept], shifted[kept])
    assert not np.array_equal(result[kept], image[kept])  # it did move
    rest = ~inpaint & ~target
    assert np.array_equal(result[rest], image[rest])
    assert "tiny seeded TEST checkpoint" in capsys.readouterr().err
