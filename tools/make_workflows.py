"""Regenerate the shipped workflows in ``workflows/`` (UI format).

    COMFYUI_PATH=/path/to/ComfyUI python -m tools.make_workflows

Starts ComfyUI headless with this pack, reads ``/object_info`` and writes
each graph below with :class:`tools.workflow_build.WorkflowBuilder`, so
sockets and widget order always match the node definitions. Checkpoint,
ControlNet, upscale-model and image names are placeholders the user (or
``tools.run_workflow``) replaces.
"""

from __future__ import annotations

import json
from pathlib import Path

from .comfy_host import ComfyServer, repo_root
from .workflow_build import Out, WorkflowBuilder

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
IMAGE = "example.png"
CONTROLNET = "control_v11p_sd15_canny.pth"
UPSCALER = "RealESRGAN_x4plus.pth"

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
- Drag Points (JSON): handle, target, handle, target ... in pixels of the loaded image.
- Load Image (as Mask): the editable region (white = editable); leave it out to edit the whole image.
- FastDrag Warp+BNNI: mode drag (warp), move or copy (shift the masked object); fill bnni (paper) or
  bnni_as_released (the official code's variant).
- KV-Injected Sample: the source's keys/values in every decoder self-attention layer at every step."""


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
    g.note(ROUNDTRIP_NOTE, 2, 3)
    return g.to_json()


REFINE_NOTE = """DragKit hybrid: FastDrag's one-step warp, then a few supervision steps (ours).

The warp moves each handle's content to its target at once; Motion-Supervision Optimize in refine_warp
mode then pulls the features around each target toward the source's features around the handle (GoodDrag's
information-preserving target) for a few iterations, holding the unmasked region, before the KV-injected
sampling. Same model set-up as the FastDrag workflow (10 steps, strength 0.7, optional LCM LoRA)."""


CONTROL_UPSCALE_NOTE = """DragKit FastDrag + ControlNet + upscaler: native nodes chained around the drag nodes.

The FastDrag graph, with a ControlNet in the conditioning of KV-Injected Sample and an upscale model after
VAE Decode (DragKit).
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


def fastdrag(info: dict, refine: bool = False, control_upscale: bool = False) -> dict:
    g = WorkflowBuilder(info)
    ckpt = g.add("CheckpointLoaderSimple", 0, 0, {"ckpt_name": CHECKPOINT})
    image = g.add("LoadImage", 0, 2, {"image": IMAGE}, height=320)
    mask = g.add("LoadImageMask", 0, 5, {"image": IMAGE, "channel": "red"}, title="Editable mask (white = editable)", height=320)
    points = g.add("DragKitPointsFromJSON", 1, 4, {"points_json": '{"points": [[120, 200], [180, 200]]}'},
                   {"image": Out(image, 0)}, height=160)
    prompt = g.add("CLIPTextEncode", 1, 0, {"text": ""}, {"clip": Out(ckpt, 1)}, title="Prompt (may stay empty)")
    encode = g.add("VAEEncode", 1, 2, inputs={"pixels": Out(image, 0), "vae": Out(ckpt, 2)})
    invert = g.add("DragKitDDIMInvert", 2, 0, {"steps": 10, "strength": 0.7},
                   {"model": Out(ckpt, 0), "latent": Out(encode, 0), "positive": Out(prompt, 0)}, height=220)
    warp = g.add("DragKitFastDragWarp", 3, 2, {"mode": "drag", "fill": "bnni"},
                 {"latent": Out(invert, 0), "points": Out(points, 0), "mask": Out(mask, 0)}, height=180)
    warped = Out(warp, 0)
    if refine:
        refined = g.add("DragKitMotionSupervisionOptimize", 3, 4, {"mode": "refine_warp", "iterations": 10},
                        {"model": Out(ckpt, 0), "latent": warped, "attn_cache": Out(invert, 1),
                         "positive": Out(prompt, 0), "points": Out(points, 0), "mask": Out(mask, 0)}, height=420)
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
                    "mask": Out(mask, 0), "points": Out(points, 0)}, height=180)
    result, save_column, prefix = Out(decode, 0), 6, "dragkit_fastdrag"
    if control_upscale:
        upscaler = g.add("UpscaleModelLoader", 5, 2, {"model_name": UPSCALER})
        upscale = g.add("ImageUpscaleWithModel", 6, 0, inputs={"upscale_model": Out(upscaler, 0), "image": result})
        result, save_column, prefix = Out(upscale, 0), 7, "dragkit_fastdrag_controlnet_upscale"
    g.add("SaveImage", save_column, 0, {"filename_prefix": prefix}, {"images": result}, height=320)
    g.add("PreviewImage", 6, 3, inputs={"images": Out(decode, 1)}, title="Preview with points", height=320)
    if control_upscale:
        g.note(CONTROL_UPSCALE_NOTE + "\n\n" + FASTDRAG_NOTE, 4, 3, width=520, height=420)
    elif refine:
        g.note(REFINE_NOTE + "\n\n" + FASTDRAG_NOTE, 2, 7, width=520, height=320)
    else:
        g.note(FASTDRAG_NOTE, 2, 4, width=520, height=320)
    return g.to_json()


MOTION_NOTE = """DragKit {title}: motion supervision of the noisy latent, then sampling with mutual self-attention.

- Load Image feeds both the editor (to place points) and VAE Encode: moving a point then re-runs only the
  optimisation and sampling, never the LoRA or the inversion (ComfyUI caches them).
- Drag Points Editor: click handle (red) then target (blue); paint the editable region.
- Prompt: {prompt}
- LoRA Fine-tune: the per-image identity LoRA the method trains first ({steps} steps, rank 16, alpha 16,
  lr 5e-4, batch 4, on the image with the prompt); its MODEL feeds every DragKit node. Cached by image,
  model, prompt and settings: a re-run with the same inputs loads it (loras/dragkit-lora-cache/) instead of
  training. save_name keeps it as loras/<save_name>.safetensors (LoraLoader loads it); existing_lora loads
  a LoRA from the loras folder instead of training.
- DDIM Invert: 50 steps, strength {strength} (t* = {t_star}); no keys/values are cached because the sampler
  uses a reference branch (the unedited latent denoised alongside).
- Motion-Supervision Optimize: mode {mode}; -1 knobs take the method's defaults.
- KV-Injected Sample: kv_source "reference branch", inject_layers "masactrl" (SD1.5 layers 10-15)."""

MOTION_PROMPTS = {
    "dragdiffusion": ("Prompt (a caption of the image)",
                      "a short caption of the image (DragDiffusion); the LoRA is trained with it and the edit uses it."),
    "gooddrag": ("Prompt (empty by default)",
                 "GoodDrag's default is empty, for the LoRA and the edit; a caption of the image may help."),
}


def motion(info: dict, mode: str, strength: float, t_star: int, lora_steps: int) -> dict:
    g = WorkflowBuilder(info)
    ckpt = g.add("CheckpointLoaderSimple", 0, 0, {"ckpt_name": CHECKPOINT})
    image = g.add("LoadImage", 0, 2, {"image": IMAGE}, height=320)
    editor = g.add("DragKitPointsEditor", 1, 3, {"image_file": IMAGE}, {"image": Out(image, 0)}, height=560)
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
    g.add("SaveImage", 7, 0, {"filename_prefix": f"dragkit_{mode}"}, {"images": Out(decode, 0)}, height=320)
    g.add("PreviewImage", 7, 3, inputs={"images": Out(decode, 1)}, title="Preview with points", height=320)
    title = {"dragdiffusion": "DragDiffusion", "gooddrag": "GoodDrag"}[mode]
    g.note(MOTION_NOTE.format(title=title, strength=strength, t_star=t_star, mode=mode, steps=lora_steps,
                              prompt=prompt_help), 3, 3, width=560, height=360)
    return g.to_json()


WORKFLOWS = {
    "roundtrip.json": roundtrip,
    "fastdrag.json": fastdrag,
    "fastdrag_refine.json": lambda info: fastdrag(info, refine=True),
    "fastdrag_controlnet_upscale.json": lambda info: fastdrag(info, control_upscale=True),
    "dragdiffusion.json": lambda info: motion(info, "dragdiffusion", 0.7, 681, 80),
    "gooddrag.json": lambda info: motion(info, "gooddrag", 0.75, 741, 70),
}


def main() -> None:
    out_dir = repo_root() / "workflows"
    with ComfyServer() as server:
        info = server.object_info()
    for name, build in WORKFLOWS.items():
        path = out_dir / name
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(build(info), indent=2) + "\n")
        tmp.replace(path)
        print(f"wrote {Path(path).relative_to(repo_root())}")


if __name__ == "__main__":
    main()
