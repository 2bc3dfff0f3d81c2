"""One command that proves the GPU path: tests, every shipped workflow, the benchmark, one summary.

    bash scripts/gpu_check.sh [--out DIR]          # CUDA machine: SD1.5, then the SDXL workflows (about 8 min on an H100)
    bash scripts/gpu_check.sh --sdxl [--out DIR]   # CUDA machine: SDXL at 1024² (about 6 min on an H100)
    bash scripts/gpu_check.sh --tiny [--sdxl]      # the same steps on the tiny models on a CPU (CI runs --tiny)

Steps of the default run (each with its own time limit, logs in ``DIR/logs/``):

1. **tests**: ``tests/test_cuda.py`` (skipped without CUDA; it compares
   captured UNet passes with eager ones), ``tests/test_gpu_hazards.py`` and
   ``tests/test_capture.py``, plus ``tests/host/test_gpu_path_host.py`` when
   ``COMFYUI_PATH`` is set.
2. **models**: without ``--tiny``, a real-size SD1.5 checkpoint and ControlNet
   with random fp16 weights from a seed (:mod:`tools.sd15_random`, filled on
   the GPU, written to a scratch folder outside ``DIR``); with ``--tiny`` the
   runner's tiny seeded test models.
3. **workflows**: every ``workflows/*.json`` but the ``*_sdxl`` ones through
   ComfyUI's own executor (:mod:`tools.run_workflow` on ``samples/art_0``,
   scaled to :data:`TINY_SIDE` with ``--tiny``; on the GPU when there is one)
   with shortened loops (:data:`QUICK` / :data:`TINY` ``--set`` values).
   A node error, a non-finite latent or image (the nodes refuse them) or no
   saved image fails the step. Needs ``COMFYUI_PATH``; skipped with the
   reason otherwise.
4. **benchmark**: ``python -m benchmarks.bench`` (SD1.5 at 512², all
   methods; ``--tiny`` on a CPU) writing ``DIR/bench.json``.
5. **SDXL models and workflows**, last, so that a run cut short by its time
   limit still has the SD1.5 numbers: a real-size SDXL checkpoint with
   random fp16 weights (:mod:`tools.sdxl_random`, 6.9 GB, filled on the GPU)
   and the ``*_sdxl.json`` workflows on it as in step 3; with ``--tiny`` the
   runner's tiny SDXL checkpoint with its text encoders
   (:func:`tools.tiny_sdxl_sd2.tiny_sdxl_checkpoint_path`).

``--sdxl`` runs the SDXL part alone, sized to fit one call of its own: the
SDXL benchmark at 1024² (``benchmarks.bench --model sdxl``: FastDrag, LoRA
80 steps, DragDiffusion; ``DIR/bench_sdxl.json``), then step 5 with the
sample scaled to :data:`SDXL_SIDE` (1024²). It is not part of the default
run, which would then need about 13 minutes (estimated for one H100/H200
from the 512² measurements and SDXL's 8.5× FLOPs per pass at 1024²: SDXL
checkpoint ~25 s, each SDXL workflow ~40–60 s, the SDXL benchmark ~3–4.5
min), more than one device call allows.

``DIR/summary.md`` and ``DIR/summary.json`` (rewritten after every step, so
an interrupted run leaves what it did) say what ran, what passed, the
benchmark's medians and peak memory, and the issues' goals for the family
and side judged on a CUDA run (:mod:`benchmarks.goals`). Exit status 0 when
every step that ran passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "samples" / "art_0"

QUICK = {
    "DragKitLoRAFineTune": {"steps": 20},
    "DragKitMotionSupervisionOptimize": {"iterations": 20, "drags_per_step": 3},
}
"""Shortened loops for the real-size run (a workflow's other settings stay as shipped)."""

TINY_SIDE = 128
"""Side of the sample image for ``--tiny`` (``samples/art_0`` scaled down: a CPU pipeline check in minutes)."""

SDXL_SIDE = 1024
"""Side of the sample image for the SDXL workflows of ``--sdxl`` on real-size models (SDXL's native size)."""

TINY = {
    "DragKitLoRAFineTune": {"steps": 2, "batch": 1},
    "DragKitMotionSupervisionOptimize": {"iterations": 2, "drag_steps": 2, "drags_per_step": 1},
    "DragKitDDIMInvert": {"steps": 10},
}
"""Shortened loops for the tiny models on a CPU (a pipeline check)."""



@dataclass
class Step:
    """One step's outcome: ``status`` is ``passed``, ``failed`` or ``skipped``."""

    name: str
    status: str = "skipped"
    seconds: float = 0.0
    detail: str = ""
    log: str = ""


@dataclass
class Report:
    tiny: bool
    sdxl: bool = False
    machine: dict = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    benchmark: list[dict] = field(default_factory=list)
    capture: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(step.status != "failed" for step in self.steps)


def run_logged(name: str, command: list[str], logs: Path, timeout: float, env: dict | None = None) -> Step:
    """Run ``command`` from the repository root with a time limit; output into ``logs/<name>.log``."""
    log = logs / f"{name}.log"
    start = time.monotonic()
    with open(log, "w") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        try:
            rc = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout,
                                env=env, stdin=subprocess.DEVNULL).returncode
        except subprocess.TimeoutExpired:
            rc = None
    seconds = time.monotonic() - start
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip() and not line.startswith("!!")]
    tail = lines[-1:] or [""]
    if rc is None:
        return Step(name, "failed", seconds, f"timed out after {timeout:.0f} s", str(log.relative_to(logs.parent)))
    return Step(name, "passed" if rc == 0 else "failed", seconds, f"exit {rc}: {tail[0][:300]}",
                str(log.relative_to(logs.parent)))


def scaled_sample(source: Path, target: Path, side: int) -> Path:
    """``source`` (Drag100 layout, square) scaled to ``side`` pixels into ``target``: image, mask and points."""
    from PIL import Image

    target.mkdir(parents=True, exist_ok=True)
    image = Image.open(source / "original.jpg").convert("RGB")
    factor = side / image.width
    image.resize((side, round(image.height * factor)), Image.BICUBIC).save(target / "original.jpg")
    mask = Image.open(source / "mask.png").convert("L")
    mask.resize((side, round(mask.height * factor)), Image.NEAREST).save(target / "mask.png")
    points = json.loads((source / "points.json").read_text())["points"]
    scaled = [[min(round(x * factor), side - 1), min(round(y * factor), side - 1)] for x, y in points]
    (target / "points.json").write_text(json.dumps({"points": scaled}))
    return target


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "comfyui": os.environ.get("COMFYUI_PATH") or None, "host": platform.node()}
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info["device"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def overrides_for(workflow: Path, table: dict) -> list[str]:
    """The runner's ``--set`` arguments of ``table`` for the node types ``workflow`` holds (others would be errors)."""
    nodes = json.loads(workflow.read_text()).get("nodes", [])
    kinds = {node.get("type") for node in nodes}
    args = []
    for kind, values in table.items():
        if kind in kinds:
            for name, value in values.items():
                args += ["--set", f"{kind}.{name}={json.dumps(value)}"]
    return args


def bench_rows(path: Path) -> list[dict]:
    """``{"model", "stage": "resolutions/<side>/stages/<name>", "median_ms", "peak_gib"}`` per stage of the benchmark
    JSON (:func:`benchmarks.bench.run`'s report; ``model`` its family, ``sd15`` in reports from before SDXL); empty
    when the benchmark wrote none."""
    try:
        report = json.loads(path.read_text())
        resolutions = report["resolutions"]
    except (OSError, ValueError, KeyError):
        return []
    family = report.get("model_family", "sd15")
    return [
        {"model": family, "stage": f"resolutions/{side}/stages/{name}", "median_ms": stage["median_ms"],
         "peak_gib": None if stage.get("peak_mib") is None else stage["peak_mib"] / 1024}
        for side, result in resolutions.items() for name, stage in result["stages"].items()
    ]


CAPTURE_LOG_MARKS = ("could not be captured", "differed from eager", "passes run eagerly", "to capture a UNet pass")
"""What :mod:`nodes.comfy_capture` and :mod:`dragkit.capture` log when a pass is not captured."""


def capture_notes(bench_json: Path, logs: Path) -> list[str]:
    """Markdown bullets on captured UNet passes: the benchmark's counts and captured/eager ratios per resolution, and
    every distinct capture fallback a step's log reports."""
    from benchmarks.bench import CAPTURE_PAIRS, capture_line

    notes = []
    try:
        report = json.loads(bench_json.read_text())
    except (OSError, ValueError):
        report = {}
    for side, result in report.get("resolutions", {}).items():
        family = report.get("model_family", "sd15")
        notes += [f"- {family} {side}²: benchmark stage {name} did not complete: {why}"
                  for name, why in (result.get("failures") or {}).items()]
        if result.get("capture"):
            notes.append(f"- {family} {side}²: {capture_line(result['capture'])}")
        for ours, ratio in (result.get("capture_ratios") or {}).items():
            notes.append(f"- {family} {side}²: {ours} ÷ {CAPTURE_PAIRS[ours]} = {ratio:.2f}×")
    seen = set()
    for log in sorted(logs.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if "DragKit" in line and any(mark in line for mark in CAPTURE_LOG_MARKS):
                message = line[line.index("DragKit"):].strip()
                if (log.stem, message) not in seen:
                    seen.add((log.stem, message))
                    notes.append(f"- {log.stem}: {message}")
    return notes


def goal_tables(rows: list[dict], cuda: bool) -> list[str]:
    """Markdown: for each model family among ``rows``, a table of its :data:`benchmarks.goals.GOALS` (at the goals'
    side) judged on the rows of that family and side; judged only on a CUDA run."""
    from benchmarks import goals

    lines = []
    for family, side in goals.GOALS:
        if not any(row["model"] == family for row in rows):
            continue
        measured = {row["stage"].split("/")[-1]: row for row in rows
                    if row["model"] == family and row["stage"].startswith(f"resolutions/{side}/")}
        lines += ["", f"Goals: {family} at {side}² (fp16, one H100)", ""]
        lines += goals.markdown(goals.judge(family, side, measured, cuda), family, side)
    return lines


def write_summary(report: Report, out: Path) -> None:
    models = "SDXL at 1024²" if report.sdxl else "SD1.5, and SDXL for its workflows"
    title = "tiny models, CPU pipeline check" if report.tiny else f"real-size {models}, random weights"
    lines = [f"# GPU check ({title})", ""]
    lines += [f"- {key}: {value}" for key, value in report.machine.items()]
    lines += ["", "| step | status | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.detail.replace('|', '/')} |" for s in report.steps]
    if report.benchmark:
        lines += ["", "| benchmark stage | median ms | peak GiB |", "|---|---|---|"]
        for row in report.benchmark:
            peak = "" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
            lines.append(f"| {row['model']} {row['stage']} | {row['median_ms']:.1f} | {peak} |")
        lines += goal_tables(report.benchmark, bool(report.machine.get("cuda")))
    if report.capture:
        lines += ["", "Captured UNet passes (CUDA graphs; first replays checked against eager) and benchmark stages "
                      "that did not complete", ""] + report.capture
    lines += ["", f"**{'PASSED' if report.passed else 'FAILED'}**", ""]
    (out / "summary.md").write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps(asdict(report), indent=2))


def written_path(step: Step, out: Path) -> Path | None:
    """The file a models step printed as its last line (the writers print the path), or None when it failed."""
    if step.status != "passed":
        return None
    lines = [line.strip() for line in (out / step.log).read_text(errors="replace").splitlines() if line.strip()]
    return Path(lines[-1]) if lines else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="The default run fits one device call (about 8 min estimated on an H100/H200); run --sdxl in a second "
               "call (about 6 min): SDXL's checkpoint, its workflows at 1024² and its benchmark.")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (a pipeline check; CI runs this)")
    parser.add_argument("--sdxl", action="store_true",
                        help="the SDXL part alone: SDXL checkpoint, *_sdxl workflows at 1024², SDXL benchmark at 1024²")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-check"),
                        help="output folder (default: $OUT, else gpu-check/)")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="scratch folder for the random real-size models (default: a temporary folder)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    report = Report(tiny=args.tiny, sdxl=args.sdxl, machine=machine())
    comfyui = os.environ.get("COMFYUI_PATH")
    print(f"GPU check -> {out}", file=sys.stderr)

    def record(step: Step) -> Step:
        report.steps.append(step)
        write_summary(report, out)
        return step

    workflows = sorted((REPO / "workflows").glob("*.json"))
    sdxl_workflows = [w for w in workflows if w.stem.endswith("_sdxl")]
    device = "cuda" if report.machine["cuda"] else "cpu"
    scratch = (args.models_dir or Path(tempfile.mkdtemp(prefix="dragkit-gpu-check-"))) if comfyui and not args.tiny else None
    table = TINY if args.tiny else QUICK
    sample = scaled_sample(SAMPLE, out / "sample", TINY_SIDE) if args.tiny else SAMPLE

    def run_workflows(selected: list[Path], model_args: list[str] | None, sample: Path) -> None:
        """Each workflow through the runner with ``model_args`` (None: its models step failed; []: the runner's tiny)."""
        for workflow in selected:
            name = f"workflow {workflow.stem}"
            if not comfyui:
                record(Step(name, "skipped", detail="COMFYUI_PATH is not set (the workflows run in ComfyUI)"))
            elif model_args is None:
                record(Step(name, "skipped", detail="no checkpoint: its models step failed"))
            else:
                command = [python, "-m", "tools.run_workflow", str(workflow.relative_to(REPO)), "--sample", str(sample),
                           "--out", str(out / "workflows" / workflow.stem), "--timeout", "600",
                           *model_args, *overrides_for(workflow, table)]
                record(run_logged(name.replace(" ", "_"), command, logs, 900))

    if not args.sdxl:
        tests = ["tests/test_cuda.py", "tests/test_gpu_hazards.py", "tests/test_capture.py"]
        tests += ["tests/host/test_gpu_path_host.py"] if comfyui else []
        record(run_logged("tests", [python, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider"], logs, 600))
        sd15_args: list[str] | None = []
        if scratch:
            step = record(run_logged("models", [python, "-m", "tools.sd15_random", "--out", str(scratch), "--device",
                                                device], logs, 600))
            from tools.sd15_random import checkpoint_name, controlnet_name
            import torch

            sd15_args = ["--checkpoint", str(scratch / checkpoint_name(0, torch.float16)),
                         "--controlnet", str(scratch / controlnet_name(0, torch.float16))] if step.status == "passed" else None
        run_workflows([w for w in workflows if w not in sdxl_workflows], sd15_args, sample)

    bench_json = out / ("bench_sdxl.json" if args.sdxl else "bench.json")
    bench = [python, "-m", "benchmarks.bench", "--json", str(bench_json)] + (["--model", "sdxl"] if args.sdxl else [])
    bench += ["--tiny"] if args.tiny else ["--repeats", "5", "--warmup", "2"]
    name = "benchmark_sdxl" if args.sdxl else "benchmark"
    if args.sdxl and not comfyui:
        record(Step(name, "skipped", detail="COMFYUI_PATH is not set (SDXL is benchmarked through the nodes)"))
    else:
        step = run_logged(name, bench, logs, 900)
        report.benchmark = bench_rows(bench_json)
        report.capture = capture_notes(bench_json, logs)
        record(step)

    sdxl_args: list[str] | None = []
    if scratch and sdxl_workflows:
        command = [python, "-m", "tools.sdxl_random", "--out", str(scratch), "--device", device]
        checkpoint = written_path(record(run_logged("models_sdxl", command, logs, 600)), out)
        sdxl_args = ["--checkpoint", str(checkpoint)] if checkpoint else None
    sdxl_sample = scaled_sample(SAMPLE, out / "sample_sdxl", SDXL_SIDE) if args.sdxl and not args.tiny else sample
    run_workflows(sdxl_workflows, sdxl_args, sdxl_sample)
    report.capture = capture_notes(bench_json, logs)
    write_summary(report, out)
    print((out / "summary.md").read_text())
    return 0 if report.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
