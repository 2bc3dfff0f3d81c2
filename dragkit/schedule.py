"""The DDIM schedule the three methods share, and the DDIM step.

Conventions (METHODS.md, "Common ground"):

- ``alphas_cumprod`` is ᾱ over the training timesteps ``0 .. T-1`` (T = 1000
  for SD). For SD1.5 it comes from the "scaled_linear" betas 0.00085..0.012;
  on a ComfyUI MODEL the backend reads it from the model's own
  ``model_sampling`` so LCM, v-prediction or other schedules stay correct.
- ``N`` steps use "leading" spacing with offset 1: timesteps
  ``T//N * k + 1`` for ``k = N-1 .. 0`` (50 steps: 981, 961, ..., 1).
- The step before timestep ``t`` is ``t - T//N``; where that is negative,
  ᾱ_prev is ᾱ[0] (not 1: ``set_alpha_to_one=False`` in the references).
- With strength ``s``, ``n = round(s * N)`` steps are inverted (Python's
  round-half-to-even, like the references) and the edited latent lives at
  step index ``N - n``, timestep ``t* = timesteps[N - n]``.

Latents here are "VP" latents ``z_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε`` in
the model's scaled latent space (VAE latent x 0.18215 for SD1.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import DragInputError


def scaled_linear_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """ᾱ of SD1.x/2.x: betas linear in sqrt space between ``beta_start`` and ``beta_end``, float64 ``(T,)``."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass(frozen=True)
class DDIMSchedule:
    """An ``num_steps``-step DDIM schedule with an inversion strength.

    Attributes:
        alphas_cumprod: ᾱ per training timestep, float64 ``(T,)``.
        num_steps: N, the number of steps of the full schedule.
        strength: inversion strength s in (0, 1].
    """

    alphas_cumprod: torch.Tensor = field(repr=False)
    num_steps: int
    strength: float

    def __post_init__(self) -> None:
        total = self.num_train_timesteps
        if not 1 <= self.num_steps <= total:
            raise DragInputError(f"steps must be between 1 and {total}, got {self.num_steps}")
        if not 0.0 < self.strength <= 1.0:
            raise DragInputError(f"inversion strength must be in (0, 1], got {self.strength}")
        if self.num_inversion_steps < 1:
            raise DragInputError(
                f"steps={self.num_steps} with strength {self.strength} inverts round({self.strength} x "
                f"{self.num_steps}) = 0 steps; raise the steps or the strength"
            )

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def step_ratio(self) -> int:
        """Training timesteps between two schedule steps (T // N)."""
        return self.num_train_timesteps // self.num_steps

    @property
    def timesteps(self) -> list[int]:
        """The N timesteps in sampling order (descending), e.g. 981, 961, ..., 1 for N = 50."""
        return [k * self.step_ratio + 1 for k in reversed(range(self.num_steps))]

    @property
    def num_inversion_steps(self) -> int:
        """n = round(strength x N), Python rounding (round(37.5) = 38)."""
        return round(self.strength * self.num_steps)

    @property
    def start_index(self) -> int:
        """Index into :attr:`timesteps` of the edited latent's step (N - n)."""
        return self.num_steps - self.num_inversion_steps

    @property
    def t_star(self) -> int:
        """The timestep the edited latent lives at (681 for 50 steps at 0.7)."""
        return self.timesteps[self.start_index]

    def inversion_timesteps(self) -> list[int]:
        """The n timesteps the inversion evaluates, ascending (1, 21, ..., t*)."""
        return list(reversed(self.timesteps[self.start_index :]))

    def denoising_timesteps(self, from_index: int | None = None) -> list[int]:
        """The timesteps denoising evaluates from step index ``from_index`` (default: t*) down to 1."""
        start = self.start_index if from_index is None else from_index
        if not 0 <= start < self.num_steps:
            raise DragInputError(f"step index {start} is outside the {self.num_steps}-step schedule")
        return self.timesteps[start:]

    def index_of(self, timestep: int) -> int:
        """Step index of ``timestep`` in :attr:`timesteps`."""
        offset = timestep - 1
        if offset < 0 or offset % self.step_ratio or offset // self.step_ratio >= self.num_steps:
            raise DragInputError(f"timestep {timestep} is not on the {self.num_steps}-step schedule")
        return self.num_steps - 1 - offset // self.step_ratio

    def alpha(self, timestep: int) -> float:
        """ᾱ at ``timestep``."""
        return float(self.alphas_cumprod[timestep])

    def alpha_prev(self, timestep: int) -> float:
        """ᾱ one schedule step below ``timestep`` (ᾱ[0] below the first step)."""
        prev = timestep - self.step_ratio
        return float(self.alphas_cumprod[prev if prev >= 0 else 0])

    def sigma(self, timestep: int) -> float:
        """The VE noise level sqrt((1 - ᾱ)/ᾱ) of ``timestep`` (ComfyUI's sigma)."""
        a = self.alpha(timestep)
        return math.sqrt((1.0 - a) / a)


def ddim_step(z: torch.Tensor, eps: torch.Tensor, alpha_from: float, alpha_to: float) -> torch.Tensor:
    """Move a VP latent from noise level ᾱ_from to ᾱ_to along ``eps`` (DDIM, η = 0).

    x̂0 = (z - sqrt(1 - ᾱ_from) ε) / sqrt(ᾱ_from); result = sqrt(ᾱ_to) x̂0 + sqrt(1 - ᾱ_to) ε.
    Inversion steps go up (ᾱ_prev(t) -> ᾱ(t)), denoising steps down
    (ᾱ(t) -> ᾱ_prev(t)). Computed in ``z``'s dtype; shapes ``(B, C, h, w)``.
    """
    x0 = predicted_x0(z, eps, alpha_from)
    return math.sqrt(alpha_to) * x0 + math.sqrt(1.0 - alpha_to) * eps


def predicted_x0(z: torch.Tensor, eps: torch.Tensor, alpha: float) -> torch.Tensor:
    """x̂0 of a VP latent at noise level ᾱ given its noise prediction."""
    return (z - math.sqrt(1.0 - alpha) * eps) / math.sqrt(alpha)
