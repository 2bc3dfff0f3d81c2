"""DAI, GoodDrag's Dragging Accuracy Index: does the content at each handle arrive at its target?

For one image with N handle/target pairs ``(h_i, t_i)`` and a patch radius γ,

    S_i(γ) = ‖Ω(I_source, h_i, γ) − Ω(I_result, t_i, γ)‖²₂

is the squared L2 difference of the (2γ+1)×(2γ+1)×3 patches, on RGB in
[0, 1], summed over the pixels and the three channels. Then

- ``DAI (paper)``       = Σ_i S_i / (2γ+1)² / N            (the paper's formula),
- ``DAI (as released)`` = Σ_i S_i / (2γ+1)² / N / N        (``compute_DAI.py``
  divides by the number of pairs twice; published DAI values used this).

Both are reported for γ ∈ {1, 5, 10, 20}; a dataset's DAI is the mean over
its images. Lower is better. The two agree on one-pair images.

Patches (:func:`patch`): a point ``(x, y)`` in pixels (x = column, y = row)
is rounded to the nearest pixel (half to even); Ω covers rows y−γ..y+γ and
columns x−γ..x+γ. The released code slices the array and has no border
rule (a patch that leaves the image there breaks or shrinks). Here a patch
always has (2γ+1)² pixels: coordinates outside the image are clamped to the
nearest edge pixel (edge replication). Patches inside the image are the
released ones exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import DragInputError
from .images import as_float_image

DAI_GAMMAS = (1, 5, 10, 20)
"""The patch radii DAI is reported for (GoodDrag)."""

DAI_PAPER = "DAI (paper)"
"""Label of the paper's normalisation: divided by the patch area and by the number of pairs once."""

DAI_RELEASED = "DAI (as released)"
"""Label of the released code's normalisation: divided by the number of pairs twice."""


def _pixel(point: Sequence[float], width: int, height: int) -> tuple[int, int]:
    x, y = float(point[0]), float(point[1])
    if not (0 <= x <= width - 1 and 0 <= y <= height - 1):
        raise DragInputError(f"point ({x:g}, {y:g}) is outside the {width}x{height} image")
    return int(round(x)), int(round(y))


def patch(image, point_xy: Sequence[float], gamma: int) -> torch.Tensor:
    """Ω(I, p, γ): the ``(2γ+1, 2γ+1, 3)`` patch of ``image`` centred on ``point_xy``.

    Args:
        image: ``(H, W, 3)`` RGB (uint8, or float in [0, 1]).
        point_xy: ``(x, y)`` in pixels of ``image``; rounded to the nearest pixel.
        gamma: patch radius in pixels (>= 0).

    Returns:
        float32 in [0, 1]; element ``[r, c]`` is pixel ``(x − γ + c, y − γ + r)``
        with coordinates clamped into the image (edge replication).
    """
    if int(gamma) != gamma or gamma < 0:
        raise DragInputError(f"the DAI patch radius must be a whole number >= 0, got {gamma}")
    img = as_float_image(image)
    height, width = img.shape[:2]
    x, y = _pixel(point_xy, width, height)
    offsets = torch.arange(-int(gamma), int(gamma) + 1)
    rows = (y + offsets).clamp(0, height - 1)
    cols = (x + offsets).clamp(0, width - 1)
    return img[rows][:, cols]


def dai_pair_sums(source, result, handles, targets, gamma: int) -> torch.Tensor:
    """S_i(γ) for every pair: ``(N,)`` float64 sums of squared patch differences.

    ``source`` and ``result`` are ``(H, W, 3)`` images of the same size;
    ``handles`` and ``targets`` are ``N`` ``(x, y)`` pixel points (sequences or
    an ``(N, 2)`` tensor). The source is read around each handle, the result
    around its target.
    """
    src, res = as_float_image(source), as_float_image(result)
    if src.shape != res.shape:
        raise DragInputError(
            f"the result is {res.shape[1]}x{res.shape[0]} but the source is {src.shape[1]}x{src.shape[0]}; "
            "resize the result to the source's size first"
        )
    handles, targets = [list(map(float, p)) for p in handles], [list(map(float, p)) for p in targets]
    if len(handles) != len(targets) or not handles:
        raise DragInputError(f"DAI needs at least one pair and as many targets as handles, got {len(handles)} and {len(targets)}")
    sums = [
        (patch(src, h, gamma).to(torch.float64) - patch(res, t, gamma).to(torch.float64)).square().sum()
        for h, t in zip(handles, targets)
    ]
    return torch.stack(sums)


def dai(source, result, handles, targets, gammas: Sequence[int] = DAI_GAMMAS) -> dict[str, dict[int, float]]:
    """DAI of one image in both normalisations, for each γ.

    Returns ``{DAI_PAPER: {γ: value}, DAI_RELEASED: {γ: value}}`` (see the
    module docstring; inputs as :func:`dai_pair_sums`).
    """
    out: dict[str, dict[int, float]] = {DAI_PAPER: {}, DAI_RELEASED: {}}
    for gamma in gammas:
        sums = dai_pair_sums(source, result, handles, targets, gamma)
        pairs = sums.shape[0]
        paper = float(sums.sum()) / (2 * int(gamma) + 1) ** 2 / pairs
        out[DAI_PAPER][int(gamma)] = paper
        out[DAI_RELEASED][int(gamma)] = paper / pairs
    return out
