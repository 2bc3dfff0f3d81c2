"""The Drag Points Editor node in a real ComfyUI: image sources, outputs, and hostile widget values.

In-process (``comfy_inproc``) for the node function, and through a headless
server (``comfy_server``) for the API-prompt path. Marked ``host``: skips
without ``COMFYUI_PATH``.
"""

from __future__ import annotations

import json
import sys
import types
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from dragkit.editor_state import encode_mask
from dragrun.comfy_host import ComfyServerError

NODE = "DragKitPointsEditor"
PREFIX = "[Drag Points Editor]"
W, H = 48, 32


def _image(width=W, height=H, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _state(width=W, height=H, pairs=(((1, 2), (10, 12)),), mask=None, pending=None, **extra) -> str:
    state = {
        "version": 1, "width": width, "height": height,
        "pairs": [{"handle": list(h), "target": list(t)} for h, t in pairs],
        "pending": pending, "mask": mask,
    }
    state.update(extra)
    return json.dumps(state)


@pytest.fixture(scope="module")
def input_file(comfy_inproc):
    """An image written into the in-process ComfyUI's input folder; returns (name, pixels)."""
    import folder_paths

    name = f"editor_{uuid.uuid4().hex[:8]}.png"
    pixels = _image()
    Image.fromarray(pixels).save(f"{folder_paths.get_input_directory()}/{name}")
    return name, pixels


def _run(host, **inputs):
    return host.run_node(NODE, **inputs)


def test_node_definition(comfy_inproc, input_file):
    cls = comfy_inproc.node_class(NODE)
    assert comfy_inproc.pack.NODE_DISPLAY_NAME_MAPPINGS[NODE] == "Drag Points Editor (DragKit)"
    assert cls.CATEGORY == "DragKit"
    assert cls.RETURN_TYPES == ("IMAGE", "DRAG_POINTS", "MASK")
    spec = cls.INPUT_TYPES()
    files, options = spec["required"]["image_file"]
    assert options["image_upload"] is True and input_file[0] in files
    assert spec["required"]["editor_state"][0] == "STRING"
    assert spec["optional"]["image"][0] == "IMAGE"
    assert spec["optional"]["mask"][0] == "MASK"
    assert list(spec["required"]) == ["image_file", "editor_state"]  # the widget order workflows depend on
    assert spec["hidden"] == {"unique_id": "UNIQUE_ID"}
    assert cls.VALIDATE_INPUTS(image_file="anything.png") is True


@pytest.mark.parametrize("inputs, missing", [
    ({"editor_state": ""}, ["image_file"]),
    ({}, ["editor_state", "image_file"]),
], ids=["no-image_file", "no-inputs"])
def test_the_host_validates_a_prompt_without_image_file_without_a_type_error(comfy_inproc, inputs, missing):
    """The host's own validation (0.3.64 and 0.33.0 ``execution.validate_inputs``) calls VALIDATE_INPUTS with only the
    inputs the prompt holds: the user gets the host's "Required input is missing", never a TypeError from the pack."""
    import asyncio

    import execution

    prompt = {"1": {"class_type": NODE, "inputs": inputs}}
    valid, errors, _ = asyncio.run(execution.validate_inputs("dragkit-test", prompt, "1", {}))
    assert valid is False
    assert sorted(e["details"] for e in errors if e["type"] == "required_input_missing") == missing
    assert [e for e in errors if e["type"] != "required_input_missing"] == []


def test_uploaded_file_gives_image_points_and_mask(comfy_inproc, input_file):
    name, pixels = input_file
    mask = np.zeros((H, W), dtype=bool)
    mask[3:9, 5:40] = True
    out = _run(comfy_inproc, image_file=name, editor_state=_state(mask={"rle": encode_mask(mask)}), unique_id="7")
    image, points, mask_out = out["result"]
    assert image.shape == (1, H, W, 3) and image.dtype == torch.float32
    assert torch.equal((image[0] * 255).round().to(torch.uint8), torch.from_numpy(pixels))
    assert (points.width, points.height, points.handles, points.targets) == (W, H, ((1.0, 2.0),), ((10.0, 12.0),))
    assert mask_out.shape == (1, H, W) and torch.equal(mask_out[0], torch.from_numpy(mask).float())
    assert out["ui"]["dragkit_editor"] == [{"width": W, "height": H, "pairs": 1, "mask_pixels": int(mask.sum())}]


def test_nothing_painted_gives_an_all_zero_mask(comfy_inproc, input_file):
    _, _, mask = _run(comfy_inproc, image_file=input_file[0], editor_state=_state())["result"]
    assert mask.shape == (1, H, W) and not mask.any()


def test_connected_image_wins_over_the_upload(comfy_inproc):
    pixels = torch.from_numpy(_image(20, 30, seed=1)).float()[None] / 255
    out = _run(comfy_inproc, image_file="missing-file.png", editor_state=_state(20, 30, pairs=(((0, 0), (19, 29)),)),
               image=pixels, unique_id="3")
    image, points, mask = out["result"]
    assert image is pixels
    assert (points.width, points.height) == (20, 30) and mask.shape == (1, 30, 20)
    shown = out["ui"]["dragkit_editor"][0]["image"]
    assert shown["type"] == "temp" and shown["filename"].endswith(".png")
    import folder_paths

    saved = np.asarray(Image.open(f"{folder_paths.get_temp_directory()}/{shown['subfolder']}/{shown['filename']}"))
    assert saved.shape == (30, 20, 3)


def test_a_failing_node_still_shows_the_connected_image(comfy_inproc, monkeypatch):
    sent = []

    class FakeServer:
        client_id = "client-1"

        def send_sync(self, event, data, sid=None):
            sent.append((event, data, sid))

    fake = types.ModuleType("server")
    fake.PromptServer = type("PromptServer", (), {"instance": FakeServer()})
    monkeypatch.setitem(sys.modules, "server", fake)
    pixels = torch.rand(1, 30, 20, 3)
    with pytest.raises(ValueError, match=r"\[Drag Points Editor\] no handle/target pairs were placed"):
        _run(comfy_inproc, image_file="", editor_state="", image=pixels, unique_id="12")
    [(event, data, sid)] = sent
    assert event == "dragkit.editor.image" and sid == "client-1"
    assert data["node"] == "12" and data["image"]["type"] == "temp"


# ----------------------------------------------------------------------------------------------
# MASK input: it seeds the region; the editor's strokes apply on top: (input OR painted) AND NOT erased


def _box(y0, y1, x0, x1) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_mask_input_seeds_the_mask_and_strokes_apply_on_top(comfy_inproc, input_file):
    seed, painted, erased = _box(0, 16, 0, 24), _box(20, 30, 30, 40), _box(0, 4, 0, 24)
    state = _state(mask={"rle": encode_mask(painted)}, erase={"rle": encode_mask(erased)})
    as_input = torch.from_numpy(seed.astype(np.float32))[None] * 0.8  # >= 0.5 is editable
    out = _run(comfy_inproc, image_file=input_file[0], editor_state=state, mask=as_input, unique_id="5")
    mask = out["result"][2]
    expected = (seed | painted) & ~erased
    assert mask.shape == (1, H, W) and torch.equal(mask[0], torch.from_numpy(expected).float())
    summary = out["ui"]["dragkit_editor"][0]
    assert summary["mask_pixels"] == int(expected.sum())
    import folder_paths

    ref = summary["input_mask"]  # the widget shows the input mask from this file
    shown = np.asarray(Image.open(f"{folder_paths.get_temp_directory()}/{ref['subfolder']}/{ref['filename']}"))
    assert np.array_equal(shown > 127, seed)

    # a 2-D mask of another input is fine; the same strokes apply on top of the changed input
    other = _box(8, 32, 8, 48)
    again = _run(comfy_inproc, image_file=input_file[0], editor_state=state, mask=torch.from_numpy(other).float())
    assert torch.equal(again["result"][2][0], torch.from_numpy((other | painted) & ~erased).float())

    # without the input, only the painted strokes count (erasures have nothing under them)
    alone = _run(comfy_inproc, image_file=input_file[0], editor_state=state)
    assert torch.equal(alone["result"][2][0], torch.from_numpy(painted & ~erased).float())
    assert "input_mask" not in alone["ui"]["dragkit_editor"][0]


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.ones(1, H + 1, W), f"the mask input is {W}x{H + 1} but the image is {W}x{H}"),
        (torch.ones(2, H, W), "holds 2 masks"),
        (torch.ones(1, 1, H, W), r"must be a MASK \[batch, height, width\]"),
        (torch.full((1, H, W), float("nan")), "NaN or infinite"),
    ],
)
def test_a_bad_mask_input_is_a_clear_error(comfy_inproc, input_file, mask, message):
    with pytest.raises(ValueError, match=message) as info:
        _run(comfy_inproc, image_file=input_file[0], editor_state=_state(), mask=mask)
    assert str(info.value).startswith(PREFIX)


def test_the_erase_layer_round_trips_through_the_state_parser():
    from dragkit.editor_state import parse_editor_state

    text = _state(mask={"rle": encode_mask(_box(1, 2, 1, 2))}, erase={"rle": encode_mask(_box(3, 5, 3, 5))})
    state = parse_editor_state(text, width=W, height=H)
    assert state.erase.sum() == 4 and list(json.loads(state.to_json())) == [
        "version", "width", "height", "pairs", "pending", "mask", "erase"]
    assert "erase" not in parse_editor_state(_state()).to_json()  # omitted when nothing is erased, as the widget does
    with pytest.raises(ValueError, match='"erase" must be null'):
        parse_editor_state(_state(erase=[1]))


def test_exif_orientation_is_applied_like_load_image(comfy_inproc):
    import folder_paths

    name = f"editor_exif_{uuid.uuid4().hex[:8]}.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    Image.fromarray(_image(40, 24)).save(f"{folder_paths.get_input_directory()}/{name}", exif=exif)
    image, points, _ = _run(comfy_inproc, image_file=name, editor_state=_state(24, 40))["result"]
    assert image.shape == (1, 40, 24, 3) and (points.width, points.height) == (24, 40)


def test_is_changed_follows_the_file_content(comfy_inproc):
    import folder_paths

    cls = comfy_inproc.node_class(NODE)
    name = f"editor_hash_{uuid.uuid4().hex[:8]}.png"
    path = f"{folder_paths.get_input_directory()}/{name}"
    Image.fromarray(_image(seed=2)).save(path)
    first = cls.IS_CHANGED(image_file=name, editor_state="")
    assert first == cls.IS_CHANGED(image_file=name, editor_state="x")
    Image.fromarray(_image(seed=3)).save(path)
    assert cls.IS_CHANGED(image_file=name, editor_state="") != first
    missing = cls.IS_CHANGED(image_file="no-such-file.png", editor_state="")
    assert missing == cls.IS_CHANGED(image_file="no-such-file.png", editor_state="")  # stable: cached when linked
    assert missing != first


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"editor_state": ""}, "no handle/target pairs were placed"),
        ({"editor_state": "{'version': 1}"}, "not valid JSON"),
        ({"editor_state": "[1, 2]"}, "must be a JSON object"),
        ({"editor_state": _state(version=3)}, "version 3"),
        ({"editor_state": _state(width=W + 1)}, f"placed on a {W + 1}x{H} image but the image is {W}x{H}"),
        ({"editor_state": _state(pairs=(((1, float("nan")), (3, 4)),))}, "not a finite number"),
        ({"editor_state": _state(pairs=(((1, 2), (W, 4)),))}, f"outside the {W}x{H} image"),
        ({"editor_state": _state(pairs=(((1, 2), ("3", 4)),))}, "must hold numbers"),
        ({"editor_state": _state(pairs=(((1, 2), (3, 4)),) * 129)}, "at most 128"),
        ({"editor_state": _state(pairs=(((1, 2), (3, 4)),) * 200_000)}, "characters long"),
        ({"editor_state": _state(pending=[4, 5])}, "has no target yet"),
        ({"editor_state": _state(mask={"rle": "%%%"})}, "not valid base64"),
        ({"editor_state": _state(mask={"rle": encode_mask(np.ones((H, W + 1)))})}, "covers 1568 pixels"),
        ({"editor_state": _state(mask=[[1, 0], [0, 1]])}, '"mask" must be null or'),
        ({"editor_state": "[" * 50_000 + "]" * 50_000}, "nested too deeply"),
        ({"image_file": "../../../../etc/passwd"}, "outside ComfyUI's input, output and temp folders"),
        ({"image_file": "does-not-exist.png"}, "does not exist"),
        ({"image_file": ""}, "no image: upload one"),
        ({"image": torch.rand(2, H, W, 3)}, "holds 2 images"),
        ({"image": torch.rand(H, W, 3)}, r"must be \[batch, height, width, 3\]"),
    ],
)
def test_malformed_inputs_give_a_clear_node_error(comfy_inproc, input_file, inputs, message):
    call = {"image_file": input_file[0], "editor_state": _state(), **inputs}
    with pytest.raises(ValueError, match=message) as info:
        _run(comfy_inproc, **call)
    assert str(info.value).startswith(PREFIX)


def test_an_unreadable_image_file_is_a_clear_error(comfy_inproc):
    import folder_paths

    name = f"editor_broken_{uuid.uuid4().hex[:8]}.png"
    with open(f"{folder_paths.get_input_directory()}/{name}", "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match=r"^\[Drag Points Editor\] cannot read the image file"):
        _run(comfy_inproc, image_file=name, editor_state=_state())


# ----------------------------------------------------------------------------------------------
# Through the server: the API prompt carries the state as a plain string


def _prompt(image_name: str, state: str) -> dict:
    return {
        "1": {"class_type": NODE, "inputs": {"image_file": image_name, "editor_state": state}},
        "2": {"class_type": "MaskToImage", "inputs": {"mask": ["1", 2]}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }


def test_api_prompt_runs_and_hostile_state_fails_cleanly(comfy_server, tmp_path):
    path = tmp_path / "editor_api.png"
    Image.fromarray(_image()).save(path)
    name = comfy_server.upload_image(path)
    mask = np.zeros((H, W), dtype=bool)
    mask[10:20, 0:W] = True
    entry = comfy_server.run(_prompt(name, _state(mask={"rle": encode_mask(mask)})), timeout=120)
    assert entry["outputs"]["1"]["dragkit_editor"][0]["mask_pixels"] == int(mask.sum())
    [preview] = comfy_server.output_files(entry, "3")
    assert np.array_equal(np.asarray(Image.open(preview).convert("L")) > 127, mask)

    with pytest.raises(ComfyServerError, match=r"\[Drag Points Editor\] .*not a finite number"):
        comfy_server.run(_prompt(name, _state(pairs=(((1, float("nan")), (3, 4)),))), timeout=120)
    with pytest.raises(ComfyServerError, match=r"\[Drag Points Editor\] the image file .* is outside"):
        comfy_server.run(_prompt("../../secret.png", _state()), timeout=120)
    assert comfy_server.get("/object_info/" + NODE).status_code == 200  # still serving


def _cached_nodes(entry: dict) -> set[str]:
    for event, data in entry["status"]["messages"]:
        if event == "execution_cached":
            return set(data["nodes"])
    return set()


def test_with_a_connected_image_moving_a_point_reruns_only_the_editor(comfy_server, tmp_path):
    path = tmp_path / "editor_linked.png"
    Image.fromarray(_image()).save(path)
    name = comfy_server.upload_image(path)

    def prompt(state: str) -> dict:
        graph = _prompt("", state)  # no file of its own: the IMAGE input is used
        graph["1"]["inputs"]["image"] = ["0", 0]
        graph["0"] = {"class_type": "LoadImage", "inputs": {"image": name}}
        return graph

    comfy_server.run(prompt(_state()), timeout=120)
    again = comfy_server.run(prompt(_state()), timeout=120)
    assert {"0", "1"} <= _cached_nodes(again)
    moved = comfy_server.run(prompt(_state(pairs=(((1, 2), (11, 12)),))), timeout=120)
    assert "0" in _cached_nodes(moved) and "1" not in _cached_nodes(moved)
