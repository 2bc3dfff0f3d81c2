"""DragFlow's region supervision (Motion-Supervision Optimize, mode dragflow) on the small FLUX: the engine against
the released equations, a known answer, the ComfyUI path against the host-free one, and hostile input.

The small FLUX (:func:`tools.tiny_flux.small_flux_patcher`: FLUX.1 [dev]'s layout, 2 double + 3 single blocks,
hidden 64) runs as ComfyUI's own ``Flux`` on the CPU. The released ``Dragger.dragger_step`` (framework/dragger.py,
dragger_utils.py, dashboard_utils.py) needs CUDA, diffusers' FLUX and optimum-quanto, so it is not run here: the
reference below re-states its equations line by line (the comments name the released lines). Its feature blocks
17 and 18 of FLUX.1's 19 are the last two double blocks, here 0 and 1. Runs on ComfyUI 0.3.64 and 0.33.0.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
import torch.nn.functional as F

from tools import tiny_flux

pytestmark = pytest.mark.host

STEPS, SKIP = 25, 6
HEIGHT, WIDTH = 64, 96  # source pixels; latent 8 x 12, supervision grid 32 x 48 (scale level 2)
HANDLE, TARGET = (28.0, 28.0), (52.0, 36.0)


@pytest.fixture(scope="module")
def flux(comfy_inproc):
    return tiny_flux.small_flux_patcher()


def _engine(comfy_inproc):
    name = comfy_inproc.pack.__name__
    return tuple(importlib.import_module(f"{name}.dragkit.{m}") for m in ("flow", "flow_module", "flow_hooks", "dragflow"))


@pytest.fixture(scope="module")
def case(comfy_inproc, flux):
    """Inputs, the inversion cache (every block recorded) and the plan of one square region dragged right and down."""
    Fl, M, H, D = _engine(comfy_inproc)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, 16, HEIGHT // 8, WIDTH // 8, generator=g)
    txt = torch.randn(1, 5, tiny_flux.SMALL_FLUX["context_in_dim"], generator=g)
    y = torch.randn(1, tiny_flux.SMALL_FLUX["vec_in_dim"], generator=g)
    backend = M.ModuleFlowBackend(flux.model.diffusion_model)
    sigmas = Fl.flux_sigmas(STEPS, 1.15)
    cache = Fl.flow_invert(backend, x0, M.FluxTextConditioning(txt, y, 1.0), Fl.FlowSchedule(sigmas, SKIP),
                           H.select_flux_layers(backend.kv_layers(), "all"))
    mask = torch.zeros(HEIGHT, WIDTH)
    mask[16:41, 16:41] = 1.0  # centre (28, 28), the handle: the release's begin point is the region's centroid
    plan = D.plan_dragflow(mask, torch.tensor([HANDLE]), torch.tensor([TARGET]), (HEIGHT // 8, WIDTH // 8))
    return dict(x0=x0, txt=txt, y=y, backend=backend, cache=cache, mask=mask, plan=plan)


def _released_supervision(network, cache, mask_raw, target, editable, txt, y, transport, intensify, lr, record):
    """``Dragger.dragger_step`` at the first sampling round (roundidx 0, max_operation_num 1), re-stated.

    Works on packed tokens ``(1, L, 64)`` as the release does; returns the final tokens. ``record`` gets
    ``(loss, grad)`` of every iteration. ``editable`` is the gradient mask (the release's ``instruction["mask"]``,
    cv2's rotated rectangle, which cannot run here) already at latent size, from the engine's plan.
    """
    Fl = importlib.import_module(type(cache).__module__)
    h, w = cache.source.shape[-2:]
    n_tok, hidden = (h // 2) * (w // 2), 64
    sigmas, skip = cache.schedule.sigmas, cache.schedule.skip
    t_curr, t_prev = sigmas[skip], sigmas[skip + 1]
    pointer = len(cache.call_times) - 1  # switch_hooks: timeidx = len(values) - 1; no countdown before round 0's drag
    full_shape = (h * 8, w * 8)
    scale_level = 4 if sum(full_shape) / 2 > 1000 else 3 if sum(full_shape) / 2 > 600 else 2  # compute_adaptive_scaler
    cut = (full_shape[0] // scale_level, full_shape[1] // scale_level)
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h // 2)[:, None], torch.arange(w // 2)[None, :]
    img_ids = ids.reshape(1, -1, 3)
    handles, carrier = [], {}

    def inject(layer):  # _inject_key_hook / _inject_value_hook, eta 0: output[:] = source
        def hook(module, inputs, output):
            k, v = cache.kv[pointer][layer.index]
            out = output.clone()
            out[..., hidden:2 * hidden], out[..., 2 * hidden:3 * hidden] = k, v
            return out
        return hook

    def keep_input(module, inputs):  # ComfyUI's blocks add to their streams in place after a LayerNorm saved them
        return (inputs[0].clone(),)

    for layer in cache.layers:
        block = getattr(network, f"{layer.stage}_blocks")[int(layer.name.rsplit(".", 1)[1])]
        handles.append((block.img_attn.qkv if layer.stage == "double" else block.linear1).register_forward_hook(inject(layer)))
    for i, block in enumerate(network.double_blocks):
        for name in ("img_norm1", "img_norm2", "txt_norm1", "txt_norm2"):
            handles.append(getattr(block, name).register_forward_pre_hook(keep_input))
        # overrider_DiT: "DOUBLE-i-0" = norm_hidden_states (norm1 output, the attention's input); "-2" = hidden_states after the MLP
        handles.append(block.img_attn.qkv.register_forward_pre_hook(lambda m, a, i=i: carrier.__setitem__(f"DOUBLE-{i}-0", a[0])))
        handles.append(block.register_forward_hook(lambda m, a, o, i=i: carrier.__setitem__(f"DOUBLE-{i}-2", o[0].clone())))
    target_ids = ["DOUBLE-0-0", "DOUBLE-0-2", "DOUBLE-1-0", "DOUBLE-1-2"]  # config: DOUBLE-17-0/2, DOUBLE-18-0/2

    def decode_for_calculation(z):  # "b (h w) (c ph pw) -> b c (h ph) (w pw)"
        b, _, d = z.shape
        return z.float().view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)

    def extract(z):  # _extract_latent_features at t_curr, sampling guidance 3.5
        carrier.clear()
        noise = network.forward_orig(z, img_ids, txt, torch.zeros(1, txt.shape[1], 3), torch.full((1,), t_curr), y,
                                     torch.full((1,), 3.5))
        feats = [F.interpolate(decode_for_calculation(carrier[k][:, :n_tok]), cut, mode="bilinear") for k in target_ids]
        return noise, torch.cat(feats, dim=1)

    def encode(x):  # "b c (h ph) (w pw) -> b (h w) (c ph pw)"
        b, c = x.shape[:2]
        return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, n_tok, c * 4)

    try:
        z_orig = encode(cache.x_star)
        with torch.no_grad():
            np_orig, F_orig = extract(z_orig)
            z_orig_ = decode_for_calculation(z_orig + (t_prev - t_curr) / 2 * np_orig)
        region = F.interpolate(mask_raw[None, None], size=F_orig.shape[2:], mode="bilinear", align_corners=False)
        region_init = region.clone()
        m = (region > 0.5).float()  # DynamicRegionEstimator.compute_centroid
        gy, gx = torch.meshgrid(torch.arange(cut[0]), torch.arange(cut[1]), indexing="ij")
        begin = torch.tensor([(gx * m[0, 0]).sum() / m.sum(), (gy * m[0, 0]).sum() / m.sum()]).round()
        target_fit = torch.round(torch.tensor([target[0] / mask_raw.shape[1] * cut[1], target[1] / mask_raw.shape[0] * cut[0]]))
        delta = (target_fit[0] - begin[0], target_fit[1] - begin[1])  # full_delta = target - begin
        z = z_orig.clone().requires_grad_(True)
        for k in range(transport + intensify):
            weight = min(1.0, (0 * transport + (k + 1)) / (1 * transport))  # _get_progressive_weight; INTENSIFY: 1.0
            theta = torch.tensor([[1.0, 0.0, -2.0 * delta[0] * weight / cut[1]],
                                  [0.0, 1.0, -2.0 * delta[1] * weight / cut[0]]])[None]  # _process_transformation
            grid = F.affine_grid(theta, region_init.shape, align_corners=False)
            region_curr = F.grid_sample(region_init, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            _, F_drag = extract(z)
            F_orig_estimated = F.grid_sample(F_orig, grid, mode="bilinear", padding_mode="border", align_corners=False)
            p_curr = (region_curr > 0.5).float()
            loss = F.l1_loss(F_drag * p_curr, F_orig_estimated * p_curr) * 1.0  # norm_weight 1 for one region
            grad = torch.autograd.grad(outputs=loss, inputs=z, create_graph=False)[0]
            record.append((loss.detach(), decode_for_calculation(grad)))
            with torch.no_grad():
                z_drag_updt = z - lr * grad
                combined = z_orig_ * (1 - editable) + decode_for_calculation(z_drag_updt) * editable  # _combine_latents
                z.copy_(encode(combined))
        return z.detach()
    finally:
        for handle in handles:
            handle.remove()


def test_supervision_equals_the_released_equations(comfy_inproc, flux, case):
    """Loss and gradient of every iteration, and the latent after them, with the release's half-step background."""
    Fl, M, H, D = _engine(comfy_inproc)
    plan, cache = case["plan"], case["cache"]
    assert plan.operations[0].delta == (12.0, 4.0) and plan.cut == (32, 48)
    record = []
    with comfy_inproc.pack.nodes.host_caps.training_mode():
        ref = _released_supervision(flux.model.diffusion_model, cache, case["mask"], TARGET, plan.editable,
                                    case["txt"], case["y"], 3, 2, 1000.0, record)
        ours, steps = [], []

        def tap(done, loss):
            steps.append(loss)

        settings = D.DragFlowSettings(transport_steps=3, intensify_steps=2, half_step_background=True)
        cond = M.FluxTextConditioning(case["txt"], case["y"], 3.5)
        result = D.drag_flow(case["backend"], cache.x_star, cond, cache, plan, settings, tap)

        blocks = D.default_feature_blocks(2)
        t = cache.schedule.t_star

        def first_gradient(predict, x):
            _, captured = predict(cache.x_star, t, False)
            reference = D.feature_map(captured, blocks, (8, 12), plan.cut)
            ours.append(D.supervision_gradient(predict, x, t, reference, plan, blocks, D.progressive_weight(0, settings)))
            return x

        case["backend"].run_features(first_gradient, cache.x_star, cond, _control(cache), [t], blocks, True)
    (loss, grad), (ref_loss, ref_grad) = ours[0], record[0]
    assert grad.abs().max() > 1e-5  # the supervision reaches the latent
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-8)
    torch.testing.assert_close(torch.tensor(steps), torch.stack([r[0] for r in record]), rtol=0, atol=1e-6)
    torch.testing.assert_close(M.pack(result.latent), ref, rtol=0, atol=1e-5)


def _control(cache):
    """The injector dragflow runs its passes under: the last recorded call (released pairing, sampling call 0)."""
    attention = importlib.import_module(type(cache).__module__.replace(".flow", ".attention"))
    call = len(cache.call_times) - 1
    control = attention.KVInjector(cache, cache.layers, {call})
    control.begin_step(call)
    return control


def test_gradient_checkpointing_changes_nothing(comfy_inproc, flux, case):
    Fl, M, H, D = _engine(comfy_inproc)
    cond = M.FluxTextConditioning(case["txt"], case["y"], 3.5)
    runs = []
    with comfy_inproc.pack.nodes.host_caps.training_mode():
        for checkpointing in (False, True):
            settings = D.DragFlowSettings(transport_steps=3, intensify_steps=1, gradient_checkpointing=checkpointing)
            runs.append(D.drag_flow(case["backend"], case["cache"].x_star, cond, case["cache"], case["plan"], settings))
    torch.testing.assert_close(runs[0].latent, runs[1].latent, rtol=0, atol=1e-6)
    assert (runs[0].latent - case["cache"].x_star).abs().max() > 1e-3  # positive control: the latent moved


def test_a_dragged_region_lands_where_the_affine_map_puts_it(comfy_inproc, flux, case):
    """After the released 50 + 20 iterations, the features inside the moved region match the source's carried by the
    full move far better than before; the positive control (no supervision) keeps the whole distance."""
    Fl, M, H, D = _engine(comfy_inproc)
    plan, cache = case["plan"], case["cache"]
    cond = M.FluxTextConditioning(case["txt"], case["y"], 3.5)
    blocks = D.default_feature_blocks(2)
    t = cache.schedule.t_star
    with comfy_inproc.pack.nodes.host_caps.training_mode():
        moved = D.drag_flow(case["backend"], cache.x_star, cond, cache, plan).latent
        features = {}

        def read(predict, x):
            for name, z in (("source", cache.x_star), ("moved", moved)):
                with torch.no_grad():
                    features[name] = D.feature_map(predict(z, t, False)[1], blocks, (8, 12), plan.cut)
            return x

        case["backend"].run_features(read, cache.x_star, cond, _control(cache), [t], blocks, False)
    op = plan.operations[0]

    def distance(feats, weight):
        grid = D.translation_grid(op.delta, weight, plan.cut)
        inside = F.grid_sample(op.region, grid, align_corners=False) > 0.5
        carried = F.grid_sample(features["source"], grid, padding_mode="border", align_corners=False)
        return ((feats - carried).abs() * inside).sum() / inside.sum() / feats.shape[1]

    before, after = distance(features["source"], 1.0), distance(features["moved"], 1.0)
    assert after < 0.5 * before, (before, after)
    # where the region lands: the moved features match the full move better than half of it or none
    assert after < distance(features["moved"], 0.5) and after < distance(features["moved"], 0.0)
    outside = plan.editable[0, 0] < 0.5
    assert torch.equal(moved[..., outside], cache.x_star[..., outside])  # the gradient mask locks the background


class _Spy:
    """A feature backend that records the latent of every pass the supervision loop makes (first: the reference)."""

    def __init__(self, backend):
        self.backend, self.inputs = backend, []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def run_features(self, loop, x_start, *args):
        def spied(predict, x):
            def predict_and_record(z, t, with_velocity):
                self.inputs.append(z.detach().clone())
                return predict(z, t, with_velocity)

            return loop(predict_and_record, x)

        return self.backend.run_features(spied, x_start, *args)


def test_after_fastdrag_warp_the_reference_is_the_unwarped_latent_and_the_start_the_warped_one(comfy_inproc, flux,
                                                                                               case):
    """The hybrid fastdrag_dragflow_flux: dragflow refines FastDrag's warped latent, its reference features (and the
    locked background) come from the inversion's unwarped ``x_star``; the positive control: the warp changed the
    latent, and starting from it changes the result."""
    Fl, M, H, D = _engine(comfy_inproc)
    fastdrag = importlib.import_module(f"{comfy_inproc.pack.__name__}.dragkit.fastdrag")
    plan, cache = case["plan"], case["cache"]
    cells = F.interpolate(case["mask"][None, None], size=(8, 12), mode="bilinear", align_corners=False)[0, 0] > 0.5
    warped, _ = fastdrag.latent_warp(cache.x_star, torch.tensor([HANDLE]) / 8, torch.tensor([TARGET]) / 8, cells)
    assert (warped - cache.x_star).abs().max() > 0.1  # the warp moved something
    cond = M.FluxTextConditioning(case["txt"], case["y"], 3.5)
    settings = D.DragFlowSettings(transport_steps=2, intensify_steps=1)
    spies = {name: _Spy(case["backend"]) for name in ("warped", "unwarped")}
    with comfy_inproc.pack.nodes.host_caps.training_mode():
        out = {name: D.drag_flow(spies[name], start, cond, cache, plan, settings).latent
               for name, start in (("warped", warped), ("unwarped", cache.x_star))}
    reference_pass, first_pass = spies["warped"].inputs[:2]
    assert torch.equal(reference_pass, cache.x_star) and torch.equal(first_pass, warped)
    assert torch.equal(spies["unwarped"].inputs[0], reference_pass)  # the same reference whatever the start
    outside = plan.editable[0, 0] < 0.5
    assert torch.equal(out["warped"][..., outside], cache.x_star[..., outside])
    inside = ~outside
    assert (out["warped"][..., inside] - out["unwarped"][..., inside]).abs().max() > 0.1


def test_the_node_equals_the_engine(comfy_inproc, flux, case):
    """Motion-Supervision Optimize (dragflow) through ComfyUI's guider equals the host-free engine on the same weights."""
    Fl, M, H, D = _engine(comfy_inproc)
    pack = comfy_inproc.pack
    latent = flux.model.process_latent_out(case["x0"])
    cond = [[case["txt"], {"pooled_output": case["y"], "guidance": 1.0}]]
    z, cache = comfy_inproc.run_node("DragKitDDIMInvert", model=flux, latent={"samples": latent}, positive=cond,
                                     steps=STEPS, strength=0.76, cache_layers="non-ridge", cache_device="auto")
    points = _points(pack)
    sample_cond = [[case["txt"], {"pooled_output": case["y"], "guidance": 3.5}]]
    out, tracked = comfy_inproc.run_node(
        "DragKitMotionSupervisionOptimize", model=flux, latent=z, attn_cache=cache, positive=sample_cond, points=points,
        mode="dragflow", iterations=1, lr=-1.0, lam=-1.0, r1=-1, r2=-1, mask=case["mask"][None], transport_steps=4,
        intensify_steps=2, gradient_checkpointing=True)
    assert tracked is points and out["samples"].shape == latent.shape
    engine_cache = dataclasses.replace(cache, model_key=case["backend"].model_key)  # the same weights, called directly
    with pack.nodes.host_caps.training_mode():
        ref = D.drag_flow(case["backend"], cache.x_star, M.FluxTextConditioning(case["txt"], case["y"], 3.5),
                          engine_cache, case["plan"], D.DragFlowSettings(transport_steps=4, intensify_steps=2))
    got = flux.model.process_latent_in(out["samples"])
    assert (ref.latent - cache.x_star).abs().max() > 1e-2
    torch.testing.assert_close(got, ref.latent, rtol=0, atol=1e-5)
    (sampled,) = comfy_inproc.run_node("DragKitKVInjectedSample", model=flux, latent=out, attn_cache=cache,
                                       positive=sample_cond, kv_source="inversion cache", inject_layers="non-ridge",
                                       inject_start=0.0, inject_end=1.0)
    assert torch.isfinite(sampled["samples"]).all()


def _points(pack):
    return pack.dragkit.points.parse_drag_points(
        {"width": WIDTH, "height": HEIGHT, "pairs": [{"handle": list(HANDLE), "target": list(TARGET)}]})


def test_hostile_input_to_dragflow(comfy_inproc, comfy_nodes, flux, case, tiny_comfy_models):
    pack = comfy_inproc.pack
    latent = flux.model.process_latent_out(case["x0"])
    cond = [[case["txt"], {"pooled_output": case["y"], "guidance": 1.0}]]
    z, cache = comfy_inproc.run_node("DragKitDDIMInvert", model=flux, latent={"samples": latent}, positive=cond,
                                     steps=4, strength=0.5, cache_layers="non-ridge", cache_device="auto")
    points = _points(pack)
    mask = case["mask"][None]

    def run(model=flux, latent=z, attn_cache=cache, positive=cond, points=points, mode="dragflow", mask=mask):
        return comfy_inproc.run_node(
            "DragKitMotionSupervisionOptimize", model=model, latent=latent, attn_cache=attn_cache, positive=positive,
            points=points, mode=mode, iterations=1, lr=-1.0, lam=-1.0, r1=-1, r2=-1, mask=mask, transport_steps=1,
            intensify_steps=0, gradient_checkpointing=False)

    unet = tiny_comfy_models
    with torch.inference_mode():
        (unet_cond,) = comfy_nodes.CLIPTextEncode().encode(unet.clip, "a photo")
    unet_z, unet_cache = comfy_inproc.run_node("DragKitDDIMInvert", model=unet.model, latent={"samples": torch.randn(1, 4, 8, 12)},
                                               positive=unet_cond, steps=4, strength=0.5, cache_layers="decoder",
                                               cache_device="auto")
    with pytest.raises(ValueError, match=r"^\[Motion-Supervision Optimize\] mode dragflow is DragFlow's region supervision "
                                         r"for FLUX .* this MODEL is BaseModel"):
        run(model=unet.model, latent=unet_z, attn_cache=unet_cache, positive=unet_cond)
    with pytest.raises(ValueError, match=r"^\[Motion-Supervision Optimize\] this attention cache was recorded on a UNet"):
        run(attn_cache=unet_cache)
    with pytest.raises(ValueError, match=r"^\[Motion-Supervision Optimize\] mode dragdiffusion works on UNets .* choose mode dragflow"):
        run(mode="dragdiffusion")
    with pytest.raises(ValueError, match=r"^\[Motion-Supervision Optimize\] dragflow moves masked regions: paint a mask"):
        run(mask=None)
    off = torch.zeros(1, HEIGHT, WIDTH)
    off[0, 40:60, 60:90] = 1.0
    with pytest.raises(ValueError, match=r"^\[Motion-Supervision Optimize\] handle 1 at \(28, 28\) is outside the mask"):
        run(mask=off)
    with pytest.raises(ValueError, match=r"^\[Motion-Supervision Optimize\] this latent does not know its diffusion step"):
        run(latent={"samples": latent})  # the clean latent, not DDIM Invert's
    with pytest.raises(ValueError, match=r"^\[Motion-Supervision Optimize\] dragflow supervises the latent at t\* \(step 2 of 4\)"):
        run(latent=pack.nodes.latent_io.with_step(z["samples"], 4, 3, 100, 0.1))
    with pytest.raises(ValueError, match=r"^\[Motion-Supervision Optimize\] the positive conditioning's FLUX guidance is 150"):
        run(positive=[[case["txt"], {"pooled_output": case["y"], "guidance": 150.0}]])


def test_the_flux_benchmark_counts_the_model_calls_of_each_stage(comfy_inproc, flux):
    """benchmarks.flux on the small FLUX: FireFlow inversion 19 steps = 20 passes, sampling the same, dragflow 70
    supervision passes (stopped after the last feature block, with autograd) + the unedited features' pass + the two
    backward-memory probes."""
    from benchmarks import flux as bench

    stages = bench.run_chain(comfy_inproc, {"model": flux, "side": 64, "tokens": 4, "context": 40, "pooled": 24}, False)
    calls = {name: stage["model_calls"] for name, stage in stages.items()}
    assert calls["invert"] == {"full": 20, "passes": 20, "autograd": 0, "partial": 0}
    assert calls["sample"] == calls["dragflow_sample"] == calls["invert"] and calls["warp"]["passes"] == 0
    assert calls["dragflow"] == {"full": 0, "passes": 73, "autograd": 72, "partial": 73}
    assert calls["dragflow_edit"]["passes"] == 113 and calls["fastdrag_edit"]["passes"] == 40
    assert stages["dragflow_edit"]["ms"] == pytest.approx(sum(stages[s]["ms"] for s in ("invert", "dragflow", "dragflow_sample")))


def test_cancel_stops_dragflow_and_leaves_the_model_clean(comfy_inproc, flux, case, monkeypatch, caplog):
    """Cancel at iteration 2 of 6 stops the supervision (ComfyUI's interrupt); every hook and checkpoint wrapper is
    gone afterwards. The node asks the host for the backward memory first, as the UNet modes do."""
    import comfy.model_management as mm

    node = importlib.import_module(f"{comfy_inproc.pack.__name__}.nodes.optimize_flux")
    real, seen = node.progress_reporter, []

    def interrupting(total):
        report = real(total)

        def step(done):
            seen.append(done)
            if done == 2:
                mm.interrupt_current_processing(True)
            report(done)

        return step

    monkeypatch.setattr(node, "progress_reporter", interrupting)
    cond = [[case["txt"], {"pooled_output": case["y"], "guidance": 1.0}]]
    z, cache = comfy_inproc.run_node("DragKitDDIMInvert", model=flux, latent={"samples": flux.model.process_latent_out(case["x0"])},
                                     positive=cond, steps=4, strength=0.5, cache_layers="non-ridge", cache_device="auto")
    try:
        with caplog.at_level("INFO", logger="DragKit"), pytest.raises(mm.InterruptProcessingException):
            comfy_inproc.run_node(
                "DragKitMotionSupervisionOptimize", model=flux, latent=z, attn_cache=cache, positive=cond,
                points=_points(comfy_inproc.pack), mode="dragflow", iterations=1, lr=-1.0, lam=-1.0, r1=-1, r2=-1,
                mask=case["mask"][None], transport_steps=4, intensify_steps=2, gradient_checkpointing=True)
    finally:
        mm.interrupt_current_processing(False)
    assert seen == [1, 2]
    assert any("reserving" in r.getMessage() and "for backward" in r.getMessage() for r in caplog.records)
    network = flux.model.diffusion_model
    modules = list(network.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)
    assert not any("forward" in block.__dict__ for block in network.double_blocks)
