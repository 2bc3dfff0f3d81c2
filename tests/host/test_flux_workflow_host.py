"""The shipped ``fastdrag_flux``, ``dragflow_flux`` and ``fastdrag_dragflow_flux`` workflows run headless on the tiny
FLUX stand-ins (the shared ``comfy_server``).

UNETLoader gets :func:`tools.tiny_flux.tiny_flux_dev_path` (detected as FLUX.1 [dev]: 64 input channels,
guidance embedding), VAELoader the 16-channel tiny VAE, and DualCLIPLoader is swapped for the tiny CLIP-L
(``tools.tiny_inpaint.use_tiny_flux_text_encoder``). DDIM Invert runs 8 of 10 steps and dragflow 3 + 1 iterations
(the hybrid: 2 + 1) to keep them short.
Both hosts (``COMFYUI_PATH``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dragrun.run_workflow import editor_state_for, fill_inputs, saved_images
from dragrun.workflow_format import ui_to_api
from tools import tiny_inpaint

pytestmark = pytest.mark.host

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
WORKFLOW = WORKFLOWS / "fastdrag_flux.json"
POINTS = json.dumps({"points": [[40, 50], [70, 52]]})


def _inputs(comfy_server, tmp_path):
    """Image, mask (it holds the first handle) and editor state uploaded; 96 x 64 pixels (sides multiples of 16)."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    mask = np.zeros((64, 96), dtype=np.uint8)
    mask[10:55, 20:80] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    state = editor_state_for(tmp_path / "image.png", POINTS, tmp_path / "mask.png")
    return comfy_server.upload_image(tmp_path / "image.png"), comfy_server.upload_image(tmp_path / "mask.png"), state


def test_fastdrag_flux_runs_on_the_tiny_flux(comfy_server, tiny_checkpoint, tmp_path):
    image, mask_name, state = _inputs(comfy_server, tmp_path)
    saved_workflow = json.loads(WORKFLOW.read_text())
    info = comfy_server.object_info()
    prompt = ui_to_api(saved_workflow, info)
    kinds = [node["class_type"] for node in prompt.values()]
    assert {"UNETLoader", "DualCLIPLoader", "VAELoader", "FluxGuidance", "DragKitDDIMInvert", "DragKitFastDragWarp",
            "DragKitKVInjectedSample"} <= set(kinds) and kinds.count("FluxGuidance") == 2
    fill_inputs(prompt, image, mask_name, POINTS, tiny_checkpoint.name, "a test image", state, None, None,
                stand_ins=tiny_inpaint.stand_ins_for(saved_workflow["nodes"]))
    assert "DualCLIPLoader" not in {node["class_type"] for node in prompt.values()}
    for node in prompt.values():
        if node["class_type"] == "DragKitDDIMInvert":
            assert node["inputs"]["cache_layers"] == "non-ridge" and node["inputs"]["strength"] == 0.76
            node["inputs"]["steps"] = 10
    entry = comfy_server.run(prompt, timeout=900)
    assert entry["status"]["status_str"] == "success"
    saved = [p for p in saved_images(comfy_server, entry) if p.suffix == ".png"]
    assert saved and np.asarray(Image.open(saved[0])).shape == (64, 96, 3)


def test_dragflow_flux_runs_on_the_tiny_flux(comfy_server, tiny_checkpoint, tmp_path):
    image, mask_name, state = _inputs(comfy_server, tmp_path)
    saved_workflow = json.loads((WORKFLOWS / "dragflow_flux.json").read_text())
    prompt = ui_to_api(saved_workflow, comfy_server.object_info())
    kinds = [node["class_type"] for node in prompt.values()]
    assert {"UNETLoader", "DualCLIPLoader", "VAELoader", "FluxGuidance", "DragKitDDIMInvert",
            "DragKitMotionSupervisionOptimize", "DragKitKVInjectedSample", "DragKitPointsEditor"} <= set(kinds)
    fill_inputs(prompt, image, mask_name, POINTS, tiny_checkpoint.name, "a test image", state, None, None,
                stand_ins=tiny_inpaint.stand_ins_for(saved_workflow["nodes"]))
    for node in prompt.values():
        if node["class_type"] == "DragKitDDIMInvert":
            node["inputs"]["steps"] = 10
        if node["class_type"] == "DragKitMotionSupervisionOptimize":
            inputs = node["inputs"]
            assert inputs["mode"] == "dragflow" and (inputs["transport_steps"], inputs["intensify_steps"]) == (50, 20)
            assert inputs["lr"] == -1 and inputs["mask"][0] in prompt  # the released lr; the editor's mask
            inputs["transport_steps"], inputs["intensify_steps"] = 3, 1
    entry = comfy_server.run(prompt, timeout=900)
    assert entry["status"]["status_str"] == "success"
    saved = [p for p in saved_images(comfy_server, entry) if p.suffix == ".png"]
    assert saved and np.asarray(Image.open(saved[0])).shape == (64, 96, 3)


def _first_png(comfy_server, entry) -> np.ndarray:
    assert entry["status"]["status_str"] == "success"
    saved = [p for p in saved_images(comfy_server, entry) if p.suffix == ".png"]
    assert saved
    return np.asarray(Image.open(saved[0])).astype(np.int16)


def test_fastdrag_dragflow_flux_runs_and_both_stages_move_the_image(comfy_server, tiny_checkpoint, tmp_path):
    """The hybrid: DDIM Invert -> FastDrag Warp -> dragflow from the warped latent (the inversion's cache as reference)
    -> KV-Injected Sample. Positive controls: the same graph without the supervision (the warp sampled, as
    fastdrag_flux) and without the warp (dragflow from the unwarped latent, as dragflow_flux) give other images."""
    image, mask_name, state = _inputs(comfy_server, tmp_path)
    saved_workflow = json.loads((WORKFLOWS / "fastdrag_dragflow_flux.json").read_text())
    prompt = ui_to_api(saved_workflow, comfy_server.object_info())
    kinds = [node["class_type"] for node in prompt.values()]
    assert {"UNETLoader", "DualCLIPLoader", "VAELoader", "FluxGuidance", "DragKitDDIMInvert", "DragKitFastDragWarp",
            "DragKitMotionSupervisionOptimize", "DragKitKVInjectedSample", "DragKitPointsEditor"} <= set(kinds)
    fill_inputs(prompt, image, mask_name, POINTS, tiny_checkpoint.name, "a test image", state, None, None,
                stand_ins=tiny_inpaint.stand_ins_for(saved_workflow["nodes"]))
    ids = {node["class_type"]: key for key, node in prompt.items()}
    invert, warp = ids["DragKitDDIMInvert"], ids["DragKitFastDragWarp"]
    optimise = prompt[ids["DragKitMotionSupervisionOptimize"]]["inputs"]
    sample = prompt[ids["DragKitKVInjectedSample"]]["inputs"]
    prompt[invert]["inputs"]["steps"] = 10
    assert prompt[warp]["inputs"]["latent"] == [invert, 0] and optimise["latent"] == [warp, 0]
    assert optimise["attn_cache"] == [invert, 1] and sample["latent"][0] == ids["DragKitMotionSupervisionOptimize"]
    assert optimise["mode"] == "dragflow" and (optimise["transport_steps"], optimise["intensify_steps"]) == (10, 5)
    optimise["transport_steps"], optimise["intensify_steps"] = 2, 1
    hybrid = _first_png(comfy_server, comfy_server.run(prompt, timeout=900))
    assert hybrid.shape == (64, 96, 3)
    unsupervised = json.loads(json.dumps(prompt))
    unsupervised[ids["DragKitKVInjectedSample"]]["inputs"]["latent"] = [warp, 0]
    unwarped = json.loads(json.dumps(prompt))
    unwarped[ids["DragKitMotionSupervisionOptimize"]]["inputs"]["latent"] = [invert, 0]
    for control in (unsupervised, unwarped):
        other = _first_png(comfy_server, comfy_server.run(control, timeout=900))
        difference = np.abs(hybrid - other).mean()  # 13 and 16 (of 255) on both hosts
        assert difference > 2.0, difference
