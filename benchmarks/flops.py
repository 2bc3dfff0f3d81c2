"""The compute floor: FLOPs of the UNet passes a stage made ÷ the device's peak.

FLOPs per pass are **counted**, not derived by hand:
``torch.utils.flop_counter.FlopCounterMode`` records one pass of a diffusers
``UNet2DConditionModel`` of the benchmarked architecture built on the
``meta`` device (no memory, no compute), batch 1, 77 context tokens (SDXL:
and its pooled prompt and size numbers), at each resolution. It counts matrix products, convolutions and attention (the
tensor-core work); normalisations and element-wise operations are left out,
so the floor is a lower bound. ``forward_backward`` is the forward plus the
backward to the latent with frozen weights (what a motion-supervision step
or a LoRA step costs; the LoRA's own weight gradients are negligible).

A stage's floor = Σ over its passes of rows × (forward, or forward_backward
when autograd was on) ÷ peak. A pass stopped after the feature block (point
tracking) counts as a full pass, which overstates those few passes. Peaks are the vendors' dense fp16/bf16 tensor-core figures;
other dtypes and devices not in the table have no peak unless
``--peak-tflops`` gives one.
"""

from __future__ import annotations

import torch

PEAK_TFLOPS = (
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.5),
    ("H100", 989.4),  # SXM5 / HBM3
    ("H200 NVL", 835.5),
    ("H200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("RTX 4090", 165.2),  # fp32 accumulation, as PyTorch uses
)
"""Dense fp16/bf16 tensor-core peak (TFLOP/s) by a substring of the CUDA device name; first match wins."""

HALF_DTYPES = (torch.float16, torch.bfloat16)
CONTEXT_TOKENS = 77


def device_peak(device_name: str, dtype: torch.dtype, override: float | None) -> tuple[float | None, str]:
    """``(peak TFLOP/s or None, where it came from)`` for this device and compute dtype."""
    if override is not None:
        return float(override), "--peak-tflops"
    if dtype not in HALF_DTYPES:
        return None, f"no {dtype} peak in the table (fp16/bf16 only); pass --peak-tflops"
    for key, peak in PEAK_TFLOPS:
        if key in device_name:
            return peak, f"table: {key} dense fp16/bf16"
    return None, f"{device_name!r} is not in the peak table; pass --peak-tflops"


def unet_flops(config: dict, resolutions: list[int]) -> dict[int, dict[str, int]]:
    """FLOPs of one UNet pass at batch 1 per image side: ``{side: {"forward", "forward_backward"}}``.

    ``config`` is the diffusers ``UNet2DConditionModel`` config of the
    benchmarked architecture (see the module docstring).
    """
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config).requires_grad_(False)
    channels, context_dim = unet.config.in_channels, unet.config.cross_attention_dim
    extra = {}
    if unet.config.addition_embed_type == "text_time":  # SDXL: the pooled prompt and six size numbers
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, pooled, device="meta"),
                                      "time_ids": torch.zeros(1, 6, device="meta")}
    out = {}
    for side in resolutions:
        latent = torch.zeros(1, channels, side // 8, side // 8, device="meta")
        context = torch.zeros(1, CONTEXT_TOKENS, context_dim, device="meta")
        timestep = torch.tensor([500], device="meta")
        with FlopCounterMode(display=False) as forward:
            unet(latent, timestep, encoder_hidden_states=context, **extra)
        latent.requires_grad_(True)
        with FlopCounterMode(display=False) as both:
            unet(latent, timestep, encoder_hidden_states=context, **extra).sample.sum().backward()
        out[side] = {"forward": int(forward.get_total_flops()), "forward_backward": int(both.get_total_flops())}
    return out


def floor(stage: dict, per_pass: dict[str, int], peak_tflops: float | None) -> dict:
    """``flops``, ``floor_ms`` and ``floor_ratio`` (median ÷ floor) of a stage with pass counts."""
    plain = stage["unet_rows"] - stage["unet_rows_with_grad"]
    flops = plain * per_pass["forward"] + stage["unet_rows_with_grad"] * per_pass["forward_backward"]
    if peak_tflops is None or flops == 0:
        return {"flops": flops, "floor_ms": None, "floor_ratio": None}
    floor_ms = flops / (peak_tflops * 1e12) * 1e3
    return {"flops": flops, "floor_ms": floor_ms, "floor_ratio": stage["median_ms"] / floor_ms}
