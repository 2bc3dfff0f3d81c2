"""Drag Points Editor: click handle/target pairs and paint the editable mask on the image, in the node.

The widget (``js/drag_points_editor.js``) keeps the points and mask in the
``editor_state`` STRING (format: ``dragkit/editor_state.py``), so they travel
in the workflow and in the API prompt. This module only loads the image,
validates that string against it and turns it into IMAGE, DRAG_POINTS and MASK.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

import folder_paths
import node_helpers

from ..dragkit.editor_state import parse_editor_state
from ..dragkit.errors import DragInputError
from .common import CATEGORY, DRAG_POINTS, NodeInputError, node_errors, save_temp_png
from .file_names import contained_path, without_path

NODE_NAME = "Drag Points Editor"

IMAGE_EVENT = "dragkit.editor.image"
"""Server -> client event carrying a connected IMAGE to the editor when the node fails (e.g. no points yet)."""

UI_KEY = "dragkit_editor"
"""Key of the node's ``ui`` result: what the node ran with, and the connected IMAGE's preview file."""


def _input_image_files() -> list[str]:
    """Image files in ComfyUI's input folder, for the upload combo (as Load Image lists them)."""
    input_dir = folder_paths.get_input_directory()
    files = [f for f in os.listdir(input_dir) if os.path.isfile(os.path.join(input_dir, f))]
    return sorted(folder_paths.filter_files_content_types(files, ["image"]))


class DragPointsEditor:
    DESCRIPTION = (
        "Place drag points and paint the editable region on the image, right in the node. Click to set a handle "
        "(red), click again for its target (blue); drag points to adjust them, right-click one to delete its pair. "
        "Brush/eraser paint the mask (1 = editable; nothing painted = the whole image is editable). Enlarge opens "
        "a bigger view. The image comes from the IMAGE input when connected, else from the node's own upload. "
        "Points are (x, y) pixels of that image and are saved in the workflow. An optional MASK input seeds the "
        "editable region; brush/eraser strokes apply on top of it. After a run the editor shows the image of the "
        "VAE Decode (DragKit) it feeds (Result), and Live re-runs the graph after each point drop or stroke."
    )
    CATEGORY = CATEGORY
    FUNCTION = "edit"
    HAS_INTERMEDIATE_OUTPUT = True
    """ComfyUI 0.33.0 resends the ``ui`` summary of a node whose result is cached (so the editor and the prompt's
    history still show it) only for nodes that declare this; 0.3.64 resends every cached node's ``ui``."""
    RETURN_TYPES = ("IMAGE", DRAG_POINTS, "MASK")
    RETURN_NAMES = ("image", "points", "mask")
    OUTPUT_TOOLTIPS = (
        "The image the points were placed on (the connected IMAGE, or the uploaded file).",
        "The handle/target pairs in pixels of that image.",
        "The painted editable region at the image's size, 1 = editable; all zeros when nothing is painted "
        "(the drag nodes then treat the whole image as editable).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image_file": (_input_image_files(), {
                    "image_upload": True,
                    "tooltip": "The image to edit, from ComfyUI's input folder (upload with the button, drag and "
                               "drop or paste). Ignored when the IMAGE input is connected.",
                }),
                "editor_state": ("STRING", {
                    "default": "",
                    "tooltip": "Points and mask as kept by the editor widget (JSON; hidden in the node). "
                               "Edit them in the widget, not here.",
                }),
            },
            "optional": {
                "image": ("IMAGE", {
                    "tooltip": "An image to edit instead of the uploaded file (one image). The editor shows it once "
                               "the upstream Load Image has a file or after one run.",
                }),
                "mask": ("MASK", {
                    "tooltip": "An initial editable region (e.g. from ComfyUI's MaskEditor or any mask node), at the "
                               "image's size; values >= 0.5 are editable. Brush and eraser strokes in the editor apply "
                               "on top of it: mask output = (input OR painted) AND NOT erased.",
                }),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, image_file=None):
        """Accept any file name here: a connected IMAGE makes it irrelevant; ``edit`` checks it when used.

        Both hosts (ComfyUI 0.3.64 and 0.33.0 ``execution.validate_inputs``) call
        this with only the inputs the prompt holds, and with no arguments when
        it holds none of them: a prompt without ``image_file`` already gets the
        host's "Required input is missing", so that case passes here.
        """
        if image_file is None or isinstance(image_file, str):
            return True
        return f"image_file must be a file name, got {type(image_file).__name__}"

    @classmethod
    def IS_CHANGED(cls, image_file=None, **_):
        """The file's content hash, so replacing a file under the same name re-runs the node.

        A missing or unusable file gives a stable value (its name), not NaN: with
        an IMAGE connected the file is irrelevant, and NaN would re-run this node
        and everything after it on every queue.
        """
        try:
            path = _image_path(image_file)
            with open(path, "rb") as fh:
                return hashlib.sha256(fh.read()).hexdigest()
        except (DragInputError, OSError):
            return f"unreadable:{image_file!r}"

    def edit(self, image_file, editor_state, image=None, mask=None, unique_id=None):
        with node_errors(NODE_NAME):
            pixels = _single_image(image) if image is not None else _load_image_file(image_file)
            height, width = int(pixels.shape[1]), int(pixels.shape[2])
            seed = None if mask is None else _input_mask(mask, width, height)
        preview = _save_preview(pixels) if image is not None else None
        seed_preview = None if seed is None else _save_mask_preview(seed)
        try:
            with node_errors(NODE_NAME):
                state = parse_editor_state(editor_state, width=width, height=height)
                points = state.drag_points()
        except NodeInputError:
            _send_to_editor(unique_id, preview, seed_preview)
            raise
        editable = combine_masks(seed, state.mask, state.erase, width, height)
        out_mask = torch.from_numpy(editable.astype(np.float32))[None]
        summary = {"width": width, "height": height, "pairs": points.num_pairs, "mask_pixels": int(editable.sum())}
        if preview is not None:
            summary["image"] = preview
        if seed_preview is not None:
            summary["input_mask"] = seed_preview
        return {"ui": {UI_KEY: [summary]}, "result": (pixels, points, out_mask)}


def combine_masks(seed, painted, erased, width: int, height: int) -> np.ndarray:
    """The node's editable region: ``(input mask OR painted) AND NOT erased``, as a ``(height, width)`` bool array.

    The MASK input seeds the region; the editor's own brush (``painted``) and
    eraser (``erased``) strokes are stored in its state and applied on top, so
    re-running with the same or a changed input mask keeps the user's edits.
    Any of the three may be None (nothing there).
    """
    editable = np.zeros((height, width), dtype=bool)
    if seed is not None:
        editable |= seed
    if painted is not None:
        editable |= painted
    if erased is not None:
        editable &= ~erased
    return editable


def _input_mask(mask, width: int, height: int) -> np.ndarray:
    """The MASK input as a ``(height, width)`` bool array (>= 0.5 editable); one mask at the image's size."""
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3):
        raise DragInputError(f"the mask input must be a MASK [batch, height, width], got {getattr(mask, 'shape', mask)!r}")
    if mask.dim() == 3:
        if mask.shape[0] != 1:
            raise DragInputError(f"the mask input holds {mask.shape[0]} masks; connect one (it belongs to one image)")
        mask = mask[0]
    mask_h, mask_w = int(mask.shape[0]), int(mask.shape[1])
    if (mask_w, mask_h) != (width, height):
        raise DragInputError(
            f"the mask input is {mask_w}x{mask_h} but the image is {width}x{height} (width x height); "
            "connect a mask made on this image (e.g. Load Image's MASK output or the MaskEditor) or resize it to match"
        )
    values = mask.detach().to("cpu", torch.float32)
    if not torch.isfinite(values).all():
        raise DragInputError("the mask input contains NaN or infinite values")
    return (values >= 0.5).numpy()


def _single_image(image: torch.Tensor) -> torch.Tensor:
    """A connected IMAGE as ``[1, H, W, 3]``; a batch is refused (the points belong to one image)."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] != 3:
        raise DragInputError(f"the IMAGE input must be [batch, height, width, 3], got {getattr(image, 'shape', image)!r}")
    if image.shape[0] != 1:
        raise DragInputError(f"the IMAGE input holds {image.shape[0]} images; connect one (points belong to one image)")
    return image


def _image_path(name) -> str:
    """Path of the upload combo's file (``name``, ``sub/name`` or ``name [output]``), inside ComfyUI's folders."""
    if not isinstance(name, str) or not name.strip():
        raise DragInputError("no image: upload one with the node's upload button, or connect an IMAGE")
    outside = DragInputError(f"the image file {name!r} is outside ComfyUI's input, output and temp folders (links are followed)")
    roots = [folder_paths.get_input_directory(), folder_paths.get_output_directory(), folder_paths.get_temp_directory()]
    try:
        annotated = folder_paths.get_annotated_filepath(name)
    except ValueError:  # ComfyUI 0.33.0 refuses a name that leaves its folder ("Invalid file path"); 0.3.64 returns it
        raise outside from None
    path = contained_path(annotated, roots)
    if path is None:
        raise outside
    if not os.path.isfile(path):
        raise DragInputError(f"the image file {name!r} does not exist; upload it again or pick another")
    return path


def _load_image_file(name) -> torch.Tensor:
    """The first frame of the upload combo's file as ``[1, H, W, 3]`` floats in 0..1, as Load Image reads it."""
    from PIL import Image, ImageOps

    path = _image_path(name)
    try:
        img = node_helpers.pillow(Image.open, path)
        img = node_helpers.pillow(ImageOps.exif_transpose, img)
        if img.mode == "I":
            img = img.point(lambda v: v * (1 / 255))
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        detail = without_path(str(err), path, name)  # PIL names the file by its server path
        raise DragInputError(f"cannot read the image file {name!r}: {detail}") from None
    return torch.from_numpy(rgb)[None]


def _save_preview(pixels: torch.Tensor) -> dict:
    """Save a connected IMAGE to the temp folder for the editor; returns its ``/view`` reference."""
    return save_temp_png((pixels[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy(), "dragkit_editor")


def _save_mask_preview(mask: np.ndarray) -> dict:
    """Save the MASK input (bool, H x W) as a black/white PNG in the temp folder for the editor; its ``/view`` reference."""
    return save_temp_png(mask.astype(np.uint8) * 255, "dragkit_editor_mask")


def _send_to_editor(unique_id, preview: dict | None, mask_preview: dict | None = None) -> None:
    """Show a connected IMAGE (and MASK) in the editor even though the node failed (the user needs it to place points)."""
    if (preview is None and mask_preview is None) or unique_id is None:
        return
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_sync(IMAGE_EVENT, {"node": str(unique_id), "image": preview, "input_mask": mask_preview},
                         server.client_id)


NODE_CLASS_MAPPINGS = {"DragKitPointsEditor": DragPointsEditor}
NODE_DISPLAY_NAME_MAPPINGS = {"DragKitPointsEditor": "Drag Points Editor (DragKit)"}
