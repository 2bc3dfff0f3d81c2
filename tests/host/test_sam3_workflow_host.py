"""The shipped warp_inpaint_sam3 workflow: its wiring, and a run where SAM3's mask alone is the region to move.

No tiny SAM3 exists (``tools/tiny_sam3.py`` says why): the run feeds SAM3 Detect's mask from a mask image
(:func:`tools.tiny_sam3.feed_sam3_mask`); the editor, Combine SAM3 Mask, Drag Warp (pixels) and the SD1.5
inpainting chain run on the tiny stand-ins as in ``tests/host/test_workflows.py``. SAM3 Detect's own handling of
the points is checked in-process by ``tests/host/test_sam3_nodes_host.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dragrun.run_workflow import editor_state_for, fill_inputs, saved_images
from dragrun.workflow_format import ui_to_api
from tools.make_workflows import missing_on_host
from tools.tiny_inpaint import stand_ins_for
from tools.tiny_sam3 import feed_sam3_mask

pytestmark = pytest.mark.host

WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "warp_inpaint_sam3.json"
HANDLE, TARGET = (50, 50), (70, 50)


@pytest.fixture(scope="module")
def prompt(comfy_server):
    info = comfy_server.object_info()
    if missing_on_host(WORKFLOW.name, info):
        pytest.skip(missing_on_host(WORKFLOW.name, info))
    return ui_to_api(json.loads(WORKFLOW.read_text()), info)


def _one(prompt, kind):
    [(node_id, node)] = [(i, n) for i, n in prompt.items() if n["class_type"] == kind]
    return node_id, node


def test_the_handles_go_to_sam3_and_its_mask_to_the_warp(prompt):
    editor, _ = _one(prompt, "DragKitPointsEditor")
    load, _ = _one(prompt, "LoadImage")
    clicks, points_node = _one(prompt, "DragKitPointsToSAM3")
    _, detect = _one(prompt, "SAM3_Detect")
    combine, combine_node = _one(prompt, "DragKitCombineSAM3Mask")
    _, warp = _one(prompt, "DragKitPixelWarp")
    assert points_node["inputs"] == {"points": [editor, 1]}  # no image: SAM3 sees the editor's own image
    assert detect["inputs"]["image"] == [load, 0] and prompt[editor]["inputs"]["image"] == [load, 0]
    assert detect["inputs"]["positive_coords"] == [clicks, 0] and "negative_coords" not in detect["inputs"]
    loader = detect["inputs"]["model"][0]
    assert prompt[loader]["class_type"] == "CheckpointLoaderSimple"
    assert prompt[loader]["inputs"]["ckpt_name"] == "sam3.1_multiplex_fp16.safetensors"
    assert combine_node["inputs"]["sam_mask"][0] == _one(prompt, "SAM3_Detect")[0]
    assert combine_node["inputs"]["painted_mask"] == [editor, 2] and combine_node["inputs"]["mode"] == "union"
    assert warp["inputs"]["mask"] == [combine, 0] and warp["inputs"]["points"] == [editor, 1]


def test_runs_with_sam3s_mask_as_the_region_when_nothing_is_painted(prompt, comfy_server, tmp_path,
                                                                   tiny_sd15_inpaint_checkpoint):
    rng = np.random.default_rng(3)
    source = rng.integers(0, 255, (100, 132, 3), dtype=np.uint8)
    Image.fromarray(source).save(tmp_path / "sam3_image.png")
    sam = np.zeros((100, 132), dtype=np.uint8)
    sam[40:61, 40:61] = 255  # the "object" under the handle: a 21x21 square
    Image.fromarray(sam).save(tmp_path / "sam3_mask.png")
    points = json.dumps({"points": [list(HANDLE), list(TARGET)]})
    state = editor_state_for(tmp_path / "sam3_image.png", points, None)  # nothing painted
    image, mask = comfy_server.upload_image(tmp_path / "sam3_image.png"), comfy_server.upload_image(tmp_path / "sam3_mask.png")
    run = json.loads(json.dumps(prompt))
    assert feed_sam3_mask(run, mask)
    fill_inputs(run, image, mask, points, tiny_sd15_inpaint_checkpoint.name, "a test image", state,
                stand_ins=stand_ins_for(json.loads(WORKFLOW.read_text())["nodes"]))
    for node in run.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 2
    entry = comfy_server.run(run, timeout=600)
    assert entry["status"]["status_str"] == "success"
    [result] = [p for p in saved_images(comfy_server, entry) if p.suffix == ".png"]
    out = np.asarray(Image.open(result))
    [preview] = [i for i, n in run.items() if n["_meta"]["title"] == "Warped (before inpainting)"]
    [warped_file] = comfy_server.output_files(entry, preview)
    warped = np.asarray(Image.open(warped_file))
    # the warp moved exactly SAM3's square, 20 px right: the moved square is the source's square, and the
    # source outside both squares is untouched (the strip the move uncovered is the inpainting's)
    assert np.array_equal(warped[40:61, 60:81], source[40:61, 40:61])
    outside = np.ones((100, 132), bool)
    outside[40:61, 40:81] = False
    assert np.array_equal(warped[outside], source[outside])
    # after inpainting: rows and columns farther than the band from the squares are the source's exactly
    assert np.array_equal(out[:34], source[:34]) and np.array_equal(out[67:], source[67:])
    assert np.array_equal(out[:, :34], source[:, :34]) and np.array_equal(out[:, 87:], source[:, 87:])
    assert not np.array_equal(out, source)
