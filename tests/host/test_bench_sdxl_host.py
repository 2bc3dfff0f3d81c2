"""The benchmark's SDXL path (``--model sdxl``) on the tiny SDXL checkpoint, CPU: stages, passes, goals.

Run with ``--no-captured``: on the CPU a ``*_captured`` twin reruns its stage's passes uncaptured (no CUDA
graphs), a third of this test's time; the twins' bookkeeping is tested on SD1.5 in ``tests/test_bench.py``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.workload import TINY

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report(comfyui, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-sdxl") / "bench.json"
    env = dict(os.environ, COMFYUI_PATH=str(comfyui))
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--tiny", "--model", "sdxl", "--methods",
                           "fastdrag,dragdiffusion", "--repeats", "1", "--warmup", "0", "--no-captured", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_sdxl_stages_run_through_the_nodes(report):
    assert report["backend"] == "comfyui" and report["model_family"] == "sdxl" and "SDXL" in report["model"]
    result = report["resolutions"]["64"]
    stages = result["stages"]
    assert {"fastdrag_re_edit", "fastdrag_first_edit", "native_ksampler_advanced", "dragdiffusion_edit"} <= set(stages)
    steps = round(TINY.fastdrag_steps * TINY.fastdrag_strength)
    assert stages["fastdrag_first_edit"]["unet_passes"] == 2 * steps
    assert stages["dragdiffusion_optimize"]["unet_passes_with_grad"] >= TINY.dragdiffusion_iterations
    assert set(result["native_ratios"]) == {"fastdrag_sample", "vae_decode"}
    assert result["attn_cache"]["layers"] == 36, "SDXL's decoder self-attention layers"
    assert result["goals"] == [], "the SDXL goals are for 1024²"
    per_pass = report["flops"]["per_pass"]["64"]
    assert 0 < per_pass["forward"] < per_pass["forward_backward"]
