"""Every shipped workflow converts to an API prompt by the frontend's rules and runs in a real ComfyUI.

The server is ComfyUI 0.3.64 headless on CPU with the tiny seeded checkpoint;
the image is a small synthetic one (the tiny UNet is slow at 512 px on CPU)
and DDIM Invert runs 10 steps (motion supervision a few), so the whole file takes about a minute.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tools.run_workflow import editor_state_for, fill_inputs
from tools.workflow_format import ui_to_api

pytestmark = pytest.mark.host

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "workflows").glob("*.json"))
POINTS = json.dumps({"points": [[40, 50], [70, 52], [90, 30], [96, 40]]})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, comfy_server):
    folder = tmp_path_factory.mktemp("workflow-inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (100, 132, 3), dtype=np.uint8)).save(folder / "image.png")
    mask = np.zeros((100, 132), dtype=np.uint8)
    mask[20:80, 25:110] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    state = editor_state_for(folder / "image.png", POINTS, folder / "mask.png")
    return comfy_server.upload_image(folder / "image.png"), comfy_server.upload_image(folder / "mask.png"), state


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_runs_on_the_tiny_checkpoint(workflow, comfy_server, tiny_checkpoint, inputs):
    prompt = ui_to_api(json.loads(workflow.read_text()), comfy_server.object_info())
    fill_inputs(prompt, inputs[0], inputs[1], POINTS, tiny_checkpoint.name, "a test image", inputs[2])
    for node in prompt.values():
        if node["class_type"] == "DragKitDDIMInvert":
            node["inputs"]["steps"] = 10
        if node["class_type"] == "DragKitMotionSupervisionOptimize":
            node["inputs"].update(iterations=2, drag_steps=2, drags_per_step=1, grad_steps=1)
    entry = comfy_server.run(prompt, timeout=600)
    assert entry["status"]["status_str"] == "success"
    saved = [p for p in comfy_server.output_files(entry) if p.suffix == ".png"]
    assert saved
    image = np.asarray(Image.open(saved[0]))
    assert image.shape == (100, 132, 3)
    source = np.asarray(Image.open(comfy_server.dir("input") / inputs[0]).convert("RGB"))
    if any(n["class_type"] in ("DragKitFastDragWarp", "DragKitMotionSupervisionOptimize") for n in prompt.values()):
        outside = np.asarray(Image.open(comfy_server.dir("input") / inputs[1])) == 0
        assert np.array_equal(image[outside], source[outside])


def test_ui_conversion_matches_the_widget_order(comfy_server):
    info = comfy_server.object_info()
    workflow = json.loads((WORKFLOWS[0].parent / "fastdrag.json").read_text())
    prompt = ui_to_api(workflow, info)
    invert = next(n for n in prompt.values() if n["class_type"] == "DragKitDDIMInvert")
    assert invert["inputs"]["steps"] == 10 and invert["inputs"]["strength"] == 0.7
    assert invert["inputs"]["cache_layers"] == "decoder" and invert["inputs"]["cache_device"] == "auto"
    assert isinstance(invert["inputs"]["model"], list)
    load = next(n for n in prompt.values() if n["class_type"] == "LoadImage")
    assert set(load["inputs"]) == {"image"}
    assert not any(n["class_type"] == "Note" for n in prompt.values())


def test_main_job_command_runs(tmp_path, comfyui):
    from tools.run_workflow import main

    sample = Path(__file__).resolve().parents[3] / "shared" / "data" / "Drag100" / "art_0"
    if not sample.exists():
        pytest.skip(f"{sample} is not present")
    small = tmp_path / "sample"
    small.mkdir()
    Image.open(sample / "original.jpg").resize((128, 128)).save(small / "original.jpg")
    Image.open(sample / "mask.png").resize((128, 128)).save(small / "mask.png")
    points = json.loads((sample / "points.json").read_text())["points"]
    (small / "points.json").write_text(json.dumps({"points": [[x / 4, y / 4] for x, y in points]}))
    assert main([str(WORKFLOWS[0].parent / "fastdrag.json"), "--sample", str(small), "--out", str(tmp_path / "out")]) == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "original_side_by_side.png" in written and len(written) == 2
    assert torch.tensor(np.asarray(Image.open(tmp_path / "out" / "original_side_by_side.png"))).shape == (128, 256, 3)
