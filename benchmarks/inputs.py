"""The synthetic edit every benchmark path times: one image, one drag, one mask (seeded)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dragkit.points import DragPoints, parse_drag_points


@dataclass(frozen=True)
class EditInputs:
    """``image`` ``(side, side, 3)`` in [0, 1]; one pair from (0.40, 0.50)·side to (0.55, 0.45)·side;
    ``mask`` ``(side, side)``, the centre half editable; ``context`` a random prompt embedding ``(1, 77, dim)``."""

    side: int
    image: torch.Tensor
    points: DragPoints
    mask: torch.Tensor
    context: torch.Tensor


def edit_inputs(side: int, context_dim: int) -> EditInputs:
    image = torch.rand(side, side, 3, generator=torch.Generator().manual_seed(1))
    points = parse_drag_points({"points": [[side * 0.40, side * 0.50], [side * 0.55, side * 0.45]]}, side, side)
    mask = torch.zeros(side, side)
    mask[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 1
    context = torch.randn(1, 77, context_dim, generator=torch.Generator().manual_seed(2))
    return EditInputs(side, image, points, mask, context)
