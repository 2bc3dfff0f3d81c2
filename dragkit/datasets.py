"""Drag-editing benchmark folders: read and write the Drag100 and DragBench layouts.

A sample is one image with its handle/target pairs and editable-region mask
(:class:`DragSample`). Points are ``(x, y)`` in pixels of the image, mask
``True`` = editable, both at the image's size.

**Drag100** (GoodDrag), one folder per sample:

- ``original.jpg``: the image (RGB),
- ``mask.png``: the editable region, white = editable (any nonzero grey level
  counts, as in the reference code's ``mask > 0``),
- ``points.json``: ``{"points": [[x, y], ...]}`` alternating handle, target.

**DragBench** (DragDiffusion), one folder per sample:

- ``original_image.png``: the image (RGB),
- ``meta_data.pkl``: a pickled dict ``{"prompt": str, "points": [[x, y], ...]
  (alternating handle, target), "mask": numpy uint8 (H, W), 1 = editable}``.
  It is read with a restricted unpickler that can only rebuild numpy arrays
  (:func:`read_meta_data_pkl`): a pickle naming any other callable is refused,
  so a shared dataset cannot run code.
- ``meta_data.json`` (this pack's sidecar, preferred when present, needs no
  unpickling at all): ``{"prompt", "width", "height", "points": [[x, y], ...],
  "mask": {"rle": ...} | null}`` with the mask run-length encoded as in the
  editor state (:func:`dragkit.editor_state.encode_mask`).

Writers replace files atomically (a temporary file in the same folder, then
``os.replace``), so a crash never leaves half a sample behind.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_bytes_atomic
from .editor_state import decode_mask, editor_state_json, encode_mask
from .errors import DragInputError
from .points import DragPoints, parse_drag_points

DRAG100_FILES = ("original.jpg", "mask.png", "points.json")
DRAGBENCH_IMAGE = "original_image.png"
DRAGBENCH_PICKLE = "meta_data.pkl"
DRAGBENCH_SIDECAR = "meta_data.json"

MAX_META_BYTES = 64 * 1024 * 1024
"""Largest ``meta_data.pkl`` / ``meta_data.json`` read (a 512x913 mask pickles to ~0.5 MB)."""

JPEG_QUALITY = 95
"""Quality of the ``original.jpg`` written by :func:`save_drag100` (the layout is lossy)."""


@dataclass(frozen=True, eq=False)
class DragSample:
    """One drag-editing sample.

    ``image`` is ``(H, W, 3)`` uint8 RGB; ``points`` were placed on it
    (``(x, y)`` source pixels); ``mask`` is ``(H, W)`` bool, True = editable,
    or None when the sample has none (the whole image is then editable).
    """

    image: np.ndarray
    points: DragPoints
    mask: np.ndarray | None = None
    prompt: str = ""

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise DragInputError(f"a sample image must be (H, W, 3) uint8, got {self.image.shape} {self.image.dtype}")
        height, width = self.image.shape[:2]
        self.points.check_image_size(width, height)
        if self.mask is not None and (self.mask.shape != (height, width) or self.mask.dtype != bool):
            raise DragInputError(f"a sample mask must be ({height}, {width}) bool, got {self.mask.shape} {self.mask.dtype}")

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    def editor_state(self) -> str:
        """The Drag Points Editor widget string for these points and mask."""
        return editor_state_json(self.points, self.mask)


def is_drag100_sample(folder: os.PathLike | str) -> bool:
    return all((Path(folder) / name).is_file() for name in DRAG100_FILES)


def is_dragbench_sample(folder: os.PathLike | str) -> bool:
    folder = Path(folder)
    return (folder / DRAGBENCH_IMAGE).is_file() and any(
        (folder / name).is_file() for name in (DRAGBENCH_SIDECAR, DRAGBENCH_PICKLE)
    )


def sample_folders(root: os.PathLike | str) -> list[Path]:
    """Sample folders under ``root`` in either layout (DragBench nests them one level deeper), sorted."""
    root = Path(root)
    found = {p.parent for p in root.rglob("*") if p.name in (DRAG100_FILES[0], DRAGBENCH_IMAGE)}
    return sorted(p for p in found if is_drag100_sample(p) or is_dragbench_sample(p))


def load_sample(folder: os.PathLike | str) -> DragSample:
    """Load a folder in whichever layout it has."""
    if is_drag100_sample(folder):
        return load_drag100(folder)
    if is_dragbench_sample(folder):
        return load_dragbench(folder)
    raise DragInputError(f"{folder} is neither a Drag100 nor a DragBench sample folder")


# ----------------------------------------------------------------------------------------------
# Drag100


def load_drag100(folder: os.PathLike | str) -> DragSample:
    """Read ``original.jpg``, ``mask.png`` and ``points.json`` of one Drag100 folder."""
    folder = Path(folder)
    image = _read_image(folder / "original.jpg")
    height, width = image.shape[:2]
    mask = _read_mask_png(folder / "mask.png", width, height)
    text = _read_text(folder / "points.json")
    with _context(folder / "points.json"):
        points = parse_drag_points(text, width=width, height=height)
    return DragSample(image, points, mask)


def save_drag100(sample: DragSample, folder: os.PathLike | str) -> Path:
    """Write ``sample`` as a Drag100 folder (created if needed); returns the folder.

    ``original.jpg`` is JPEG quality :data:`JPEG_QUALITY` (the layout is lossy);
    a sample without mask gets an all-white ``mask.png`` (whole image editable).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mask = sample.mask if sample.mask is not None else np.ones((sample.height, sample.width), dtype=bool)
    write_bytes_atomic(folder / "original.jpg", _encode_image(sample.image, "JPEG", quality=JPEG_QUALITY, subsampling=0))
    write_bytes_atomic(folder / "mask.png", _encode_image(mask.astype(np.uint8) * 255, "PNG"))
    points = {"points": _alternating(sample.points)}
    write_bytes_atomic(folder / "points.json", json.dumps(points).encode())
    return folder


# ----------------------------------------------------------------------------------------------
# DragBench


def load_dragbench(folder: os.PathLike | str, allow_pickle: bool = True) -> DragSample:
    """Read one DragBench folder: ``original_image.png`` and its metadata.

    The JSON sidecar ``meta_data.json`` is used when present; otherwise
    ``meta_data.pkl`` through the restricted unpickler, unless ``allow_pickle``
    is False.
    """
    folder = Path(folder)
    image = _read_image(folder / DRAGBENCH_IMAGE)
    height, width = image.shape[:2]
    sidecar = folder / DRAGBENCH_SIDECAR
    if sidecar.is_file():
        with _context(sidecar):
            return _sample_from_sidecar(image, _loads_json(_read_text(sidecar)))
    pkl = folder / DRAGBENCH_PICKLE
    if not pkl.is_file():
        raise DragInputError(f"{folder} has neither {DRAGBENCH_SIDECAR} nor {DRAGBENCH_PICKLE}")
    if not allow_pickle:
        raise DragInputError(f"{folder} has only {DRAGBENCH_PICKLE} and pickles are not allowed here")
    meta = read_meta_data_pkl(pkl)
    with _context(pkl):
        points = parse_drag_points({"points": _points_list(meta.get("points"))}, width=width, height=height)
        mask = _mask_from_array(meta.get("mask"), width, height)
        prompt = _prompt(meta.get("prompt", ""))
    return DragSample(image, points, mask, prompt)


def save_dragbench(sample: DragSample, folder: os.PathLike | str, pickle_meta: bool = True,
                   sidecar: bool = True) -> Path:
    """Write ``sample`` as a DragBench folder; returns the folder.

    ``meta_data.pkl`` (``pickle_meta``) is written like the DragBench labelling
    tool writes it: mask uint8 {0, 1} (all ones when the sample has no mask),
    points as Python numbers. ``meta_data.json`` (``sidecar``) is this pack's
    pickle-free equivalent.
    """
    if not (pickle_meta or sidecar):
        raise ValueError("write meta_data.pkl, meta_data.json or both")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mask = sample.mask if sample.mask is not None else np.ones((sample.height, sample.width), dtype=bool)
    write_bytes_atomic(folder / DRAGBENCH_IMAGE, _encode_image(sample.image, "PNG"))
    points = _alternating(sample.points)
    if pickle_meta:
        meta = {"prompt": sample.prompt, "points": points, "mask": mask.astype(np.uint8)}
        write_bytes_atomic(folder / DRAGBENCH_PICKLE, pickle.dumps(meta, protocol=4))
    if sidecar:
        meta = {"prompt": sample.prompt, "width": sample.width, "height": sample.height, "points": points,
                "mask": {"rle": encode_mask(mask)}}
        write_bytes_atomic(folder / DRAGBENCH_SIDECAR, json.dumps(meta).encode())
    return folder


def _sample_from_sidecar(image: np.ndarray, meta: Any) -> DragSample:
    height, width = image.shape[:2]
    if not isinstance(meta, dict):
        raise DragInputError(f"must hold a JSON object, got {type(meta).__name__}")
    unknown = sorted(map(str, set(meta) - {"prompt", "width", "height", "points", "mask"}))
    if unknown:
        raise DragInputError(f"has unknown fields {unknown}")
    points = parse_drag_points(
        {"width": meta.get("width"), "height": meta.get("height"), "points": meta.get("points")},
        width=width, height=height,
    )
    mask = meta.get("mask")
    if mask is not None:
        if not isinstance(mask, dict) or set(mask) != {"rle"}:
            raise DragInputError('"mask" must be null or {"rle": "<base64>"}')
        mask = decode_mask(mask["rle"], width, height)
    return DragSample(image, points, mask, _prompt(meta.get("prompt", "")))


# ----------------------------------------------------------------------------------------------
# Restricted unpickling


def _numpy_callables() -> dict[tuple[str, str], Any]:
    """The only globals a DragBench pickle may name: what rebuilds numpy arrays and dtypes."""
    core = "numpy._core" if importlib.util.find_spec("numpy._core") else "numpy.core"
    multiarray = importlib.import_module(f"{core}.multiarray")
    numeric = importlib.import_module(f"{core}.numeric")
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :func:`_numpy_callables`; every other global is refused."""

    _allowed = _numpy_callables()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DragInputError(
                f"refusing to unpickle {module}.{name}: a DragBench meta_data.pkl may only contain "
                "numpy arrays, numbers, strings, lists and dicts"
            ) from None


def read_meta_data_pkl(path: os.PathLike | str) -> dict:
    """Unpickle a DragBench ``meta_data.pkl`` safely (numpy arrays and plain data only).

    Raises :class:`DragInputError` for a pickle that names any callable other
    than numpy's array/dtype reconstructors (e.g. ``os.system``), for a corrupt
    file, or for anything but a dict.
    """
    path = Path(path)
    raw = _read_bytes(path)
    try:
        meta = _NumpyOnlyUnpickler(io.BytesIO(raw)).load()
    except DragInputError as err:
        raise DragInputError(f"{path}: {err}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, OverflowError, MemoryError, RecursionError) as err:
        raise DragInputError(f"{path} is not a readable pickle: {type(err).__name__}: {err}") from None
    if not isinstance(meta, dict):
        raise DragInputError(f"{path} must hold a dict, got {type(meta).__name__}")
    return meta


def _points_list(points: Any) -> Any:
    if isinstance(points, np.ndarray):
        if not np.issubdtype(points.dtype, np.number):
            raise DragInputError(f'"points" must hold numbers, got dtype {points.dtype}')
        return points.reshape(-1, 2).tolist() if points.size % 2 == 0 else points.tolist()
    return points


def _mask_from_array(mask: Any, width: int, height: int) -> np.ndarray:
    if not isinstance(mask, np.ndarray):
        raise DragInputError(f'"mask" must be a numpy array, got {type(mask).__name__}')
    if mask.dtype != bool and not np.issubdtype(mask.dtype, np.number):
        raise DragInputError(f'"mask" must hold numbers, got dtype {mask.dtype}')
    if mask.shape != (height, width):
        raise DragInputError(f'"mask" has shape {mask.shape} but the image needs (height, width) = ({height}, {width})')
    if np.issubdtype(mask.dtype, np.floating) and not np.isfinite(mask).all():
        raise DragInputError('"mask" contains NaN or infinite values')
    return mask > 0


def _prompt(prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise DragInputError(f'"prompt" must be a string, got {type(prompt).__name__}')
    return prompt


# ----------------------------------------------------------------------------------------------
# Files


@contextlib.contextmanager
def _context(path: Path) -> Iterator[None]:
    """Prefix the file name to :class:`DragInputError` messages raised inside the block."""
    try:
        yield
    except DragInputError as err:
        raise DragInputError(f"{path}: {err}") from None


def _read_bytes(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_META_BYTES:
            raise DragInputError(f"{path} is {size} bytes; at most {MAX_META_BYTES} are read")
        return path.read_bytes()
    except OSError as err:
        raise DragInputError(f"cannot read {path}: {err.strerror or err}") from None


def _read_text(path: Path) -> str:
    try:
        return _read_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise DragInputError(f"{path} is not UTF-8 text") from None


def _loads_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DragInputError(f"not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except (ValueError, RecursionError) as err:
        raise DragInputError(f"not readable JSON: {err}") from None


def _open_image(path: Path):
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
            return img
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DragInputError(f"cannot read the image {path}: {err}") from None


def _read_image(path: Path) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB, EXIF orientation applied (as ComfyUI's Load Image and browsers do)."""
    return np.asarray(_open_image(path).convert("RGB"), dtype=np.uint8)


def _read_mask_png(path: Path, width: int, height: int) -> np.ndarray:
    mask = np.asarray(_open_image(path).convert("L"))
    if mask.shape != (height, width):
        raise DragInputError(f"{path} is {mask.shape[1]}x{mask.shape[0]} but the image is {width}x{height}")
    return mask > 0


def _encode_image(array: np.ndarray, fmt: str, **options) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **options)
    return buf.getvalue()


def _alternating(points: DragPoints) -> list[list[int | float]]:
    """Handle, target, handle, target, ... with whole numbers written as ints."""
    flat = [p for pair in zip(points.handles, points.targets) for p in pair]
    return [[int(c) if float(c).is_integer() else float(c) for c in p] for p in flat]
