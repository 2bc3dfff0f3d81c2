"""The benchmark's ComfyUI path: the pack's own nodes in an in-process ComfyUI (``COMFYUI_PATH``).

Each stage calls the nodes exactly as the executor does (under
``torch.inference_mode``): VAE Encode (ComfyUI's), DDIM Invert, FastDrag
Warp+BNNI, KV-Injected Sample, VAE Decode (DragKit), LoRA Fine-tune (no
cache, nothing saved) and Motion-Supervision Optimize.

Models (``--model``): a real-size SD1.5 or SDXL UNet and SD VAE with random
weights built through ComfyUI's loaders (nothing is downloaded), or with
``--tiny`` the tiny seeded test checkpoint of that family
(:func:`tools.tiny_models.tiny_checkpoint_path`,
:func:`tools.tiny_sdxl_sd2.tiny_sdxl_checkpoint_path`). SDXL's conditioning
carries a random pooled prompt and the image size, as its CLIPTextEncode
would.
"""

from __future__ import annotations

import torch

from .inputs import edit_inputs
from .measure import PassCounter, Stager, attn_cache_summary
from .workload import FEATHER, Workload


def sd15_models(dtype: torch.dtype):
    """A real-size SD1.5 MODEL and VAE with random weights (:mod:`tools.sd15_random`), through ComfyUI's loaders."""
    import comfy.sd

    from tools.sd15_random import comfy_sd15_modules

    unet, vae = comfy_sd15_modules(seed=0)
    model = comfy.sd.load_diffusion_model_state_dict(unet.state_dict(), model_options={"dtype": dtype})
    return model, comfy.sd.VAE(sd=vae.state_dict())


def sdxl_models(dtype: torch.dtype, device: torch.device):
    """A real-size SDXL MODEL and VAE with random weights (:mod:`tools.sdxl_random`, filled on ``device``),
    through ComfyUI's loaders."""
    import comfy.sd

    from tools.sd15_random import materialise_random
    from tools.sdxl_random import meta_modules

    modules = meta_modules(dtype)
    unet = materialise_random(modules["unet"], device, 0).state_dict()
    model = comfy.sd.load_diffusion_model_state_dict(unet, model_options={"dtype": dtype})
    del unet
    return model, comfy.sd.VAE(sd=materialise_random(modules["vae"], device, 1).state_dict())


def tiny_models(family: str):
    from dragrun.comfy_host import load_checkpoint_inproc
    from tools.tiny_models import tiny_checkpoint_path
    from tools.tiny_sdxl_sd2 import tiny_sdxl_checkpoint_path

    loaded = load_checkpoint_inproc(tiny_sdxl_checkpoint_path() if family == "sdxl" else tiny_checkpoint_path())
    return loaded.model, loaded.vae


FAMILIES = {
    "sd15": {"context_dim": 768, "name": "SD1.5"},
    "sdxl": {"context_dim": 2048, "pooled_dim": 1280, "name": "SDXL"},
}
"""The model families the ComfyUI path benchmarks (``--model``): prompt width, pooled prompt width (SDXL)."""


def conditioning(family: str, context: torch.Tensor, side: int) -> list:
    """A CONDITIONING as the family's CLIPTextEncode gives it: SDXL adds a random pooled prompt and the image size."""
    extra = {}
    if "pooled_dim" in FAMILIES[family]:
        pooled = torch.randn(1, FAMILIES[family]["pooled_dim"], generator=torch.Generator().manual_seed(3))
        extra = {"pooled_output": pooled, "width": side, "height": side}
    return [[context, extra]]


class ComfyPath:
    """Times the methods' stages through the pack's nodes in an in-process ComfyUI."""

    def __init__(self, tiny: bool, use_cuda: bool, family: str = "sd15") -> None:
        from dragrun.comfy_host import load_pack_inproc
        from tools.tiny_models import sd15_unet_config

        from .diffusers_path import SD15_UNET, sdxl_unet_config

        self.host = load_pack_inproc(cpu=not use_cuda)
        import comfy.model_management as mm

        self.device = mm.get_torch_device()
        self.family = family
        dtype = torch.float16 if use_cuda else torch.float32
        if tiny:
            self.model, self.vae = tiny_models(family)
        else:
            self.model, self.vae = sdxl_models(dtype, self.device) if family == "sdxl" else sd15_models(dtype)
        mm.load_models_gpu([self.model], force_full_load=True)
        self.dtype = self.model.model_dtype()
        if family == "sdxl":
            self.unet_config = sdxl_unet_config((320,) * 3 if tiny else (320, 640, 1280))
        else:
            self.unet_config = sd15_unet_config() if tiny else dict(SD15_UNET)
        name = FAMILIES[family]["name"]
        self.model_name = f"tiny seeded {name}-shaped checkpoint" if tiny else f"{name} architecture, random weights"
        self.counter = PassCounter(self.model.model.diffusion_model, self.host.pack.dragkit.capture.REPLAY_OBSERVERS,
                                   self.host.pack.nodes.comfy_capture.capturable)
        self.failures: dict[str, str] = {}
        """Stages of the last :meth:`run` that did not complete, and why (out of GPU memory)."""

    def close(self) -> None:
        self.counter.close()

    def run(self, side: int, work: Workload, methods: tuple[str, ...], stager: Stager) -> dict:
        """Every stage of ``methods`` at ``side``×``side`` into ``stager``; returns the attention-cache size.

        Everything runs under ``torch.inference_mode``, as ComfyUI's executor
        runs nodes; the LoRA and optimiser nodes enable autograd themselves.
        """
        self.host.pack.nodes.comfy_capture.reset()
        self.failures = {}
        with torch.inference_mode():
            return self._run(side, work, methods, stager)

    def capture_report(self) -> dict:
        """The captured passes of the last :meth:`run` (:func:`nodes.comfy_capture.report`)."""
        return self.host.pack.nodes.comfy_capture.report()

    def _run(self, side: int, work: Workload, methods: tuple[str, ...], stager: Stager) -> dict:
        nodes, classes, model, vae = self.host.nodes, self.host.pack.nodes, self.model, self.vae
        invert, warp = classes.invert.DDIMInvert(), classes.warp.FastDragWarp()
        sample, decode = classes.sample.KVInjectedSample(), classes.decode.DragVAEDecode()
        inputs = edit_inputs(side, FAMILIES[self.family]["context_dim"])
        points = self.host.pack.dragkit.points.parse_drag_points(inputs.points.to_json_dict(), side, side)
        image, mask = inputs.image[None], inputs.mask[None]
        positive = conditioning(self.family, inputs.context, side)
        adm = model.model.encode_adm(**positive[0][1])  # SDXL's pooled prompt + size embedding; None for SD1.5

        def unet_pass():
            latent = torch.zeros(1, 4, side // 8, side // 8, device=model.load_device)
            sigma = torch.tensor([1.0], device=model.load_device)
            return model.model.apply_model(latent, sigma, c_crossattn=inputs.context.to(model.load_device), y=adm)

        def decoded(latent):
            return decode.decode(vae, latent, FEATHER, image, mask, points)[0]

        stager.fast("unet_forward", unet_pass)
        latent = stager.fast("vae_encode", lambda: nodes.VAEEncode().encode(vae, image)[0])
        if "fastdrag" in methods:
            steps, strength = work.fastdrag_steps, work.fastdrag_strength

            def fd_warp(z_t):
                return warp.warp(z_t, points, "drag", "bnni", 12, mask)[0]

            def fd_sample(z_t, kv):
                return sample.sample(model, z_t, kv, positive, "inversion cache", "decoder", 0.0, 1.0)[0]

            z_t, cache = stager.fast("fastdrag_invert", lambda: invert.invert(model, latent, positive, steps, strength, "decoder", "auto"))
            warped = stager.fast("fastdrag_warp", lambda: fd_warp(z_t))
            edited = stager.fast("fastdrag_sample", lambda: fd_sample(warped, cache), twin=True)
            stager.fast("vae_decode", lambda: decoded(edited))
            stager.fast("native_vae_decode", lambda: nodes.VAEDecode().decode(vae, edited)[0])
            native_start = steps - round(strength * steps)
            stager.fast("native_ksampler_advanced", lambda: nodes.KSamplerAdvanced().sample(
                model, "disable", 0, steps, 1.0, "ddim", "ddim_uniform", positive, positive, warped, native_start, 10000,
                "disable")[0])
            stager.fast("fastdrag_re_edit", lambda: decoded(fd_sample(fd_warp(z_t), cache)), twin=True)

            def first_edit():
                zt, kv = invert.invert(model, nodes.VAEEncode().encode(vae, image)[0], positive, steps, strength, "decoder", "auto")
                return decoded(fd_sample(fd_warp(zt), kv))

            stager.fast("fastdrag_first_edit", first_edit, twin=True)
        if "lora" in methods:
            node = classes.lora.LoRAFineTune()

            def lora(steps: int):
                return node.finetune(model=model, vae=vae, image=image, positive=positive, steps=steps, rank=work.lora_rank,
                                     alpha=float(work.lora_rank), lr=5e-4, batch=work.lora_batch, seed=0, save_name="",
                                     use_cache=False)[0]

            try:
                stager.slow("lora", lambda: lora(work.lora_steps), warm=lambda: lora(1), steps=work.lora_steps, twin=True)
            except torch.cuda.OutOfMemoryError as error:
                self.failures["lora"] = f"out of GPU memory: {str(error).splitlines()[0]}"
                torch.cuda.empty_cache()
        attn_cache = {}
        if "dragdiffusion" in methods:
            kv = stager.slow("dragdiffusion_invert", lambda: invert.invert(
                model, latent, positive, work.dragdiffusion_steps, work.dragdiffusion_strength, "decoder", "auto")[1])
            attn_cache = attn_cache_summary(kv)
        optimise = classes.optimize.MotionSupervisionOptimize()
        for method in ("dragdiffusion", "gooddrag"):
            if method not in methods:
                continue
            steps, strength = getattr(work, f"{method}_steps"), getattr(work, f"{method}_strength")

            def run_optimise(zt, kv, short=False, method=method):
                if method == "dragdiffusion":
                    knobs = {"iterations": work.dragdiffusion_iterations_for(short)}
                else:
                    counts = work.gooddrag_counts(short)
                    knobs = {"iterations": 80, "drag_steps": counts[0], "drags_per_step": counts[1], "grad_steps": counts[2],
                             "max_unchanged": 0}
                iterations = knobs.pop("iterations")
                return optimise.optimize(model, zt, kv, positive, points, method, iterations, -1, -1, -1, -1, mask=mask, **knobs)[0]

            def reference_sample(zt, kv):
                return sample.sample(model, zt, kv, positive, "reference branch", "masactrl", 0.0, 1.0)[0]

            def inverted(lat, steps=steps, strength=strength):
                return invert.invert(model, lat, positive, steps, strength, "none", "auto")

            z_t, kv = inverted(latent)
            edited = stager.slow(f"{method}_optimize", lambda: run_optimise(z_t, kv),
                                 warm=lambda: run_optimise(z_t, kv, short=True), twin=method == "dragdiffusion")
            stager.slow(f"{method}_sample", lambda: reference_sample(edited, kv))

            def whole_edit(inverted=inverted, run_optimise=run_optimise):
                zt, cache = inverted(nodes.VAEEncode().encode(vae, image)[0])
                return decoded(reference_sample(run_optimise(zt, cache), cache))

            stager.slow(f"{method}_edit", whole_edit, twin=True)
        return attn_cache
