"""Benchmark of the FLUX chains through the pack's nodes: FastDrag on FLUX and DragFlow, per stage, with model calls.

Stages, each node called as ComfyUI's executor calls it, on one image with one handle/target pair and a square
region holding the handle (the mask):

- ``invert``: DDIM Invert on FLUX (FireFlow, 25 steps, strength 0.76 = 19 inverted, cache "non-ridge");
- ``warp``: FastDrag Warp+BNNI on the inverted latent;
- ``sample``: KV-Injected Sample ("non-ridge");
- ``dragflow``: Motion-Supervision Optimize, mode dragflow (the released 50 + 20 iterations, lr 1000, gradient
  checkpointing on);
- ``fastdrag_edit`` = invert + warp + sample; ``dragflow_edit`` = invert + dragflow + sample (the first edit;
  moving a point re-runs all but the inversion).

Per stage: wall time, peak CUDA memory (null on a CPU) and the transformer passes counted: ``full`` (through the
final layer), ``partial`` (stopped after the last supervised double block: dragflow's supervision passes) and how
many of them ran with autograd.

- real size (CUDA only): FLUX.1 [dev]-sized random weights (19 double, 38 single blocks, hidden 3072) at 1024²,
  loaded by ComfyUI from a state dict in bf16 and in fp8 (``float8_e4m3fn`` matrices, as the fp8 releases; ComfyUI
  computes in bf16), with a random 512-token T5-width prompt. Goals (issue 28, H100): FastDrag-on-FLUX edit
  <= 8 s with peak <= 24 GiB in fp8; dragflow edit <= 60 s with peak <= 40 GiB.
- ``--tiny``: the small FLUX of :mod:`tools.tiny_flux` (hidden 64, 2 double + 3 single blocks) at 128² on the CPU:
  a pipeline check with the real schedule and model-call counts; its times say nothing about a GPU.

    python -m benchmarks.flux [--tiny] [--weights bf16,fp8] [--out FILE.json] [--threads N]

Needs ``COMFYUI_PATH``. The last line printed is a one-line summary (the GPU check keys its log on it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager

import torch

from benchmarks.measure import machine

STEPS, STRENGTH = 25, 0.76
REAL_SIDE, TINY_SIDE = 1024, 128
GOALS = {"fastdrag_edit": {"seconds": 8.0, "peak_gib": 24.0, "weights": "fp8"},
         "dragflow_edit": {"seconds": 60.0, "peak_gib": 40.0, "weights": None}}
"""Issue 28's goals on an H100 (``weights``: the weights the memory goal is for; None: any)."""


def random_flux_state_dict(probe_shapes: dict, device: torch.device, weights: str = "bf16", double: int = 19,
                           single: int = 38) -> dict:
    """A FLUX state dict with random weights on ``device``: the host detects the model from ``probe_shapes``
    (name -> shape of the tensors its detection reads) with ``double`` / ``single`` blocks, and its own class gives
    every tensor. ``weights``: ``bf16``, or ``fp8`` (the blocks' 2-D matrices in ``float8_e4m3fn``, the rest bf16)."""
    import comfy.ldm.flux.model
    import comfy.model_detection
    import comfy.ops

    probe = {k: torch.empty(shape, device="meta") for k, shape in probe_shapes.items()}
    probe.update({f"double_blocks.{i}.img_attn.norm.key_norm.scale": torch.empty(128, device="meta") for i in range(double)})
    probe.update({f"single_blocks.{i}.norm.key_norm.scale": torch.empty(128, device="meta") for i in range(single)})
    config = comfy.model_detection.detect_unet_config(probe, "")
    with torch.device("meta"):
        model = comfy.ldm.flux.model.Flux(**config, operations=comfy.ops.disable_weight_init)
    gen = torch.Generator(device=device).manual_seed(0)
    out = {}
    for name, tensor in model.state_dict().items():
        value = torch.randn(tensor.shape, generator=gen, device=device, dtype=torch.bfloat16) * 0.02
        if name.endswith("norm.scale") or name.endswith("norm.weight"):
            value = value + 1
        if weights == "fp8" and value.dim() == 2 and "_blocks." in name:
            value = value.to(torch.float8_e4m3fn)
        out[name] = value
    return out


def flux_dev_random(device: torch.device, weights: str, double: int = 19, single: int = 38) -> dict:
    """A FLUX.1 [dev]-sized state dict (hidden 3072, CLIP-L's 768-wide pooled input) with random weights."""
    from tools.tiny_flux import TINY_DEV_PROBE

    probe = dict(TINY_DEV_PROBE, **{"vector_in.in_layer.weight": (3072, 768)})
    return random_flux_state_dict(probe, device, weights, double, single)


@contextmanager
def pass_counter(network: torch.nn.Module, counts: dict):
    """Count the transformer's passes into ``counts``: ``full``, ``partial`` (no final layer), ``autograd``."""
    started = []

    def begin(module, inputs):
        started.append(torch.is_grad_enabled() and not torch.is_inference_mode_enabled())

    def end(module, inputs, output):
        counts["full"] += 1

    handles = [network.img_in.register_forward_pre_hook(begin), network.final_layer.register_forward_hook(end)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        counts["passes"] = len(started)
        counts["autograd"] = sum(started)
        counts["partial"] = counts["passes"] - counts["full"]


def _conditioning(tokens: int, context: int, pooled: int, guidance: float, device=None) -> list:
    gen = torch.Generator().manual_seed(tokens + context)
    txt = torch.randn(1, tokens, context, generator=gen)
    y = torch.randn(1, pooled, generator=gen)
    return [[txt, {"pooled_output": y, "guidance": guidance}]]


def run_chain(host, case: dict, cuda: bool) -> dict:
    """Time each stage of both chains once on ``case`` (``model``, ``side``, ``context``, ``pooled``, ``tokens``)."""
    side, model = case["side"], case["model"]
    latent = {"samples": model.model.process_latent_out(torch.randn(1, 16, side // 8, side // 8, generator=torch.Generator().manual_seed(0)))}
    handle, target = (side * 0.40, side * 0.45), (side * 0.52, side * 0.45)
    points = host.pack.dragkit.points.DragPoints((handle,), (target,), side, side)
    mask = torch.zeros(1, side, side)
    mask[0, int(side * 0.3):int(side * 0.55), int(side * 0.28):int(side * 0.52)] = 1.0
    invert_cond = _conditioning(case["tokens"], case["context"], case["pooled"], 1.0)
    sample_cond = _conditioning(case["tokens"], case["context"], case["pooled"], 3.5)
    network = model.model.diffusion_model
    results, outputs = {}, {}

    def stage(name, fn):
        counts = {"full": 0}
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with pass_counter(network, counts):
            outputs[name] = fn()
        if cuda:
            torch.cuda.synchronize()
        results[name] = {"ms": (time.perf_counter() - start) * 1e3, "model_calls": counts,
                         "peak_cuda_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}

    stage("invert", lambda: host.run_node("DragKitDDIMInvert", model=model, latent=latent, positive=invert_cond,
                                          steps=STEPS, strength=STRENGTH, cache_layers="non-ridge", cache_device="auto"))
    z, cache = outputs["invert"]
    stage("warp", lambda: host.run_node("DragKitFastDragWarp", latent=z, points=points, mode="drag", fill="bnni",
                                        patch_cells=12, mask=mask)[0])

    def sample(latent_in):
        return host.run_node("DragKitKVInjectedSample", model=model, latent=latent_in, attn_cache=cache,
                             positive=sample_cond, kv_source="inversion cache", inject_layers="non-ridge",
                             inject_start=0.0, inject_end=1.0)[0]

    stage("sample", lambda: sample(outputs["warp"]))
    stage("dragflow", lambda: host.run_node(
        "DragKitMotionSupervisionOptimize", model=model, latent=z, attn_cache=cache, positive=sample_cond, points=points,
        mode="dragflow", iterations=1, lr=-1.0, lam=-1.0, r1=-1, r2=-1, mask=mask, gradient_checkpointing=True)[0])
    stage("dragflow_sample", lambda: sample(outputs["dragflow"]))
    for name, parts in (("fastdrag_edit", ("invert", "warp", "sample")), ("dragflow_edit", ("invert", "dragflow", "dragflow_sample"))):
        peaks = [results[p]["peak_cuda_memory_gib"] for p in parts]
        results[name] = {"ms": sum(results[p]["ms"] for p in parts), "stages": list(parts),
                         "peak_cuda_memory_gib": max(peaks) if cuda else None,
                         "model_calls": {k: sum(results[p]["model_calls"][k] for p in parts) for k in results[parts[0]]["model_calls"]}}
    return results


def judge(results: dict, weights: str) -> dict:
    """Issue 28's goals for one weights' results (CUDA, real size only)."""
    out = {}
    for name, goal in GOALS.items():
        seconds = results[name]["ms"] / 1e3
        verdict = {"goal_seconds": goal["seconds"], "seconds": round(seconds, 2), "time_met": seconds <= goal["seconds"]}
        if goal["weights"] in (None, weights):
            peak = results[name]["peak_cuda_memory_gib"]
            verdict |= {"goal_peak_gib": goal["peak_gib"], "peak_gib": peak, "memory_met": peak <= goal["peak_gib"]}
        out[name] = verdict
    return out


def cases(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """The models to run: the small FLUX (``--tiny``) or one real-size FLUX.1 [dev] per ``--weights``."""
    if args.tiny:
        from tools import tiny_flux

        return [{"name": "small flux (tiny)", "model": tiny_flux.small_flux_patcher(), "side": TINY_SIDE, "tokens": 16,
                 "context": tiny_flux.SMALL_FLUX["context_in_dim"], "pooled": tiny_flux.SMALL_FLUX["vec_in_dim"],
                 "weights": "float32"}]
    import comfy.sd

    return [{"name": f"flux1-dev random {weights}", "weights": weights, "side": REAL_SIDE, "tokens": 512,
             "context": 4096, "pooled": 768,
             "model": comfy.sd.load_diffusion_model_state_dict(flux_dev_random(device, weights))}
            for weights in args.weights.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the small FLUX at 128² on the CPU (a pipeline check)")
    parser.add_argument("--weights", default="bf16,fp8", help="real size: comma-separated bf16 / fp8 (default both)")
    parser.add_argument("--out", default=None, metavar="FILE.json", help="write the results as JSON to this file")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from dragrun import comfy_host

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    report = {"machine": machine(device),
              "tiny": args.tiny, "steps": STEPS, "strength": STRENGTH, "results": {}}
    problem = comfy_host.comfyui_problem()
    if problem is not None:
        report["skipped"] = problem
    elif not args.tiny and not cuda:
        report["skipped"] = "real-size FLUX runs only on CUDA; use --tiny on the CPU"
    else:
        comfy_host.init_comfy_inproc(cpu=not cuda)
        host = comfy_host.load_pack_inproc()
        for case in cases(args, device):
            name = case.pop("name")
            results = run_chain(host, case, cuda)
            report["results"][name] = {"side": case["side"], "weights": case["weights"], "stages": results}
            if cuda and not args.tiny:
                report["results"][name]["goals"] = judge(results, case["weights"])
            del case
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    else:
        print(text)
    parts = [f"{name}: fastdrag edit {r['stages']['fastdrag_edit']['ms'] / 1e3:.1f} s "
             f"({r['stages']['fastdrag_edit']['model_calls']['passes']} passes), dragflow edit "
             f"{r['stages']['dragflow_edit']['ms'] / 1e3:.1f} s ({r['stages']['dragflow_edit']['model_calls']['passes']} passes)"
             for name, r in report["results"].items()]
    print(f"flux benchmark on {report['machine']['device']}: " + ("; ".join(parts) or report.get("skipped", "nothing ran")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
