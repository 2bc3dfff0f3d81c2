"""The ``DRAG_POINTS`` value: handle/target pairs in source-image pixels.

Coordinates are ``(x, y)`` in pixels of the source image, x to the right and
y down, as pixel indices: ``0 <= x <= width - 1`` and ``0 <= y <= height - 1``
(fractional values are allowed, e.g. from a zoomed editor). ``width`` and
``height`` are the size of the image the points were placed on; every node
checks them against the image or latent it works on.

Accepted JSON forms (all parsed by :func:`parse_drag_points`):

- canonical: ``{"width": W, "height": H, "pairs": [{"handle": [x, y], "target": [x, y]}, ...]}``
- Drag100 / DragBench: ``{"points": [[x, y], [x, y], ...]}`` alternating handle,
  target (the image size then comes from the image the node is given),
- split: ``{"handles": [[x, y], ...], "targets": [[x, y], ...], "width": W, "height": H}``.

Parsing is strict: wrong types, NaN or infinite numbers, odd point counts,
points outside the image and oversized inputs are rejected with a
:class:`~dragkit.errors.DragInputError` that says what is wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from .errors import DragInputError

MAX_PAIRS = 128
"""Most handle/target pairs one value may carry (the references use at most 8)."""

MAX_JSON_CHARS = 1_000_000
"""Longest JSON text accepted, so a hostile widget value cannot exhaust memory."""

MAX_IMAGE_SIDE = 16384
"""Largest image side accepted in a points value."""

Point = tuple[float, float]


@dataclass(frozen=True)
class DragPoints:
    """Handle/target pairs placed on a ``width`` x ``height`` source image.

    ``handles[i]`` moves to ``targets[i]``; both are ``(x, y)`` in source-image
    pixels. A pair whose handle equals its target pins content in place.
    """

    handles: tuple[Point, ...]
    targets: tuple[Point, ...]
    width: int
    height: int

    def __post_init__(self) -> None:
        if len(self.handles) != len(self.targets):
            raise DragInputError(
                f"{len(self.handles)} handles but {len(self.targets)} targets; every handle needs a target"
            )

    @property
    def num_pairs(self) -> int:
        return len(self.handles)

    def handles_tensor(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Handles as a ``(num_pairs, 2)`` tensor of ``(x, y)`` pixels."""
        return torch.tensor(self.handles, dtype=dtype).reshape(-1, 2)

    def targets_tensor(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Targets as a ``(num_pairs, 2)`` tensor of ``(x, y)`` pixels."""
        return torch.tensor(self.targets, dtype=dtype).reshape(-1, 2)

    def with_handles(self, handles: torch.Tensor | list[Point]) -> DragPoints:
        """The same pairs with new handle positions (e.g. tracked handles), clamped into the image."""
        rows = torch.as_tensor(handles, dtype=torch.float64).reshape(-1, 2)
        rows[:, 0].clamp_(0, self.width - 1)
        rows[:, 1].clamp_(0, self.height - 1)
        return DragPoints(tuple(map(tuple, rows.tolist())), self.targets, self.width, self.height)

    def to_json_dict(self) -> dict[str, Any]:
        """The canonical JSON form (see the module docstring)."""
        return {
            "width": self.width,
            "height": self.height,
            "pairs": [{"handle": list(h), "target": list(t)} for h, t in zip(self.handles, self.targets)],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_json_dict())

    def check_image_size(self, width: int, height: int, what: str = "image") -> None:
        """Raise unless the points were placed on an image of this size."""
        if (width, height) != (self.width, self.height):
            raise DragInputError(
                f"the points were placed on a {self.width}x{self.height} image but the {what} is "
                f"{width}x{height} (width x height); place the points on the same image"
            )


def parse_drag_points(value: Any, width: int | None = None, height: int | None = None) -> DragPoints:
    """Parse and validate a points value.

    Args:
        value: a :class:`DragPoints`, a JSON string, or an already-decoded dict
            in one of the forms of the module docstring.
        width, height: the size of the image the points belong to, when known.
            Required for forms without a size; when the value has a size too,
            the two must agree.

    Returns:
        A validated :class:`DragPoints`.

    Raises:
        DragInputError: with a message naming the problem.
    """
    if isinstance(value, DragPoints):
        points = value
        if width is not None and height is not None:
            points.check_image_size(width, height)
        _check_inside(points)
        return points
    if isinstance(value, str):
        if len(value) > MAX_JSON_CHARS:
            raise DragInputError(f"the points JSON is {len(value)} characters long; at most {MAX_JSON_CHARS} are accepted")
        text = value.strip()
        if not text:
            raise DragInputError("no points were given (empty text); add at least one handle/target pair")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise DragInputError(f"the points are not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
        except RecursionError:
            raise DragInputError("the points JSON is nested too deeply to be points") from None
        except ValueError as err:  # e.g. an integer longer than Python's int digit limit
            raise DragInputError(f"the points JSON holds a value that cannot be read: {_short(str(err))}") from None
    if not isinstance(value, dict):
        raise DragInputError(f"points must be a JSON object, got {type(value).__name__}")

    size = _read_size(value)
    if size is None:
        if width is None or height is None:
            raise DragInputError("the points carry no image size and no image was given to take it from")
        size = (_checked_side(width, "width"), _checked_side(height, "height"))
    elif width is not None and height is not None and size != (width, height):
        raise DragInputError(
            f"the points were placed on a {size[0]}x{size[1]} image but the image is {width}x{height} (width x height)"
        )

    if "pairs" in value:
        handles, targets = _read_pairs(value["pairs"])
    elif "points" in value:
        handles, targets = _read_alternating(value["points"])
    elif "handles" in value or "targets" in value:
        handles = _read_point_list(value.get("handles"), "handles")
        targets = _read_point_list(value.get("targets"), "targets")
        if len(handles) != len(targets):
            raise DragInputError(f"{len(handles)} handles but {len(targets)} targets; every handle needs a target")
    else:
        raise DragInputError('points JSON needs a "pairs", "points" or "handles"/"targets" field')

    if not handles:
        raise DragInputError("no handle/target pairs were given; add at least one pair")
    if len(handles) > MAX_PAIRS:
        raise DragInputError(f"{len(handles)} pairs were given; at most {MAX_PAIRS} are supported")
    points = DragPoints(tuple(handles), tuple(targets), size[0], size[1])
    _check_inside(points)
    return points


def _read_size(value: dict) -> tuple[int, int] | None:
    if "width" not in value and "height" not in value:
        return None
    if "width" not in value or "height" not in value:
        raise DragInputError('points JSON must give both "width" and "height" or neither')
    return _checked_side(value["width"], "width"), _checked_side(value["height"], "height")


def _as_float(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` when it is not a finite number (bools, huge ints, NaN, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _checked_side(side: Any, name: str) -> int:
    number = _as_float(side)
    if number is None or number != int(number):
        raise DragInputError(f"image {name} must be a whole number, got {_short(side)}")
    side = int(number)
    if not 1 <= side <= MAX_IMAGE_SIDE:
        raise DragInputError(f"image {name} {side} is outside 1..{MAX_IMAGE_SIDE}")
    return side


def _read_point(item: Any, where: str) -> Point:
    if isinstance(item, dict) and set(item) == {"x", "y"}:
        item = [item["x"], item["y"]]
    if not isinstance(item, (list, tuple)) or len(item) != 2:
        raise DragInputError(f"{where} must be [x, y], got {_short(item)}")
    coords = []
    for c in item:
        if isinstance(c, bool) or not isinstance(c, (int, float)):
            raise DragInputError(f"{where} must hold numbers, got {_short(item)}")
        number = _as_float(c)
        if number is None:
            raise DragInputError(f"{where} is not a finite number: {_short(item)}")
        coords.append(number)
    return coords[0], coords[1]


def _as_list(items: Any, name: str) -> list:
    if not isinstance(items, (list, tuple)):
        raise DragInputError(f'"{name}" must be a list, got {type(items).__name__}')
    if len(items) > 2 * MAX_PAIRS:
        raise DragInputError(f'"{name}" has {len(items)} entries; at most {MAX_PAIRS} pairs are supported')
    return list(items)


def _read_point_list(items: Any, name: str) -> list[Point]:
    return [_read_point(p, f"{name}[{i}]") for i, p in enumerate(_as_list(items, name))]


def _read_alternating(items: Any) -> tuple[list[Point], list[Point]]:
    flat = _read_point_list(items, "points")
    if len(flat) % 2:
        raise DragInputError(
            f'"points" alternates handle, target, ... and needs an even count; got {len(flat)} (the last handle has no target)'
        )
    return flat[0::2], flat[1::2]


def _read_pairs(items: Any) -> tuple[list[Point], list[Point]]:
    handles, targets = [], []
    for i, pair in enumerate(_as_list(items, "pairs")):
        if isinstance(pair, dict):
            if "handle" not in pair or "target" not in pair:
                raise DragInputError(f'pairs[{i}] needs "handle" and "target"')
            handle, target = pair["handle"], pair["target"]
        elif isinstance(pair, (list, tuple)) and len(pair) == 2:
            handle, target = pair
        else:
            raise DragInputError(f'pairs[{i}] must be {{"handle": [x, y], "target": [x, y]}}, got {_short(pair)}')
        handles.append(_read_point(handle, f"pairs[{i}].handle"))
        targets.append(_read_point(target, f"pairs[{i}].target"))
    return handles, targets


def _check_inside(points: DragPoints) -> None:
    for kind, rows in (("handle", points.handles), ("target", points.targets)):
        for i, (x, y) in enumerate(rows):
            if not (0 <= x <= points.width - 1 and 0 <= y <= points.height - 1):
                raise DragInputError(
                    f"{kind} {i + 1} at (x={x:g}, y={y:g}) is outside the {points.width}x{points.height} image "
                    f"(x must be in 0..{points.width - 1}, y in 0..{points.height - 1})"
                )


def _short(item: Any, limit: int = 60) -> str:
    text = repr(item)
    return text if len(text) <= limit else text[: limit - 3] + "..."
