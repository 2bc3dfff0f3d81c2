"""Captured UNet passes against plain ones in an in-process ComfyUI: FastDrag and DragDiffusion latents, capture
counts and refusals, and the free memory ComfyUI sees after an unload.

    python -m tools.comfy_vram default tools.capture_check --json capture.json [--tiny] [--expect-captures]

``scripts/gpu_check.sh`` runs it once per CUDA allocator, each in its own
process (the allocator is chosen when CUDA starts): ``PYTORCH_CUDA_ALLOC_CONF=
backend:cudaMallocAsync``, which ComfyUI's ``main.py`` sets for CUDA builds of
torch (``cuda_malloc.py``), and the native allocator; and once per host VRAM
mode (:mod:`tools.comfy_vram`).

The models are the benchmark's (:class:`benchmarks.comfy_path.ComfyPath`: a
real-size SD1.5 with random fp16 weights on CUDA; the tiny seeded checkpoint
with ``--tiny``). Each method's whole edit through the pack's nodes (VAE
Encode, DDIM Invert, then FastDrag Warp+BNNI and KV-Injected Sample, or
DragDiffusion's Motion-Supervision Optimize and the reference-branch sample)
runs with ``DRAGKIT_CAPTURE=off``, then twice with ``graph`` (the first run
captures and checks every pass against eager, the second replays); the
replayed edit's latent is compared with the plain one: the largest absolute
difference over the plain latent's largest magnitude, at most
:data:`TOLERANCE` and finite, or the method fails. On a CPU ``graph`` is the
static-buffer path without graphs.

Then every model is unloaded (``unload_all_models``, ``soft_empty_cache``) and,
on CUDA, ComfyUI's free memory (``get_free_memory``: the driver's free memory
plus what torch reserved but is not using) is set against the driver's
(``torch.cuda.mem_get_info``). A graph pool that outlives the unload is
reserved but inactive, so ComfyUI counts it free while it is not: more than
:data:`MEMORY_SLACK_MIB` apart fails, except under Dynamic VRAM, whose own
accounting is reported but not judged.

With ``--expect-captures`` (the GPU check's runs of ComfyUI 0.33.0's default
start and of ``--disable-async-offload``), motion supervision must also have
captured at least one pass (:func:`motion_supervision_captures`): on a
default start its MODEL is the fully loaded non-dynamic delegate, whose
weights no offload stream touches, so a capture count of 0 means the pack
refused one it could run (the refusal is in the log lines).

The JSON: allocator, host VRAM mode, the host's offload streams, device, per
method the difference, the seconds of each run and the capture counters
(``nodes.comfy_capture.report`` after it), the memory after the unload, and
every distinct ``DragKit`` log line (fallbacks and refusals). Exit status 0
when every judged check passed.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks.comfy_path import ComfyPath, conditioning
from benchmarks.inputs import edit_inputs
from benchmarks.measure import capture_setting
from dragkit.atomic import write_bytes_atomic
from dragrun.comfy_host import capture_logs, comfyui_version
from tools.comfy_vram import ENV_VAR as HOST_VRAM

TOLERANCE = {"fastdrag": 1e-3, "dragdiffusion": 1e-2}
"""Largest difference of the replayed edit's latent from the plain one, relative to the plain latent's largest
magnitude. DragDiffusion's optimisation feeds each iteration's rounding into the next, so it gets more room."""

MEMORY_SLACK_MIB = 256
"""How far ComfyUI's free memory may be from the driver's after an unload."""

WORK = {
    False: {"side": 512, "fastdrag_steps": 10, "dragdiffusion_steps": 50, "iterations": 20},
    True: {"side": 64, "fastdrag_steps": 10, "dragdiffusion_steps": 10, "iterations": 2},
}
"""Per ``--tiny``: image side, FastDrag and DragDiffusion inversion steps, DragDiffusion iterations."""


def relative_difference(plain: torch.Tensor, captured: torch.Tensor) -> float:
    """``max |plain − captured| / max |plain|`` in float32 (NaN when either holds a non-finite value)."""
    a, b = plain.float(), captured.float()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


class Edits:
    """The two edits through the pack's nodes on one model, each returning its final latent ``(1, 4, h/8, w/8)``."""

    def __init__(self, path: ComfyPath, tiny: bool) -> None:
        self.path, self.work = path, WORK[tiny]
        host, side = path.host, self.work["side"]
        inputs = edit_inputs(side, 768)
        self.image, self.mask = inputs.image[None], inputs.mask[None]
        self.points = host.pack.dragkit.points.parse_drag_points(inputs.points.to_json_dict(), side, side)
        self.positive = conditioning("sd15", inputs.context, side)
        classes = host.pack.nodes
        self.invert, self.warp = classes.invert.DDIMInvert(), classes.warp.FastDragWarp()
        self.sample, self.optimise = classes.sample.KVInjectedSample(), classes.optimize.MotionSupervisionOptimize()
        self.encode = host.nodes.VAEEncode()

    def fastdrag(self) -> torch.Tensor:
        model, latent = self.path.model, self.encode.encode(self.path.vae, self.image)[0]
        z_t, cache = self.invert.invert(model, latent, self.positive, self.work["fastdrag_steps"], 0.7, "decoder", "auto")
        warped = self.warp.warp(z_t, self.points, "drag", "bnni", 12, self.mask)[0]
        return self.sample.sample(model, warped, cache, self.positive, "inversion cache", "decoder", 0.0, 1.0)[0]["samples"]

    def dragdiffusion(self) -> torch.Tensor:
        model, latent = self.path.model, self.encode.encode(self.path.vae, self.image)[0]
        z_t, cache = self.invert.invert(model, latent, self.positive, self.work["dragdiffusion_steps"], 0.7, "none", "auto")
        edited = self.optimise.optimize(model, z_t, cache, self.positive, self.points, "dragdiffusion",
                                        self.work["iterations"], -1, -1, -1, -1, mask=self.mask)[0]
        return self.sample.sample(model, edited, cache, self.positive, "reference branch", "masactrl", 0.0, 1.0)[0]["samples"]


def timed(fn, device: torch.device) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    with torch.inference_mode():
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out.detach().cpu(), time.perf_counter() - start


def compare(method: str, fn, device: torch.device, report) -> dict:
    """``fn`` with capture off, then twice with ``graph``; the second (replayed) latent against the plain one."""
    with capture_setting("off"):
        plain, plain_s = timed(fn, device)
    with capture_setting("graph"):
        _, first_s = timed(fn, device)
        captured, captured_s = timed(fn, device)
    difference = relative_difference(plain, captured)
    return {"difference": difference, "tolerance": TOLERANCE[method], "ok": difference <= TOLERANCE[method],
            "seconds": {"off": plain_s, "graph_first": first_s, "graph": captured_s}, "capture": report()}


def memory_after_unload(device: torch.device, dynamic: bool) -> dict:
    """ComfyUI's and the driver's free memory after every model is unloaded (GiB); ``ok`` None where not judged."""
    import comfy.model_management as mm

    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    if device.type != "cuda":
        return {"ok": None, "why": "no CUDA device"}
    gib = 2**30
    comfy_free, driver_free = mm.get_free_memory(device), torch.cuda.mem_get_info(device)[0]
    apart = abs(comfy_free - driver_free) / 2**20
    return {
        "comfy_free_gib": comfy_free / gib, "driver_free_gib": driver_free / gib, "apart_mib": apart,
        "torch_reserved_gib": torch.cuda.memory_reserved(device) / gib,
        "torch_allocated_gib": torch.cuda.memory_allocated(device) / gib,
        "ok": None if dynamic else apart <= MEMORY_SLACK_MIB,
        "why": "Dynamic VRAM accounts memory itself: reported, not judged" if dynamic else
               f"at most {MEMORY_SLACK_MIB} MiB apart",
    }


def motion_supervision_captures(methods: dict) -> int:
    """Passes with gradients captured during the DragDiffusion edit: its motion supervision's (FastDrag takes none,
    and the counters run on over both methods)."""
    before = methods["fastdrag"]["capture"]["gradient"]["captures"]
    return methods["dragdiffusion"]["capture"]["gradient"]["captures"] - before


def run(tiny: bool, expect_captures: bool = False) -> dict:
    use_cuda = torch.cuda.is_available() and not tiny
    if tiny:
        torch.set_num_threads(1)
    dynamic = os.environ.get(HOST_VRAM) == "dynamic"
    with capture_logs(logging.INFO) as logs:
        path = ComfyPath(tiny, use_cuda, "sd15")
        device = path.device
        capture = path.host.pack.nodes.comfy_capture
        streams = path.host.pack.nodes.host_caps.offload_streams()
        capture.reset()
        edits = Edits(path, tiny)
        methods = {name: compare(name, getattr(edits, name), device, capture.report)
                   for name in ("fastdrag", "dragdiffusion")}
        path.close()
        del edits, path
        memory = memory_after_unload(device, dynamic)
    lines = list(dict.fromkeys(line[line.index("DragKit"):].strip() for line in logs.messages() if "DragKit" in line))
    motion = motion_supervision_captures(methods)
    return {
        "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or "native",
        "host_vram": os.environ.get(HOST_VRAM), "offload_streams": streams, "comfyui": comfyui_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "tiny": tiny,
        "work": WORK[tiny], "methods": methods, "memory_after_unload": memory, "log": lines,
        "motion_supervision_captures": motion, "expect_captures": expect_captures,
        "ok": all(m["ok"] for m in methods.values()) and memory["ok"] is not False and (motion > 0 or not expect_captures),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny seeded checkpoint on the CPU (a pipeline check)")
    parser.add_argument("--json", type=Path, required=True, help="where to write the report")
    parser.add_argument("--expect-captures", action="store_true",
                        help="fail unless motion supervision captured at least one pass (a CUDA run: the CPU's "
                             "static-buffer path counts no captures)")
    args = parser.parse_args(argv)
    report = run(args.tiny, args.expect_captures)
    write_bytes_atomic(args.json, (json.dumps(report, indent=2) + "\n").encode())
    for name, result in report["methods"].items():
        print(f"{name}: difference {result['difference']:.2e} (≤ {result['tolerance']:g}), capture {result['capture']}")
    print(f"memory after unload: {report['memory_after_unload']}")
    print(f"motion supervision: {report['motion_supervision_captures']} passes captured with "
          f"{report['offload_streams']} offload streams" + (" (expected > 0)" if args.expect_captures else ""))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
