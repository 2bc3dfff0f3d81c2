"""The GPU check's plan, budget, output and file limit (tools/gpu_check.py), without running its steps."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from dragrun import run_workflow
from tools import comfy_vram, gpu_check


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def planned(name, estimate, prepare=None, group="bench"):
    return gpu_check.Planned(name, group, estimate, prepare or (lambda: ["run", name]),
                             key=lambda step, name=name: f"key of {name}")


def test_steps_run_in_order_and_a_step_that_does_not_fit_is_skipped_with_the_reason():
    clock = Clock()
    budget = gpu_check.Budget(300, clock.now, clock)
    ran, recorded = [], []

    def runner(item, command, timeout):
        ran.append((item.name, command, timeout))
        clock.now += item.estimate
        return gpu_check.Step(item.name, "passed", item.estimate, log="x.log")

    plan = [planned("a", 100), planned("big", 250), planned("b", 50), planned("cannot", 1, lambda: "no host"),
            planned("c", 200)]
    gpu_check.execute(plan, budget, runner, recorded.append, cap=1000)
    assert [s.name for s in recorded] == ["a", "big", "b", "cannot", "c"], "every step recorded, in plan order"
    assert [name for name, _, _ in ran] == ["a", "b"], "a smaller step after a skipped one still runs"
    assert ran[0][1] == ["run", "a"]
    assert ran[0][2] == pytest.approx(300 - gpu_check.RESERVE), "a step may run until the budget is spent"
    skipped = {s.name: s.detail for s in recorded if s.status == "skipped"}
    assert skipped["big"] == f"needs ~250 s, {300 - gpu_check.RESERVE - 100:.0f} s left of the 300 s budget"
    assert skipped["cannot"] == "no host"
    assert skipped["c"].startswith("needs ~200 s")
    assert recorded[0].key == "key of a" and recorded[0].group == "bench"


def test_without_a_budget_every_step_runs_with_its_cap():
    clock = Clock()
    budget = gpu_check.Budget(None, clock.now, clock)
    timeouts = []
    gpu_check.execute([planned("a", 10**6)], budget,
                      lambda item, command, timeout: timeouts.append(timeout) or gpu_check.Step("a", "passed"),
                      lambda step: None, cap=900)
    assert timeouts == [900]


def test_one_line_per_step_with_name_status_seconds_and_key_number():
    line = gpu_check.step_line(gpu_check.Step("bench [default]", "passed", 61.04, key="FastDrag re-edit 99 ms off"))
    assert line.split()[:4] == ["bench", "[default]", "ok", "61.0"] and line.endswith("FastDrag re-edit 99 ms off")
    failed = gpu_check.step_line(gpu_check.Step("tests", "failed", 3.0, detail="exit 1: boom", key="1 failed"))
    assert " FAIL " in failed and failed.endswith("1 failed; exit 1: boom")
    skipped = gpu_check.step_line(gpu_check.Step("inpaint", detail="benchmarks/inpaint.py is not in this checkout"))
    assert " skip " in skipped and skipped.endswith("not in this checkout") and "\n" not in skipped


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    """``gpu_check.main`` with every step faked: each writes a log; the benchmark and capture steps their JSON."""
    commands = []

    def run_logged(name, command, logs, timeout, env=None):
        commands.append((name, command, env))
        log = logs / f"{len(commands)}.log"
        summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {"steps": []}
        log.write_text(f"$ {' '.join(command)}\n{len(summary['steps'])} steps on disk before me\n")
        if "--json" in command:
            target = Path(command[command.index("--json") + 1])
            target.write_text(json.dumps(BENCH if "benchmarks.bench" in command else CAPTURE))
        return gpu_check.Step(name, "passed", 1.0, "exit 0", log=log.name)

    out, bulk = tmp_path / "out", tmp_path / "bulk"
    monkeypatch.setattr(gpu_check, "run_logged", run_logged)
    monkeypatch.setattr(gpu_check, "machine", lambda: {"cuda": True, "device": "fake GPU"})
    monkeypatch.setattr(gpu_check, "frontend_stand_in", lambda bulk: bulk)

    def main(*extra, comfyui=None):
        if comfyui:
            monkeypatch.setenv("COMFYUI_PATH", str(comfyui))
        else:
            monkeypatch.delenv("COMFYUI_PATH", raising=False)
        handlers = [signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)]
        rc = gpu_check.main(["--out", str(out), "--bulk", str(bulk), *extra])
        assert [signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)] == handlers, \
            "gpu_check.main left its SIGINT/SIGTERM handlers installed"
        return rc, commands

    main.out, main.bulk = out, bulk
    return main


BENCH = {"complete": True, "model_family": "sd15", "backend": "comfyui", "resolutions": {"512": {
    "stages": {"fastdrag_re_edit": {"median_ms": 150.0, "peak_mib": 2048.0},
               "fastdrag_re_edit_captured": {"median_ms": 90.0, "peak_mib": 2560.0}},
    "capture_ratios": {"fastdrag_re_edit_captured": 0.6},
    "goals": [{"stage": "fastdrag_re_edit", "measure": "median_ms", "value": 150.0, "goal": 120.0, "met": False,
               "capture": "off"},
              {"stage": "fastdrag_re_edit", "measure": "median_ms", "value": 90.0, "goal": 120.0, "met": True,
               "capture": "on"}]}}}
COUNTS = {"captures": 3, "replays": 40, "rejected": 1, "max_first_replay_error": 2.5e-4}
CAPTURE = {"host_vram": "dynamic", "ok": True, "log": ["DragKit: UNet passes run eagerly: a test"],
           "methods": {name: {"difference": 1e-5, "ok": True, "capture": {"passes": COUNTS, "gradient": COUNTS}}
                       for name in ("fastdrag", "dragdiffusion")},
           "memory_after_unload": {"comfy_free_gib": 130.0, "driver_free_gib": 129.9, "ok": True}}


def fake_host(tmp_path, disable_flag: bool) -> Path:
    host = tmp_path / "ComfyUI"
    (host / "comfy").mkdir(parents=True)
    (host / "main.py").write_text("")
    (host / "comfyui_version.py").write_text('__version__ = "0.33.0"\n')
    flag = ('parser.add_argument("--disable-dynamic-vram", action="store_true")\n'
            'parser.add_argument("--disable-async-offload", action="store_true")\n') if disable_flag else ""
    (host / "comfy" / "cli_args.py").write_text(flag + ("def enables_dynamic_vram():\n    return True\n" if disable_flag
                                                        else ""))
    return host


def test_the_plan_puts_the_key_numbers_first_and_runs_both_vram_modes(fake_run, tmp_path, capsys):
    rc, commands = fake_run(comfyui=fake_host(tmp_path, disable_flag=True))
    assert rc == 0
    names = [name for name, _, _ in commands]
    first = ["tests", "bench [default]", "capture [default, cudaMallocAsync]", "capture [default, native]",
             "capture [default, cudaMallocAsync, --disable-async-offload]"]
    first += ["inpaint"] if (gpu_check.REPO / "benchmarks" / "inpaint.py").is_file() else []
    assert names[: len(first)] == first
    first_workflow = next(i for i, n in enumerate(names) if n.startswith(("models", "workflow")))
    assert "bench [no-dynamic-vram]" in names[:first_workflow], "both benchmarks before any workflow"
    by_name = {name: (command, env) for name, command, env in commands}
    bench, env = by_name["bench [no-dynamic-vram]"]
    assert bench[1:5] == ["-m", "tools.comfy_vram", "no-dynamic-vram", "benchmarks.bench"]
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == gpu_check.ASYNC_ALLOCATOR, "benchmarked under ComfyUI's allocator"
    assert "--methods" in bench and bench[bench.index("--methods") + 1] == "fastdrag,dragdiffusion"
    assert bench[bench.index("--repeats") + 1] == "3"
    assert by_name["capture [default, cudaMallocAsync]"][1]["PYTORCH_CUDA_ALLOC_CONF"] == gpu_check.ASYNC_ALLOCATOR
    assert "PYTORCH_CUDA_ALLOC_CONF" not in by_name["capture [default, native]"][1]
    default_start, no_streams = (by_name[f"capture [default, cudaMallocAsync{flag}]"][0]
                                 for flag in ("", ", --disable-async-offload"))
    assert default_start[1:5] == ["-m", "tools.comfy_vram", "default", "tools.capture_check"]
    assert no_streams[1:6] == ["-m", "tools.comfy_vram", "default", "--disable-async-offload", "tools.capture_check"]
    assert "--expect-captures" in default_start and "--expect-captures" in no_streams, "captures must happen"
    assert "--expect-captures" not in by_name["capture [default, native]"][0]
    assert by_name["capture [default, cudaMallocAsync, --disable-async-offload]"][1]["PYTORCH_CUDA_ALLOC_CONF"] == \
        gpu_check.ASYNC_ALLOCATOR
    if "inpaint" in by_name:
        inpaint = by_name["inpaint"][0]
        assert inpaint[1:5] == ["-m", "tools.comfy_vram", "default", "benchmarks.inpaint"]
        assert inpaint[-2:] == ["--out", str(fake_run.out.resolve() / "inpaint.json")]
    upscale = by_name["workflow fastdrag_controlnet_upscale [no-dynamic-vram]"][0]
    assert "--comfy-arg=--disable-dynamic-vram" in upscale and "--upscale-model" in upscale and "--controlnet" in upscale
    assert "--comfy-arg=--disable-dynamic-vram" not in by_name["workflow fastdrag_controlnet_upscale [default]"][0]
    assert names.count("models") == 1 and names.count("models_sdxl") == 1
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads((fake_run.out / "summary.json").read_text())
    assert len(lines) == len(summary["steps"]) + 1 and lines[-1].startswith("PASSED:"), "one line per step, one closing"
    assert summary["host"]["version"] == "0.33.0" and summary["host"]["disable_flag"] is True


def test_the_summary_is_on_disk_after_every_step(fake_run, tmp_path):
    fake_run(comfyui=fake_host(tmp_path, disable_flag=True))
    logs = sorted((fake_run.bulk / "logs").glob("*.log"), key=lambda p: int(p.stem))
    before = [int(log.read_text().splitlines()[1].split()[0]) for log in logs]
    assert before == sorted(before) and before[0] == 0 and before[-1] >= len(logs) - 1
    assert all(b >= i for i, b in enumerate(before)), "each step finds every earlier one recorded"


def test_at_most_eight_files_come_back_and_bulk_stays_outside(fake_run, tmp_path):
    fake_run(comfyui=fake_host(tmp_path, disable_flag=True))
    files = gpu_check.out_files(fake_run.out)
    assert len(files) <= gpu_check.MAX_OUT_FILES
    assert {p.name for p in files} == {"summary.md", "summary.json", "bench.json", "bench_no_dynamic_vram.json",
                                       "capture.json", "logs.tar.gz"}, "the fake inpaint step writes no JSON"
    assert all(p.parent == fake_run.out for p in files)
    assert len(json.loads((fake_run.out / "capture.json").read_text())) == 5, "every capture run in one file"
    text = (fake_run.out / "summary.md").read_text()
    assert "| fastdrag_re_edit | 150 ms | 90 ms | 0.60× | 2.00 / 2.50 |" in text
    assert "| fastdrag_re_edit | on | median_ms | 90.00 | ≤ 120 | yes |" in text
    assert "- capture_default_native: DragKit: UNet passes run eagerly: a test" in text
    with pytest.raises(SystemExit, match="outside"):
        gpu_check.main(["--out", str(tmp_path / "o"), "--bulk", str(tmp_path / "o" / "bulk")])


def test_a_host_without_the_flag_runs_the_default_mode_only(fake_run, tmp_path):
    rc, commands = fake_run(comfyui=fake_host(tmp_path, disable_flag=False))
    assert rc == 0 and not any("no-dynamic-vram" in name for name, _, _ in commands)
    skipped = {s["name"]: s["detail"] for s in json.loads((fake_run.out / "summary.json").read_text())["steps"]
               if s["status"] == "skipped"}
    assert skipped["bench [no-dynamic-vram]"] == "ComfyUI 0.33.0 has no --disable-dynamic-vram"
    assert skipped["workflows [no-dynamic-vram]"] == "ComfyUI 0.33.0 has no --disable-dynamic-vram"


def test_the_budget_leaves_the_workflows_for_a_second_call(fake_run, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "ESTIMATES", {"gpu": dict(gpu_check.ESTIMATES["gpu"], workflow=10**4,
                                                             workflow_sdxl=10**4, models=10**4, models_sdxl=10**4)})
    rc, commands = fake_run("--budget", "540", comfyui=fake_host(tmp_path, disable_flag=True))
    assert rc == 0 and not any(name.startswith(("models", "workflow")) for name, _, _ in commands)
    text = (fake_run.out / "summary.md").read_text()
    assert "    bash scripts/gpu_check.sh --budget 540 --only workflows --vram default,no-dynamic-vram" in text
    done = len(commands)
    rc, commands = fake_run("--only", "workflows", "--vram", "default", comfyui=tmp_path / "ComfyUI")
    second = [name for name, _, _ in commands[done:]]
    assert rc == 0 and second[0] == "models" and "workflow fastdrag_controlnet_upscale [default]" in second
    assert all(name.startswith(("models", "workflow")) and "no-dynamic" not in name for name in second)


def test_without_comfyui_the_host_steps_are_skipped_with_the_reason(fake_run):
    rc, commands = fake_run()
    inpaint = ["inpaint"] if (gpu_check.REPO / "benchmarks" / "inpaint.py").is_file() else []
    assert rc == 0 and [name for name, _, _ in commands] == ["tests", "bench [default]"] + inpaint
    assert commands[1][1][1:3] == ["-m", "benchmarks.bench"], "the diffusers path, no host to start"


def test_workflow_families_and_the_check_arguments(repo_root, tmp_path):
    assert gpu_check.workflow_family(repo_root / "workflows" / "fastdrag_controlnet_upscale.json") == "sd15"
    assert gpu_check.workflow_family(repo_root / "workflows" / "fastdrag_sdxl.json") == "sdxl"
    other = tmp_path / "x.json"
    other.write_text(json.dumps({"nodes": [{"type": "CheckpointLoaderSimple", "widgets_values": ["inpaint.ckpt"]}]}))
    assert gpu_check.workflow_family(other) == "tiny"
    for bad in (["--only", "magic"], ["--vram", "huge"], ["--budget", "5"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)


def test_host_flags_and_the_vram_mode_command(tmp_path):
    assert comfy_vram.host_flags(fake_host(tmp_path / "new", True)) == {"dynamic_vram": True, "disable_flag": True,
                                                                        "async_offload_flag": True}
    assert comfy_vram.host_flags(fake_host(tmp_path / "old", False)) == {"dynamic_vram": False, "disable_flag": False,
                                                                         "async_offload_flag": False}
    with pytest.raises(SystemExit, match="usage"):
        comfy_vram.main(["sometimes", "benchmarks.bench"])


def test_the_runner_passes_comfyui_arguments_to_the_server(repo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("COMFYUI_PATH", str(fake_host(tmp_path, disable_flag=True)))
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    args = run_workflow.parse_args([str(repo_root / "workflows" / "fastdrag.json"), "--image", str(image),
                                    "--comfy-arg=--disable-dynamic-vram"])
    models = run_workflow.Models(checkpoint=image, tiny=True, comfy_args=tuple(args.comfy_args))
    assert models.server().extra_args == ["--disable-dynamic-vram"]


def test_key_numbers_read_the_step_outputs(tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps(dict(BENCH, complete=False)))
    key = gpu_check.bench_key(tmp_path / "bench.json")
    assert key == ("FastDrag re-edit 150 ms off / 90 ms on; goals missed: fastdrag_re_edit (off) (incomplete)")
    (tmp_path / "capture.json").write_text(json.dumps(CAPTURE))
    assert gpu_check.capture_key(tmp_path / "capture.json") == (
        "fastdrag Δ 1.0e-05, dragdiffusion Δ 1.0e-05, 6 captured, 80 replays, 2 refused, "
        "free after unload: ComfyUI 130.00 / driver 129.90 GiB")
    (tmp_path / "t.log").write_text("...\n===== 3 passed, 2 skipped in 4.0s =====\n")
    assert gpu_check.pytest_key(tmp_path / "t.log") == "3 passed, 2 skipped in 4.0s"
    banner = "\n" + "!" * 20 + "\n!! No --checkpoint given: the tiny TEST checkpoint\n" + "!" * 20 + "\n"
    (tmp_path / "w.log").write_text("[run] the workflow ran in 12.5 s\nwrote a.png\nwrote b.png\n" + banner)
    assert gpu_check.workflow_key(gpu_check.Step("w", log="w.log"), tmp_path) == "ran in 12.5 s, 2 files written"
    (tmp_path / "x.log").write_text("error: no image\n" + banner)
    assert gpu_check.workflow_key(gpu_check.Step("x", log="x.log"), tmp_path) == "error: no image"


def test_overrides_only_for_the_node_types_a_workflow_holds(repo_root):
    fastdrag = gpu_check.overrides_for(repo_root / "workflows" / "fastdrag.json", gpu_check.TINY)
    assert fastdrag == ["--set", "DragKitDDIMInvert.steps=10"]
    dragdiffusion = gpu_check.overrides_for(repo_root / "workflows" / "dragdiffusion.json", gpu_check.TINY)
    assert "DragKitLoRAFineTune.steps=2" in dragdiffusion and "DragKitMotionSupervisionOptimize.iterations=2" in dragdiffusion


def test_tiny_sample_scales_image_mask_and_points(tmp_path):
    from PIL import Image

    sample = gpu_check.scaled_sample(gpu_check.SAMPLE, tmp_path / "s", 128)
    assert Image.open(sample / "original.jpg").size[0] == 128 and Image.open(sample / "mask.png").size[0] == 128
    source = json.loads((gpu_check.SAMPLE / "points.json").read_text())["points"]
    scaled = json.loads((sample / "points.json").read_text())["points"]
    factor = 128 / Image.open(gpu_check.SAMPLE / "original.jpg").size[0]
    assert scaled == [[min(round(x * factor), 127), min(round(y * factor), 127)] for x, y in source]


def test_a_models_step_gives_the_checkpoint_it_printed_last(tmp_path):
    (tmp_path / "models_sdxl.log").write_text("$ python -m tools.sdxl_random\nwarning\n/scratch/my models/x.safetensors\n\n")
    step = gpu_check.Step("models_sdxl", "passed", log="models_sdxl.log")
    assert gpu_check.written_path(step, tmp_path) == Path("/scratch/my models/x.safetensors")
    step.status = "failed"
    assert gpu_check.written_path(step, tmp_path) is None


def test_a_step_past_its_time_is_stopped_with_its_children(tmp_path):
    child = tmp_path / "child.pid"
    script = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
              f" open({str(child)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)")
    step = gpu_check.run_logged("slow one", [sys.executable, "-c", script], tmp_path, timeout=3)
    assert step.status == "failed" and step.detail == "stopped after 3 s" and step.log == "slow_one.log"
    assert "started" in (tmp_path / "slow_one.log").read_text()
    pid = int(child.read_text())
    with pytest.raises(ProcessLookupError):  # the grandchild is gone too (reaped within 5 s)
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)


def test_the_sdxl_run_is_the_sdxl_benchmark_then_the_sdxl_workflows(fake_run, tmp_path, repo_root):
    rc, commands = fake_run("--sdxl", "--vram", "default", comfyui=fake_host(tmp_path, disable_flag=True))
    sdxl = [f"workflow {w.stem} [default]" for w in sorted((repo_root / "workflows").glob("*.json"))
            if gpu_check.workflow_family(w) == "sdxl"]
    assert rc == 0 and [name for name, _, _ in commands] == ["bench_sdxl [default]", "models_sdxl"] + sdxl
    bench = commands[0][1]
    assert bench[bench.index("--model") + 1] == "sdxl" and Path(bench[bench.index("--json") + 1]).name == "bench_sdxl.json"


def test_a_stopped_check_records_the_running_step_and_stops(tmp_path):
    clock = Clock()
    recorded = []

    def runner(item, command, timeout):
        if item.name == "b":
            raise gpu_check.Stopped("SIGTERM")
        return gpu_check.Step(item.name, "passed")

    with pytest.raises(gpu_check.Stopped):
        gpu_check.execute([planned("a", 1), planned("b", 1), planned("c", 1)], gpu_check.Budget(None, clock.now, clock),
                          runner, recorded.append, cap=10)
    assert [(s.name, s.status, s.detail) for s in recorded] == [("a", "passed", ""), ("b", "failed", "stopped by SIGTERM")]


def test_the_summary_says_how_to_run_what_the_budget_left_out():
    report = gpu_check.Report(tiny=False, steps=[
        gpu_check.Step("bench [default]", "passed", group="bench"),
        gpu_check.Step("bench [no-dynamic-vram]", detail="needs ~240 s, 50 s left of the 540 s budget", group="bench",
                       vram="no-dynamic-vram"),
        gpu_check.Step("inpaint", detail="benchmarks/inpaint.py is not in this checkout", group="inpaint"),
        gpu_check.Step("workflow fastdrag [default]", detail="needs ~35 s, 5 s left of the 540 s budget",
                       group="workflows")])
    assert gpu_check.resume_commands(report) == [
        "bash scripts/gpu_check.sh --budget 540 --only bench --vram no-dynamic-vram",
        "bash scripts/gpu_check.sh --budget 540 --only workflows --vram default"]


def test_on_a_cpu_the_capture_steps_that_need_cuda_skip_with_the_reason(fake_run, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "machine", lambda: {"cuda": False})
    rc, commands = fake_run("--tiny", comfyui=fake_host(tmp_path, disable_flag=True))
    summary = json.loads((fake_run.out / "summary.json").read_text())
    skipped = {s["name"]: s["detail"] for s in summary["steps"] if s["status"] == "skipped"}
    for name in ("capture [default, cudaMallocAsync]", "capture [default, cudaMallocAsync, --disable-async-offload]"):
        assert skipped[name] == ("no CUDA: captured passes are CUDA graphs, and ComfyUI's allocator and offload "
                                 "streams are CUDA's")
    ran = [name for name, _, _ in commands]
    assert rc == 0 and "capture [default, native]" in ran, "the static-buffer check still runs on the CPU"
    old = fake_host(tmp_path / "old", disable_flag=False)
    monkeypatch.setattr(gpu_check, "machine", lambda: {"cuda": True, "device": "fake GPU"})
    fake_run("--only", "capture", comfyui=old)
    summary = json.loads((fake_run.out / "summary.json").read_text())
    skipped = {s["name"]: s["detail"] for s in summary["steps"] if s["status"] == "skipped"}
    assert skipped["capture [default, cudaMallocAsync, --disable-async-offload]"] == \
        "ComfyUI 0.33.0 has no --disable-async-offload"


def test_a_failed_step_makes_the_check_fail(fake_run, tmp_path, monkeypatch, capsys):
    """The positive control of the exit status: the same run passes with every step passing, fails with one failing."""
    assert fake_run("--only", "bench")[0] == 0
    failing = gpu_check.run_logged

    def one_fails(name, command, logs, timeout, env=None):
        step = failing(name, command, logs, timeout, env)
        return gpu_check.Step(name, "failed", 1.0, "exit 1: boom", log=step.log) if name == "bench [default]" else step

    monkeypatch.setattr(gpu_check, "run_logged", one_fails)
    rc, _ = fake_run("--only", "bench")
    assert rc == 1 and capsys.readouterr().out.strip().splitlines()[-1].startswith("FAILED: 0 ok, 1 failed")


def test_the_vram_mode_command_sets_a_host_flag_before_comfy_counts_its_streams(monkeypatch):
    started = []
    monkeypatch.setattr(comfy_vram, "start", lambda mode, cuda, flags=(): started.append((mode, cuda, flags)) or "x")
    monkeypatch.setattr(comfy_vram.runpy, "run_module", lambda module, **kwargs: started.append((module, sys.argv)))
    comfy_vram.main(["default", "--disable-async-offload", "tools.capture_check", "--tiny", "--disable-async-offload"])
    assert started == [("default", False, ("--disable-async-offload",)),
                       ("tools.capture_check", ["tools.capture_check", "--tiny", "--disable-async-offload"])]
    started.clear()
    comfy_vram.main(["default", "tools.capture_check"])
    assert started[0] == ("default", True, ())


def test_motion_supervision_captures_are_counted_from_the_dragdiffusion_edit():
    from tools import capture_check

    def counts(captures):
        return {"capture": {"gradient": {"captures": captures}}}

    assert capture_check.motion_supervision_captures({"fastdrag": counts(0), "dragdiffusion": counts(6)}) == 6
    assert capture_check.motion_supervision_captures({"fastdrag": counts(2), "dragdiffusion": counts(2)}) == 0
