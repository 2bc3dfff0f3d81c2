"""Per-image LoRA on a ComfyUI MODEL (ModelPatcher): training, fingerprint, file format.

Training never changes the shared MODEL's patches or values:

- every attention projection (``…attn1/attn2.to_q/to_k/to_v/to_out.0``) gets
  a :class:`LoRAAdapter`, as peft does: a forward hook adds
  ``(alpha/r) · up(down(x))`` to the projection's output, with trainable
  float32 ``down``/``up`` cast to the activation's dtype. No weight is
  wrapped, copied or materialised; the hooks are removed by
  :meth:`ComfyLoRATrainer.close`;
- it trains the MODEL that :func:`nodes.host_caps.autograd_patcher` gives: the
  MODEL itself, or on ComfyUI 0.33.0 with Dynamic VRAM the host's
  non-dynamic delegate (whose weights stay put while a backward reads them;
  the host keeps its model for the next run), and runs in the host's
  training mode (:func:`nodes.host_caps.training_mode`);
- the MODEL is fully loaded, its weights made usable by autograd in place and
  the measured backward memory reserved with the model manager
  (:func:`nodes.comfy_autograd.prepare_for_backward`), then trained under
  ``inference_mode(False)`` + ``enable_grad()`` with
  :func:`dragkit.lora.train_lora`, each step's UNet pass captured forward and
  backward (:func:`nodes.comfy_capture.training_pass`; CUDA graphs on a GPU);
  ε comes from ``BaseModel.apply_model``
  (ε = (x − x̂0)/σ), so v-prediction models train in ε-space too. Compute runs
  in the model's dtype (fp16/bf16 on GPU; fp16 uses a GradScaler), the LoRA
  parameters and optimiser state are float32.

The trained LoRA is a state dict in ComfyUI's generic LoRA keys,
``diffusion_model.<ldm module>.lora_up.weight`` / ``.lora_down.weight`` /
``.alpha``, applied to a clone with ``comfy.sd.load_lora_for_models``
(exactly what LoraLoaderModelOnly does), so KSampler and every node use it
as a regular LoRA patch.
"""

from __future__ import annotations

import hashlib
import logging
import re

import comfy.lora
import comfy.model_management
import comfy.sd
import comfy.utils
import torch

from ..dragkit.capture import PassCache
from ..dragkit.errors import DragInputError
from ..dragkit.lora import (
    LoRATrainingConfig,
    LoRATrainingResult,
    ProgressCallback,
    gaussian_lora_init,
    grad_scaler_for,
    tensor_digest,
    train_lora,
    weights_fingerprint,
)
from . import comfy_capture
from .comfy_autograd import prepare_for_backward, release
from .host_caps import autograd_patcher, training_mode

log = logging.getLogger("DragKit")

ATTENTION_PROJECTION = re.compile(r"\.attn\d+\.(to_q|to_k|to_v|to_out\.0)$")
"""Module paths (under the BaseModel) of the projections that get a LoRA."""


class LoRAAdapter(torch.nn.Module):
    """A trainable LoRA beside one linear projection: ``y + scale · up(down(x))``.

    ``down`` ``(r, in)`` and ``up`` ``(out, r)`` are float32 master
    parameters; the product runs in the activation's dtype.
    """

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.down = torch.nn.Parameter(down)
        self.up = torch.nn.Parameter(up)
        self.scale = float(scale)

    @comfy_capture.capturable
    def hook(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook of the projection: its output plus the LoRA's (reads only the adapter's parameters, so a
        captured pass may bake it in)."""
        x = inputs[0]
        update = torch.nn.functional.linear(torch.nn.functional.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))
        return output + update.to(output.dtype) * self.scale


def attention_projections(base_model) -> list[tuple[str, torch.nn.Module]]:
    """``(module path, module)`` of every attention projection under the BaseModel, sorted by path."""
    found = []
    for name, module in base_model.named_modules():
        weight = getattr(module, "weight", None)
        if ATTENTION_PROJECTION.search(name) and isinstance(module, torch.nn.Linear) and weight is not None and weight.dim() == 2:
            found.append((name, module))
    if not found:
        raise DragInputError("this MODEL has no attention to_q/to_k/to_v/to_out.0 projections to adapt")
    return sorted(found, key=lambda item: item[0])


def model_fingerprint(base_model, samples_per_tensor: int = 64) -> str:
    """A content fingerprint of the loaded diffusion model (its effective, patched weights).

    The model and sampling classes plus :func:`weights_fingerprint` of the
    UNet; a different checkpoint or an upstream LoRA changes it.
    """
    h = hashlib.sha256()
    h.update(type(base_model).__name__.encode())
    h.update(type(getattr(base_model, "model_sampling", None)).__name__.encode())
    h.update(weights_fingerprint(base_model.diffusion_model, samples_per_tensor).encode())
    return h.hexdigest()


def conditioning_digest(positive: list) -> str:
    """sha256 of a CONDITIONING: every tensor and plain option of every entry."""
    h = hashlib.sha256()
    for cond, options in positive:
        h.update(tensor_digest(cond).encode())
        for key in sorted(options):
            value = options[key]
            if isinstance(value, torch.Tensor):
                h.update(f"{key}={tensor_digest(value)}".encode())
            elif isinstance(value, (int, float, str, bool, type(None))):
                h.update(f"{key}={value!r}".encode())
    return h.hexdigest()


def single_prompt(positive: list) -> tuple[torch.Tensor, dict]:
    """The one ``(cond (1, tokens, dim), options)`` entry of a CONDITIONING; raises for anything else."""
    if not isinstance(positive, list) or len(positive) != 1:
        raise DragInputError(
            "the positive conditioning must hold exactly one prompt (connect one CLIP Text Encode; "
            "encode an empty prompt for GoodDrag's default)"
        )
    cond, options = positive[0]
    if cond.shape[0] != 1:
        raise DragInputError(f"the positive conditioning has a batch of {cond.shape[0]}; encode one prompt")
    return cond, options


def effective_weights_fingerprint(model) -> str:
    """:func:`model_fingerprint` of ``model``'s effective weights (checkpoint plus its patches).

    Loads the MODEL fully through the model manager, as the next sampling node
    would, so every patch (e.g. an upstream LoRA) is applied to the module
    weights that are hashed. Cheap when the MODEL is already loaded. A Dynamic
    VRAM MODEL applies its patches only as it streams each layer, so its
    non-dynamic delegate (:func:`nodes.host_caps.autograd_patcher`, the model
    training uses) is hashed instead.
    """
    model = autograd_patcher(model)
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    return model_fingerprint(model.model)


class ComfyLoRATrainer:
    """Trains a LoRA on ``model``'s attention projections: :meth:`train`, then :meth:`close` always.

    The adapters hook the shared modules while training runs (the MODEL's
    patches are never changed, so ComfyUI does not reload it afterwards);
    :meth:`close` removes them. ``model`` is trained through
    :func:`nodes.host_caps.autograd_patcher` (its non-dynamic delegate on a
    Dynamic VRAM host).
    """

    def __init__(self, model, positive: list, config: LoRATrainingConfig) -> None:
        self.model = autograd_patcher(model)
        self.config = config.validate()
        self.cond, self.cond_options = single_prompt(positive)
        self.adapters: dict[str, LoRAAdapter] = {}
        self._hooks: list = []
        self.reserved_bytes = 0

    # -- set-up ------------------------------------------------------------------------------

    def prepare(self, latent_shape: tuple[int, ...]) -> None:
        """Attach the adapters, load the MODEL fully and reserve the measured backward memory.

        ``latent_shape`` ``(1, C, h, w)`` of the training latent; the probe
        steps that measure the backward memory run at the training batch.
        """
        config = self.config
        base = self.model.model
        device = torch.device(self.model.load_device)
        gen = torch.Generator(device="cpu").manual_seed(int(config.seed))
        with torch.inference_mode(False):
            for name, module in attention_projections(base):
                out_features, in_features = module.weight.shape
                down, up = gaussian_lora_init(out_features, in_features, int(config.rank), gen)
                adapter = LoRAAdapter(down.to(device), up.to(device), config.scale)
                self.adapters[name] = adapter
                self._hooks.append(module.register_forward_hook(adapter.hook))
        batch_shape = (int(config.batch), *latent_shape[1:])
        comfy.model_management.load_models_gpu(
            [self.model], memory_required=base.memory_required(list(batch_shape)), force_full_load=True
        )
        self.reserved_bytes = prepare_for_backward(self.model, self._probe, batch_shape)

    def _probe(self, h: int, w: int) -> None:
        """One training step's forward and backward on a zero latent of ``h x w`` (gradients then cleared)."""
        channels = self.model.model.latent_format.latent_channels
        z = torch.zeros(int(self.config.batch), channels, h, w, device=self.model.load_device)
        t = torch.full((z.shape[0],), self.alphas_cumprod().shape[0] // 2, dtype=torch.long, device=z.device)
        with torch.inference_mode(False), torch.enable_grad(), training_mode():
            self._eps_predictor(z)(z, t).to(torch.float32).square().mean().backward()
        for adapter in self.adapters.values():
            adapter.zero_grad(set_to_none=True)

    # -- training ------------------------------------------------------------------------------

    def alphas_cumprod(self) -> torch.Tensor:
        ms = self.model.get_model_object("model_sampling")
        if not hasattr(ms, "num_timesteps"):
            raise DragInputError("this MODEL has a continuous noise schedule; LoRA fine-tuning needs a discrete one")
        sigmas = ms.sigma(torch.arange(ms.num_timesteps)).to(torch.float64).cpu()
        return 1.0 / (1.0 + sigmas**2)

    def _eps_predictor(self, z_like: torch.Tensor, passes: PassCache | None = None):
        """ε of ``(z_t, t)`` through the adapted UNet; with ``passes``, each pass captured (forward and backward)."""
        base = self.model.model
        device = z_like.device
        ms = self.model.get_model_object("model_sampling")
        sigmas = ms.sigma(torch.arange(ms.num_timesteps)).to(torch.float32).to(device)
        cond = self.cond.clone().to(device)
        options = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in self.cond_options.items()}
        # Size conditioning (SDXL) defaults to the latent's size in pixels, as ComfyUI 0.3.64's sampler sets it
        # (comfy/samplers.py encode_model_conds); BaseModel.extra_conds alone would take SDXL's 768.
        options.setdefault("width", z_like.shape[-1] * 8)
        options.setdefault("height", z_like.shape[-2] * 8)
        extras = base.extra_conds(**{**options, "cross_attn": cond, "device": device, "noise": z_like, "latent_image": z_like})
        if "c_concat" in extras:
            raise DragInputError("this MODEL needs concat conditioning (inpainting/instruct models are not supported)")
        transformer_options = dict(self.model.model_options.get("transformer_options", {}))
        params = tuple(p for adapter in self.adapters.values() for p in adapter.parameters())

        def predict_eps(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            batch = z_t.shape[0]
            sigma = sigmas[t]
            x = z_t * (1.0 + sigma**2).sqrt().view(-1, 1, 1, 1)
            kwargs = {k: comfy.utils.repeat_to_batch_size(v.cond, batch).to(device) for k, v in extras.items()}
            c = dict(kwargs, transformer_options=dict(transformer_options, sigmas=sigma, cond_or_uncond=[0]))
            if passes is None:
                denoised = base.apply_model(x, sigma, **c)
            else:
                denoised = comfy_capture.training_pass(self.model, passes, base.apply_model, x, sigma, c, params)
            return ((x - denoised.to(torch.float32)) / sigma.view(-1, 1, 1, 1)).to(torch.float32)

        return predict_eps

    def train(self, latent_mean: torch.Tensor, latent_std: torch.Tensor | None = None,
              progress: ProgressCallback | None = None) -> LoRATrainingResult:
        """Train on the VP image latent (scaled, ``(1, C, h, w)``); returns the losses."""
        if not self.adapters:
            self.prepare(tuple(latent_mean.shape))
        device = torch.device(self.model.load_device)
        params = [p for adapter in self.adapters.values() for p in adapter.parameters()]
        base = self.model.model
        dtype = base.manual_cast_dtype or base.get_dtype()
        passes = PassCache()
        with torch.inference_mode(False), torch.enable_grad(), training_mode():
            mean = latent_mean.detach().clone().to(device, torch.float32)
            std = None if latent_std is None else latent_std.detach().clone().to(device, torch.float32)
            try:
                return train_lora(self._eps_predictor(mean, passes), params, mean, self.alphas_cumprod(), self.config,
                                  latent_std=std, progress=progress, grad_scaler=grad_scaler_for(dtype, device))
            finally:
                comfy_capture.tally_gradient_run(passes)
                passes.clear()

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained LoRA in ComfyUI's generic keys (float32, CPU)."""
        out = {}
        alpha = torch.tensor(float(self.config.alpha), dtype=torch.float32)
        for name, adapter in self.adapters.items():
            out[f"{name}.lora_up.weight"] = adapter.up.detach().to("cpu", torch.float32).clone()
            out[f"{name}.lora_down.weight"] = adapter.down.detach().to("cpu", torch.float32).clone()
            out[f"{name}.alpha"] = alpha.clone()
        return out

    def close(self) -> None:
        """Remove this trainer's hooks from the shared modules and give cached memory back."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        release()


def apply_lora(model, lora_sd: dict, strength: float = 1.0):
    """A clone of ``model`` with ``lora_sd`` applied as regular LoRA patches (as LoraLoaderModelOnly)."""
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, strength, 0)
    return patched


def encode_latent(model, vae, image: torch.Tensor) -> tuple[torch.Tensor, None]:
    """VP latent posterior of one IMAGE ``(1, H, W, C)``: ``(mean, None)``.

    ComfyUI's ``VAE.encode`` returns the posterior mean (cropped to the VAE grid
    as VAE Encode does); it gives no std, so training uses the mean.
    """
    if image.dim() != 4 or image.shape[0] != 1:
        raise DragInputError(f"the image batch has {image.shape[0]} images; LoRA fine-tuning takes one image")
    samples = vae.encode(image[:, :, :, :3])
    return model.model.process_latent_in(samples.to(torch.float32)), None
