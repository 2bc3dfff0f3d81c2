"""Motion-Supervision Optimize (DragDiffusion mode) in a real ComfyUI, on the tiny checkpoint."""

import pytest
import torch

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def inverted(comfy_inproc, tiny_comfy_models):
    positive = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)), {}]]
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 3}
    z_t, cache = comfy_inproc.run_node("DragKitDDIMInvert", model=tiny_comfy_models.model, latent=latent, positive=positive,
                                      steps=10, strength=0.7, cache_layers="none", cache_device="auto")
    return positive, z_t, cache


def optimize(host, model, inverted, points, iterations=3, mask=None, mode="dragdiffusion", **gooddrag):
    node = host.pack.nodes.optimize.MotionSupervisionOptimize()
    positive, z_t, cache = inverted
    with torch.inference_mode():
        return node.optimize(model, z_t, cache, positive, points, mode, iterations, -1, -1, -1, -1, mask=mask, **gooddrag)


def test_optimise_runs_with_gradients_and_leaves_the_shared_model_alone(comfy_inproc, tiny_comfy_models, inverted):
    model = tiny_comfy_models.model
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    options = repr(model.model_options)
    points = comfy_inproc.pack.dragkit.points.parse_drag_points('{"points": [[16, 24], [48, 24]]}', 64, 64)
    mask = torch.zeros(1, 64, 64)
    mask[0, 8:40, 8:56] = 1
    out, tracked = optimize(comfy_inproc, model, inverted, points, iterations=3, mask=mask)
    step = comfy_inproc.pack.nodes.latent_io.read_step(out)
    assert step is not None and step.timestep == inverted[2].schedule.t_star
    assert torch.isfinite(out["samples"]).all() and not torch.equal(out["samples"], inverted[1]["samples"])
    assert tracked.targets == points.targets and tracked.num_pairs == 1
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert repr(model.model_options) == options


def test_optimise_errors_name_the_node(comfy_inproc, tiny_comfy_models, inverted):
    points = comfy_inproc.pack.dragkit.points.parse_drag_points('{"points": [[16, 24], [48, 24]]}', 96, 64)
    with pytest.raises(ValueError, match=r"^\[Motion-Supervision Optimize\] .*encodes to a 12x8 latent"):
        optimize(comfy_inproc, tiny_comfy_models.model, inverted, points)


def test_gooddrag_mode_states_the_step_it_reached(comfy_inproc, tiny_comfy_models, inverted):
    points = comfy_inproc.pack.dragkit.points.parse_drag_points('{"points": [[16, 24], [48, 24]]}', 64, 64)
    out, tracked = optimize(comfy_inproc, tiny_comfy_models.model, inverted, points, mode="gooddrag", drag_steps=2,
                            drags_per_step=2, grad_steps=1, beta=4.0, max_unchanged=0)
    schedule = inverted[2].schedule
    step = comfy_inproc.pack.nodes.latent_io.read_step(out)
    assert step.step_index == schedule.start_index + 2 and step.timestep == schedule.timesteps[schedule.start_index + 2]
    positive = inverted[0]
    (final,) = comfy_inproc.run_node("DragKitKVInjectedSample", model=tiny_comfy_models.model, latent=out,
                                     attn_cache=inverted[2], positive=positive, kv_source="reference branch",
                                     inject_layers="masactrl", inject_start=0.0, inject_end=1.0)
    assert torch.isfinite(final["samples"]).all() and tracked.num_pairs == 1


def test_refine_after_fastdrag_warp(comfy_inproc, tiny_comfy_models):
    positive = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)), {}]]
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 3}
    z_t, cache = comfy_inproc.run_node("DragKitDDIMInvert", model=tiny_comfy_models.model, latent=latent, positive=positive,
                                      steps=10, strength=0.7, cache_layers="decoder", cache_device="auto")
    points = comfy_inproc.pack.dragkit.points.parse_drag_points('{"points": [[16, 24], [40, 24]]}', 64, 64)
    (warped,) = comfy_inproc.run_node("DragKitFastDragWarp", latent=z_t, points=points, mode="drag", fill="bnni", patch_cells=12)
    out, tracked = optimize(comfy_inproc, tiny_comfy_models.model, (positive, warped, cache), points, iterations=2,
                            mode="refine_warp")
    assert torch.isfinite(out["samples"]).all() and not torch.equal(out["samples"], warped["samples"])
    assert tracked.handles == ((40.0, 24.0),)
