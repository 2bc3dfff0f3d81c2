"""Drag Warp (pixels), FastDrag Warp+BNNI on any latent, and the UNet-only refusals, in a real ComfyUI (in-process)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.host

NODE = "DragKitPixelWarp"


def _points(host, width, height, *pairs):
    text = "[" + ", ".join(f"[{x}, {y}]" for pair in pairs for x, y in pair) + "]"
    return host.pack.dragkit.points.parse_drag_points('{"points": ' + text + "}", width, height)


def _texture(batch=1, height=48, width=64, dtype=torch.float32):
    return torch.rand(batch, height, width, 3, generator=torch.Generator().manual_seed(11)).to(dtype)


def _box(height, width, top, left, bottom, right):
    mask = torch.zeros(1, height, width)
    mask[:, top:bottom, left:right] = 1
    return mask


def warp(host, image, points, mask=None, band=5, neighbours="exact"):
    extra = {} if mask is None else {"mask": mask}
    return host.run_node(NODE, image=image, points=points, band=band, neighbours=neighbours, **extra)


def test_the_node_is_registered_with_tooltips(comfy_inproc):
    pack = comfy_inproc.pack
    assert pack.NODE_DISPLAY_NAME_MAPPINGS[NODE] == "Drag Warp (pixels) (DragKit)"
    cls = comfy_inproc.node_class(NODE)
    inputs = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, (_, options) in inputs[section].items():
            assert options.get("tooltip", "").strip(), name
    assert cls.RETURN_TYPES == ("IMAGE", "MASK") and len(cls.OUTPUT_TOOLTIPS) == 2
    assert set(inputs["required"]) == {"image", "points", "band", "neighbours"} and set(inputs["optional"]) == {"mask"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_patch_moves_and_the_uncovered_area_is_masked(comfy_inproc, dtype):
    image = _texture(batch=2, dtype=dtype)
    points = _points(comfy_inproc, 64, 48, ((25, 20), (31, 24)))
    warped, inpaint = warp(comfy_inproc, image, points, _box(48, 64, 15, 20, 30, 36))
    assert warped.dtype == dtype and warped.shape == image.shape
    assert torch.equal(warped[:, 19:34, 26:42], image[:, 15:30, 20:36])
    assert inpaint.shape == (1, 48, 64) and inpaint.dtype == torch.float32
    assert bool((inpaint[0, 15:19, 20:36] == 1).all()) and bool((inpaint[0, 15:30, 20:26] == 1).all())
    assert float(inpaint[0, 40:, :].sum()) == 0 and torch.equal(warped[:, 40:], image[:, 40:])


def test_no_mask_moves_the_whole_image_and_says_so(comfy_inproc, caplog):
    image = _texture()
    points = _points(comfy_inproc, 64, 48, ((30, 30), (33, 30)))
    with caplog.at_level(logging.INFO, logger="DragKit"):
        warped, inpaint = warp(comfy_inproc, image, points, torch.zeros(1, 48, 64), band=0)
    assert "whole image is one region" in caplog.text
    assert torch.equal(warped[:, :, 3:], image[:, :, :61])
    assert torch.equal(inpaint[0] > 0, _box(48, 64, 0, 0, 48, 3)[0] > 0)


def test_stray_handles_and_still_regions_are_logged(comfy_inproc, caplog):
    image = _texture()
    mask = _box(48, 64, 5, 5, 15, 15) + _box(48, 64, 30, 40, 40, 50)
    points = _points(comfy_inproc, 64, 48, ((8, 8), (10, 9)), ((60, 2), (58, 2)))
    with caplog.at_level(logging.INFO, logger="DragKit"):
        warped, _ = warp(comfy_inproc, image, points, mask)
    assert "pair(s) 2 have their handle outside every masked region" in caplog.text
    assert "1 masked region(s) have no handle" in caplog.text
    assert torch.equal(warped[:, 30:40, 40:50], image[:, 30:40, 40:50])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"points": ("other size",)}, r"placed on a 32x32 image but the image is 64x48"),
        ({"mask": torch.ones(1, 48, 60)}, r"mask is 60x48 but the image is 64x48"),
        ({"mask": torch.ones(2, 48, 64)}, r"batch of 2"),
        ({"mask": _box(48, 64, 40, 50, 45, 60)}, r"no handle lies inside the mask"),
        ({"neighbours": "fast"}, r"unknown neighbours option"),
        ({"image": torch.full((1, 48, 64, 3), float("nan"))}, r"non-finite"),
        ({"points": "not points"}, r"points must come from a DragKit points node"),
    ],
)
def test_errors_name_the_node(comfy_inproc, change, message):
    inputs = {
        "image": _texture(),
        "points": _points(comfy_inproc, 64, 48, ((10, 10), (14, 10))),
        "mask": _box(48, 64, 5, 5, 20, 20),
        "band": 5,
        "neighbours": "exact",
    }
    if change.get("points") == ("other size",):
        change = {"points": _points(comfy_inproc, 32, 32, ((10, 10), (14, 10)))}
    inputs.update(change)
    with pytest.raises(ValueError, match=r"^\[Drag Warp \(pixels\)\] .*" + message):
        comfy_inproc.run_node(NODE, **inputs)


@pytest.mark.parametrize("height, width", [(1, 1), (7, 12), (12, 7)])
def test_an_image_smaller_than_one_latent_cell_is_refused(comfy_inproc, height, width):
    points = _points(comfy_inproc, width, height, ((0, 0), (0, 0)))
    with pytest.raises(ValueError, match=rf"^\[Drag Warp \(pixels\)\] the image is {width}x{height} pixels; it must be at least 8x8"):
        warp(comfy_inproc, _texture(height=height, width=width), points)


def test_an_image_of_one_latent_cell_is_warped(comfy_inproc):
    image = _texture(height=8, width=8)
    warped, inpaint = warp(comfy_inproc, image, _points(comfy_inproc, 8, 8, ((2, 2), (4, 2))), band=0)
    assert torch.equal(warped[0, :, 2:], image[0, :, :6]) and torch.equal(inpaint[0, :, :2], torch.ones(8, 2))


def test_the_outputs_feed_native_inpaint_conditioning(comfy_inproc, tiny_comfy_models):
    image = _texture(height=64, width=64)
    points = _points(comfy_inproc, 64, 64, ((20, 20), (28, 24)))
    warped, inpaint = warp(comfy_inproc, image, points, _box(64, 64, 10, 10, 30, 30))
    clip = tiny_comfy_models.clip
    (positive,) = comfy_inproc.run_node("CLIPTextEncode", clip=clip, text="a photo")
    positive, negative, latent = comfy_inproc.run_node(
        "InpaintModelConditioning", positive=positive, negative=positive, pixels=warped, vae=tiny_comfy_models.vae,
        mask=inpaint, noise_mask=True,
    )
    assert latent["samples"].shape == (1, 4, 8, 8) and "noise_mask" in latent
    assert "concat_latent_image" in positive[0][1] and "concat_mask" in positive[0][1]


# ---------------------------------------------------------------- FastDrag Warp+BNNI on any latent


@pytest.mark.parametrize("shape", [(1, 16, 12, 16), (1, 16, 1, 12, 16), (1, 4, 12, 16)])
def test_fastdrag_warps_a_clean_latent_of_any_channel_count(comfy_inproc, shape):
    samples = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    points = _points(comfy_inproc, 128, 96, ((40, 40), (64, 48)))
    mask = _box(96, 128, 24, 24, 64, 64)
    (out,) = comfy_inproc.run_node("DragKitFastDragWarp", latent={"samples": samples}, points=points, mode="drag",
                                   fill="bnni", patch_cells=12, mask=mask)
    step_key = comfy_inproc.pack.nodes.latent_io.STEP_KEY
    assert out["samples"].shape == samples.shape and step_key not in out
    assert not torch.equal(out["samples"], samples)
    noise = out["noise_mask"]
    assert noise.shape == (1, 1, 12, 16) and bool((noise[0, 0, 3:8, 3:8] == 1).all()) and float(noise[0, 0, :, 12:].sum()) == 0
    kept = {"samples": samples, "noise_mask": torch.ones(1, 1, 12, 16), "batch_index": [0]}
    (again,) = comfy_inproc.run_node("DragKitFastDragWarp", latent=kept, points=points, mode="drag", fill="bnni",
                                     patch_cells=12, mask=mask)
    assert torch.equal(again["noise_mask"], kept["noise_mask"]) and again["batch_index"] == [0]


def test_unet_only_nodes_refuse_a_dit_model(comfy_inproc, tiny_comfy_models):
    family = comfy_inproc.pack.nodes.model_family
    assert family.is_unet(tiny_comfy_models.model)

    flux = type("Flux", (), {"diffusion_model": torch.nn.Linear(2, 2)})  # stands in for comfy.model_base.Flux
    dit = SimpleNamespace(model=flux())
    latent = {"samples": torch.randn(1, 16, 8, 8)}
    with pytest.raises(ValueError, match=r"^\[DDIM Invert\] DDIM inversion .* needs a UNet .* this MODEL is Flux .*Drag Warp \(pixels\)"):
        comfy_inproc.run_node("DragKitDDIMInvert", model=dit, latent=latent, positive=[], steps=10, strength=0.7,
                              cache_layers="decoder", cache_device="auto")
    with pytest.raises(ValueError, match=r"^\[KV-Injected Sample\] KV-injected sampling needs a UNet"):
        comfy_inproc.run_node("DragKitKVInjectedSample", model=dit, latent=latent, attn_cache=None, positive=[],
                              kv_source="inversion cache", inject_layers="decoder", inject_start=0.0, inject_end=1.0)
    with pytest.raises(ValueError, match=r"^\[Motion-Supervision Optimize\] Motion supervision .* needs a UNet"):
        comfy_inproc.run_node("DragKitMotionSupervisionOptimize", model=dit, latent=latent, attn_cache=None,
                              positive=[], points=None, mode="dragdiffusion", iterations=1, lr=0.01, lam=0.1, r1=1,
                              r2=3)
    with pytest.raises(ValueError, match=r"^\[LoRA Fine-tune\] The per-image LoRA .* needs a UNet"):
        comfy_inproc.run_node("DragKitLoRAFineTune", model=dit, vae=None, image=torch.zeros(1, 8, 8, 3), positive=[],
                              steps=1, rank=4, alpha=4.0, lr=5e-4, batch=1, seed=0, save_name="x.safetensors",
                              use_cache=False)
