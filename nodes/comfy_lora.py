"""Per-image LoRA on a ComfyUI MODEL (ModelPatcher): training, fingerprint, file format.

Training never mutates the shared MODEL:

- the patcher is cloned; every attention projection weight
  (``…attn1/attn2.to_q/to_k/to_v/to_out.0.weight``) gets a
  :class:`LoRAWeightWrapper` (trainable float32 down/up, ``w + (alpha/r)·up@down``)
  through ``add_weight_wrapper`` on the clone; every other weight and bias
  gets an identity wrapper, because the checkpoint's parameters are inference
  tensors that autograd cannot save for backward (ComfyUI copies wrapped
  weights on every forward, which gives normal tensors);
- the clone is fully loaded (``force_full_load``, asking the model manager
  for room for the training activations, see :func:`training_memory`, so other
  models are offloaded only when they must be) and trained under
  ``inference_mode(False)`` +
  ``enable_grad()`` with :func:`dragkit.lora.train_lora`; ε comes from
  ``BaseModel.apply_model`` (ε = (x − x̂0)/σ), so v-prediction models train
  in ε-space too. Compute runs in the model's dtype (fp16/bf16 on GPU; fp16
  uses loss scaling), the LoRA parameters and optimiser state are float32;
- afterwards the wrappers are removed from the (shared) modules, so the
  next load of any patcher sees the plain model.

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

from ..dragkit.errors import DragInputError
from ..dragkit.lora import LoRATrainingConfig, LoRATrainingResult, ProgressCallback, gaussian_lora_init, train_lora

log = logging.getLogger("DragKit")

ATTENTION_PROJECTION = re.compile(r"\.attn\d+\.(to_q|to_k|to_v|to_out\.0)$")
"""Module paths (under the BaseModel) of the projections that get a LoRA."""


class _DragKitWrapper:
    """Marker base of the weight functions this module installs (so they can be removed again)."""


class _CopyWeight(_DragKitWrapper):
    """Identity weight function: makes ComfyUI hand the layer a normal (non-inference) copy."""

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


class LoRAWeightWrapper(torch.nn.Module, _DragKitWrapper):
    """A trainable LoRA on one weight: ``w + scale · up @ down`` in float32, cast to ``w``'s dtype."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.down = torch.nn.Parameter(down)
        self.up = torch.nn.Parameter(up)
        self.scale = float(scale)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        delta = (self.up @ self.down) * self.scale
        return weight + delta.to(device=weight.device, dtype=weight.dtype)

    def move_to(self, device=None) -> int:
        if device is not None:
            self.to(device)
        return sum(p.numel() * p.element_size() for p in self.parameters())


def attention_projections(base_model) -> list[tuple[str, torch.nn.Module]]:
    """``(module path, module)`` of every attention projection under the BaseModel, sorted by path."""
    found = []
    for name, module in base_model.named_modules():
        weight = getattr(module, "weight", None)
        if ATTENTION_PROJECTION.search(name) and hasattr(module, "weight_function") and weight is not None and weight.dim() == 2:
            found.append((name, module))
    if not found:
        raise DragInputError("this MODEL has no attention to_q/to_k/to_v/to_out.0 projections to adapt")
    return sorted(found, key=lambda item: item[0])


def model_fingerprint(base_model, samples_per_tensor: int = 64) -> str:
    """A content fingerprint of the loaded diffusion model (its effective, patched weights).

    Hashes the model class, its sampling class, and for every UNet tensor its
    name, shape, dtype and ``samples_per_tensor`` evenly spaced values. Cheap
    (no full pass over the weights) and stable across restarts; a different
    checkpoint or an upstream LoRA changes it.
    """
    h = hashlib.sha256()
    h.update(type(base_model).__name__.encode())
    h.update(type(getattr(base_model, "model_sampling", None)).__name__.encode())
    for name, tensor in sorted(base_model.diffusion_model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        if flat.numel() == 0:
            continue
        idx = torch.linspace(0, flat.numel() - 1, min(samples_per_tensor, flat.numel()), device=flat.device).long()
        h.update(flat[idx].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


def conditioning_digest(positive: list) -> str:
    """sha256 of a CONDITIONING: every tensor and plain option of every entry."""
    h = hashlib.sha256()
    for cond, options in positive:
        h.update(_tensor_bytes(cond))
        for key in sorted(options):
            value = options[key]
            if isinstance(value, torch.Tensor):
                h.update(key.encode() + _tensor_bytes(value))
            elif isinstance(value, (int, float, str, bool, type(None))):
                h.update(f"{key}={value!r}".encode())
    return h.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    t = tensor.detach().to("cpu").contiguous()
    return f"{tuple(t.shape)}|{t.dtype}|".encode() + (t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


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
    weights that are hashed. Cheap when the MODEL is already loaded.
    """
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    return model_fingerprint(model.model)


def training_memory(base_model, config: LoRATrainingConfig, latent_shape: tuple[int, ...]) -> float:
    """Bytes to keep free beside the weights while training: 3x ComfyUI's inference estimate.

    ``latent_shape`` is the image latent's ``(1, C, h, w)``; a training step
    runs ``config.batch`` of them. Backward keeps the forward activations, so
    the inference estimate of ``BaseModel.memory_required`` for that batch is
    tripled (activations, their gradients, and the attention work space).
    """
    return 3.0 * base_model.memory_required([int(config.batch), *latent_shape[1:]])


class ComfyLoRATrainer:
    """Trains a LoRA on a clone of ``model``: :meth:`train` (which prepares the clone), then :meth:`close` always."""

    def __init__(self, model, positive: list, config: LoRATrainingConfig) -> None:
        self.model = model
        self.config = config.validate()
        self.cond, self.cond_options = single_prompt(positive)
        self.patcher = model.clone()
        self.wrappers: dict[str, LoRAWeightWrapper] = {}
        self.loaded = False

    # -- set-up ------------------------------------------------------------------------------

    def prepare(self, latent_shape: tuple[int, ...]) -> None:
        """Add the wrappers to the clone (under ``inference_mode(False)``) and fully load it.

        ``latent_shape`` ``(1, C, h, w)`` of the training latent sizes the
        memory asked of the model manager (:func:`training_memory`).
        """
        config = self.config
        base = self.patcher.model
        device = torch.device(self.patcher.load_device)
        gen = torch.Generator(device="cpu").manual_seed(int(config.seed))
        with torch.inference_mode(False):
            for name, module in attention_projections(base):
                out_features, in_features = module.weight.shape
                down, up = gaussian_lora_init(out_features, in_features, int(config.rank), gen)
                wrapper = LoRAWeightWrapper(down.to(device), up.to(device), config.scale)
                self.wrappers[name] = wrapper
                self.patcher.add_weight_wrapper(f"{name}.weight", wrapper)
            copy = _CopyWeight()
            for name, module in base.named_modules():
                if not hasattr(module, "weight_function"):
                    continue
                for attr in ("weight", "bias"):
                    if getattr(module, attr, None) is None or (attr == "weight" and name in self.wrappers):
                        continue
                    self.patcher.add_weight_wrapper(f"{name}.{attr}", copy)
        comfy.model_management.load_models_gpu(
            [self.patcher], memory_required=training_memory(base, self.config, tuple(latent_shape)), force_full_load=True
        )
        self.loaded = True

    # -- training ------------------------------------------------------------------------------

    def alphas_cumprod(self) -> torch.Tensor:
        ms = self.patcher.get_model_object("model_sampling")
        if not hasattr(ms, "num_timesteps"):
            raise DragInputError("this MODEL has a continuous noise schedule; LoRA fine-tuning needs a discrete one")
        sigmas = ms.sigma(torch.arange(ms.num_timesteps)).to(torch.float64).cpu()
        return 1.0 / (1.0 + sigmas**2)

    def _eps_predictor(self, z_like: torch.Tensor):
        base = self.patcher.model
        device = z_like.device
        ms = self.patcher.get_model_object("model_sampling")
        sigmas = ms.sigma(torch.arange(ms.num_timesteps)).to(torch.float32).to(device)
        cond = self.cond.clone().to(device)
        options = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in self.cond_options.items()}
        extras = base.extra_conds(**{**options, "cross_attn": cond, "device": device, "noise": z_like, "latent_image": z_like})
        if "c_concat" in extras:
            raise DragInputError("this MODEL needs concat conditioning (inpainting/instruct models are not supported)")
        transformer_options = dict(self.patcher.model_options.get("transformer_options", {}))

        def predict_eps(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            batch = z_t.shape[0]
            sigma = sigmas[t]
            x = z_t * (1.0 + sigma**2).sqrt().view(-1, 1, 1, 1)
            kwargs = {k: comfy.utils.repeat_to_batch_size(v.cond, batch).to(device) for k, v in extras.items()}
            options = dict(transformer_options, sigmas=sigma, cond_or_uncond=[0])
            denoised = base.apply_model(x, sigma, transformer_options=options, **kwargs)
            return ((x - denoised.to(torch.float32)) / sigma.view(-1, 1, 1, 1)).to(torch.float32)

        return predict_eps

    def train(self, latent_mean: torch.Tensor, latent_std: torch.Tensor | None = None,
              progress: ProgressCallback | None = None) -> LoRATrainingResult:
        """Train on the VP image latent (scaled, ``(1, C, h, w)``); returns the losses."""
        if not self.loaded:
            self.prepare(tuple(latent_mean.shape))
        device = torch.device(self.patcher.load_device)
        params = [p for w in self.wrappers.values() for p in w.parameters()]
        base = self.patcher.model
        dtype = base.manual_cast_dtype or base.get_dtype()
        scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and dtype == torch.float16 else None
        with torch.inference_mode(False), torch.enable_grad():
            mean = latent_mean.detach().clone().to(device, torch.float32)
            std = None if latent_std is None else latent_std.detach().clone().to(device, torch.float32)
            for p in params:
                p.requires_grad_(True)
            try:
                return train_lora(self._eps_predictor(mean), params, mean, self.alphas_cumprod(), self.config,
                                  latent_std=std, progress=progress, grad_scaler=scaler)
            finally:
                for p in params:
                    p.requires_grad_(False)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained LoRA in ComfyUI's generic keys (float32, CPU)."""
        out = {}
        alpha = torch.tensor(float(self.config.alpha), dtype=torch.float32)
        for name, wrapper in self.wrappers.items():
            out[f"{name}.lora_up.weight"] = wrapper.up.detach().to("cpu", torch.float32).clone()
            out[f"{name}.lora_down.weight"] = wrapper.down.detach().to("cpu", torch.float32).clone()
            out[f"{name}.alpha"] = alpha.clone()
        return out

    def close(self) -> None:
        """Remove this trainer's weight functions from the shared modules (the model stays loaded)."""
        for module in self.patcher.model.modules():
            for attr in ("weight_function", "bias_function"):
                functions = getattr(module, attr, None)
                if functions and any(isinstance(f, _DragKitWrapper) for f in functions):
                    setattr(module, attr, [f for f in functions if not isinstance(f, _DragKitWrapper)])
        self.wrappers = {}


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
