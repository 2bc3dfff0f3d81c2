"""Fidelity through a real ComfyUI (in-process, tiny SD1.5 checkpoint) against the diffusers path on the same weights.

- Reference-branch sampling of an **edited** latent (the unedited one gives
  the same result with or without mutual self-attention, so it proves
  nothing): the node agrees with the engine on diffusers, and mutual
  self-attention changes the result by far more than that.
- LoRA on ComfyUI (``ComfyLoRATrainer``) and LoRA on diffusers (peft), same
  tiny weights, same image latent, prompt and seed: the same loss trajectory.
- A latent changed by a core node that keeps its shape and sum (LatentFlip)
  is not trusted to be at its recorded step.
- The optimiser node's widget defaults are the Settings dataclasses' values.

Measured on CPU, float32, ComfyUI 0.3.64: see the constants below.
"""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch

from dragkit.attention import select_layers
from dragkit.ddim import ddim_invert, kv_sample
from dragkit.diffusers_backend import DiffusersBackend, DiffusersConditioning
from dragkit.dragdiffusion import DragDiffusionSettings
from dragkit.gooddrag import GoodDragSettings
from dragkit.lora import LoRATrainingConfig
from dragkit.lora_diffusers import train_lora_diffusers
from dragkit.schedule import DDIMSchedule, scaled_linear_alphas_cumprod

pytestmark = pytest.mark.host

LATENT_SCALE = 0.18215
BACKENDS_AGREE = 1e-3
"""Most |difference| between the node and the diffusers engine on the same weights (measured 8e-6)."""
MUTUAL_EFFECT = 0.1
"""Least max |difference| mutual self-attention makes on the edited latent (measured 1.03; 4e-6 on the unedited one)."""
LORA_LOSS_RTOL = 1e-4
"""Relative tolerance between the two LoRA loss trajectories (measured 1.6e-5 over 6 steps at lr 1e-2;
the same draws with another LoRA initialisation differ by 9%)."""


@pytest.fixture(scope="module")
def conditioning():
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(5))
    return context, [[context, {}]]


@pytest.fixture(scope="module")
def source_samples():
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6)) * 4


def edit(z: torch.Tensor) -> torch.Tensor:
    """A stand-in for an optimiser's edit: the right half of the latent shifted two cells left."""
    out = z.clone()
    out[..., 2:6] = z[..., 4:8]
    return out


def test_reference_branch_on_an_edited_latent_matches_diffusers_and_mutual_attention_acts(
    comfy_inproc, tiny_comfy_models, tiny_sd15_diffusers, source_samples, conditioning
):
    model = tiny_comfy_models.model
    latent_io = comfy_inproc.pack.nodes.latent_io
    z_t, cache = comfy_inproc.run_node("DragKitDDIMInvert", model=model, latent={"samples": source_samples},
                                       positive=conditioning[1], steps=20, strength=0.7, cache_layers="none",
                                       cache_device="auto")
    step = latent_io.read_step(z_t)
    edited = latent_io.with_step(edit(z_t["samples"]), step.num_steps, step.step_index, step.timestep, step.sigma)

    def node_sample(layers):
        return comfy_inproc.run_node("DragKitKVInjectedSample", model=model, latent=edited, attn_cache=cache,
                                     positive=conditioning[1], kv_source="reference branch", inject_layers=layers,
                                     inject_start=0.0, inject_end=1.0)[0]["samples"] * LATENT_SCALE

    diffusers = DiffusersBackend(tiny_sd15_diffusers.eval())
    schedule = DDIMSchedule(scaled_linear_alphas_cumprod(), 20, 0.7)
    cond = DiffusersConditioning(conditioning[0])
    d_cache = ddim_invert(diffusers, source_samples * LATENT_SCALE, cond, schedule, ())

    def engine_sample(layers):
        chosen = select_layers(diffusers.self_attention_layers(), layers)
        return kv_sample(diffusers, edit(d_cache.z_star), cond, d_cache, schedule.start_index, chosen,
                         kv_source="reference branch")

    sigma = schedule.sigma(schedule.t_star)
    assert (edited["samples"] * LATENT_SCALE / math.sqrt(1 + sigma**2) - edit(d_cache.z_star)).abs().max() < BACKENDS_AGREE
    mutual, plain = node_sample("masactrl"), node_sample("none")
    assert (mutual - engine_sample("masactrl")).abs().max() < BACKENDS_AGREE
    assert (plain - engine_sample("none")).abs().max() < BACKENDS_AGREE
    assert (mutual - plain).abs().max() > MUTUAL_EFFECT


def test_lora_on_comfyui_and_on_diffusers_follow_the_same_loss_trajectory(
    comfy_inproc, tiny_comfy_models, tiny_sd15_diffusers, conditioning
):
    comfy_lora = importlib.import_module(comfy_inproc.module_name + ".nodes.comfy_lora")
    config = LoRATrainingConfig(steps=6, rank=4, alpha=4.0, lr=1e-2, batch=2, seed=0)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    trainer = comfy_lora.ComfyLoRATrainer(tiny_comfy_models.model, conditioning[1], config)
    try:
        with torch.inference_mode():
            comfy_losses = trainer.train(latent).losses
    finally:
        trainer.close()
    unet = copy.deepcopy(tiny_sd15_diffusers).eval()
    diffusers_losses = train_lora_diffusers(unet, latent, conditioning[0], config).losses
    assert len(comfy_losses) == len(diffusers_losses) == config.steps
    assert comfy_losses == pytest.approx(diffusers_losses, rel=LORA_LOSS_RTOL)
    assert max(comfy_losses) - min(comfy_losses) > 10 * LORA_LOSS_RTOL * max(comfy_losses)


def test_a_latent_flipped_by_a_core_node_is_no_longer_at_its_step(comfy_inproc):
    latent_io = comfy_inproc.pack.nodes.latent_io
    samples = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(2))
    latent = latent_io.with_step(samples, 10, 3, 601, 1.0)
    (flipped,) = comfy_inproc.run_node("LatentFlip", samples=latent, flip_method="x-axis: vertically")
    assert latent_io.STEP_KEY in flipped and flipped["samples"].shape == samples.shape
    assert flipped["samples"].double().sum() == samples.double().sum()
    assert latent_io.read_step(flipped) is None
    assert latent_io.read_step({"samples": samples.clone(), latent_io.STEP_KEY: latent[latent_io.STEP_KEY]}) is not None


def test_optimize_node_defaults_come_from_the_settings(comfy_inproc):
    optimize = importlib.import_module(comfy_inproc.module_name + ".nodes.optimize")
    hybrid = importlib.import_module(comfy_inproc.module_name + ".dragkit.hybrid")
    required = optimize.MotionSupervisionOptimize.INPUT_TYPES()["required"]
    good = GoodDragSettings()
    assert required["iterations"][1]["default"] == DragDiffusionSettings().iterations
    for knob in ("drag_steps", "drags_per_step", "grad_steps", "beta", "max_unchanged"):
        assert required[knob][1]["default"] == getattr(good, knob)
    assert optimize._settings(optimize.GD, lr=-1, r2=7) == type(optimize.GD)(r2=7)
    assert optimize._settings(hybrid.REFINE_DEFAULTS, iterations=3).iterations == 3
