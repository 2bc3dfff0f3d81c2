"""Image conversions shared by the metrics.

An image is ``(H, W, 3)`` RGB: numpy or torch, uint8 (0..255) or floating
point in [0, 1]. :func:`as_float_image` turns either into a float32 torch
tensor in [0, 1], the form every metric computes on.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DragInputError


def as_float_image(image) -> torch.Tensor:
    """``(H, W, 3)`` float32 tensor in [0, 1] from a uint8 or [0, 1] float image (numpy or torch)."""
    tensor = torch.from_numpy(np.array(image)) if isinstance(image, np.ndarray) else image
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3 or tensor.shape[2] != 3:
        shape = tuple(getattr(image, "shape", ()))
        raise DragInputError(f"an image must be (height, width, 3) RGB, got shape {shape}")
    if tensor.dtype == torch.uint8:
        return tensor.to(torch.float32) / 255.0
    if not tensor.is_floating_point():
        raise DragInputError(f"an image must be uint8 or floating point, got {tensor.dtype}")
    if not torch.isfinite(tensor).all():
        raise DragInputError("the image contains NaN or infinite values")
    return tensor.to(torch.float32)


def to_model_input(image) -> torch.Tensor:
    """``(1, 3, H, W)`` float32 in [-1, 1] (the convention of LPIPS and of the VAE)."""
    return (as_float_image(image).permute(2, 0, 1)[None] * 2.0 - 1.0).contiguous()

