"""DRAG_POINTS parsing and validation, and the pixel -> latent geometry."""

import json

import pytest
import torch

from dragkit.errors import DragInputError
from dragkit.geometry import LatentGeometry, resolve_editable_mask
from dragkit.points import MAX_PAIRS, DragPoints, parse_drag_points


def test_drag100_form_takes_size_from_image():
    points = parse_drag_points('{"points": [[10, 20], [30, 40], [5, 6], [7, 8]]}', width=64, height=48)
    assert points.handles == ((10.0, 20.0), (5.0, 6.0))
    assert points.targets == ((30.0, 40.0), (7.0, 8.0))
    assert (points.width, points.height) == (64, 48)


def test_canonical_json_round_trip():
    points = DragPoints(((1.5, 2.0),), ((3.0, 4.25),), 10, 12)
    again = parse_drag_points(points.to_json())
    assert again == points
    assert json.loads(points.to_json())["pairs"][0] == {"handle": [1.5, 2.0], "target": [3.0, 4.25]}


def test_split_form_and_xy_objects():
    text = '{"width": 8, "height": 8, "handles": [{"x": 1, "y": 2}], "targets": [[3, 4]]}'
    assert parse_drag_points(text).targets == ((3.0, 4.0),)


def test_border_points_are_inside():
    points = parse_drag_points('{"points": [[0, 0], [63, 47]]}', width=64, height=48)
    assert points.targets == ((63.0, 47.0),)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"points": [[1, 2], [3, 4], [5, 6]]}', "even count"),
        ('{"points": [[1, 2], [3, "x"]]}', "must hold numbers"),
        ('{"points": [[1, 2], [3, NaN]]}', "not a finite number"),
        ('{"points": [[1, 2], [3, Infinity]]}', "not a finite number"),
        ('{"points": [[1, 2], [3, 1' + "0" * 400 + ']]}', "not a finite number"),
        ('{"width": 1' + "0" * 400 + ', "height": 48, "points": [[1, 2], [3, 4]]}', "whole number"),
        ('{"points": [[1, 2, 3], [3, 4]]}', "must be [x, y]"),
        ('{"points": [[1, 2], [64, 4]]}', "outside the 64x48 image"),
        ('{"points": [[-1, 2], [6, 4]]}', "outside"),
        ('{"points": []}', "no handle/target pairs"),
        ('{"points": "1,2,3,4"}', "must be a list"),
        ('{"points": [[true, 2], [3, 4]]}', "must hold numbers"),
        ('{"foo": 1}', '"pairs", "points"'),
        ('{"width": 64, "points": [[1, 2], [3, 4]]}', "both"),
        ('{"width": 64.5, "height": 48, "points": [[1, 2], [3, 4]]}', "whole number"),
        ('{"width": 0, "height": 48, "points": [[1, 2], [3, 4]]}', "outside 1.."),
        ('{"width": 32, "height": 48, "points": [[1, 2], [3, 4]]}', "placed on a 32x48 image"),
        ('{"pairs": [{"handle": [1, 2]}]}', 'needs "handle" and "target"'),
        ('{"handles": [[1, 2]], "targets": []}', "1 handles but 0 targets"),
    ],
)
def test_malformed_values_give_clear_errors(text, message):
    with pytest.raises(DragInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_drag_points(text, width=64, height=48)


def test_huge_inputs_are_refused_before_work():
    with pytest.raises(DragInputError, match="at most"):
        parse_drag_points("x" * 2_000_000, width=64, height=48)
    many = json.dumps({"points": [[1, 1]] * (2 * MAX_PAIRS + 2)})
    with pytest.raises(DragInputError, match="at most"):
        parse_drag_points(many, width=64, height=48)


def test_no_size_anywhere_is_an_error():
    with pytest.raises(DragInputError, match="no image size"):
        parse_drag_points('{"points": [[1, 2], [3, 4]]}')


def test_with_handles_clamps_into_image():
    points = DragPoints(((1.0, 1.0),), ((5.0, 5.0),), 8, 8)
    moved = points.with_handles(torch.tensor([[9.0, -2.0]]))
    assert moved.handles == ((7.0, 0.0),) and moved.targets == points.targets


def test_geometry_multiple_of_eight_matches_reference_rounding():
    geometry = LatentGeometry(512, 512)
    pts = torch.tensor([[101.0, 33.0], [511.0, 0.0], [3.0, 5.0]])
    sup = geometry.points_to_supervision(pts)
    assert sup.tolist() == [[50.0, 16.0], [255.0, 0.0], [2.0, 2.0]]
    assert geometry.points_to_latent(pts)[0].tolist() == [12.5, 4.0]


def test_geometry_crops_like_vae_encode():
    geometry = LatentGeometry(100, 70)
    assert (geometry.latent_width, geometry.latent_height) == (12, 8)
    assert (geometry.crop_x, geometry.crop_y) == (2, 3)
    mask = torch.zeros(70, 100)
    mask[3:11, 2:10] = 1
    latent_mask = geometry.mask_to_latent(mask)
    assert latent_mask.shape == (8, 12)
    assert latent_mask[0, 0] and latent_mask.sum() == 1
    geometry.check_latent(8, 12)
    with pytest.raises(DragInputError, match="encodes to a 12x8 latent"):
        geometry.check_latent(9, 12)


def test_empty_or_absent_mask_means_everything_editable():
    full, defaulted = resolve_editable_mask(None, 4, 5)
    assert defaulted and full.shape == (4, 5) and bool(full.all())
    full, defaulted = resolve_editable_mask(torch.zeros(1, 4, 5), 4, 5)
    assert defaulted and bool(full.all())
    mask = torch.zeros(4, 5)
    mask[1, 1] = 1
    kept, defaulted = resolve_editable_mask(mask, 4, 5)
    assert not defaulted and kept.sum() == 1
    with pytest.raises(DragInputError, match="the mask is 5x4 but the image is 6x4"):
        resolve_editable_mask(mask, 4, 6)
