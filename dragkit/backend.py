"""The narrow model interface the engine's loops use.

A backend wraps one UNet (a ComfyUI MODEL or a diffusers
``UNet2DConditionModel``) and offers only what the algorithms need:

- ᾱ per training timestep, from the model's own schedule;
- its self-attention layers (:class:`~dragkit.attention.AttnLayer`), in
  execution order;
- :meth:`DiffusionBackend.run`: set the model up with an attention control
  wired into every self-attention layer, and run a loop that calls a
  :data:`NoisePredictor`. The ComfyUI backend runs the loop inside ComfyUI's
  own sampler machinery (guider + sampler), so ControlNet and model patches in
  the conditioning and the MODEL still act.

Conditioning is opaque to the engine: each backend defines its own form
(ComfyUI CONDITIONING lists, or diffusers embeddings).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from .attention import AttentionControl, AttnLayer
from .errors import DragInputError

NoisePredictor = Callable[[torch.Tensor, int], torch.Tensor]
"""``predict_noise(z, timestep) -> eps``: ε for a VP latent ``z`` ``(B, C, h, w)``
evaluated at the integer UNet ``timestep``; float32, same shape as ``z``."""

Loop = Callable[[NoisePredictor, torch.Tensor], torch.Tensor]
"""``loop(predict_noise, z_start) -> z_end``: an engine loop over model evaluations."""

FeaturePredictor = Callable[[torch.Tensor, int, bool], tuple["torch.Tensor | None", torch.Tensor]]
"""``predict(z, timestep, with_eps) -> (eps or None, features)``.

``features`` is the output of the UNet's penultimate decoder block (SD1.5:
the third of four, 640 channels) at its own resolution, ``(B, C_f, h_f, w_f)``
(the latent's size for SD1.5), in the model's compute dtype. With
``with_eps=False`` the forward stops after that block. Gradients flow back to
``z`` when it requires grad; the model's weights never get gradients.
"""

def feature_level(levels: int, chosen: int | None = None) -> int:
    """Index of the decoder level whose output is the motion-supervision feature: by default the penultimate one.

    ``levels`` counts the UNet's decoder levels (resolutions), lowest
    resolution first (SD1.5: 4, so level 2: diffusers ``up_blocks[2]``,
    ComfyUI ``output_blocks[6..8]``; SDXL: 3, so level 1, ``output_blocks[3..5]``).
    ``chosen`` picks another level, 0 to ``levels - 2`` (the last level, at
    full resolution just before the output convolution, is not offered).
    Every backend picks its block with this rule.
    """
    if levels < 2:
        raise DragInputError("this UNet has fewer than two decoder levels; no feature block to supervise")
    if chosen is None:
        return levels - 2
    if not 0 <= chosen <= levels - 2:
        raise DragInputError(
            f"feature_level {chosen} is not available: this UNet's decoder has {levels} levels, so choose 0 (lowest "
            f"resolution) to {levels - 2}, or -1 for the default ({levels - 2}, the penultimate level)"
        )
    return chosen


FeatureLoop = Callable[[FeaturePredictor, torch.Tensor], torch.Tensor]
"""``loop(predict, z_start) -> z_end`` for :meth:`DiffusionBackend.run_features`."""


class DiffusionBackend(Protocol):
    """What the engine knows of a UNet."""

    @property
    def model_key(self) -> str:
        """Identity of the underlying network, to tell caches of different models apart."""

    @property
    def compute_device(self) -> torch.device:
        """Where the model computes."""

    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ per training timestep, float64 ``(T,)``."""

    def self_attention_layers(self) -> tuple[AttnLayer, ...]:
        """Every self-attention layer, in execution order."""

    def run(
        self, loop: Loop, z_start: torch.Tensor, conditioning: Any, control: AttentionControl, timesteps: list[int]
    ) -> torch.Tensor:
        """Run ``loop`` with a noise predictor whose self-attention layers call ``control``.

        ``z_start`` is a VP latent ``(1, C, h, w)``; the loop receives it on
        the compute device, and its returned VP latent is handed back as
        float32 on the same device as ``z_start``. ``timesteps`` are the
        timesteps the loop will evaluate, in order (a host's sampler machinery
        may want them, e.g. ComfyUI's ``sample_sigmas``).
        """

    def run_features(
        self, loop: FeatureLoop, z_start: torch.Tensor, conditioning: Any, control: AttentionControl, timesteps: list[int]
    ) -> torch.Tensor:
        """Like :meth:`run`, with a :data:`FeaturePredictor` and autograd enabled for the loop."""
