"""The runner's --set and --device options, and its choice of tiny checkpoint (the GPU check's tests are in
tests/test_gpu_check.py)."""

import pytest
import torch

from dragkit.errors import DragInputError
from dragrun import run_workflow


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
