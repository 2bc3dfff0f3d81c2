"""The Drag Points Editor's widget state: format, mask encoding, round trips, hostile values."""

import base64
import json

import numpy as np
import pytest

from dragkit.editor_state import (
    MAX_STATE_CHARS,
    EditorState,
    decode_mask,
    editor_state_json,
    encode_mask,
    parse_editor_state,
)
from dragkit.errors import DragInputError
from dragkit.points import MAX_PAIRS, DragPoints

W, H = 40, 24


def _state(**fields) -> str:
    state = {"version": 1, "width": W, "height": H, "pairs": [{"handle": [1, 2], "target": [10, 12]}],
             "pending": None, "mask": None}
    state.update(fields)
    return json.dumps(state)


def _rle(raw: bytes) -> dict:
    return {"rle": base64.b64encode(raw).decode()}


def test_mask_encoding_is_the_documented_run_length_format():
    mask = np.array([[0, 1, 1], [1, 0, 0]], dtype=bool)
    # runs: 1 not editable, 3 editable, 2 not editable -> varints 01 03 02
    assert encode_mask(mask) == base64.b64encode(bytes([1, 3, 2])).decode()
    starts_painted = np.array([[1, 0]], dtype=bool)
    assert encode_mask(starts_painted) == base64.b64encode(bytes([0, 1, 1])).decode()
    # 300 = 0b10_0101100 -> low 7 bits with the continuation bit, then 2
    assert encode_mask(np.zeros((3, 100), dtype=bool)) == base64.b64encode(bytes([0xAC, 0x02])).decode()


@pytest.mark.parametrize("shape", [(1, 1), (24, 40), (77, 13), (512, 768)])
def test_mask_round_trip(shape):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    for mask in (rng.random(shape) < 0.3, np.ones(shape, bool), np.zeros(shape, bool)):
        assert np.array_equal(decode_mask(encode_mask(mask), shape[1], shape[0]), mask)


def test_large_runs_need_several_varint_bytes():
    mask = np.zeros((4096, 4096), dtype=bool)
    mask[-1, -1] = True
    assert np.array_equal(decode_mask(encode_mask(mask), 4096, 4096), mask)


def test_points_and_mask_round_trip_through_json():
    mask = np.zeros((H, W), dtype=bool)
    mask[5:15, 3:30] = True
    points = DragPoints(((1.0, 2.0), (39.0, 23.0)), ((10.0, 12.0), (0.0, 0.0)), W, H)
    text = editor_state_json(points, mask)
    state = parse_editor_state(text, width=W, height=H)
    assert state.points == points
    assert state.pending is None
    assert np.array_equal(state.mask, mask)
    assert state == parse_editor_state(json.loads(text))
    assert parse_editor_state(state.to_json()) == state
    decoded = json.loads(text)
    assert decoded["pairs"][0] == {"handle": [1, 2], "target": [10, 12]}
    assert set(decoded["mask"]) == {"rle"}


def test_a_painted_mask_is_a_few_bytes_not_megabytes():
    mask = np.zeros((768, 512), dtype=bool)
    yy, xx = np.mgrid[:768, :512]
    mask[(yy - 300) ** 2 + (xx - 250) ** 2 < 120**2] = True
    text = editor_state_json(DragPoints(((250.0, 300.0),), ((300.0, 320.0),), 512, 768), mask)
    assert len(text) < 2000


def test_empty_mask_is_null_and_nonsquare_sizes_keep_their_orientation():
    points = DragPoints(((39.0, 0.0),), ((0.0, 23.0),), W, H)
    text = editor_state_json(points, np.zeros((H, W)))
    assert json.loads(text)["mask"] is None
    assert parse_editor_state(text).mask is None
    with pytest.raises(DragInputError, match="shape"):
        editor_state_json(points, np.zeros((W, H)))
    with pytest.raises(DragInputError, match="NaN"):
        editor_state_json(points, np.full((H, W), np.nan))


def test_fractional_points_are_kept():
    state = parse_editor_state(_state(pairs=[{"handle": [1.25, 2.5], "target": [3, 4]}]))
    assert state.points.handles == ((1.25, 2.5),)
    assert json.loads(state.to_json())["pairs"][0]["handle"] == [1.25, 2.5]


def test_empty_state_means_nothing_placed_yet():
    state = parse_editor_state("", width=W, height=H)
    assert (state.width, state.height, state.points.num_pairs, state.mask) == (W, H, 0, None)
    with pytest.raises(DragInputError, match="no handle/target pairs were placed"):
        state.drag_points()
    with pytest.raises(DragInputError, match="no image size"):
        parse_editor_state("  ")


def test_a_handle_without_target_blocks_editing():
    state = parse_editor_state(_state(pending=[5, 6]))
    assert state.pending == (5.0, 6.0)
    with pytest.raises(DragInputError, match=r"handle 2 at \(x=5, y=6\) has no target yet"):
        state.drag_points()


def test_a_mask_only_state_is_valid_but_has_no_points_to_edit():
    mask = np.ones((H, W), dtype=bool)
    state = parse_editor_state(_state(pairs=[], mask={"rle": encode_mask(mask)}))
    assert state.mask.all()
    with pytest.raises(DragInputError, match="no handle/target pairs"):
        state.drag_points()


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    "value, message",
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        (42, "must be a JSON object"),
        (_nested(100_000), "nested too deeply"),
        (" " * (MAX_STATE_CHARS + 1), "characters long"),
        (_state(version=None), "version None"),
        (_state(version="1"), "version '1'"),
        (_state(version=2), "version 2"),
        (_state(extra=1), "unknown fields"),
        (_state(width=float("nan")), "whole number"),
        (_state(width=float("inf")), "whole number"),
        (_state(width=True), "whole number"),
        (_state(width=40.5), "whole number"),
        (_state(width=0), "outside 1.."),
        (_state(width=10**6), "outside 1.."),
        (_state(width="40"), "whole number"),
        (_state().replace('"width": 40', '"width": ' + "9" * 400), "whole number"),
        (_state().replace('"width": 40', '"width": ' + "9" * 5000), "whole number"),
        (_state(pairs="1,2,3,4"), '"pairs" must be a list'),
        (_state(pairs={"handle": [1, 2]}), '"pairs" must be a list'),
        (_state(pairs=[{"handle": [1, 2], "target": [3, 4]}] * (MAX_PAIRS + 1)), f"at most {MAX_PAIRS}"),
        (_state(pairs=[[0, 0]] * 100_000), f"at most {MAX_PAIRS}"),
        (_state(pairs=[{"handle": [1, 2]}]), 'needs "handle" and "target"'),
        (_state(pairs=[{"handle": [1, float("nan")], "target": [3, 4]}]), "not a finite number"),
        (_state(pairs=[{"handle": [1, 2], "target": [3, float("-inf")]}]), "not a finite number"),
        (_state(pairs=[{"handle": ["1", 2], "target": [3, 4]}]), "must hold numbers"),
        (_state(pairs=[{"handle": [1, None], "target": [3, 4]}]), "must hold numbers"),
        (_state(pairs=[{"handle": [1, 2, 3], "target": [3, 4]}]), r"must be \[x, y\]"),
        (_state(pairs=[{"handle": [W, 2], "target": [3, 4]}]), "outside the 40x24 image"),
        (_state(pairs=[{"handle": [1, 2], "target": [3, -0.5]}]), "outside"),
        (_state().replace("[10, 12]", "[10, " + "1" * 400 + "]"), "not a finite number"),
        (_state(pending=[1]), "waiting for its target is invalid"),
        (_state(pending=[100, 1]), "waiting for its target is invalid.*outside"),
        (_state(pending="here"), "waiting for its target is invalid"),
        (_state(mask="AAAA"), '"mask" must be null or'),
        (_state(mask={"rle": "AAAA", "w": 3}), '"mask" must be null or'),
        (_state(mask={"rle": 123}), "base64 string"),
        (_state(mask={"rle": "!!not base64!!"}), "not valid base64"),
        (_state(mask={"rle": "AAA"}), "not valid base64"),
        (_state(mask={"rle": ""}), "empty"),
        (_state(mask=_rle(bytes([5, 0x80]))), "truncated"),
        (_state(mask=_rle(bytes([0xFF] * 6 + [1]))), "longer than any image"),
        (_state(mask=_rle(bytes([10, 0, 5]))), "empty run"),
        (_state(mask={"rle": encode_mask(np.ones((H, W + 1), bool))}), "covers 984 pixels but the 40x24 image has 960"),
        (_state(mask={"rle": "AQ==" + encode_mask(np.ones((W, H), bool))}), "not valid base64"),
    ],
)
def test_malformed_states_give_clear_errors(value, message):
    with pytest.raises(DragInputError, match=message):
        parse_editor_state(value)


def test_state_made_on_another_image_size_is_refused():
    with pytest.raises(DragInputError, match="placed on a 40x24 image but the image is 24x40"):
        parse_editor_state(_state(), width=24, height=40)


def test_python_objects_with_huge_numbers_are_refused_not_crashing():
    state = json.loads(_state())
    state["pairs"][0]["target"] = [3, 10**400]
    with pytest.raises(DragInputError, match="not a finite number"):
        parse_editor_state(state)
    state = json.loads(_state(pending=[1, 2]))
    state["pending"] = [10**400, 1]
    with pytest.raises(DragInputError, match="waiting for its target"):
        parse_editor_state(state)
    with pytest.raises(DragInputError, match="whole number|outside"):
        parse_editor_state({**json.loads(_state()), "height": 10**400})


def test_state_equality_compares_masks_by_value():
    points = DragPoints(((1.0, 2.0),), ((3.0, 4.0),), W, H)
    mask = np.zeros((H, W), bool)
    mask[0, 0] = True
    assert EditorState(points, None, mask) == EditorState(points, None, mask.copy())
    assert EditorState(points, None, mask) != EditorState(points, None, None)
    assert EditorState(points, None, mask) != EditorState(points, None, ~mask)
