"""The SDXL workflows and what they rest on, on the tiny SDXL checkpoint with SDXL's text encoders.

- The checkpoint (:func:`tools.tiny_sdxl_sd2.tiny_sdxl_checkpoint_path` with
  ``with_clip=True``) loads with CheckpointLoaderSimple as SDXL with a working
  CLIP: CLIPTextEncode gives a ``(1, 77, 2048)`` prompt embedding and a
  ``(1, 1280)`` pooled output, with no "clip missing" warning.
- Both SDXL workflows load Load Checkpoint's SDXL placeholder and encode the
  prompt with its CLIP. ``workflows/fastdrag_sdxl.json`` runs headless through
  the runner's command line (``dragrun.run_workflow``, ``--set`` for a short
  inversion) on a non-square 384x256 image (a 48x32 latent). Both also run in
  ``tests/host/test_workflows.py`` like every shipped workflow (132x100, short
  loops); DragDiffusion's LoRA and supervision steps on SDXL take a few
  minutes of CPU there, so it is not run a second time here.
- FastDrag's warp at SDXL's size: 1024x1024 (a 128x128 latent) and 1024x768
  (128x96), without the UNet (to keep the CPU run short).
- A LoRA trained by LoRA Fine-tune on SDXL, saved, loads with ComfyUI's core
  LoraLoader on the same checkpoint with every key matched and gives the
  node's ε; the training is size-conditioned on the latent, like the sampler.
- The ``auto`` attention-cache rule at SDXL 1024x1024, on the real SDXL
  architecture (built on the meta device: layer widths and resolutions, no
  weights).
"""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from dragrun import comfy_host
from dragrun.workflow_format import ui_to_api
from tools import tiny_sdxl_sd2
from tools.make_workflows import SDXL_CHECKPOINT

pytestmark = pytest.mark.host

POINTS = [[150, 120], [200, 110], [260, 150], [240, 170]]
"""Two drags (handle, target, handle, target) in pixels of the 384x256 image."""
SDXL_WORKFLOWS = ("fastdrag_sdxl.json", "dragdiffusion_sdxl.json")
WIDTH, HEIGHT = 384, 256


@pytest.fixture(scope="module")
def sdxl(comfy_nodes, tiny_sdxl_checkpoint) -> comfy_host.LoadedCheckpoint:
    return comfy_host.load_checkpoint_inproc(tiny_sdxl_checkpoint)


def encode(sdxl, text: str) -> list:
    import nodes

    with torch.inference_mode():
        return nodes.CLIPTextEncode().encode(sdxl.clip, text)[0]


def test_the_tiny_sdxl_checkpoint_carries_a_working_sdxl_clip(sdxl):
    assert type(sdxl.model.model).__name__ == "SDXL"
    assert not [m for m in sdxl.log.messages(logging.WARNING) if "clip" in m.lower()], sdxl.log.text(logging.WARNING)
    cond = encode(sdxl, "a photo of a cat")
    tokens, extra = cond[0]
    assert tokens.shape == (1, 77, 2048) and extra["pooled_output"].shape == (1, 1280)
    assert torch.isfinite(tokens).all() and torch.isfinite(extra["pooled_output"]).all()
    other = encode(sdxl, "a drawing of a house")
    assert not torch.equal(other[0][0], tokens) and not torch.equal(other[0][1]["pooled_output"], extra["pooled_output"])


@pytest.mark.parametrize("name", SDXL_WORKFLOWS)
def test_sdxl_workflows_take_the_prompt_from_the_sdxl_checkpoint(comfy_server, repo_root, name):
    prompt = ui_to_api(json.loads((repo_root / "workflows" / name).read_text()), comfy_server.object_info())
    [(ckpt_id, ckpt)] = [(i, n) for i, n in prompt.items() if n["class_type"] == "CheckpointLoaderSimple"]
    assert ckpt["inputs"]["ckpt_name"] == SDXL_CHECKPOINT
    encoders = [n for n in prompt.values() if n["class_type"] == "CLIPTextEncode"]
    assert encoders and all(n["inputs"]["clip"] == [ckpt_id, 1] for n in encoders)


def test_fastdrag_sdxl_runs_headless_through_the_runner(repo_root, tiny_sdxl_checkpoint, tmp_path):
    """384x256 image, mask box around two drags; DDIM Invert shortened to 4 steps with ``--set``."""
    from dragrun.run_workflow import main

    sample, out = tmp_path / "sample", tmp_path / "out"
    sample.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(sample / "original.png")
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[64:224, 96:320] = 255
    Image.fromarray(mask).save(sample / "mask.png")
    (sample / "points.json").write_text(json.dumps({"points": POINTS}))
    argv = [str(repo_root / "workflows" / "fastdrag_sdxl.json"), "--image", str(sample / "original.png"),
            "--points", str(sample / "points.json"), "--mask", str(sample / "mask.png"),
            "--checkpoint", str(tiny_sdxl_checkpoint), "--prompt", "a test image", "--device", "cpu",
            "--out", str(out), "--set", "DragKitDDIMInvert.steps=4"]
    assert main(argv) == 0
    [edited] = [p for p in out.glob("*.png") if not p.name.endswith("_side_by_side.png")]
    image = np.asarray(Image.open(edited).convert("RGB"))
    assert image.shape == (HEIGHT, WIDTH, 3)
    source = np.asarray(Image.open(sample / "original.png").convert("RGB"))
    outside = np.asarray(Image.open(sample / "mask.png")) == 0
    assert np.array_equal(image[outside], source[outside]), "VAE Decode (DragKit) keeps the unmasked pixels"
    assert not np.array_equal(image[~outside], source[~outside]), "the masked region is the model's"


@pytest.mark.parametrize("width, height", [(1024, 1024), (1024, 768)])
def test_fastdrag_warp_at_sdxl_size(comfy_inproc, width, height):
    """The warp node on SDXL's latents (no UNet): a 128x128 or 128x96 noisy latent, two drags in a mask."""
    pack = comfy_inproc.pack
    samples = torch.randn(1, 4, height // 8, width // 8, generator=torch.Generator().manual_seed(4))
    z_t = pack.nodes.latent_io.with_step(samples, num_steps=10, step_index=3, timestep=601, sigma=1.0)
    points = pack.dragkit.points.parse_drag_points(
        json.dumps({"points": [[400, 380], [520, 380], [640, 500], [640, 600]]}), width, height)
    mask = torch.zeros(1, height, width)
    mask[0, 256:704, 256:832] = 1.0
    (warped,) = comfy_inproc.run_node("DragKitFastDragWarp", latent=z_t, points=points, mask=mask, mode="drag",
                                      fill="bnni", patch_cells=12)
    out = warped["samples"]
    assert out.shape == (1, 4, height // 8, width // 8) and torch.isfinite(out).all()
    assert pack.nodes.latent_io.require_step(warped).timestep == 601
    changed = (out != samples).any(dim=1)[0].nonzero().float()  # (n, 2) latent cells (row, column)
    centre, radius = torch.tensor([(32 + 88) / 2, (32 + 104) / 2]), ((88 - 32) ** 2 + (104 - 32) ** 2) ** 0.5 / 2
    assert len(changed) and (changed - centre).norm(dim=1).max() <= radius + 1, \
        "only cells within the circumcircle of the mask's bounding box (latent cells 32-88 x 32-104) change"
    target = (520 // 8, 380 // 8)  # (x, y): the first drag's target cell
    assert not torch.equal(out[0, :, target[1], target[0]], samples[0, :, target[1], target[0]]), "content moved there"


def eps_of(model, cond, side=8, t=500):
    """ε of an SDXL MODEL at a fixed probe latent (``side`` x ``side``), size conditioning from the latent."""
    import comfy.model_management as mm

    z = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        mm.load_models_gpu([model])
        ms = model.get_model_object("model_sampling")
        sigma = ms.sigma(torch.tensor([t]))
        x = z * (1 + sigma**2).sqrt()
        y = model.model.encode_adm(pooled_output=cond[0][1]["pooled_output"], width=side * 8, height=side * 8)
        denoised = model.model.apply_model(x, sigma, c_crossattn=cond[0][0], y=y)
        return ((x - denoised) / sigma).float()


def test_sdxl_lora_from_lora_fine_tune_loads_with_core_lora_loader(comfy_inproc, sdxl, loras_dir):
    """Every key of the saved file matches on the same checkpoint; the loaded LoRA gives the node's ε."""
    cond = encode(sdxl, "a test image")
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        adapted, name = comfy_inproc.pack.nodes.lora.LoRAFineTune().finetune(
            sdxl.model, sdxl.vae, image, cond, steps=1, rank=4, alpha=4.0, lr=1e-2, batch=1, seed=0,
            save_name="dragkit/sdxl_test", use_cache=False)
    assert (loras_dir / name).is_file()
    with comfy_host.capture_logs(logging.DEBUG) as log, torch.inference_mode():
        loaded, clip = comfy_inproc.nodes.LoraLoader().load_lora(sdxl.model, sdxl.clip, name, 1.0, 1.0)
    assert "lora key not loaded" not in log.text(), log.text()
    assert set(loaded.patches) == set(adapted.patches) and len(loaded.patches) == 70 * 2 * 4
    base, node, core = eps_of(sdxl.model, cond), eps_of(adapted, cond), eps_of(loaded, cond)
    assert (core - node).abs().max() < 1e-5
    change = float((core - base).abs().mean() / base.abs().mean())
    assert change > 1e-4, change


def test_lora_fine_tune_conditions_sdxl_on_the_latent_size_like_the_sampler(comfy_inproc, sdxl):
    """CLIPTextEncode's conditioning has no width/height: training must see the latent's size (as DDIM Invert and
    the samplers do through ComfyUI's encode_model_conds), not SDXL's 768 default."""
    lora = comfy_inproc.pack.nodes.comfy_lora
    cond = encode(sdxl, "a test image")
    z = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([500])

    def eps(conditioning):
        trainer = lora.ComfyLoRATrainer(sdxl.model, conditioning, lora.LoRATrainingConfig())
        with torch.inference_mode():
            return trainer._eps_predictor(z)(z, t)

    sized = [[cond[0][0], {**cond[0][1], "width": 96, "height": 64}]]
    default = [[cond[0][0], {**cond[0][1], "width": 768, "height": 768}]]
    assert torch.equal(eps(cond), eps(sized))
    assert not torch.equal(eps(cond), eps(default))


def test_auto_cache_rule_at_sdxl_1024(comfy_inproc):
    """SDXL's real layer sizes at 1024x1024 (a 128x128 latent): one step of the decoder cache fits the
    on-device budget, FastDrag's 7 recorded steps (10 steps, strength 0.7) do not, so ``auto`` offloads."""
    import comfy.model_detection
    import comfy.model_patcher

    pack = comfy_inproc.pack
    attention, schedule = pack.dragkit.attention, pack.dragkit.schedule
    real_size = {**tiny_sdxl_sd2.SDXL_LDM_UNET, "channel_mult": [1, 2, 4], "image_size": 32, "legacy": False,
                 "use_spatial_transformer": True, "use_temporal_attention": False, "use_temporal_resblock": False}
    config = comfy.model_detection.model_config_from_unet_config(real_size)
    model = config.get_model({}, device="meta")
    assert type(config).__name__ == "SDXL"
    assert sum(p.numel() for p in model.diffusion_model.parameters()) == pytest.approx(2.567e9, rel=1e-3)
    cpu = torch.device("cpu")
    backend = pack.nodes.comfy_backend.ComfyBackend(comfy.model_patcher.ModelPatcher(model, cpu, cpu))
    decoder = attention.select_layers(backend.self_attention_layers(), "decoder")
    assert sorted({(layer.channels, layer.downscale) for layer in decoder}) == [(640, 2), (1280, 4)]
    assert len(decoder) == 36
    latent = 128
    kv = {layer.index: tuple(torch.empty(1, (latent // layer.downscale) ** 2, layer.channels, dtype=torch.float16,
                                         device="meta") for _ in "kv") for layer in decoder}
    steps = schedule.DDIMSchedule(backend.alphas_cumprod(), 10, 0.7)
    cache = attention.AttnCache(steps, decoder, "sdxl", torch.zeros(1, 4, latent, latent),
                                kv={steps.t_star: kv})
    per_step = cache.kv_nbytes_per_step()
    assert per_step == 2 * 2 * (6 * 64 * 64 * 640 + 30 * 32 * 32 * 1280)  # K and V, fp16: 210 MiB
    gpu = torch.device("cuda")
    assert attention.choose_storage_device("auto", gpu, per_step) == gpu
    assert steps.num_inversion_steps == 7
    assert attention.choose_storage_device("auto", gpu, per_step * steps.num_inversion_steps) == cpu  # 1.4 GiB
    assert attention.choose_storage_device("compute_device", gpu, per_step * steps.num_inversion_steps) == gpu
