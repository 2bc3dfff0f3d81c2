"""Regenerate the shipped workflows in ``workflows/`` (UI format) and their template-browser thumbnails.

    COMFYUI_PATH=/path/to/ComfyUI python -m tools.make_workflows          # workflows + thumbnails
    python -m tools.make_workflows --thumbnails                            # thumbnails only (no ComfyUI)

Starts ComfyUI headless with this pack, reads ``/object_info`` and writes
each graph below with :class:`tools.workflow_build.WorkflowBuilder`, so
sockets and widget order match the node definitions and the frontend's
widget order (:func:`dragrun.workflow_format.widget_layout`; checked against
the real frontend by ``tests/host/test_workflows_browser.py``). Checkpoint,
ControlNet, upscale-model and image names are placeholders the user (or
``dragrun.run_workflow``) replaces.

Template browser (comfyui-frontend-package 1.27.10, ComfyUI 0.3.64): a pack's
templates are the ``*.json`` files of its ``workflows/`` folder; the card's
title is the file name without ``.json``, its description that name with
``-``/``_`` read as spaces, and its thumbnail ``<name>.jpg`` beside it.
The thumbnails are drawn from the repository's sample (``samples/art_0``):
the image with its editable region and drag arrows, and the method's name.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

from dragrun.comfy_host import ComfyServer, repo_root
from .workflow_build import Out, WorkflowBuilder

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
IMAGE = "example.png"
EDITOR_FILE = ""
"""The Drag Points Editor's own file: none, its image comes from the IMAGE input (a file name there would be
read by the frontend as a missing media file; the editor also empties it while an IMAGE is connected)."""
CONTROLNET = "control_v11p_sd15_canny.pth"
UPSCALER = "RealESRGAN_x4plus.pth"
SD15_INPAINT_CHECKPOINT = "sd-v1-5-inpainting.ckpt"
LCM_LORA = "lcm-lora-sdv1-5.safetensors"
SDXL_INPAINT_CHECKPOINT = "sd_xl_base_1.0_inpainting_0.1.safetensors"
FLUX_FILL = "flux1-fill-dev.safetensors"
FLUX_CLIP_L = "clip_l.safetensors"
FLUX_T5 = "t5xxl_fp16.safetensors"
FLUX_VAE = "ae.safetensors"
"""Placeholder model names of the shipped workflows (the released files' names); ``dragrun.run_workflow`` puts the
tiny test models in their place when no model is given."""

START_HERE = """START HERE: 1. Load Checkpoint: pick your {family} checkpoint (.safetensors in models/checkpoints).
2. Load Image: pick or upload your photo.{editor}
{needs}"""

EDITOR_STEP = """
3. Drag Points Editor (it shows the photo): click a handle (red), then its target (blue); repeat for more
   pairs. Paint the region that may change with Brush (or "Mask handles"); nothing painted = the whole
   image may change.
4. Queue. Then move a point and queue again: only the nodes after the editor re-run."""

JSON_STEP = """
3. Drag Points (JSON): type handle, target, handle, target ... in pixels of the photo. Editable mask:
   pick a mask image (white = editable), or bypass that node (Ctrl+B) to edit the whole image.
4. Queue. (For clicking points instead, use the FastDrag workflow with the Drag Points Editor.)"""

NEEDS = {
    "roundtrip": "Needs: any GPU, or a CPU (slow: tens of seconds per step at 512x512).",
    "fastdrag": ("Needs: about 3 GiB of GPU memory (2.7 GiB measured at 512x512, fp16); about 0.6 s per edit and 0.3 s\n"
                 "per re-edit on an H100 (DDIM Invert is cached: moving a point never re-runs it). A CPU works, slowly."),
    "refine": ("Needs: about 5 GiB of GPU memory (the supervision steps take gradients through the UNet, like\n"
               "DragDiffusion's 4.8 GiB); a few seconds per edit on a GPU. On a CPU each step takes several seconds."),
    "motion": ("Needs: a CUDA GPU. The edit peaks at 4.8 GiB and takes {edit} on an H100 (512x512, fp16, measured\n"
               "without the LoRA; the LoRA's own time and memory on a GPU are not measured yet). The LoRA ({steps} steps)\n"
               "trains once per image and is cached; on a CPU one LoRA step takes over a minute: do not use a CPU."),
    "fastdrag_sdxl": ("Needs: an SDXL checkpoint (base 1.0 or a fine-tune) and a photo of about 1024x1024 (SDXL's size, a\n"
                      "128x128 latent; other sizes work). GPU time and memory on SDXL are not measured yet. At 1024x1024 the\n"
                      "attention cache is about 1.4 GiB (7 steps x 36 layers, fp16), so cache_device auto keeps it in CPU\n"
                      "memory. A CPU works, very slowly."),
    "motion_sdxl": ("Needs: a CUDA GPU and an SDXL checkpoint (base 1.0 or a fine-tune); a photo of about 1024x1024.\n"
                    "GPU time and memory of the LoRA and the edit on SDXL are not measured yet. The LoRA ({steps} steps)\n"
                    "trains once per image and is cached; do not use a CPU."),
}

ROUNDTRIP_NOTE = """DragKit round trip: invert an image and sample it back with the source's keys/values injected.

No edit happens here: the output should look like the input. Use it to check a model, or as the
skeleton of an edit (put FastDrag Warp or Motion-Supervision Optimize between DDIM Invert and
KV-Injected Sample).

- Load Checkpoint: any SD1.x checkpoint.
- DDIM Invert: steps N and strength s; round(s*N) steps are inverted. The cache records the
  self-attention keys/values of the chosen layers ("decoder" = every decoder layer).
- KV-Injected Sample: injects those keys/values at the same timesteps while denoising.
- VAE Decode (DragKit): with the source image (and a mask) connected, everything outside the mask is
  the source's exactly."""

FASTDRAG_NOTE = """DragKit FastDrag: one-step latent warp of the noisy latent, then KV-injected sampling.

Set up as released (FastDrag, NeurIPS 2024): an LCM-distilled SD1.5 UNet used as a plain epsilon model
on a 10-step DDIM schedule, strength 0.7 (warp at t = 601).
- Load Checkpoint: an SD1.5 checkpoint; for the released setup add the LCM-LoRA for SD1.5 with
  "LoraLoaderModelOnly" (strength 1) between the checkpoint and both DragKit model inputs, or load an
  LCM checkpoint (e.g. LCM Dreamshaper v7). Do NOT add "ModelSamplingDiscrete (lcm)": FastDrag uses
  the LCM UNet as an epsilon predictor on the normal schedule. Plain SD1.5 works too (softer results).
- Load Image feeds both the editor and VAE Encode, so moving a point re-runs only the warp, the sampling
  and the decode, never the inversion.
- FastDrag Warp+BNNI: mode drag (warp), move or copy (shift the masked object); fill bnni (paper) or
  bnni_as_released (the official code's variant).
- KV-Injected Sample: the source's keys/values in every decoder self-attention layer at every step."""

REFINE_NOTE = """DragKit hybrid: FastDrag's one-step warp, then a few supervision steps (ours).

The warp moves each handle's content to its target at once; Motion-Supervision Optimize in refine_warp
mode then pulls the features around each target toward the source's features around the handle (GoodDrag's
information-preserving target) for a few iterations, holding the unmasked region, before the KV-injected
sampling. Same model set-up as the FastDrag workflow (10 steps, strength 0.7, optional LCM LoRA)."""


CONTROL_UPSCALE_NOTE = """DragKit FastDrag + ControlNet + upscaler: native nodes chained around the drag nodes.

The FastDrag graph, with a ControlNet in the conditioning of KV-Injected Sample and an upscale model after
VAE Decode (DragKit). Also pick the ControlNet and the upscale model before queueing.
- Load ControlNet Model: an SD1.5 ControlNet that matches the hint, e.g. control_v11p_sd15_canny (with the
  Canny node as here), control_v11p_sd15_lineart or control_v11f1p_sd15_depth (swap Canny for a lineart or
  depth preprocessor, e.g. from comfyui_controlnet_aux). It must be an SD1.x ControlNet for an SD1.x checkpoint.
- Canny: the hint, made from the SOURCE image (low/high thresholds: fewer or more edges).
- Apply ControlNet: strength is the main knob. The hint shows the unedited image, so the ControlNet pulls the
  dragged content back toward where it was: lower strength (0.3-0.6) when it fights the drag, raise it to
  keep more structure and detail elsewhere; 0 switches it off. start/end percent limit it to part of the
  sampling (e.g. end 0.5 guides layout only in the early steps). Only the positive output is used (cfg 1);
  for cfg > 1 encode a negative prompt into its negative input and connect its negative output to
  KV-Injected Sample.
- DDIM Invert keeps the plain prompt on purpose: inversion must map the source image to its own noisy latent
  and record its own keys/values; with the ControlNet there too, its residuals would be baked into the
  inverted latent and the cache, and the strength knob would no longer control them alone.
- Load Upscale Model: any single-image upscaler ComfyUI lists in models/upscale_models, e.g.
  RealESRGAN_x4plus, 4x-UltraSharp or 4x_NMKD-Siax_200k; Upscale Image (using Model) scales by the
  model's factor after the compositing (the unmasked pixels are the source's before upscaling)."""

FASTDRAG_SDXL_NOTE = """DragKit FastDrag on SDXL: one-step latent warp of the noisy latent, then KV-injected sampling.

The FastDrag graph with an SDXL checkpoint: the prompt goes through the checkpoint's own CLIP (CLIP-L and
CLIP-G: the prompt embedding and the pooled embedding SDXL needs); the image size conditioning follows the
latent. 10 DDIM steps, strength 0.7 (warp at t = 601), as FastDrag's released set-up.
- Fast set-up: FastDrag as released runs an LCM-distilled UNet as a plain epsilon model, which is why 10
  steps suffice. For SDXL add the LCM-LoRA for SDXL (lcm-lora-sdxl) with "LoraLoaderModelOnly" (or
  LoraLoader; strength 1) between the checkpoint and both DragKit model inputs. Do NOT add
  "ModelSamplingDiscrete (lcm)": FastDrag uses the LCM UNet as an epsilon predictor on the normal schedule.
  Plain SDXL runs the same graph; give DDIM Invert more steps if the result is blurry (each step is one
  more UNet pass in the inversion and in the sampling).
- Load Image feeds both the editor and VAE Encode, so moving a point re-runs only the warp, the sampling
  and the decode, never the inversion.
- FastDrag Warp+BNNI: mode drag (warp), move or copy (shift the masked object); fill bnni (paper) or
  bnni_as_released (the official code's variant).
- KV-Injected Sample: the source's keys/values in every decoder self-attention layer (SDXL: 36) at every step."""

EDITOR_TITLE = "Drag Points Editor: click handle, then target; paint the mask"


def start_here(needs: str, editor: bool = True, family: str = "SD1.5") -> str:
    """The first lines of every Note: what to select before queueing (``family``: the checkpoint's), and what the method needs."""
    return START_HERE.format(family=family, editor=EDITOR_STEP if editor else JSON_STEP, needs=needs)


def roundtrip(info: dict) -> dict:
    g = WorkflowBuilder(info)
    ckpt = g.add("CheckpointLoaderSimple", 0, 0, {"ckpt_name": CHECKPOINT})
    image = g.add("LoadImage", 0, 2, {"image": IMAGE}, height=320)
    prompt = g.add("CLIPTextEncode", 1, 0, {"text": ""}, {"clip": Out(ckpt, 1)}, title="Prompt (may stay empty)")
    encode = g.add("VAEEncode", 1, 2, inputs={"pixels": Out(image, 0), "vae": Out(ckpt, 2)})
    invert = g.add("DragKitDDIMInvert", 2, 0, {"steps": 50, "strength": 0.7},
                   {"model": Out(ckpt, 0), "latent": Out(encode, 0), "positive": Out(prompt, 0)}, height=220)
    sample = g.add("DragKitKVInjectedSample", 3, 0, {},
                   {"model": Out(ckpt, 0), "latent": Out(invert, 0), "attn_cache": Out(invert, 1),
                    "positive": Out(prompt, 0)}, height=240)
    decode = g.add("DragKitVAEDecode", 4, 0, {"feather": 8},
                   {"vae": Out(ckpt, 2), "latent": Out(sample, 0), "source_image": Out(image, 0)}, height=160)
    g.add("SaveImage", 5, 0, {"filename_prefix": "dragkit_roundtrip"}, {"images": Out(decode, 0)}, height=320)
    note = START_HERE.format(family="SD1.5", editor="\n3. Queue: the result should look like the photo.",
                             needs=NEEDS["roundtrip"])
    g.lead_note(note + "\n\n" + ROUNDTRIP_NOTE, height=380)
    return g.to_json()


def fastdrag(info: dict, refine: bool = False, control_upscale: bool = False, json_points: bool = False,
             sdxl: bool = False) -> dict:
    """The FastDrag graph: points and mask from the Drag Points Editor, or typed JSON + a mask image (``json_points``).

    ``sdxl``: the same graph with an SDXL checkpoint and the SDXL Note.
    """
    g = WorkflowBuilder(info)
    ckpt = g.add("CheckpointLoaderSimple", 0, 0, {"ckpt_name": SDXL_CHECKPOINT if sdxl else CHECKPOINT})
    image = g.add("LoadImage", 0, 2, {"image": IMAGE}, height=320)
    if json_points:
        mask_node = g.add("LoadImageMask", 0, 5, {"image": IMAGE, "channel": "red"},
                          title="Editable mask (white = editable)", height=320)
        points_node = g.add("DragKitPointsFromJSON", 1, 4, {"points_json": '{"points": [[120, 200], [180, 200]]}'},
                            {"image": Out(image, 0)}, height=160)
        points, mask = Out(points_node, 0), Out(mask_node, 0)
    else:
        editor = g.add("DragKitPointsEditor", 1, 3, {"image_file": EDITOR_FILE}, {"image": Out(image, 0)},
                       title=EDITOR_TITLE, height=560)
        points, mask = Out(editor, 1), Out(editor, 2)
    prompt = g.add("CLIPTextEncode", 1, 0, {"text": ""}, {"clip": Out(ckpt, 1)}, title="Prompt (may stay empty)")
    encode = g.add("VAEEncode", 1, 2, inputs={"pixels": Out(image, 0), "vae": Out(ckpt, 2)})
    invert = g.add("DragKitDDIMInvert", 2, 0, {"steps": 10, "strength": 0.7},
                   {"model": Out(ckpt, 0), "latent": Out(encode, 0), "positive": Out(prompt, 0)}, height=220)
    warp = g.add("DragKitFastDragWarp", 3, 2, {"mode": "drag", "fill": "bnni"},
                 {"latent": Out(invert, 0), "points": points, "mask": mask}, height=180)
    warped = Out(warp, 0)
    if refine:
        refined = g.add("DragKitMotionSupervisionOptimize", 3, 4, {"mode": "refine_warp", "iterations": 10},
                        {"model": Out(ckpt, 0), "latent": warped, "attn_cache": Out(invert, 1),
                         "positive": Out(prompt, 0), "points": points, "mask": mask}, height=420)
        warped = Out(refined, 0)
    positive = Out(prompt, 0)
    if control_upscale:
        controlnet = g.add("ControlNetLoader", 2, 4, {"control_net_name": CONTROLNET})
        hint = g.add("Canny", 2, 5, {"low_threshold": 0.4, "high_threshold": 0.8}, {"image": Out(image, 0)},
                     title="Canny (hint from the source image)")
        apply = g.add("ControlNetApplyAdvanced", 3, 4, {"strength": 0.5, "start_percent": 0.0, "end_percent": 1.0},
                      {"positive": Out(prompt, 0), "negative": Out(prompt, 0), "control_net": Out(controlnet, 0),
                       "image": Out(hint, 0)}, height=240)
        positive = Out(apply, 0)
    sample = g.add("DragKitKVInjectedSample", 4, 0, {},
                   {"model": Out(ckpt, 0), "latent": warped, "attn_cache": Out(invert, 1),
                    "positive": positive}, height=240)
    decode = g.add("DragKitVAEDecode", 5, 0, {"feather": 8},
                   {"vae": Out(ckpt, 2), "latent": Out(sample, 0), "source_image": Out(image, 0),
                    "mask": mask, "points": points}, height=180)
    result, save_column, prefix = Out(decode, 0), 6, "dragkit_fastdrag"
    if control_upscale:
        upscaler = g.add("UpscaleModelLoader", 5, 2, {"model_name": UPSCALER})
        upscale = g.add("ImageUpscaleWithModel", 6, 0, inputs={"upscale_model": Out(upscaler, 0), "image": result})
        result, save_column, prefix = Out(upscale, 0), 7, "dragkit_fastdrag_controlnet_upscale"
    if sdxl:
        prefix = "dragkit_fastdrag_sdxl"
    g.add("SaveImage", save_column, 0, {"filename_prefix": prefix}, {"images": result}, height=320)
    g.add("PreviewImage", 6, 3, inputs={"images": Out(decode, 1)}, title="Preview with points", height=320)
    if sdxl:
        g.lead_note(start_here(NEEDS["fastdrag_sdxl"], family="SDXL") + "\n\n" + FASTDRAG_SDXL_NOTE, height=520)
        return g.to_json()
    head = start_here(NEEDS["refine" if refine else "fastdrag"], editor=not json_points)
    if control_upscale:
        g.lead_note(head + "\n\n" + CONTROL_UPSCALE_NOTE + "\n\n" + FASTDRAG_NOTE, height=640)
    elif refine:
        g.lead_note(head + "\n\n" + REFINE_NOTE + "\n\n" + FASTDRAG_NOTE, height=520)
    else:
        g.lead_note(head + "\n\n" + FASTDRAG_NOTE, height=440)
    return g.to_json()


MOTION_NOTE = """DragKit {title}: motion supervision of the noisy latent, then sampling with mutual self-attention.

- Load Image feeds both the editor (to place points) and VAE Encode: moving a point then re-runs only the
  optimisation and sampling, never the LoRA or the inversion (ComfyUI caches them).
- Prompt: {prompt}
- LoRA Fine-tune: the per-image identity LoRA the method trains first ({steps} steps, rank 16, alpha 16,
  lr 5e-4, batch 4, on the image with the prompt); its MODEL feeds every DragKit node. Cached by image,
  model, prompt and settings: a re-run with the same inputs loads it (loras/dragkit-lora-cache/) instead of
  training. save_name keeps it as loras/<save_name>.safetensors (LoraLoader loads it); existing_lora loads
  a LoRA from the loras folder instead of training.
- DDIM Invert: 50 steps, strength {strength} (t* = {t_star}); no keys/values are cached because the sampler
  uses a reference branch (the unedited latent denoised alongside).
- Motion-Supervision Optimize: mode {mode}; -1 knobs take the method's defaults.
- KV-Injected Sample: kv_source "reference branch", inject_layers "masactrl" ({masactrl})."""

MASACTRL_LAYERS = {"SD1.5": "SD1.5 layers 10-15", "SDXL": "on SDXL the 6 layers of the finer decoder attention level"}

MOTION_PROMPTS = {
    "dragdiffusion": ("Prompt (a caption of the image)",
                      "a short caption of the image (DragDiffusion); the LoRA is trained with it and the edit uses it."),
    "gooddrag": ("Prompt (empty by default)",
                 "GoodDrag's default is empty, for the LoRA and the edit; a caption of the image may help."),
}

MOTION_EDIT_TIME = {"dragdiffusion": "about 13 s", "gooddrag": "about 18 s"}


def motion(info: dict, mode: str, strength: float, t_star: int, lora_steps: int, sdxl: bool = False) -> dict:
    """LoRA Fine-tune + motion supervision (``mode``) + mutual self-attention sampling; ``sdxl``: on an SDXL checkpoint."""
    g = WorkflowBuilder(info)
    ckpt = g.add("CheckpointLoaderSimple", 0, 0, {"ckpt_name": SDXL_CHECKPOINT if sdxl else CHECKPOINT})
    image = g.add("LoadImage", 0, 2, {"image": IMAGE}, height=320)
    editor = g.add("DragKitPointsEditor", 1, 3, {"image_file": EDITOR_FILE}, {"image": Out(image, 0)},
                   title=EDITOR_TITLE, height=560)
    prompt_title, prompt_help = MOTION_PROMPTS[mode]
    prompt = g.add("CLIPTextEncode", 1, 0, {"text": ""}, {"clip": Out(ckpt, 1)}, title=prompt_title)
    encode = g.add("VAEEncode", 1, 2, inputs={"pixels": Out(image, 0), "vae": Out(ckpt, 2)})
    lora = g.add("DragKitLoRAFineTune", 2, 0, {"steps": lora_steps},
                 {"model": Out(ckpt, 0), "vae": Out(ckpt, 2), "image": Out(image, 0), "positive": Out(prompt, 0)},
                 height=420)
    model = Out(lora, 0)
    invert = g.add("DragKitDDIMInvert", 3, 0, {"steps": 50, "strength": strength, "cache_layers": "none"},
                   {"model": model, "latent": Out(encode, 0), "positive": Out(prompt, 0)}, height=220)
    optimise = g.add("DragKitMotionSupervisionOptimize", 4, 0, {"mode": mode},
                     {"model": model, "latent": Out(invert, 0), "attn_cache": Out(invert, 1),
                      "positive": Out(prompt, 0), "points": Out(editor, 1), "mask": Out(editor, 2)}, height=420)
    sample = g.add("DragKitKVInjectedSample", 5, 0, {"kv_source": "reference branch", "inject_layers": "masactrl"},
                   {"model": model, "latent": Out(optimise, 0), "attn_cache": Out(invert, 1),
                    "positive": Out(prompt, 0)}, height=240)
    decode = g.add("DragKitVAEDecode", 6, 0, {"feather": 8},
                   {"vae": Out(ckpt, 2), "latent": Out(sample, 0), "source_image": Out(image, 0),
                    "mask": Out(editor, 2), "points": Out(editor, 1)}, height=180)
    family = "SDXL" if sdxl else "SD1.5"
    g.add("SaveImage", 7, 0, {"filename_prefix": f"dragkit_{mode}" + ("_sdxl" if sdxl else "")},
          {"images": Out(decode, 0)}, height=320)
    g.add("PreviewImage", 7, 3, inputs={"images": Out(decode, 1)}, title="Preview with points", height=320)
    title = {"dragdiffusion": "DragDiffusion", "gooddrag": "GoodDrag"}[mode] + (" on SDXL" if sdxl else "")
    if sdxl:
        needs = NEEDS["motion_sdxl"].format(steps=lora_steps)
    else:
        needs = NEEDS["motion"].format(steps=lora_steps, edit=MOTION_EDIT_TIME[mode])
    g.lead_note(start_here(needs, family=family) + "\n\n" + MOTION_NOTE.format(
        title=title, strength=strength, t_star=t_star, mode=mode, steps=lora_steps, prompt=prompt_help,
        masactrl=MASACTRL_LAYERS[family]), height=520)
    return g.to_json()


WARP_EDITOR_STEP = """
3. Drag Points Editor (it shows the photo): click a handle (red), then its target (blue); repeat for more
   pairs. Paint the region to move with Brush (or "Mask handles"): each painted region moves with the
   handles inside it; a handle outside every painted region moves nothing.
4. Queue. Then move a point and queue again: only the warp and the inpainting re-run."""

WARP_START = {
    "sd15": """START HERE: 1. Load Checkpoint: pick your SD1.5 inpainting checkpoint (e.g. {checkpoint}, in
   models/checkpoints). Load LoRA: pick the LCM-LoRA for SD1.5 ({lora}, in models/loras).""",
    "sdxl": """START HERE: 1. Load Checkpoint: pick your SDXL inpainting checkpoint (e.g. {checkpoint}, in
   models/checkpoints).""",
    "flux": """START HERE: 1. Load Diffusion Model: pick FLUX.1 Fill [dev] ({unet}, in models/diffusion_models).
   DualCLIPLoader: {clip_l} and {t5} (or t5xxl_fp8_e4m3fn.safetensors), in models/text_encoders, type flux.
   Load VAE: FLUX's {vae} (in models/vae).""",
}

WARP_NEEDS = {
    "sd15": ("Needs: an SD1.5 inpainting checkpoint (4.3 GB as released, fp32; 2 GB in fp16) and the LCM-LoRA (135 MB).\n"
             "Inpaint4Drag reports 0.3 s per edit and 2.7 GB of GPU memory at 512x512 with this set-up on a V100;\n"
             "not measured here yet. A CPU works (8 steps: tens of seconds at 512x512)."),
    "sdxl": ("Needs: an SDXL inpainting checkpoint and a photo of about 1024x1024. GPU time and memory are not measured\n"
             "yet (SDXL's UNet is 2.6 G parameters: about 5 GB in fp16). 20 steps; a CPU works, very slowly."),
    "flux": ("Needs: FLUX.1 Fill [dev] (12 G parameters, 23.8 GB in bf16), T5-XXL (9.8 GB in fp16, 4.9 GB in fp8) and\n"
             "CLIP-L; ComfyUI offloads what the GPU cannot hold. GPU time and memory are not measured yet. 20 steps;\n"
             "do not use a CPU."),
}

WARP_NOTE = """DragKit warp + inpaint (Inpaint4Drag's approach): move the painted region in pixels, then let an
inpainting model fill only what the move uncovered.

- Drag Warp (pixels): each painted region moves with its handles (every pixel by the inverse-distance blend
  of the handles' moves; mapped forward to find the moved region, every pixel of it mapped back to its
  source, so it has no holes). Its inpaint_mask is the uncovered area plus a band of band pixels around the
  moved region's edge (band: wider hides seams, narrower keeps more of the moved pixels).
- After the warp every node is ComfyUI's own:
  {after}
- Image Composite Masked puts the inpainted pixels into the warped image only inside the inpaint mask: every
  other pixel is the warped image's exactly (no VAE round trip outside the mask).
- "Warped (before inpainting)" shows the warp alone: check the move there first."""

WARP_AFTER = {
    "sd15": ("InpaintModelConditioning (the inpainting UNet sees the masked image and the mask; noise_mask on,\n"
             "  so only the mask is re-sampled), the LCM-LoRA with ModelSamplingDiscrete (lcm) and KSampler with the lcm\n"
             "  sampler, 8 steps, cfg 1.5 -- the fast set-up. Without the LoRA: bypass Load LoRA and ModelSamplingDiscrete\n"
             "  (Ctrl+B) and use 20-30 steps, cfg 7, euler or dpmpp_2m."),
    "sdxl": ("InpaintModelConditioning (noise_mask on) and KSampler, 20 steps, cfg 6. For speed add the LCM-LoRA for\n"
             "  SDXL with LoraLoader and ModelSamplingDiscrete (lcm) after Load Checkpoint, then lcm, 8 steps, cfg 1.5."),
    "flux": ("as ComfyUI's FLUX Fill example wires it: DualCLIPLoader (flux) -> CLIP Text Encode -> FluxGuidance 30 ->\n"
             "  InpaintModelConditioning (noise_mask off: FLUX Fill sees the whole image and the mask) -> KSampler\n"
             "  (Differential Diffusion model, euler, 20 steps, cfg 1: FLUX's guidance is FluxGuidance, not cfg)."),
}

NEGATIVE_TITLE = "Negative prompt"
"""Title of a workflow's negative-prompt CLIP Text Encode (``dragrun.run_workflow`` leaves its text alone)."""

WARP_TITLE = "Drag Points Editor: click handle, then target; paint the region to move"


def warp_inpaint(info: dict, model: str, sam3: bool = False) -> dict:
    """Load Image -> Drag Points Editor -> Drag Warp (pixels) -> native inpainting with ``model`` (sd15, sdxl, flux).

    ``sam3``: the region to move is SAM3's mask of the clicked object combined with the painted one (:func:`sam3_region`).
    """
    g = WorkflowBuilder(info)
    if model == "flux":
        unet = g.add("UNETLoader", 0, 0, {"unet_name": FLUX_FILL})
        clip_loader = g.add("DualCLIPLoader", 0, 1, {"clip_name1": FLUX_CLIP_L, "clip_name2": FLUX_T5, "type": "flux"})
        vae_loader = g.add("VAELoader", 0, 2, {"vae_name": FLUX_VAE})
        diffusion = g.add("DifferentialDiffusion", 1, 0, inputs={"model": Out(unet, 0)})
        model_out, clip, vae, image_row = Out(diffusion, 0), Out(clip_loader, 0), Out(vae_loader, 0), 3
    else:
        checkpoint = SD15_INPAINT_CHECKPOINT if model == "sd15" else SDXL_INPAINT_CHECKPOINT
        ckpt = g.add("CheckpointLoaderSimple", 0, 0, {"ckpt_name": checkpoint})
        model_out, clip, vae, image_row = Out(ckpt, 0), Out(ckpt, 1), Out(ckpt, 2), 2
        if model == "sd15":
            lora = g.add("LoraLoader", 1, 0, {"lora_name": LCM_LORA, "strength_model": 1.0, "strength_clip": 1.0},
                         {"model": model_out, "clip": clip}, title="Load LoRA (LCM-LoRA)", height=160)
            lcm = g.add("ModelSamplingDiscrete", 2, 0, {"sampling": "lcm"}, {"model": Out(lora, 0)})
            model_out, clip = Out(lcm, 0), Out(lora, 1)
    image = g.add("LoadImage", 0, image_row, {"image": IMAGE}, height=320)
    editor = g.add("DragKitPointsEditor", 1, image_row + 1, {"image_file": EDITOR_FILE}, {"image": Out(image, 0)},
                   title=SAM3_TITLE if sam3 else WARP_TITLE, height=560)
    region = sam3_region(g, Out(image, 0), editor, image_row + 5) if sam3 else Out(editor, 2)
    warp = g.add("DragKitPixelWarp", 2, image_row + 1, {},
                 {"image": Out(image, 0), "points": Out(editor, 1), "mask": region}, height=180)
    warped, inpaint_mask = Out(warp, 0), Out(warp, 1)
    prompt = g.add("CLIPTextEncode", 2, 1, {"text": ""}, {"clip": clip}, title="Prompt (may stay empty)")
    negative = g.add("CLIPTextEncode", 2, 2, {"text": ""}, {"clip": clip}, title=NEGATIVE_TITLE)
    positive = Out(prompt, 0)
    if model == "flux":
        positive = Out(g.add("FluxGuidance", 3, 0, {"guidance": 30.0}, {"conditioning": positive}), 0)
    condition = g.add("InpaintModelConditioning", 3, 1, {"noise_mask": model != "flux"},
                      {"positive": positive, "negative": Out(negative, 0), "vae": vae, "pixels": warped,
                       "mask": inpaint_mask}, height=180)
    sampler = {"sd15": {"steps": 8, "cfg": 1.5, "sampler_name": "lcm", "scheduler": "sgm_uniform"},
               "sdxl": {"steps": 20, "cfg": 6.0, "sampler_name": "dpmpp_2m", "scheduler": "karras"},
               "flux": {"steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal"}}[model]
    sample = g.add("KSampler", 4, 0, {"seed": 0, **sampler, "denoise": 1.0},
                   {"model": model_out, "positive": Out(condition, 0), "negative": Out(condition, 1),
                    "latent_image": Out(condition, 2)}, height=300)
    decode = g.add("VAEDecode", 5, 0, inputs={"samples": Out(sample, 0), "vae": vae})
    composite = g.add("ImageCompositeMasked", 5, 1, {"x": 0, "y": 0, "resize_source": False},
                      {"destination": warped, "source": Out(decode, 0), "mask": inpaint_mask},
                      title="Image Composite Masked (inpainted pixels only inside the mask)", height=180)
    g.add("SaveImage", 6, 0, {"filename_prefix": f"dragkit_warp_inpaint_{'sam3' if sam3 else model}"},
          {"images": Out(composite, 0)}, height=320)
    g.add("PreviewImage", 6, 3, inputs={"images": warped}, title="Warped (before inpainting)", height=320)
    start = WARP_START[model].format(checkpoint=SD15_INPAINT_CHECKPOINT if model == "sd15" else SDXL_INPAINT_CHECKPOINT,
                                     lora=LCM_LORA, unet=FLUX_FILL, clip_l=FLUX_CLIP_L, t5=FLUX_T5, vae=FLUX_VAE)
    if sam3:
        head = (start + SAM3_START + "\n2. Load Image: pick or upload your photo." + SAM3_EDITOR_STEP + "\n"
                + WARP_NEEDS[model] + "\n" + SAM3_NEEDS)
        g.lead_note(head + "\n\n" + SAM3_NOTE + "\n\n" + WARP_NOTE.format(after=WARP_AFTER[model]), height=720)
        return g.to_json()
    head = start + "\n2. Load Image: pick or upload your photo." + WARP_EDITOR_STEP + "\n" + WARP_NEEDS[model]
    g.lead_note(head + "\n\n" + WARP_NOTE.format(after=WARP_AFTER[model]), height=560)
    return g.to_json()


SAM3_CHECKPOINT = "sam3.1_multiplex_fp16.safetensors"
"""Placeholder for SAM3 (ComfyUI's own SAM3 template loads this file with Load Checkpoint)."""

SAM3_TITLE = "Drag Points Editor: click handle (on the object), then target"

SAM3_START = """
   Load Checkpoint (SAM3): pick SAM3 or SAM3.1 (e.g. {checkpoint}, in models/checkpoints).""".format(
    checkpoint=SAM3_CHECKPOINT)

SAM3_EDITOR_STEP = """
3. Drag Points Editor (it shows the photo): click a handle ON the object to move (red), then its target (blue);
   repeat for more pairs. The handles are SAM3's clicks: SAM3 segments the object under them. Painting is
   optional (Combine SAM3 Mask: union adds it to SAM3's mask, refine trims SAM3's mask to it).
4. Queue. Then move a point and queue again: SAM3, the warp and the inpainting re-run."""

SAM3_NEEDS = ("Needs ComfyUI 0.33.0 or newer (SAM3 Detect; older versions show it as a missing node) and SAM3\n"
              "(ComfyUI builds a 507 M-parameter image model, plus its text encoder; it works on a 1008x1008 copy of\n"
              "the photo). SAM3's GPU time and memory are not measured here yet.")

SAM3_NOTE = """The region to move comes from clicks: Drag Points to SAM3 Points turns the editor's handles into SAM3 Detect's
positive points (pixels of the photo SAM3 Detect is given), SAM3 Detect segments that object, and Combine SAM3
Mask makes the region Drag Warp moves: union (SAM3's mask OR the painted one; nothing painted = SAM3's mask),
replace (SAM3's alone) or refine (Inpaint4Drag's optional SAM refinement: SAM3's mask within the painted mask grown
by kernel, plus the painted mask shrunk by kernel). Check the region in "SAM3 mask (the region to move)" first;
add handles on the object when SAM3 misses parts."""


def sam3_region(g: WorkflowBuilder, image: Out, editor: int, row: int) -> Out:
    """Load Checkpoint (SAM3) -> SAM3 Detect at the editor's handles -> Combine SAM3 Mask with the painted mask."""
    loader = g.add("CheckpointLoaderSimple", 0, row, {"ckpt_name": SAM3_CHECKPOINT}, title="Load Checkpoint (SAM3)")
    clicks = g.add("DragKitPointsToSAM3", 1, row + 1, inputs={"points": Out(editor, 1)}, height=100)
    detect = g.add("SAM3_Detect", 2, row, {}, {"model": Out(loader, 0), "image": image,
                                              "positive_coords": Out(clicks, 0)}, height=220)
    combine = g.add("DragKitCombineSAM3Mask", 3, row, {}, {"sam_mask": Out(detect, 0), "painted_mask": Out(editor, 2)},
                    height=160)
    g.add("MaskPreview", 4, row, inputs={"mask": Out(combine, 0)}, title="SAM3 mask (the region to move)", height=260)
    return Out(combine, 0)


WAN_MOVE = "Wan21-WanMove_fp8_scaled_e4m3fn_KJ.safetensors"
WAN_TEXT_ENCODER = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
WAN_VAE = "wan_2.1_vae.safetensors"
WAN_CLIP_VISION = "clip_vision_h.safetensors"
"""Placeholders of the Wan-Move workflow: the files ComfyUI's own Wan-Move template (video_wanmove_480p) names."""

WAN_NOTE = """START HERE: 1. Load Diffusion Model: pick Wan-Move ({unet}, in models/diffusion_models; a Wan 2.1
   I2V 14B fine-tune). Load CLIP: {te} (type wan, in models/text_encoders). Load VAE: {vae}
   (models/vae). Load CLIP Vision: {clip_vision} (models/clip_vision).
2. Load Image: pick or upload your photo.
3. Drag Points Editor (it shows the photo): click a handle (red), then its target (blue); repeat for more pairs.
   Paint the region that moves (Brush or "Mask handles"): static tracks hold everything outside it still.
4. Write what happens in the prompt, and queue.
Needs: ComfyUI 0.33.0 or newer (Wan-Move nodes; older versions show them as missing nodes), and a large GPU: the
14B model in fp8 is about 15 GB, UMT5-XXL in fp8 about 6.7 GB; 81 frames at 832x480, 20 steps (ComfyUI offloads
what does not fit). Not measured here yet; do not use a CPU.

DragKit drag to video (Wan-Move): the drag pairs become point tracks that Wan-Move follows.
- Drag Points to Wan-Move Tracks: each handle travels to its target over the frames (easing: linear, ease_in,
  ease_out, ease_in_out); static_grid adds still tracks on a grid wherever the painted region never passes, so
  the background holds. The tracks are in pixels of the video frame: WanMoveTrackToVideo centre-crops the photo
  to width x height (832x480 by default) and the tracks follow the same crop -- pick a size with the photo's
  aspect ratio, or keep the points away from the cropped sides (the node says which point falls outside).
- frames must be 4k + 1 (81 = 5 s at 16 fps): frame 0 is the photo, the last frame reaches the targets.
- After it every node is ComfyUI's own, wired as ComfyUI's Wan-Move example: WanMoveTracksFromCoords ->
  WanMoveTrackToVideo (start image, tracks, CLIP vision of the photo) -> KSampler (ModelSamplingSD3 shift 8,
  er_sde, simple, 20 steps, cfg 6) -> VAE Decode -> Save Animated WEBP (16 fps; for an MP4 use Create Video +
  Save Video). For speed, ComfyUI's example adds the lightx2v step-distill LoRA (LoraLoaderModelOnly), 6 steps, cfg 1.
- "Last frame (the drag edit)" saves the video's last frame: the photo with the drag applied by a video model."""


def drag_to_video_wanmove(info: dict) -> dict:
    """Load Image -> Drag Points Editor -> Drag Points to Wan-Move Tracks -> Wan 2.1 I2V + Wan-Move (native nodes)."""
    g = WorkflowBuilder(info)
    unet = g.add("UNETLoader", 0, 0, {"unet_name": WAN_MOVE})
    clip = g.add("CLIPLoader", 0, 1, {"clip_name": WAN_TEXT_ENCODER, "type": "wan"})
    vae = g.add("VAELoader", 0, 2, {"vae_name": WAN_VAE})
    clip_vision = g.add("CLIPVisionLoader", 0, 3, {"clip_name": WAN_CLIP_VISION})
    image = g.add("LoadImage", 0, 4, {"image": IMAGE}, height=320)
    editor = g.add("DragKitPointsEditor", 1, 5, {"image_file": EDITOR_FILE}, {"image": Out(image, 0)},
                   title=WARP_TITLE, height=560)
    shift = g.add("ModelSamplingSD3", 1, 0, {"shift": 8.0}, {"model": Out(unet, 0)})
    prompt = g.add("CLIPTextEncode", 2, 0, {"text": ""}, {"clip": Out(clip, 0)}, title="Prompt (what happens)")
    negative = g.add("CLIPTextEncode", 2, 1, {"text": ""}, {"clip": Out(clip, 0)}, title=NEGATIVE_TITLE)
    vision = g.add("CLIPVisionEncode", 2, 2, {"crop": "center"},
                   {"clip_vision": Out(clip_vision, 0), "image": Out(image, 0)})
    tracks = g.add("DragKitPointsToWanMoveTracks", 2, 4, {},
                   {"points": Out(editor, 1), "mask": Out(editor, 2)}, height=260)
    coords = g.add("WanMoveTracksFromCoords", 3, 4, {}, {"track_coords": Out(tracks, 0)})
    video = g.add("WanMoveTrackToVideo", 3, 1, {},
                  {"positive": Out(prompt, 0), "negative": Out(negative, 0), "vae": Out(vae, 0),
                   "tracks": Out(coords, 0), "start_image": Out(image, 0), "clip_vision_output": Out(vision, 0),
                   "width": Out(tracks, 1), "height": Out(tracks, 2), "length": Out(coords, 1)}, height=300)
    sample = g.add("KSampler", 4, 0, {"seed": 0, "steps": 20, "cfg": 6.0, "sampler_name": "er_sde",
                                      "scheduler": "simple", "denoise": 1.0},
                   {"model": Out(shift, 0), "positive": Out(video, 0), "negative": Out(video, 1),
                    "latent_image": Out(video, 2)}, height=300)
    decode = g.add("VAEDecode", 5, 0, inputs={"samples": Out(sample, 0), "vae": Out(vae, 0)})
    g.add("SaveAnimatedWEBP", 6, 0, {"filename_prefix": "dragkit_wanmove", "fps": 16.0, "lossless": False,
                                      "quality": 90, "method": "default"}, {"images": Out(decode, 0)}, title="Save the video", height=360)
    last = g.add("ImageFromBatch", 5, 3, {"batch_index": -1, "length": 1}, {"image": Out(decode, 0)},
                 title="Last frame")
    g.add("SaveImage", 6, 3, {"filename_prefix": "dragkit_wanmove_last_frame"}, {"images": Out(last, 0)},
          title="Last frame (the drag edit)", height=320)
    g.lead_note(WAN_NOTE.format(unet=WAN_MOVE, te=WAN_TEXT_ENCODER, vae=WAN_VAE, clip_vision=WAN_CLIP_VISION),
                height=600)
    return g.to_json()


FLUX_DEV = "flux1-dev.safetensors"
"""Placeholder for FLUX.1 [dev] in fastdrag_flux (models/diffusion_models)."""

FASTDRAG_FLUX_NOTE = """START HERE: 1. Load Diffusion Model: pick FLUX.1 [dev] ({unet}, in models/diffusion_models; an fp8
   file halves its memory). DualCLIPLoader: {clip_l} + {t5} (type flux, models/text_encoders). Load VAE:
   {vae} (models/vae).
2. Load Image: pick or upload your photo. About 1024x1024 suits FLUX.
3. Drag Points Editor (it shows the photo): click a handle (red), then its target (blue); repeat for more
   pairs. Paint the region that may change; nothing painted = the whole image may change.
4. Queue. Then move a point and queue again: only the warp, the sampling and the decode re-run.
Needs: FLUX.1 [dev] (23.8 GB in bf16, 11.9 GB in fp8) and T5-XXL; ComfyUI offloads what does not fit. The
attention cache of the released blocks at 1024x1024 is about 13 GiB (20 model calls x 13 blocks, bf16), so
cache_device auto keeps it in CPU memory. GPU time and memory are not measured yet. Do not use a CPU.

DragKit FastDrag on FLUX (DragFlow's inversion and key/value injection, FastDrag's warp):
- DDIM Invert runs DragFlow's flow inversion on FLUX (FireFlow: a midpoint solver that reuses the last
  velocity, about one model call per step): 25 steps, strength 0.76 = 19 steps inverted (the released
  skip of 6), prompt at FluxGuidance 1.0, recording the keys/values of DragFlow's "non-ridge" blocks
  (double 0,7,8,9,10,18, single 6,9,18,23,26,31,37) at every model call. Write "all" for every block.
- FastDrag Warp+BNNI warps the 16-channel noisy latent as on SD latents.
- KV-Injected Sample samples back with FluxGuidance 3.5 (the released sampling guidance), the recorded
  keys/values fully replacing the model's in those blocks, paired with the recorded calls as DragFlow does.
- VAE Decode (DragKit) keeps the source's pixels outside the painted mask.
DragFlow's region motion supervision and its IP-Adapter are not part of this graph."""


def flux_inversion(info: dict, sample_guidance_title: str):
    """The FLUX.1 [dev] workflows' common part: loaders, image, editor, prompt with FluxGuidance 1.0 (inversion) and 3.5,
    VAE Encode and DDIM Invert (25 steps, strength 0.76, non-ridge). Returns the builder and the outputs the rest wires."""
    g = WorkflowBuilder(info)
    unet = g.add("UNETLoader", 0, 0, {"unet_name": FLUX_DEV})
    clip_loader = g.add("DualCLIPLoader", 0, 1, {"clip_name1": FLUX_CLIP_L, "clip_name2": FLUX_T5, "type": "flux"})
    vae = Out(g.add("VAELoader", 0, 2, {"vae_name": FLUX_VAE}), 0)
    image = g.add("LoadImage", 0, 3, {"image": IMAGE}, height=320)
    editor = g.add("DragKitPointsEditor", 1, 3, {"image_file": EDITOR_FILE}, {"image": Out(image, 0)},
                   title=EDITOR_TITLE, height=560)
    points, mask = Out(editor, 1), Out(editor, 2)
    prompt = g.add("CLIPTextEncode", 1, 0, {"text": ""}, {"clip": Out(clip_loader, 0)}, title="Prompt (may stay empty)")
    invert_guidance = g.add("FluxGuidance", 1, 1, {"guidance": 1.0}, {"conditioning": Out(prompt, 0)},
                            title="FluxGuidance (inversion: 1.0)")
    sample_guidance = g.add("FluxGuidance", 2, 1, {"guidance": 3.5}, {"conditioning": Out(prompt, 0)},
                            title=f"FluxGuidance ({sample_guidance_title}: 3.5)")
    encode = g.add("VAEEncode", 1, 2, inputs={"pixels": Out(image, 0), "vae": vae})
    invert = g.add("DragKitDDIMInvert", 2, 0, {"steps": 25, "strength": 0.76, "cache_layers": "non-ridge"},
                   {"model": Out(unet, 0), "latent": Out(encode, 0), "positive": Out(invert_guidance, 0)}, height=220)
    return g, SimpleNamespace(unet=unet, vae=vae, image=image, points=points, mask=mask, invert=invert,
                              sample_guidance=sample_guidance)


def fastdrag_flux(info: dict) -> dict:
    """FLUX.1 [dev] with ComfyUI's FLUX loaders: editor, DDIM Invert (guidance 1) -> FastDrag Warp -> KV-Injected Sample (3.5)."""
    g, f = flux_inversion(info, "sampling")
    unet, vae, image, points, mask, invert, sample_guidance = f.unet, f.vae, f.image, f.points, f.mask, f.invert, f.sample_guidance
    warp = g.add("DragKitFastDragWarp", 3, 2, {"mode": "drag", "fill": "bnni"},
                 {"latent": Out(invert, 0), "points": points, "mask": mask}, height=180)
    sample = g.add("DragKitKVInjectedSample", 4, 0, {"inject_layers": "non-ridge"},
                   {"model": Out(unet, 0), "latent": Out(warp, 0), "attn_cache": Out(invert, 1),
                    "positive": Out(sample_guidance, 0)}, height=240)
    decode = g.add("DragKitVAEDecode", 5, 0, {"feather": 8},
                   {"vae": vae, "latent": Out(sample, 0), "source_image": Out(image, 0), "mask": mask,
                    "points": points}, height=180)
    g.add("SaveImage", 6, 0, {"filename_prefix": "dragkit_fastdrag_flux"}, {"images": Out(decode, 0)}, height=320)
    g.add("PreviewImage", 6, 3, inputs={"images": Out(decode, 1)}, title="Preview with points", height=320)
    g.lead_note(FASTDRAG_FLUX_NOTE.format(unet=FLUX_DEV, clip_l=FLUX_CLIP_L, t5=FLUX_T5, vae=FLUX_VAE), height=600)
    return g.to_json()


DRAGFLOW_FLUX_NOTE = """START HERE: 1. Load Diffusion Model: pick FLUX.1 [dev] ({unet}, in models/diffusion_models). DualCLIPLoader:
   {clip_l} + {t5} (type flux, models/text_encoders). Load VAE: {vae} (models/vae).
2. Load Image: pick or upload your photo. About 1024x1024 suits FLUX; sides must be multiples of 16.
3. Drag Points Editor: click a handle (red) inside the part to move, then its target (blue). PAINT THE
   PART TO MOVE with Brush: dragflow moves each painted region holding a handle, as a whole, by its
   handle-to-target arrow (one region per handle; separate painted blobs are separate regions).
4. Write what the edited image shows in the prompt (DragFlow adds an editing sentence to the description).
5. Queue. Moving a point re-runs the supervision and the sampling; the inversion is kept.
Needs: FLUX.1 [dev] (23.8 GB bf16, 11.9 GB fp8) and T5-XXL. The supervision backpropagates through 19
double-stream blocks 70 times at 1024x1024 (gradient checkpointing on); GPU time and memory are not
measured yet. Do not use a CPU.

DragKit DragFlow on FLUX (DragFlow's inversion, region supervision and key/value injection):
- DDIM Invert: DragFlow's FireFlow inversion, 25 steps, strength 0.76 (19 inverted), FluxGuidance 1.0,
  recording the "non-ridge" blocks' keys/values.
- Motion-Supervision Optimize, mode dragflow: at t* the latent takes 50 + 20 plain gradient steps
  (lr 1000) so the features of the last two double-stream blocks inside each moved region match the
  source's carried by the move (the move grows over the first 50); only a rotated box around each region
  and its moved copy may change. Prompt at FluxGuidance 3.5, as the release's supervision.
- KV-Injected Sample samples back at FluxGuidance 3.5 with the recorded keys/values injected.
- VAE Decode (DragKit) decodes the whole image: the painted mask marks what moves, not what may change
  (the moved region lands outside it).
DragFlow's IP-Adapter (InstantCharacter) and its MLLM-written prompt are not part of this graph yet."""


FASTDRAG_DRAGFLOW_FLUX_NOTE = """START HERE: 1. Load Diffusion Model: pick FLUX.1 [dev] ({unet}, in models/diffusion_models). DualCLIPLoader:
   {clip_l} + {t5} (type flux, models/text_encoders). Load VAE: {vae} (models/vae).
2. Load Image: pick or upload your photo. About 1024x1024 suits FLUX; sides must be multiples of 16.
3. Drag Points Editor: click a handle (red) inside the part to move, then its target (blue). PAINT THE
   PART TO MOVE with Brush: the warp moves what is painted, the supervision each painted region holding
   a handle.
4. Queue. Moving a point re-runs the warp, the supervision and the sampling; the inversion is kept.
Needs: FLUX.1 [dev] and T5-XXL as fastdrag_flux, plus 10 + 5 backward passes through the double-stream
blocks (gradient checkpointing on). GPU time and memory are not measured yet. Do not use a CPU.

DragKit hybrid on FLUX: FastDrag's one-step warp, then a short DragFlow region supervision (ours).
- DDIM Invert: DragFlow's FireFlow inversion, 25 steps, strength 0.76 (19 inverted), FluxGuidance 1.0,
  recording the "non-ridge" blocks' keys/values (and the unwarped latent at t*).
- FastDrag Warp+BNNI moves the painted content to the targets in one step (the coarse move).
- Motion-Supervision Optimize, mode dragflow, starts from the WARPED latent: 10 + 5 gradient steps pull the
  features inside each moved region toward the UNWARPED source's features carried by the move (the
  reference and the locked background come from DDIM Invert's attn_cache, not from the warp), so the
  moved region's features are made coherent again. Only a rotated box around each region and its moved
  copy may change; the rest is reset to the unwarped latent.
- KV-Injected Sample samples back at FluxGuidance 3.5 with the recorded keys/values injected.
- VAE Decode (DragKit) decodes the whole image (the moved region lands outside the painted mask).
When to prefer it: over fastdrag_flux when the warped region comes out torn or smeared; over dragflow_flux
for about a fifth of its supervision (15 iterations instead of 70: the warp has already moved the region).
Not compared on real images yet."""


def dragflow_flux(info: dict, warp_first: bool = False) -> dict:
    """FLUX.1 [dev]: editor, DDIM Invert (guidance 1) -> Motion-Supervision Optimize dragflow (3.5) -> KV-Injected Sample (3.5).

    ``warp_first``: the hybrid fastdrag_dragflow_flux, FastDrag Warp between DDIM Invert and the supervision, which
    then runs 10 + 5 iterations from the warped latent (its reference stays the inversion's, in the attn_cache).
    """
    g, f = flux_inversion(info, "supervision, sampling")
    unet, vae, image, points, mask, invert, sample_guidance = f.unet, f.vae, f.image, f.points, f.mask, f.invert, f.sample_guidance
    latent, knobs, row, name, note = Out(invert, 0), {"mode": "dragflow"}, 2, "dragflow_flux", DRAGFLOW_FLUX_NOTE
    if warp_first:
        warp = g.add("DragKitFastDragWarp", 3, 2, {"mode": "drag", "fill": "bnni"},
                     {"latent": latent, "points": points, "mask": mask}, height=180)
        latent, knobs, row = Out(warp, 0), {**knobs, "transport_steps": 10, "intensify_steps": 5}, 4
        name, note = "fastdrag_dragflow_flux", FASTDRAG_DRAGFLOW_FLUX_NOTE
    optimise = g.add("DragKitMotionSupervisionOptimize", 3, row, knobs,
                     {"model": Out(unet, 0), "latent": latent, "attn_cache": Out(invert, 1),
                      "positive": Out(sample_guidance, 0), "points": points, "mask": mask}, height=520)
    sample = g.add("DragKitKVInjectedSample", 4, 0, {"inject_layers": "non-ridge"},
                   {"model": Out(unet, 0), "latent": Out(optimise, 0), "attn_cache": Out(invert, 1),
                    "positive": Out(sample_guidance, 0)}, height=240)
    decode = g.add("DragKitVAEDecode", 5, 0, {"feather": 8},
                   {"vae": vae, "latent": Out(sample, 0), "source_image": Out(image, 0), "points": points}, height=180)
    g.add("SaveImage", 6, 0, {"filename_prefix": f"dragkit_{name}"}, {"images": Out(decode, 0)}, height=320)
    g.add("PreviewImage", 6, 3, inputs={"images": Out(decode, 1)}, title="Preview with points", height=320)
    g.lead_note(note.format(unet=FLUX_DEV, clip_l=FLUX_CLIP_L, t5=FLUX_T5, vae=FLUX_VAE), height=640)
    return g.to_json()


WORKFLOWS = {
    "roundtrip.json": roundtrip,
    "fastdrag.json": fastdrag,
    "fastdrag_refine.json": lambda info: fastdrag(info, refine=True),
    "fastdrag_controlnet_upscale.json": lambda info: fastdrag(info, control_upscale=True),
    "fastdrag_json_points.json": lambda info: fastdrag(info, json_points=True),
    "dragdiffusion.json": lambda info: motion(info, "dragdiffusion", 0.7, 681, 80),
    "gooddrag.json": lambda info: motion(info, "gooddrag", 0.75, 741, 70),
    "fastdrag_sdxl.json": lambda info: fastdrag(info, sdxl=True),
    "dragdiffusion_sdxl.json": lambda info: motion(info, "dragdiffusion", 0.7, 681, 80, sdxl=True),
    "warp_inpaint_sd15.json": lambda info: warp_inpaint(info, "sd15"),
    "warp_inpaint_sdxl.json": lambda info: warp_inpaint(info, "sdxl"),
    "warp_inpaint_flux_fill.json": lambda info: warp_inpaint(info, "flux"),
    "fastdrag_flux.json": fastdrag_flux,
    "dragflow_flux.json": dragflow_flux,
    "fastdrag_dragflow_flux.json": lambda info: dragflow_flux(info, warp_first=True),
    "warp_inpaint_sam3.json": lambda info: warp_inpaint(info, "sd15", sam3=True),
    "drag_to_video_wanmove.json": drag_to_video_wanmove,
}

HOST_NODES = {
    "warp_inpaint_sam3.json": ("SAM3_Detect", "ComfyUI < 0.33 has no SAM3"),
    "drag_to_video_wanmove.json": ("WanMoveTrackToVideo", "ComfyUI < 0.33 has no Wan-Move"),
}
"""Workflows that use a node only newer hosts have: the node, and the reason (a stable skip reason in the tests)."""


def missing_on_host(name: str, info: dict) -> str | None:
    """Why the host of ``info`` (its ``/object_info``) cannot build or run workflow ``name``; None when it can."""
    node, reason = HOST_NODES.get(name, (None, None))
    return reason if node is not None and node not in info else None


THUMBNAILS = {
    "roundtrip.json": ("Round trip", "invert + sample back, no edit"),
    "fastdrag.json": ("FastDrag", "one-step warp, editor; fast, ~3 GiB GPU"),
    "fastdrag_refine.json": ("FastDrag + refine", "warp, then supervision steps; GPU"),
    "fastdrag_controlnet_upscale.json": ("FastDrag + ControlNet", "Canny ControlNet, then an upscaler"),
    "fastdrag_json_points.json": ("FastDrag (JSON points)", "typed points + mask image, for scripts"),
    "dragdiffusion.json": ("DragDiffusion", "LoRA + motion supervision; CUDA GPU"),
    "gooddrag.json": ("GoodDrag", "LoRA + alternating drag/denoise; CUDA GPU"),
    "fastdrag_sdxl.json": ("FastDrag SDXL", "one-step warp, editor; SDXL checkpoint"),
    "dragdiffusion_sdxl.json": ("DragDiffusion SDXL", "LoRA + motion supervision; SDXL, CUDA GPU"),
    "warp_inpaint_sd15.json": ("Warp + inpaint SD1.5", "pixel warp, SD1.5 inpainting + LCM; fast"),
    "warp_inpaint_sdxl.json": ("Warp + inpaint SDXL", "pixel warp, SDXL inpainting checkpoint"),
    "warp_inpaint_flux_fill.json": ("Warp + FLUX.1 Fill", "pixel warp, FLUX.1 Fill [dev] inpainting"),
    "fastdrag_flux.json": ("FastDrag FLUX", "flow inversion, warp, KV injection; FLUX.1 dev"),
    "dragflow_flux.json": ("DragFlow FLUX", "region supervision on FLUX.1 dev; large GPU"),
    "fastdrag_dragflow_flux.json": ("FastDrag + DragFlow FLUX", "warp, then 15 region steps; FLUX.1 dev"),
    "warp_inpaint_sam3.json": ("Warp + inpaint, SAM3", "click the object: SAM3 mask, SD1.5 inpaint"),
    "drag_to_video_wanmove.json": ("Drag to video (Wan-Move)", "the drag as a video; last frame = the edit"),
}
"""Per workflow: the thumbnail's caption (method, one line of what it is)."""

THUMBNAIL_SIZE = 384
SAMPLE = "samples/art_0"


def thumbnail(sample_dir: Path, title: str, subtitle: str, edited: bool = True):
    """A template-browser card image: the sample with its editable region tinted and drag arrows, and a caption."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from dragkit.datasets import load_drag100

    from dragrun.batch_layout import draw_points

    sample = load_drag100(sample_dir)
    image = Image.fromarray(sample.image).convert("RGB")
    scale = THUMBNAIL_SIZE / max(image.size)
    size = (round(image.width * scale), round(image.height * scale))
    image = image.resize(size, Image.LANCZOS)
    if edited and sample.mask is not None:
        mask = Image.fromarray((sample.mask > 0).astype(np.uint8) * 255).resize(size, Image.NEAREST)
        tint = Image.new("RGB", size, (255, 220, 60))
        image = Image.composite(Image.blend(image, tint, 0.35), image, mask)
    if edited:
        draw_points(image, sample.points.handles, sample.points.targets, scale=scale)
    card = Image.new("RGB", (THUMBNAIL_SIZE, THUMBNAIL_SIZE), (24, 24, 28))
    card.paste(image, ((THUMBNAIL_SIZE - size[0]) // 2, 0))
    draw = ImageDraw.Draw(card)
    band = 72
    draw.rectangle([0, THUMBNAIL_SIZE - band, THUMBNAIL_SIZE, THUMBNAIL_SIZE], fill=(24, 24, 28))
    draw.text((14, THUMBNAIL_SIZE - band + 10), title, fill="white", font=ImageFont.load_default(size=26))
    draw.text((14, THUMBNAIL_SIZE - band + 44), subtitle, fill=(200, 200, 200), font=ImageFont.load_default(size=16))
    return card


def write_thumbnails(out_dir: Path) -> None:
    """``<workflow>.jpg`` beside each workflow (the frontend's thumbnail for a pack's template)."""
    import io

    from dragkit.atomic import write_bytes_atomic

    for name, (title, subtitle) in THUMBNAILS.items():
        card = thumbnail(repo_root() / SAMPLE, title, subtitle, edited=name != "roundtrip.json")
        buffer = io.BytesIO()
        card.save(buffer, format="JPEG", quality=85, optimize=True)
        path = out_dir / Path(name).with_suffix(".jpg")
        write_bytes_atomic(path, buffer.getvalue())
        print(f"wrote {path.relative_to(repo_root())}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate workflows/*.json (needs COMFYUI_PATH) and thumbnails.")
    parser.add_argument("--thumbnails", action="store_true", help="only the thumbnails (no ComfyUI needed)")
    args = parser.parse_args(argv)
    out_dir = repo_root() / "workflows"
    if not args.thumbnails:
        with ComfyServer(startup_timeout=600) as server:
            info = server.object_info()
        for name, build in WORKFLOWS.items():
            if missing_on_host(name, info):
                print(f"kept {name} as it is: {missing_on_host(name, info)}")
                continue
            path = out_dir / name
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(build(info), indent=2) + "\n")
            tmp.replace(path)
            print(f"wrote {Path(path).relative_to(repo_root())}")
    write_thumbnails(out_dir)


if __name__ == "__main__":
    main()
