"""Per-image LoRA on a diffusers ``UNet2DConditionModel`` (peft).

- :func:`add_lora`: a peft adapter (``r=rank, lora_alpha=alpha``, gaussian
  init as the references, ``target_modules = to_q, to_k, to_v, to_out.0`` of
  every attention), float32 LoRA parameters, seeded initialisation.
- :func:`train_lora_diffusers`: :func:`dragkit.lora.train_lora` on it
  (fp16 UNets on CUDA use loss scaling).
- :func:`lora_state_dict` / :func:`save_lora` / :func:`load_lora`: the
  weights in kohya-style keys with diffusers module names,
  ``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``, which ComfyUI's LoraLoader maps onto an SD1.x/SDXL checkpoint
  (``comfy/lora.py: model_lora_keys_unet``) and :func:`load_lora` maps back.

peft is imported lazily; nothing here imports ComfyUI.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .atomic import save_safetensors_atomic
from .errors import DragInputError
from .lora import (
    TARGET_PROJECTIONS,
    LoRATrainingConfig,
    LoRATrainingResult,
    ProgressCallback,
    gaussian_lora_init,
    grad_scaler_for,
    train_lora,
)
from .schedule import scaled_linear_alphas_cumprod

ADAPTER_NAME = "dragkit"
KEY_PREFIX = "lora_unet_"


def _is_target(name: str) -> bool:
    return any(name.endswith("." + target) for target in TARGET_PROJECTIONS) and (
        ".attn" in name or ".attentions." in name
    )


def lora_modules(unet) -> list[tuple[str, torch.nn.Module]]:
    """``(module path, peft LoRA layer)`` of the adapter, sorted by path."""
    found = []
    for name, module in unet.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and ADAPTER_NAME in lora_a:
            found.append((name, module))
    return sorted(found, key=lambda item: item[0])


def add_lora(unet, rank: int = 16, alpha: float = 16.0, seed: int = 0) -> list[torch.nn.Parameter]:
    """Add the DragKit adapter to ``unet`` and return its trainable parameters (float32).

    A (down) ~ N(0, 1/rank²) drawn from a CPU generator seeded with ``seed``,
    module by module in path order; B (up) = 0. The global RNG is left alone.
    """
    from peft import LoraConfig

    if lora_modules(unet):
        raise DragInputError("this UNet already has a DragKit LoRA adapter; use a fresh UNet or remove_lora() first")
    config = LoraConfig(
        r=int(rank), lora_alpha=float(alpha), init_lora_weights="gaussian", target_modules=list(TARGET_PROJECTIONS)
    )
    with torch.random.fork_rng(devices=[]):
        unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    params = []
    for _, module in lora_modules(unet):
        a, b = module.lora_A[ADAPTER_NAME], module.lora_B[ADAPTER_NAME]
        down, up = gaussian_lora_init(b.out_features, a.in_features, int(rank), gen)
        device = a.weight.device
        a.weight = torch.nn.Parameter(down.to(device), requires_grad=True)
        b.weight = torch.nn.Parameter(up.to(device), requires_grad=True)
        params += [a.weight, b.weight]
    if not params:
        raise DragInputError("the UNet has no attention to_q/to_k/to_v/to_out.0 projections to adapt")
    return params


def remove_lora(unet) -> None:
    """Delete the DragKit adapter from ``unet`` (the base weights were never changed)."""
    unet.delete_adapters(ADAPTER_NAME)


def eps_predictor(unet, context: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
    """The :data:`~dragkit.lora.EpsPredictor` of a diffusers UNet for one prompt embedding ``(1, tokens, dim)``."""
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    ctx = context.to(device, dtype)
    alphas = alphas_cumprod.to(torch.float32)

    def predict_eps(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = unet(z_t.to(dtype), t, encoder_hidden_states=ctx.expand(z_t.shape[0], -1, -1)).sample.to(torch.float32)
        if prediction_type == "epsilon":
            return out
        a = alphas[t.cpu()].to(z_t.device).view(-1, 1, 1, 1)
        return a.sqrt() * out + (1.0 - a).sqrt() * z_t

    return predict_eps


def train_lora_diffusers(
    unet,
    latent_mean: torch.Tensor,
    context: torch.Tensor,
    config: LoRATrainingConfig = LoRATrainingConfig(),
    latent_std: torch.Tensor | None = None,
    alphas_cumprod: torch.Tensor | None = None,
    prediction_type: str = "epsilon",
    progress: ProgressCallback | None = None,
) -> LoRATrainingResult:
    """Add the adapter to ``unet`` and train it on one image latent (see :func:`dragkit.lora.train_lora`).

    ``latent_mean``/``latent_std``: VP latent posterior (×0.18215 for SD1.x),
    ``context``: prompt embeddings ``(1, tokens, dim)`` (encode "" for
    GoodDrag's empty prompt). The base weights get no gradient and are not
    changed; the adapter stays on ``unet`` (active) afterwards.
    """
    config.validate()
    if prediction_type not in ("epsilon", "v_prediction"):
        raise DragInputError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    alphas = (scaled_linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod).to(torch.float64)
    base_flags = [(p, p.requires_grad) for p in unet.parameters()]
    unet.requires_grad_(False)
    params = add_lora(unet, config.rank, config.alpha, config.seed)
    device = params[0].device
    dtype = next(p for p, _ in base_flags).dtype
    scaler = grad_scaler_for(dtype, device)
    try:
        with torch.enable_grad():
            return train_lora(
                eps_predictor(unet, context, alphas, prediction_type), params, latent_mean, alphas, config,
                latent_std=latent_std, progress=progress, grad_scaler=scaler,
            )
    finally:
        for p in params:
            p.requires_grad_(False)
        for p, flag in base_flags:
            p.requires_grad_(flag)


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter's weights in ComfyUI-loadable kohya keys with diffusers module names (float32, CPU)."""
    out = {}
    for name, module in lora_modules(unet):
        key = KEY_PREFIX + name.replace(".", "_")
        a, b = module.lora_A[ADAPTER_NAME].weight, module.lora_B[ADAPTER_NAME].weight
        out[key + ".lora_down.weight"] = a.detach().to("cpu", torch.float32).contiguous()
        out[key + ".lora_up.weight"] = b.detach().to("cpu", torch.float32).contiguous()
        alpha = module.scaling[ADAPTER_NAME] * a.shape[0]
        out[key + ".alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    if not out:
        raise DragInputError("this UNet has no DragKit LoRA adapter to save")
    return out


def save_lora(unet, path, metadata: dict | None = None) -> Path:
    """Save the adapter with :func:`lora_state_dict` to ``path`` (safetensors, atomically)."""
    save_safetensors_atomic(lora_state_dict(unet), path, metadata)
    return Path(path)


def load_lora(unet, source) -> list[str]:
    """Load a LoRA in :func:`lora_state_dict`'s keys (a path or a dict) onto ``unet`` as the DragKit adapter.

    Returns the adapted module paths. Rank and alpha come from the file
    (one rank and alpha for all modules).
    """
    from peft import LoraConfig

    if isinstance(source, (str, Path)):
        import safetensors.torch

        sd = safetensors.torch.load_file(str(source))
    else:
        sd = dict(source)
    by_key = {name.replace(".", "_"): name for name, _ in unet.named_modules() if _is_target(name)}
    entries = {}
    for key in sd:
        if key.startswith(KEY_PREFIX) and key.endswith(".lora_down.weight"):
            base = key[: -len(".lora_down.weight")]
            module = by_key.get(base[len(KEY_PREFIX):])
            if module is None:
                raise DragInputError(f"LoRA key {key} names no attention projection of this UNet")
            entries[module] = base
    if not entries:
        raise DragInputError("no 'lora_unet_*.lora_down.weight' keys in this LoRA file")
    ranks = {sd[base + ".lora_down.weight"].shape[0] for base in entries.values()}
    alphas = {float(sd[base + ".alpha"]) if base + ".alpha" in sd else None for base in entries.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise DragInputError(f"the LoRA mixes ranks {sorted(ranks)} / alphas; DragKit LoRAs use one of each")
    rank = ranks.pop()
    alpha = alphas.pop() or float(rank)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=sorted(entries))
    unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    layers = dict(lora_modules(unet))
    with torch.no_grad():
        for module, base in entries.items():
            layer = layers[module]
            a, b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
            layer.lora_A[ADAPTER_NAME].weight = torch.nn.Parameter(
                sd[base + ".lora_down.weight"].to(a.device, torch.float32), requires_grad=False
            )
            layer.lora_B[ADAPTER_NAME].weight = torch.nn.Parameter(
                sd[base + ".lora_up.weight"].to(b.device, torch.float32), requires_grad=False
            )
    return sorted(entries)
