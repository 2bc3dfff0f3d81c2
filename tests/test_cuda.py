"""Checks that need a CUDA device (``scripts/gpu_check.sh`` runs them; they skip elsewhere).

On the engine's diffusers backend over the micro UNet in fp16 on the GPU:
the attention cache offloaded to pinned CPU memory equals the one kept on the
device, bit for bit and right after inversion returns; motion supervision
and LoRA training run their fp16 branches; the fingerprint reads a tensor
above 2**24 elements on the device; UNet passes captured as CUDA graphs
(inversion, KV-injected sampling, the reference branch) match eager runs,
follow new inputs and recapture for new weights.
"""

import pytest
import torch

from dragkit import capture
from dragkit.attention import AttentionControl, select_layers
from dragkit.ddim import ddim_invert, kv_sample
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


def _graph_vs_eager(monkeypatch, backend, run):
    """``run()`` with CUDA graphs and plainly; the graph run's pass statistics."""
    monkeypatch.setenv(capture.ENV_VAR, "off")
    eager = run()
    backend.passes.clear()
    monkeypatch.setenv(capture.ENV_VAR, "graph")
    graphed = run()
    stats = dict(captures=backend.passes.captures, rejected=backend.passes.rejected,
                 first_replay_errors=list(backend.passes.first_replay_errors))
    backend.passes.clear()
    return eager, graphed, stats


def test_captured_inversion_and_sampling_match_eager(monkeypatch, fp16_backend):
    z, cond = inputs()
    schedule = DDIMSchedule(fp16_backend.alphas_cumprod(), 20, 0.7)
    layers = select_layers(fp16_backend.self_attention_layers(), "all")

    def edit():
        cache = ddim_invert(fp16_backend, z, cond, schedule, layers, "offload")
        out = kv_sample(fp16_backend, cache.z_star + 0.05, cond, cache, schedule.start_index, layers, 0.0, 0.5)
        return cache, out

    (eager_cache, eager_out), (graph_cache, graph_out), stats = _graph_vs_eager(monkeypatch, fp16_backend, edit)
    print("captured passes:", stats)
    assert stats["rejected"] == 0 and stats["captures"] == 3, "inversion, injecting and plain sampling steps"
    assert max(stats["first_replay_errors"]) <= capture.REPLAY_TOLERANCE
    assert (graph_out - eager_out).abs().max() <= 1e-3
    for t, step in graph_cache.kv.items():
        for index, (k, v) in step.items():
            assert k.is_pinned(), "offloaded into the pinned arena"
            assert (k.float() - eager_cache.kv[t][index][0].float()).abs().max() <= 1e-3


def test_captured_reference_branch_matches_eager(monkeypatch, fp16_backend):
    z, cond = inputs()
    schedule = DDIMSchedule(fp16_backend.alphas_cumprod(), 20, 0.7)
    layers = select_layers(fp16_backend.self_attention_layers(), "all")
    cache = ddim_invert(fp16_backend, z, cond, schedule, layers, "compute_device")
    masactrl = select_layers(fp16_backend.self_attention_layers(), "masactrl")

    def sample():
        return kv_sample(fp16_backend, cache.z_star + 0.05, cond, cache, schedule.start_index, masactrl,
                         kv_source="reference branch")

    eager, graphed, stats = _graph_vs_eager(monkeypatch, fp16_backend, sample)
    assert stats["rejected"] == 0 and stats["captures"] >= 1
    assert (graphed - eager).abs().max() <= 1e-3


def test_a_replay_follows_new_inputs_and_new_weights(monkeypatch):
    unet = tiny_models.micro_unet(seed=0).eval().to(DEVICE, torch.float16)
    backend = DiffusersBackend(unet)
    monkeypatch.setenv(capture.ENV_VAR, "graph")
    z, cond = inputs()
    schedule = DDIMSchedule(backend.alphas_cumprod(), 20, 0.7)
    replayed = []
    monkeypatch.setattr(capture, "REPLAY_OBSERVERS", [lambda first, grad: replayed.append(first.shape[0])])
    first = ddim_invert(backend, z, cond, schedule, ()).z_star
    second = ddim_invert(backend, z + 0.5, cond, schedule, ()).z_star
    assert backend.passes.captures == 1 and not torch.equal(first, second)
    assert len(replayed) == 2 * schedule.num_inversion_steps - 1, "every pass after the first is a replay, observed"
    with torch.no_grad():
        for p in unet.parameters():
            p.data = p.data * 1.01
    third = ddim_invert(backend, z + 0.5, cond, schedule, ()).z_star
    assert backend.passes.captures == 2, "new weight storage: recaptured"
    monkeypatch.setenv(capture.ENV_VAR, "off")
    assert (ddim_invert(backend, z + 0.5, cond, schedule, ()).z_star - third).abs().max() <= 1e-3


def test_a_captured_differentiable_pass_matches_eager():
    conv = torch.nn.Conv2d(4, 8, 3, padding=1).to(DEVICE, torch.float16).requires_grad_(False)

    def features_pass(tree):
        (x,) = tree
        features = torch.nn.functional.silu(conv(x.half()))
        return x * 0.5 - features[:, :4].float(), features

    passes = capture.PassCache()
    results = {}
    for mode in ("eager", "graph"):
        passes.clear()
        runs = []
        for seed in (1, 2, 3):
            x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed)).to(DEVICE).requires_grad_(True)
            out, features = passes.run_differentiable("k", features_pass, (x,), AttentionControl(), (), mode)
            (out.square().sum() + features.float().sum()).backward()
            runs.append((out.detach(), x.grad))
        results[mode] = runs
    assert passes.captures == 1 and passes.rejected == 0, "captured once, forward and backward"
    assert max(passes.first_replay_errors) <= capture.REPLAY_TOLERANCE
    for (eager_out, eager_grad), (graph_out, graph_grad) in zip(results["eager"], results["graph"]):
        assert (graph_out - eager_out).abs().max() <= 1e-3 and (graph_grad - eager_grad).abs().max() <= 1e-3


def test_a_captured_pass_with_parameter_gradients_matches_eager():
    weight = torch.nn.Parameter(0.1 * torch.randn(8, 16, generator=torch.Generator().manual_seed(0)).to(DEVICE))

    def adapted(tree):
        (x,) = tree
        return (torch.nn.functional.linear(x.half(), weight.half()).float().square(),)

    passes = capture.PassCache()
    grads = {}
    for mode in ("eager", "graph"):
        passes.clear()
        grads[mode] = []
        for seed in (1, 2, 3):
            weight.grad = None
            x = torch.randn(4, 16, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
            (out,) = passes.run_differentiable("lora", adapted, (x,), AttentionControl(), (), mode, params=(weight,))
            out.sum().backward()
            grads[mode].append(weight.grad.clone())
    assert passes.captures == 1 and passes.rejected == 0
    for eager, graphed in zip(grads["eager"], grads["graph"]):
        assert (graphed - eager).abs().max() <= 1e-3 * max(1.0, float(eager.abs().max()))


@pytest.fixture()
def graphs_on(monkeypatch) -> capture.PassCache:
    """Graphs on (``DRAGKIT_CAPTURE=graph``, no earlier failure in this process); a fresh cache."""
    monkeypatch.setattr(capture, "_graphs_disabled", set())
    monkeypatch.setenv(capture.ENV_VAR, "graph")
    return capture.PassCache()


def test_a_failed_capture_leaves_the_process_usable(graphs_on):
    passes = graphs_on

    def syncing(tree):
        (x,) = tree
        return x * 2 if float(x.sum()) > -1e9 else x  # float() syncs with the host: illegal while capturing

    x = torch.ones(4, device=DEVICE)
    assert torch.equal(passes.run("k", syncing, (x,), AttentionControl(), (), "graph"), x * 2)
    assert passes.rejected == 1 and passes.captures == 0 and "k" in passes.refused
    assert capture.capture_mode(DEVICE) == "off", "graphs off for the rest of the process: plain passes"
    assert torch.cuda.current_stream() == torch.cuda.default_stream(), "the stream is restored"
    torch.cuda.empty_cache()
    assert torch.equal(passes.run("k", syncing, (x + 1,), AttentionControl(), (), "graph"), (x + 1) * 2)
    assert passes.replays == 0, "the refused key runs plainly"


def test_a_capture_with_nan_refuses_only_its_key(graphs_on):
    passes = graphs_on

    def nan_pass(tree):
        (x,) = tree
        return x * float("nan")

    x = torch.ones(4, device=DEVICE)
    passes.run("nan", nan_pass, (x,), AttentionControl(), (), "graph")
    assert "nan" in passes.refused and passes.captures == 0, "an all-NaN first replay is not accepted"
    passes.run("ok", lambda tree: tree[0] * 2, (x,), AttentionControl(), (), "graph")
    assert passes.captures == 1 and capture.capture_mode(DEVICE) == "graph", "graphs stay on for other keys"


def test_releasing_a_models_passes_gives_their_memory_back():
    passes = capture.PassCache(group=lambda key: key[0])
    weight = torch.randn(512, 512, device=DEVICE)

    def layer(tree):
        (x,) = tree
        return torch.relu(x @ weight) @ weight

    def cycle() -> tuple[int, int]:
        for batch in (256, 512, 1024):
            passes.run(("model", batch), layer, (torch.randn(batch, 512, device=DEVICE),), AttentionControl(), (), "graph")
        torch.cuda.synchronize()
        held = torch.cuda.memory_reserved()
        passes.release(lambda key: key[0] == "model")
        return held, torch.cuda.memory_reserved()

    cycle()  # the first one also allocates the libraries' workspaces
    held, after = cycle()
    assert passes.captures == 6 and not passes.entries and not passes.pools
    assert held - after >= 1024 * 512 * 4, "the graphs' pool (at least one activation) went back to the device"
