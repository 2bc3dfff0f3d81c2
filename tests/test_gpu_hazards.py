"""Hazards that only showed on CUDA, reproduced on the CPU.

- Fingerprint sample indices above 2**24 elements (a float32 linspace rounds the
  last index out of bounds: a device-side assert on CUDA).
- The fp16 branches: the LoRA GradScaler and the motion-supervision loss
  scaling run here in float16 (and bfloat16, which needs no scaling) on the
  CPU, through the same code as on a GPU.
"""

import pytest
import torch

from dragkit.attention import AttentionControl
from dragkit.diffusers_backend import DiffusersBackend, DiffusersConditioning
from dragkit.dragdiffusion import DragDiffusionSettings, drag_diffusion
from dragkit.errors import DragInputError
from dragkit.lora import (
    LoRATrainingConfig,
    grad_scaler_for,
    pixel_digest,
    sample_indices,
    train_lora,
    weights_fingerprint,
)
from dragkit.lora_diffusers import train_lora_diffusers
from dragkit.optimisation import LossScale
from dragkit.schedule import DDIMSchedule
from tools import tiny_models

SDXL_CONV_ELEMENTS = 29_491_200
"""Elements of one SDXL conv weight: above 2**24, where float32 stops counting every integer."""


def test_float32_linspace_indices_overflow_where_integer_ones_do_not():
    count = 64
    float_last = int(torch.linspace(0, SDXL_CONV_ELEMENTS - 1, count).long()[-1])
    assert float_last == SDXL_CONV_ELEMENTS, "the hazard this guards against: float32 rounds numel-1 up to numel"
    idx = sample_indices(SDXL_CONV_ELEMENTS, count)
    assert idx.dtype == torch.int64 and idx[0] == 0 and idx[-1] == SDXL_CONV_ELEMENTS - 1
    assert bool((idx[1:] > idx[:-1]).all())
    assert sample_indices(5, 64).tolist() == [0, 1, 2, 3, 4] and sample_indices(1, 64).tolist() == [0]


def test_weights_fingerprint_reads_a_tensor_above_2_24_elements():
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.zeros(SDXL_CONV_ELEMENTS, dtype=torch.float16), requires_grad=False)
    first = weights_fingerprint(module)
    module.weight.data[-1] = 1.0
    assert weights_fingerprint(module) != first, "the last element is sampled"
    module.weight.data[-1] = 0.0
    assert weights_fingerprint(module) == first


def test_grad_scaler_only_for_float16_on_any_device():
    scaler = grad_scaler_for(torch.float16, torch.device("cpu"))
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    assert grad_scaler_for(torch.bfloat16, torch.device("cpu")) is None
    assert grad_scaler_for(torch.float32, torch.device("cpu")) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lora_training_runs_in_half_precision_on_cpu(dtype):
    unet = tiny_models.micro_unet(seed=0).eval().to(dtype)
    gen = torch.Generator().manual_seed(1)
    z0 = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 7, 32, generator=gen).to(dtype)
    scalers = []
    original = torch.amp.GradScaler

    class SpyScaler(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            scalers.append(self)

    torch.amp.GradScaler = SpyScaler
    try:
        result = train_lora_diffusers(unet, z0, context, LoRATrainingConfig(steps=3, batch=2, rank=2, lr=1e-2))
    finally:
        torch.amp.GradScaler = original
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert len(scalers) == (1 if dtype == torch.float16 else 0)
    if scalers:
        assert scalers[0].get_scale() > 1.0, "fp16 trains with a real loss scale"
    ups = [p for n, p in unet.named_parameters() if "lora_B" in n]
    assert ups and any(bool(p.detach().abs().sum() > 0) for p in ups), "the LoRA's up factors left zero: no update"


def test_grad_scaler_skips_an_overflowing_step_and_lowers_the_scale():
    param = torch.nn.Parameter(torch.ones(3))
    scaler = grad_scaler_for(torch.float16, torch.device("cpu"))

    def predict(z_t, t):
        return (param.sum() * float("inf")).expand(z_t.shape)

    start = scaler.get_scale()
    config = LoRATrainingConfig(steps=1, batch=1, rank=1)
    with pytest.raises(DragInputError, match="loss became"):
        train_lora(predict, [param], torch.zeros(1, 1, 2, 2), torch.linspace(0.99, 0.01, 10), config, grad_scaler=scaler)
    assert scaler.get_scale() < start and torch.equal(param.detach(), torch.ones(3)), "the inf step was skipped"


def test_loss_scale_halves_and_skips_on_overflow():
    latent = torch.zeros(2, requires_grad=True)
    optimiser = torch.optim.Adam([latent], lr=0.1)
    scale = LossScale(enabled=True)
    start = scale.scale
    scale.step((latent * float("inf")).sum(), latent, optimiser)
    assert scale.scale == start / 2 and torch.equal(latent.detach(), torch.zeros(2))
    scale.step(latent.sum(), latent, optimiser)
    assert not torch.equal(latent.detach(), torch.zeros(2)), "a finite step updates"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_motion_supervision_runs_in_half_precision_on_cpu(dtype):
    backend = DiffusersBackend(tiny_models.micro_unet(seed=0).eval().to(dtype))
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(1, 4, 8, 8, generator=gen)
    cond = DiffusersConditioning(torch.randn(1, 7, 32, generator=gen).to(dtype))
    schedule = DDIMSchedule(backend.alphas_cumprod(), 50, 0.7)
    keep = torch.zeros(8, 8)
    keep[:, :2] = 1.0
    result = drag_diffusion(
        backend, z, cond, schedule, schedule.start_index, torch.tensor([[10.0, 12.0]]), torch.tensor([[20.0, 12.0]]),
        keep, DragDiffusionSettings(iterations=3),
    )
    assert result.latent.dtype == torch.float32 and torch.isfinite(result.latent).all()
    assert not torch.equal(result.latent, z), "the fp32 master latent moved"
    features = {}

    def loop(predict, z_start):
        features["dtype"] = predict(z_start, schedule.t_star, False)[1].dtype
        return z_start

    backend.run_features(loop, z, cond, AttentionControl(), [schedule.t_star])
    assert features["dtype"] == dtype, "the features really were computed in half precision"


def test_lora_cache_key_image_part_ignores_float_noise_below_a_pixel_level():
    image = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    image = (image * 255).round() / 255
    noisy = image + (torch.rand(image.shape, generator=torch.Generator().manual_seed(1)) - 0.5) * 1e-4
    assert not torch.equal(noisy, image)
    assert pixel_digest(noisy) == pixel_digest(image), "GPU float jitter upstream must not miss the cache"
    changed = image.clone()
    changed[0, 3, 4, 1] = (changed[0, 3, 4, 1] * 255 + 1).clamp(max=255) / 255 if changed[0, 3, 4, 1] < 1 else 0.0
    assert pixel_digest(changed) != pixel_digest(image), "a changed pixel is a different image"
