"""Inpaint4Drag's bidirectional pixel warp (dragkit.pixel_warp): known answers on constructed images, and Drag100.

Images are built so that every pixel's colour names the pixel it came from (:func:`_numbered`), so the
tests can read where every output pixel was sampled.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest
import torch

from dragkit.errors import DragInputError
import math

from dragkit.pixel_warp import (
    connected_components,
    contour_edges,
    dilate,
    dilate_disc,
    euler_number,
    exact_sources,
    fill_holes,
    fill_polygons,
    grid_idw,
    idw,
    pixel_warp,
    region_labels,
    released_band,
    released_idw,
)

DRAG100 = Path(__file__).resolve().parents[2] / "shared" / "data" / "Drag100"


def _numbered(height: int, width: int, dtype=torch.float32) -> torch.Tensor:
    """A ``(1, H, W, 3)`` image whose pixel ``(row, col)`` holds ``(row, col, 1)`` (exact in float32)."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([rows, cols, torch.ones_like(rows)], dim=-1)[None].to(dtype)


def _origin(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` each output pixel of a warped :func:`_numbered` image was sampled from."""
    return image[0, ..., 0].long(), image[0, ..., 1].long()


def _pts(*xy) -> torch.Tensor:
    return torch.tensor(xy, dtype=torch.float32)


def _box(height: int, width: int, top: int, left: int, bottom: int, right: int) -> torch.Tensor:
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[top:bottom, left:right] = True
    return mask


# ---------------------------------------------------------------- known answers


@pytest.mark.parametrize("dx, dy", [(7, 3), (-5, 9), (0, -6)])
def test_a_textured_patch_moves_by_the_drag(dx, dy):
    height, width = 48, 64
    texture = torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(dx * 31 + dy))
    mask = _box(height, width, 15, 20, 30, 36)
    result = pixel_warp(texture, mask, _pts((25, 20)), _pts((25 + dx, 20 + dy)))
    assert torch.equal(result.image[0, 15 + dy : 30 + dy, 20 + dx : 36 + dx], texture[0, 15:30, 20:36])
    assert torch.equal(result.target_mask, _box(height, width, 15 + dy, 20 + dx, 30 + dy, 36 + dx))
    uncovered = mask & ~result.target_mask
    assert bool(result.inpaint_mask[uncovered].all())
    changed = (result.image != texture).any(-1)[0]
    assert not bool((changed & ~result.target_mask).any())
    untouched = ~(dilate(mask | result.target_mask, 7))  # the band reaches 3 px at k = 5
    assert not bool((result.inpaint_mask & untouched).any())
    assert torch.equal(result.image[0][untouched], texture[0][untouched])


def test_the_inpaint_mask_is_the_uncovered_part_grown_plus_the_moved_edge():
    mask = _box(40, 40, 10, 10, 20, 20)
    plain = pixel_warp(_numbered(40, 40), mask, _pts((12, 12)), _pts((16, 12)), band=0)
    assert torch.equal(plain.inpaint_mask, _box(40, 40, 10, 10, 20, 14))
    banded = pixel_warp(_numbered(40, 40), mask, _pts((12, 12)), _pts((16, 12)), band=3)
    edge = _box(40, 40, 10, 14, 20, 24) & ~_box(40, 40, 11, 15, 19, 23)
    assert torch.equal(banded.inpaint_mask, dilate(_box(40, 40, 10, 10, 20, 14), 3) | dilate_disc(edge, 2))
    assert torch.equal(pixel_warp(_numbered(40, 40), mask, _pts((12, 12)), _pts((16, 12)), band=2).inpaint_mask,
                       banded.inpaint_mask)
    assert released_band(4) == 5 and released_band(0) == 0 and released_band(5) == 5


def test_several_regions_and_several_handles_per_region():
    height, width = 60, 80
    image = _numbered(height, width)
    left = _box(height, width, 5, 5, 25, 25)
    right = _box(height, width, 30, 40, 50, 70)
    still = _box(height, width, 5, 60, 15, 75)
    handles = _pts((8, 8), (20, 20), (50, 40), (45, 2))
    targets = _pts((12, 11), (24, 23), (47, 44), (40, 2))
    result = pixel_warp(image, left | right | still, handles, targets)
    assert result.moved_pairs == (0, 1, 2) and result.ignored_pairs == (3,) and result.still_regions == 1
    rows, cols = _origin(result.image)
    # Both handles of the left square drag it by (4, 3): a pure shift.
    assert torch.equal(result.target_mask[8:28, 9:29], torch.ones(20, 20, dtype=torch.bool))
    assert torch.equal(rows[8:28, 9:29], image[0, 5:25, 5:25, 0].long())
    assert torch.equal(cols[8:28, 9:29], image[0, 5:25, 5:25, 1].long())
    # The right rectangle's single handle drags it by (-3, 4).
    assert torch.equal(rows[34:54, 37:67], image[0, 30:50, 40:70, 0].long())
    assert torch.equal(cols[34:54, 37:67], image[0, 30:50, 40:70, 1].long())
    # The region without a handle is untouched and not in the inpaint mask.
    assert torch.equal(result.image[0][still], image[0][still])
    assert not bool(result.inpaint_mask[still].any())


@pytest.mark.parametrize("neighbours", ["exact", "as_released"])
def test_the_upper_region_is_pasted_last_where_targets_overlap(neighbours):
    """OpenCV lists external contours bottom-up, so the release pastes the upper region last (it wins)."""
    image = _numbered(30, 40)
    upper = _box(30, 40, 2, 2, 8, 8)
    lower = _box(30, 40, 12, 2, 18, 8)
    # listed lower first, then upper: the order of the pairs must not matter
    result = pixel_warp(image, upper | lower, _pts((4, 14), (4, 4)), _pts((20, 14), (20, 14)), neighbours=neighbours)
    rows, cols = _origin(result.image)
    assert torch.equal(rows[12:18, 18:24], torch.arange(2, 8)[:, None].expand(6, 6))
    assert torch.equal(cols[12:18, 18:24], torch.arange(2, 8).expand(6, 6))
    assert int(rows[14, 20]) == 4 and int(cols[14, 20]) == 4  # both pairs' target shows the upper handle's pixel


def test_the_backward_map_leaves_no_holes_when_a_region_stretches():
    height, width = 64, 64
    image = _numbered(height, width)
    mask = _box(height, width, 20, 20, 36, 36)
    # One handle pinned, one pulled far: the moved pixels spread apart, the backward map fills between them.
    result = pixel_warp(image, mask, _pts((22, 28), (34, 28)), _pts((22, 28), (56, 28)))
    rows, cols = _origin(result.image)
    target = result.target_mask
    assert int(target.sum()) > int(mask.sum()) * 1.5
    came_from = dilate(mask, 3)[rows, cols]  # at most one pixel outside the source region (rounding at its edge)
    assert bool(came_from[target].all())
    assert bool(mask[rows, cols][target].float().mean() > 0.97)
    assert not bool(result.inpaint_mask[target & ~dilate(~target, 9)].any())  # the band reaches 3 px past the edge pixels


def test_a_move_that_leaves_the_image_is_clipped():
    image = _numbered(32, 32)
    mask = _box(32, 32, 10, 20, 20, 30)
    result = pixel_warp(image, mask, _pts((25, 15)), _pts((31, 15)))
    assert torch.equal(result.target_mask, _box(32, 32, 10, 26, 20, 32))
    rows, cols = _origin(result.image)
    assert torch.equal(cols[10:20, 26:32], torch.arange(20, 26).expand(10, 6))
    assert bool(result.inpaint_mask[10:20, 20:26].all())


def test_pixels_whose_source_is_outside_the_image_are_inpainted():
    image = _numbered(32, 32)
    mask = _box(32, 32, 10, 0, 20, 8)
    # A region on the left border, one handle pulled right and one pinned: the backward map of two
    # target pixels at the border points past x = 0.
    args = (image, mask, _pts((2, 15), (6, 12)), _pts((4, 15), (6, 12)))
    plain = pixel_warp(*args, band=0)
    no_source = plain.inpaint_mask & plain.target_mask  # with band 0 the rest of the mask lies outside T
    assert int(no_source.sum()) == 2
    rows, cols = _origin(plain.image)
    assert torch.equal(rows[no_source], image[0, ..., 0][no_source].long())  # they keep their colour ...
    assert torch.equal(cols[no_source], image[0, ..., 1][no_source].long())
    assert bool(pixel_warp(*args).inpaint_mask[no_source].all())  # ... and join the mask at every band


def test_no_mask_or_an_empty_mask_means_the_whole_image_moves():
    image = _numbered(24, 24)
    for mask in (None, torch.zeros(24, 24)):
        result = pixel_warp(image, mask, _pts((10, 10)), _pts((13, 10)), band=0)
        assert torch.equal(result.source_mask, torch.ones(24, 24, dtype=torch.bool))
        assert torch.equal(result.inpaint_mask, _box(24, 24, 0, 0, 24, 3))
        assert torch.equal(result.image[0, :, 3:], image[0, :, :21])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_colours_are_gathered_in_the_image_dtype(dtype):
    texture = torch.rand(2, 20, 24, 4, generator=torch.Generator().manual_seed(3)).to(dtype)
    result = pixel_warp(texture, _box(20, 24, 4, 4, 12, 12), _pts((6, 6)), _pts((9, 8)))
    assert result.image.dtype == dtype and result.image.shape == texture.shape
    assert torch.equal(result.image[:, 6:14, 7:15], texture[:, 4:12, 4:12])


def test_as_released_neighbours_agree_on_a_shift():
    image = _numbered(40, 40)
    mask = _box(40, 40, 5, 5, 30, 30)
    exact = pixel_warp(image, mask, _pts((10, 10)), _pts((15, 12)))
    released = pixel_warp(image, mask, _pts((10, 10)), _pts((15, 12)), neighbours="as_released")
    assert torch.equal(exact.image, released.image) and torch.equal(exact.inpaint_mask, released.inpaint_mask)


def test_bad_input_is_refused():
    image = _numbered(16, 16)
    mask = _box(16, 16, 2, 2, 6, 6)
    with pytest.raises(DragInputError, match="no handle lies inside the mask"):
        pixel_warp(image, mask, _pts((10, 10)), _pts((12, 10)))
    with pytest.raises(DragInputError, match="handle 1 .* outside the 16x16 image"):
        pixel_warp(image, mask, _pts((16, 3)), _pts((12, 3)))
    with pytest.raises(DragInputError, match="more than one image side"):
        pixel_warp(image, mask, _pts((3, 3)), _pts((40, 3)))
    with pytest.raises(DragInputError, match="unknown neighbours"):
        pixel_warp(image, mask, _pts((3, 3)), _pts((5, 3)), neighbours="fast")
    with pytest.raises(DragInputError, match="band must be"):
        pixel_warp(image, mask, _pts((3, 3)), _pts((5, 3)), band=-1)
    with pytest.raises(DragInputError, match=r"mask must be \(16, 16\)"):
        pixel_warp(image, torch.ones(8, 16), _pts((3, 3)), _pts((5, 3)))
    with pytest.raises(DragInputError, match="NaN"):
        pixel_warp(image, mask, _pts((3, float("nan"))), _pts((5, 3)))
    with pytest.raises(DragInputError, match="every handle needs a target"):
        pixel_warp(image, mask, _pts((3, 3), (4, 4)), _pts((5, 3)))
    with pytest.raises(DragInputError, match=r"\(B, H, W, C\)"):
        pixel_warp(image[0], mask, _pts((3, 3)), _pts((5, 3)))


# ---------------------------------------------------------------- the pieces against per-pixel references


def _components_reference(mask: torch.Tensor, connectivity: int) -> torch.Tensor:
    """Breadth-first labelling, label = raster index of the component's first pixel."""
    height, width = mask.shape
    labels = torch.full((height, width), -1, dtype=torch.long)
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    for r in range(height):
        for c in range(width):
            if mask[r, c] and labels[r, c] < 0:
                label = r * width + c
                labels[r, c] = label
                queue = deque([(r, c)])
                while queue:
                    y, x = queue.popleft()
                    for dy, dx in steps:
                        ny, nx = y + dy, x + dx
                        if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and labels[ny, nx] < 0:
                            labels[ny, nx] = label
                            queue.append((ny, nx))
    return labels


@pytest.mark.parametrize("seed", range(6))
def test_connected_components_match_a_flood_fill(seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(23, 31, generator=gen) < (0.35 + 0.05 * seed)
    for connectivity in (4, 8):
        assert torch.equal(connected_components(mask, connectivity), _components_reference(mask, connectivity))


def test_connected_components_follow_a_long_winding_path():
    """A serpentine one-pixel path (one run per row in the turns, the label travels end to end) and a
    diagonal staircase (8-connected only): each is one component."""
    mask = torch.zeros(41, 40, dtype=torch.bool)
    mask[0::4, 1:39] = True
    mask[1::8, 38] = mask[2::8, 38] = mask[3::8, 38] = True
    mask[5::8, 1] = mask[6::8, 1] = mask[7::8, 1] = True
    for connectivity in (4, 8):
        labels = connected_components(mask, connectivity)
        assert torch.equal(labels, _components_reference(mask, connectivity))
        assert torch.unique(labels[mask]).numel() == 1
    stairs = torch.eye(30, dtype=torch.bool).flip(1)
    assert torch.unique(connected_components(stairs, 8)[stairs]).tolist() == [29]
    assert torch.unique(connected_components(stairs, 4)[stairs]).numel() == 30


def test_regions_fill_holes_and_join_diagonal_neighbours():
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[2:12, 2:12] = True
    mask[4:10, 4:10] = False  # a hole ...
    mask[6:8, 6:8] = True  # ... with an island: both belong to the ring's region
    mask[12, 12] = True  # touches the ring's corner diagonally: same region
    mask[15:18, 15:18] = True
    labels, count = region_labels(mask)
    assert count == 2
    assert bool((labels[2:12, 2:12] == labels[2, 2]).all()) and int(labels[12, 12]) == int(labels[2, 2])
    assert bool((labels[15:18, 15:18] == labels[15, 15]).all()) and int(labels[15, 15]) != int(labels[2, 2])
    assert int(labels[0, 0]) == -1 and int(labels[13, 13]) == -1
    assert torch.equal(fill_holes(mask)[4:10, 4:10], torch.ones(6, 6, dtype=torch.bool))


@pytest.mark.parametrize("seed", range(4))
def test_the_contour_fill_reproduces_the_region(seed):
    mask = torch.rand(25, 30, generator=torch.Generator().manual_seed(seed)) < 0.6
    labels, _ = region_labels(mask)
    for label in torch.unique(labels[labels >= 0]).tolist():
        region = labels == label
        corners, chain = contour_edges(region)
        assert torch.equal(fill_polygons(corners[chain[:, 0]], corners[chain[:, 1]], 25, 30), region)


def test_a_polygon_fill_of_a_triangle():
    corners = _pts((-0.5, -0.5), (9.5, -0.5), (-0.5, 9.5))
    start, end = corners, corners.roll(-1, 0)
    filled = fill_polygons(start, end, 10, 10)
    rows, cols = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
    assert torch.equal(filled, rows + cols <= 9)  # centres on the slanted (right-hand) edge count as inside


def _ordered_reference(queries, references, vectors, k=4):
    out = []
    for q in queries.tolist():
        ranked = sorted(
            range(len(references)),
            key=lambda j: ((references[j][0] - q[0]) ** 2 + (references[j][1] - q[1]) ** 2,
                           references[j][1] - q[1], references[j][0] - q[0], j),
        )[:k]
        weights = [1 / (((references[j][0] - q[0]) ** 2 + (references[j][1] - q[1]) ** 2) ** 0.5 + 1e-6) for j in ranked]
        total = sum(weights)
        out.append([sum(w * vectors[j][d] for w, j in zip(weights, ranked)) / total for d in range(2)])
    return torch.tensor(out)


@pytest.mark.parametrize("seed", range(4))
def test_grid_idw_takes_the_exact_nearest_references(seed, monkeypatch):
    import dragkit.pixel_warp as module

    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", 4096)  # take the grid path even for these small sets
    gen = torch.Generator().manual_seed(seed)
    references = torch.randint(0, 30, (300, 2), generator=gen)
    references[:40] = references[40:80]  # shared pixels
    vectors = torch.randint(-9, 10, (300, 2), generator=gen)
    queries = torch.unique(torch.randint(-6, 36, (200, 2), generator=gen), dim=0)
    expected = _ordered_reference(queries, references.tolist(), vectors.tolist())
    assert torch.allclose(grid_idw(queries, references, vectors), expected, atol=1e-4)
    sparse = references[::60]  # five references far apart: the discs must grow
    expected = _ordered_reference(queries, sparse.tolist(), vectors[::60].tolist())
    assert torch.allclose(grid_idw(queries, sparse, vectors[::60]), expected, atol=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_exact_sources_equal_the_rounded_idw_over_one_reference_per_pixel(seed, monkeypatch):
    """The exact backward map's shortcut (a query with a reference on its own pixel takes that
    reference's source) gives what rounding the IDW over every query gives; both kinds of query occur."""
    import dragkit.pixel_warp as module

    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 40, (900, 2), generator=gen)
    moved = pixels // 2 * 3 + torch.randint(-1, 2, (900, 2), generator=gen)  # stretched (holes) and folded (shared)
    back = pixels - moved
    priority = torch.rand(900, generator=gen)
    queries = torch.unique(torch.randint(-2, 62, (1500, 2), generator=gen), dim=0)
    kept = {}
    for j in range(900):  # the reference of a pixel: smallest priority, then the earlier one
        key = tuple(moved[j].tolist())
        if key not in kept or priority[j] < priority[kept[key]]:
            kept[key] = j
    kept = torch.tensor(sorted(kept.values()))
    on_reference = torch.tensor([tuple(q) in {tuple(m) for m in moved[kept].tolist()} for q in queries.tolist()])
    assert 0 < int(on_reference.sum()) < queries.shape[0]
    for chunk in (1 << 22, 4096):  # all pairs, then the grid
        monkeypatch.setattr(module, "_CHUNK_ELEMENTS", chunk)
        expected = torch.round(queries.float() + grid_idw(queries, moved[kept], back[kept])).long()
        assert torch.equal(exact_sources(queries, moved, back, priority), expected)
        some = grid_idw(queries, moved[kept], back[kept], wanted=~on_reference)
        assert torch.equal(some[~on_reference], grid_idw(queries, moved[kept], back[kept])[~on_reference])
        assert not some[on_reference].any()


def test_idw_uses_the_nearest_handles():
    handles = _pts((0, 0), (10, 0))
    drags = _pts((2, 0), (0, 4))
    value = idw(_pts((0, 0), (10, 0), (5, 0)), handles, drags)
    assert torch.allclose(value[0], drags[0], atol=1e-5) and torch.allclose(value[1], drags[1], atol=1e-5)
    assert torch.allclose(value[2], (drags[0] + drags[1]) / 2)
    assert torch.equal(idw(_pts((3, 7)), handles[:1], drags[:1]), drags[:1])


# ---------------------------------------------------------------- Drag100


@pytest.mark.skipif(not (DRAG100 / "art_0").is_dir(), reason=f"the shipped Drag100 data is not at {DRAG100}")
def test_the_pixel_benchmark_times_both_options_on_art_0_and_a_blob():
    from benchmarks.warp import format_pixel_table, run_pixel_benchmark

    result = run_pixel_benchmark(repeats=1, sizes=(64,), samples=("art_0",), drag100=DRAG100)
    cases = [(row["case"], row["size"], row["variant"], row["region_px"]) for row in result["rows"]]
    assert cases == [("art_0", "512x512", "exact", 37255), ("art_0", "512x512", "as_released", 37255),
                     ("blob", "64x64", "exact", 1201), ("blob", "64x64", "as_released", 1201)]
    assert all(row["median_ms"] > 0 for row in result["rows"])
    assert "art_0   512x512" in format_pixel_table(result)


@pytest.mark.skipif(not DRAG100.is_dir(), reason=f"the shipped Drag100 data is not at {DRAG100}")
def test_every_drag100_sample_warps_and_moves_its_handles():
    """No sample fails; every handle's own pixel lands on its target (unless another pair's handle or target
    sits there: both cannot), and where the forward map moves the handle's 5x5 neighbourhood rigidly, the 3x3
    around the target shows exactly the 3x3 around the handle."""
    from dragkit.datasets import sample_folders

    folders = sample_folders(DRAG100)
    assert len(folders) == 100
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops: on a shared 2-core machine one thread is several times faster
    try:
        centres, rigid = _check_drag100(folders)
    finally:
        torch.set_num_threads(threads)
    assert centres > 200 and rigid > 50


def _check_drag100(folders) -> tuple[int, int]:
    """The checks of :func:`test_every_drag100_sample_warps_and_moves_its_handles`; returns how many pairs each covered."""
    from dragkit.datasets import load_sample

    centres = rigid = 0
    for folder in folders:
        sample = load_sample(folder)
        image = torch.from_numpy(sample.image.copy())[None]
        mask = None if sample.mask is None else torch.from_numpy(sample.mask)
        handles, targets = sample.points.handles_tensor(), sample.points.targets_tensor()
        result = pixel_warp(image, mask, handles, targets)
        assert result.image.dtype == torch.uint8 and result.image.shape == image.shape
        labels, _ = region_labels(torch.ones(sample.height, sample.width, dtype=torch.bool) if mask is None else mask)
        handle_labels = labels[handles[:, 1].long(), handles[:, 0].long()]
        for pair in result.moved_pairs:
            hx, hy = (int(v) for v in handles[pair].tolist())
            tx, ty = (int(v) for v in targets[pair].tolist())
            if not (2 <= tx < sample.width - 2 and 2 <= ty < sample.height - 2):
                continue
            others = torch.cat([handles, targets])[[i for i in range(2 * len(handles)) if i % len(handles) != pair]]
            if bool((others.long() == torch.tensor([tx, ty])).all(1).any()):
                continue  # another pair's handle or target sits on this target: both cannot hold there
            assert torch.equal(result.image[0, ty, tx], image[0, hy, hx]), f"{folder.name}: pair {pair + 1}"
            centres += 1
            same = handle_labels == handle_labels[pair]
            rows, cols = torch.meshgrid(torch.arange(hy - 2, hy + 3), torch.arange(hx - 2, hx + 3), indexing="ij")
            around = torch.stack([cols.flatten(), rows.flatten()], 1).float()
            moved = torch.round(around + idw(around, handles[same], (targets - handles)[same]))
            if torch.equal(moved - around, (targets[pair] - handles[pair]).expand_as(around)) and hy >= 1 and hx >= 1:
                assert torch.equal(result.image[0, ty - 1 : ty + 2, tx - 1 : tx + 2], image[0, hy - 1 : hy + 2, hx - 1 : hx + 2]), (
                    f"{folder.name}: pair {pair + 1} did not move its neighbourhood"
                )
                rigid += 1
    return centres, rigid


# ---------------------------------------------------------------- the band, as OpenCV's thick line


def _thick_outline(height: int, width: int, top: int, left: int, bottom: int, right: int, k: int) -> torch.Tensor:
    """OpenCV's closed rectangle outline through pixel centres ``(left, top)``-``(right, bottom)`` drawn ``k`` thick.

    From its definition: thickness 1 is the one-pixel outline; an odd ``k > 1`` covers every pixel
    centre within ``k / 2 + 0.5`` of a side (a rectangle of that half-width around each side, a disc
    of that radius on each vertex).
    """
    rows, cols = torch.meshgrid(torch.arange(height).double(), torch.arange(width).double(), indexing="ij")
    dx = torch.clamp(torch.maximum(left - cols, cols - right), min=0)
    dy = torch.clamp(torch.maximum(top - rows, rows - bottom), min=0)
    outside = torch.hypot(dx, dy)
    inside = torch.minimum(torch.minimum(cols - left, right - cols), torch.minimum(rows - top, bottom - rows))
    distance = torch.where((dx > 0) | (dy > 0), outside, inside)
    return distance <= (0 if k == 1 else k / 2 + 0.5)


BAND_COUNTS = {1: 431, 3: 791, 5: 1001, 7: 1208}
"""Inpaint-mask pixels of :func:`test_the_band_is_opencvs_thick_line` as the released ``bi_warp`` marks them (measured)."""


@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize("neighbours", ["exact", "as_released"])
def test_the_band_is_opencvs_thick_line(k, neighbours):
    """A rigid move: the moved contour is the target rectangle's outline, drawn k thick (k = 1: one pixel)."""
    height, width = 64, 72
    mask = _box(height, width, 10, 12, 30, 40)  # rows 10..29, columns 12..39
    result = pixel_warp(_numbered(height, width), mask, _pts((20, 20)), _pts((31, 27)), band=k, neighbours=neighbours)
    band = _thick_outline(height, width, 17, 23, 36, 50, k)
    uncovered = dilate(mask & ~_box(height, width, 17, 23, 37, 51), k)
    assert torch.equal(result.inpaint_mask, uncovered | band)
    assert int(result.inpaint_mask.sum()) == BAND_COUNTS[k]
    if k > 1:  # reaches (k + 1) / 2 px from the outline, not (k - 1) / 2 as a k x k square would
        assert bool(result.inpaint_mask[17, 50 + (k + 1) // 2]) and not bool(result.inpaint_mask[17, 51 + (k + 1) // 2])


BORDER_COUNTS = {"stays on the border": 432, "leaves past the border": 324}
"""Inpaint-mask pixels of :func:`test_the_band_runs_along_the_border_only_where_the_target_ends_there` by the release."""


@pytest.mark.parametrize("case", list(BORDER_COUNTS))
def test_the_band_runs_along_the_border_only_where_the_target_ends_there(case):
    """The release's contour of a region on the top border runs along row 0 and is drawn there; the part of a
    target that left the image has its contour outside, so no band along the border where it was cut."""
    height, width = 40, 48
    mask = _box(height, width, 0, 10, 12, 30)
    drag = (8, 0) if case == "stays on the border" else (0, -6)
    result = pixel_warp(_numbered(height, width), mask, _pts((20, 6)), _pts((20 + drag[0], 6 + drag[1])))
    top = result.inpaint_mask[0:3, 22:34]  # above the middle of the target, at the border
    if case == "stays on the border":
        assert bool(top.all()) and not bool(result.inpaint_mask[4, 22:34].any())
    else:
        assert not bool(result.inpaint_mask[0, 14:26].any())
        assert bool(result.inpaint_mask[0, 10 - 3 : 10 + 1].all())  # the sides' band still reaches the border
    assert int(result.inpaint_mask.sum()) == BORDER_COUNTS[case]


# ---------------------------------------------------------------- as released: the 100-reference backward map


def _released_reference(queries, references, vectors, k=4):
    """Hand-written: ``q + sum w_j v_j`` over the ``k`` nearest references (exact distances), and whether a tie
    at the ``k``-th place or a sum within 1e-4 of ``.5`` makes the answer depend on ties or float order."""
    out, unsure = [], []
    for qx, qy in queries:
        ranked = sorted((math.hypot(rx - qx, ry - qy), j) for j, (rx, ry) in enumerate(references))
        chosen = ranked[:k]
        weights = [1 / (d + 1e-6) for d, _ in chosen]
        total = sum(weights)
        value = [q + sum(w * vectors[j][a] for w, (_, j) in zip(weights, chosen)) / total for a, q in enumerate((qx, qy))]
        tie = len(ranked) > k and abs(ranked[k][0] - ranked[k - 1][0]) < 1e-4
        half = any(abs(v - math.floor(v) - 0.5) < 1e-4 for v in value)
        out.append([round(v) for v in value])
        unsure.append(tie or half)
    return out, unsure


def test_as_released_stretch_follows_a_hand_written_100_reference_idw():
    """Two handles stretch a 17 x 35 region (595 pixels: the 100 references are every 6th moved pixel in raster
    order, exact in any float): the forward map over the handles and the backward map over those 100 references,
    written out here, give every target pixel's source."""
    height, width = 60, 80
    mask = _box(height, width, 20, 10, 37, 45)
    handles, targets = [(14, 28), (40, 28)], [(12, 30), (62, 24)]
    result = pixel_warp(_numbered(height, width), mask, _pts(*handles), _pts(*targets), neighbours="as_released")
    pixels = [(x, y) for y in range(20, 37) for x in range(10, 45)]
    drags = [(tx - hx, ty - hy) for (hx, hy), (tx, ty) in zip(handles, targets)]
    moved, unsure_forward = _released_reference(pixels, handles, drags)
    assert not any(unsure_forward)
    references = [moved[6 * i] for i in range(100)]
    back = [(pixels[6 * i][0] - moved[6 * i][0], pixels[6 * i][1] - moved[6 * i][1]) for i in range(100)]
    target = result.target_mask
    queries = [(x, y) for y, x in torch.nonzero(target).tolist()]
    sources, unsure = _released_reference(queries, references, back)
    rows, cols = _origin(result.image)
    checked = 0
    for (x, y), (sx, sy), skip in zip(queries, sources, unsure):
        if skip or not (0 <= sx < width and 0 <= sy < height):
            continue
        assert (int(cols[y, x]), int(rows[y, x])) == (sx, sy), (x, y)
        checked += 1
    assert int(target.sum()) > 800 and checked > 0.75 * int(target.sum())  # the rest: ties on the reference lattice
    assert int(target.sum()) > int(mask.sum()) * 1.4  # it did stretch


@pytest.mark.parametrize("count", [2, 3, 4, 100, 400])
def test_released_idw_ranks_like_topk_over_all_references(count):
    """The tiled search (many references) and the sorting network (a few) give what ``topk`` over every
    reference gives, on integer references with many exact ties (their order decides the summation order)."""
    gen = torch.Generator().manual_seed(count)
    points = torch.randint(0, 90, (3000, 2), generator=gen).float()
    references = torch.randint(0, 90, (count, 2), generator=gen).float()
    if count <= 4:  # placed symmetrically: every point on a bisector ties
        references = _pts((30, 40), (50, 40), (40, 30), (40, 50))[:count]
    vectors = torch.randn(count, 2, generator=gen)
    if count > 100:  # the release subsamples to 100 by raster index first
        pick = torch.linspace(0, count - 1, 100).long()
        expected_refs, expected_vectors = references[pick], vectors[pick]
    else:
        expected_refs, expected_vectors = references, vectors
    distance = torch.hypot(points[:, None, 0] - expected_refs[:, 0], points[:, None, 1] - expected_refs[:, 1])
    nearest, order = torch.topk(distance, min(4, expected_refs.shape[0]), dim=1, largest=False)
    weights = 1.0 / (nearest + 1e-6)
    weights = weights / weights.sum(dim=1, keepdim=True)
    expected = (weights[..., None] * expected_vectors[order]).sum(dim=1)
    sorted_distance = torch.sort(distance, dim=1).values[:, : min(5, count)]
    assert bool((sorted_distance[:, 1:] == sorted_distance[:, :-1]).any(1).sum() > 30)  # ties are exercised
    value = released_idw(points, references, vectors)
    if count <= 16:  # every reference compared: topk's order exactly
        assert torch.equal(value, expected)
    else:  # ties among the 4 nearest keep the order found: the same value up to the order of the sum
        assert torch.allclose(value, expected, rtol=0, atol=1e-5)
        for p in (points, points + 0.5):  # pixels and pixel corners round alike
            assert torch.equal(torch.round(p + value), torch.round(p + expected))


def test_released_idw_rounds_like_topk_where_tied_sums_sit_on_a_half():
    """Points at the centres of a lattice of references have their 4 nearest at one distance. The vectors
    take each reference back to the origin plus 0.3, 0.7, 0.2 or 0.8, so at every centre ``p + value`` is
    0.5 in exact arithmetic, which float sums miss by a few ulps of the vectors either way depending on their
    order: topk's order decides the rounding (55 centres round differently in another order)."""
    rows, cols = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
    references = torch.stack([cols.flatten(), rows.flatten()], 1).float() * 4
    parity = (2 * (rows % 2) + cols % 2).flatten()
    offsets = torch.stack([torch.tensor([0.3, 0.7, 0.2, 0.8])[parity], torch.tensor([0.8, 0.3, 0.2, 0.7])[parity]], 1)
    vectors = offsets - references
    ys, xs = torch.meshgrid(torch.arange(37), torch.arange(37), indexing="ij")
    points = torch.stack([xs.flatten(), ys.flatten()], 1).float()
    distance = torch.hypot(points[:, None, 0] - references[:, 0], points[:, None, 1] - references[:, 1])
    nearest, order = torch.topk(distance, 4, dim=1, largest=False)
    weights = 1.0 / (nearest + 1e-6)
    weights = weights / weights.sum(dim=1, keepdim=True)
    expected = (weights[..., None] * vectors[order]).sum(dim=1)
    value = released_idw(points, references, vectors)
    on_half = ((points + expected - 0.5).abs() < 1e-4).any(1)
    assert int(on_half.sum()) > 50
    assert torch.equal(torch.round(points + value), torch.round(points + expected))


@pytest.mark.parametrize("seed", range(6))
def test_the_euler_number_counts_components_minus_holes(seed):
    """Against the flood fills: 8-connected components of the mask minus 4-connected background components
    that do not reach the border (region_labels skips the hole filling when they agree)."""
    mask = torch.rand(21, 27, generator=torch.Generator().manual_seed(seed)) < (0.3 + 0.08 * seed)
    components = int(torch.unique(_components_reference(mask, 8)[mask]).numel())
    background = _components_reference(torch.nn.functional.pad(~mask, (1, 1, 1, 1), value=True), 4)
    holes = int(torch.unique(background[background >= 0]).numel()) - 1
    assert euler_number(mask) == components - holes
    assert holes > 0 or seed < 2  # the denser masks have holes
