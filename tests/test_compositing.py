"""Feathered paste of the edit into the source, and the point overlay."""

import pytest
import torch

from dragkit.compositing import draw_points, inward_feather, paste_edit
from dragkit.errors import DragInputError


def test_inward_feather_is_zero_outside_and_linear_inside():
    mask = torch.zeros(20, 20)
    mask[2:18, 2:18] = 1
    weight = inward_feather(mask, 4)
    assert weight[mask == 0].abs().max() == 0
    assert weight[10, 2:8].tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert torch.equal(inward_feather(mask, 0), mask)


def test_mask_touching_the_border_is_not_eroded_by_it():
    mask = torch.ones(8, 8)
    assert torch.equal(inward_feather(mask, 3), torch.ones(8, 8))


def test_paste_keeps_unmasked_source_exactly_and_places_the_vae_crop():
    source = torch.rand(21, 30, 3)
    edited = torch.rand(16, 24, 3)
    mask = torch.zeros(21, 30)
    mask[5:15, 8:20] = 1
    out = paste_edit(source, edited, mask, feather=0)
    assert torch.equal(out[mask == 0], source[mask == 0])
    assert torch.allclose(out[10, 10], edited[10 - 2, 10 - 3])


def test_paste_refuses_unrelated_sizes():
    with pytest.raises(DragInputError, match="decoded image is 8x8"):
        paste_edit(torch.rand(32, 32, 3), torch.rand(8, 8, 3), torch.ones(32, 32), 2)


def test_draw_points_colours_handle_target_and_shaft():
    image = torch.zeros(100, 100, 3)
    out = draw_points(image, torch.tensor([[20.0, 50.0]]), torch.tensor([[80.0, 50.0]]))
    assert out[50, 20].tolist() == pytest.approx([0.9, 0.1, 0.1])
    assert out[50, 80].tolist() == pytest.approx([0.1, 0.3, 0.95])
    assert out[50, 50].tolist() == [1.0, 1.0, 1.0]
    assert out[10, 10].tolist() == [0.0, 0.0, 0.0]
    assert image.abs().sum() == 0
