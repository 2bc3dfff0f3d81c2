"""Benchmark of warp-then-inpaint (Inpaint4Drag): the pixel warp alone, and the whole edit through ComfyUI's nodes.

Stages:

- ``warp``: :func:`dragkit.pixel_warp.pixel_warp` on a 512² and a 1024² image (an elliptical region over
  about 20% of the image, two handle/target pairs 6% of the side apart), on CUDA when there is one (float16
  image there, float32 on the CPU). Median and 10th-90th percentile over ``--repeats`` runs after warm-up.
  Goals: <= 100 ms at 512² on a CPU, <= 10 ms on an H100.
- ``edit``, when ComfyUI is importable (``COMFYUI_PATH``): Drag Warp (pixels) -> InpaintModelConditioning ->
  KSampler -> VAE Decode, every node called as ComfyUI's executor calls it; time of the whole edit (the
  models already loaded: one warm-up edit first) and peak CUDA memory.

  * real size (CUDA only): an SD1.5-inpainting UNet (9 input channels) with random weights, 8 steps of the
    ``lcm`` sampler at 512² (the released set-up; the LCM-LoRA changes the weights, not the time), and a
    FLUX.1 Fill diffusion model with random weights at 1024² (``euler``, 8 steps here; the time scales with
    steps), with the tiny 16-channel TAESD standing in for FLUX's VAE (encode/decode time not representative).
    Text conditioning is built directly (a random prompt embedding of the model's width).
  * ``--tiny``: the tiny inpainting models of :mod:`tools.tiny_inpaint` on the CPU at 128² (skipped with a
    reason when that module or its models are unavailable).

    python -m benchmarks.inpaint [--tiny] [--out FILE.json] [--repeats N] [--threads N] [--no-edit]

The last line printed is a one-line summary (the GPU check keys its log on it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from benchmarks.measure import machine
from benchmarks.warp import summary, time_ms
from dragkit.pixel_warp import pixel_warp

WARP_SIDES = (512, 1024)
EDIT_STEPS = 8
TINY_SIDE = 128
GOALS_MS = {"warp_512_cpu": 100.0, "warp_512_cuda": 10.0}


def warp_workload(side: int, device: torch.device, dtype: torch.dtype):
    """``(image (1, side, side, 3), mask (side, side), handles (2, 2), targets (2, 2))`` of the warp stage."""
    gen = torch.Generator().manual_seed(side)
    image = torch.rand(1, side, side, 3, generator=gen).to(device=device, dtype=dtype)
    rows = torch.arange(side, dtype=torch.float32)[:, None] / side
    cols = torch.arange(side, dtype=torch.float32)[None, :] / side
    mask = (((rows - 0.5) / 0.3) ** 2 + ((cols - 0.5) / 0.22) ** 2 < 1).to(device)
    handles = torch.tensor([[0.45, 0.40], [0.55, 0.62]]) * side
    targets = handles + torch.tensor([[0.06, 0.0], [0.0, -0.06]]) * side
    return image, mask, handles.round(), targets.round()


def warp_stage(device: torch.device, repeats: int) -> dict:
    """Median warp times at each side in :data:`WARP_SIDES`."""
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    out = {}
    for side in WARP_SIDES:
        image, mask, handles, targets = warp_workload(side, device, dtype)
        times = time_ms(lambda: pixel_warp(image, mask, handles, targets), repeats, warmup=1, cuda=cuda)
        out[f"{side}"] = summary(times) | {"dtype": str(dtype).replace("torch.", "")}
    return out


def run_edit(host, case: dict, repeats: int, cuda: bool) -> dict:
    """Time the whole warp + inpaint edit of ``case`` through ComfyUI's nodes (one warm-up edit first).

    ``case``: ``model``, ``vae``, ``positive`` (CONDITIONING), ``side``, ``sampler``, ``scheduler``, ``cfg``.
    """
    side = case["side"]
    image, mask, handles, targets = warp_workload(side, torch.device("cpu"), torch.float32)
    points = host.pack.dragkit.points.DragPoints(
        tuple(map(tuple, handles.tolist())), tuple(map(tuple, targets.tolist())), side, side
    )

    def edit():
        warped, inpaint = host.run_node("DragKitPixelWarp", image=image, points=points, band=5, neighbours="exact",
                                        mask=mask[None].float())
        positive, negative, latent = host.run_node(
            "InpaintModelConditioning", positive=case["positive"], negative=case["positive"], pixels=warped,
            vae=case["vae"], mask=inpaint, noise_mask=True,
        )
        (sampled,) = host.run_node(
            "KSampler", model=case["model"], seed=0, steps=EDIT_STEPS, cfg=case["cfg"], sampler_name=case["sampler"],
            scheduler=case["scheduler"], positive=positive, negative=negative, latent_image=latent, denoise=1.0,
        )
        (decoded,) = host.run_node("VAEDecode", samples=sampled, vae=case["vae"])
        return decoded

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = time_ms(edit, repeats, warmup=1, cuda=cuda)
    result = summary(times) | {"side": side, "steps": EDIT_STEPS, "sampler": case["sampler"]}
    result["peak_cuda_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
    return result


def _conditioning(width: int, tokens: int, pooled: int | None, guidance: float | None) -> list:
    """A CONDITIONING with a random prompt embedding ``(1, tokens, width)`` (and a pooled one / FLUX guidance)."""
    gen = torch.Generator().manual_seed(width)
    options = {}
    if pooled:
        options["pooled_output"] = torch.randn(1, pooled, generator=gen)
    if guidance is not None:
        options["guidance"] = guidance
    return [[torch.randn(1, tokens, width, generator=gen), options]]


def tiny_cases() -> list[dict]:
    """The tiny SD1.5-inpainting (+ tiny LoRA, lcm) and tiny FLUX.1 Fill edits at :data:`TINY_SIDE` on the CPU."""
    import comfy.sd
    import comfy.utils

    from tools import tiny_inpaint

    model, clip, vae = comfy.sd.load_checkpoint_guess_config(
        str(tiny_inpaint.tiny_sd15_inpaint_checkpoint_path()), output_vae=True, output_clip=True
    )[:3]
    lora = comfy.utils.load_torch_file(str(tiny_inpaint.tiny_lcm_lora_path()))
    model, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    sd15 = {"name": "tiny sd15-inpainting + lora", "model": model, "vae": vae, "side": TINY_SIDE, "sampler": "lcm",
            "scheduler": "sgm_uniform", "cfg": 1.0, "positive": _conditioning(768, 77, None, None)}
    flux = comfy.sd.load_diffusion_model(str(tiny_inpaint.tiny_flux_fill_path()))
    flux_vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(tiny_inpaint.tiny_flux_vae_path())))
    fill = {"name": "tiny flux-fill", "model": flux, "vae": flux_vae, "side": TINY_SIDE, "sampler": "euler",
            "scheduler": "simple", "cfg": 1.0, "positive": _conditioning(4096, 16, _pooled_width(flux), 30.0)}
    return [sd15, fill]


def _pooled_width(model) -> int:
    """Width of the pooled text embedding a FLUX MODEL takes (its ``vector_in`` input)."""
    return model.model.diffusion_model.vector_in.in_layer.in_features


def real_cases(device: torch.device) -> list[dict]:
    """Real-size SD1.5-inpainting at 512² and FLUX.1 Fill at 1024², random weights (CUDA)."""
    import comfy.sd
    import comfy.utils

    from tools import sd15_random, tiny_inpaint

    sd = sd15_random.checkpoint_state_dict(seed=0, dtype=torch.float16, device=device)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    extra = torch.randn(sd[key].shape[0], 5, *sd[key].shape[2:], generator=torch.Generator().manual_seed(9)) * 0.01
    sd[key] = torch.cat([sd[key], extra.to(sd[key].dtype)], dim=1)  # 9 input channels: an inpainting UNet
    model, clip, vae = comfy.sd.load_state_dict_guess_config(sd, output_vae=True, output_clip=True)[:3]
    del sd
    sd15 = {"name": "sd15-inpainting (random)", "model": model, "vae": vae, "side": 512, "sampler": "lcm",
            "scheduler": "sgm_uniform", "cfg": 1.0, "positive": _conditioning(768, 77, None, None)}
    flux = comfy.sd.load_diffusion_model_state_dict(flux_fill_random(device))
    flux_vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(tiny_inpaint.tiny_flux_vae_path())))
    fill = {"name": "flux-fill (random; tiny VAE stand-in)", "model": flux, "vae": flux_vae, "side": 1024,
            "sampler": "euler", "scheduler": "simple", "cfg": 1.0, "positive": _conditioning(4096, 256, _pooled_width(flux), 30.0)}
    return [sd15, fill]


def flux_fill_random(device: torch.device) -> dict:
    """A FLUX.1 Fill [dev]-sized state dict (19 double, 38 single blocks) with random bf16 weights on ``device``."""
    from benchmarks.flux import random_flux_state_dict
    from tools.tiny_inpaint import FLUX_FILL_PROBE

    return random_flux_state_dict(FLUX_FILL_PROBE, device)


def edit_stage(args: argparse.Namespace, device: torch.device) -> dict:
    """The whole edit through ComfyUI's nodes, or ``{"skipped": reason}``."""
    from dragrun import comfy_host

    problem = comfy_host.comfyui_problem()
    if problem is not None:
        return {"skipped": problem}
    cuda = device.type == "cuda"
    if not args.tiny and not cuda:
        return {"skipped": "real-size models run only on CUDA; use --tiny on the CPU"}
    comfy_host.init_comfy_inproc(cpu=not cuda)
    host = comfy_host.load_pack_inproc()
    try:
        cases = tiny_cases() if args.tiny else real_cases(device)
    except (ImportError, FileNotFoundError, RuntimeError) as err:
        return {"skipped": f"models unavailable: {err}"}
    out = {}
    for case in cases:
        out[case.pop("name")] = run_edit(host, case, args.edit_repeats, cuda)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny inpainting models on the CPU (CI); the warp still at 512² and 1024²")
    parser.add_argument("--out", default=None, metavar="FILE.json", help="write the results as JSON to this file")
    parser.add_argument("--repeats", type=int, default=7, help="measured warp runs per size (default 7)")
    parser.add_argument("--edit-repeats", type=int, default=3, help="measured whole edits per model (default 3)")
    parser.add_argument("--no-edit", dest="edit", action="store_false", help="time the warp only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {
        "machine": machine(device),
        "tiny": args.tiny,
        "warp_ms": warp_stage(device, args.repeats),
    }
    goal = GOALS_MS["warp_512_cuda" if device.type == "cuda" else "warp_512_cpu"]
    report["warp_goal_512_ms"] = {"goal": goal, "met": report["warp_ms"]["512"]["median_ms"] <= goal}
    if args.edit:
        report["edit"] = edit_stage(args, device)
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    else:
        print(text)
    edits = report.get("edit", {})
    edit_line = "; ".join(f"{name} {v['median_ms']:.0f} ms" for name, v in edits.items() if isinstance(v, dict))
    print(
        f"inpaint benchmark: warp 512² {report['warp_ms']['512']['median_ms']:.1f} ms, "
        f"1024² {report['warp_ms']['1024']['median_ms']:.1f} ms on {report['machine']['device']}"
        + (f"; edit: {edit_line or edits.get('skipped', '')}" if args.edit else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
