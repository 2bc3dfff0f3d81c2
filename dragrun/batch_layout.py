"""The headless runner's batch layout, which the evaluator reads; drag points drawn on images; PNG writes.

Batch output of ``dragrun.run_workflow --batch DATA --out OUT``::

    OUT/<sample folder name>/edited.png          the workflow's first saved image
    OUT/<sample folder name>/side_by_side.png    source | edited, points drawn
    OUT/timings.json                             per-sample status and seconds

Sample folders are found with :func:`dragkit.datasets.sample_folders` (Drag100
or DragBench layout, sorted by path); their names must be unique, as they name
the output folders.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from dragkit.atomic import write_bytes_atomic
from dragkit.datasets import sample_folders
from dragkit.errors import DragInputError

EDITED = "edited.png"
SIDE_BY_SIDE = "side_by_side.png"
TIMINGS = "timings.json"

HANDLE_COLOUR = (230, 25, 25)
TARGET_COLOUR = (25, 75, 240)


def read_timings(path: Path, advice: str = "") -> dict:
    """The runner's ``timings.json`` at ``path`` as a dict.

    Raises :class:`DragInputError` naming the file (followed by ``advice``)
    when it cannot be read, is not JSON, or holds something else than an object.
    """
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise DragInputError(f"{path} is not the runner's timings JSON: {error}{advice}") from None
    if not isinstance(record, dict):
        raise DragInputError(
            f"{path} is not the runner's timings JSON: it holds a {type(record).__name__}, not an object{advice}"
        )
    return record


def batch_sample_folders(root: Path, limit: int | None = None) -> list[Path]:
    """The first ``limit`` (all when None) sample folders under ``root``, sorted by path.

    Raises :class:`DragInputError` when ``root`` is not a folder, holds no
    sample folder, or two of the chosen folders share a name.
    """
    root = Path(root)
    if not root.is_dir():
        raise DragInputError(f"the data folder {root} does not exist")
    folders = sample_folders(root)
    if not folders:
        raise DragInputError(f"no Drag100 or DragBench sample folders under {root}")
    folders = folders[:limit] if limit else folders
    names = [folder.name for folder in folders]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DragInputError(f"sample folder names must be unique (they name the output folders): {duplicates}")
    return folders


def draw_points(
    image: Image.Image, handles: Sequence, targets: Sequence, scale: float = 1.0, with_handles: bool = True
) -> None:
    """Draw the drag pairs on ``image`` in place: arrow lines and red handles (``with_handles``), blue targets.

    Points are ``(x, y)`` source pixels, multiplied by ``scale`` (the image's
    size over the source's); the dot radius follows the image's width.
    """
    draw = ImageDraw.Draw(image)
    radius = max(2, image.width // 80)
    for (hx, hy), (tx, ty) in zip(handles, targets):
        handle, target = (hx * scale, hy * scale), (tx * scale, ty * scale)
        if with_handles:
            draw.line([handle, target], fill="white", width=max(1, radius // 2))
            _dot(draw, handle, radius, HANDLE_COLOUR)
        _dot(draw, target, radius, TARGET_COLOUR)


def _dot(draw: ImageDraw.ImageDraw, centre: tuple[float, float], radius: int, colour) -> None:
    x, y = centre
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour, outline="white")


def write_png(path: Path, image: Image.Image) -> None:
    """Save ``image`` as a PNG file at ``path`` atomically (:mod:`dragkit.atomic`)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())
