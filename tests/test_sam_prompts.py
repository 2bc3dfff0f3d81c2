"""Drag handles as SAM3 point prompts and the SAM/painted mask combination (dragkit/sam_prompts.py)."""

import json

import numpy as np
import pytest
import torch

from dragkit.errors import DragInputError
from dragkit.points import DragPoints
from dragkit.sam_prompts import combine_sam_mask, sam3_points_json, sam3_positive_points


def points(handles, targets=None, width=64, height=48):
    targets = targets or [(x + 5, y) for x, y in handles]
    return DragPoints(tuple(handles), tuple(targets), width, height)


def test_handles_pass_through_as_pixels_of_the_same_image():
    value = json.loads(sam3_points_json(points([(10, 20), (63, 0), (12.25, 47)])))
    assert value == [{"x": 10, "y": 20}, {"x": 63, "y": 0}, {"x": 12.25, "y": 47}]
    assert isinstance(value[0]["x"], int)  # integral values written as ints, as SAM3's points editors write


def test_targets_are_not_prompts():
    assert sam3_positive_points(points([(1, 2)], [(40, 30)])) == [{"x": 1, "y": 2}]


def test_a_resized_image_keeps_each_pixel_centre_in_place():
    # 64x48 -> 128x96: pixel 10's centre (10.5) lands on 21 -> index 20.5; SAM3_Detect then scales by 1008 / 128
    [p] = sam3_positive_points(points([(10, 20)]), width=128, height=96)
    assert p == {"x": 20.5, "y": 40.5}
    [q] = sam3_positive_points(points([(0, 47)]), width=32, height=24)  # down: edge pixels stay at the edge
    assert q == {"x": -0.25, "y": 23.25}
    # what SAM3_Detect feeds its prompt encoder (x / W * 1008, then + 0.5 for the pixel centre) is the same
    # place on the 1008-pixel frame for the same pixel whichever size SAM3 sees
    same = (10 / 64 * 1008) + 0.5 * 1008 / 64
    resized = (p["x"] / 128 * 1008) + 0.5 * 1008 / 128
    assert resized == pytest.approx(same)


def test_no_handles_is_refused():
    with pytest.raises(DragInputError, match="no handles"):
        sam3_positive_points(DragPoints((), (), 64, 48))


@pytest.mark.parametrize("handle", [(64, 10), (-1, 0), (3, 48)])
def test_a_handle_outside_the_image_is_refused(handle):
    with pytest.raises(DragInputError, match=r"handle 2 at .* outside the 64x48 image"):
        sam3_positive_points(points([(1, 1), handle]))


def test_a_bad_image_size_is_refused():
    with pytest.raises(DragInputError, match="at least 1x1"):
        sam3_positive_points(points([(1, 1)]), width=0, height=5)


def box(x0, y0, x1, y1, height=40, width=50):
    mask = torch.zeros(height, width)
    mask[y0:y1, x0:x1] = 1
    return mask


def test_union_replace_and_refine():
    painted, sam = box(10, 10, 30, 30), box(20, 5, 45, 25)
    assert torch.equal(combine_sam_mask(painted, sam, "union"), ((painted + sam) > 0).float())
    assert torch.equal(combine_sam_mask(painted, sam[None], "replace"), sam)
    refined = combine_sam_mask(painted, sam, "refine (Inpaint4Drag)", kernel=5)
    # by hand: SAM within the painted box grown by 2 px, plus the painted box shrunk by 2 px
    expected = (sam.bool() & box(8, 8, 32, 32).bool()) | box(12, 12, 28, 28).bool()
    assert torch.equal(refined.bool(), expected)
    assert refined.dtype == torch.float32 and refined.shape == (40, 50)


def test_refine_at_the_border_neither_grows_nor_erodes_there():
    painted = box(0, 0, 10, 10)
    refined = combine_sam_mask(painted, torch.zeros(40, 50), "refine (Inpaint4Drag)", kernel=5)
    assert torch.equal(refined.bool(), box(0, 0, 8, 8).bool())  # eroded only on the inner sides


def test_several_sam_masks_are_unioned_and_nothing_painted_gives_sam():
    a, b = box(0, 0, 5, 5), box(40, 30, 50, 40)
    for painted in (None, torch.zeros(1, 40, 50)):
        for mode in ("union", "refine (Inpaint4Drag)", "replace"):
            assert torch.equal(combine_sam_mask(painted, torch.stack([a, b]), mode), a + b)


def test_empty_region_and_bad_inputs_are_refused():
    with pytest.raises(DragInputError, match="SAM3 found nothing"):
        combine_sam_mask(None, torch.zeros(1, 40, 50))
    with pytest.raises(DragInputError, match="SAM3 found nothing"):
        combine_sam_mask(box(1, 1, 5, 5), torch.zeros(40, 50), "replace")
    with pytest.raises(DragInputError, match="painted mask is 30x40"):
        combine_sam_mask(torch.ones(40, 30), box(1, 1, 5, 5))
    with pytest.raises(DragInputError, match="odd number"):
        combine_sam_mask(None, box(1, 1, 5, 5), "refine (Inpaint4Drag)", kernel=4)
    with pytest.raises(DragInputError, match="mode must be one of"):
        combine_sam_mask(None, box(1, 1, 5, 5), "intersect")
    with pytest.raises(DragInputError, match="NaN"):
        combine_sam_mask(None, torch.full((40, 50), float("nan")))
    with pytest.raises(DragInputError, match="holds 2 masks"):
        combine_sam_mask(torch.ones(2, 40, 50), box(1, 1, 5, 5))


def test_refine_matches_a_dilate_erode_written_with_numpy():
    rng = np.random.default_rng(0)
    painted = torch.from_numpy(rng.random((30, 36)) > 0.6).float()
    sam = torch.from_numpy(rng.random((30, 36)) > 0.5).float()
    k = 3
    p = np.pad(painted.numpy() > 0.5, 1, constant_values=False)
    grown = np.zeros((30, 36), bool)
    for dy in range(3):
        for dx in range(3):
            grown |= p[dy:dy + 30, dx:dx + 36]
    q = np.pad(painted.numpy() > 0.5, 1, constant_values=True)
    shrunk = np.ones((30, 36), bool)
    for dy in range(3):
        for dx in range(3):
            shrunk &= q[dy:dy + 30, dx:dx + 36]
    expected = ((sam.numpy() > 0.5) & grown) | shrunk
    assert np.array_equal(combine_sam_mask(painted, sam, "refine (Inpaint4Drag)", kernel=k).numpy() > 0.5, expected)
