"""A host-free :class:`~dragkit.flow.FlowBackend` over a FLUX network in BFL's layout (pure torch).

The network is called as BFL's reference calls ``Flux.forward``:
``network(img, img_ids, txt, txt_ids, timesteps, y, guidance)`` (ComfyUI's
``comfy.ldm.flux.model.Flux`` through its ``forward_orig``, which takes the
same arguments first), on packed image tokens:

- ``img``: ``(1, (h/2)(w/2), 4C)``, the latent's 2x2 patches
  (:func:`pack`: channel-major within a patch, patches row-major);
- ``img_ids``: ``(1, (h/2)(w/2), 3)``, ``(0, row, column)`` of each patch;
- ``txt``: ``(1, L, context)`` and ``txt_ids`` zeros ``(1, L, 3)``;
- ``y``: the pooled text vector ``(1, vec_in_dim)``; ``timesteps`` and
  ``guidance``: ``(1,)`` in the latent's dtype.

Used by the tests to run the engine without a host, and by anyone with a
BFL-layout FLUX in plain PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import AttentionControl, AttnLayer
from .flow import FlowLoop
from .flow_hooks import FeaturesCaptured, checkpointed_double_blocks, feature_hooks, flux_layers, kv_hooks


@dataclass(frozen=True)
class FluxTextConditioning:
    """The text side of a FLUX call: T5 tokens ``txt`` ``(1, L, context)``, pooled CLIP ``y`` ``(1, vec)``, guidance scale."""

    txt: torch.Tensor
    y: torch.Tensor
    guidance: float = 1.0


def pack(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` latent -> ``(B, (h/2)(w/2), 4C)`` tokens of 2x2 patches (BFL's ``b c (h 2) (w 2) -> b (h w) (c 2 2)``)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack` for an ``h x w`` latent."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device=None) -> torch.Tensor:
    """``(1, (h/2)(w/2), 3)`` position ids of the patches: ``(0, row, column)``."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(1, -1, 3)


class ModuleFlowBackend:
    """:class:`~dragkit.flow.FlowBackend` calling a BFL-layout FLUX ``network`` directly (its own dtype and device)."""

    def __init__(self, network: torch.nn.Module) -> None:
        self.network = network
        self._layers = flux_layers(network)
        first = next(network.parameters())
        self.device, self.dtype = first.device, first.dtype

    @property
    def model_key(self) -> str:
        return f"module:{id(self.network)}"

    def kv_layers(self) -> tuple[AttnLayer, ...]:
        return self._layers

    def velocity(self, x: torch.Tensor, t: float, cond: FluxTextConditioning) -> torch.Tensor:
        """The network's velocity for the latent ``x`` ``(1, C, h, w)`` at time ``t``, float32."""
        h, w = x.shape[-2:]
        dtype, device = self.dtype, self.device
        txt = cond.txt.to(device, dtype)
        forward = getattr(self.network, "forward_orig", self.network)
        out = forward(
            pack(x).to(device, dtype), image_ids(h, w, device).to(dtype), txt, torch.zeros(1, txt.shape[1], 3, device=device, dtype=dtype),
            torch.full((1,), t, device=device, dtype=dtype), cond.y.to(device, dtype), torch.full((1,), cond.guidance, device=device, dtype=dtype),
        )
        return unpack(out, h, w).to(torch.float32)

    def run(self, loop: FlowLoop, x_start: torch.Tensor, conditioning: FluxTextConditioning, control: AttentionControl, times: list[float]) -> torch.Tensor:
        with torch.no_grad(), kv_hooks(self.network, self._layers, control):
            out = loop(lambda x, t: self.velocity(x, t, conditioning), x_start.to(self.device, torch.float32))
        return out.to(x_start.device)

    def double_block_count(self) -> int:
        return len(self.network.double_blocks)

    def run_features(self, loop, x_start: torch.Tensor, conditioning: FluxTextConditioning, control: AttentionControl, times: list[float], blocks, checkpointing: bool) -> torch.Tensor:
        """:meth:`dragkit.dragflow.FlowFeatureBackend.run_features` on the network (its weights get no gradients)."""
        capture: dict = {}

        def predict(z: torch.Tensor, t: float, with_velocity: bool):
            capture.clear()
            capture["stop"] = not with_velocity
            try:
                velocity = self.velocity(z, t, conditioning)
            except FeaturesCaptured:
                velocity = None
            return velocity, {key: capture[key] for key in blocks}

        last = max(number for number, _ in blocks)
        with torch.enable_grad(), kv_hooks(self.network, self._layers, control), feature_hooks(self.network, blocks, capture), \
                checkpointed_double_blocks(self.network, last, checkpointing):
            out = loop(predict, x_start.to(self.device, torch.float32))
        return out.detach().to(x_start.device)
