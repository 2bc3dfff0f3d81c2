"""The model interface on a diffusers ``UNet2DConditionModel``.

Self-attention layers are the ``attn1`` modules of the UNet's transformer
blocks, ordered encoder, middle, decoder (execution order). During
:meth:`DiffusersBackend.run` each of them gets an attention processor that
calls the control between the key/value projections and the attention
product; the UNet's own processors are restored afterwards, so the user's
model is left as it was. Each UNet call of :meth:`DiffusersBackend.run` goes
through a captured pass (:mod:`dragkit.capture`: a CUDA graph per key on a
GPU, plain elsewhere).

Conditioning is a :class:`DiffusersConditioning`: text embeddings
``(1, tokens, dim)``, optional negative embeddings and a CFG scale.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import STAGES, AttentionControl, AttnLayer
from .backend import FeatureLoop, FeaturePredictor, Loop, feature_level
from .capture import PassCache, capture_mode, storage_identity, tensor_layout
from .errors import DragInputError
from .schedule import scaled_linear_alphas_cumprod

_STAGE_OF_PREFIX = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}


@dataclass(frozen=True)
class DiffusersConditioning:
    """Prompt embeddings for a diffusers UNet.

    Attributes:
        positive: ``(1, tokens, dim)`` text embeddings.
        negative: ``(1, tokens, dim)`` embeddings of the negative prompt, or
            ``None`` for no classifier-free guidance.
        cfg: guidance scale, used only with ``negative``.
    """

    positive: torch.Tensor
    negative: torch.Tensor | None = None
    cfg: float = 1.0


class _ControlledSelfAttention:
    """Attention processor for one self-attention layer that lets a control edit K and V."""

    def __init__(self, layer: AttnLayer, backend: DiffusersBackend) -> None:
        self.layer = layer
        self.backend = backend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if spatial_shape is not None:
            b, c, h, w = spatial_shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        key, value = self.backend.control(self.layer, key, value)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))

        if spatial_shape is not None:
            out = out.transpose(-1, -2).reshape(spatial_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class _StopForward(Exception):
    """Raised by the feature hook to skip the rest of the UNet when only features are wanted."""


class DiffusersBackend:
    """:class:`~dragkit.backend.DiffusionBackend` for a diffusers ``UNet2DConditionModel``.

    Args:
        unet: the UNet, already on its compute device and dtype.
        alphas_cumprod: ᾱ per training timestep; default SD1.x scaled_linear.
        prediction_type: ``"epsilon"`` or ``"v_prediction"`` (the model's output).
        feature_level: the decoder level (``up_blocks`` index) whose output is
            the motion-supervision feature (:func:`~dragkit.backend.feature_level`;
            ``None``: the penultimate).
    """

    def __init__(self, unet, alphas_cumprod: torch.Tensor | None = None, prediction_type: str = "epsilon",
                 feature_level: int | None = None) -> None:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise DragInputError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        self.unet = unet
        self.prediction_type = prediction_type
        self.feature_level = feature_level
        self._alphas = (scaled_linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod).to(torch.float64)
        self._modules = self._find_self_attention()
        self.control = AttentionControl()
        self.passes = PassCache()
        """Captured UNet passes of :meth:`run` (:mod:`dragkit.capture`)."""

    @property
    def model_key(self) -> str:
        return f"diffusers:{id(self.unet)}"

    @property
    def compute_device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas

    def self_attention_layers(self) -> tuple[AttnLayer, ...]:
        return tuple(layer for layer, _ in self._modules)

    def _find_self_attention(self) -> list[tuple[AttnLayer, object]]:
        found = []
        for name, module in self.unet.named_modules():
            if name.endswith(".attn1") and hasattr(module, "to_k") and not getattr(module, "is_cross_attention", False):
                stage = _STAGE_OF_PREFIX.get(name.split(".")[0])
                if stage is not None:
                    found.append((stage, name, module))
        found.sort(key=lambda item: STAGES.index(item[0]))
        return [
            (AttnLayer(index=i, stage=stage, name=name, channels=module.to_k.out_features,
                       downscale=self._downscale(name)), module)
            for i, (stage, name, module) in enumerate(found)
        ]

    def _downscale(self, name: str) -> int:
        """Latent size / feature-map size of the module at ``name`` (``down_blocks.i``: 2**i, up blocks mirrored)."""
        parts = name.split(".")
        levels = len(self.unet.down_blocks)
        if parts[0] == "mid_block":
            return 2 ** (levels - 1)
        level = int(parts[1])
        return 2 ** (level if parts[0] == "down_blocks" else len(self.unet.up_blocks) - 1 - level)

    def run(
        self,
        loop: Loop,
        z_start: torch.Tensor,
        conditioning: DiffusersConditioning,
        control: AttentionControl,
        timesteps: list[int],
    ) -> torch.Tensor:
        with self._controlled(control), torch.no_grad():
            z_end = loop(self._noise_predictor(conditioning), z_start.to(self.compute_device, torch.float32))
        return z_end.to(device=z_start.device, dtype=torch.float32)

    def run_features(
        self,
        loop: FeatureLoop,
        z_start: torch.Tensor,
        conditioning: DiffusersConditioning,
        control: AttentionControl,
        timesteps: list[int],
    ) -> torch.Tensor:
        if conditioning.negative is not None and conditioning.cfg != 1.0:
            raise DragInputError("motion supervision runs without classifier-free guidance (cfg 1)")
        flags = [p.requires_grad for p in self.unet.parameters()]
        self.unet.requires_grad_(False)
        try:
            with self._controlled(control), torch.enable_grad():
                z_end = loop(self._feature_predictor(conditioning), z_start.to(self.compute_device, torch.float32))
        finally:
            for p, flag in zip(self.unet.parameters(), flags):
                p.requires_grad_(flag)
        return z_end.detach().to(device=z_start.device, dtype=torch.float32)

    def feature_block(self):
        """The decoder block whose output is the motion-supervision feature (:func:`~dragkit.backend.feature_level`; SD1.5: ``up_blocks[2]``)."""
        return self.unet.up_blocks[feature_level(len(self.unet.up_blocks), self.feature_level)]

    @contextlib.contextmanager
    def _controlled(self, control: AttentionControl):
        """Install the controlled self-attention processors for the duration, then restore the UNet's own."""
        saved = {layer.index: module.processor for layer, module in self._modules}
        for layer, module in self._modules:
            module.set_processor(_ControlledSelfAttention(layer, self))
        self.control = control
        try:
            yield
        finally:
            for layer, module in self._modules:
                module.set_processor(saved[layer.index])
            self.control = AttentionControl()

    def _feature_predictor(self, conditioning: DiffusersConditioning) -> FeaturePredictor:
        device, dtype = self.compute_device, self.dtype
        context = conditioning.positive.to(device, dtype)
        block = self.feature_block()

        def predict(z: torch.Tensor, timestep: int, with_eps: bool):
            captured = {}

            def hook(module, inputs, output):
                captured["features"] = output
                if not with_eps:
                    raise _StopForward

            handle = block.register_forward_hook(hook)
            try:
                t = torch.tensor([timestep] * z.shape[0], device=device)
                out = self.unet(z.to(dtype), t, encoder_hidden_states=context.expand(z.shape[0], -1, -1)).sample
                eps = self._to_eps(out.to(torch.float32), z, timestep)
            except _StopForward:
                eps = None
            finally:
                handle.remove()
            return eps, captured["features"]

        return predict

    def _noise_predictor(self, conditioning: DiffusersConditioning):
        device, dtype = self.compute_device, self.dtype
        use_cfg = conditioning.negative is not None and conditioning.cfg != 1.0
        if use_cfg:
            context = torch.cat([conditioning.negative, conditioning.positive]).to(device, dtype)
        else:
            context = conditioning.positive.to(device, dtype)

        def predict_noise(z: torch.Tensor, timestep: int) -> torch.Tensor:
            rows = torch.cat([z, z]) if use_cfg else z
            t = torch.tensor([timestep] * rows.shape[0], device=device)
            out = self._unet_pass((rows.to(dtype), t, context.expand(rows.shape[0], -1, -1)))
            eps = self._to_eps(out.to(torch.float32), rows, timestep)
            if use_cfg:
                uncond, cond = eps.chunk(2)
                eps = uncond + conditioning.cfg * (cond - uncond)
            return eps

        return predict_noise

    def _unet_pass(self, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The UNet's output for ``(latent rows, timesteps, prompt embeddings)``, through :attr:`passes` unless capture is off."""
        mode = capture_mode(inputs[0].device)
        if mode == "off":
            return self._unet_call(inputs)
        key = (self.control.signature(), tensor_layout(inputs))
        return self.passes.run(key, self._unet_call, inputs, self.control, storage_identity(self.unet), mode)

    def _unet_call(self, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        rows, t, context = inputs
        return self.unet(rows, t, encoder_hidden_states=context).sample

    def _to_eps(self, output: torch.Tensor, z: torch.Tensor, timestep: int) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return output
        alpha = float(self._alphas[timestep])
        return alpha**0.5 * output + (1.0 - alpha) ** 0.5 * z
