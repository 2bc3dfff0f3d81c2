"""DDIM inversion with a key/value cache, and KV-injected DDIM denoising.

Both work on VP latents in the model's scaled latent space (see
:mod:`dragkit.schedule`), ``(1, C, h, w)`` float32, through a
:class:`~dragkit.backend.DiffusionBackend`.

Inversion (METHODS.md, "Common ground"): for the first n ascending timesteps
t, ε = UNet(z, t, c); z ← DDIM step from ᾱ_prev(t) to ᾱ(t). The UNet sees
timestep t on a latent still at the previous level, as in all references.

Denoising: deterministic DDIM (η = 0) from a step index down to timestep 1,
landing at ᾱ[0] like the references (``set_alpha_to_one=False``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .attention import AttentionControl, AttnCache, AttnLayer, KVInjector, KVRecorder, MutualSelfAttention
from .backend import DiffusionBackend, NoisePredictor
from .errors import DragInputError
from .schedule import DDIMSchedule, ddim_step, predicted_x0

Progress = Callable[[int, torch.Tensor], None]
"""``progress(steps_done, x0_prediction)``; may raise to cancel (ComfyUI's interrupt)."""


def check_latent(z: torch.Tensor, what: str = "latent") -> None:
    """Raise unless ``z`` is one finite ``(1, C, h, w)`` latent."""
    if z.dim() != 4:
        raise DragInputError(f"the {what} must be (batch, channels, height, width), got shape {tuple(z.shape)}")
    if z.shape[0] != 1:
        raise DragInputError(f"the {what} holds a batch of {z.shape[0]}; drag editing works on one image at a time")
    if not torch.isfinite(z).all():
        raise DragInputError(f"the {what} contains NaN or infinite values")


def ddim_invert(
    backend: DiffusionBackend,
    z0: torch.Tensor,
    conditioning: Any,
    schedule: DDIMSchedule,
    record_layers: tuple[AttnLayer, ...],
    cache_policy: str = "auto",
    progress: Progress | None = None,
) -> AttnCache:
    """Invert ``z0`` to t* and record the trajectory and the keys/values of ``record_layers``.

    Args:
        backend: the model.
        z0: source latent, VP (clean), ``(1, C, h, w)``.
        conditioning: the backend's conditioning (prompt), guidance 1.
        schedule: N steps and strength; n = round(strength N) steps are inverted.
        record_layers: self-attention layers whose keys/values are cached.
        cache_policy: where the cache lives (:func:`~dragkit.attention.choose_storage_device`).
        progress: called after each step.

    Returns:
        The cache; ``cache.z_star`` is the inverted latent at t*.
    """
    check_latent(z0, "source latent")
    z0 = z0.to(torch.float32)
    cache = AttnCache(schedule=schedule, layers=record_layers, model_key=backend.model_key, source=z0.detach().cpu())
    recorder = KVRecorder(cache, record_layers, cache_policy, schedule.num_inversion_steps)
    timesteps = schedule.inversion_timesteps()
    trajectory: dict[int, torch.Tensor] = {}

    def loop(predict_noise: NoisePredictor, z: torch.Tensor) -> torch.Tensor:
        for done, t in enumerate(timesteps, start=1):
            recorder.begin_step(t)
            eps = predict_noise(z, t)
            if progress is not None:
                progress(done, predicted_x0(z, eps, schedule.alpha_prev(t)))
            z = ddim_step(z, eps, schedule.alpha_prev(t), schedule.alpha(t))
            trajectory[t] = z.detach()
        return z

    backend.run(loop, z0, conditioning, recorder, timesteps)
    cache.trajectory.update({t: z.cpu() for t, z in trajectory.items()})
    recorder.finish()
    return cache


def injection_timesteps(timesteps: list[int], start: float, end: float) -> set[int]:
    """The sampling timesteps whose fraction ``k / len`` lies in ``[start, end)`` (k = step number from 0)."""
    if not 0.0 <= start <= end <= 1.0:
        raise DragInputError(f"injection range must satisfy 0 <= start <= end <= 1, got start={start}, end={end}")
    count = len(timesteps)
    return {t for k, t in enumerate(timesteps) if start <= k / count < end}


KV_SOURCES = ("inversion cache", "reference branch")


def kv_sample(
    backend: DiffusionBackend,
    z: torch.Tensor,
    conditioning: Any,
    cache: AttnCache,
    from_index: int,
    inject_layers: tuple[AttnLayer, ...],
    inject_start: float = 0.0,
    inject_end: float = 1.0,
    progress: Progress | None = None,
    kv_source: str = "inversion cache",
) -> torch.Tensor:
    """Denoise ``z`` from step index ``from_index`` to the clean latent, injecting source keys/values.

    Args:
        backend: the model (the same one that recorded ``cache``).
        z: VP latent at ``cache.schedule.timesteps[from_index]``, ``(1, C, h, w)``.
        conditioning: the backend's conditioning (may carry CFG and ControlNet).
        cache: the inversion's attention cache.
        from_index: step index of ``z`` in the cache's schedule.
        inject_layers: layers whose keys/values are replaced (empty: plain DDIM).
        inject_start, inject_end: fraction of the sampling steps, from the
            first, during which injection is on (0 and 1: every step).
        progress: called after each step.
        kv_source: ``"inversion cache"``: the keys/values DDIM Invert recorded
            at the same timestep (FastDrag); ``"reference branch"``: the
            unedited latent z_t* is denoised alongside at batch 2 (first alone
            down to ``z``'s step if ``z`` is later) and the edited branch
            attends to its keys/values (mutual self-attention, DragDiffusion
            and GoodDrag).

    Returns:
        The denoised VP latent at ᾱ[0], float32 ``(1, C, h, w)``.
    """
    check_latent(z, "latent")
    cache.check_compatible(z, backend.model_key)
    if kv_source not in KV_SOURCES:
        raise DragInputError(f"kv_source must be one of {KV_SOURCES}, got {kv_source!r}")
    schedule = cache.schedule
    timesteps = schedule.denoising_timesteps(from_index)
    active = injection_timesteps(timesteps, inject_start, inject_end)

    def denoise(timesteps: list[int], control: AttentionControl, report: Progress | None):
        def loop(predict_noise: NoisePredictor, z: torch.Tensor) -> torch.Tensor:
            for done, t in enumerate(timesteps, start=1):
                control.begin_step(t)
                eps = predict_noise(z, t)
                if report is not None:
                    report(done, predicted_x0(z[-1:], eps[-1:], schedule.alpha(t)))
                z = ddim_step(z, eps, schedule.alpha(t), schedule.alpha_prev(t))
            return z

        return loop

    if kv_source == "inversion cache":
        control = KVInjector(cache, inject_layers, active)
        return backend.run(denoise(timesteps, control, progress), z.to(torch.float32), conditioning, control, timesteps)

    reference = cache.z_star.to(z.device)
    if from_index > schedule.start_index:
        catch_up = schedule.timesteps[schedule.start_index : from_index]
        plain = AttentionControl()
        reference = backend.run(denoise(catch_up, plain, None), reference, conditioning, plain, catch_up)
    mutual = MutualSelfAttention(inject_layers, active)
    pair = torch.cat([reference, z.to(torch.float32)])
    return backend.run(denoise(timesteps, mutual, progress), pair, conditioning, mutual, timesteps)[1:]
