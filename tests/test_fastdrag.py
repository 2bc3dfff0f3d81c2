"""FastDrag's latent warp, BNNI and object moving (dragkit.fastdrag).

Exact expectations are written out by hand; the vectorised code is also compared with the per-cell loops
of ``benchmarks/reference_loops.py`` (written from METHODS.md, one cell at a time).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.reference_loops import bnni_loops, fastdrag_loops, warp_loops
from dragkit.errors import DragInputError
from dragkit.fastdrag import (
    bnni_fill,
    cell_grid,
    displacement_field,
    fastdrag_edit,
    handle_weights,
    latent_warp,
    mask_circle,
    object_move,
    released_destinations,
    stretch_factors,
)


def _numbered_latent(height: int, width: int, channels: int = 4) -> torch.Tensor:
    """A float64 latent whose every value is distinct and nonzero."""
    values = torch.arange(1, channels * height * width + 1, dtype=torch.float64)
    return values.reshape(1, channels, height, width)


def _pts(*xy: tuple[float, float]) -> torch.Tensor:
    return torch.tensor(xy, dtype=torch.float32)


def _random_points(gen: torch.Generator, n: int, height: int, width: int) -> torch.Tensor:
    """``n`` latent points in quarter-cell steps, like LatentGeometry.points_to_latent."""
    x = torch.randint(0, 4 * width, (n,), generator=gen)
    y = torch.randint(0, 4 * height, (n,), generator=gen)
    return torch.stack([x, y], dim=1).to(torch.float32) / 4


def _blob_mask(gen: torch.Generator, height: int, width: int) -> torch.Tensor:
    """A random ellipse, or random scattered cells, never empty."""
    if torch.rand((), generator=gen) < 0.5:
        rows = torch.arange(height, dtype=torch.float64)[:, None]
        cols = torch.arange(width, dtype=torch.float64)[None, :]
        cy, cx = torch.rand(2, generator=gen, dtype=torch.float64) * torch.tensor([height, width])
        ry, rx = 1 + torch.rand(2, generator=gen, dtype=torch.float64) * torch.tensor([height, width]) / 2
        mask = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 < 1
    else:
        mask = torch.rand(height, width, generator=gen) < 0.4
    mask[int(torch.randint(0, height, (), generator=gen)), int(torch.randint(0, width, (), generator=gen))] = True
    return mask


# ---------------------------------------------------------------- warp: one handle


def test_handle_at_centre_moves_by_drag_and_stretch_falls_linearly_along_a_ray():
    # 33x33, whole latent masked: circle centre (16, 16), radius 16*sqrt(2). Drag 16 cells right.
    z = _numbered_latent(33, 33)
    mask = torch.ones(33, 33, dtype=torch.bool)
    handle, target = _pts((16, 16)), _pts((32, 16))
    field = displacement_field(handle, target, mask)
    warped, null = latent_warp(z, handle, target, mask)
    # The diagonal ray from the handle to the (0, 0) corner: cell (16-k, 16-k) has s = 1 - k/16.
    for k in range(17):
        row = col = 16 - k
        s = 1 - k / 16
        assert field[row, col].tolist() == pytest.approx([16 * s, 0.0], abs=1e-12)
        # it moves 16 - k columns right (rows do not move; it is the first writer of that cell)
        assert torch.equal(warped[0, :, row, col + (16 - k)], z[0, :, row, col])
    # the handle cell moves by exactly the drag vector, the corner (on the circle) stays
    assert torch.equal(warped[0, :, 16, 32], z[0, :, 16, 16])
    assert field[0, 0].tolist() == [0.0, 0.0]
    assert torch.equal(warped[0, :, 0, 0], z[0, :, 0, 0])
    assert not torch.isnan(warped).any()
    assert null[16, 16]  # the handle's old cell: nobody lands there (its neighbours move right too)


def test_stretch_is_zero_beyond_the_circle_and_unmasked_cells_stay():
    z = _numbered_latent(40, 40)
    mask = torch.zeros(40, 40, dtype=torch.bool)
    mask[10:21, 12:25] = True  # rows 10..20, cols 12..24
    handle, target = _pts((17.5, 14.25)), _pts((21, 16.75))
    centre, radius_sq = mask_circle(mask)
    assert centre.tolist() == [18.0, 15.0]
    assert radius_sq == 6.0**2 + 5.0**2
    s = stretch_factors(handle, centre, radius_sq, cell_grid(40, 40))[0]
    rows = torch.arange(40, dtype=torch.float64)[:, None]
    cols = torch.arange(40, dtype=torch.float64)[None, :]
    outside = (cols - 18) ** 2 + (rows - 15) ** 2 > radius_sq
    assert outside.any() and (s[outside] == 0).all()
    assert (s[~outside] >= 0).all() and (s[~outside] <= 1).all()
    assert s[10, 12] == pytest.approx(0.0, abs=1e-12) and s[20, 24] == pytest.approx(0.0, abs=1e-12)  # box corners
    field = displacement_field(handle, target, mask)
    assert (field[outside] == 0).all()

    warped, null = latent_warp(z, handle, target, mask)
    dest = torch.zeros(40, 40, dtype=torch.bool)
    for r, c in torch.nonzero(mask).tolist():
        dr = min(max(int(torch.round(r + field[r, c, 1])), 0), 39)
        dc = min(max(int(torch.round(c + field[r, c, 0])), 0), 39)
        dest[dr, dc] = True
    untouched = ~mask & ~dest
    assert torch.equal(warped[..., untouched], z[..., untouched])
    assert (dest & ~mask).any()  # some writes landed outside the mask
    assert torch.equal(null, mask & ~dest)
    assert (warped[..., null] == 0).all()


def test_handle_exactly_on_a_cell_gives_no_nan_and_follows_the_drag():
    z = _numbered_latent(12, 12)
    mask = torch.ones(12, 12, dtype=torch.bool)
    assert stretch_factors(_pts((5, 6)), *mask_circle(mask), cell_grid(12, 12))[0, 6, 5] == 1
    warped, _ = latent_warp(z, _pts((5, 6)), _pts((7.5, 6)), mask)
    assert torch.equal(warped[0, :, 6, 8], z[0, :, 6, 5])  # 5 + 2.5 = 7.5 -> 8 (half to even)
    assert torch.isfinite(warped).all()


# ---------------------------------------------------------------- warp: several handles


def test_two_handles_weights_sum_to_one_and_a_handle_cell_follows_its_handle():
    handles = _pts((10, 10), (25, 20))
    targets = _pts((14, 12), (22, 24))
    weights = handle_weights(handles, cell_grid(40, 40))
    assert weights.shape == (2, 40, 40)
    assert torch.allclose(weights.sum(0), torch.ones(40, 40, dtype=torch.float64), atol=1e-12, rtol=0)
    assert weights[0, 10, 10] > 0.9999 and weights[1, 20, 25] > 0.9999
    assert weights[0, 12, 11] > weights[1, 12, 11]  # nearer handle weighs more

    mask = torch.ones(40, 40, dtype=torch.bool)
    field = displacement_field(handles, targets, mask)
    assert field[10, 10].tolist() == pytest.approx([4, 2], abs=1e-3)
    assert field[20, 25].tolist() == pytest.approx([-3, 4], abs=1e-3)
    z = _numbered_latent(40, 40)
    warped, _ = latent_warp(z, handles, targets, mask)
    assert torch.equal(warped[0, :, 12, 14], z[0, :, 10, 10])
    assert torch.equal(warped[0, :, 24, 22], z[0, :, 20, 25])


def test_pin_pair_keeps_its_cell_while_another_pair_drags():
    z = _numbered_latent(30, 30)
    mask = torch.ones(30, 30, dtype=torch.bool)
    warped, _ = latent_warp(z, _pts((8, 8), (20, 20)), _pts((8, 8), (24, 20)), mask)
    assert torch.equal(warped[0, :, 8, 8], z[0, :, 8, 8])
    assert torch.equal(warped[0, :, 20, 24], z[0, :, 20, 20])


# ---------------------------------------------------------------- warp: against the per-cell oracle


@pytest.mark.parametrize("seed", range(12))
def test_vectorised_warp_equals_per_cell_oracle(seed):
    gen = torch.Generator().manual_seed(seed)
    height, width = [(9, 13), (16, 16), (24, 20), (13, 31)][seed % 4]
    z = torch.randn(1, 4, height, width, generator=gen, dtype=torch.float64)
    mask = _blob_mask(gen, height, width)
    n = [1, 2, 3, 5][seed % 4]
    handles = _random_points(gen, n, height, width)
    targets = _random_points(gen, n, height, width)
    cells = torch.nonzero(mask)
    handles[0] = cells[0].flip(0).to(torch.float32)  # a handle exactly on the first masked cell
    for empty in (True, False):
        got, got_null = latent_warp(z, handles, targets, mask, empty=empty)
        want, want_null = warp_loops(z, handles, targets, mask, empty=empty)
        assert torch.equal(got, want)
        assert torch.equal(got_null, want_null)


def test_oracle_cases_include_collisions():
    gen = torch.Generator().manual_seed(3)
    mask = torch.ones(16, 16, dtype=torch.bool)
    handles, targets = _pts((8, 8)), _pts((14, 8))
    _, null = latent_warp(torch.ones(1, 1, 16, 16, dtype=torch.float64), handles, targets, mask)
    # every masked cell writes once; nulls = cells that lost a collision or were never hit
    field = displacement_field(handles, targets, mask)
    dests = {
        (int(torch.round(r + field[r, c, 1]).clamp(0, 15)), int(torch.round(c + field[r, c, 0]).clamp(0, 15)))
        for r, c in torch.nonzero(mask).tolist()
    }
    assert len(dests) < int(mask.sum())  # collisions happened
    assert int(null.sum()) == int(mask.sum()) - len(dests)
    z = torch.randn(1, 2, 16, 16, generator=gen, dtype=torch.float64)
    assert torch.equal(latent_warp(z, handles, targets, mask)[0], warp_loops(z, handles, targets, mask)[0])


@pytest.mark.parametrize("vertical", [False, True])
def test_first_writer_in_row_major_order_wins(vertical):
    # A 1x4 (or 4x1) latent, all masked: circle centre at cell 1.5, radius 1.5. Drag the cell at 1 by +1.
    shape = (4, 1) if vertical else (1, 4)
    z = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).reshape(1, 1, *shape)
    mask = torch.ones(shape, dtype=torch.bool)
    handles, targets = (_pts((0, 1)), _pts((0, 2))) if vertical else (_pts((1, 0)), _pts((2, 0)))
    axis = 1 if vertical else 0
    along = displacement_field(handles, targets, mask)[..., axis].flatten()
    dest = torch.round(torch.arange(4) + along).clamp(0, 3).long().tolist()
    assert dest == [0, 2, 2, 3]  # 1 (s=1) -> 2; 2 (s=1/2) -> 2.5 -> 2 (half to even): a collision
    warped, null = latent_warp(z, handles, targets, mask)
    assert warped.flatten().tolist() == [1.0, 0.0, 2.0, 4.0]  # cell 1 came first; cell 1 stays empty
    assert null.flatten().tolist() == [False, True, False, False]


# ---------------------------------------------------------------- BNNI

# 5x5 example: values (channel 0), null cells marked.
_GRID = [
    [3, 1, 4, 1, 5],
    [9, 2, 6, 5, 3],
    [5, 8, 9, 7, 9],
    [3, 2, 3, 8, 4],
    [6, 2, 6, 4, 3],
]
_NULLS = [(1, 1), (1, 2), (2, 1), (2, 2), (0, 4), (4, 2)]


def _grid_example() -> tuple[torch.Tensor, torch.Tensor]:
    base = torch.tensor(_GRID, dtype=torch.float64)
    null = torch.zeros(5, 5, dtype=torch.bool)
    for r, c in _NULLS:
        null[r, c] = True
    base[null] = 0
    return torch.stack([base, 10 * base - 7])[None], null  # channel 1 = affine of channel 0


def _check_filled(out: torch.Tensor, null: torch.Tensor, expected: dict, z: torch.Tensor) -> None:
    for (r, c), value in expected.items():
        assert out[0, 0, r, c].item() == pytest.approx(value, abs=1e-12)
        assert out[0, 1, r, c].item() == pytest.approx(10 * value - 7, abs=1e-11)
    assert torch.equal(out[..., ~null], z[..., ~null])


def test_bnni_paper_equals_hand_computed_means():
    z, null = _grid_example()
    # weights 1/k over the nearest valid cell left, right, up, down (pre-fill values)
    expected = {
        (1, 1): (1 * 9 + 0.5 * 5 + 1 * 1 + 0.5 * 2) / 3,  # left 9, right 5 (k=2), up 1, down 2 (k=2)
        (1, 2): (0.5 * 9 + 1 * 5 + 1 * 4 + 0.5 * 3) / 3,  # left 9 (k=2), right 5, up 4, down 3 (k=2)
        (2, 1): (1 * 5 + 0.5 * 7 + 0.5 * 1 + 1 * 2) / 3,  # left 5, right 7 (k=2), up 1 (k=2), down 2
        (2, 2): (0.5 * 5 + 1 * 7 + 0.5 * 4 + 1 * 3) / 3,  # left 5 (k=2), right 7, up 4 (k=2), down 3
        (0, 4): (1 * 1 + 1 * 3) / 2,  # left 1, down 3; no right, no up
        (4, 2): (1 * 2 + 1 * 4 + 1 * 3) / 3,  # left 2, right 4, up 3; no down
    }
    assert expected[(1, 1)] == 4.5 and expected[(2, 2)] == pytest.approx(14.5 / 3)
    _check_filled(bnni_fill(z, null, "paper"), null, expected, z)


def test_bnni_as_released_equals_hand_computed_causal_means():
    z, null = _grid_example()
    # raster order; an already-filled left/up cell is a neighbour at k=1
    v11 = (1 * 9 + 0.5 * 5 + 1 * 1 + 0.5 * 2) / 3  # nothing filled before it: 4.5
    v12 = (1 * v11 + 1 * 5 + 1 * 4 + 0.5 * 3) / 3.5  # left is the filled (1, 1)
    v21 = (1 * 5 + 0.5 * 7 + 1 * v11 + 1 * 2) / 3.5  # up is the filled (1, 1)
    v22 = (1 * v21 + 1 * 7 + 1 * v12 + 1 * 3) / 4
    expected = {(1, 1): v11, (1, 2): v12, (2, 1): v21, (2, 2): v22, (0, 4): 2.0, (4, 2): 3.0}
    assert v12 == pytest.approx(30 / 7) and v22 == pytest.approx(65 / 14)
    _check_filled(bnni_fill(z, null, "as_released"), null, expected, z)


def test_bnni_fills_a_cell_iff_it_has_a_neighbour():
    # paper: (3, 5) has no valid cell in its row or column; every other null cell has one
    z = torch.rand(1, 3, 6, 7, dtype=torch.float64) + 1
    null = torch.zeros(6, 7, dtype=torch.bool)
    null[3:, 4:] = True
    null[3, :] = True
    null[:, 5] = True
    z[..., null] = 0
    paper = bnni_fill(z, null, "paper")
    assert (paper[..., 3, 5] == 0).all()
    others = null.clone()
    others[3, 5] = False
    assert (paper[..., others] > 0).all()
    # the causal scan also fills (3, 5): its left neighbour (3, 4) was filled just before it
    assert (bnni_fill(z, null, "as_released")[..., null] > 0).all()


def test_bnni_leaves_cells_without_any_neighbour_as_they_are():
    # only the bottom-right cell is valid: both modes fill exactly its row and column
    z = torch.rand(1, 2, 6, 7, dtype=torch.float64) + 1
    null = torch.ones(6, 7, dtype=torch.bool)
    null[5, 6] = False
    z[..., null] = 0
    reachable = torch.zeros(6, 7, dtype=torch.bool)
    reachable[5, :] = True
    reachable[:, 6] = True
    for mode in ("paper", "as_released"):
        out = bnni_fill(z, null, mode)
        assert (out[..., reachable] > 0).all()
        assert (out[..., ~reachable] == 0).all()


@pytest.mark.parametrize("size", [(5, 7), (12, 9), (16, 16), (23, 31), (1, 9), (9, 1)])
@pytest.mark.parametrize("seed", range(4))
def test_bnni_equals_per_cell_oracle(size, seed):
    gen = torch.Generator().manual_seed(seed * 101 + size[0])
    height, width = size
    z = torch.randn(1, 4, height, width, generator=gen, dtype=torch.float64)
    density = [0.2, 0.5, 0.8, 0.95][seed]
    null = torch.rand(height, width, generator=gen) < density
    z[..., null] = 0
    assert torch.allclose(bnni_fill(z, null, "paper"), bnni_loops(z, null, causal=False), atol=1e-12, rtol=0)
    assert torch.allclose(bnni_fill(z, null, "as_released"), bnni_loops(z, null, causal=True), atol=1e-10, rtol=0)
    z32 = z.to(torch.float32)
    want = bnni_loops(z, null, causal=True).to(torch.float32)
    assert torch.allclose(bnni_fill(z32, null, "as_released"), want, atol=1e-5, rtol=0)


def test_bnni_with_no_null_cell_is_identity():
    z = torch.randn(1, 4, 8, 8)
    assert torch.equal(bnni_fill(z, torch.zeros(8, 8, dtype=torch.bool)), z)


# ---------------------------------------------------------------- "as released" float32 arithmetic


def _released_destinations_one_cell_at_a_time(handles, targets, mask):
    """Oracle: the release's warp arithmetic as described in docs/reference-implementations.md §2.3, cell by cell.

    Everything float32, points in (row, col); torch.norm / torch.dot on
    single 2-vectors, as the release does per cell. Returns a list of
    ``(flat source, dest row, dest col)``; cells whose value is NaN are skipped.
    """
    height, width = mask.shape
    cells = torch.nonzero(mask)
    lo, hi = cells.min(0).values, cells.max(0).values
    corner = torch.tensor([float(lo[0]), float(lo[1])], dtype=torch.float32)
    far = torch.tensor([float(hi[0]), float(hi[1])], dtype=torch.float32)
    centre = torch.stack([(corner[0] + far[0]) / 2, (corner[1] + far[1]) / 2])
    radius = torch.nn.PairwiseDistance(p=2)(centre, corner)
    out = []
    for cell in cells:
        moves, weights = [], []
        for handle, target in zip(handles, targets):
            a = torch.tensor([float(handle[1]), float(handle[0])], dtype=torch.float32)
            shift = torch.tensor([float(target[1]), float(target[0])], dtype=torch.float32) - a
            oa = a - centre
            ac = cell - a
            d_ac = torch.norm(ac)
            l0 = torch.dot(ac, oa) / d_ac
            l1 = torch.sqrt(radius**2 - torch.norm(oa) ** 2 + l0**2)
            ap = (l1 - l0) * (ac / d_ac)
            moves.append((torch.norm(ac - ap) / torch.norm(ap)) * shift)
            weights.append(1 / (torch.norm(cell - a) + 0.0001))
        moves, weights = torch.stack(moves), torch.stack(weights)
        move = ((weights / weights.sum()) * moves.T).T.sum(dim=0)
        dest = torch.round(cell + move)
        if not torch.isfinite(dest).all():
            continue
        row = min(max(int(dest[0]), 0), height - 1)
        col = min(max(int(dest[1]), 0), width - 1)
        out.append((int(cell[0]) * width + int(cell[1]), row, col))
    return out


def _edit_oracle(z, handles, targets, mask, fill):
    """``fastdrag_edit``'s expected result: the per-cell loops, with the release's float32 warp for ``bnni_as_released``."""
    if fill == "bnni_as_released":
        warped, null = latent_warp(z, handles, targets, mask, arithmetic="as_released")
        return bnni_loops(warped, null, causal=True)
    return fastdrag_loops(z, handles, targets, mask, fill)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5, 16, 24, 32, 56])
def test_released_arithmetic_is_bit_exact_with_the_per_cell_computation(seed):
    """Seeds 16, 24, 32 and 56 are cases where the same formulas in float64 send some cell elsewhere."""
    gen = torch.Generator().manual_seed(100 + seed)
    height, width = 12 + 3 * (seed % 6), 16
    mask = _blob_mask(gen, height, width)
    handles = _random_points(gen, 1 + seed % 4, height, width)
    handles[0] = torch.nonzero(mask)[0].flip(0).to(torch.float32)  # a cell exactly on a handle: NaN, skipped
    targets = _random_points(gen, 1 + seed % 4, height, width)
    sources, rows, cols = released_destinations(handles.double(), targets.double(), mask)
    want = _released_destinations_one_cell_at_a_time(handles, targets, mask)
    assert list(zip(sources.tolist(), rows.tolist(), cols.tolist())) == want
    assert int(torch.nonzero(mask.reshape(-1))[0]) not in sources.tolist()


def test_released_arithmetic_rounds_a_half_cell_destination_as_the_release():
    """Handle (y, x) = (16, 23.5), target (17.25, 31.75), mask rows 0-19 x columns 22-28 of a 32x32 latent.

    Cell (17, 25) lands exactly on column 30.5: float64 rounds half to even
    (30), the release's float32 gets 30.500002 (31).
    """
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[0:20, 22:29] = True
    handles, targets = _pts((23.5, 16.0)), _pts((31.75, 17.25))
    assert 25 + float(displacement_field(handles, targets, mask)[17, 25, 0]) == 30.5
    sources, rows, cols = released_destinations(handles.double(), targets.double(), mask)
    index = sources.tolist().index(17 * 32 + 25)
    assert (rows[index], cols[index]) == (18, 31)
    z = _numbered_latent(32, 32)
    exact, _ = latent_warp(z, handles, targets, mask)
    released, _ = latent_warp(z, handles, targets, mask, arithmetic="as_released")
    assert torch.equal(released[..., 18, 31], z[..., 17, 25]) and not torch.equal(exact[..., 18, 31], z[..., 17, 25])
    filled = fastdrag_edit(z, handles, targets, mask, fill="bnni_as_released")
    assert torch.equal(filled[..., 18, 31], z[..., 17, 25])


# ---------------------------------------------------------------- fastdrag_edit and fills


@pytest.mark.parametrize("fill", ["bnni", "bnni_as_released", "keep", "zero"])
def test_fastdrag_edit_equals_oracle_pipeline(fill):
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(1, 4, 20, 28, generator=gen, dtype=torch.float64)
    mask = _blob_mask(gen, 20, 28)
    handles = _random_points(gen, 3, 20, 28)
    targets = _random_points(gen, 3, 20, 28)
    got = fastdrag_edit(z, handles, targets, mask, fill=fill)
    assert torch.allclose(got, _edit_oracle(z, handles, targets, mask, fill), atol=1e-10, rtol=0)


def test_keep_and_zero_fills():
    z = _numbered_latent(16, 16)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[4:12, 4:12] = True
    handles, targets = _pts((8, 8)), _pts((11, 8))
    _, null = latent_warp(z, handles, targets, mask)
    assert null.any()
    zero = fastdrag_edit(z, handles, targets, mask, fill="zero")
    assert (zero[..., null] == 0).all()
    keep = fastdrag_edit(z, handles, targets, mask, fill="keep")
    assert torch.equal(keep[..., null], z[..., null])  # nothing was emptied
    warped, keep_null = latent_warp(z, handles, targets, mask, empty=False)
    assert torch.equal(keep, warped) and not keep_null.any()


@pytest.mark.parametrize("mode", ["drag", "move", "copy"])
@pytest.mark.parametrize("fill", ["bnni", "bnni_as_released", "keep", "zero"])
def test_handle_equal_to_target_changes_nothing(mode, fill):
    z = torch.randn(1, 4, 10, 14)
    mask = torch.zeros(10, 14, dtype=torch.bool)
    mask[2:7, 3:9] = True
    points = _pts((5.25, 4.5), (7, 3))
    assert torch.equal(fastdrag_edit(z, points, points.clone(), mask, mode=mode, fill=fill), z)
    warped, null = latent_warp(z, points, points.clone(), mask)
    assert torch.equal(warped, z) and not null.any()


def test_move_uses_only_the_first_pair():
    z = torch.randn(1, 4, 20, 20)
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[5:9, 5:9] = True
    first = fastdrag_edit(z, _pts((6, 6)), _pts((10, 12)), mask, mode="move")
    both = fastdrag_edit(z, _pts((6, 6), (1, 1)), _pts((10, 12), (18, 18)), mask, mode="move")
    assert torch.equal(first, both)


def test_dtype_and_device_are_kept_and_half_precision_matches_float():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 24, 32, generator=gen).to(torch.float16)
    mask = _blob_mask(gen, 24, 32)
    handles, targets = _random_points(gen, 2, 24, 32), _random_points(gen, 2, 24, 32)
    for fill in ("bnni", "bnni_as_released"):
        half = fastdrag_edit(z, handles, targets, mask, fill=fill)
        assert half.dtype == torch.float16
        assert torch.equal(half, fastdrag_edit(z.float(), handles, targets, mask, fill=fill).half())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fill", ["bnni", "bnni_as_released", "keep", "zero"])
@pytest.mark.parametrize("mode", ["drag", "move", "copy"])
def test_cuda_equals_cpu(fill, mode):
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(1, 4, 40, 64, generator=gen)
    mask = _blob_mask(gen, 40, 64)
    handles, targets = _random_points(gen, 5, 40, 64), _random_points(gen, 5, 40, 64)
    cpu = fastdrag_edit(z, handles, targets, mask, mode=mode, fill=fill)
    gpu = fastdrag_edit(z.cuda(), handles.cuda(), targets.cuda(), mask.cuda(), mode=mode, fill=fill)
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- edge cases


def test_points_on_the_border_and_mask_touching_the_border():
    z = torch.randn(1, 4, 14, 18, dtype=torch.float64)
    mask = torch.zeros(14, 18, dtype=torch.bool)
    mask[:6, :] = True
    mask[:, -3:] = True
    handles = _pts((0, 0), (17.75, 13.75), (17, 5))
    targets = _pts((17.75, 0), (0, 13.75), (17.75, 0))
    got, got_null = latent_warp(z, handles, targets, mask)
    want, want_null = warp_loops(z, handles, targets, mask)
    assert torch.equal(got, want) and torch.equal(got_null, want_null)
    for fill in ("bnni", "bnni_as_released"):
        out = fastdrag_edit(z, handles, targets, mask, fill=fill)
        assert torch.isfinite(out).all()
        assert torch.allclose(out, _edit_oracle(z, handles, targets, mask, fill), atol=1e-10, rtol=0)


@pytest.mark.parametrize("size", [(40, 64), (37, 53)])
def test_non_square_latents(size):
    height, width = size
    gen = torch.Generator().manual_seed(height)
    z = torch.randn(1, 4, height, width, generator=gen, dtype=torch.float64)
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[5 : height - 10, 8 : width // 2 + 4] = True
    handles, targets = _pts((12.5, 10.25), (20, 15)), _pts((30.75, 14), (25, 9.5))
    got, got_null = latent_warp(z, handles, targets, mask)
    want, want_null = warp_loops(z, handles, targets, mask)
    assert torch.equal(got, want) and torch.equal(got_null, want_null)
    out = fastdrag_edit(z, handles, targets, mask)
    assert out.shape == z.shape
    assert torch.allclose(out, bnni_loops(want, want_null, causal=False), atol=1e-12, rtol=0)


def test_twenty_pairs():
    gen = torch.Generator().manual_seed(20)
    height, width = 24, 32
    z = torch.randn(1, 4, height, width, generator=gen, dtype=torch.float64)
    mask = _blob_mask(gen, height, width)
    handles, targets = _random_points(gen, 20, height, width), _random_points(gen, 20, height, width)
    got, got_null = latent_warp(z, handles, targets, mask)
    want, want_null = warp_loops(z, handles, targets, mask)
    assert torch.equal(got, want) and torch.equal(got_null, want_null)
    handles, targets = _random_points(gen, 20, 64, 96), _random_points(gen, 20, 64, 96)
    big = fastdrag_edit(torch.randn(1, 4, 64, 96), handles, targets, torch.ones(64, 96, dtype=torch.bool))
    assert torch.isfinite(big).all()


def test_empty_mask_is_a_clear_error():
    z = torch.randn(1, 4, 8, 8)
    with pytest.raises(DragInputError, match="covers no latent cell"):
        fastdrag_edit(z, _pts((1, 1)), _pts((2, 2)), torch.zeros(8, 8, dtype=torch.bool))
    with pytest.raises(DragInputError, match="covers no latent cell"):
        fastdrag_edit(z, _pts((1, 1)), _pts((2, 2)), torch.zeros(8, 8), mode="move")


@pytest.mark.parametrize(
    "handle, target, where",
    [((8, 3), (2, 2), "handle 1"), ((1, 1), (3, -0.25), "target 1"), ((1, 1), (2, 8.5), "target 1")],
)
def test_points_outside_the_latent_are_a_clear_error(handle, target, where):
    z = torch.randn(1, 4, 8, 8)
    with pytest.raises(DragInputError, match=f"{where} at latent .* is outside the 8x8 latent"):
        fastdrag_edit(z, _pts(handle), _pts(target), torch.ones(8, 8, dtype=torch.bool))


def test_point_at_the_last_quarter_cell_is_inside():
    z = torch.randn(1, 4, 8, 8)
    out = fastdrag_edit(z, _pts((7.75, 7.75)), _pts((0, 0)), torch.ones(8, 8, dtype=torch.bool))
    assert torch.isfinite(out).all()


def test_non_finite_inputs_are_clear_errors():
    mask = torch.ones(8, 8, dtype=torch.bool)
    z = torch.randn(1, 4, 8, 8)
    z[0, 2, 3, 3] = float("nan")
    with pytest.raises(DragInputError, match="latent contains NaN"):
        fastdrag_edit(z, _pts((1, 1)), _pts((2, 2)), mask)
    with pytest.raises(DragInputError, match="NaN"):
        fastdrag_edit(torch.randn(1, 4, 8, 8), _pts((1, float("nan"))), _pts((2, 2)), mask)


def test_bad_shapes_and_options_are_clear_errors():
    z = torch.randn(1, 4, 8, 8)
    mask = torch.ones(8, 8, dtype=torch.bool)
    with pytest.raises(DragInputError, match=r"\(1, C, h, w\)"):
        fastdrag_edit(torch.randn(2, 4, 8, 8), _pts((1, 1)), _pts((2, 2)), mask)
    with pytest.raises(DragInputError, match=r"mask must be \(8, 8\)"):
        fastdrag_edit(z, _pts((1, 1)), _pts((2, 2)), torch.ones(8, 9, dtype=torch.bool))
    with pytest.raises(DragInputError, match="2 handles but 1 targets"):
        fastdrag_edit(z, _pts((1, 1), (3, 3)), _pts((2, 2)), mask)
    with pytest.raises(DragInputError, match=r"\(N, 2\)"):
        fastdrag_edit(z, torch.zeros(0, 2), torch.zeros(0, 2), mask)
    with pytest.raises(DragInputError, match="unknown FastDrag mode"):
        fastdrag_edit(z, _pts((1, 1)), _pts((2, 2)), mask, mode="twist")
    with pytest.raises(DragInputError, match="unknown FastDrag fill"):
        fastdrag_edit(z, _pts((1, 1)), _pts((2, 2)), mask, fill="random")
    with pytest.raises(DragInputError, match="patch_cells"):
        fastdrag_edit(z, _pts((1, 1)), _pts((2, 2)), mask, mode="move", patch_cells=0)
    with pytest.raises(DragInputError, match="unknown BNNI mode"):
        bnni_fill(z, torch.zeros(8, 8, dtype=torch.bool), mode="causal")


# ---------------------------------------------------------------- object moving


def _object_scene() -> tuple[torch.Tensor, torch.Tensor]:
    z = _numbered_latent(20, 24)
    mask = torch.zeros(20, 24, dtype=torch.bool)
    mask[5:10, 6:12] = True  # rows 5..9, cols 6..11
    return z, mask


def _shifted(mask: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    out = torch.zeros_like(mask)
    for r, c in torch.nonzero(mask).tolist():
        if 0 <= r + dy < mask.shape[0] and 0 <= c + dx < mask.shape[1]:
            out[r + dy, c + dx] = True
    return out


def test_object_move_shifts_the_object_and_tiles_the_patch_over_the_vacated_cells():
    z, mask = _object_scene()
    handle, target = torch.tensor([7.75, 6.5]), torch.tensor([13.5, 9.25])  # shift trunc(5.75, 2.75) = (5, 2)
    out = object_move(z, handle, target, mask, mode="move")
    for r, c in torch.nonzero(mask).tolist():
        assert torch.equal(out[0, :, r + 2, c + 5], z[0, :, r, c])
    moved = _shifted(mask, 2, 5)
    vacated = mask & ~moved
    # patch rows floor(9.25 - 6) .. floor(9.25 + 6) - 1 = 3..14, cols floor(13.5 - 6) .. = 7..18, tiled from (0, 0)
    for r, c in torch.nonzero(vacated).tolist():
        assert torch.equal(out[0, :, r, c], z[0, :, 3 + r % 12, 7 + c % 12])
    rest = ~mask & ~moved
    assert torch.equal(out[..., rest], z[..., rest])


def test_object_copy_keeps_the_original():
    z, mask = _object_scene()
    out = object_move(z, torch.tensor([7.75, 6.5]), torch.tensor([13.5, 9.25]), mask, mode="copy")
    moved = _shifted(mask, 2, 5)
    for r, c in torch.nonzero(mask).tolist():
        assert torch.equal(out[0, :, r + 2, c + 5], z[0, :, r, c])
    assert torch.equal(out[..., ~moved], z[..., ~moved])


def test_object_move_truncates_toward_zero_and_paint_last_covers_the_overlap():
    z, mask = _object_scene()
    handle, target = torch.tensor([10.0, 8.0]), torch.tensor([7.25, 6.5])  # (-2.75, -1.5) -> (-2, -1), not (-3, -2)
    out = fastdrag_edit(z, handle[None], target[None], mask, mode="move")
    for r, c in torch.nonzero(mask).tolist():
        assert torch.equal(out[0, :, r - 1, c - 2], z[0, :, r, c])
    released = object_move(z, handle, target, mask, mode="move", paint_last=True)
    overlap = mask & _shifted(mask, -1, -2)
    # the release paints the patch (rows 0..11, cols 1..12 around (7.25, 6.5)) over the overlap
    for r, c in torch.nonzero(overlap).tolist():
        assert torch.equal(released[0, :, r, c], z[0, :, r % 12, 1 + c % 12])
        assert not torch.equal(released[0, :, r, c], out[0, :, r, c])


def test_patch_is_clipped_at_the_border():
    z, mask = _object_scene()
    out = object_move(z, torch.tensor([8.0, 8.0]), torch.tensor([1.0, 0.5]), mask, mode="move", patch_cells=12)
    # rows 0 .. floor(6.5) - 1 = 0..5 (6 rows), cols 0 .. floor(7) - 1 = 0..6 (7 columns)
    vacated = mask & ~_shifted(mask, -7, -7)
    assert vacated.any()
    for r, c in torch.nonzero(vacated).tolist():
        assert torch.equal(out[0, :, r, c], z[0, :, r % 6, c % 7])


def test_move_with_a_sub_cell_drag_changes_nothing():
    z, mask = _object_scene()
    out = fastdrag_edit(z, _pts((7.25, 6.5)), _pts((7.75, 7.25)), mask, mode="move")
    assert torch.equal(out, z)


# ---------------------------------------------------------------- any latent: channel count and size


@pytest.mark.parametrize("fill", ["bnni", "bnni_as_released", "keep", "zero"])
@pytest.mark.parametrize("size", [(13, 21), (40, 24)])
def test_sixteen_channel_latents_of_any_size_warp_channel_by_channel(fill, size):
    """SD3/FLUX latents (16 channels) warp exactly as four 4-channel latents with the same points and mask."""
    height, width = size
    gen = torch.Generator().manual_seed(height * width)
    z = torch.randn(1, 16, height, width, generator=gen)
    handles, targets = _random_points(gen, 3, height, width), _random_points(gen, 3, height, width)
    mask = _blob_mask(gen, height, width)
    whole = fastdrag_edit(z, handles, targets, mask, fill=fill)
    parts = torch.cat([fastdrag_edit(part, handles, targets, mask, fill=fill) for part in z.split(4, dim=1)], dim=1)
    assert whole.shape == z.shape and torch.equal(whole, parts)


def test_a_sixteen_channel_object_move_keeps_every_channel():
    z = _numbered_latent(10, 12, channels=16)
    mask = torch.zeros(10, 12, dtype=torch.bool)
    mask[2:5, 2:5] = True
    moved = fastdrag_edit(z, _pts((3, 3)), _pts((7, 6)), mask, mode="copy")
    assert torch.equal(moved[:, :, 5:8, 6:9], z[:, :, 2:5, 2:5])
