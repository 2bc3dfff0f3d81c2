"""Regenerate the shipped workflows in ``workflows/`` (UI format).

    COMFYUI_PATH=/path/to/ComfyUI python -m tools.make_workflows

Starts ComfyUI headless with this pack, reads ``/object_info`` and writes
each graph below with :class:`tools.workflow_build.WorkflowBuilder`, so
sockets and widget order always match the node definitions. Checkpoint and
image names are placeholders the user (or ``tools.run_workflow``) replaces.
"""

from __future__ import annotations

import json
from pathlib import Path

from .comfy_host import ComfyServer, repo_root
from .workflow_build import Out, WorkflowBuilder

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
IMAGE = "example.png"

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


def fastdrag(info: dict, refine: bool = False) -> dict:
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
    sample = g.add("DragKitKVInjectedSample", 4, 0, {},
                   {"model": Out(ckpt, 0), "latent": warped, "attn_cache": Out(invert, 1),
                    "positive": Out(prompt, 0)}, height=240)
    decode = g.add("DragKitVAEDecode", 5, 0, {"feather": 8},
                   {"vae": Out(ckpt, 2), "latent": Out(sample, 0), "source_image": Out(image, 0),
                    "mask": Out(mask, 0), "points": Out(points, 0)}, height=180)
    g.add("SaveImage", 6, 0, {"filename_prefix": "dragkit_fastdrag"}, {"images": Out(decode, 0)}, height=320)
    g.add("PreviewImage", 6, 3, inputs={"images": Out(decode, 1)}, title="Preview with points", height=320)
    g.note(FASTDRAG_NOTE if not refine else REFINE_NOTE + "\n\n" + FASTDRAG_NOTE, 2, 7 if refine else 4, width=520, height=320)
    return g.to_json()


MOTION_NOTE = """DragKit {title}: motion supervision of the noisy latent, then sampling with mutual self-attention.

- Load Image feeds both the editor (to place points) and VAE Encode: moving a point then re-runs only the
  optimisation and sampling, never the inversion (ComfyUI caches it).
- Drag Points Editor: click handle (red) then target (blue); paint the editable region.
- DDIM Invert: 50 steps, strength {strength} (t* = {t_star}); no keys/values are cached because the sampler
  uses a reference branch (the unedited latent denoised alongside).
- Motion-Supervision Optimize: mode {mode}; -1 knobs take the method's defaults.
- KV-Injected Sample: kv_source "reference branch", inject_layers "masactrl" (SD1.5 layers 10-15).
- {lora}"""

LORA_LATER = (
    "Identity LoRA: the methods fine-tune a LoRA on the image first ({steps} steps); until DragKit's LoRA "
    "Fine-tune node lands, add one with LoraLoaderModelOnly if you trained it elsewhere, or run without."
)


def motion(info: dict, mode: str, strength: float, t_star: int, lora_steps: int) -> dict:
    g = WorkflowBuilder(info)
    ckpt = g.add("CheckpointLoaderSimple", 0, 0, {"ckpt_name": CHECKPOINT})
    image = g.add("LoadImage", 0, 2, {"image": IMAGE}, height=320)
    editor = g.add("DragKitPointsEditor", 1, 3, {"image_file": IMAGE}, {"image": Out(image, 0)}, height=560)
    prompt = g.add("CLIPTextEncode", 1, 0, {"text": ""}, {"clip": Out(ckpt, 1)}, title="Prompt (may stay empty)")
    encode = g.add("VAEEncode", 1, 2, inputs={"pixels": Out(image, 0), "vae": Out(ckpt, 2)})
    invert = g.add("DragKitDDIMInvert", 2, 0, {"steps": 50, "strength": strength, "cache_layers": "none"},
                   {"model": Out(ckpt, 0), "latent": Out(encode, 0), "positive": Out(prompt, 0)}, height=220)
    optimise = g.add("DragKitMotionSupervisionOptimize", 3, 0, {"mode": mode},
                     {"model": Out(ckpt, 0), "latent": Out(invert, 0), "attn_cache": Out(invert, 1),
                      "positive": Out(prompt, 0), "points": Out(editor, 1), "mask": Out(editor, 2)}, height=420)
    sample = g.add("DragKitKVInjectedSample", 4, 0, {"kv_source": "reference branch", "inject_layers": "masactrl"},
                   {"model": Out(ckpt, 0), "latent": Out(optimise, 0), "attn_cache": Out(invert, 1),
                    "positive": Out(prompt, 0)}, height=240)
    decode = g.add("DragKitVAEDecode", 5, 0, {"feather": 8},
                   {"vae": Out(ckpt, 2), "latent": Out(sample, 0), "source_image": Out(image, 0),
                    "mask": Out(editor, 2), "points": Out(editor, 1)}, height=180)
    g.add("SaveImage", 6, 0, {"filename_prefix": f"dragkit_{mode}"}, {"images": Out(decode, 0)}, height=320)
    g.add("PreviewImage", 6, 3, inputs={"images": Out(decode, 1)}, title="Preview with points", height=320)
    title = {"dragdiffusion": "DragDiffusion", "gooddrag": "GoodDrag"}[mode]
    g.note(MOTION_NOTE.format(title=title, strength=strength, t_star=t_star, mode=mode,
                              lora=LORA_LATER.format(steps=lora_steps)), 2, 4, width=520, height=300)
    return g.to_json()


WORKFLOWS = {
    "roundtrip.json": roundtrip,
    "fastdrag.json": fastdrag,
    "fastdrag_refine.json": lambda info: fastdrag(info, refine=True),
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
