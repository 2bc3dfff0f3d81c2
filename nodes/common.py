"""What every DragKit node shares: the menu category, type names, error wrapping, progress.

Node classes only translate ComfyUI types into engine calls; the engine raises
:class:`~dragkit.errors.DragInputError` for bad input, and :func:`node_errors`
turns it into a ``ValueError`` whose message starts with the node's name.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Callable

import comfy.model_management
import comfy.utils
import torch

from ..dragkit.attention import AttnCache
from ..dragkit.errors import DragInputError
from ..dragkit.points import DragPoints

INPUT_LATENT = "the input latent (made upstream of this node)"

CATEGORY = "DragKit"
"""The one Add-Node menu category of the pack."""

NODE_PREFIX = "DragKit"
"""Prefix of every node id, so ids never clash with other packs."""

DRAG_POINTS = "DRAG_POINTS"
"""Socket type of :class:`~dragkit.points.DragPoints` values."""

ATTN_CACHE = "ATTN_CACHE"
"""Socket type of :class:`~dragkit.attention.AttnCache` values."""

log = logging.getLogger("DragKit")


class NodeInputError(ValueError):
    """A bad-input error already prefixed with the node's display name."""


@contextlib.contextmanager
def node_errors(node_name: str) -> Iterator[None]:
    """Re-raise engine input errors as ``[node_name] message`` for the UI."""
    try:
        yield
    except DragInputError as err:
        raise NodeInputError(f"[{node_name}] {err}") from None


FINITE_HINT = (
    "On a GPU in fp16 this is usually an overflow: start ComfyUI with --fp32-unet (model) or --fp32-vae (VAE), "
    "or use an fp16-safe model or VAE."
)


def require_finite(tensor: torch.Tensor, where: str) -> torch.Tensor:
    """``tensor`` unchanged when every value is finite; otherwise a clear error saying ``where`` they appeared.

    ``where`` names the stage, e.g. "the output of DDIM inversion" or "the
    input latent (made upstream of this node)", so a NaN that would decode to
    a black region never reaches the user silently.
    """
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise DragInputError(f"{where} holds {bad} non-finite values (NaN or inf) of {tensor.numel()}. {FINITE_HINT}")
    return tensor


def require_points(points) -> DragPoints:
    """``points`` if it is a DRAG_POINTS value, else a clear error."""
    if not isinstance(points, DragPoints):
        raise DragInputError("points must come from a DragKit points node (Drag Points Editor or Drag Points (JSON))")
    return points


def require_cache(cache) -> AttnCache:
    """``cache`` if it is an ATTN_CACHE value, else a clear error."""
    if not isinstance(cache, AttnCache):
        raise DragInputError("attn_cache is not an attention cache from DDIM Invert")
    return cache


def progress_reporter(total: int) -> Callable[[int], None]:
    """A ``report(done)`` callback that drives a ComfyUI progress bar and honours Cancel.

    ``report`` raises ComfyUI's interrupt exception when the user pressed
    Cancel, so engine loops stop at the next step.
    """
    bar = comfy.utils.ProgressBar(total)

    def report(done: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    return report


def save_temp_png(pixels, prefix: str) -> dict:
    """Save ``pixels`` (uint8 numpy, ``(H, W)`` or ``(H, W, 3)``) as a PNG in ComfyUI's temp folder for the
    frontend to show; returns its ``/view`` reference ``{"filename", "subfolder", "type": "temp"}``.

    ``prefix`` gets a random suffix, so two runs never overwrite a file a browser may still be loading.
    """
    import os
    import secrets

    import folder_paths
    from PIL import Image

    height, width = pixels.shape[:2]
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        f"{prefix}_{secrets.token_hex(3)}", folder_paths.get_temp_directory(), width, height
    )
    name = f"{filename}_{counter:05}_.png"
    Image.fromarray(pixels).save(os.path.join(folder, name), compress_level=1)
    return {"filename": name, "subfolder": subfolder, "type": "temp"}
