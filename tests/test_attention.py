"""Self-attention layer selection, the KV cache controls and the cache memory policy."""

import pytest
import torch

from dragkit.attention import (
    AttentionControl,
    AttnCache,
    AttnLayer,
    KVInjector,
    KVRecorder,
    choose_storage_device,
    select_layers,
)
from dragkit.errors import DragInputError
from dragkit.schedule import DDIMSchedule, scaled_linear_alphas_cumprod


SD15_DOWNSCALES = [1, 1, 2, 2, 4, 4, 8, 4, 4, 4, 2, 2, 2, 1, 1, 1]
"""Latent / feature-map size of SD1.5's 16 self-attention layers in execution order."""


def sd15_like_layers():
    stages = ["down"] * 6 + ["mid"] + ["up"] * 9
    return tuple(AttnLayer(i, stage, f"layer{i}", 320, scale) for i, (stage, scale) in enumerate(zip(stages, SD15_DOWNSCALES)))


def test_masactrl_is_every_decoder_level_but_the_coarsest_with_attention():
    sdxl = tuple(AttnLayer(i, "up", f"up{i}", 640, 4 if i < 30 else 2) for i in range(36))
    assert [layer.index for layer in select_layers(sdxl, "masactrl")] == list(range(30, 36))
    one_level = tuple(AttnLayer(i, "up", f"up{i}", 64) for i in range(3))
    assert select_layers(one_level, "masactrl") == one_level


@pytest.mark.parametrize(
    "spec, indices",
    [
        ("decoder", list(range(7, 16))),
        ("10-", list(range(10, 16))),
        ("masactrl", list(range(10, 16))),
        ("encoder, middle", list(range(0, 7))),
        ("all", list(range(16))),
        ("none", []),
        ("3, 5-6", [3, 5, 6]),
        (" Decoder ", list(range(7, 16))),
    ],
)
def test_select_layers_by_role(spec, indices):
    assert [layer.index for layer in select_layers(sd15_like_layers(), spec)] == indices


@pytest.mark.parametrize("spec", ["", "decoders", "16", "12-20", "5-3", "1.5"])
def test_bad_layer_specs(spec):
    with pytest.raises(DragInputError):
        select_layers(sd15_like_layers(), spec)


def make_cache():
    """A cache that records the first of two decoder layers."""
    schedule = DDIMSchedule(scaled_linear_alphas_cumprod(), 10, 0.3)
    layers = sd15_like_layers()[7:9]
    return AttnCache(schedule, layers[:1], "model-a", torch.zeros(1, 4, 4, 4)), layers


def test_recorder_then_injector_replaces_only_chosen_layers_and_steps():
    cache, layers = make_cache()
    recorder = KVRecorder(cache, layers[:1], "auto", 2)
    k, v = torch.randn(1, 16, 320), torch.randn(1, 16, 320)
    recorder.begin_step(101)
    assert recorder(layers[0], k, v) == (k, v)
    recorder(layers[1], k * 2, v * 2)
    recorder.finish()
    assert set(cache.kv) == {101} and set(cache.kv[101]) == {layers[0].index}
    injector = KVInjector(cache, layers[:1], {101})
    injector.begin_step(101)
    k_new, v_new = torch.randn(2, 16, 320), torch.randn(2, 16, 320)
    out_k, out_v = injector(layers[0], k_new, v_new)
    assert torch.equal(out_k, k.expand(2, -1, -1)) and torch.equal(out_v, v.expand(2, -1, -1))
    assert injector(layers[1], k_new, v_new)[0] is k_new
    injector.begin_step(1)
    assert injector(layers[0], k_new, v_new)[0] is k_new


def test_injecting_uncached_layers_or_other_sizes_is_refused():
    cache, layers = make_cache()
    recorder = KVRecorder(cache, layers[:1], "auto", 1)
    recorder.begin_step(101)
    recorder(layers[0], torch.randn(1, 16, 320), torch.randn(1, 16, 320))
    with pytest.raises(DragInputError, match="were not cached"):
        KVInjector(cache, layers, {101})
    injector = KVInjector(cache, layers[:1], {101})
    injector.begin_step(101)
    with pytest.raises(DragInputError, match="another latent size"):
        injector(layers[0], torch.randn(1, 64, 320), torch.randn(1, 64, 320))
    with pytest.raises(DragInputError, match="different model"):
        cache.check_compatible(torch.zeros(1, 4, 4, 4), "model-b")
    with pytest.raises(DragInputError, match="shape"):
        cache.check_compatible(torch.zeros(1, 4, 8, 4), "model-a")


def test_cache_policy():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert choose_storage_device("auto", gpu, 100 * 2**20) == gpu
    assert choose_storage_device("auto", gpu, 900 * 2**20) == cpu
    assert choose_storage_device("offload", gpu, 1) == cpu
    assert choose_storage_device("compute_device", gpu, 10 * 2**30) == gpu
    with pytest.raises(DragInputError):
        choose_storage_device("vram", gpu, 1)


def test_base_control_is_a_no_op():
    control = AttentionControl()
    k = torch.randn(1, 4, 8)
    assert control(sd15_like_layers()[0], k, k)[0] is k
