"""Motion-Supervision Optimize's ``dragflow`` mode: DragFlow's region supervision on a FLUX MODEL (:mod:`dragkit.dragflow`)."""

from __future__ import annotations

from ..dragkit.attention import AttnCache
from ..dragkit.dragflow import DragFlowSettings, drag_flow, plan_dragflow
from ..dragkit.errors import DragInputError
from ..dragkit.flow import FlowCache
from ..dragkit.geometry import resolve_editable_mask
from .comfy_backend import ComfyConditioning, ComfyFlowBackend, is_flux, reference_shapes
from .common import INPUT_LATENT, log, node_errors, progress_reporter, require_finite, require_points
from .invert import check_conditioning, check_flux_latent
from .latent_io import require_step, with_step

NODE = "Motion-Supervision Optimize"
RELEASED = DragFlowSettings()
"""DragFlow's released defaults, read by the node's widgets."""


def require_flux_for_dragflow(model) -> None:
    """A clear error unless ``model`` is a FLUX flow model."""
    if not is_flux(model):
        base = getattr(model, "model", model)
        raise DragInputError(
            f"mode dragflow is DragFlow's region supervision for FLUX flow models (FLUX.1 [dev], Kontext), but this "
            f"MODEL is {type(base).__name__}; on SD1.x/SD2.x/SDXL choose mode dragdiffusion, gooddrag or refine_warp"
        )


def optimize_dragflow(model, latent, attn_cache, positive, points, lr, mask, transport_steps, intensify_steps,
                      gradient_checkpointing):
    """The node's ``dragflow`` mode: returns ``(LATENT at t*, points unchanged)``."""
    with node_errors(NODE):
        require_flux_for_dragflow(model)
        require_points(points)
        if isinstance(attn_cache, AttnCache):
            raise DragInputError(
                "this attention cache was recorded on a UNet (SD1.x/SD2.x/SDXL) model; invert the image with this FLUX "
                "MODEL in DDIM Invert"
            )
        if not isinstance(attn_cache, FlowCache):
            raise DragInputError("attn_cache is not an attention cache from DDIM Invert")
        step = require_step(latent)
        schedule = attn_cache.schedule
        if step.num_steps != schedule.num_steps or step.step_index != schedule.skip:
            raise DragInputError(
                f"dragflow supervises the latent at t* (step {schedule.skip} of {schedule.num_steps}), where DDIM Invert "
                f"stopped, but this latent is at step {step.step_index} of {step.num_steps}; connect DDIM Invert's z_t "
                "(or FastDrag Warp's output of it) and the same DDIM Invert's attn_cache"
            )
        check_conditioning(positive, model)
        attn_cache.check_references(reference_shapes(positive))
        samples = latent["samples"]
        check_flux_latent(model, samples, "the latent")
        h, w = samples.shape[-2:]
        if h % 2 or w % 2:
            raise DragInputError(
                f"the latent is {w}x{h}; FLUX works on 2x2 latent patches, so use an image whose sides are multiples of 16"
            )
        editable, defaulted = resolve_editable_mask(mask, points.height, points.width)
        if defaulted:
            raise DragInputError(
                "dragflow moves masked regions: paint a mask over each region to move (each holding its handle) in "
                "the Drag Points Editor"
            )
        plan = plan_dragflow(editable, points.handles_tensor(), points.targets_tensor(), (h, w))
        settings = DragFlowSettings(
            transport_steps=transport_steps, intensify_steps=intensify_steps,
            lr=RELEASED.lr if lr == -1 else lr, gradient_checkpointing=gradient_checkpointing,
        )
        backend = ComfyFlowBackend(model)
        x = require_finite(backend.latent_in(samples), INPUT_LATENT)
        report = progress_reporter(settings.iterations)
        result = drag_flow(backend, x, ComfyConditioning(positive), attn_cache, plan, settings, lambda done, loss: report(done))
        require_finite(result.latent, "the output of dragflow supervision")
    log.info(
        "DragKit Motion-Supervision Optimize (dragflow): %d regions, %d + %d iterations at t=%.4f, lr %g, loss %.4g -> %.4g",
        len(plan.operations), settings.transport_steps, settings.intensify_steps, schedule.t_star, settings.lr,
        result.losses[0], result.losses[-1],
    )
    out = backend.latent_out(result.latent)
    return (with_step(out, step.num_steps, step.step_index, step.timestep, step.sigma), points)
