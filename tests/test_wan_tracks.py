"""Drag pairs as Wan-Move tracks (dragkit/wan_tracks.py): shapes, endpoints, easing, static tracks, the crop."""

import json

import pytest
import torch

from dragkit.errors import DragInputError
from dragkit.points import DragPoints
from dragkit.wan_tracks import EASINGS, FrameMap, check_wan_frames, drag_tracks, ease, tracks_json

PAIRS = DragPoints(((100.0, 60.0), (30.0, 20.0)), ((140.0, 80.0), (30.0, 50.0)), 208, 120)


def region(top, left, bottom, right, height=120, width=208):
    mask = torch.zeros(height, width)
    mask[top:bottom, left:right] = 1
    return mask


@pytest.mark.parametrize("easing", EASINGS)
def test_moving_tracks_start_at_the_handles_and_end_at_the_targets(easing):
    tracks, moving = drag_tracks(PAIRS, 81, 208, 120, easing)  # same size and aspect: pixels unchanged
    assert tracks.shape == (81, 2, 2) and moving == 2
    assert torch.equal(tracks[0], PAIRS.handles_tensor(torch.float64))
    assert torch.allclose(tracks[-1], PAIRS.targets_tensor(torch.float64), atol=1e-12)
    # every track moves along its straight drag, monotonically
    steps = tracks[1:] - tracks[:-1]
    drag = (PAIRS.targets_tensor(torch.float64) - PAIRS.handles_tensor(torch.float64))
    assert (steps * drag[None]).sum(-1).min() >= 0


@pytest.mark.parametrize("easing", EASINGS)
def test_easing_is_monotone_from_0_to_1(easing):
    t = torch.linspace(0, 1, 201, dtype=torch.float64)
    e = ease(t, easing)
    assert e[0] == 0 and e[-1] == 1 and (e[1:] - e[:-1]).min() >= 0
    if easing != "linear":
        assert not torch.allclose(e, t)
    if easing == "ease_in_out":
        assert e[100] == pytest.approx(0.5) and e[20] < t[20] and e[180] > t[180]


def test_static_tracks_stay_still_outside_the_moving_region():
    mask = region(50, 90, 70, 110)  # around the first handle (100, 60), which moves by (40, 20)
    tracks, moving = drag_tracks(PAIRS, 9, 208, 120, "linear", mask, grid=4)
    static = tracks[:, moving:]
    assert static.shape[1] > 0 and torch.equal(static, static[:1].expand_as(static))
    # the lattice: 4 x 4 cell centres; the swept region (x 90..150, y 50..90) holds none of the kept ones
    for x, y in static[0].tolist():
        assert not (90 - 0.5 <= x <= 150 and 50 - 0.5 <= y <= 90), (x, y)
    lattice = {(round(x, 3), round(y, 3)) for x, y in static[0].tolist()}
    assert (25.5, 14.5) in lattice and (129.5, 74.5) not in lattice  # (129.5, 74.5) lies on the sweep
    assert len(lattice) == 16 - 1


def test_no_mask_or_an_empty_one_gives_no_static_tracks():
    for mask in (None, torch.zeros(1, 120, 208)):
        tracks, moving = drag_tracks(PAIRS, 5, 208, 120, "linear", mask, grid=4)
        assert tracks.shape == (5, 2, 2) and moving == 2
    tracks, _ = drag_tracks(PAIRS, 5, 208, 120, "linear", region(0, 0, 10, 10), grid=0)
    assert tracks.shape == (5, 2, 2)


def test_the_centre_crop_is_the_one_wan_move_applies_to_the_start_image():
    import torch.nn.functional as F

    # a 300x120 image on an 832x480 (aspect 1.733) frame: 300 * (1.733 / 2.5) = 208 columns kept, 46 cut each side
    frame = FrameMap(300, 120, 832, 480)
    assert (frame.crop_x, frame.crop_y) == (46, 0)
    # a marked pixel of the source lands where the tracks put it, after the crop and the resize
    image = torch.zeros(1, 1, 120, 300)
    image[0, 0, 60, 150] = 1
    cropped = image[..., :, 46:254]
    resized = F.interpolate(cropped, size=(480, 832), mode="bilinear", align_corners=False)[0, 0]
    ys, xs = torch.nonzero(resized > 0, as_tuple=True)
    centre = ((xs.double() * resized[ys, xs]).sum() / resized[ys, xs].sum(),
              (ys.double() * resized[ys, xs]).sum() / resized[ys, xs].sum())
    mapped = frame.to_video(torch.tensor([150.0, 60.0], dtype=torch.float64))
    assert float(mapped[0]) == pytest.approx(float(centre[0]), abs=0.05)
    assert float(mapped[1]) == pytest.approx(float(centre[1]), abs=0.05)
    assert torch.allclose(frame.to_source(frame.to_video(torch.tensor([[7.0, 9.0]]))), torch.tensor([[7.0, 9.0]]))
    tall = FrameMap(100, 300, 480, 480)
    assert (tall.crop_x, tall.crop_y) == (0, 100)


def test_points_cropped_away_are_refused_and_edge_pixels_are_kept_inside():
    wide = DragPoints(((10.0, 60.0),), ((150.0, 60.0),), 300, 120)
    with pytest.raises(DragInputError, match="handle 1 lies outside the 832x480 video frame"):
        drag_tracks(wide, 5, 832, 480)
    small = DragPoints(((0.0, 0.0),), ((415.0, 239.0),), 416, 240)  # 2x down-scale: edge centres at -0.25
    tracks, _ = drag_tracks(small, 5, 208, 120)
    assert tracks[0, 0].tolist() == [0.0, 0.0] and tracks[-1, 0].tolist() == [207.0, 119.0]


def test_bad_inputs_are_refused():
    with pytest.raises(DragInputError, match="no drag pairs"):
        drag_tracks(DragPoints((), (), 64, 48), 5, 64, 48)
    with pytest.raises(DragInputError, match="frames must be between"):
        drag_tracks(PAIRS, 1, 208, 120)
    with pytest.raises(DragInputError, match="easing must be one of"):
        drag_tracks(PAIRS, 5, 208, 120, "bounce")
    with pytest.raises(DragInputError, match="the mask is 20x10"):
        drag_tracks(PAIRS, 5, 208, 120, mask=torch.ones(10, 20))
    with pytest.raises(DragInputError, match="grid must be"):
        drag_tracks(PAIRS, 5, 208, 120, grid=-1)
    for frames in (4, 80, 3):
        with pytest.raises(DragInputError, match="4k \\+ 1"):
            check_wan_frames(frames)
    check_wan_frames(81)
    check_wan_frames(5)


def test_json_is_what_wan_move_reads():
    tracks, _ = drag_tracks(PAIRS, 5, 208, 120, "linear")
    data = json.loads(tracks_json(tracks))
    assert len(data) == 2 and all(len(track) == 5 for track in data)
    assert data[0][0] == {"x": 100.0, "y": 60.0} and data[0][-1] == {"x": 140.0, "y": 80.0}
    assert data[1][2] == {"x": 30.0, "y": 35.0}
