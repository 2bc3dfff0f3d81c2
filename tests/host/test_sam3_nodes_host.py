"""Drag Points to SAM3 Points and Combine SAM3 Mask in a real ComfyUI (in-process), and the points through the
host's own SAM3 Detect (ComfyUI >= 0.33) with a stand-in segmenter that marks a disc where SAM3 is told to look."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.host

NO_SAM3 = "ComfyUI < 0.33 has no SAM3"
POINTS, COMBINE = "DragKitPointsToSAM3", "DragKitCombineSAM3Mask"


def _points(host, width, height, *pairs):
    flat = [list(p) for pair in pairs for p in pair]
    return host.pack.dragkit.points.parse_drag_points(json.dumps({"points": flat}), width, height)


@pytest.mark.parametrize("node, name", [(POINTS, "Drag Points to SAM3 Points (DragKit)"),
                                        (COMBINE, "Combine SAM3 Mask (DragKit)")])
def test_the_nodes_are_registered_with_tooltips(comfy_inproc, node, name):
    assert comfy_inproc.pack.NODE_DISPLAY_NAME_MAPPINGS[node] == name
    cls = comfy_inproc.node_class(node)
    assert cls.CATEGORY == "DragKit"
    for group in cls.INPUT_TYPES().values():
        assert all(spec[1].get("tooltip") for spec in group.values())
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)


def test_points_node_writes_the_handles_and_scales_to_the_image_sam3_sees(comfy_inproc):
    points = _points(comfy_inproc, 64, 48, ((10, 20), (30, 20)), ((63, 47), (0, 0)))
    (text,) = comfy_inproc.run_node(POINTS, points=points)
    assert json.loads(text) == [{"x": 10, "y": 20}, {"x": 63, "y": 47}]
    (text,) = comfy_inproc.run_node(POINTS, points=points, image=torch.zeros(1, 96, 128, 3))
    assert json.loads(text)[0] == {"x": 20.5, "y": 40.5}


def test_points_node_errors_name_the_node(comfy_inproc):
    DragPoints = comfy_inproc.pack.dragkit.points.DragPoints  # the pack's own class, as loaded by ComfyUI
    with pytest.raises(ValueError, match=r"^\[Drag Points to SAM3 Points\] no handles"):
        comfy_inproc.run_node(POINTS, points=DragPoints((), (), 64, 48))
    with pytest.raises(ValueError, match=r"^\[Drag Points to SAM3 Points\] handle 1 at \(70, 3\) lies outside"):
        comfy_inproc.run_node(POINTS, points=DragPoints(((70, 3),), ((1, 1),), 64, 48))
    with pytest.raises(ValueError, match=r"^\[Drag Points to SAM3 Points\] points must come from"):
        comfy_inproc.run_node(POINTS, points="[[1, 2]]")


def test_combine_node_gives_one_mask_and_names_itself_in_errors(comfy_inproc):
    painted = torch.zeros(1, 48, 64)
    painted[:, 10:20, 10:20] = 1
    sam = torch.zeros(2, 48, 64)
    sam[0, 30:40, 30:40] = 1
    (mask,) = comfy_inproc.run_node(COMBINE, sam_mask=sam, mode="union", kernel=21, painted_mask=painted)
    assert mask.shape == (1, 48, 64) and int(mask.sum()) == 200
    (mask,) = comfy_inproc.run_node(COMBINE, sam_mask=sam, mode="replace", kernel=21, painted_mask=painted)
    assert int(mask.sum()) == 100
    with pytest.raises(ValueError, match=r"^\[Combine SAM3 Mask\] SAM3 found nothing"):
        comfy_inproc.run_node(COMBINE, sam_mask=torch.zeros(1, 48, 64), mode="union", kernel=21)


class DiscSegmenter:
    """Stands in for SAM3's network behind SAM3_Detect: logits > 0 within ``radius`` of each positive point, on
    the 1008 x 1008 frame SAM3 works on (pixel centres at index + 0.5, as SAM's prompt encoder reads them)."""

    def __init__(self, radius: float):
        self.radius, self.seen = radius, []

    def forward_segment(self, images, point_inputs=None, box_inputs=None, mask_inputs=None):
        assert images.shape[-2:] == (1008, 1008) and point_inputs is not None
        coords = point_inputs["point_coords"][0]
        self.seen.append(coords.clone())
        centre = torch.arange(1008, dtype=torch.float32) + 0.5
        logits = torch.full((1008, 1008), -1.0)
        for x, y in coords.tolist():
            inside = (centre[None, :] - (x + 0.5)) ** 2 + (centre[:, None] - (y + 0.5)) ** 2 <= self.radius ** 2
            logits[inside] = 1.0
        return logits[None, None]


def _detect(comfy_inproc, monkeypatch, image, coords):
    import comfy.model_management

    sam3 = comfy_inproc.nodes.NODE_CLASS_MAPPINGS.get("SAM3_Detect")
    if sam3 is None:
        pytest.skip(NO_SAM3)
    segmenter = DiscSegmenter(radius=60.0)
    model = SimpleNamespace(model=SimpleNamespace(get_dtype=lambda: torch.float32, diffusion_model=segmenter))
    monkeypatch.setattr(comfy.model_management, "load_model_gpu", lambda *a, **k: None)
    with torch.inference_mode():
        out = sam3.execute(model=model, image=image, positive_coords=coords, refine_iterations=1)
    return out.args[0], segmenter


def _centroid(mask):
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    return float(xs.float().mean()), float(ys.float().mean())


@pytest.mark.parametrize("size", [(64, 48), (128, 96), (40, 60)])
def test_sam3_detect_segments_at_the_handle(comfy_inproc, monkeypatch, size):
    """The handle's pixel is where SAM3_Detect looks, on the image the points were placed on or a resized copy."""
    handle = (20, 30)
    points = _points(comfy_inproc, 64, 48, (handle, (40, 30)))
    width, height = size
    image = torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(0))
    (coords,) = comfy_inproc.run_node(POINTS, points=points, image=image)
    masks, segmenter = _detect(comfy_inproc, monkeypatch, image, coords)
    assert masks.shape == (1, height, width) and masks.sum() > 0
    expected = ((handle[0] + 0.5) * width / 64 - 0.5, (handle[1] + 0.5) * height / 48 - 0.5)
    centroid = _centroid(masks[0])
    # SAM3_Detect scales x by 1008 / W without the half-pixel shift, so it looks up to half a pixel of the image
    # it sees from the pixel's centre (0.48 px at W = 40); the disc's few pixels add their own rounding
    assert abs(centroid[0] - expected[0]) <= 0.75 and abs(centroid[1] - expected[1]) <= 0.75, (centroid, expected)
    [[x, y]] = segmenter.seen[0].tolist()  # on the 1008 frame: the handle's pixel centre, less half a 1008-pixel
    assert x + 0.5 == pytest.approx((handle[0] + 0.5) * 1008 / 64, abs=0.5 * 1008 / width)
    assert y + 0.5 == pytest.approx((handle[1] + 0.5) * 1008 / 48, abs=0.5 * 1008 / height)


def test_sam3_mask_through_combine_is_the_region_drag_warp_moves(comfy_inproc, monkeypatch):
    points = _points(comfy_inproc, 64, 48, ((20, 30), (40, 30)))
    image = torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(1))
    (coords,) = comfy_inproc.run_node(POINTS, points=points)
    masks, _ = _detect(comfy_inproc, monkeypatch, image, coords)
    (region,) = comfy_inproc.run_node(COMBINE, sam_mask=masks, mode="union", kernel=21,
                                      painted_mask=torch.zeros(1, 48, 64))
    warped, inpaint = comfy_inproc.run_node("DragKitPixelWarp", image=image, points=points, band=5,
                                            neighbours="exact", mask=region)
    assert torch.equal(warped[0, 30, 40], image[0, 30, 20])  # the handle's pixel moved to the target
    assert torch.equal(warped[0, :, 55:], image[0, :, 55:])  # far right of the moved disc: untouched
    assert inpaint.sum() > 0
