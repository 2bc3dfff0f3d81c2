"""The Drag Points Editor's widget state: points and mask as one compact JSON string.

The editor widget (state model ``js/editor_model.js``; its layers: ``docs/editor.md``) keeps this string in the
node's ``editor_state`` STRING widget, so it is saved in the workflow's
``widgets_values`` and sent to Python in the API prompt. Format, version 1::

    {"version": 1,
     "width": 512, "height": 768,
     "pairs": [{"handle": [x, y], "target": [x, y]}, ...],
     "pending": null,
     "mask": null}

- ``width``/``height``: size of the image the points and mask were placed on.
- ``pairs``: handle/target pairs, ``(x, y)`` in pixels of that image (pixel
  indices, x right, y down), parsed by :func:`dragkit.points.parse_drag_points`.
- ``pending``: ``[x, y]`` of a handle clicked without a target yet, or null.
  The node refuses to run while one is pending (it would silently be dropped).
- ``mask``: null when nothing is painted, else ``{"rle": "<base64>"}`` (see
  :func:`encode_mask`): 1 = editable, at the image's size.

An empty string means nothing was placed yet. Parsing is strict: anything
malformed raises :class:`~dragkit.errors.DragInputError` with a message that
says what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DragInputError
from .points import MAX_IMAGE_SIDE, MAX_PAIRS, DragPoints, Point, parse_drag_points

STATE_VERSION = 1
"""Version written by the editor; the only one accepted."""

MAX_STATE_CHARS = 4_000_000
"""Longest state string accepted (a brush-painted mask takes a few kB)."""

STATE_KEYS = frozenset({"version", "width", "height", "pairs", "pending", "mask", "erase"})

_MAX_INT_DIGITS = 18
"""JSON integers with more digits are read as floats (so ``inf``), never as huge ints."""

_VARINT_MAX_BYTES = 5
"""Longest run length varint: 35 bits, enough for any MAX_IMAGE_SIDE**2 image."""


@dataclass(frozen=True, eq=False)
class EditorState:
    """Decoded editor state.

    ``points`` holds the finished pairs (possibly none) on a
    ``points.width`` x ``points.height`` image; ``pending`` is an unfinished
    handle ``(x, y)`` in source pixels or None; ``mask`` is an
    ``(height, width)`` bool array (True = editable) or None when nothing is painted.
    ``erase`` (optional ``"erase"`` field) holds the pixels erased on top of a
    connected MASK input, or None: the node's mask is ``(input | mask) & ~erase``.
    """

    points: DragPoints
    pending: Point | None = None
    mask: np.ndarray | None = None
    erase: np.ndarray | None = None

    @property
    def width(self) -> int:
        return self.points.width

    @property
    def height(self) -> int:
        return self.points.height

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EditorState):
            return NotImplemented
        if self.points != other.points or self.pending != other.pending:
            return False
        for mine, theirs in ((self.mask, other.mask), (self.erase, other.erase)):
            if (mine is None) != (theirs is None) or (mine is not None and not np.array_equal(mine, theirs)):
                return False
        return True

    def drag_points(self) -> DragPoints:
        """The pairs to edit with; raises when there are none or a handle still lacks its target."""
        if self.pending is not None:
            x, y = self.pending
            raise DragInputError(
                f"handle {self.points.num_pairs + 1} at (x={x:g}, y={y:g}) has no target yet: "
                "click where it should move to, or delete it (right-click)"
            )
        if self.points.num_pairs == 0:
            raise DragInputError(
                "no handle/target pairs were placed: click the image to set a handle (red), "
                "then click again to set its target (blue)"
            )
        return self.points

    def to_json_dict(self) -> dict[str, Any]:
        """The state as a JSON-ready dict (the format of the module docstring)."""
        pairs = self.points.to_json_dict()["pairs"]
        return {
            "version": STATE_VERSION,
            "width": self.width,
            "height": self.height,
            "pairs": [{"handle": _compact_point(p["handle"]), "target": _compact_point(p["target"])} for p in pairs],
            "pending": None if self.pending is None else _compact_point(self.pending),
            "mask": None if self.mask is None or not self.mask.any() else {"rle": encode_mask(self.mask)},
            **({} if self.erase is None or not self.erase.any() else {"erase": {"rle": encode_mask(self.erase)}}),
        }

    def to_json(self) -> str:
        """The widget string: compact JSON, no whitespace."""
        return json.dumps(self.to_json_dict(), separators=(",", ":"))


def editor_state_json(points: DragPoints, mask: np.ndarray | None = None) -> str:
    """The widget string for ``points`` and an optional ``(height, width)`` mask (nonzero = editable)."""
    if mask is not None:
        mask = _checked_mask_array(np.asarray(mask), points.width, points.height)
    return EditorState(points, None, mask).to_json()


def parse_editor_state(value: Any, width: int | None = None, height: int | None = None) -> EditorState:
    """Parse and validate an editor state.

    Args:
        value: the widget string (JSON, or empty for "nothing placed yet"), or
            an already-decoded dict.
        width, height: size in pixels of the image the node works on, when
            known; the state must have been made on an image of that size.

    Raises:
        DragInputError: naming what is wrong (types, NaN, points outside the
            image, too many pairs, bad mask encoding, wrong sizes, ...).
    """
    if (width is None) != (height is None):
        raise TypeError("give both width and height, or neither")
    if isinstance(value, str):
        if len(value) > MAX_STATE_CHARS:
            raise DragInputError(
                f"the editor state is {len(value)} characters long; at most {MAX_STATE_CHARS} are accepted"
            )
        if not value.strip():
            if width is None:
                raise DragInputError("the editor state is empty and no image size was given")
            return EditorState(DragPoints((), (), _side(width, "width"), _side(height, "height")))
        value = _loads(value)
    if not isinstance(value, dict):
        raise DragInputError(f"the editor state must be a JSON object, got {type(value).__name__}")

    unknown = sorted(map(str, set(value) - STATE_KEYS))
    if unknown:
        raise DragInputError(f"the editor state has unknown fields {unknown}; expected {sorted(STATE_KEYS)}")
    version = value.get("version")
    if type(version) is not int or version != STATE_VERSION:
        raise DragInputError(f"the editor state has version {_short(version)}; this DragKit reads version {STATE_VERSION}")
    state_w, state_h = _side(value.get("width"), "width"), _side(value.get("height"), "height")
    if width is not None and (state_w, state_h) != (width, height):
        raise DragInputError(
            f"the points and mask were placed on a {state_w}x{state_h} image but the image is {width}x{height} "
            "(width x height); show the new image in the editor (points that still fit are kept) and place them again"
        )

    points = _read_pairs(value.get("pairs"), state_w, state_h)
    pending = _read_pending(value.get("pending"), state_w, state_h)
    mask = _read_mask(value.get("mask"), state_w, state_h)
    erase = _read_mask(value.get("erase"), state_w, state_h, "erase")
    return EditorState(points, pending, mask, erase)


# ----------------------------------------------------------------------------------------------
# Mask run-length encoding


def encode_mask(mask: np.ndarray) -> str:
    """Encode an ``(H, W)`` mask (nonzero = editable) as base64 run lengths.

    Pixels are read row by row (index ``y * W + x``). The runs alternate
    not-editable, editable, not-editable, ... starting with a not-editable run
    (length 0 when pixel (0, 0) is editable); every later run is at least 1
    long and the runs add up to ``W * H``. Each run length is an unsigned
    LEB128 varint (7 bits per byte, low bits first, high bit set on every byte
    but the last); the bytes are base64 encoded (standard alphabet, padded).
    """
    flat = np.asarray(mask).reshape(-1) != 0
    if flat.size == 0:
        raise DragInputError("cannot encode an empty (0-pixel) mask")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], edges, [flat.size])))
    if flat[0]:
        runs = np.concatenate(([0], runs))
    return base64.b64encode(_varints(runs.astype(np.uint64))).decode("ascii")


def decode_mask(data: Any, width: int, height: int) -> np.ndarray:
    """Decode :func:`encode_mask` output into a ``(height, width)`` bool array, strictly.

    Raises :class:`DragInputError` for anything that is not a canonical
    encoding of exactly ``width * height`` pixels.
    """
    if not isinstance(data, str):
        raise DragInputError(f"the mask encoding must be a base64 string, got {type(data).__name__}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raw = None
    if raw is None or base64.b64encode(raw).decode("ascii") != data:
        raise DragInputError("the mask encoding is not valid base64 (standard alphabet, padded)")
    if not raw:
        raise DragInputError("the mask encoding is empty")
    runs = _read_varints(np.frombuffer(raw, dtype=np.uint8))
    if (runs[1:] == 0).any():
        raise DragInputError("the mask encoding has an empty run after the first; it is not a mask written by the editor")
    total = int(runs.sum())
    if total != width * height:
        raise DragInputError(
            f"the mask covers {total} pixels but the {width}x{height} image has {width * height}; "
            "the mask was painted on another image: clear it and paint it again"
        )
    painted = (np.arange(runs.size) % 2).astype(bool)
    return np.repeat(painted, runs).reshape(height, width)


def _varints(values: np.ndarray) -> bytes:
    groups = (values[:, None] >> (np.arange(_VARINT_MAX_BYTES, dtype=np.uint64) * np.uint64(7))) & np.uint64(0x7F)
    nbytes = 1 + sum((values >= np.uint64(1 << (7 * k))).astype(np.int64) for k in range(1, _VARINT_MAX_BYTES))
    index = np.arange(_VARINT_MAX_BYTES)
    groups = groups | np.where(index < (nbytes[:, None] - 1), np.uint64(0x80), np.uint64(0))
    return groups[index < nbytes[:, None]].astype(np.uint8).tobytes()


def _read_varints(raw: np.ndarray) -> np.ndarray:
    ends = np.flatnonzero(raw < 0x80)
    if ends.size == 0 or ends[-1] != raw.size - 1:
        raise DragInputError("the mask encoding ends in the middle of a number (truncated)")
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > _VARINT_MAX_BYTES:
        raise DragInputError("the mask encoding holds a run longer than any image")
    shift = (np.arange(raw.size) - np.repeat(starts, lengths)) * 7
    contrib = (raw & 0x7F).astype(np.int64) << shift.astype(np.int64)
    return np.add.reduceat(contrib, starts)


# ----------------------------------------------------------------------------------------------
# Field readers


def _loads(text: str) -> Any:
    try:
        return json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as err:
        raise DragInputError(
            f"the editor state is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
        ) from None
    except RecursionError:
        raise DragInputError("the editor state is nested too deeply to be an editor state") from None


def _parse_int(digits: str) -> int | float:
    """JSON integers; absurdly long ones become ``inf`` (rejected later as not finite)."""
    return int(digits) if len(digits) <= _MAX_INT_DIGITS else float(digits)


def _finite(number: Any) -> bool:
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        return False
    return isinstance(number, int) or math.isfinite(number)


def _side(side: Any, name: str) -> int:
    if not _finite(side) or side != int(side):
        raise DragInputError(f"the editor state's image {name} must be a whole number, got {_short(side)}")
    if not 1 <= side <= MAX_IMAGE_SIDE:
        raise DragInputError(f"the editor state's image {name} {int(side)} is outside 1..{MAX_IMAGE_SIDE}")
    return int(side)


def _read_pairs(pairs: Any, width: int, height: int) -> DragPoints:
    if not isinstance(pairs, list):
        raise DragInputError(f'the editor state\'s "pairs" must be a list, got {type(pairs).__name__}')
    if len(pairs) > MAX_PAIRS:
        raise DragInputError(f"{len(pairs)} pairs were placed; at most {MAX_PAIRS} are supported")
    if not pairs:
        return DragPoints((), (), width, height)
    return parse_drag_points({"width": width, "height": height, "pairs": pairs})


def _read_pending(pending: Any, width: int, height: int) -> Point | None:
    if pending is None:
        return None
    try:
        points = parse_drag_points({"width": width, "height": height, "points": [pending, pending]})
    except DragInputError as err:
        raise DragInputError(f"the handle waiting for its target is invalid: {err}") from None
    return points.handles[0]


def _read_mask(mask: Any, width: int, height: int, field: str = "mask") -> np.ndarray | None:
    if mask is None:
        return None
    if not isinstance(mask, dict) or set(mask) != {"rle"}:
        raise DragInputError(f'the editor state\'s "{field}" must be null or {{"rle": "<base64>"}}, got {_short(mask)}')
    decoded = decode_mask(mask["rle"], width, height)
    return decoded if decoded.any() else None


def _checked_mask_array(mask: np.ndarray, width: int, height: int) -> np.ndarray | None:
    if mask.shape != (height, width):
        raise DragInputError(
            f"the mask has shape {mask.shape} but the image needs (height, width) = ({height}, {width})"
        )
    if not np.issubdtype(mask.dtype, np.number) and mask.dtype != bool:
        raise DragInputError(f"the mask must hold numbers, got dtype {mask.dtype}")
    if np.issubdtype(mask.dtype, np.floating) and not np.isfinite(mask).all():
        raise DragInputError("the mask contains NaN or infinite values")
    editable = mask != 0
    return editable if editable.any() else None


def _compact_point(point) -> list[int | float]:
    return [int(c) if float(c).is_integer() else float(c) for c in point]


def _short(item: Any, limit: int = 60) -> str:
    text = repr(item)
    return text if len(text) <= limit else text[: limit - 3] + "..."
