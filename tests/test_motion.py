"""Motion supervision losses and point tracking on hand-built feature maps."""

import pytest
import torch

from dragkit.motion import (
    appearance_loss,
    all_reached,
    dragdiffusion_loss,
    gooddrag_loss,
    mask_regularisation,
    patch_cells,
    sample_features,
    track_points,
)


def wave_features(shift: torch.Tensor, size: int = 32) -> torch.Tensor:
    """(1, 8, size, size) features: smooth waves of position whose content is displaced by ``shift`` (x, y)."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    x, y = xs - shift[0], ys - shift[1]
    maps = []
    for period in (6.0, 11.0):
        maps += [torch.sin(x / period), torch.cos(x / period), torch.sin(y / period), torch.cos(y / period)]
    return torch.stack(maps)[None]


def test_sampling_at_integer_points_is_exact_and_between_cells_is_bilinear():
    features = torch.arange(2 * 4 * 5, dtype=torch.float32).reshape(1, 2, 4, 5)
    out = sample_features(features, torch.tensor([[3.0, 2.0], [0.5, 0.0]]))
    assert out[:, 0].tolist() == features[0, :, 2, 3].tolist()
    assert out[:, 1].tolist() == pytest.approx(((features[0, :, 0, 0] + features[0, :, 0, 1]) / 2).tolist())


def test_patch_shrinks_to_the_cells_inside_the_map():
    corner = torch.tensor([0.0, 3.0])
    assert sorted(map(tuple, patch_cells(1, 4, 6, corner).tolist())) == [(0, -1), (0, 0), (1, -1), (1, 0)]
    assert patch_cells(1, 4, 6, torch.tensor([2.0, 2.0])).shape == (9, 2)
    both = patch_cells(2, 10, 10, torch.tensor([1.0, 5.0]), torch.tensor([5.0, 9.0]))
    assert both[:, 0].min() == -1 and both[:, 1].max() == 0 and both.shape == (4 * 3, 2)


def test_an_edge_patch_is_averaged_over_the_cells_that_exist():
    """Handle on the left edge, drag to the right: the 3x3 patch keeps its 2 inner columns (6 cells).

    Features are x² in every channel, so shifting cell x by one column costs
    2x + 1: 1 at x = 0 and 3 at x = 1, mean 2, loss 9 · 2. Clamping the
    patch instead counts the edge column twice (mean 5/3, loss 15).
    """
    squares = (torch.arange(8, dtype=torch.float32) ** 2).expand(8, 8)
    features = torch.stack([squares, squares])[None]
    handle = torch.tensor([[0.0, 4.0]])
    assert dragdiffusion_loss(features, handle, torch.tensor([[6.0, 4.0]])).item() == pytest.approx(18.0)


def test_sampling_fp16_features_at_integer_points_returns_the_stored_values():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(1, 3, 256, 256, generator=gen).half()
    points = torch.tensor([[201.0, 117.0], [255.0, 0.0], [3.0, 254.0], [128.0, 77.0]])
    out = sample_features(features, points)
    stored = features[0][:, points[:, 1].long(), points[:, 0].long()]
    assert out.dtype == torch.float32 and torch.equal(out, stored.float())


def test_tracking_sums_the_fp16_cost_in_float32():
    """Two candidates 0.125 apart in a cost of about 640: fp16 (spacing 0.5) would round both to 640 and keep the first."""
    channels = 640
    original = torch.zeros(1, channels, 8, 8, dtype=torch.float16)
    moved = torch.full((1, channels, 8, 8), 2.0, dtype=torch.float16)
    moved[0, :, 3, 3] = 1.0
    moved[0, 0, 3, 3] = 1.25
    moved[0, :, 3, 4] = 1.0
    moved[0, 0, 3, 4] = 1.125
    start = torch.tensor([[3.0, 3.0]])
    assert track_points(original, moved, start, start, radius=1).tolist() == [[4.0, 3.0]]


@pytest.mark.parametrize("direction", [(1.0, 0.0), (0.0, -1.0), (0.6, 0.8)])
def test_dragdiffusion_gradient_moves_content_along_the_drag(direction):
    d = torch.tensor(direction)
    shift = torch.zeros(2, requires_grad=True)
    handle = torch.tensor([[16.0, 16.0]])
    target = handle + 10 * d
    loss = dragdiffusion_loss(wave_features(shift), handle, target, radius=1)
    loss.backward()
    descent = -shift.grad
    assert float(descent @ d) > 0.95 * float(descent.norm())
    optimiser = torch.optim.SGD([shift], lr=0.5)
    for _ in range(20):
        optimiser.zero_grad()
        dragdiffusion_loss(wave_features(shift), handle, target, radius=1).backward()
        optimiser.step()
    along = float(shift.detach() @ d)
    assert along > 0.5 and float((shift.detach() - along * d).norm()) < 0.2 * along


def test_gooddrag_loss_falls_and_moves_content_toward_the_target():
    shift = torch.zeros(2, requires_grad=True)
    original = wave_features(torch.zeros(2)).detach()
    handle = torch.tensor([[16.0, 16.0]])
    target = torch.tensor([[26.0, 16.0]])
    optimiser = torch.optim.Adam([shift], lr=0.1)
    losses = []
    for _ in range(40):
        loss = gooddrag_loss(wave_features(shift), original, handle, handle, target, radius=4, max_step=4.0)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert shift[0].item() == pytest.approx(4.0, abs=0.5) and abs(shift[1].item()) < 0.5


def test_dragdiffusion_gradient_reaches_only_the_shifted_patch():
    """The anchor patch is the stop-gradient side: a cell only the anchor reads gets no gradient."""
    features = wave_features(torch.zeros(2)).requires_grad_(True)
    handle = torch.tensor([[16.0, 16.0]])
    dragdiffusion_loss(features, handle, handle + torch.tensor([[8.0, 0.0]])).backward()
    grad = features.grad[0].abs().sum(0)
    assert grad[15:18, 15].sum() == 0 and grad[15:18, 18].sum() > 0


def test_reached_pairs_contribute_nothing():
    features = wave_features(torch.zeros(2))
    handle = torch.tensor([[16.0, 16.0]])
    assert dragdiffusion_loss(features, handle, handle + torch.tensor([[1.0, 1.0]])) == 0
    assert all_reached(handle, handle + torch.tensor([[1.0, 1.0]]))
    assert not all_reached(handle, handle + torch.tensor([[2.0, 0.0]]))


def test_tracking_finds_a_planted_feature_within_the_window():
    original = torch.rand(1, 16, 40, 40)
    moved = torch.rand(1, 16, 40, 40)
    moved[0, :, 23, 17] = original[0, :, 20, 15]
    start = torch.tensor([[15.0, 20.0]])
    assert track_points(original, moved, start, start, radius=3).tolist() == [[17.0, 23.0]]
    assert track_points(original, moved, start, start, radius=2).tolist() != [[17.0, 23.0]]


def test_tracking_stays_put_when_nothing_moved_even_on_the_border():
    features = torch.rand(1, 16, 20, 30)
    handles = torch.tensor([[0.0, 0.0], [29.0, 19.0], [7.0, 11.0]])
    assert torch.equal(track_points(features, features, handles, handles, radius=12), handles)


def test_mask_regularisation_is_a_weighted_sum_outside_the_mask():
    z = torch.ones(1, 4, 2, 2)
    keep = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert mask_regularisation(z * 3, z, keep, 0.1).item() == pytest.approx(0.1 * 4 * 2)


def test_appearance_loss_moves_content_onto_the_target():
    source = wave_features(torch.zeros(2)).detach()
    shift = torch.zeros(2, requires_grad=True)
    handle, target = torch.tensor([[12.0, 14.0]]), torch.tensor([[15.0, 12.0]])
    optimiser = torch.optim.Adam([shift], lr=0.1)
    losses = []
    for _ in range(150):
        loss = appearance_loss(wave_features(shift), source, target, handle, radius=2)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]
    assert shift.detach().tolist() == pytest.approx([3.0, -2.0], abs=0.2)
    assert appearance_loss(wave_features(torch.tensor([3.0, -2.0])), source, target, handle, 2) < 1e-5


def _track_one_by_one(original, features, handles, initial, radius):
    """The window search written plainly, handle by handle (clipped window, first minimum in raster order)."""
    _, _, height, width = features.shape
    out = []
    for (hx, hy), (sx, sy) in zip(handles.long().tolist(), initial.long().tolist()):
        template = original[0, :, sy, sx].float()
        best, best_cost = None, None
        for y in range(max(hy - radius, 0), min(hy + radius, height - 1) + 1):
            for x in range(max(hx - radius, 0), min(hx + radius, width - 1) + 1):
                cost = float((features[0, :, y, x].float() - template).abs().sum())
                if best_cost is None or cost < best_cost:
                    best, best_cost = [x, y], cost
        out.append(best)
    return torch.tensor(out, dtype=torch.float32)


def test_batched_tracking_equals_the_window_search_handle_by_handle():
    gen = torch.Generator().manual_seed(7)
    for case in range(40):
        height, width = 12 + case % 5, 10 + case % 7
        original = torch.randn(1, 6, height, width, generator=gen)
        features = original + 0.5 * torch.randn(1, 6, height, width, generator=gen)
        features[..., :3, :3] = features[..., :1, :1]  # exact ties: the first cell in raster order wins
        n = 1 + case % 4
        handles = torch.stack([torch.randint(0, width, (n,), generator=gen), torch.randint(0, height, (n,), generator=gen)], 1)
        initial = torch.stack([torch.randint(0, width, (n,), generator=gen), torch.randint(0, height, (n,), generator=gen)], 1)
        radius = 1 + case % 4
        expected = _track_one_by_one(original, features, handles.float(), initial.float(), radius)
        assert torch.equal(track_points(original, features, handles.float(), initial.float(), radius), expected), case
