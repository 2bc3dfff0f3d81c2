"""One command that proves the GPU path inside one device call: key numbers first, then the workflows.

    bash scripts/gpu_check.sh --budget 540                 # CUDA machine: as much as 540 s allow, most important first
    bash scripts/gpu_check.sh --budget 540 --only workflows # a second call: what the first one had no time for
    bash scripts/gpu_check.sh --sdxl --budget 540          # SDXL at 1024²: benchmark, then the *_sdxl workflows
    bash scripts/gpu_check.sh --tiny                       # the same steps on the tiny models on a CPU (CI)

Steps, in this order (:func:`plan`; docs/gpu-check.md says what each reports):

1. ``tests``: ``tests/test_cuda.py`` and ``tests/test_capture.py``.
2. ``bench [default]``: :mod:`benchmarks.bench` for FastDrag and DragDiffusion,
   every goal stage with captured UNet passes off and on, 3 repeats (medians),
   under ``PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync`` (what ComfyUI's
   ``main.py`` sets); its JSON (``OUT/bench.json``) is rewritten after every
   stage.
3. ``capture [default, cudaMallocAsync]`` and ``capture [default, native]``:
   :mod:`tools.capture_check` (captured against plain latents for FastDrag
   and DragDiffusion, capture counts, refusals, free memory after an unload),
   each allocator in its own process. The first is ComfyUI's default start
   (its allocator, its offload streams: two on NVIDIA from 0.33 on) and must
   show motion supervision's passes captured (``--expect-captures``); so must
   ``capture [default, cudaMallocAsync, --disable-async-offload]``, the same
   with no offload streams (hosts with that flag, 0.33+). On a CPU
   (``--tiny``) these three skip: they need CUDA.
4. ``inpaint``: ``python -m benchmarks.inpaint`` (warp and warp+inpaint
   stages), when that module exists; ``flux``: ``python -m benchmarks.flux``
   (FastDrag on FLUX and DragFlow at 1024², bf16 and fp8 random weights, model
   calls per stage), when that module exists and a host is given.
5. steps 2–3 again with ``--disable-dynamic-vram`` (``[no-dynamic-vram]``),
   where the host has that flag (ComfyUI 0.33.0; the default there is
   Dynamic VRAM on NVIDIA).
6. ``models``, then every SD1.5 workflow; ``models_sdxl``, then every
   ``*_sdxl`` workflow (:mod:`dragrun.run_workflow`, shortened loops); then the
   workflows again under ``--disable-dynamic-vram``.

In-process steps start ComfyUI in the VRAM mode through :mod:`tools.comfy_vram`;
workflows pass ``--disable-dynamic-vram`` to ComfyUI's ``main.py``.

**Budget** (``--budget SECONDS``, counted from ``DRAGKIT_GPU_CHECK_T0``, which
``scripts/gpu_check.sh`` sets when it starts, so wheel installs count): a
step whose estimate (:data:`ESTIMATES`) does not fit in what is left is
skipped with the reason, and later, smaller steps still run; a running step
is stopped when the budget is spent. ``--only`` picks step groups,
``--vram`` the VRAM modes.

**Output**: one stdout line per finished step (:func:`step_line`: name,
ok/FAIL/skip, seconds, its key number), then one closing line. ``OUT`` (default
``$OUT``) gets at most :data:`MAX_OUT_FILES` files, rewritten after every step:
``summary.md``, ``summary.json``, the benchmark JSONs, ``capture.json``,
``inpaint.json`` and ``logs.tar.gz``; everything bulky (models, workflow images, logs) stays in
``--bulk`` (a temporary folder by default), outside ``OUT``. Exit status 0 when
no step failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

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

VRAM_MODES = ("default", "no-dynamic-vram")
"""The host's VRAM modes a run covers (:mod:`tools.comfy_vram`): as started plainly, and ``--disable-dynamic-vram``."""

ASYNC_ALLOCATOR = "backend:cudaMallocAsync"
"""``PYTORCH_CUDA_ALLOC_CONF`` as ComfyUI's ``main.py`` sets it for CUDA builds of torch (``cuda_malloc.py``)."""

ALLOCATORS = {"cudaMallocAsync": ASYNC_ALLOCATOR, "native": None}

GROUPS = ("tests", "bench", "capture", "inpaint", "flux", "workflows")
"""Step groups ``--only`` picks from."""

ESTIMATES = {
    "gpu": {"tests": 90, "bench": 240, "bench_sdxl": 300, "capture": 75, "inpaint": 120, "flux": 240, "models": 75,
            "models_sdxl": 100, "workflow": 35, "workflow_sdxl": 60},
    "cpu": {"tests": 240, "bench": 200, "bench_sdxl": 300, "capture": 180, "inpaint": 120, "flux": 60, "models": 0,
            "models_sdxl": 0, "workflow": 60, "workflow_sdxl": 90},
}
"""Seconds a step is expected to take: ``gpu`` on one H100/H200 (estimated from the 512² measurements in
docs/gpu-check.md; the models steps include their first workflow, so they start only when one can follow), ``cpu``
for ``--tiny`` on two shared cores (measured). A step starts only when its estimate fits in the budget left."""

CAP = {"gpu": 540, "cpu": 900}
"""Longest any one step may run (seconds), budget or not."""

RESERVE = 10
"""Seconds of the budget kept for the last summary and the logs tarball."""

MAX_OUT_FILES = 8
"""What the device tool copies back from ``$OUT``."""

SKIP_NOTE = "not run"


@dataclass
class Step:
    """One step's outcome: ``status`` is ``passed``, ``failed`` or ``skipped``; ``key`` its key number."""

    name: str
    status: str = "skipped"
    seconds: float = 0.0
    detail: str = ""
    key: str = ""
    log: str = ""
    group: str = ""
    vram: str = "default"


@dataclass
class Planned:
    """A step to run: ``prepare()`` gives its command, or a string saying why it cannot run now."""

    name: str
    group: str
    estimate: float
    prepare: Callable[[], list[str] | str]
    env: dict | None = None
    key: Callable[[Step], str] = lambda step: ""
    vram: str = "default"


@dataclass
class Report:
    tiny: bool
    sdxl: bool = False
    budget: float | None = None
    machine: dict = field(default_factory=dict)
    host: dict = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def passed(self) -> bool:
        return all(step.status != "failed" for step in self.steps)


class Budget:
    """Seconds left of ``total`` (None: no limit) since ``start`` on ``clock`` (wall-clock seconds)."""

    def __init__(self, total: float | None, start: float, clock: Callable[[], float] = time.time) -> None:
        self.total, self.start, self.clock = total, start, clock

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float | None:
        return None if self.total is None else self.total - RESERVE - self.elapsed()

    def refusal(self, estimate: float) -> str | None:
        """Why a step estimated at ``estimate`` seconds may not start now, or None."""
        left = self.left()
        if left is None or estimate <= left:
            return None
        return f"needs ~{estimate:.0f} s, {max(left, 0):.0f} s left of the {self.total:.0f} s budget"

    def timeout(self, cap: float) -> float:
        left = self.left()
        return cap if left is None else max(1.0, min(cap, left))


def step_line(step: Step) -> str:
    """The one stdout line of a finished step: name, ok/FAIL/skip, seconds, its key number (or why it was skipped)."""
    word = {"passed": "ok", "failed": "FAIL", "skipped": "skip"}[step.status]
    said = step.key if step.status == "passed" and step.key else (step.key or step.detail)
    if step.status == "failed" and step.key and step.detail:
        said = f"{step.key}; {step.detail}"
    return f"{step.name:<44} {word:<4} {step.seconds:6.1f} s  {said}".rstrip()


def run_logged(name: str, command: list[str], logs: Path, timeout: float, env: dict | None = None) -> Step:
    """Run ``command`` from the repository root with a time limit; output into ``logs/<file name>.log``.

    The command runs in a process group of its own, and the whole group is killed at the time limit (a workflow's
    ComfyUI server would otherwise live on, holding GPU memory, into the next step).
    """
    log = logs / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name).strip('_')}.log"
    start = time.monotonic()
    with open(log, "w") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        process = subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:  # at the time limit, when the check itself is stopped, and any straggler of a finished step
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
    seconds = time.monotonic() - start
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip() and not line.startswith("!!")]
    tail = lines[-1:] or [""]
    if rc is None:
        return Step(name, "failed", seconds, f"stopped after {timeout:.0f} s", log=log.name)
    return Step(name, "passed" if rc == 0 else "failed", seconds, f"exit {rc}: {tail[0][:300]}", log=log.name)


class Stopped(Exception):
    """The check got SIGTERM or SIGINT (the device call's time limit, say): the running step is stopped and
    recorded, the summary written."""


def _stop(signum, frame) -> None:
    raise Stopped(signal.Signals(signum).name)


def execute(planned: list[Planned], budget: Budget, runner: Callable[[Planned, list[str], float], Step],
            record: Callable[[Step], None], cap: float) -> None:
    """Run ``planned`` in order: a step whose estimate does not fit the budget left, or that cannot run (its
    ``prepare`` says why), is recorded as skipped with the reason; the others run through
    ``runner(step, command, timeout)``, stopped when the budget is spent. ``record`` gets every step in order."""
    for item in planned:
        why = budget.refusal(item.estimate)
        prepared = item.prepare() if why is None else why
        if isinstance(prepared, str):
            record(Step(item.name, "skipped", detail=prepared, group=item.group, vram=item.vram))
            continue
        try:
            step = runner(item, prepared, budget.timeout(cap))
        except Stopped as stop:
            record(Step(item.name, "failed", budget.elapsed(), f"stopped by {stop}", group=item.group, vram=item.vram))
            raise
        step.group, step.vram = item.group, item.vram
        if step.status == "passed" or step.log:
            try:
                step.key = item.key(step)
            except (OSError, ValueError, KeyError, TypeError) as error:
                step.key = f"(no key number: {type(error).__name__})"
        record(step)


# -- key numbers -----------------------------------------------------------------------------------------------------


def pytest_key(log: Path) -> str:
    """pytest's closing counts (``12 passed, 3 skipped in 40.1s``) from a log."""
    found = [line.strip(" =") for line in log.read_text(errors="replace").splitlines()
             if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    return found[-1] if found else ""


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"


def bench_key(path: Path) -> str:
    """The benchmark's headline: FastDrag re-edit and DragDiffusion edit medians with capture off / on."""
    report = json.loads(path.read_text())
    parts = []
    for side, result in report["resolutions"].items():
        stages = result["stages"]
        for stage, label in (("fastdrag_re_edit", "FastDrag re-edit"), ("dragdiffusion_edit", "DragDiffusion edit")):
            if stage in stages:
                on = stages.get(stage + "_captured", {}).get("median_ms")
                parts.append(f"{label} {_ms(stages[stage]['median_ms'])} off / {_ms(on)} on")
        parts += [f"{name} did not complete" for name in result.get("failures") or {}]
        missed = sorted({f"{row['stage']} ({row['capture']})" for row in result.get("goals", []) if row["met"] is False})
        parts += [f"goals missed: {', '.join(missed)}"] if missed else []
    return "; ".join(parts) + ("" if report.get("complete") else " (incomplete)")


def capture_key(path: Path) -> str:
    """The capture check's headline: each method's difference, captures and refusals, memory after the unload."""
    report = json.loads(path.read_text())
    parts = [f"{name} Δ {result['difference']:.1e}" for name, result in report["methods"].items()]
    counts = capture_totals(report)
    parts.append(f"{counts['captures']} captured, {counts['replays']} replays, {counts['rejected']} refused")
    if "motion_supervision_captures" in report:
        parts.append(f"motion supervision {report['motion_supervision_captures']} captured with "
                     f"{report['offload_streams']} offload streams")
    memory = report["memory_after_unload"]
    if "comfy_free_gib" in memory:
        parts.append(f"free after unload: ComfyUI {memory['comfy_free_gib']:.2f} / driver {memory['driver_free_gib']:.2f} GiB")
    return ", ".join(parts)


def capture_totals(report: dict) -> dict:
    """Captures, refusals and replays of a capture check, sampling and gradient passes together (the counters of
    ``nodes.comfy_capture.report`` run on over both methods, so the last method's are the totals)."""
    last = list(report["methods"].values())[-1]["capture"]
    return {name: last["passes"][name] + last["gradient"][name] for name in ("captures", "rejected", "replays")}


def last_line_key(step: Step, logs: Path) -> str:
    """The last line of a step's log, the runner's ``!!`` banners left out."""
    lines = [line.strip() for line in (logs / step.log).read_text(errors="replace").splitlines()
             if line.strip() and not line.startswith("!!")]
    return lines[-1][:200] if lines else ""


def workflow_key(step: Step, logs: Path) -> str:
    """A workflow's time in ComfyUI and the files the runner wrote (else its last line)."""
    text = (logs / step.log).read_text(errors="replace")
    ran = re.findall(r"the workflow ran in ([\d.]+ s)", text)
    wrote = len(re.findall(r"(?m)^wrote ", text))
    return f"ran in {ran[-1]}, {wrote} files written" if ran else last_line_key(step, logs)


# -- the pieces steps need -------------------------------------------------------------------------------------------


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
            "host": platform.node()}
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info["device"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def host_info(comfyui: str | None, cuda: bool) -> dict:
    """The ComfyUI host: path, version, whether it has Dynamic VRAM and ``--disable-dynamic-vram``."""
    if not comfyui:
        return {"comfyui": None}
    from dragrun.comfy_host import comfyui_version
    from tools.comfy_vram import host_flags

    flags = host_flags(Path(comfyui))
    default = ("Dynamic VRAM where comfy-aimdo and an NVIDIA GPU are present" if flags["dynamic_vram"] and cuda else
               "no Dynamic VRAM (a CPU run)" if flags["dynamic_vram"] else "no Dynamic VRAM in this host")
    return {"comfyui": comfyui, "version": comfyui_version(Path(comfyui)), **flags, "default_vram": default}


FAMILIES = ("sd15", "tiny", "sdxl")
"""Workflow families in run order (:func:`workflow_family`)."""


def workflow_family(workflow: Path) -> str:
    """``sd15`` or ``sdxl`` for a workflow that loads the SD1.5 / SDXL checkpoint placeholder (a real-size run gives
    it random real-size models), else ``tiny``: its models (inpainting checkpoints, FLUX Fill, ...) have no
    real-size random stand-in here, so it runs on the runner's tiny ones (on the GPU in a CUDA run)."""
    from tools.make_workflows import CHECKPOINT, SDXL_CHECKPOINT

    nodes = json.loads(workflow.read_text()).get("nodes", [])
    names = {node["widgets_values"][0] for node in nodes if node.get("type") == "CheckpointLoaderSimple"
             and isinstance(node.get("widgets_values"), list) and node["widgets_values"]}
    if names == {SDXL_CHECKPOINT}:
        return "sdxl"
    if names == {CHECKPOINT}:
        return "sd15"
    return "tiny"


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


def written_path(step: Step, logs: Path) -> Path | None:
    """The file a models step printed as its last line (the writers print the path), or None when it failed."""
    if step.status != "passed":
        return None
    lines = [line.strip() for line in (logs / step.log).read_text(errors="replace").splitlines() if line.strip()]
    return Path(lines[-1]) if lines else None


def frontend_stand_in(bulk: Path) -> Path:
    """A static folder with a bare ``index.html`` for ComfyUI's ``--front-end-root`` when no frontend package is
    installed (the device carries none; the workflows are queued through the API, no page is opened)."""
    root = bulk / "frontend"
    root.mkdir(parents=True, exist_ok=True)
    (root / "index.html").write_text("<!doctype html><title>DragKit GPU check</title><p>headless run</p>\n")
    return root


def bench_file(sdxl: bool, vram: str) -> str:
    return f"bench{'_sdxl' if sdxl else ''}{'' if vram == 'default' else '_' + vram.replace('-', '_')}.json"


def out_files(out: Path) -> list[Path]:
    """Every file under ``out`` (what the device tool would copy back)."""
    return sorted(p for p in out.rglob("*") if p.is_file())


# -- the run ---------------------------------------------------------------------------------------------------------


class Check:
    """One run of the check: its options, folders, host and plan."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tiny, self.sdxl = args.tiny, args.sdxl
        self.out = args.out.resolve()
        self.bulk = (args.bulk or Path(tempfile.mkdtemp(prefix="dragkit-gpu-check-"))).resolve()
        if self.bulk == self.out or self.out in self.bulk.parents:
            raise SystemExit(f"--bulk {self.bulk} must be outside --out {self.out} (only {MAX_OUT_FILES} files return)")
        self.logs = self.bulk / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.python = sys.executable
        self.comfyui = os.environ.get("COMFYUI_PATH") or None
        self.report = Report(tiny=args.tiny, sdxl=args.sdxl, budget=args.budget, machine=machine())
        self.cuda = bool(self.report.machine["cuda"]) and not self.tiny
        self.report.host = host_info(self.comfyui, self.cuda)
        self.kind = "gpu" if self.cuda else "cpu"
        self.models: dict[str, list[str] | None] = {}
        self.env = dict(os.environ)
        if self.comfyui and not importlib.util.find_spec("comfyui_frontend_package") and \
                not self.env.get("DRAGKIT_FRONTEND_ROOT"):
            self.env["DRAGKIT_FRONTEND_ROOT"] = str(frontend_stand_in(self.bulk))

    # -- which steps -------------------------------------------------------------------------------------------------

    def vram_modes(self) -> list[tuple[str, str | None]]:
        """``(mode, None)`` for each VRAM mode to run, or ``(mode, why not)``."""
        modes = []
        for mode in VRAM_MODES:
            if mode not in self.args.vram:
                continue
            if mode == "default":
                modes.append((mode, None))
            elif not self.comfyui:
                modes.append((mode, "COMFYUI_PATH is not set (VRAM modes are the host's)"))
            elif not self.report.host.get("disable_flag"):
                modes.append((mode, f"ComfyUI {self.report.host.get('version')} has no --disable-dynamic-vram"))
            elif not self.cuda:
                modes.append((mode, "a CPU run: ComfyUI runs --cpu, without Dynamic VRAM in either mode"))
            else:
                modes.append((mode, None))
        return modes

    def estimate(self, what: str) -> float:
        return ESTIMATES[self.kind][what]

    def plan(self) -> list[Planned]:
        """The steps in priority order (see the module docstring)."""
        modes = self.vram_modes()
        steps: list[Planned] = []
        if not self.sdxl:
            steps.append(self.tests_step())
        for index, (mode, why) in enumerate(modes):
            steps.append(self.bench_step(mode, why))
            if not self.sdxl:
                steps += [self.capture_step(mode, allocator, why) for allocator in ALLOCATORS]
                if mode == "default":
                    steps.append(self.capture_step(mode, "cudaMallocAsync", why, "--disable-async-offload"))
            if index == 0 and not self.sdxl:
                steps += [self.inpaint_step(), self.flux_step()]
        for mode, why in modes:
            if why:
                steps.append(Planned(f"workflows [{mode}]", "workflows", 0, lambda why=why: why, vram=mode))
                continue
            for family in ("sdxl",) if self.sdxl else FAMILIES:
                steps += self.workflow_steps(family, mode)
        return [step for step in steps if step.group in self.args.only]

    def tests_step(self) -> Planned:
        """The CUDA tests; ``--tiny`` runs ``tests/test_cuda.py`` alone (it skips without CUDA), since the CPU suite
        already runs ``tests/test_capture.py``."""
        files = ["tests/test_cuda.py"] + ([] if self.tiny else ["tests/test_capture.py"])
        command = [self.python, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider"]
        return Planned("tests", "tests", self.estimate("tests"), lambda: command,
                       key=lambda step: pytest_key(self.logs / step.log))

    def in_process(self, mode: str, module: str, flag: str | None = None) -> list[str]:
        """The command that runs ``module`` in ``mode`` (through :mod:`tools.comfy_vram`, with the host start-up
        ``flag`` if given, when there is a host)."""
        if self.comfyui:
            return [self.python, "-m", "tools.comfy_vram", mode, *([flag] if flag else []), module]
        return [self.python, "-m", module]

    def bench_step(self, mode: str, why: str | None) -> Planned:
        path = self.out / bench_file(self.sdxl, mode)
        command = self.in_process(mode, "benchmarks.bench") + ["--json", str(path), "--methods",
                                                                 "fastdrag,dragdiffusion"]
        if self.sdxl:
            command += ["--model", "sdxl"]
        command += ["--tiny", "--repeats", "1", "--warmup", "0"] if self.tiny else \
            ["--repeats", "3", "--warmup", "1", "--slow-repeats", "3"]
        env = dict(self.env, PYTORCH_CUDA_ALLOC_CONF=ASYNC_ALLOCATOR) if self.cuda else self.env

        def prepare():
            if why:
                return why
            if self.sdxl and not self.comfyui:
                return "COMFYUI_PATH is not set (SDXL is benchmarked through the nodes)"
            return command

        name = f"bench{'_sdxl' if self.sdxl else ''} [{mode}]"
        return Planned(name, "bench", self.estimate("bench_sdxl" if self.sdxl else "bench"), prepare, env,
                       key=lambda step: bench_key(path), vram=mode)

    def capture_step(self, mode: str, allocator: str, why: str | None, flag: str | None = None) -> Planned:
        """The capture check in ``mode`` under ``allocator``, with the host start-up ``flag`` (of
        :data:`tools.comfy_vram.HOST_FLAGS`) if given. The host's default start (``default`` with ComfyUI's
        allocator) and any ``flag`` run must show motion supervision's passes captured (``--expect-captures``)."""
        label = "_".join(filter(None, (mode, allocator, flag and flag.strip("-"))))
        path = self.bulk / f"capture_{label}.json"
        expect = mode == "default" and ALLOCATORS[allocator] == ASYNC_ALLOCATOR
        command = self.in_process(mode, "tools.capture_check", flag) + ["--json", str(path)]
        command += (["--tiny"] if self.tiny else []) + (["--expect-captures"] if expect else [])
        env = {k: v for k, v in self.env.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
        if ALLOCATORS[allocator]:
            env["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATORS[allocator]

        def prepare():
            if why:
                return why
            if not self.comfyui:
                return "COMFYUI_PATH is not set (the check runs the pack's nodes in ComfyUI)"
            if flag and not self.report.host.get("async_offload_flag"):
                return f"ComfyUI {self.report.host.get('version')} has no {flag}"
            if expect and not self.cuda:
                return "no CUDA: captured passes are CUDA graphs, and ComfyUI's allocator and offload streams are CUDA's"
            if ALLOCATORS[allocator] and not self.cuda:
                return "no CUDA: the allocator setting does not apply"
            path.unlink(missing_ok=True)
            return command

        name = f"capture [{mode}, {allocator}{', ' + flag if flag else ''}]"
        return Planned(name, "capture", self.estimate("capture"), prepare, env, key=lambda step: capture_key(path),
                       vram=mode)

    def inpaint_step(self) -> Planned:
        """Warp and warp+inpaint stages: ``python -m benchmarks.inpaint`` (written beside this check; its last line
        is its summary), in the host's default VRAM mode, ``--tiny`` on a CPU, its JSON into ``OUT/inpaint.json``."""
        command = self.in_process("default", "benchmarks.inpaint") + (["--tiny"] if self.tiny else [])
        command += ["--out", str(self.out / "inpaint.json")]

        def prepare():
            if not (REPO / "benchmarks" / "inpaint.py").is_file():
                return "benchmarks/inpaint.py is not in this checkout"
            return command

        env = dict(self.env, PYTORCH_CUDA_ALLOC_CONF=ASYNC_ALLOCATOR) if self.cuda else self.env
        return Planned("inpaint", "inpaint", self.estimate("inpaint"), prepare, env,
                       key=lambda step: last_line_key(step, self.logs))

    def flux_step(self) -> Planned:
        """The FLUX chains (``python -m benchmarks.flux``: 1024² real size on CUDA, ``--tiny`` on a CPU), in the host's
        default VRAM mode, its JSON into ``OUT/flux.json``, its last line (the summary) as the key."""
        command = self.in_process("default", "benchmarks.flux") + (["--tiny"] if self.tiny else [])
        command += ["--out", str(self.out / "flux.json")]

        def prepare():
            if not (REPO / "benchmarks" / "flux.py").is_file():
                return "benchmarks/flux.py is not in this checkout"
            if not self.comfyui:
                return "COMFYUI_PATH is not set (the FLUX chains run the pack's nodes in ComfyUI)"
            return command

        env = dict(self.env, PYTORCH_CUDA_ALLOC_CONF=ASYNC_ALLOCATOR) if self.cuda else self.env
        return Planned("flux", "flux", self.estimate("flux"), prepare, env, key=lambda step: last_line_key(step, self.logs))

    def workflow_steps(self, family: str, mode: str) -> list[Planned]:
        """The models step of ``family`` (real-size runs of ``sd15`` / ``sdxl``, first mode only) and its
        workflows in ``mode``."""
        chosen = [w for w in sorted((REPO / "workflows").glob("*.json")) if workflow_family(w) == family]
        if not chosen:
            return []
        steps = []
        models_name = "models" if family == "sd15" else "models_sdxl"
        if self.comfyui and not self.tiny and family != "tiny" and mode == self.args.vram[0]:
            steps.append(Planned(models_name, "workflows", self.estimate(models_name),
                                 lambda: self.models_command(family), key=lambda step: last_line_key(step, self.logs)))
        for workflow in chosen:
            steps.append(Planned(f"workflow {workflow.stem} [{mode}]", "workflows",
                                 self.estimate("workflow_sdxl" if family == "sdxl" else "workflow"),
                                 lambda workflow=workflow: self.workflow_command(workflow, family, mode),
                                 self.env, key=lambda step: workflow_key(step, self.logs), vram=mode))
        return steps

    def models_command(self, family: str) -> list[str]:
        scratch = self.args.models_dir or self.bulk / "models"
        module = "tools.sd15_random" if family == "sd15" else "tools.sdxl_random"
        self.models[family] = None
        return [self.python, "-m", module, "--out", str(scratch), "--device", "cuda" if self.cuda else "cpu"]

    def model_args(self, family: str) -> list[str] | str:
        """The runner's model options for ``family``: [] for the runner's tiny models, or why there are none."""
        if self.tiny or family == "tiny":
            return []
        files = self.models.get(family)
        if files is None:
            return "no checkpoint: its models step did not run or failed"
        return files

    def workflow_command(self, workflow: Path, family: str, mode: str) -> list[str] | str:
        if not self.comfyui:
            return "COMFYUI_PATH is not set (the workflows run in ComfyUI)"
        from dragrun.refusals import NOT_FOR_THE_RUNNER

        if workflow.name in NOT_FOR_THE_RUNNER:
            return f"the runner refuses it: {NOT_FOR_THE_RUNNER[workflow.name]}"
        models = self.model_args(family)
        if isinstance(models, str):
            return models
        if self.tiny or family == "tiny":
            sample = scaled_sample(SAMPLE, self.bulk / "sample", TINY_SIDE)
        elif family == "sdxl" and self.sdxl:
            sample = scaled_sample(SAMPLE, self.bulk / "sample_sdxl", SDXL_SIDE)
        else:
            sample = SAMPLE
        command = [self.python, "-m", "dragrun.run_workflow", str(workflow.relative_to(REPO)), "--sample", str(sample),
                   "--out", str(self.bulk / "workflows" / mode / workflow.stem), "--timeout", "600",
                   *models, *overrides_for(workflow, TINY if self.tiny or family == "tiny" else QUICK)]
        if mode == "no-dynamic-vram":
            command += ["--comfy-arg=--disable-dynamic-vram"]
        return command

    def models_made(self, step: Step) -> None:
        """After a models step: the runner's options for its files (``--checkpoint``, and for SD1.5 the ControlNet
        and the tiny upscale model, which spandrel loads like any ESRGAN-family file)."""
        if step.status != "passed":
            return
        if step.name == "models":
            import torch

            from tools.sd15_random import checkpoint_name, controlnet_name
            from tools.tiny_models import tiny_upscaler_path

            scratch = self.args.models_dir or self.bulk / "models"
            self.models["sd15"] = ["--checkpoint", str(scratch / checkpoint_name(0, torch.float16)),
                                   "--controlnet", str(scratch / controlnet_name(0, torch.float16)),
                                   "--upscale-model", str(tiny_upscaler_path())]
        elif step.name == "models_sdxl":
            checkpoint = written_path(step, self.logs)
            self.models["sdxl"] = ["--checkpoint", str(checkpoint)] if checkpoint else None

    # -- running -----------------------------------------------------------------------------------------------------

    def run_step(self, item: Planned, command: list[str], timeout: float) -> Step:
        step = run_logged(item.name, command, self.logs, timeout, item.env)
        self.models_made(step)
        return step

    def record(self, step: Step) -> None:
        self.report.steps.append(step)
        self.report.elapsed = self.budget.elapsed()
        print(step_line(step), flush=True)
        self.write()

    def write(self) -> None:
        """Rewrite ``summary.md``, ``summary.json``, ``capture.json`` and ``logs.tar.gz`` in ``OUT``."""
        captures = {p.stem: json.loads(p.read_text()) for p in sorted(self.bulk.glob("capture_*.json"))}
        if captures:
            (self.out / "capture.json").write_text(json.dumps(captures, indent=2))
        (self.out / "summary.json").write_text(json.dumps(asdict(self.report), indent=2))
        (self.out / "summary.md").write_text(summary_markdown(self.report, self.out, captures))
        with tarfile.open(self.out / "logs.tar.gz.part", "w:gz") as tar:
            tar.add(self.logs, arcname="logs")
        (self.out / "logs.tar.gz.part").replace(self.out / "logs.tar.gz")

    def run(self) -> int:
        start = float(os.environ.get("DRAGKIT_GPU_CHECK_T0") or time.time())
        self.budget = Budget(self.args.budget, start)
        print(f"GPU check -> {self.out} (bulk output in {self.bulk}); host: "
              f"{self.report.host.get('version') or 'none'}; budget: "
              f"{'none' if self.args.budget is None else f'{self.args.budget:.0f} s'}", file=sys.stderr, flush=True)
        previous = {signum: signal.signal(signum, _stop) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            execute(self.plan(), self.budget, self.run_step, self.record, CAP[self.kind])
        except Stopped:
            pass
        finally:  # the caller's handlers back (tests run this in-process)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        self.write()
        counts = {status: sum(s.status == status for s in self.report.steps) for status in ("passed", "failed", "skipped")}
        print(f"{'PASSED' if self.report.passed else 'FAILED'}: {counts['passed']} ok, {counts['failed']} failed, "
              f"{counts['skipped']} skipped in {self.budget.elapsed():.0f} s; {self.out / 'summary.md'}", flush=True)
        return 0 if self.report.passed else 1


# -- summary ---------------------------------------------------------------------------------------------------------


def bench_tables(report: dict) -> list[str]:
    """Markdown of one benchmark JSON: per side the stages with capture off and on, then the goals judged both ways."""
    from benchmarks import goals

    lines = [f"{report.get('backend')} backend, {report.get('device')}, {report.get('dtype')}, allocator "
             f"{report.get('allocator')}, host VRAM {report.get('host_vram') or '–'}"
             + ("" if report.get("complete") else " — **incomplete** (the run stopped during it)")]
    for side, result in report.get("resolutions", {}).items():
        stages = result["stages"]
        lines += ["", f"| {side}² stage | capture off | capture on | on ÷ off | peak GiB off / on |",
                  "|---|---|---|---|---|"]
        for name, stage in stages.items():
            if name.endswith(goals.CAPTURED):
                continue
            twin = stages.get(name + goals.CAPTURED)
            ratio = result.get("capture_ratios", {}).get(name + goals.CAPTURED)
            peaks = [s["peak_mib"] for s in (stage, twin) if s is not None]
            shown = " / ".join("–" if p is None else f"{p / 1024:.2f}" for p in peaks)
            lines.append(f"| {name} | {_ms(stage['median_ms'])} | {_ms(twin['median_ms']) if twin else ''} | "
                         f"{f'{ratio:.2f}×' if ratio else ''} | {shown} |")
        for name, why in (result.get("failures") or {}).items():
            lines += ["", f"Stage {name} did not complete: {why}"]
        if result.get("capture"):
            lines += ["", f"Capture counters: `{json.dumps(result['capture'])}`"]
        if result.get("goals"):
            lines += [""] + goals.markdown(result["goals"], report.get("model_family", "sd15"), int(side))
    return lines


def capture_tables(captures: dict) -> list[str]:
    lines = ["| run | FastDrag Δ | DragDiffusion Δ | captured | refused | replays | ComfyUI / driver free after unload "
             "(GiB) | ok |", "|---|---|---|---|---|---|---|---|"]
    logged = []
    for name, result in captures.items():
        methods, counts = result["methods"], capture_totals(result)
        memory = result["memory_after_unload"]
        free = (f"{memory['comfy_free_gib']:.2f} / {memory['driver_free_gib']:.2f}" if "comfy_free_gib" in memory
                else memory.get("why", ""))
        lines.append(f"| {name} ({result.get('host_vram')}) | {methods['fastdrag']['difference']:.1e} | "
                     f"{methods['dragdiffusion']['difference']:.1e} | {counts['captures']} | "
                     f"{counts['rejected']} | {counts['replays']} | {free} | "
                     f"{'yes' if result['ok'] else 'NO'} |")
        logged += [f"- {name}: {line}" for line in result.get("log", []) if "DragKit:" in line]
    return lines + ([""] + list(dict.fromkeys(logged)) if logged else [])


def resume_commands(report: Report) -> list[str]:
    """Commands that run the steps the budget left out: the numbers (benchmark, capture check, inpaint) first, then
    the workflows, each limited to the VRAM modes that were left out."""
    left = [s for s in report.steps if s.status == "skipped" and "budget" in s.detail]
    commands = []
    for workflows in (False, True):
        part = [s for s in left if (s.group == "workflows") == workflows]
        if part:
            groups = [g for g in GROUPS if any(s.group == g for s in part)]
            modes = [m for m in VRAM_MODES if any(s.vram == m for s in part)]
            commands.append(f"bash scripts/gpu_check.sh{' --sdxl' if report.sdxl else ''} --budget 540 "
                            f"--only {','.join(groups)} --vram {','.join(modes)}")
    return commands


def summary_markdown(report: Report, out: Path, captures: dict) -> str:
    title = ("tiny models, CPU pipeline check" if report.tiny else
             f"real-size {'SDXL at 1024²' if report.sdxl else 'SD1.5'}, random weights")
    lines = [f"# GPU check ({title})", ""]
    lines += [f"- {key}: {value}" for key, value in report.machine.items()]
    host = report.host
    lines.append(f"- ComfyUI: {host.get('version') or 'none'}"
                 + (f" ({host['comfyui']}); default: {host.get('default_vram')}; --disable-dynamic-vram: "
                    f"{'yes' if host.get('disable_flag') else 'not in this host'}" if host.get("comfyui") else ""))
    lines.append(f"- budget: {'none' if report.budget is None else f'{report.budget:.0f} s'}; "
                 f"{report.elapsed:.0f} s used")
    lines += ["", "| step | status | seconds | key number / detail |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {(s.key or s.detail).replace('|', '/')} |"
              for s in report.steps]
    for path in sorted(out.glob("bench*.json")):
        try:
            bench = json.loads(path.read_text())
        except ValueError:
            continue
        lines += ["", f"## Benchmark: {path.name}", ""] + bench_tables(bench)
    if captures:
        lines += ["", "## Captured against plain passes (tools/capture_check.py)", ""] + capture_tables(captures)
    left_out = [s for s in report.steps if s.status == "skipped"]
    if left_out:
        lines += ["", "## Not run", ""] + [f"- {s.name}: {s.detail}" for s in left_out]
        rerun = resume_commands(report)
        if rerun:
            lines += ["", "To run what the budget left out, in further calls:", ""] + [f"    {c}" for c in rerun]
    lines += ["", f"**{'PASSED' if report.passed else 'FAILED'}**", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (a pipeline check; CI runs this)")
    parser.add_argument("--sdxl", action="store_true",
                        help="SDXL at 1024²: its benchmark, then its checkpoint and the *_sdxl workflows")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run (e.g. 540 in a 600 s device call); steps that do not fit are "
                             "skipped with the reason")
    parser.add_argument("--only", type=lambda text: tuple(g.strip() for g in text.split(",") if g.strip()),
                        default=GROUPS, help=f"step groups to run, a comma-separated subset of {','.join(GROUPS)}")
    parser.add_argument("--vram", type=lambda text: tuple(m.strip() for m in text.split(",") if m.strip()),
                        default=VRAM_MODES, help=f"host VRAM modes, a subset of {','.join(VRAM_MODES)}")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-check"),
                        help=f"what comes back, at most {MAX_OUT_FILES} files (default: $OUT, else gpu-check/)")
    parser.add_argument("--bulk", type=Path, default=None,
                        help="models, workflow images and logs (default: a temporary folder), outside --out")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="folder for the random real-size models (default: in --bulk)")
    args = parser.parse_args(argv)
    for name, chosen, known in (("--only", args.only, GROUPS), ("--vram", args.vram, VRAM_MODES)):
        if not chosen or set(chosen) - set(known):
            parser.error(f"{name} takes a comma-separated subset of {','.join(known)}")
    if args.budget is not None and args.budget <= RESERVE:
        parser.error(f"--budget must be more than {RESERVE} s")
    return args


def main(argv: list[str] | None = None) -> int:
    return Check(parse_args(argv)).run()


if __name__ == "__main__":
    raise SystemExit(main())
