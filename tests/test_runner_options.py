"""The runner's --set and --device options, and the GPU check's per-workflow overrides, tiny sample, goals and SDXL part."""

import json
from pathlib import Path

import pytest
import torch

from dragkit.errors import DragInputError
from tools import gpu_check, run_workflow


def test_set_values_are_json_else_text_and_malformed_ones_are_refused():
    assert run_workflow.parse_override("DragKitLoRAFineTune.steps=10") == ("DragKitLoRAFineTune", "steps", 10)
    assert run_workflow.parse_override("CLIPTextEncode.text=a cat") == ("CLIPTextEncode", "text", "a cat")
    assert run_workflow.parse_override('X.flag=true') == ("X", "flag", True)
    for bad in ("steps=10", "DragKitLoRAFineTune.steps", ".steps=1", "Node.=1"):
        with pytest.raises(DragInputError, match="NODE_TYPE.INPUT=VALUE"):
            run_workflow.parse_override(bad)
    with pytest.raises(SystemExit):
        run_workflow.parse_args(["w.json", "--image", "x.png", "--set", "nonsense"])


def test_set_changes_every_node_of_the_type_and_refuses_an_input_nobody_has():
    prompt = {"1": {"class_type": "A", "inputs": {"steps": 80, "model": ["0", 0]}},
              "2": {"class_type": "A", "inputs": {"steps": 80}},
              "3": {"class_type": "B", "inputs": {"steps": 5}}}
    run_workflow.apply_overrides(prompt, [("A", "steps", 10)])
    assert [prompt[k]["inputs"]["steps"] for k in "123"] == [10, 10, 5]
    with pytest.raises(DragInputError, match="no A node with an input 'stpes'"):
        run_workflow.apply_overrides(prompt, [("A", "stpes", 10)])
    with pytest.raises(DragInputError, match="no C node"):
        run_workflow.apply_overrides(prompt, [("C", "steps", 10)])


def test_device_auto_follows_cuda_and_gpu_without_cuda_is_an_error():
    assert run_workflow.use_gpu("cpu") is False
    assert run_workflow.use_gpu("auto") is torch.cuda.is_available()
    if not torch.cuda.is_available():
        with pytest.raises(DragInputError, match="no CUDA device"):
            run_workflow.use_gpu("gpu")


def test_gpu_check_overrides_only_the_node_types_a_workflow_holds(repo_root):
    fastdrag = gpu_check.overrides_for(repo_root / "workflows" / "fastdrag.json", gpu_check.TINY)
    assert "DragKitLoRAFineTune.steps=2" not in fastdrag and "DragKitDDIMInvert.steps=10" in fastdrag
    dragdiffusion = gpu_check.overrides_for(repo_root / "workflows" / "dragdiffusion.json", gpu_check.TINY)
    assert "DragKitLoRAFineTune.steps=2" in dragdiffusion and "DragKitMotionSupervisionOptimize.iterations=2" in dragdiffusion


def test_gpu_check_tiny_sample_scales_image_mask_and_points(tmp_path):
    from PIL import Image

    sample = gpu_check.scaled_sample(gpu_check.SAMPLE, tmp_path / "s", 128)
    assert Image.open(sample / "original.jpg").size == (128, 128) and Image.open(sample / "mask.png").size == (128, 128)
    source = json.loads((gpu_check.SAMPLE / "points.json").read_text())["points"]
    scaled = json.loads((sample / "points.json").read_text())["points"]
    assert scaled == [[min(round(x / 4), 127), min(round(y / 4), 127)] for x, y in source]


def test_gpu_check_judges_goals_only_on_a_cuda_run_of_their_family_and_side():
    rows = [{"model": "sd15", "stage": "resolutions/512/stages/lora", "median_ms": 5000.0, "peak_gib": 6.5},
            {"model": "sd15", "stage": "resolutions/512/stages/vae_decode", "median_ms": 20.0, "peak_gib": 2.0}]
    lines = gpu_check.goal_tables(rows, cuda=True)
    assert "Goals: sd15 at 512² (fp16, one H100)" in lines and not any("sdxl" in line for line in lines)
    assert "| lora | peak_gib | 6.50 | ≤ 6 | NO |" in lines and "| lora | median_ms | 5000.00 | ≤ 6000 | yes |" in lines
    assert "| vae_decode | median_ms | 20.00 | ≤ 30 | yes |" in lines
    assert "| gooddrag_edit | median_ms | – | ≤ 5000 | n/a (not measured) |" in lines
    judged = [line for line in gpu_check.goal_tables(rows, cuda=False) if line.startswith("| lora")]
    assert judged and all("n/a (not a CUDA run of sd15 at 512²)" in line for line in judged)


def test_gpu_check_judges_the_sdxl_goals_at_1024():
    rows = [{"model": "sdxl", "stage": "resolutions/1024/stages/fastdrag_re_edit", "median_ms": 380.0, "peak_gib": 17.0},
            {"model": "sdxl", "stage": "resolutions/1024/stages/dragdiffusion_edit", "median_ms": 9000.0, "peak_gib": 15.0},
            {"model": "sdxl", "stage": "resolutions/64/stages/lora", "median_ms": 1.0, "peak_gib": 1.0}]
    lines = gpu_check.goal_tables(rows, cuda=True)
    assert "Goals: sdxl at 1024² (fp16, one H100)" in lines and not any("sd15" in line for line in lines)
    assert "| fastdrag_re_edit | median_ms | 380.00 | ≤ 400 | yes |" in lines
    assert "| fastdrag_re_edit | peak_gib | 17.00 | ≤ 16 | NO |" in lines
    assert "| dragdiffusion_edit | median_ms | 9000.00 | ≤ 10000 | yes |" in lines
    assert "| lora | peak_gib | – | ≤ 16 | n/a (not measured) |" in lines, "another side's stage is not judged"


def test_gpu_check_reads_every_stage_of_the_benchmark_report(tmp_path):
    report = {"model_family": "sdxl",
              "resolutions": {"1024": {"stages": {"lora": {"median_ms": 5000.0, "peak_mib": 6656.0},
                                                  "fastdrag_warp": {"median_ms": 3.0, "peak_mib": None}}}}}
    (tmp_path / "bench.json").write_text(json.dumps(report))
    assert gpu_check.bench_rows(tmp_path / "bench.json") == [
        {"model": "sdxl", "stage": "resolutions/1024/stages/lora", "median_ms": 5000.0, "peak_gib": 6.5},
        {"model": "sdxl", "stage": "resolutions/1024/stages/fastdrag_warp", "median_ms": 3.0, "peak_gib": None},
    ]
    del report["model_family"]
    (tmp_path / "old.json").write_text(json.dumps(report))
    assert {row["model"] for row in gpu_check.bench_rows(tmp_path / "old.json")} == {"sd15"}
    assert gpu_check.bench_rows(tmp_path / "missing.json") == []


def test_without_checkpoint_an_sdxl_workflow_gets_the_tiny_sdxl_checkpoint(repo_root, tmp_path, monkeypatch):
    from tools import tiny_models, tiny_sdxl_sd2

    sd15, sdxl, image = tmp_path / "tiny-sd15.safetensors", tmp_path / "tiny-sdxl-clip.safetensors", tmp_path / "x.png"
    for path in (sd15, sdxl, image):
        path.write_bytes(b"")
    monkeypatch.setattr(tiny_models, "tiny_checkpoint_path", lambda: sd15)
    monkeypatch.setattr(tiny_sdxl_sd2, "tiny_sdxl_checkpoint_path", lambda with_clip=False: sdxl if with_clip else None)
    for name, expected in (("fastdrag.json", sd15), ("fastdrag_sdxl.json", sdxl), ("dragdiffusion_sdxl.json", sdxl)):
        args = run_workflow.parse_args([str(repo_root / "workflows" / name), "--image", str(image)])
        workflow, _ = run_workflow.read_workflow(args.workflow)
        models = run_workflow.resolve_models(args, workflow)
        assert models.checkpoint == expected and models.tiny, name


def test_gpu_check_sdxl_run_is_the_sdxl_part_alone(tmp_path, monkeypatch, repo_root):
    """``--sdxl`` runs the SDXL workflows and benchmark only; without ComfyUI each is listed as skipped, not failed."""
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert gpu_check.main(["--tiny", "--sdxl", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    sdxl_workflows = [f"workflow {path.stem}" for path in sorted((repo_root / "workflows").glob("*_sdxl.json"))]
    assert [step["name"] for step in summary["steps"]] == ["benchmark_sdxl"] + sdxl_workflows
    assert {step["status"] for step in summary["steps"]} == {"skipped"} and summary["sdxl"] is True
    assert "COMFYUI_PATH is not set" in summary["steps"][0]["detail"]


def test_gpu_check_takes_the_checkpoint_a_models_step_printed_last(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "models_sdxl.log").write_text("$ python -m tools.sdxl_random\nwarning\n/scratch/my models/x.safetensors\n\n")
    step = gpu_check.Step("models_sdxl", "passed", log="logs/models_sdxl.log")
    assert gpu_check.written_path(step, tmp_path) == Path("/scratch/my models/x.safetensors")
    step.status = "failed"
    assert gpu_check.written_path(step, tmp_path) is None


def test_gpu_check_reports_captured_passes_and_every_fallback(tmp_path):
    counts = {"captures": 3, "replays": 40, "rejected": 1, "max_first_replay_error": 2.5e-4}
    bench = {"model_family": "sd15", "resolutions": {"512": {
        "capture": {"mode": "graph", "passes": counts, "gradient": dict(counts, captures=1, rejected=0)},
        "capture_ratios": {"fastdrag_re_edit": 0.41}}}}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    logs = tmp_path / "logs"
    logs.mkdir()
    fallback = "DragKit: a UNet pass could not be captured (RuntimeError: boom); it runs eagerly"
    (logs / "workflow_fastdrag.log").write_text(f"INFO {fallback}\nINFO {fallback}\nsomething else\n")
    notes = gpu_check.capture_notes(tmp_path / "bench.json", logs)
    assert any("3 captured, 1 refused, 40 replays" in note and "2.5e-04" in note for note in notes)
    assert "- sd15 512²: fastdrag_re_edit ÷ fastdrag_re_edit_eager = 0.41×" in notes
    assert notes.count(f"- workflow_fastdrag: {fallback}") == 1, "each fallback once per log"
    assert gpu_check.capture_notes(tmp_path / "missing.json", tmp_path / "nothing") == []
