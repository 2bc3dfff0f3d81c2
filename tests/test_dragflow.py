"""DragFlow's plan (regions, moves, gradient mask, weights) from the editor's mask and points: known answers (no host)."""

from __future__ import annotations

import math

import pytest
import torch

from dragkit import dragflow as D
from dragkit.errors import DragInputError


def test_feature_blocks_and_grid_follow_the_release():
    assert D.default_feature_blocks(19) == ((17, "modulated"), (17, "output"), (18, "modulated"), (18, "output"))
    assert D.default_feature_blocks(1) == ((0, "modulated"), (0, "output"))
    assert D.cut_shape((128, 128)) == (256, 256)  # 1024²: scale level 4
    assert D.cut_shape((96, 96)) == (256, 256)  # 768²: level 3
    assert D.cut_shape((64, 64)) == (256, 256)  # 512²: level 2


def test_region_is_the_filled_component_holding_the_handle():
    mask = torch.zeros(20, 30)
    mask[2:12, 2:12] = 1
    mask[5:8, 5:8] = 0  # a hole: filled, as the release fills each external contour
    mask[2:12, 20:28] = 1  # another region
    region = D.region_at(mask, 3, 3)
    assert region[2:12, 2:12].all() and region.sum() == 100
    assert D.region_at(mask, 15, 15) is None


def test_gradient_mask_is_the_min_area_rectangle_around_region_and_moved_copy():
    region = torch.zeros(40, 40, dtype=torch.bool)
    region[10:20, 10:16] = True
    box = D.min_area_rect(region | D.translated(region, 8, 0))  # a horizontal move: the axis-aligned bounding box
    expected = torch.zeros_like(region)
    expected[10:20, 10:24] = True
    assert torch.equal(box, expected)
    diagonal = D.min_area_rect(region | D.translated(region, 10, 10))
    assert diagonal[10:30, 10:26].sum() >= (region | D.translated(region, 10, 10)).sum()  # holds both
    area = float(diagonal.sum())
    assert area < 20 * 16  # a rotated rectangle: smaller than the axis-aligned bounding box (320 px)


def test_plan_scales_points_and_weights_regions():
    mask = torch.zeros(64, 96)
    mask[8:24, 8:24] = 1
    mask[40:60, 50:90] = 1
    plan = D.plan_dragflow(mask, torch.tensor([[16.0, 16.0], [70.0, 50.0]]), torch.tensor([[30.0, 20.0], [60.0, 50.0]]), (8, 12))
    assert plan.cut == (32, 48)
    assert [op.delta for op in plan.operations] == [(7.0, 2.0), (-5.0, 0.0)]
    small, large = 256 / (64 * 96), 800 / (64 * 96)
    raw = [min(max(1 + 0.5 / (f + 0.1), 1), 5) for f in (small, large)]
    assert [op.weight for op in plan.operations] == pytest.approx([r / sum(raw) for r in raw])
    assert math.isclose(sum(op.weight for op in plan.operations), 1.0)
    assert plan.editable.shape == (1, 1, 8, 12) and plan.editable[0, 0, 2, 2] == 1 and plan.editable[0, 0, 0, 11] == 0
    with pytest.raises(DragInputError, match=r"handle 1 at \(1, 1\) is outside the mask"):
        D.plan_dragflow(mask, torch.tensor([[1.0, 1.0]]), torch.tensor([[5.0, 5.0]]), (8, 12))


def test_translation_grid_moves_by_the_weighted_delta():
    image = torch.zeros(1, 1, 16, 16)
    image[0, 0, 4, 4] = 1.0
    moved = torch.nn.functional.grid_sample(image, D.translation_grid((6.0, 2.0), 0.5, (16, 16)), align_corners=False)
    assert moved[0, 0].argmax().item() == 5 * 16 + 7  # (4, 4) + 0.5 · (6, 2)
