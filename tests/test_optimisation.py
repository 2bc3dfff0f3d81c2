"""The shared optimiser set-up: which latent cells the mask term keeps."""

import torch

from dragkit.geometry import LatentGeometry
from dragkit.optimisation import keep_map


def test_a_mask_that_survives_the_downsampling_keeps_the_released_nearest_rule():
    geometry = LatentGeometry(64, 64)
    mask = torch.zeros(64, 64)
    mask[16:40, 8:30] = 1
    keep, widened = keep_map(geometry, mask)
    assert not widened
    assert torch.equal(keep, (~geometry.mask_to_latent(mask)).float())


def test_a_mask_too_small_for_the_nearest_rule_makes_every_touched_cell_editable():
    """3x3 painted pixels (13..15) fall between the nearest rule's samples (pixels 8 and 16): keep them editable."""
    geometry = LatentGeometry(64, 48)
    mask = torch.zeros(48, 64)
    mask[13:16, 13:16] = 1
    assert not geometry.mask_to_latent(mask).any()
    keep, widened = keep_map(geometry, mask)
    editable = torch.nonzero(keep == 0).tolist()
    assert widened and editable == [[1, 1]] and keep.shape == (6, 8)


def test_the_touch_rule_follows_the_crop():
    """A 66-pixel-wide image drops one column on each side (VAE Encode's centre crop): pixel 8 is in latent column 0."""
    geometry = LatentGeometry(66, 32)
    mask = torch.zeros(32, 66)
    mask[20, 8] = 1
    keep, widened = keep_map(geometry, mask)
    assert widened and torch.nonzero(keep == 0).tolist() == [[2, 0]]
