"""The benchmark's --tiny mode on the diffusers path (no ComfyUI, CPU): every JSON field is there."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench, flops, goals
from benchmarks.workload import METHODS, SDXL_METHODS, TINY

REPO = Path(__file__).resolve().parents[1]

STAGES = (
    "unet_forward", "vae_encode", "fastdrag_invert", "fastdrag_warp", "fastdrag_sample", "fastdrag_sample_captured",
    "vae_decode", "fastdrag_re_edit", "fastdrag_re_edit_captured", "fastdrag_first_edit", "fastdrag_first_edit_captured",
    "lora", "dragdiffusion_invert", "dragdiffusion_optimize", "dragdiffusion_optimize_captured", "dragdiffusion_sample",
    "dragdiffusion_edit", "dragdiffusion_edit_captured", "gooddrag_optimize", "gooddrag_sample", "gooddrag_edit",
    "gooddrag_edit_captured",
)
"""The diffusers path's stages in run order: each ``*_captured`` twin (capture on) right after its plain stage."""
STAGE_FIELDS = {
    "median_ms", "p10_ms", "p90_ms", "repeats", "peak_mib", "unet_passes", "unet_rows", "unet_passes_with_grad",
    "unet_rows_with_grad", "ms_beyond_bare_passes", "flops", "floor_ms", "floor_ratio",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """``python -m benchmarks.bench --tiny --json PATH`` with COMFYUI_PATH removed from the environment."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--tiny", "--repeats", "2", "--warmup", "1",
                           "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Compute floor at 64×64" in done.stdout
    return json.loads(out.read_text())


def test_report_has_every_field(report):
    assert report["complete"] is True and report["allocator"] == os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "native")
    assert report["backend"] == "diffusers" and report["versions"]["comfyui"] is None
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["diffusers"]
    assert report["device"] == "cpu" and report["dtype"] == "torch.float32" and report["tiny"] is True
    assert {"platform", "processor", "python", "cpu_count", "torch_threads"} <= set(report["machine"])
    assert report["workload"] == TINY.as_dict() and report["methods"] == list(METHODS)
    assert report["model_family"] == "sd15" and report["resolutions"]["64"]["goals"] == [], "goals are for 512²"
    assert report["flops"]["peak_tflops"] is None and "--peak-tflops" in report["flops"]["peak_source"]
    per_pass = report["flops"]["per_pass"]["64"]
    assert 0 < per_pass["forward"] < per_pass["forward_backward"]
    stages = report["resolutions"]["64"]["stages"]
    assert tuple(stages) == STAGES
    for name, stage in stages.items():
        assert set(stage) >= STAGE_FIELDS, name
        assert stage["p10_ms"] <= stage["median_ms"] <= stage["p90_ms"]
        assert stage["peak_mib"] is None and stage["floor_ms"] is None and stage["floor_ratio"] is None
    assert report["resolutions"]["64"]["attn_cache"]["layers"] > 0
    assert stages["lora"]["steps"] == TINY.lora_steps and stages["lora"]["seconds_per_step"] > 0


def test_every_captured_twin_runs_the_same_passes_and_has_a_ratio(report):
    """On a CPU capture on is the static-buffer path: the same UNet passes as the plain stage, counted as replays."""
    result = report["resolutions"]["64"]
    stages = result["stages"]
    twins = [name for name in stages if name.endswith("_captured")]
    assert set(result["capture_ratios"]) == set(twins) and all(r > 0 for r in result["capture_ratios"].values())
    for twin in twins:
        plain = stages[twin.removesuffix("_captured")]
        assert stages[twin]["unet_rows"] == plain["unet_rows"], twin
        assert stages[twin]["unet_rows_with_grad"] == plain["unet_rows_with_grad"], twin


def test_unet_passes_are_counted(report):
    s = report["resolutions"]["64"]["stages"]
    work = TINY
    fd_inv = round(work.fastdrag_steps * work.fastdrag_strength)
    assert s["unet_forward"]["unet_passes"] == 1 and s["vae_encode"]["unet_passes"] == 0
    assert s["fastdrag_invert"]["unet_passes"] == fd_inv and s["fastdrag_sample"]["unet_passes"] == fd_inv
    assert s["fastdrag_first_edit"]["unet_passes"] == 2 * fd_inv
    assert s["lora"]["unet_rows"] == s["lora"]["unet_rows_with_grad"] == work.lora_steps * work.lora_batch
    # DragDiffusion: one forward of the unedited latent, then one pass with backward per iteration.
    assert s["dragdiffusion_optimize"]["unet_passes"] == work.dragdiffusion_iterations + 1
    assert s["dragdiffusion_optimize"]["unet_passes_with_grad"] == work.dragdiffusion_iterations
    # Reference-branch sampling: batch 2 for every remaining step.
    dd_inv = round(work.dragdiffusion_steps * work.dragdiffusion_strength)
    assert s["dragdiffusion_sample"]["unet_rows"] == 2 * dd_inv
    # GoodDrag, per drag step: unedited forward, tracking, B·J gradient steps, one DDIM step.
    per_step = 3 + work.gooddrag_drags_per_step * work.gooddrag_grad_steps
    assert s["gooddrag_optimize"]["unet_passes"] == work.gooddrag_drag_steps * per_step
    assert s["gooddrag_optimize"]["unet_passes_with_grad"] == work.gooddrag_drag_steps * work.gooddrag_drags_per_step * work.gooddrag_grad_steps


def test_floor_uses_the_counted_passes():
    stage = {"median_ms": 50.0, "unet_rows": 10, "unet_rows_with_grad": 4}
    out = flops.floor(stage, {"forward": 10**12, "forward_backward": 3 * 10**12}, peak_tflops=100.0)
    assert out["flops"] == 6 * 10**12 + 4 * 3 * 10**12
    assert out["floor_ms"] == pytest.approx(180.0) and out["floor_ratio"] == pytest.approx(50 / 180)
    assert flops.floor(stage, {"forward": 1, "forward_backward": 2}, None)["floor_ratio"] is None


def test_peak_table():
    assert flops.device_peak("NVIDIA H100 80GB HBM3", torch.float16, None)[0] == 989.4
    assert flops.device_peak("NVIDIA H100 PCIe", torch.bfloat16, None)[0] == 756.5
    assert flops.device_peak("NVIDIA H200", torch.float16, None)[0] == 989.4
    assert flops.device_peak("NVIDIA L4", torch.float16, None)[0] == 121.0
    assert flops.device_peak("NVIDIA H100 80GB HBM3", torch.float32, None)[0] is None
    assert flops.device_peak("cpu", torch.float32, 2.5) == (2.5, "--peak-tflops")


def test_sd15_unet_flops_per_pass_are_the_known_figure():
    """SD1.5's UNet at 512²: about 0.8 TFLOP per forward (counted on the meta device: no memory, no compute)."""
    from benchmarks.diffusers_path import SD15_UNET

    counts = flops.unet_flops(SD15_UNET, [512])[512]
    assert 0.78e12 < counts["forward"] < 0.83e12
    assert 1.8 < counts["forward_backward"] / counts["forward"] < 2.2  # frozen weights: no weight gradients


def test_arguments():
    args = bench.parse_args(["--tiny"])
    assert args.resolutions == [bench.TINY_SIDE] and args.methods == METHODS and args.json is None
    args = bench.parse_args(["--resolutions", "512,768,1024", "--methods", "gooddrag,fastdrag", "--json"])
    assert args.resolutions == [512, 768, 1024] and args.methods == ("fastdrag", "gooddrag") and args.json == "-"
    for bad in (["--resolutions", "500"], ["--methods", "magic"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_sdxl_defaults_and_goals():
    args = bench.parse_args(["--model", "sdxl"])
    assert args.resolutions == [1024] and args.methods == SDXL_METHODS
    assert bench.parse_args(["--model", "sdxl", "--tiny"]).resolutions == [bench.TINY_SIDE]
    with pytest.raises(SystemExit, match="ComfyUI backend only"):
        bench.choose_backend("diffusers", "sdxl")
    stages = {"fastdrag_re_edit": {"median_ms": 350.0, "peak_gib": 17.0},
              "dragdiffusion_edit": {"median_ms": 12000.0, "peak_gib": 9.0}}
    rows = {(r["stage"], r["measure"]): r["met"] for r in goals.judge("sdxl", 1024, stages, cuda=True)}
    assert rows[("fastdrag_re_edit", "median_ms")] is True and rows[("fastdrag_re_edit", "peak_gib")] is False
    assert rows[("dragdiffusion_edit", "median_ms")] is False and rows[("dragdiffusion_edit", "peak_gib")] is True
    assert rows[("lora", "peak_gib")] is None, "not measured"
    assert all(r["met"] is None for r in goals.judge("sdxl", 1024, stages, cuda=False))
    assert goals.judge("sdxl", 512, stages, cuda=True) == []


def test_each_goal_is_judged_with_capture_off_and_on():
    stages = {"fastdrag_re_edit": {"median_ms": 150.0, "peak_gib": 2.0, "unet_passes": 7},
              "fastdrag_re_edit_captured": {"median_ms": 90.0, "peak_gib": 2.5, "unet_passes": 7},
              "vae_decode": {"median_ms": 20.0, "peak_gib": 2.0, "unet_passes": 0},
              "dragdiffusion_edit": {"median_ms": 2000.0, "peak_gib": 4.0, "unet_passes": 180}}
    rows = {(r["stage"], r["measure"], r["capture"]): (r["value"], r["met"])
            for r in goals.judge_capture("sd15", 512, stages, cuda=True)}
    assert rows[("fastdrag_re_edit", "median_ms", "off")] == (150.0, False)
    assert rows[("fastdrag_re_edit", "median_ms", "on")] == (90.0, True)
    assert rows[("vae_decode", "median_ms", "on")] == (20.0, True), "no UNet pass: the same stage both ways"
    assert rows[("dragdiffusion_edit", "median_ms", "off")] == (2000.0, True)
    assert rows[("dragdiffusion_edit", "median_ms", "on")] == (None, None), "no twin: not measured with capture on"
    table = goals.markdown(goals.judge_capture("sd15", 512, stages, cuda=True), "sd15", 512)
    assert table[0] == "| goal stage | capture | measure | value | goal | met |"
    assert "| fastdrag_re_edit | on | median_ms | 90.00 | ≤ 120 | yes |" in table
    assert "| fastdrag_re_edit | off | median_ms | 150.00 | ≤ 120 | NO |" in table


def test_sdxl_unet_flops_at_1024():
    """SDXL's UNet at 1024²: about 6.8 TFLOP per forward (counted on the meta device)."""
    from benchmarks.diffusers_path import sdxl_unet_config

    counts = flops.unet_flops(sdxl_unet_config(), [1024])[1024]
    assert 6.6e12 < counts["forward"] < 6.9e12
    assert 1.8 < counts["forward_backward"] / counts["forward"] < 2.2


@pytest.mark.host
def test_comfyui_path_counts_the_same_passes(comfyui, tmp_path):
    """The ComfyUI path (the pack's nodes in-process, tiny checkpoint) reports the same fields and passes."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, COMFYUI_PATH=str(comfyui))
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--tiny", "--backend", "comfyui", "--methods",
                           "fastdrag,lora", "--repeats", "1", "--warmup", "0", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["backend"] == "comfyui" and report["versions"]["comfyui"]
    stages = report["resolutions"]["64"]["stages"]
    assert set(stages) == {"unet_forward", "vae_encode", "fastdrag_invert", "fastdrag_warp", "fastdrag_sample",
                           "fastdrag_sample_captured", "vae_decode", "native_vae_decode", "native_ksampler_advanced",
                           "fastdrag_re_edit", "fastdrag_re_edit_captured", "fastdrag_first_edit",
                           "fastdrag_first_edit_captured", "lora", "lora_captured"}
    steps = round(TINY.fastdrag_steps * TINY.fastdrag_strength)
    assert stages["native_ksampler_advanced"]["unet_passes"] == stages["fastdrag_sample"]["unet_passes"] == steps
    assert stages["fastdrag_sample_captured"]["unet_passes"] == steps
    ratios = report["resolutions"]["64"]["native_ratios"]
    assert set(ratios) == {"fastdrag_sample", "vae_decode"} and all(r > 0 for r in ratios.values())
    capture = report["resolutions"]["64"]["capture"]
    assert capture["passes"]["captures"] == 0, "no graph on a CPU"
    assert capture["passes"]["replays"] > 0, "the captured twins ran the static path (the CPU stand-in for graphs)"
    assert set(report["resolutions"]["64"]["capture_ratios"]) == {
        "fastdrag_sample_captured", "fastdrag_re_edit_captured", "fastdrag_first_edit_captured", "lora_captured"}
    assert report["resolutions"]["64"]["failures"] == {}
    assert all(set(stage) >= STAGE_FIELDS for stage in stages.values())
    assert stages["fastdrag_first_edit"]["unet_passes"] == 2 * round(TINY.fastdrag_steps * TINY.fastdrag_strength)
    probes = 2  # the two small steps that measure the backward memory (nodes/comfy_autograd.py PROBE_SIDES)
    assert stages["lora"]["unet_rows_with_grad"] == (TINY.lora_steps + probes) * TINY.lora_batch


class _StoppingPath:
    """A benchmark path whose run records two stages and then dies (as a run killed at its time limit would)."""

    device, dtype, model_name = torch.device("cpu"), torch.float32, "fake"
    unet_config = None

    def __init__(self):
        from benchmarks.measure import PassCounter

        self.counter = PassCounter(torch.nn.Linear(2, 2))

    def run(self, side, work, methods, stager):
        stager.fast("unet_forward", lambda: torch.zeros(1))
        stager.fast("fastdrag_sample", lambda: torch.zeros(1), twin=True)
        raise KeyboardInterrupt("killed")

    def close(self):
        self.counter.close()


def test_the_json_is_written_after_every_stage(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "choose_backend", lambda requested, family: "diffusers")
    monkeypatch.setattr(bench, "build_path", lambda backend, tiny, family: _StoppingPath())
    monkeypatch.setattr(flops, "unet_flops", lambda config, sides: {side: {"forward": 1, "forward_backward": 2}
                                                                    for side in sides})
    out = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--tiny", "--repeats", "1", "--warmup", "0", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["complete"] is False
    stages = report["resolutions"]["64"]["stages"]
    assert list(stages) == ["unet_forward", "fastdrag_sample", "fastdrag_sample_captured"]
    assert set(report["resolutions"]["64"]["capture_ratios"]) == {"fastdrag_sample_captured"}
