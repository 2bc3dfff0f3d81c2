"""Drag Points to Wan-Move Tracks in a real ComfyUI, through the host's own Wan-Move nodes (ComfyUI >= 0.33), and
the shipped drag_to_video_wanmove workflow on the tiny Wan stand-ins (``tools/tiny_wan.py``).

The workflow run swaps the two loaders that have no tiny stand-in, as ``tools/tiny_wan.py`` explains: the UMT5-XXL
text encoder (CLIPLoader type wan) becomes the tiny CLIP-L with type sd3 (padded to Wan's 4096-wide context), and
Load CLIP Vision / CLIP Vision Encode are removed (WanMoveTrackToVideo's clip_vision_output is optional). Everything
else -- the editor, the tracks node, WanMoveTracksFromCoords, WanMoveTrackToVideo, ModelSamplingSD3, KSampler,
VAE Decode, the saved video and its last frame -- runs as shipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.host

NODE = "DragKitPointsToWanMoveTracks"
NO_WAN_MOVE = "ComfyUI < 0.33 has no Wan-Move"
WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "drag_to_video_wanmove.json"


def _points(host, width, height, *pairs):
    flat = [list(p) for pair in pairs for p in pair]
    return host.pack.dragkit.points.parse_drag_points(json.dumps({"points": flat}), width, height)


def _wan_move(host, name):
    cls = host.nodes.NODE_CLASS_MAPPINGS.get(name)
    if cls is None:
        pytest.skip(NO_WAN_MOVE)
    return cls


def test_the_node_is_registered_with_tooltips(comfy_inproc):
    assert comfy_inproc.pack.NODE_DISPLAY_NAME_MAPPINGS[NODE] == "Drag Points to Wan-Move Tracks (DragKit)"
    cls = comfy_inproc.node_class(NODE)
    assert cls.CATEGORY == "DragKit" and len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == 3
    for group in cls.INPUT_TYPES().values():
        assert all(spec[1].get("tooltip") for spec in group.values())


def test_node_errors_name_the_node(comfy_inproc):
    points = _points(comfy_inproc, 64, 48, ((10, 10), (20, 10)))
    with pytest.raises(ValueError, match=r"^\[Drag Points to Wan-Move Tracks\] frames must be 4k \+ 1"):
        comfy_inproc.run_node(NODE, points=points, width=64, height=48, frames=80, easing="linear", static_grid=4)
    with pytest.raises(ValueError, match=r"^\[Drag Points to Wan-Move Tracks\] the mask is 10x10"):
        comfy_inproc.run_node(NODE, points=points, width=64, height=48, frames=9, easing="linear", static_grid=4,
                              mask=torch.ones(1, 10, 10))
    wide = _points(comfy_inproc, 200, 48, ((2, 10), (20, 10)))
    with pytest.raises(ValueError, match=r"^\[Drag Points to Wan-Move Tracks\] handle 1 lies outside"):
        comfy_inproc.run_node(NODE, points=wide, width=64, height=48, frames=9, easing="linear", static_grid=4)


def test_tracks_through_wan_move_nodes(comfy_inproc):
    """WanMoveTracksFromCoords reads our JSON as (frames, tracks, 2) video pixels; Wan-Move's latent positions put
    each drag's last latent frame on its target's latent cell and keep the static tracks on their cells."""
    from_coords = _wan_move(comfy_inproc, "WanMoveTracksFromCoords")
    from comfy_extras.nodes_wanmove import create_pos_embeddings

    points = _points(comfy_inproc, 132, 100, ((40, 50), (100, 60)), ((20, 80), (20, 20)))
    mask = torch.zeros(1, 100, 132)
    mask[0, 40:61, 30:51] = 1
    text, width, height = comfy_inproc.run_node(NODE, points=points, width=128, height=96, frames=81,
                                                easing="ease_in_out", static_grid=4, mask=mask)
    assert (width, height) == (128, 96)
    out = from_coords.execute(track_coords=text)
    tracks, length = out.args[0]["track_path"], out.args[1]
    assert length == 81 and tracks.shape[0] == 81 and tracks.shape[2] == 2
    moving, static = tracks[:, :2], tracks[:, 2:]
    assert static.shape[1] > 0 and torch.equal(static, static[:1].expand_as(static))
    # the 132x100 image on a 128x96 frame (aspect 1.32 -> 1.333): no crop, scale 0.9697 / 0.96, centres kept
    sx, sy = 128 / 132, 96 / 100
    for i, (handle, target) in enumerate(zip(points.handles, points.targets)):
        for frame, (x, y) in ((0, handle), (80, target)):
            expected = torch.tensor([(x + 0.5) * sx - 0.5, (y + 0.5) * sy - 0.5])
            assert torch.allclose(moving[frame, i], expected, atol=0.01), (frame, i)
    visible = torch.ones(81, tracks.shape[1], dtype=torch.bool)
    positions = create_pos_embeddings(tracks, visible, [4, 8, 8], 96, 128)  # (tracks, 21 latent frames, (y, x))
    assert positions.shape == (tracks.shape[1], 21, 2)  # Wan-Move shuffles the tracks: compare as sets

    def cell(xy):
        return int(xy[1] // 8), int(xy[0] // 8)

    ends = sorted((tuple(p[0].tolist()), tuple(p[-1].tolist())) for p in positions)
    expected = sorted((cell(tracks[0, i]), cell(tracks[80, i])) for i in range(tracks.shape[1]))
    assert ends == expected
    assert sum(first != last for first, last in ends) == 2  # the two drags move across cells, the static ones stay


@pytest.fixture(scope="module")
def wan_server(comfy_server):
    """The shared server (it has the tiny Wan I2V and VAE); skips on a host without Wan-Move."""
    if "WanMoveTrackToVideo" not in comfy_server.object_info():
        pytest.skip(NO_WAN_MOVE)
    return comfy_server


def test_workflow_runs_on_the_tiny_wan(wan_server, tiny_clip_l, tmp_path):
    from dragrun.run_workflow import editor_state_for, fill_inputs, saved_images
    from dragrun.workflow_format import ui_to_api
    from tools.tiny_wan import drop_clip_vision, tiny_wan_i2v_path, tiny_wan_vae_path, use_tiny_wan_text_encoder

    prompt = ui_to_api(json.loads(WORKFLOW.read_text()), wan_server.object_info())
    ids = {n["class_type"]: i for i, n in prompt.items()}
    tracks, coords, video = (prompt[ids[k]]["inputs"] for k in (NODE, "WanMoveTracksFromCoords", "WanMoveTrackToVideo"))
    assert tracks["points"] == [ids["DragKitPointsEditor"], 1] and tracks["mask"] == [ids["DragKitPointsEditor"], 2]
    assert coords["track_coords"] == [ids[NODE], 0] and video["tracks"] == [ids["WanMoveTracksFromCoords"], 0]
    assert video["width"] == [ids[NODE], 1] and video["height"] == [ids[NODE], 2]
    assert video["length"] == [ids["WanMoveTracksFromCoords"], 1] and video["start_image"] == [ids["LoadImage"], 0]
    assert video["clip_vision_output"] == [ids["CLIPVisionEncode"], 0]
    assert prompt[ids["ImageFromBatch"]]["inputs"]["batch_index"] == -1

    assert len(use_tiny_wan_text_encoder(prompt, tiny_clip_l.name)) == 1
    assert len(drop_clip_vision(prompt)) == 2 and "clip_vision_output" not in video
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 255, (48, 66, 3), dtype=np.uint8)).save(tmp_path / "wan.png")
    mask = np.zeros((48, 66), dtype=np.uint8)
    mask[15:35, 15:35] = 255
    Image.fromarray(mask).save(tmp_path / "wan_mask.png")
    points = json.dumps({"points": [[25, 25], [40, 28]]})
    state = editor_state_for(tmp_path / "wan.png", points, tmp_path / "wan_mask.png")
    image = wan_server.upload_image(tmp_path / "wan.png")
    fill_inputs(prompt, image, None, points, "unused", "a test image", state)
    prompt[ids["UNETLoader"]]["inputs"]["unet_name"] = tiny_wan_i2v_path().name
    prompt[ids["VAELoader"]]["inputs"]["vae_name"] = tiny_wan_vae_path().name
    tracks.update(width=64, height=48, frames=9)
    prompt[ids["KSampler"]]["inputs"]["steps"] = 2
    entry = wan_server.run(prompt, timeout=600)
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = saved_images(wan_server, entry)
    [last] = [p for p in saved if p.suffix == ".png"]
    [movie] = [p for p in saved if p.suffix == ".webp"]
    assert Image.open(last).size == (64, 48)
    with Image.open(movie) as webp:
        assert webp.size == (64, 48) and webp.n_frames == 9
        webp.seek(8)
        assert np.array_equal(np.asarray(webp.convert("RGB")).shape, (48, 64, 3))
