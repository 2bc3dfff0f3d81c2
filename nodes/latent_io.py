"""LATENT dicts that know their diffusion step.

A noisy latent travels as a normal ComfyUI LATENT (``{"samples": ...}``,
variance-exploding at its σ, unscaled, so KSamplerAdvanced can finish it)
plus a :class:`LatentStep` under :data:`STEP_KEY`. Native nodes copy LATENT
dicts with unknown keys, so the step also records a content digest of the
samples (shape, dtype and a hash of every byte): when a node changed the
samples but kept the key (even a flip, which keeps the shape and the sum),
the step is recognised as stale and ignored rather than trusted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..dragkit.errors import DragInputError

STEP_KEY = "dragkit_step"


@dataclass(frozen=True)
class LatentStep:
    """Where a noisy latent sits on its DDIM schedule.

    Attributes:
        num_steps: N of the schedule.
        step_index: index into the schedule's descending timesteps.
        timestep: the UNet timestep of that index.
        sigma: ComfyUI's σ of that timestep (the samples are VE at it).
        fingerprint: content digest of the samples it was attached to (:func:`_fingerprint`).
    """

    num_steps: int
    step_index: int
    timestep: int
    sigma: float
    fingerprint: tuple[tuple[int, ...], str, str]


def _fingerprint(samples: torch.Tensor) -> tuple[tuple[int, ...], str, str]:
    """``(shape, dtype, BLAKE2b hex digest of the bytes)`` of ``samples`` (copied to the CPU to hash)."""
    data = samples.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return tuple(samples.shape), str(samples.dtype), hashlib.blake2b(data.numpy().tobytes(), digest_size=16).hexdigest()


def with_step(samples: torch.Tensor, num_steps: int, step_index: int, timestep: int, sigma: float) -> dict:
    """A LATENT dict holding ``samples`` at the given step."""
    step = LatentStep(num_steps, step_index, timestep, sigma, _fingerprint(samples))
    return {"samples": samples, STEP_KEY: step}


def read_step(latent: dict) -> LatentStep | None:
    """The step of a LATENT, or ``None`` when it has none or its samples changed since."""
    step = latent.get(STEP_KEY)
    if not isinstance(step, LatentStep) or step.fingerprint != _fingerprint(latent["samples"]):
        return None
    return step


def require_step(latent: dict) -> LatentStep:
    """The step of a noisy LATENT, or a clear error when it has none (or another node changed it)."""
    step = read_step(latent)
    if step is None:
        raise DragInputError(
            "this latent does not know its diffusion step (or another node changed it); connect z_t from "
            "DDIM Invert, FastDrag Warp or Motion-Supervision Optimize"
        )
    return step


def clean_latent(samples: torch.Tensor) -> dict:
    """A LATENT dict of a clean (fully denoised) latent."""
    return {"samples": samples}
