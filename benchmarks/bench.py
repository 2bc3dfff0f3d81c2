"""Per-stage speed, memory and compute floor of DragKit edits.

    python -m benchmarks.bench [--tiny] [--model sd15|sdxl] [--resolutions 512,768,1024]
                               [--methods fastdrag,lora,dragdiffusion,gooddrag] [--no-captured]
                               [--backend auto|comfyui|diffusers] [--json [out.json]] [--peak-tflops T]

Builds the real-size SD1.5 (or, with ``--model sdxl``, SDXL) UNet and SD VAE
with random weights (the compute and memory are the real ones; nothing is
downloaded) and times each method's stages:

- FastDrag (10 steps, strength 0.7, KV cache of the decoder self-attention
  layers): VAE encode, DDIM inversion, warp + BNNI, KV-injected sampling,
  decode (paste + preview). "First edit" is all of them; "re-edit" (a moved
  point, the inversion cached) is warp + sample + decode.
- LoRA fine-tuning (80 steps, batch 4, rank 16): seconds per step.
- DragDiffusion (50 steps, strength 0.7, 80 iterations) and GoodDrag (50
  steps, strength 0.75, 7 × 10 × 3 gradient steps, early stop off): inversion
  (with the decoder KV cache, for its size), optimisation, reference-branch
  sampling and the whole edit without LoRA. Random weights never reach the
  targets, so the optimisers run their worst case.
- One bare UNet pass at batch 1.

Backends: with a ComfyUI host (``COMFYUI_PATH``) the stages call the pack's
nodes in an in-process ComfyUI (:mod:`benchmarks.comfy_path`); without one,
the engine's loops on diffusers models (:mod:`benchmarks.diffusers_path`).
``--tiny`` runs the tiny test models and a shortened workload
(:data:`benchmarks.workload.TINY`) on the CPU, on one thread, in seconds: a
pipeline check.

``--model sdxl`` (ComfyUI path only) benchmarks SDXL at 1024² by default
(FastDrag, LoRA and DragDiffusion unless ``--methods`` says otherwise; with
``--tiny``, the tiny SDXL test checkpoint at 64²). The issues' goals for the
family and side (:mod:`benchmarks.goals`: SD1.5 at 512², SDXL at 1024²) are
judged beside the results on a CUDA run and listed as not applicable
elsewhere.

Fast stages run ``--warmup`` times, then ``--repeats`` times; slow ones (LoRA,
optimisers, whole motion edits) a shortened warm-up, then ``--slow-repeats``.
Every stage runs with captured UNet passes off (``DRAGKIT_CAPTURE=off``);
the stages the goals name, FastDrag sampling and the DragDiffusion
optimisation run again with them on (``graph``) as ``<stage>_captured``
(:class:`benchmarks.measure.Stager`; ``--no-captured`` leaves the twins out).
The JSON holds the machine, device, dtype, versions, backend, the CUDA
allocator (``PYTORCH_CUDA_ALLOC_CONF``), the host's VRAM mode when started
through :mod:`tools.comfy_vram` (``host_vram``), the workload,
and per resolution and stage: median / p10 / p90 ms, repeats, peak CUDA
memory (MiB; null on a CPU), the UNet passes counted (calls and batch rows,
with autograd and without) and the compute floor (FLOPs of those passes ÷
the device's peak; :mod:`benchmarks.flops`), as ``flops``, ``floor_ms`` and
``floor_ratio`` (median ÷ floor; null where the peak is unknown, e.g. CPUs),
and ``ms_beyond_bare_passes`` (see :func:`report_stage`); per resolution also
``goals`` (:func:`benchmarks.goals.judge_capture`: every goal with capture
off and on), ``capture_ratios`` (each twin's median ÷ the plain stage's), and
on the ComfyUI path ``capture`` (captured UNet passes: mode, captures,
refusals, replays, the largest first-replay difference from eager) and
``failures`` (a stage that ran out of GPU memory, e.g. SDXL LoRA at 1024²,
is reported there and the run goes on). ``complete`` is false until the last
stage: with ``--json PATH`` the report is rewritten after every stage, so a
run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

from dragkit.atomic import write_bytes_atomic
from tools.comfy_vram import ENV_VAR as HOST_VRAM

from . import flops as flop_floor
from . import goals
from .goals import CAPTURED
from .measure import Stager
from .workload import FULL, METHODS, SDXL_METHODS, TINY

TINY_SIDE = 64
DEFAULT_SIDE = {"sd15": 512, "sdxl": 1024}
"""Image side per model family (``--model``) when ``--resolutions`` is not given: the family's native size."""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or any(v < 64 or v % 64 for v in values):
        raise argparse.ArgumentTypeError(f"image sides must be multiples of 64, at least 64; got {text!r}")
    return values


def _methods(text: str) -> tuple[str, ...]:
    chosen = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"methods are a comma-separated subset of {','.join(METHODS)}; got {text!r}")
    return tuple(m for m in METHODS if m in chosen)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny test models and workload on the CPU (seconds; for CI)")
    parser.add_argument("--model", choices=tuple(DEFAULT_SIDE), default="sd15",
                        help="model family (default sd15; sdxl needs the ComfyUI backend)")
    parser.add_argument("--resolutions", type=_int_list, default=None,
                        help=f"comma-separated image sides in pixels (default 512, sdxl 1024; --tiny: {TINY_SIDE})")
    parser.add_argument("--methods", type=_methods, default=None,
                        help=f"subset of {','.join(METHODS)} (default: all; sdxl: {','.join(SDXL_METHODS)})")
    parser.add_argument("--backend", choices=("auto", "comfyui", "diffusers"), default="auto",
                        help="auto: comfyui when COMFYUI_PATH names a usable checkout, else diffusers")
    parser.add_argument("--repeats", type=int, default=5, help="measured runs of each fast stage (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up runs of each fast stage (default 2)")
    parser.add_argument("--slow-repeats", type=int, default=1, help="measured runs of each slow stage (default 1)")
    parser.add_argument("--no-captured", dest="captured", action="store_false",
                        help="leave out the <stage>_captured twins (capture on); every stage then runs with capture off")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak TFLOP/s for the floor (default: table)")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="write the JSON report to PATH (or stdout with no PATH or '-'); the tables go to stderr then")
    args = parser.parse_args(argv)
    if min(args.repeats, args.slow_repeats) < 1 or args.warmup < 0:
        parser.error("--repeats and --slow-repeats must be at least 1, --warmup at least 0")
    args.resolutions = args.resolutions or [TINY_SIDE if args.tiny else DEFAULT_SIDE[args.model]]
    args.methods = args.methods or (SDXL_METHODS if args.model == "sdxl" else METHODS)
    return args


def choose_backend(requested: str, family: str = "sd15") -> str:
    """``comfyui`` or ``diffusers``; ``auto`` picks comfyui only when a usable checkout is configured.

    SDXL runs on the ComfyUI path only (the diffusers path builds SD1.5).
    """
    from dragrun.comfy_host import comfyui_problem

    problem = comfyui_problem()
    if family == "sdxl" and (requested == "diffusers" or problem):
        raise SystemExit("error: --model sdxl runs on the ComfyUI backend only: "
                         + (problem or "drop --backend diffusers"))
    if requested == "comfyui" and problem:
        raise SystemExit(f"error: --backend comfyui: {problem}")
    if requested == "auto":
        return "diffusers" if problem else "comfyui"
    return requested


def _versions(backend: str) -> dict:
    import diffusers

    comfyui = None
    if backend == "comfyui":
        from dragrun.comfy_host import comfyui_version

        comfyui = comfyui_version()
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "comfyui": comfyui}


def build_path(backend: str, tiny: bool, family: str = "sd15"):
    """The benchmark path with its models: fp16 on CUDA when there is one (and not ``tiny``), else float32 on the CPU."""
    use_cuda = torch.cuda.is_available() and not tiny
    if backend == "comfyui":
        from .comfy_path import ComfyPath

        return ComfyPath(tiny, use_cuda, family)
    from .diffusers_path import DiffusersPath

    device = torch.device("cuda" if use_cuda else "cpu")
    return DiffusersPath(tiny, device, torch.float16 if use_cuda else torch.float32)


def report_stage(stage: dict, bare_pass_ms: float, per_pass: dict, peak: float | None) -> dict:
    """A stage's JSON entry: its measurements, its time beyond its UNet rows at the bare-pass speed, and its floor.

    ``ms_beyond_bare_passes`` = median − forward rows × one bare batch-1 pass:
    what a stage spends on anything but the UNet (sampler, attention control,
    warp, VAE, Python). It is null for stages with backward passes, whose
    cost per row the bare forward pass does not measure.
    """
    out = {k: v for k, v in stage.items() if k != "result"}
    beyond = None if out["unet_passes_with_grad"] else out["median_ms"] - out["unet_rows"] * bare_pass_ms
    out["ms_beyond_bare_passes"] = beyond
    out.update(flop_floor.floor(out, per_pass, peak))
    return out


def run(args: argparse.Namespace, on_update=None) -> dict:
    """Run the benchmark and return the report (see the module docstring).

    ``on_update(report)`` is called after every stage with the report so far (``complete`` false).
    """
    backend = choose_backend(args.backend, args.model)
    workload = TINY if args.tiny else FULL
    if args.tiny:
        torch.set_num_threads(1)  # tiny ops on 2+ oversubscribed threads can stall 100x on a shared CPU
    path = build_path(backend, args.tiny, args.model)
    device_name = torch.cuda.get_device_name(path.device) if path.device.type == "cuda" else "cpu"
    peak, peak_source = flop_floor.device_peak(device_name, path.dtype, args.peak_tflops)
    per_pass = flop_floor.unet_flops(path.unet_config, args.resolutions)
    report = {
        "complete": False,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
        "device": device_name,
        "dtype": str(path.dtype),
        "versions": _versions(backend),
        "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or "native",
        "host_vram": os.environ.get(HOST_VRAM),
        "backend": backend,
        "model": path.model_name,
        "model_family": args.model,
        "tiny": bool(args.tiny),
        "workload": workload.as_dict(),
        "methods": list(args.methods),
        "warmup": args.warmup, "repeats": args.repeats, "slow_repeats": args.slow_repeats,
        "flops": {
            "counted_with": "torch.utils.flop_counter.FlopCounterMode, one pass of the same UNet architecture "
                            "(diffusers, meta device), batch 1, 77 tokens; matmul/conv/attention only",
            "per_pass": {str(side): counts for side, counts in per_pass.items()},
            "peak_tflops": peak,
            "peak_source": peak_source,
        },
        "resolutions": {},
    }
    cuda = path.device.type == "cuda"

    def resolution(stager: Stager, side: int, attn_cache: dict | None) -> dict:
        """The report's entry for ``side`` from the stages measured so far."""
        bare = stager.stages["unet_forward"]["median_ms"]
        stages = {name: report_stage(s, bare, per_pass[side], peak) for name, s in stager.stages.items()}
        return {
            "attn_cache": attn_cache,
            "stages": stages,
            "native_ratios": native_ratios(stages),
            "capture": path.capture_report() if hasattr(path, "capture_report") else None,
            "failures": dict(getattr(path, "failures", {})),
            "capture_ratios": capture_ratios(stages),
            "goals": goals.judge_capture(args.model, side, goal_measures(stages), cuda),
        }

    try:
        for side in args.resolutions:
            def updated(name: str, side: int = side) -> None:
                if on_update is not None:
                    report["resolutions"][str(side)] = resolution(stager, side, None)
                    on_update(report)

            stager = Stager(path.device, path.counter, args.warmup, args.repeats, args.slow_repeats,
                            twins=args.captured, on_stage=updated)
            attn_cache = path.run(side, workload, args.methods, stager)
            report["resolutions"][str(side)] = resolution(stager, side, attn_cache)
    finally:
        path.close()
    report["complete"] = True
    return report


NATIVE_PAIRS = {
    "fastdrag_sample": "native_ksampler_advanced",
    "vae_decode": "native_vae_decode",
}
"""Our stage -> ComfyUI's native equivalent timed in the same run (ComfyUI path only):
KV-Injected Sample vs KSamplerAdvanced (same model, latent, steps and start step, ddim / ddim_uniform,
no added noise, cfg 1), VAE Decode (DragKit, with paste and preview) vs core VAE Decode."""


def capture_ratios(stages: dict) -> dict:
    """``{"<stage>_captured": its median / the plain stage's median}`` for each captured twin that ran."""
    return {name: stage["median_ms"] / stages[name[: -len(CAPTURED)]]["median_ms"]
            for name, stage in stages.items() if name.endswith(CAPTURED) and name[: -len(CAPTURED)] in stages}


def capture_line(report: dict) -> str:
    """One line on the captured passes of a run (:func:`nodes.comfy_capture.report`)."""
    parts = []
    for name, counts in (("sampling/inversion", report["passes"]), ("with gradients", report["gradient"])):
        error = counts["max_first_replay_error"]
        worst = "–" if error is None else f"{error:.1e}"
        parts.append(f"{name}: {counts['captures']} captured, {counts['rejected']} refused, {counts['replays']} replays, "
                     f"largest first-replay difference {worst}")
    return f"Captured UNet passes (mode {report['mode']}): " + "; ".join(parts)


def goal_measures(stages: dict) -> dict:
    """``{stage: {"median_ms", "peak_gib", "unet_passes"}}`` of the reported stages (peak None without CUDA), as
    goals are stated."""
    return {name: {"median_ms": s["median_ms"], "peak_gib": None if s["peak_mib"] is None else s["peak_mib"] / 1024,
                   "unet_passes": s["unet_passes"]}
            for name, s in stages.items()}


def native_ratios(stages: dict) -> dict:
    """``{our stage: our median / native median}`` for each pair of :data:`NATIVE_PAIRS` that ran."""
    return {ours: stages[ours]["median_ms"] / stages[native]["median_ms"]
            for ours, native in NATIVE_PAIRS.items() if ours in stages and native in stages}


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.1f} ms"


def tables(report: dict) -> str:
    """Markdown: per resolution, the stage table and the compute-floor table."""
    lines = [f"{report['backend']} backend, {report['device']}, {report['dtype']}, {report['model']}"]
    flops = report["flops"]
    for side, res in report["resolutions"].items():
        lines += ["", f"### {side}×{side}", "", "| stage | median | p10–p90 | repeats | peak memory | UNet passes (rows, with grad) |",
                  "|---|---|---|---|---|---|"]
        for name, s in res["stages"].items():
            peak = "–" if s["peak_mib"] is None else f"{s['peak_mib'] / 1024:.2f} GiB"
            lines.append(f"| {name} | {_ms(s['median_ms'])} | {_ms(s['p10_ms'])}–{_ms(s['p90_ms'])} | {s['repeats']} | {peak} | "
                         f"{s['unet_passes']} ({s['unet_rows']}, {s['unet_rows_with_grad']}) |")
        if res.get("native_ratios"):
            lines += ["", "| our stage | ÷ ComfyUI's native equivalent |", "|---|---|"]
            lines += [f"| {ours} ÷ {NATIVE_PAIRS[ours]} | {ratio:.2f}× |" for ours, ratio in res["native_ratios"].items()]
        if res.get("capture_ratios"):
            lines += ["", "| stage, captured UNet passes | ÷ the same with capture off |", "|---|---|"]
            lines += [f"| {ours} ÷ {ours[: -len(CAPTURED)]} | {ratio:.2f}× |" for ours, ratio in res["capture_ratios"].items()]
        if res.get("capture"):
            lines += ["", capture_line(res["capture"])]
        for name, why in (res.get("failures") or {}).items():
            lines += ["", f"Stage {name} did not complete: {why}"]
        if res.get("goals"):
            lines += [""] + goals.markdown(res["goals"], report["model_family"], int(side))
        per_pass = flops["per_pass"][side]
        lines += ["", f"Compute floor at {side}×{side}: {per_pass['forward'] / 1e9:.1f} GFLOP per forward pass, "
                      f"{per_pass['forward_backward'] / 1e9:.1f} with backward; peak "
                      + (f"{flops['peak_tflops']} TFLOP/s ({flops['peak_source']})" if flops["peak_tflops"] else
                         f"unknown ({flops['peak_source']}): no floor time or ratio"),
                  "", "| stage | TFLOP | floor | median | median ÷ floor |", "|---|---|---|---|---|"]
        for name, s in res["stages"].items():
            if s["flops"]:
                ratio = "–" if s["floor_ratio"] is None else f"{s['floor_ratio']:.1f}×"
                lines.append(f"| {name} | {s['flops'] / 1e12:.3f} | {_ms(s['floor_ms'])} | {_ms(s['median_ms'])} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    partial = None
    if args.json and args.json != "-":
        def partial(report: dict) -> None:
            write_bytes_atomic(Path(args.json), (json.dumps(report, indent=2) + "\n").encode())
    report = run(args, partial)
    text = json.dumps(report, indent=2) + "\n"
    if args.json == "-":
        print(tables(report), file=sys.stderr)
        sys.stdout.write(text)
    else:
        print(tables(report))
        if args.json:
            write_bytes_atomic(Path(args.json), text.encode())
            print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
