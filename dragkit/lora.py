"""Per-image identity LoRA: the host-independent training loop.

DragDiffusion and GoodDrag fine-tune a rank-16 LoRA on the attention
projections of the UNet on the one image being edited, so that inversion and
denoising reproduce it faithfully. This module holds the part both hosts
share: the ε-MSE objective, the sampling of its randomness and the optimiser.
The model side is a small training interface:

- ``predict_eps(z_t, t) -> ε̂``: ε predicted for VP latents ``z_t`` ``(B, C, h,
  w)`` (float32) at integer timesteps ``t`` ``(B,)`` (long), float32, with
  gradient to the LoRA parameters (and only to them);
- ``params``: the trainable LoRA parameters (float32 master copies).

``dragkit.lora_diffusers`` provides it for diffusers (peft) and
``nodes/comfy_lora.py`` for a ComfyUI MODEL (weight wrappers on a clone).

Objective (both references): for each of ``batch`` items, t ~ U{0..T-1},
ε ~ N(0, I), z_t = √ᾱ_t z0 + √(1-ᾱ_t) ε with ᾱ from the model's own schedule,
loss = mean((ε̂(z_t, t) - ε)²) in float32. AdamW (β = 0.9/0.999, ε = 1e-8,
weight decay 1e-2), constant learning rate, no warm-up.

Augmentation (an explicit choice, GoodDrag's): the image is VAE-encoded
**once**; each step and batch item draws z0 = mean + std · n from the latent
posterior when its std is known (diffusers VAEs), else uses the posterior
mean (ComfyUI's VAE.encode gives only the mean). DragDiffusion re-encodes four
random 512-crops every step; for a 512×512 image its crop is the identity, so
the only randomness it adds over ours is the posterior sample, which is
tiny for SD VAEs. We train on the whole latent of the image at its own size
(the latent the edit uses), with no crops.

All randomness (t, ε, posterior samples) comes from one CPU
``torch.Generator`` seeded with ``seed`` and is moved to the compute device,
so a seed gives the same draws on every device, and the same trained
weights on CPU.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from .errors import DragInputError

EpsPredictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``predict_eps(z_t, t) -> eps``: see the module docstring."""

ProgressCallback = Callable[[int, float], None]
"""``progress(steps_done, loss)`` after every optimiser step; raise to stop (e.g. Cancel)."""

TARGET_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
"""The attention projections that get a LoRA (every attention layer, self and cross)."""


@dataclass(frozen=True)
class LoRATrainingConfig:
    """Training parameters; the defaults are DragDiffusion's (GoodDrag: ``steps=70``).

    Attributes:
        steps: optimiser steps.
        rank: LoRA rank r.
        alpha: LoRA alpha; the update is (alpha / r) · up @ down (16/16 = 1 as the references).
        lr: AdamW learning rate (constant).
        batch: items per step (each with its own t, ε and posterior sample).
        seed: seed of the initialisation and of every random draw.
        weight_decay: AdamW weight decay.
    """

    steps: int = 80
    rank: int = 16
    alpha: float = 16.0
    lr: float = 5e-4
    batch: int = 4
    seed: int = 0
    weight_decay: float = 1e-2

    def validate(self) -> "LoRATrainingConfig":
        """Raise :class:`DragInputError` naming the bad parameter."""
        if int(self.steps) < 1:
            raise DragInputError(f"steps={self.steps}: train at least 1 step")
        if int(self.rank) < 1:
            raise DragInputError(f"rank={self.rank}: the LoRA rank must be at least 1")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise DragInputError(f"alpha={self.alpha}: alpha must be positive (16 with rank 16 gives scale 1)")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise DragInputError(f"lr={self.lr}: the learning rate must be positive (5e-4 as the references)")
        if int(self.batch) < 1:
            raise DragInputError(f"batch={self.batch}: the batch must be at least 1")
        if self.weight_decay < 0:
            raise DragInputError(f"weight_decay={self.weight_decay} must not be negative")
        return self

    @property
    def scale(self) -> float:
        """The LoRA update's factor alpha / rank."""
        return float(self.alpha) / int(self.rank)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoRATrainingResult:
    """What :func:`train_lora` did: the loss per step and the wall time."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(1, len(self.losses))


def gaussian_lora_init(out_features: int, in_features: int, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down, up)`` float32 CPU tensors initialised as the references (and peft's "gaussian").

    down (A, ``(rank, in)``) ~ N(0, (1/rank)²), up (B, ``(out, rank)``) = 0, so the
    LoRA starts as the identity edit.
    """
    down = torch.randn(rank, in_features, generator=generator, dtype=torch.float32) / rank
    up = torch.zeros(out_features, rank, dtype=torch.float32)
    return down, up


def grad_scaler_for(dtype: torch.dtype, device: torch.device) -> "torch.amp.GradScaler | None":
    """A GradScaler when the model computes in float16 (on any device), else None.

    fp16 gradients of the small LoRA updates underflow without loss
    scaling; bfloat16 and float32 have the exponent range and need none.
    """
    if dtype != torch.float16:
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def check_latent(latent_mean: torch.Tensor, latent_std: torch.Tensor | None = None) -> None:
    """Raise unless the latent is one finite image ``(1, C, h, w)``."""
    if latent_mean.dim() != 4 or latent_mean.shape[0] != 1:
        raise DragInputError(
            f"the image latent has shape {tuple(latent_mean.shape)}; LoRA fine-tuning takes one image (batch 1)"
        )
    if not torch.isfinite(latent_mean).all():
        raise DragInputError("the image latent contains NaN or infinite values; check the image and the VAE")
    if latent_std is not None and latent_std.shape != latent_mean.shape:
        raise DragInputError(f"latent std shape {tuple(latent_std.shape)} differs from the mean's {tuple(latent_mean.shape)}")


def train_lora(
    predict_eps: EpsPredictor,
    params: Sequence[torch.nn.Parameter],
    latent_mean: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    config: LoRATrainingConfig,
    latent_std: torch.Tensor | None = None,
    progress: ProgressCallback | None = None,
    grad_scaler: "torch.amp.GradScaler | None" = None,
) -> LoRATrainingResult:
    """Train ``params`` in place with the ε-MSE objective on one image latent.

    Args:
        predict_eps: the model's ε for ``(z_t, t)``, with gradient to ``params``.
        params: the LoRA parameters (float32); their device is the compute device.
        latent_mean: the VP image latent z0 (posterior mean, already scaled by the
            model's latent factor), ``(1, C, h, w)``.
        alphas_cumprod: ᾱ per training timestep ``(T,)`` (the model's schedule).
        config: the training parameters (validated here).
        latent_std: posterior std of the latent (same shape), or None to use the mean.
        progress: called after every step with ``(steps_done, loss)``; an
            exception it raises stops training and propagates.
        grad_scaler: a ``torch.amp.GradScaler`` for fp16 compute on GPU (loss
            scaling); None for float32/bfloat16 compute.

    Returns:
        The loss of every step and the wall time.
    """
    config.validate()
    check_latent(latent_mean, latent_std)
    params = list(params)
    if not params:
        raise DragInputError("no LoRA parameters to train (the model has no attention projections)")
    device = params[0].device
    gen = torch.Generator(device="cpu").manual_seed(int(config.seed))
    alphas = alphas_cumprod.detach().to(torch.float64).cpu()
    num_t = alphas.shape[0]
    mean = latent_mean.detach().to(device=device, dtype=torch.float32)
    std = None if latent_std is None else latent_std.detach().to(device=device, dtype=torch.float32)
    shape = (int(config.batch),) + tuple(mean.shape[1:])
    optimizer = torch.optim.AdamW(
        params, lr=float(config.lr), betas=(0.9, 0.999), eps=1e-8, weight_decay=float(config.weight_decay)
    )
    result = LoRATrainingResult()
    start = time.perf_counter()
    for step in range(int(config.steps)):
        # Draw order is fixed (posterior sample, t, ε) so a seed reproduces every draw.
        z0 = mean.expand(shape)
        if std is not None:
            z0 = z0 + std * torch.randn(shape, generator=gen).to(device)
        t = torch.randint(0, num_t, (shape[0],), generator=gen)
        eps = torch.randn(shape, generator=gen).to(device)
        a = alphas[t].to(torch.float32).to(device).view(-1, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1.0 - a).sqrt() * eps
        predicted = predict_eps(z_t, t.to(device))
        loss = torch.nn.functional.mse_loss(predicted.to(torch.float32), eps)
        optimizer.zero_grad(set_to_none=True)
        if grad_scaler is not None:
            grad_scaler.scale(loss).backward()
            grad_scaler.step(optimizer)
            grad_scaler.update()
        else:
            loss.backward()
            optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise DragInputError(f"the LoRA loss became {value} at step {step + 1}; lower lr")
        result.losses.append(value)
        if progress is not None:
            progress(step + 1, value)
    result.seconds = time.perf_counter() - start
    return result


def sample_indices(numel: int, count: int) -> torch.Tensor:
    """``min(count, numel)`` evenly spaced int64 indices into a flat tensor of ``numel`` elements.

    Integer arithmetic (``i·(numel−1) // (k−1)``): a float32 ``linspace`` rounds
    the last index of a tensor above 2**24 elements up to ``numel``, out of
    bounds (a device-side assert on CUDA, an IndexError on the CPU).
    """
    count = min(int(count), int(numel))
    if count <= 1:
        return torch.zeros(count, dtype=torch.int64)
    return torch.arange(count, dtype=torch.int64) * (int(numel) - 1) // (count - 1)


def weights_fingerprint(module: torch.nn.Module, samples_per_tensor: int = 64) -> str:
    """sha256 over every tensor of ``module``'s state dict: name, shape, dtype and evenly spaced values.

    Cheap (no full pass over the weights), stable across restarts and devices,
    and it reads weights only, never the output of a (possibly
    non-deterministic) GPU computation.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        if flat.numel() == 0:
            continue
        idx = sample_indices(flat.numel(), samples_per_tensor).to(flat.device)
        h.update(flat[idx].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's shape, dtype and exact values (CPU copy)."""
    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def pixel_digest(image: torch.Tensor) -> str:
    """sha256 of an IMAGE ``(B, H, W, C)`` in [0, 1] as 8-bit pixels.

    Keys on what the image shows, not on float bits that a GPU op upstream
    (e.g. an upscaler with cudnn benchmark or atomics) may change from run to
    run of the same input.
    """
    return tensor_digest((image.detach().to(torch.float32).clamp(0, 1) * 255).round().to(torch.uint8))


def cache_key(parts: Iterable[tuple[str, str]]) -> str:
    """A hex key from named string parts (image digest, model identity, prompt digest, config...)."""
    h = hashlib.sha256()
    for name, value in parts:
        h.update(f"{name}={value}\n".encode())
    return h.hexdigest()


def config_fingerprint(config: LoRATrainingConfig) -> str:
    """Every training parameter as one canonical string (for cache keys)."""
    return ";".join(f"{k}={v!r}" for k, v in sorted(config.as_dict().items()))
