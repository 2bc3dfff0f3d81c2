"""Captured UNet passes (:mod:`dragkit.capture`) on the CPU: the static-buffer path in its eager stand-in for replay.

On the engine's diffusers backend over the micro UNet, ``DRAGKIT_CAPTURE=eager``
must give bit for bit what the plain path gives for inversion (trajectory and
attention cache), KV-injected sampling with and without CFG, and the
reference branch, while every step after a key's first replays. Then the
pieces: the controls' signatures and slots, the cache's keys, weights check
and capacity, the pinned arena, and the mode setting.
"""

import pytest
import torch

from dragkit import capture
from dragkit.attention import (
    AttentionControl,
    AttnCache,
    AttnLayer,
    KVInjector,
    KVRecorder,
    KVSlots,
    MutualSelfAttention,
    PinnedArena,
    select_layers,
)
from dragkit.ddim import ddim_invert, kv_sample
from dragkit.diffusers_backend import DiffusersConditioning
from dragkit.schedule import DDIMSchedule


@pytest.fixture()
def fresh(backend):
    backend.passes.clear()
    yield backend
    backend.passes.clear()


def in_mode(monkeypatch, mode, fn):
    monkeypatch.setenv(capture.ENV_VAR, mode)
    return fn()


def conditioning(cfg=1.0):
    gen = torch.Generator().manual_seed(7)
    positive = torch.randn(1, 7, 32, generator=gen)
    negative = torch.randn(1, 7, 32, generator=gen) if cfg != 1.0 else None
    return DiffusersConditioning(positive, negative, cfg)


def invert(backend):
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    schedule = DDIMSchedule(backend.alphas_cumprod(), 10, 0.7)
    return ddim_invert(backend, z0, conditioning(), schedule, select_layers(backend.self_attention_layers(), "all"))


def assert_same_cache(a: AttnCache, b: AttnCache) -> None:
    assert list(a.trajectory) == list(b.trajectory) and list(a.kv) == list(b.kv)
    for t in a.trajectory:
        assert torch.equal(a.trajectory[t], b.trajectory[t])
    for t, step in a.kv.items():
        assert list(step) == list(b.kv[t])
        for index, (k, v) in step.items():
            assert torch.equal(k, b.kv[t][index][0]) and torch.equal(v, b.kv[t][index][1])


def test_inversion_equals_the_plain_path(monkeypatch, fresh):
    plain = in_mode(monkeypatch, "off", lambda: invert(fresh))
    assert fresh.passes.replays == 0 and not fresh.passes.entries
    static = in_mode(monkeypatch, "eager", lambda: invert(fresh))
    assert_same_cache(plain, static)
    assert len(fresh.passes.entries) == 1 and fresh.passes.replays == len(plain.kv) - 1


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_kv_injected_sampling_equals_the_plain_path(monkeypatch, fresh, cfg):
    cache = in_mode(monkeypatch, "off", lambda: invert(fresh))
    edited = cache.z_star + 0.1 * torch.randn(cache.z_star.shape, generator=torch.Generator().manual_seed(5))
    layers = select_layers(fresh.self_attention_layers(), "decoder")

    def sample():
        return kv_sample(fresh, edited, conditioning(cfg), cache, cache.schedule.start_index, layers, 0.0, 0.6)

    plain = in_mode(monkeypatch, "off", sample)
    static = in_mode(monkeypatch, "eager", sample)
    assert torch.equal(plain, static)
    signatures = sorted(str(key[0]) for key in fresh.passes.entries)
    assert len(signatures) == 2 and "()" in signatures[0], "injecting and non-injecting steps are separate keys"
    assert torch.equal(in_mode(monkeypatch, "eager", sample), plain), "a re-edit replays the same entries"


def test_reference_branch_equals_the_plain_path(monkeypatch, fresh):
    cache = in_mode(monkeypatch, "off", lambda: invert(fresh))
    index = cache.schedule.start_index + 1
    edited = cache.trajectory[cache.schedule.timesteps[index]] + 0.05
    layers = select_layers(fresh.self_attention_layers(), "masactrl")

    def sample():
        return kv_sample(fresh, edited, conditioning(), cache, index, layers, kv_source="reference branch")

    assert torch.equal(in_mode(monkeypatch, "off", sample), in_mode(monkeypatch, "eager", sample))


LAYERS = (AttnLayer(0, "up", "a", 4), AttnLayer(1, "up", "b", 4))


def kv(seed, batch=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 6, 4, generator=gen), torch.randn(batch, 6, 4, generator=gen)


def toy_pass(control):
    """A stand-in UNet pass: two attention layers calling ``control``; input ``(x,)`` of shape ``(B, 6, 4)``."""

    def fn(tree):
        x = tree[0]
        for layer in LAYERS:
            k, v = control(layer, x * (layer.index + 1), x - layer.index)
            x = x + torch.softmax(x @ k.transpose(1, 2), -1) @ v
        return x

    return fn


def cache_with_steps(steps=(10, 20)) -> AttnCache:
    schedule = DDIMSchedule(torch.linspace(0.99, 0.01, 100, dtype=torch.float64), 10, 1.0)
    cache = AttnCache(schedule=schedule, layers=LAYERS, model_key="toy", source=torch.zeros(1, 4, 2, 3))
    for t in steps:
        cache.kv[t] = {layer.index: kv(t + layer.index) for layer in LAYERS}
    return cache


def test_the_injector_fills_its_slots_for_each_step():
    cache = cache_with_steps()
    injector = KVInjector(cache, LAYERS, {10, 20})
    passes = capture.PassCache()
    x = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(1))
    results = {}
    for t in (10, 20, 10):
        injector.begin_step(t)
        results.setdefault(t, []).append(passes.run(("toy", injector.signature()), toy_pass(injector), (x,), injector, (), "eager"))
        assert torch.equal(results[t][-1], toy_pass(injector)((x,))), f"step {t}: as the unbound (plain) injector"
    assert not torch.equal(results[10][0], results[20][0])
    assert passes.replays == 2 and len(passes.entries) == 1
    (entry,) = passes.entries.values()
    assert set(entry.slots.buffers) == {("inject k", 0), ("inject v", 0), ("inject k", 1), ("inject v", 1)}


def test_the_recorder_drains_its_slots_after_each_pass():
    cache = cache_with_steps(())
    recorder = KVRecorder(cache, LAYERS, "compute_device", 2)
    passes = capture.PassCache()
    inputs = {10: torch.randn(1, 6, 4), 20: torch.randn(1, 6, 4)}
    for t, x in inputs.items():
        recorder.begin_step(t)
        passes.run(("toy", recorder.signature()), toy_pass(recorder), (x,), recorder, (), "eager")
    recorder.finish()
    plain_cache = cache_with_steps(())
    plain = KVRecorder(plain_cache, LAYERS, "compute_device", 2)
    for t, x in inputs.items():
        plain.begin_step(t)
        toy_pass(plain)((x,))
    assert_same_cache(plain_cache, cache)
    first = cache.kv[10][0][0]
    assert first.data_ptr() != next(iter(passes.entries.values())).slots.buffers[("record k", 0)].data_ptr(), \
        "the cache holds copies, not the slots the next pass overwrites"


def test_signatures_say_what_a_step_decides():
    cache = cache_with_steps()
    injector = KVInjector(cache, LAYERS[:1], {10})
    injector.begin_step(10)
    on = injector.signature()
    injector.begin_step(20)
    assert on != injector.signature() == ("KVInjector", ())
    mutual = MutualSelfAttention(LAYERS, {10})
    mutual.begin_step(10)
    assert mutual.signature() == ("MutualSelfAttention", (0, 1))
    assert KVRecorder(cache, LAYERS, "auto", 2).signature() == ("KVRecorder", (0, 1))
    assert AttentionControl().signature() == ("AttentionControl",)


def test_changed_weights_drop_the_entry_and_the_capacity_holds():
    passes = capture.PassCache(capacity=2)
    control = AttentionControl()
    fn = toy_pass(control)
    x = torch.randn(1, 6, 4)
    passes.run("a", fn, (x,), control, ("w", 1), "eager")
    first = passes.entries["a"]
    passes.run("a", fn, (x,), control, ("w", 1), "eager")
    assert passes.entries["a"] is first and passes.replays == 1
    passes.run("a", fn, (x,), control, ("w", 2), "eager")
    assert passes.entries["a"] is not first, "new weights: a new entry"
    passes.run("b", fn, (x,), control, (), "eager")
    passes.run("c", fn, (x,), control, (), "eager")
    assert list(passes.entries) == ["b", "c"], "least recently used dropped first"


def test_inputs_are_copied_into_the_static_buffers():
    passes = capture.PassCache()
    control = AttentionControl()
    seen = []

    def fn(tree):
        seen.append(tree["x"].data_ptr())
        return tree["x"] * tree["scale"]

    out1 = passes.run("k", fn, {"x": torch.ones(3), "scale": 2.0}, control, (), "eager")
    out2 = passes.run("k", fn, {"x": torch.full((3,), 5.0), "scale": 2.0}, control, (), "eager")
    assert seen[0] == seen[1], "the same buffer each call"
    assert torch.equal(out1, torch.full((3,), 2.0)) and torch.equal(out2, torch.full((3,), 10.0))


def test_slots_are_reused_at_the_same_address():
    slots = KVSlots()
    like = torch.zeros(1, 6, 4)
    a, made = slots.get("k", 0, like)
    b, again = slots.get("k", 0, like + 1)
    assert made and not again and a.data_ptr() == b.data_ptr()
    c, remade = slots.get("k", 0, torch.zeros(1, 6, 4, dtype=torch.float16))
    assert remade and c.dtype == torch.float16


def test_the_arena_hands_out_aligned_tensors_until_full():
    arena = PinnedArena(1024, pin=False)
    a = arena.take(torch.Size([3, 5]), torch.float16)
    b = arena.take(torch.Size([10]), torch.float32)
    assert a.shape == (3, 5) and b.dtype == torch.float32
    assert (b.data_ptr() - arena.buffer.data_ptr()) % PinnedArena.ALIGN == 0
    a.fill_(1)
    b.fill_(2)
    assert a.sum() == 15 and b.sum() == 20, "the tensors do not overlap"
    assert arena.take(torch.Size([1024]), torch.float32) is None


def test_the_mode_setting(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.delenv(capture.ENV_VAR, raising=False)
    assert capture.capture_mode(cpu) == "off" and capture.capture_mode(cuda) == "graph"
    monkeypatch.setenv(capture.ENV_VAR, "graph")
    assert capture.capture_mode(cpu) == "eager", "graphs only ever on CUDA"
    monkeypatch.setenv(capture.ENV_VAR, "off")
    assert capture.capture_mode(cuda) == "off"
    monkeypatch.setenv(capture.ENV_VAR, "sometimes")
    assert capture.capture_mode(cuda) == "graph", "an unknown value means auto"


def differentiable_pass(tree):
    """A stand-in feature pass: ``(output, features)`` of ``x`` with ``x`` used several times, like a UNet."""
    x, w = tree
    features = torch.tanh(x @ w)
    return x * 0.5 - features @ w.T, features


def test_a_differentiable_pass_backpropagates_like_the_plain_one():
    passes = capture.PassCache()
    control = AttentionControl()
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    grads = []
    for seed in (1, 2):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))
        plain_x, static_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out, feats = differentiable_pass((plain_x, w))
        (out.square().sum() + feats.sum()).backward()
        s_out, s_feats = passes.run_differentiable("k", differentiable_pass, (static_x, w), control, (), "eager")
        assert torch.equal(s_out, out) and torch.equal(s_feats, feats)
        (s_out.square().sum() + s_feats.sum()).backward()
        assert torch.allclose(static_x.grad, plain_x.grad, rtol=1e-6, atol=1e-7)
        grads.append(static_x.grad)
    assert len(passes.entries) == 1 and passes.replays == 1 and not torch.equal(grads[0], grads[1])


def test_a_differentiable_pass_refuses_a_stale_backward():
    passes = capture.PassCache()
    control = AttentionControl()
    w = torch.randn(4, 3)
    first = passes.run_differentiable("k", differentiable_pass, (torch.randn(5, 4, requires_grad=True), w), control, (), "eager")
    passes.run_differentiable("k", differentiable_pass, (torch.randn(5, 4, requires_grad=True), w), control, (), "eager")
    with pytest.raises(RuntimeError, match="after a later pass"):
        first[1].sum().backward()


def test_the_benchmark_counts_replayed_passes():
    from benchmarks.measure import PassCounter

    counter = PassCounter(torch.nn.Linear(2, 2))
    for observer in list(capture.REPLAY_OBSERVERS):
        observer(torch.zeros(3, 2), True)
    assert counter.counts == {"unet_passes": 1, "unet_rows": 3, "unet_passes_with_grad": 1, "unet_rows_with_grad": 3}
    counter.close()
    assert not capture.REPLAY_OBSERVERS


def test_a_differentiable_pass_gives_gradients_to_parameters_it_reads_in_place():
    passes = capture.PassCache()
    weight = torch.nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)))

    def adapted(tree):
        (x,) = tree
        return ((x @ weight.T).tanh(),)

    for seed in (2, 3):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))
        weight.grad = None
        (x @ weight.T).tanh().sum().backward()
        plain = weight.grad.clone()
        weight.grad = None
        (out,) = passes.run_differentiable("k", adapted, (x,), AttentionControl(), (), "eager", params=(weight,))
        out.sum().backward()
        assert torch.equal(weight.grad, plain)
    assert passes.replays == 1
