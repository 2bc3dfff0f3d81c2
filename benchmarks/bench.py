"""Per-stage speed and memory of DragKit edits through the real ComfyUI nodes.

    COMFYUI_PATH=/path/to/ComfyUI python -m benchmarks.bench [--tiny] [--resolution 512] [--json out.json]

Builds a real-size SD1.5 UNet and SD VAE with random weights (the compute and
memory are the real ones; nothing is downloaded), loads this pack into an
in-process ComfyUI, and times each stage by calling the pack's own nodes
exactly as the executor does (under ``torch.inference_mode``):

- FastDrag (10 steps, strength 0.7, KV cache of the decoder self-attention
  layers): VAE encode, DDIM Invert, FastDrag Warp+BNNI, KV-Injected Sample,
  VAE Decode. "First edit" is all of them; "re-edit" (a moved point, with
  ComfyUI's cache keeping the inversion) is warp + sample + decode.
- DragDiffusion's inversion (50 steps, strength 0.7) for the size of its cache.
- One bare UNet pass (``apply_model``, batch 1): the floor of every step;
  ``ms_over_unet_floor`` is what a stage spends beyond its UNet passes.

Each stage runs ``--warmup`` times, then ``--repeats`` times; the JSON holds the
median and the 10th/90th percentiles in ms, peak allocated memory, UNet passes
and the machine. ``--tiny`` uses the tiny seeded test checkpoint on the CPU
and finishes in seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]


def sd15_models(device: torch.device, dtype: torch.dtype):
    """A real-size SD1.5 MODEL and VAE with random weights, built through ComfyUI's loaders."""
    import comfy.ops
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    generator = torch.Generator().manual_seed(0)
    unet = UNetModel(
        image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
        channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        transformer_depth_middle=1, context_dim=768, num_heads=8, use_linear_in_transformer=False,
        use_spatial_transformer=True, legacy=False, dtype=torch.float32, operations=comfy.ops.manual_cast,
    )
    model = comfy.sd.load_diffusion_model_state_dict(random_state(unet, generator), model_options={"dtype": dtype})
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae_module = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    vae = comfy.sd.VAE(sd=random_state(vae_module, generator))
    return model, vae


def random_state(module: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A state dict for ``module``: N(0, 0.02) matrices and kernels, unit norm scales, zero biases."""
    state = {}
    for name, tensor in module.state_dict().items():
        if tensor.dim() > 1:
            state[name] = torch.randn(tensor.shape, generator=generator) * 0.02
        else:
            state[name] = torch.ones(tensor.shape) if name.endswith("weight") else torch.zeros(tensor.shape)
    return state


def tiny_models():
    from tools.comfy_host import load_checkpoint_inproc
    from tools.tiny_models import tiny_checkpoint_path

    loaded = load_checkpoint_inproc(tiny_checkpoint_path())
    return loaded.model, loaded.vae


def unet_pass(model, resolution: int, positive: list) -> torch.Tensor:
    """One bare UNet evaluation at batch 1 (``apply_model``): the floor each sampling step pays."""
    latent = torch.zeros(1, 4, resolution // 8, resolution // 8, device=model.load_device)
    sigma = torch.tensor([1.0], device=model.load_device)
    context = positive[0][0].to(model.load_device)
    return model.model.apply_model(latent, sigma, c_crossattn=context)


def timed(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> dict:
    """Median / p10 / p90 wall time (ms) and peak memory (MiB) of ``fn``; returns its last result too."""
    for _ in range(warmup):
        result = fn()
    times, peaks = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device) / 2**20)
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p10_ms": times[max(0, int(0.1 * (len(times) - 1)))],
        "p90_ms": times[int(0.9 * (len(times) - 1))],
        "repeats": repeats,
        "peak_mib": max(peaks) if peaks else None,
        "result": result,
    }


def motion_stages(host, model, vae, latent, positive, points, image, mask, device) -> dict[str, dict]:
    """DragDiffusion and GoodDrag edits without LoRA, timed once after a short warm-up.

    With random weights the handles never arrive, so the optimisers run their
    worst case: 80 DragDiffusion iterations (81 UNet passes, 80 with backward),
    70 GoodDrag drag operations (210 gradient steps and 21 forward passes; its
    early stop on unchanged tracks is switched off so the count is fixed).
    Reference-branch sampling runs at batch 2 (counted as two passes per step).
    """
    classes = host.pack.nodes
    invert, optimise = classes.invert.DDIMInvert(), classes.optimize.MotionSupervisionOptimize()
    sample, decode = classes.sample.KVInjectedSample(), classes.decode.DragVAEDecode()
    stages = {}
    for mode, strength, warm_up in (
        ("dragdiffusion", 0.7, {"iterations": 2}),
        ("gooddrag", 0.75, {"drag_steps": 1, "drags_per_step": 1, "grad_steps": 1}),
    ):
        z_t, cache = invert.invert(model, latent, positive, 50, strength, "none", "auto")

        def run_optimise(zt, kv, **knobs):
            knobs = {"iterations": 80} | ({} if mode == "dragdiffusion" else {"max_unchanged": 0}) | knobs
            iterations = knobs.pop("iterations")
            return optimise.optimize(model, zt, kv, positive, points, mode, iterations, -1, -1, -1, -1, mask=mask, **knobs)[0]

        run_optimise(z_t, cache, **warm_up)
        stages[f"{mode}_optimize"] = timed(lambda: run_optimise(z_t, cache), 0, 1, device)
        edited = stages[f"{mode}_optimize"]["result"]
        stages[f"{mode}_sample"] = timed(
            lambda: sample.sample(model, edited, cache, positive, "reference branch", "masactrl", 0.0, 1.0)[0], 1, 1, device
        )

        def whole_edit():
            lat = host.nodes.VAEEncode().encode(vae, image)[0]
            zt, kv = invert.invert(model, lat, positive, 50, strength, "none", "auto")
            res = sample.sample(model, run_optimise(zt, kv), kv, positive, "reference branch", "masactrl", 0.0, 1.0)[0]
            return decode.decode(vae, res, 8, image, mask, points)[0]

        stages[f"{mode}_edit"] = timed(whole_edit, 0, 1, device)
    return stages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny seeded checkpoint on the CPU (seconds; for CI)")
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--motion", action="store_true", help="also time DragDiffusion and GoodDrag edits (slow: worst case, once)")
    args = parser.parse_args(argv)

    from tools.comfy_host import comfyui_version, load_pack_inproc

    use_cuda = torch.cuda.is_available() and not args.tiny
    host = load_pack_inproc(cpu=not use_cuda)
    import comfy.model_management as mm

    device = mm.get_torch_device()
    if args.tiny:
        model, vae = tiny_models()
        resolution = min(args.resolution, 128)
    else:
        model, vae = sd15_models(device, torch.float16 if use_cuda else torch.float32)
        resolution = args.resolution
    mm.load_models_gpu([model], force_full_load=True)
    classes = host.pack.nodes
    invert, warp = classes.invert.DDIMInvert(), classes.warp.FastDragWarp()
    sample, decode = classes.sample.KVInjectedSample(), classes.decode.DragVAEDecode()
    points_value = host.pack.dragkit.points.parse_drag_points(
        {"points": [[resolution * 0.40, resolution * 0.50], [resolution * 0.55, resolution * 0.45]]}, resolution, resolution
    )
    image = torch.rand(1, resolution, resolution, 3, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, resolution, resolution)
    mask[:, resolution // 4 : 3 * resolution // 4, resolution // 4 : 3 * resolution // 4] = 1
    positive = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(2)), {}]]
    warm, reps = args.warmup, args.repeats

    stages: dict[str, dict] = {}
    with torch.inference_mode():
        stages["unet_forward"] = timed(lambda: unet_pass(model, resolution, positive), warm, reps, device)
        stages["vae_encode"] = timed(lambda: host.nodes.VAEEncode().encode(vae, image)[0], warm, reps, device)
        latent = stages["vae_encode"]["result"]
        stages["fastdrag_invert"] = timed(lambda: invert.invert(model, latent, positive, 10, 0.7, "decoder", "auto"), warm, reps, device)
        z_t, cache = stages["fastdrag_invert"]["result"]
        stages["fastdrag_warp"] = timed(lambda: warp.warp(z_t, points_value, "drag", "bnni", 12, mask)[0], warm, reps, device)
        warped = stages["fastdrag_warp"]["result"]
        stages["fastdrag_sample"] = timed(
            lambda: sample.sample(model, warped, cache, positive, "inversion cache", "decoder", 0.0, 1.0)[0], warm, reps, device
        )
        edited = stages["fastdrag_sample"]["result"]
        stages["vae_decode"] = timed(lambda: decode.decode(vae, edited, 8, image, mask, points_value)[0], warm, reps, device)

        def re_edit():
            moved = warp.warp(z_t, points_value, "drag", "bnni", 12, mask)[0]
            out = sample.sample(model, moved, cache, positive, "inversion cache", "decoder", 0.0, 1.0)[0]
            return decode.decode(vae, out, 8, image, mask, points_value)[0]

        def first_edit():
            lat = host.nodes.VAEEncode().encode(vae, image)[0]
            zt, kv = invert.invert(model, lat, positive, 10, 0.7, "decoder", "auto")
            moved = warp.warp(zt, points_value, "drag", "bnni", 12, mask)[0]
            out = sample.sample(model, moved, kv, positive, "inversion cache", "decoder", 0.0, 1.0)[0]
            return decode.decode(vae, out, 8, image, mask, points_value)[0]

        stages["fastdrag_re_edit"] = timed(re_edit, warm, reps, device)
        stages["fastdrag_first_edit"] = timed(first_edit, warm, reps, device)
        drag_cache = timed(lambda: invert.invert(model, latent, positive, 50, 0.7, "decoder", "auto")[1], 1, 1, device)
        stages["dragdiffusion_invert"] = drag_cache
        if args.motion:
            stages.update(motion_stages(host, model, vae, latent, positive, points_value, image, mask, device))
    unet_passes = {"dragdiffusion_optimize": 81, "dragdiffusion_sample": 70, "dragdiffusion_edit": 186,
                   "gooddrag_optimize": 231, "gooddrag_sample": 69, "gooddrag_edit": 338,
                   "unet_forward": 1, "fastdrag_invert": 7, "fastdrag_sample": 7, "fastdrag_re_edit": 7, "fastdrag_first_edit": 14, "dragdiffusion_invert": 35}
    kv = drag_cache["result"]
    report = {
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpu_count": __import__("os").cpu_count()},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(model.model_dtype()),
        "versions": {"torch": torch.__version__, "comfyui": comfyui_version()},
        "model": "tiny seeded SD1.5-shaped checkpoint" if args.tiny else "SD1.5 architecture, random weights",
        "resolution": resolution,
        "attn_cache": {
            "layers": len(kv.layers), "steps": len(kv.kv), "storage": str(kv.storage_device),
            "mib_per_step": kv.kv_nbytes_per_step() / 2**20, "mib_total": kv.kv_nbytes() / 2**20,
        },
        "stages": {
            name: {k: v for k, v in stage.items() if k != "result"} | {"unet_passes": unet_passes.get(name, 0)}
            for name, stage in stages.items()
        },
    }
    floor = report["stages"]["unet_forward"]["median_ms"]
    for stage in report["stages"].values():
        stage["ms_over_unet_floor"] = stage["median_ms"] - stage["unet_passes"] * floor
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
