"""The model interface on a ComfyUI MODEL (ModelPatcher).

- ᾱ comes from the model's own ``model_sampling`` (ᾱ = 1 / (1 + σ²) with
  ComfyUI's float32 σ table, so it differs from a float64 schedule by about
  1e-7 relative), which keeps LCM, v-prediction or rescaled schedules right.
- Self-attention layers are the ``attn1`` of every transformer block of the
  UNet's SpatialTransformers, addressed by ComfyUI's ``(block, number,
  block_index)`` keys, e.g. ``("output", 3, 0)``.
- :meth:`ComfyBackend.run` never touches the shared model: it clones the
  patcher, wires the control in with ``attn1_replace`` patches on the clone,
  and runs the engine loop as the sampler function of a
  ``comfy.samplers.KSAMPLER`` under a ``CFGGuider``. Model loading, ControlNet
  and other conditioning extras, model patches and wrappers therefore work
  exactly as in KSampler.
- :meth:`ComfyBackend.run` sends each UNet call through a captured pass
  (:mod:`nodes.comfy_capture`: a CUDA graph per key on a GPU, eager
  elsewhere or when the capture cannot honour the call). Its clone keeps the
  MODEL's kind, so on ComfyUI 0.33.0 a Dynamic VRAM MODEL streams its weights
  through the host's own prefetch during inference (DDIM Invert, KV-Injected
  Sample with either KV source).
- :meth:`ComfyBackend.run_features` runs the loop with autograd on, in the
  host's training mode (:func:`nodes.host_caps.training_mode`), on the host's
  non-dynamic delegate of the MODEL (:func:`nodes.host_caps.autograd_patcher`:
  no gradient reads a weight buffer the prefetch has reused) prepared by
  :func:`nodes.comfy_autograd.prepare_for_backward` (weights made
  autograd-safe in place, no copy; the measured backward memory reserved as
  the host accounts memory), and captures the penultimate decoder
  level's output with an output-block patch; its passes, forward and
  backward, are captured per run (:func:`nodes.comfy_capture.install_features`).
- LATENT samples use ComfyUI's convention: unscaled VAE latents, and for a
  noisy latent the variance-exploding form ``x = z_VP * sqrt(1 + σ²)``, so a
  LATENT from DDIM Invert can also be finished by KSamplerAdvanced.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import comfy.model_base
import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import torch
from comfy.ldm.modules.attention import SpatialTransformer, optimized_attention
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

from ..dragkit.attention import AttentionControl, AttnLayer
from ..dragkit.backend import FeatureLoop, Loop, feature_level
from ..dragkit.capture import PassCache
from ..dragkit.errors import DragInputError
from ..dragkit.flow_hooks import FeaturesCaptured, checkpointed_double_blocks, feature_hooks, flux_layers, kv_hooks
from . import comfy_capture
from .comfy_autograd import prepare_for_backward, release
from .host_caps import autograd_patcher, training_mode

log = logging.getLogger("DragKit")

_STAGE_OF_BLOCK = {"input": "down", "middle": "mid", "output": "up"}


@dataclass(frozen=True)
class ComfyConditioning:
    """ComfyUI CONDITIONING for the guider: positive, optional negative, CFG scale."""

    positive: list
    negative: list | None = None
    cfg: float = 1.0


def check_conditioning_fits(model, conditioning: list, name: str = "positive") -> None:
    """Raise unless every prompt of ``conditioning`` fits the UNet of ``model`` (a ModelPatcher).

    A CONDITIONING from another family's CLIP would otherwise fail deep in the
    UNet with a matrix-shape error. Two checks, by role: the prompt
    embeddings' width (the last axis of each ``(1, tokens, width)`` tensor)
    must be the UNet's cross-attention context width (SD1.x 768, SD2.x 1024,
    SDXL 2048), and a UNet whose class-label (ADM) input is built from the
    pooled text embedding (SDXL, SDXL refiner) needs ``pooled_output``.
    Mirrors ComfyUI 0.3.64: ``model_config.unet_config["context_dim"]`` and
    ``comfy.model_base.sdxl_pooled`` (which reads ``pooled_output`` unless
    ``unclip_conditioning`` is given).
    """
    base = model.model
    family = type(base.model_config).__name__
    width = base.model_config.unet_config.get("context_dim")
    needs_pooled = isinstance(base, (comfy.model_base.SDXL, comfy.model_base.SDXLRefiner))
    for cond, options in conditioning:
        if width is not None and cond.shape[-1] != width:
            raise DragInputError(
                f"the {name} conditioning's prompt embeddings are {cond.shape[-1]} wide but this {family} MODEL "
                f"takes {width} (SD1.x 768, SD2.x 1024, SDXL 2048): encode the prompt with the CLIP of the same "
                "checkpoint as the MODEL"
            )
        if needs_pooled and "pooled_output" not in options and "unclip_conditioning" not in options:
            raise DragInputError(
                f"the {name} conditioning has no pooled text embedding, which this {family} MODEL needs: encode the "
                "prompt with the checkpoint's own CLIP in CLIP Text Encode"
            )


def cfg_guider(patcher, conditioning: ComfyConditioning):
    """A ``CFGGuider`` on ``patcher`` with the prompts: CFG when a negative prompt and a scale other than 1 are given."""
    guider = comfy.samplers.CFGGuider(patcher)
    if conditioning.negative is not None and conditioning.cfg != 1.0:
        guider.set_conds(conditioning.positive, conditioning.negative)
        guider.set_cfg(conditioning.cfg)
    else:
        guider.inner_set_conds({"positive": conditioning.positive})
    return guider


class ComfyBackend:
    """:class:`~dragkit.backend.DiffusionBackend` over a ComfyUI ``ModelPatcher``."""

    def __init__(self, model, feature_level: int | None = None) -> None:
        """``feature_level``: the decoder level whose output :meth:`run_features` captures (:func:`feature_level`; ``None``: the penultimate)."""
        self.model = model
        self.feature_level = feature_level
        self.model_sampling = model.get_model_object("model_sampling")
        if not isinstance(self.model_sampling, comfy.model_sampling.EPS) or isinstance(
            self.model_sampling, comfy.model_sampling.CONST
        ):
            raise DragInputError(
                "this MODEL is not an ε- or v-prediction diffusion model (e.g. a flow model); DDIM inversion "
                "needs an SD1.x/SD2.x/SDXL-style UNet"
            )
        if not hasattr(self.model_sampling, "num_timesteps"):
            raise DragInputError("this MODEL has a continuous noise schedule; DDIM inversion needs a discrete one")
        timesteps = torch.arange(self.model_sampling.num_timesteps)
        self._sigmas = self.model_sampling.sigma(timesteps).to(torch.float64).cpu()
        self._layers = self._find_self_attention()
        if feature_level is not None:
            _feature_block_index(model.model.diffusion_model, feature_level)  # a level this UNet lacks fails here, before any work

    @property
    def model_key(self) -> str:
        return f"comfy:{id(self.model.model)}"

    @property
    def compute_device(self) -> torch.device:
        return torch.device(self.model.load_device)

    def alphas_cumprod(self) -> torch.Tensor:
        return 1.0 / (1.0 + self._sigmas**2)

    def self_attention_layers(self) -> tuple[AttnLayer, ...]:
        return tuple(layer for layer, _ in self._layers)

    def check_timesteps(self, timesteps: list[int]) -> None:
        """Warn when the MODEL's sampling cannot evaluate these timesteps exactly (e.g. LCM sampling)."""
        sigmas = torch.tensor([float(self._sigmas[t]) for t in timesteps])
        mapped = self.model_sampling.timestep(sigmas).round().long().tolist()
        wrong = [(t, m) for t, m in zip(timesteps, mapped) if t != m]
        if wrong:
            log.warning(
                "DragKit: this MODEL's sampling evaluates timestep %d as %d (and %d more); a ModelSamplingDiscrete "
                "'lcm' patch does this. FastDrag uses an LCM UNet as a plain ε-model: leave that patch out.",
                wrong[0][0], wrong[0][1], len(wrong) - 1,
            )

    def _find_self_attention(self) -> list[tuple[AttnLayer, tuple[str, int, int]]]:
        unet = self.model.model.diffusion_model
        groups = [
            ("input", list(getattr(unet, "input_blocks", []))),
            ("middle", [getattr(unet, "middle_block", [])]),
            ("output", list(getattr(unet, "output_blocks", []))),
        ]
        found = []
        downscale = 1  # the latent's size / the block's feature map: x2 after a Downsample, /2 after an Upsample
        for block_name, blocks in groups:
            for number, block in enumerate(blocks):
                for sub in block:
                    if not isinstance(sub, SpatialTransformer):
                        continue
                    for depth, transformer in enumerate(sub.transformer_blocks):
                        key = (block_name, number, depth)
                        layer = AttnLayer(
                            index=len(found),
                            stage=_STAGE_OF_BLOCK[block_name],
                            name=f"{block_name}.{number}.{depth}",
                            channels=int(transformer.attn1.to_k.weight.shape[0]),
                            downscale=downscale,
                        )
                        found.append((layer, key))
                if any(isinstance(sub, Downsample) for sub in block):
                    downscale *= 2
                if any(isinstance(sub, Upsample) for sub in block):
                    downscale //= 2
        if not found:
            raise DragInputError("this MODEL has no UNet self-attention layers (SD1.x/SD2.x/SDXL UNets are supported)")
        return found

    def latent_to_vp(self, samples: torch.Tensor, sigma: float) -> torch.Tensor:
        """LATENT samples (unscaled; VE at ``sigma``) -> VP latent in the model's scaled space."""
        return self.model.model.process_latent_in(samples.to(torch.float32)) / math.sqrt(1.0 + sigma**2)

    def vp_to_latent(self, z: torch.Tensor, sigma: float) -> torch.Tensor:
        """VP latent -> LATENT samples (unscaled; VE at ``sigma``)."""
        return self.model.model.process_latent_out(z.to(torch.float32) * math.sqrt(1.0 + sigma**2))

    def sigma(self, timestep: int) -> float:
        return float(self._sigmas[timestep])

    def run(self, loop: Loop, z_start: torch.Tensor, conditioning: ComfyConditioning, control: AttentionControl, timesteps: list[int]) -> torch.Tensor:
        patcher = self._patched_clone(control)
        comfy_capture.install(patcher, control)

        def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **_):
            extra_args = extra_args or {}
            return loop(lambda z, t: self._eps(model, z, t, extra_args), x.to(torch.float32))

        return self._guided_run(patcher, conditioning, sample, z_start, timesteps)

    def run_features(
        self, loop: FeatureLoop, z_start: torch.Tensor, conditioning: ComfyConditioning, control: AttentionControl, timesteps: list[int]
    ) -> torch.Tensor:
        if conditioning.negative is not None and conditioning.cfg != 1.0:
            raise DragInputError("motion supervision runs without classifier-free guidance (cfg 1)")
        patcher = self._patched_clone(control, for_autograd=True)
        capture: dict = {"index": _feature_block_index(patcher.model.diffusion_model, self.feature_level)}
        passes = PassCache()
        comfy_capture.install_features(patcher, control, capture, _StopForward, passes)

        @comfy_capture.capturable
        def output_block_patch(h, hsp, transformer_options, **_):
            if transformer_options.get("block") == ("output", capture["index"]):
                capture["features"] = h
                if not capture["with_eps"]:
                    raise _StopForward
            return h, hsp

        patcher.set_model_output_block_patch(output_block_patch)

        def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **_):
            extra_args = extra_args or {}

            def predict(z: torch.Tensor, timestep: int, with_eps: bool):
                capture["with_eps"] = with_eps
                capture.pop("features", None)
                try:
                    eps = self._eps(model, z, timestep, extra_args)
                except _StopForward:
                    eps = None
                return eps, capture["features"]

            def probe(h: int, w: int) -> None:
                z = torch.zeros(*x.shape[:2], h, w, device=x.device, requires_grad=True)
                eps, feats = predict(z, timesteps[0], True)
                (eps.sum() + feats.to(torch.float32).sum()).backward()

            with torch.inference_mode(False), torch.enable_grad(), training_mode():
                capture["probing"] = True
                prepare_for_backward(patcher, probe, tuple(x.shape))
                capture["probing"] = False
                try:
                    return loop(predict, x.to(torch.float32).clone()).detach()
                finally:
                    comfy_capture.tally_gradient_run(passes)
                    passes.clear()
                    release()

        return self._guided_run(patcher, conditioning, sample, z_start, timesteps)

    def _patched_clone(self, control: AttentionControl, for_autograd: bool = False):
        """A clone of the MODEL whose self-attention layers call ``control`` (the shared patcher is untouched).

        ``for_autograd``: a clone a backward may read the weights of
        (:func:`nodes.host_caps.autograd_patcher`, the non-dynamic delegate of a
        Dynamic VRAM MODEL); otherwise a plain ``clone()``, dynamic when the
        MODEL is.
        """
        patcher = (autograd_patcher(self.model) if for_autograd else self.model).clone()
        for layer, (block_name, number, depth) in self._layers:
            patcher.set_model_attn1_replace(_attn1_patch(layer, control), block_name, number, depth)
        return patcher

    def _guided_run(self, patcher, conditioning: ComfyConditioning, sample, z_start: torch.Tensor, timesteps: list[int]) -> torch.Tensor:
        """Run ``sample`` as a KSAMPLER function under a CFGGuider on ``patcher``; VP latent in and out."""
        guider = cfg_guider(patcher, conditioning)
        sigmas = torch.tensor([self.sigma(t) for t in timesteps] + [0.0], dtype=torch.float32)
        scaled_in = self.model.model.process_latent_out(z_start.to(torch.float32))
        sampler = comfy.samplers.KSAMPLER(sample)
        out = guider.sample(torch.zeros_like(scaled_in), scaled_in, sampler, sigmas, disable_pbar=True, seed=0)
        return self.model.model.process_latent_in(out.to(torch.float32)).to(z_start.device)

    def _eps(self, model, z: torch.Tensor, timestep: int, extra_args: dict) -> torch.Tensor:
        """ε of VP latent ``z`` at ``timestep`` through the guider's ``model`` (which returns denoised x0)."""
        sigma = self.sigma(timestep)
        x_ve = z * math.sqrt(1.0 + sigma**2)
        denoised = model(x_ve, torch.full((z.shape[0],), sigma, device=z.device, dtype=z.dtype), **extra_args)
        return ((x_ve - denoised) / sigma).to(torch.float32)


class _StopForward(Exception):
    """Raised by the feature patch to skip the rest of the UNet when only features are wanted."""


def _feature_block_index(unet, level: int | None = None) -> int:
    """Index of the output block whose *input* is the output of decoder level ``level`` (:func:`feature_level`).

    Decoder levels are the runs of output blocks ending with an Upsample (the
    last level has none), so the wanted features enter the first block of the
    level after it (SD1.5: block 9, i.e. the output of ``output_blocks[8]``,
    640 channels at latent resolution). Mirrors ComfyUI 0.3.64's
    ``UNetModel._forward``, which calls output-block patches before each block.
    """
    ends = [i for i, block in enumerate(unet.output_blocks) if any(isinstance(m, Upsample) for m in block)]
    if not ends or ends[-1] + 1 >= len(unet.output_blocks):
        raise DragInputError("this MODEL's UNet has no penultimate decoder level to take features from")
    return ends[feature_level(len(ends) + 1, level)] + 1


def _attn1_patch(layer: AttnLayer, control: AttentionControl):
    """An ``attn1_replace`` function: lets ``control`` edit K/V, then computes attention as ComfyUI does.

    ``extra_options`` is the block's transformer options (ComfyUI 0.3.64 and
    0.33.0 ``BasicTransformerBlock.forward``); passed on as
    ``transformer_options`` as the host's own ``CrossAttention`` does, so an
    attention override another node set (``optimized_attention_override``)
    applies here too. Later keyword arguments are accepted and ignored.
    """

    @comfy_capture.capturable
    def attn1_replace(q, k, v, extra_options, **_):
        k, v = control(layer, k, v)
        return optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                                   transformer_options=extra_options)

    return attn1_replace


def is_flux(model) -> bool:
    """Whether a ComfyUI MODEL holds a FLUX-family flow transformer (FLUX.1 [dev]/[schnell], Kontext, Fill)."""
    base = getattr(model, "model", None)
    return isinstance(base, comfy.model_base.Flux) and hasattr(getattr(base, "diffusion_model", None), "double_blocks")


def flux_guidance(conditioning: list, name: str = "positive") -> float:
    """The guidance scale a FLUX CONDITIONING carries (FluxGuidance sets it; ComfyUI's default is 3.5); a clear error when it is out of range.

    Mirrors ComfyUI 0.3.64 and 0.33.0 ``model_base.Flux.extra_conds``
    (``kwargs.get("guidance", 3.5)``) and FluxGuidance's range, 0 to 100.
    """
    values = {float(options.get("guidance", DEFAULT_FLUX_GUIDANCE)) for _, options in conditioning}
    for value in values:
        if not math.isfinite(value) or not 0.0 <= value <= 100.0:
            raise DragInputError(
                f"the {name} conditioning's FLUX guidance is {value}, outside 0 to 100; set it with FluxGuidance "
                "(DragFlow inverts at 1.0 and samples at 3.5)"
            )
    if len(values) > 1:
        raise DragInputError(f"the {name} conditioning carries several FLUX guidance values {sorted(values)}; use one FluxGuidance")
    return values.pop()


def reference_shapes(conditioning: list) -> tuple[tuple[int, ...], ...]:
    """The shapes of the reference latents (ReferenceLatent: FLUX Kontext) a CONDITIONING carries, in order; one
    prompt's list (several prompts must agree). Mirrors ComfyUI 0.3.64 and 0.33.0 ``model_base.Flux.extra_conds``
    (``kwargs.get("reference_latents")``)."""
    lists = {tuple(tuple(r.shape) for r in options.get("reference_latents") or ()) for _, options in conditioning}
    if len(lists) > 1:
        raise DragInputError(f"the prompts of one conditioning carry different reference latents {sorted(lists)}")
    return lists.pop() if lists else ()


DEFAULT_FLUX_GUIDANCE = 3.5
"""The guidance ComfyUI gives a FLUX model whose conditioning has none."""


def _velocity_sampling(model_sampling):
    """A copy of a flow MODEL's model sampling whose "denoised" output is the raw velocity and whose noise scaling is the identity.

    The engine integrates velocities itself, from t = 0 (where ``x - σ v``
    carries no velocity) to t*; patched in as the ``model_sampling`` object
    (as the ModelSamplingFlux node patches it), the guider's model returns
    the CFG-combined velocity and the KSAMPLER hands the engine's latent
    through unchanged. Its σ schedule (shift) is the MODEL's own.
    """
    patched = copy.copy(model_sampling)
    patched.calculate_denoised = lambda sigma, model_output, model_input: model_output
    patched.noise_scaling = lambda sigma, noise, latent_image, max_denoise=False: latent_image
    patched.inverse_noise_scaling = lambda sigma, latent: latent
    return patched


class ComfyFlowBackend:
    """:class:`~dragkit.flow.FlowBackend` over a ComfyUI FLUX ``ModelPatcher``.

    - Times are the MODEL's own σ (``model_sampling.sigma`` of the uniform
      grid 1..0: FLUX.1 [dev] shift 1.15 = BFL's schedule at 1024², or the
      shift a ModelSamplingFlux node set).
    - :meth:`run` clones the patcher, patches its model sampling so the
      guider's model returns the velocity (:func:`_velocity_sampling`), and
      runs the engine loop as a ``KSAMPLER`` function under a ``CFGGuider``:
      LoRAs, ControlNets, model patches and the conditioning's guidance /
      reference latents act as in KSampler.
    - Keys/values are reached with forward hooks on the blocks' projection
      layers (:func:`dragkit.flow_hooks.kv_hooks`), installed for the run
      only: ComfyUI's FLUX blocks offer no key/value patch point (the UNet's
      ``attn1_replace`` has no FLUX counterpart; a ``patches_replace``
      block replacement swaps the whole block, and the attention override
      sees keys after RoPE with text and image joined). Hooks act on
      whichever weights the host loaded (LoRA-patched, Dynamic VRAM
      streamed).
    - :meth:`run_features` (DragFlow's region supervision) runs the loop with
      autograd on, in the host's training mode, on the host's non-dynamic
      delegate of the MODEL with the measured backward memory reserved
      (:func:`nodes.comfy_autograd.prepare_for_backward`), as the UNet's
      motion supervision does; the double blocks' features are read with
      hooks (:func:`dragkit.flow_hooks.feature_hooks`), optionally with
      gradient checkpointing.
    - Latents: the engine's are in the model's scaled space
      (``process_latent_in``); LATENT samples are unscaled.
    """

    def __init__(self, model) -> None:
        if not is_flux(model):
            raise DragInputError(f"this MODEL is {type(getattr(model, 'model', model)).__name__}, not a FLUX flow model")
        self.model = model
        self.network = model.model.diffusion_model
        self.model_sampling = model.get_model_object("model_sampling")
        self._layers = flux_layers(self.network)

    @property
    def model_key(self) -> str:
        return f"comfy-flux:{id(self.model.model)}"

    @property
    def compute_device(self) -> torch.device:
        return torch.device(self.model.load_device)

    def kv_layers(self) -> tuple[AttnLayer, ...]:
        return self._layers

    def sigmas(self, num_steps: int) -> tuple[float, ...]:
        """The ``num_steps + 1`` times of the MODEL's schedule, 1 down to 0."""
        grid = torch.linspace(1, 0, num_steps + 1)[:-1]
        return tuple(float(s) for s in self.model_sampling.sigma(grid)) + (0.0,)

    def double_block_count(self) -> int:
        return len(self.network.double_blocks)

    def latent_in(self, samples: torch.Tensor) -> torch.Tensor:
        return self.model.model.process_latent_in(samples.to(torch.float32))

    def latent_out(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.model.process_latent_out(x.to(torch.float32))

    def run(self, loop, x_start: torch.Tensor, conditioning: ComfyConditioning, control: AttentionControl, times: list[float]) -> torch.Tensor:
        patcher = self.model.clone()
        patcher.add_object_patch("model_sampling", _velocity_sampling(self.model_sampling))

        def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **_):
            extra_args = extra_args or {}

            def velocity(z: torch.Tensor, t: float) -> torch.Tensor:
                return model(z, torch.full((z.shape[0],), t, device=z.device, dtype=z.dtype), **extra_args).to(torch.float32)

            with kv_hooks(self.network, self._layers, control):
                return loop(velocity, x.to(torch.float32))

        return self._guided_run(patcher, conditioning, sample, x_start, times)

    def run_features(self, loop, x_start: torch.Tensor, conditioning: ComfyConditioning, control: AttentionControl, times: list[float], blocks, checkpointing: bool) -> torch.Tensor:
        """:meth:`dragkit.dragflow.FlowFeatureBackend.run_features` through the guider (one model call per prediction)."""
        if conditioning.negative is not None and conditioning.cfg != 1.0:
            raise DragInputError("dragflow's supervision runs without classifier-free guidance (cfg 1)")
        patcher = autograd_patcher(self.model).clone()
        patcher.add_object_patch("model_sampling", _velocity_sampling(self.model_sampling))
        network = patcher.model.diffusion_model
        capture: dict = {}
        last = max(number for number, _ in blocks)

        def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **_):
            extra_args = extra_args or {}

            def predict(z: torch.Tensor, t: float, with_velocity: bool):
                capture.clear()
                capture["stop"] = not with_velocity
                try:
                    velocity = model(z, torch.full((z.shape[0],), t, device=z.device, dtype=z.dtype), **extra_args).to(torch.float32)
                except FeaturesCaptured:
                    velocity = None
                return velocity, {key: capture[key] for key in blocks}

            def probe(h: int, w: int) -> None:
                z = torch.zeros(*x.shape[:2], h, w, device=x.device, requires_grad=True)
                _, features = predict(z, times[0], False)
                sum(f.to(torch.float32).sum() for f in features.values()).backward()

            with torch.inference_mode(False), torch.enable_grad(), training_mode(), feature_hooks(network, blocks, capture), \
                    checkpointed_double_blocks(network, last, checkpointing):
                prepare_for_backward(patcher, probe, tuple(x.shape))
                try:
                    with kv_hooks(network, flux_layers(network), control):
                        return loop(predict, x.to(torch.float32).clone()).detach()
                finally:
                    release()

        return self._guided_run(patcher, conditioning, sample, x_start, list(times) + [0.0])

    def _guided_run(self, patcher, conditioning: ComfyConditioning, sample, x_start: torch.Tensor, times: list[float]) -> torch.Tensor:
        """Run ``sample`` as a KSAMPLER function under a CFGGuider on ``patcher``; engine latents in and out."""
        guider = cfg_guider(patcher, conditioning)
        sigmas = torch.tensor(list(times), dtype=torch.float32)
        scaled_in = self.latent_out(x_start)
        out = guider.sample(torch.zeros_like(scaled_in), scaled_in, comfy.samplers.KSAMPLER(sample), sigmas, disable_pbar=True, seed=0)
        return self.latent_in(out).to(x_start.device)
