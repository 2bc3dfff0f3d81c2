"""Which kind of diffusion network a ComfyUI MODEL holds, for the nodes that only work on a UNet.

Motion supervision on decoder features and the per-image LoRA address the
UNet's decoder and self-attention layers (SD1.x, SD2.x, SDXL). A DiT (FLUX,
SD3, Qwen-Image, ...) has neither, so those nodes refuse it up front with a
message that says what works on it instead. DDIM Invert and KV-Injected
Sample also run on FLUX (:func:`nodes.comfy_backend.is_flux`), so a UNet-only
step names that chain. Mirrors ComfyUI
0.3.64 to 0.33.0: ``ModelPatcher.model`` is the ``comfy.model_base`` model and
its ``diffusion_model`` the network; every UNet ComfyUI builds (SD1.x, SD2.x,
SDXL, SVD, ControlNet-wrapped) is a ``UNetModel`` of
``comfy.ldm.modules.diffusionmodules.openaimodel``.
"""

from __future__ import annotations

from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ..dragkit.errors import DragInputError

DIT_ALTERNATIVES = (
    "On FLUX.1 use DDIM Invert -> FastDrag Warp+BNNI -> KV-Injected Sample (DragFlow's inversion and key/value "
    "injection; workflow fastdrag_flux), Motion-Supervision Optimize in mode dragflow between them (DragFlow's region "
    "supervision; workflow dragflow_flux), or Drag Warp (pixels) with FLUX.1 Fill (workflow warp_inpaint_flux_fill). "
    "On other DiT models use Drag Warp (pixels) with their inpainting model, or FastDrag Warp+BNNI on the VAE Encode "
    "latent followed by a native KSampler (the warp sets a noise mask, denoise about 0.6)."
)


def is_unet(model) -> bool:
    """Whether a ComfyUI MODEL (ModelPatcher)'s diffusion network is a UNet."""
    return isinstance(getattr(getattr(model, "model", None), "diffusion_model", None), UNetModel)


def require_unet(model, what: str) -> None:
    """Raise a clear :class:`DragInputError` unless ``model``'s network is a UNet; ``what`` names the step that needs it."""
    if is_unet(model):
        return
    base = getattr(model, "model", None)
    network = getattr(base, "diffusion_model", None)
    family = type(base).__name__ if base is not None else type(model).__name__
    raise DragInputError(
        f"{what} needs a UNet diffusion model (SD1.x, SD2.x, SDXL), but this MODEL is {family} "
        f"(network {type(network).__name__}), which has no UNet self-attention layers. {DIT_ALTERNATIVES}"
    )
