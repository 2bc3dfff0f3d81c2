"""MD's matching step: where did each handle's content go in the result?

DragDiffusion's protocol (``run_eval_point_matching.py``): the DIFT features
of the source and of the result, each bilinearly upsampled
(``align_corners=False``) to the image's H×W; for each handle, its source
feature vector is compared by cosine similarity with the result's feature at
**every** pixel (no mask, no window); the best pixel is the matched point and
its L2 distance in pixels to the target is the pair's distance. MD is the
mean over all pairs (of a dataset: over all its pairs, not per image).

The H×W×C upsampled map is never built (1280×512×512 floats is 1.3 GB):
:func:`match_points` samples it in blocks of rows with ``grid_sample``
(bilinear, border padding, ``align_corners=False``), which gives exactly the
values ``F.interpolate(..., size=(H, W), mode="bilinear")`` would.

Coordinates: points are ``(x, y)`` pixels (x = column, y = row), rounded to
the nearest pixel (half to even) as the reference indexes integer points;
matched points are integer ``(x, y)`` pixels. Ties go to the first pixel in
row-major order (numpy's ``argmax``, as released).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import DragInputError

COSINE_EPS = 1e-8
"""``torch.nn.CosineSimilarity``'s eps: cos = a·b / max(‖a‖‖b‖, eps)."""


def _check_features(features: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(features, torch.Tensor) or features.dim() != 3:
        raise DragInputError(f"the {what} features must be a (channels, height, width) tensor")
    if not torch.isfinite(features).all():
        raise DragInputError(f"the {what} features contain NaN or infinite values")
    return features.to(torch.float32)


def _pixels(points, width: int, height: int) -> torch.Tensor:
    pts = torch.as_tensor(points, dtype=torch.float64).reshape(-1, 2)
    inside = (pts[:, 0] >= 0) & (pts[:, 0] <= width - 1) & (pts[:, 1] >= 0) & (pts[:, 1] <= height - 1)
    if not bool(inside.all()):
        raise DragInputError(f"points {pts[~inside].tolist()} are outside the {width}x{height} image")
    return torch.round(pts).to(torch.long)


def _normalised_grid(cols: torch.Tensor, rows: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """grid_sample coordinates of pixel centres ``(rows[i], cols[j])`` of an H×W image, ``(1, R, C, 2)``."""
    gx = (cols.to(torch.float32) + 0.5) / width * 2.0 - 1.0
    gy = (rows.to(torch.float32) + 0.5) / height * 2.0 - 1.0
    grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1)
    return grid[None]


def upsampled_at(features: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Features upsampled to ``height`` x ``width`` (bilinear), at the pixels ``rows`` × ``cols``: ``(C, R, C')``."""
    grid = _normalised_grid(cols, rows, width, height).to(features.device)
    out = F.grid_sample(features[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0]


def match_points(
    source_features: torch.Tensor,
    result_features: torch.Tensor,
    handles_xy,
    image_size: tuple[int, int],
    rows_per_block: int = 64,
) -> torch.Tensor:
    """The result pixel whose feature best matches each handle's source feature.

    Args:
        source_features, result_features: ``(C, h, w)`` feature maps of the
            source and the result image (any stride: both are upsampled to
            the image size).
        handles_xy: ``N`` handle points ``(x, y)`` in source pixels.
        image_size: ``(height, width)`` of the images in pixels.
        rows_per_block: image rows of the upsampled result map held at once.

    Returns:
        ``(N, 2)`` long tensor of matched ``(x, y)`` pixels.
    """
    src = _check_features(source_features, "source")
    res = _check_features(result_features, "result").to(src.device)
    if src.shape[0] != res.shape[0]:
        raise DragInputError(f"the source features have {src.shape[0]} channels but the result's have {res.shape[0]}")
    height, width = int(image_size[0]), int(image_size[1])
    handles = _pixels(handles_xy, width, height)
    if handles.shape[0] == 0:
        raise DragInputError("no handles to match")
    vectors = torch.stack([
        upsampled_at(src, h[1:2], h[0:1], width, height)[:, 0, 0] for h in handles
    ])  # (N, C)
    vector_norms = vectors.norm(dim=1)
    best = torch.full((handles.shape[0],), -float("inf"), device=src.device)
    best_index = torch.zeros(handles.shape[0], dtype=torch.long, device=src.device)
    all_cols = torch.arange(width)
    for start in range(0, height, max(1, int(rows_per_block))):
        rows = torch.arange(start, min(height, start + max(1, int(rows_per_block))))
        block = upsampled_at(res, rows, all_cols, width, height).flatten(1)  # (C, R*W)
        cos = (vectors @ block) / (vector_norms[:, None] * block.norm(dim=0)[None, :]).clamp_min(COSINE_EPS)
        value, index = cos.max(dim=1)
        better = value > best
        best = torch.where(better, value, best)
        best_index = torch.where(better, index + start * width, best_index)
    best_index = best_index.cpu()
    return torch.stack([best_index % width, best_index // width], dim=1)


def mean_distance(
    source_features: torch.Tensor,
    result_features: torch.Tensor,
    handles_xy,
    targets_xy,
    image_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair distances for MD: ``(distances (N,) float64 pixels, matched (N, 2) (x, y) pixels)``.

    ``distances[i]`` = ‖matched_i − round(target_i)‖₂. MD is the mean of the
    distances over every pair of the dataset.
    """
    height, width = int(image_size[0]), int(image_size[1])
    targets = _pixels(targets_xy, width, height)
    matched = match_points(source_features, result_features, handles_xy, image_size)
    if matched.shape != targets.shape:
        raise DragInputError(f"{matched.shape[0]} handles but {targets.shape[0]} targets")
    return (matched - targets).to(torch.float64).norm(dim=1), matched
