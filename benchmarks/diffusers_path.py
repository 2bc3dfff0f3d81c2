"""The benchmark's diffusers path: the engine's loops on a diffusers UNet and VAE (no ComfyUI).

Used when no ComfyUI host is available (``COMFYUI_PATH`` unset) or with
``--backend diffusers``. The stages call the same engine functions the nodes
call (:mod:`dragkit.ddim`, :mod:`dragkit.fastdrag`, :mod:`dragkit.dragdiffusion`,
:mod:`dragkit.gooddrag`, :mod:`dragkit.lora_diffusers`) through
:class:`~dragkit.diffusers_backend.DiffusersBackend`, with the geometry the
nodes use (supervision grid, latent masks, decode paste).

Models: a real-size SD1.5 ``UNet2DConditionModel`` (860 M parameters) and SD
VAE with random N(0, 0.02) weights (so compute and memory are the real
ones; nothing is downloaded), or with ``--tiny`` the micro test models of
:mod:`tools.tiny_models` (64×64 images in milliseconds per pass).
"""

from __future__ import annotations

import torch

from dragkit.attention import select_layers
from dragkit.compositing import draw_points, paste_edit
from dragkit.ddim import ddim_invert, kv_sample
from dragkit.diffusers_backend import DiffusersBackend, DiffusersConditioning
from dragkit.dragdiffusion import DragDiffusionSettings, drag_diffusion
from dragkit.fastdrag import fastdrag_edit
from dragkit.geometry import LatentGeometry
from dragkit.gooddrag import GoodDragSettings, good_drag
from dragkit.lora import LoRATrainingConfig
from dragkit.lora_diffusers import remove_lora, train_lora_diffusers
from dragkit.schedule import DDIMSchedule

from tools.sd15_random import materialise_random

from .inputs import edit_inputs
from .measure import PassCounter, Stager, attn_cache_summary
from .workload import FEATHER, Workload

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)
"""diffusers config of the SD1.5 UNet."""


def sdxl_unet_config(channels: tuple[int, int, int] = (320, 640, 1280)) -> dict:
    """diffusers config of the SDXL UNet (``channels``: its three levels' widths; the tiny SDXL test checkpoint keeps
    320 throughout). Used for its FLOPs only: SDXL runs on the ComfyUI path."""
    return dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
        attention_head_dim=tuple(c // 64 for c in channels), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    )

SD_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=4, sample_size=512, scaling_factor=0.18215,
)
"""diffusers config of the SD1.x VAE."""


def _random_(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """``module`` (built on meta) on ``device`` with :func:`~tools.sd15_random.fill_random_` weights in ``dtype``, frozen."""
    return materialise_random(module, device, seed).to(dtype).eval().requires_grad_(False)


def sd15_models(device: torch.device, dtype: torch.dtype):
    """Real-size SD1.5 UNet and SD VAE with random weights, in ``dtype`` on ``device``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD_VAE)
    if any(True for _ in unet.buffers()) or any(True for _ in vae.buffers()):
        raise RuntimeError("the SD1.5 diffusers models grew buffers; build them without the meta device")
    return _random_(unet, device, dtype, 0), _random_(vae, device, dtype, 1)


def tiny_models(device: torch.device, dtype: torch.dtype):
    """The micro seeded test UNet and VAE of :mod:`tools.tiny_models` (float32; ``dtype`` must be float32)."""
    from tools.tiny_models import micro_unet, micro_vae

    if dtype != torch.float32:
        raise ValueError("the tiny benchmark models run in float32")
    return micro_unet(0).to(device), micro_vae(0).to(device)


class DiffusersPath:
    """Times the methods' stages on a diffusers UNet and VAE."""

    def __init__(self, tiny: bool, device: torch.device, dtype: torch.dtype) -> None:
        from tools.tiny_models import micro_unet_config

        self.device, self.dtype = device, dtype
        self.unet, self.vae = (tiny_models if tiny else sd15_models)(device, dtype)
        self.unet_config = micro_unet_config() if tiny else dict(SD15_UNET)
        self.model_name = "micro seeded test UNet and VAE" if tiny else "SD1.5 UNet + SD VAE architecture, random weights"
        self.backend = DiffusersBackend(self.unet)
        self.counter = PassCounter(self.unet)
        self.scale = float(self.vae.config.scaling_factor)

    def close(self) -> None:
        self.counter.close()

    # -- pieces the stages share ------------------------------------------------------------

    def _encode(self, image: torch.Tensor) -> torch.Tensor:
        """VAE posterior mean × the latent scale of an ``(H, W, 3)`` [0, 1] image: ``(1, 4, H/8, W/8)`` float32."""
        x = (image.permute(2, 0, 1)[None] * 2 - 1).to(self.device, self.dtype)
        return self.vae.encode(x).latent_dist.mean.float() * self.scale

    def _decode(self, z: torch.Tensor, inputs) -> torch.Tensor:
        """VAE decode + the decode node's paste into the source and its arrow preview; the pasted image."""
        decoded = self.vae.decode((z / self.scale).to(self.dtype)).sample[0].float()
        image = ((decoded.permute(1, 2, 0) + 1) / 2).clamp(0, 1)
        pasted = paste_edit(inputs.image.to(image.device), image, inputs.mask.to(image.device), FEATHER)
        draw_points(pasted.cpu(), inputs.points.handles_tensor(), inputs.points.targets_tensor())
        return pasted

    def invert(self, z0, cond, steps: int, strength: float, layers: str):
        """DDIM inversion of ``z0`` recording the keys/values of ``layers`` (a layer selection): the cache."""
        schedule = DDIMSchedule(self.backend.alphas_cumprod(), steps, strength)
        recorded = select_layers(self.backend.self_attention_layers(), layers)
        return ddim_invert(self.backend, z0, cond, schedule, recorded, "auto")

    # -- the stages --------------------------------------------------------------------------

    def run(self, side: int, work: Workload, methods: tuple[str, ...], stager: Stager) -> dict:
        """Every stage of ``methods`` at ``side``×``side`` into ``stager``; returns the attention-cache size."""
        inputs = edit_inputs(side, int(self.unet.config.cross_attention_dim))
        cond = DiffusersConditioning(inputs.context.to(self.device))
        geometry = LatentGeometry(side, side)
        handles, targets = inputs.points.handles_tensor(), inputs.points.targets_tensor()
        layers = self.backend.self_attention_layers()
        decoder, masactrl = select_layers(layers, "decoder"), select_layers(layers, "masactrl")

        z = torch.zeros((1, self.unet.config.in_channels, side // 8, side // 8), device=self.device, dtype=self.dtype)
        t = torch.tensor([500], device=self.device)
        context = inputs.context.to(self.device, self.dtype)
        stager.fast("unet_forward", lambda: self.unet(z, t, encoder_hidden_states=context).sample)
        z0 = stager.fast("vae_encode", lambda: self._encode(inputs.image))

        if "fastdrag" in methods:
            latent_handles, latent_targets = geometry.points_to_latent(handles), geometry.points_to_latent(targets)
            latent_mask = geometry.mask_to_latent_any(inputs.mask)

            def fd_invert(latent):
                return self.invert(latent, cond, work.fastdrag_steps, work.fastdrag_strength, "decoder")

            def fd_warp(kv):
                return fastdrag_edit(kv.z_star, latent_handles, latent_targets, latent_mask, "drag", "bnni")

            def fd_sample(kv, warped):
                return kv_sample(self.backend, warped, cond, kv, kv.schedule.start_index, decoder)

            cache = stager.fast("fastdrag_invert", lambda: fd_invert(z0))
            warped = stager.fast("fastdrag_warp", lambda: fd_warp(cache))
            edited = stager.fast("fastdrag_sample", lambda: fd_sample(cache, warped), twin=True)
            stager.fast("vae_decode", lambda: self._decode(edited, inputs))
            stager.fast("fastdrag_re_edit", lambda: self._decode(fd_sample(cache, fd_warp(cache)), inputs), twin=True)

            def first_edit():
                kv = fd_invert(self._encode(inputs.image))
                return self._decode(fd_sample(kv, fd_warp(kv)), inputs)

            stager.fast("fastdrag_first_edit", first_edit, twin=True)

        if "lora" in methods:
            def lora(steps: int):
                config = LoRATrainingConfig(steps=steps, rank=work.lora_rank, alpha=float(work.lora_rank), batch=work.lora_batch)
                try:
                    return train_lora_diffusers(self.unet, z0.clone(), inputs.context, config)
                finally:
                    remove_lora(self.unet)

            stager.slow("lora", lambda: lora(work.lora_steps), warm=lambda: lora(1), grad=True, steps=work.lora_steps)

        attn_cache = {}
        if "dragdiffusion" in methods:
            kv = stager.slow("dragdiffusion_invert", lambda: self.invert(
                z0, cond, work.dragdiffusion_steps, work.dragdiffusion_strength, "decoder"))
            attn_cache = attn_cache_summary(kv)
        motion = _Motion(self, work, cond, geometry.points_to_supervision(handles), geometry.points_to_supervision(targets),
                         (~geometry.mask_to_latent(inputs.mask)).float(), masactrl)
        for method in ("dragdiffusion", "gooddrag"):
            if method not in methods:
                continue
            plain = motion.invert(method, z0)
            optimised = stager.slow(f"{method}_optimize", lambda: motion.optimise(method, plain),
                                    warm=lambda: motion.optimise(method, plain, short=True), grad=True,
                                    twin=method == "dragdiffusion")
            stager.slow(f"{method}_sample", lambda: motion.sample(plain, optimised))
            stager.slow(f"{method}_edit", lambda: self._decode(motion.edit(method, self._encode(inputs.image)), inputs), grad=True,
                        twin=True)
        return attn_cache


class _Motion:
    """DragDiffusion / GoodDrag pieces on the diffusers path (no LoRA; reference-branch sampling)."""

    def __init__(self, path: DiffusersPath, work: Workload, cond, handles, targets, keep, masactrl) -> None:
        self.path, self.work, self.cond = path, work, cond
        self.handles, self.targets, self.keep, self.masactrl = handles, targets, keep, masactrl

    def invert(self, method: str, z0: torch.Tensor):
        steps, strength = getattr(self.work, f"{method}_steps"), getattr(self.work, f"{method}_strength")
        return self.path.invert(z0, self.cond, steps, strength, "none")

    def optimise(self, method: str, kv, short: bool = False) -> tuple[torch.Tensor, int]:
        """The optimised latent and the step index it is at (``short``: a 2-iteration / 1-operation warm-up)."""
        schedule, work, backend = kv.schedule, self.work, self.path.backend
        args = (kv.z_star, self.cond, schedule, schedule.start_index, self.handles, self.targets, self.keep)
        if method == "dragdiffusion":
            settings = DragDiffusionSettings(iterations=work.dragdiffusion_iterations_for(short))
            return drag_diffusion(backend, *args, settings).latent, schedule.start_index
        counts = work.gooddrag_counts(short)
        settings = GoodDragSettings(drag_steps=counts[0], drags_per_step=counts[1], grad_steps=counts[2], max_unchanged=0)
        result = good_drag(backend, *args, settings)
        return result.latent, result.step_index

    def sample(self, kv, optimised: tuple[torch.Tensor, int]) -> torch.Tensor:
        latent, index = optimised
        return kv_sample(self.path.backend, latent, self.cond, kv, index, self.masactrl, kv_source="reference branch")

    def edit(self, method: str, z0: torch.Tensor) -> torch.Tensor:
        """Invert, optimise and sample: the clean edited latent."""
        kv = self.invert(method, z0)
        return self.sample(kv, self.optimise(method, kv))
