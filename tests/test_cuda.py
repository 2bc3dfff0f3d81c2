"""Checks that need a CUDA device (``scripts/gpu_check.sh`` runs them; they skip elsewhere).

On the engine's diffusers backend over the micro UNet in fp16 on the GPU:
the attention cache offloaded to pinned CPU memory equals the one kept on the
device, bit for bit and right after inversion returns; motion supervision
and LoRA training run their fp16 branches; the fingerprint reads a tensor
above 2**24 elements on the device.
"""

import pytest
import torch

from dragkit.attention import select_layers
from dragkit.ddim import ddim_invert
from dragkit.diffusers_backend import DiffusersBackend, DiffusersConditioning
from dragkit.dragdiffusion import DragDiffusionSettings, drag_diffusion
from dragkit.lora import LoRATrainingConfig, weights_fingerprint
from dragkit.lora_diffusers import train_lora_diffusers
from dragkit.schedule import DDIMSchedule
from tools import tiny_models

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)")

DEVICE = torch.device("cuda")


@pytest.fixture(scope="module")
def fp16_backend():
    return DiffusersBackend(tiny_models.micro_unet(seed=0).eval().to(DEVICE, torch.float16))


def inputs(seed=4):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(1, 4, 8, 8, generator=gen).to(DEVICE)
    cond = DiffusersConditioning(torch.randn(1, 7, 32, generator=gen).to(DEVICE, torch.float16))
    return z, cond


def test_offloaded_cache_equals_the_device_cache_as_soon_as_inversion_returns(fp16_backend):
    z, cond = inputs()
    schedule = DDIMSchedule(fp16_backend.alphas_cumprod(), 50, 0.7)
    layers = select_layers(fp16_backend.self_attention_layers(), "all")
    on_device = ddim_invert(fp16_backend, z, cond, schedule, layers, "compute_device")
    offloaded = ddim_invert(fp16_backend, z, cond, schedule, layers, "offload")
    assert on_device.storage_device.type == "cuda" and offloaded.storage_device.type == "cpu"
    for t, step in offloaded.kv.items():
        for index, (k, v) in step.items():
            assert k.is_pinned() and v.is_pinned()
            assert torch.equal(k, on_device.kv[t][index][0].cpu()) and torch.equal(v, on_device.kv[t][index][1].cpu())


def test_motion_supervision_in_fp16_on_the_gpu(fp16_backend):
    z, cond = inputs()
    schedule = DDIMSchedule(fp16_backend.alphas_cumprod(), 50, 0.7)
    keep = torch.zeros(8, 8, device=DEVICE)
    keep[:, :2] = 1.0
    result = drag_diffusion(
        fp16_backend, z, cond, schedule, schedule.start_index, torch.tensor([[10.0, 12.0]]),
        torch.tensor([[20.0, 12.0]]), keep, DragDiffusionSettings(iterations=5),
    )
    assert result.latent.dtype == torch.float32 and torch.isfinite(result.latent).all()
    assert not torch.equal(result.latent.cpu(), z.cpu())


def test_lora_training_in_fp16_on_the_gpu():
    unet = tiny_models.micro_unet(seed=0).eval().to(DEVICE, torch.float16)
    z0, cond = inputs(seed=1)
    result = train_lora_diffusers(unet, z0, cond.positive, LoRATrainingConfig(steps=5, batch=2, rank=2, lr=1e-2))
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_fingerprint_of_a_large_tensor_on_the_gpu():
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.zeros(29_491_200, dtype=torch.float16, device=DEVICE), requires_grad=False)
    first = weights_fingerprint(module)
    torch.cuda.synchronize()
    module.weight.data[-1] = 1.0
    assert weights_fingerprint(module) != first
