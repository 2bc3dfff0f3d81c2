"""Captured UNet passes (:mod:`dragkit.capture`) on the CPU: the static-buffer path in its eager stand-in for replay.

On the engine's diffusers backend over the micro UNet, ``DRAGKIT_CAPTURE=eager``
and ``trace`` must give bit for bit what the plain path gives for inversion
(trajectory and attention cache), KV-injected sampling with and without CFG,
and the reference branch, while every step after a key's first replays; in
``trace`` every replay also reads what its capture read. Then the pieces:
the controls' signatures and slots, the cache's keys, weights check and
capacity, the pinned arena, the mode setting, the first-replay check (NaN,
output count), per-key refusal and the process-wide switch, the thrash
guard, tensor-subclass weights, autocast in the key, and a value missing
from the key, which ``trace`` catches and ``eager`` cannot.
"""

import math


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


STATIC_MODES = ["eager", "trace"]


@pytest.mark.parametrize("mode", STATIC_MODES)
def test_inversion_equals_the_plain_path(monkeypatch, fresh, mode):
    plain = in_mode(monkeypatch, "off", lambda: invert(fresh))
    assert fresh.passes.replays == 0 and not fresh.passes.entries
    static = in_mode(monkeypatch, mode, lambda: invert(fresh))
    assert_same_cache(plain, static)
    assert len(fresh.passes.entries) == 1 and fresh.passes.replays == len(plain.kv) - 1


@pytest.mark.parametrize("mode", STATIC_MODES)
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_kv_injected_sampling_equals_the_plain_path(monkeypatch, fresh, cfg, mode):
    cache = in_mode(monkeypatch, "off", lambda: invert(fresh))
    edited = cache.z_star + 0.1 * torch.randn(cache.z_star.shape, generator=torch.Generator().manual_seed(5))
    layers = select_layers(fresh.self_attention_layers(), "decoder")

    def sample():
        return kv_sample(fresh, edited, conditioning(cfg), cache, cache.schedule.start_index, layers, 0.0, 0.6)

    plain = in_mode(monkeypatch, "off", sample)
    static = in_mode(monkeypatch, mode, sample)
    assert torch.equal(plain, static)
    signatures = sorted(str(key[0]) for key in fresh.passes.entries)
    assert len(signatures) == 2 and "()" in signatures[0], "injecting and non-injecting steps are separate keys"
    assert torch.equal(in_mode(monkeypatch, mode, sample), plain), "a re-edit replays the same entries"


@pytest.mark.parametrize("mode", STATIC_MODES)
def test_reference_branch_equals_the_plain_path(monkeypatch, fresh, mode):
    cache = in_mode(monkeypatch, "off", lambda: invert(fresh))
    index = cache.schedule.start_index + 1
    edited = cache.trajectory[cache.schedule.timesteps[index]] + 0.05
    layers = select_layers(fresh.self_attention_layers(), "masactrl")

    def sample():
        return kv_sample(fresh, edited, conditioning(), cache, index, layers, kv_source="reference branch")

    assert torch.equal(in_mode(monkeypatch, "off", sample), in_mode(monkeypatch, mode, sample))


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


@pytest.mark.parametrize("mode", STATIC_MODES)
def test_the_injector_fills_its_slots_for_each_step(mode):
    cache = cache_with_steps()
    injector = KVInjector(cache, LAYERS, {10, 20})
    passes = capture.PassCache()
    x = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(1))
    results = {}
    for t in (10, 20, 10):
        injector.begin_step(t)
        results.setdefault(t, []).append(passes.run(("toy", injector.signature()), toy_pass(injector), (x,), injector, (), mode))
        assert torch.equal(results[t][-1], toy_pass(injector)((x,))), f"step {t}: as the unbound (plain) injector"
    assert not torch.equal(results[10][0], results[20][0])
    assert passes.replays == 2 and len(passes.entries) == 1
    (entry,) = passes.entries.values()
    assert set(entry.slots.buffers) == {("inject k", 0), ("inject v", 0), ("inject k", 1), ("inject v", 1)}


@pytest.mark.parametrize("mode", STATIC_MODES)
def test_the_recorder_drains_its_slots_after_each_pass(mode):
    cache = cache_with_steps(())
    recorder = KVRecorder(cache, LAYERS, "compute_device", 2)
    passes = capture.PassCache()
    inputs = {10: torch.randn(1, 6, 4), 20: torch.randn(1, 6, 4)}
    for t, x in inputs.items():
        recorder.begin_step(t)
        passes.run(("toy", recorder.signature()), toy_pass(recorder), (x,), recorder, (), mode)
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
    monkeypatch.setattr(capture, "_graphs_disabled", set())
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.delenv(capture.ENV_VAR, raising=False)
    assert capture.capture_mode(cpu) == "off" and capture.capture_mode(cuda) == "off", "off until a GPU run proves it"
    for value in ("graph", "on", " On "):
        monkeypatch.setenv(capture.ENV_VAR, value)
        assert capture.capture_mode(cuda) == "graph" and capture.capture_mode(cpu) == "eager", "graphs only on CUDA"
    for value in ("eager", "trace", "off"):
        monkeypatch.setenv(capture.ENV_VAR, value)
        assert capture.capture_mode(cuda) == capture.capture_mode(cpu) == value
    monkeypatch.setenv(capture.ENV_VAR, "sometimes")
    assert capture.capture_mode(cuda) == "off", "an unknown value means auto"
    monkeypatch.setenv(capture.ENV_VAR, "graph")
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert capture.capture_mode(cuda) == "off", "ROCm: no graphs"
    monkeypatch.setattr(torch.version, "hip", None)
    capture._graphs_disabled.add(0)
    assert capture.capture_mode(cuda) == "off", "graphs switched off for the process: plain passes, not the static path"


def test_the_first_replay_check_refuses_nan_and_other_output_counts():
    eager = (torch.ones(3), torch.zeros(2))
    assert capture.difference(eager, eager) == 0.0
    assert capture.difference((torch.ones(3), torch.full((2,), 1e-4)), eager) == pytest.approx(1e-4)
    assert capture.difference((torch.full((3,), math.nan), torch.zeros(2)), eager) == math.inf, "an all-NaN replay"
    assert capture.difference((torch.ones(3), torch.tensor([0.0, math.nan])), eager) == math.inf
    assert capture.difference(eager, (torch.ones(3), torch.tensor([math.inf, 0.0]))) == math.inf, "non-finite eager"
    assert capture.difference(eager[:1], eager) == math.inf, "a replay with fewer outputs"
    assert capture.difference((torch.ones(3), torch.zeros(3)), eager) == math.inf, "another shape"


def new_entry(passes, key, x):
    return passes._new(key, capture._Call.of((x,)), (), requires_grad=False)


def doubled(tree):
    return tree[0] * 2


@pytest.mark.parametrize("failure", [FloatingPointError("gradients not finite"), torch.cuda.OutOfMemoryError("oom"),
                                     capture._Refused("no check")])
def test_a_capture_that_cannot_be_checked_refuses_only_its_key(monkeypatch, failure):
    monkeypatch.setattr(capture, "_graphs_disabled", set())
    monkeypatch.setenv(capture.ENV_VAR, "graph")
    passes = capture.PassCache()
    x = torch.ones(3)
    entry = new_entry(passes, "k", x)
    passes.run("other", doubled, (x,), AttentionControl(), (), "eager")

    def capture_fails():
        raise failure

    passes._checked("k", capture_fails, entry)
    assert passes.rejected == 1 and "k" in passes.refused and "k" not in passes.entries
    assert not capture._graphs_disabled and capture.capture_mode(torch.device("cuda")) == "graph", "graphs stay on"
    assert torch.equal(passes.run("k", doubled, (x + 1,), AttentionControl(), (), "eager"), (x + 1) * 2)
    assert "k" not in passes.entries and passes.replays == 0, "the refused key runs plainly, not on static buffers"
    assert "other" in passes.entries, "other keys are untouched"


def test_a_first_replay_with_nan_refuses_its_key():
    passes = capture.PassCache()
    x = torch.ones(3)
    entry = new_entry(passes, "k", x)
    passes._checked("k", lambda: (capture.difference(torch.full((3,), math.nan), x), {"graph": "g"}), entry)
    assert entry.graph is None and "k" in passes.refused and passes.captures == 0


def test_any_other_capture_failure_switches_graphs_off_for_the_process(monkeypatch):
    monkeypatch.setattr(capture, "_graphs_disabled", set())
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setenv(capture.ENV_VAR, "graph")
    passes = capture.PassCache()
    passes.run("earlier", doubled, (torch.ones(3),), AttentionControl(), (), "eager")
    entry = new_entry(passes, "k", torch.ones(3))

    def capture_fails():
        raise RuntimeError("operation not permitted when stream is capturing")

    passes._checked("k", capture_fails, entry)
    assert capture._graphs_disabled and capture.capture_mode(torch.device("cuda")) == "off"
    assert "k" in passes.refused and not passes.entries, "the key refused, the cache's other passes dropped"


def test_the_thrash_guard_stops_new_keys_of_a_group(monkeypatch):
    passes = capture.PassCache(capacity=2, group=lambda key: key[0])
    control = AttentionControl()
    x = torch.ones(3)
    for round_ in range(capture.THRASH_LIMIT + 1):
        for key in (("model", 1), ("model", 2), ("model", 3)):
            assert torch.equal(passes.run(key, doubled, (x,), control, (), "eager"), x * 2)
    assert passes.counts()["thrashing"] == 1
    captured = len(passes.entries)
    passes.run(("model", 4), doubled, (x,), control, (), "eager")
    assert ("model", 4) not in passes.entries and len(passes.entries) == captured, "a new key of that model runs plainly"
    replays = passes.replays
    kept = next(iter(passes.entries))
    passes.run(kept, doubled, (x,), control, (), "eager")
    assert passes.replays == replays + 1, "its captured keys still replay"
    passes.run(("other model", 1), doubled, (x,), control, (), "eager")
    assert ("other model", 1) in passes.entries, "another model is not affected"


class Quantised(torch.Tensor):
    """A stand-in for another pack's quantised weight type (a tensor subclass)."""


def test_tensor_subclass_weights_run_plainly():
    module = torch.nn.Linear(3, 3)
    assert capture.storage_identity(module) is not None
    module.weight = torch.nn.Parameter(torch.randn(3, 3).as_subclass(Quantised), requires_grad=False)
    assert capture.storage_identity(module) is None
    passes = capture.PassCache()
    x = torch.ones(1, 3)
    out = passes.run("k", lambda tree: module(tree[0]), (x,), AttentionControl(), capture.storage_identity(module), "eager")
    assert torch.equal(out, module(x)) and not passes.entries, "plain, no static buffers"
    outputs = passes.run_differentiable("d", lambda tree: (module(tree[0]),), (x,), AttentionControl(), (), "eager",
                                        params=(torch.zeros(2).as_subclass(Quantised),))
    assert torch.equal(outputs[0], module(x)) and not passes.entries


def test_the_layout_holds_the_autocast_state():
    x = torch.ones(2)
    plain = capture.tensor_layout((x,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert capture.tensor_layout((x,)) != plain
    assert capture.tensor_layout((x,)) == plain


def test_releasing_a_group_drops_its_entries_and_pool():
    passes = capture.PassCache(group=lambda key: key[0])
    control = AttentionControl()
    for key in (("a", 1), ("a", 2), ("b", 1)):
        passes.run(key, doubled, (torch.ones(3),), control, (), "eager")
        passes.pools[(torch.device("cpu"), key[0])] = object()
    assert passes.release(lambda key: key[0] == "a") == 2
    assert list(passes.entries) == [("b", 1)] and list(passes.pools) == [(torch.device("cpu"), "b")]


@pytest.mark.parametrize("mode", STATIC_MODES)
def test_a_value_missing_from_the_key_is_caught_by_trace_only(mode):
    """A pass reads a per-step Python number that its key leaves out: a graph would replay the capture's value.
    ``eager`` re-runs the Python on every call and cannot see it; ``trace`` compares what each replay reads."""
    passes = capture.PassCache()
    control = AttentionControl()
    step = {"scale": 2.0}

    def scaled(tree):
        return tree[0] * step["scale"]

    x = torch.ones(3)
    assert torch.equal(passes.run("k", scaled, (x,), control, (), mode), x * 2)
    step["scale"] = 3.0
    if mode == "eager":
        assert torch.equal(passes.run("k", scaled, (x,), control, (), mode), x * 3), "eager hides the missing key part"
    else:
        with pytest.raises(capture.TraceMismatch, match="missing from the key"):
            passes.run("k", scaled, (x,), control, (), mode)


def test_trace_catches_a_tensor_made_outside_the_pass_each_step():
    passes = capture.PassCache()
    control = AttentionControl()
    step = {"t": torch.tensor([10.0])}
    x = torch.ones(3)

    def shifted(tree):
        return tree[0] + step["t"]

    passes.run("k", shifted, (x,), control, (), "trace")
    passes.run("k", shifted, (x + 1,), control, (), "trace")
    step["t"] = torch.tensor([20.0])
    with pytest.raises(capture.TraceMismatch):
        passes.run("k", shifted, (x,), control, (), "trace")


def test_trace_knows_static_buffers_slots_and_weights():
    cache = cache_with_steps()
    injector = KVInjector(cache, LAYERS, {10})
    passes = capture.PassCache()
    weight = torch.randn(4, 4)

    def fn(tree):
        return toy_pass(injector)(tree) @ weight

    injector.begin_step(10)
    passes.run("k", fn, (torch.randn(1, 6, 4),), injector, (weight.data_ptr(),), "trace")
    (entry,) = passes.entries.values()
    roles = {arg[0] for _, _, args in entry.trace for arg in args if isinstance(arg, tuple) and arg}
    assert {"static", "slot", "weight", "made"} <= roles and "external" not in roles


def differentiable_pass(tree):
    """A stand-in feature pass: ``(output, features)`` of ``x`` with ``x`` used several times, like a UNet."""
    x, w = tree
    features = torch.tanh(x @ w)
    return x * 0.5 - features @ w.T, features


@pytest.mark.parametrize("mode", STATIC_MODES)
def test_a_differentiable_pass_backpropagates_like_the_plain_one(mode):
    passes = capture.PassCache()
    control = AttentionControl()
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    grads = []
    for seed in (1, 2):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))
        plain_x, static_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out, feats = differentiable_pass((plain_x, w))
        (out.square().sum() + feats.sum()).backward()
        s_out, s_feats = passes.run_differentiable("k", differentiable_pass, (static_x, w), control, (), mode)
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


@pytest.mark.parametrize("mode", STATIC_MODES)
def test_a_differentiable_pass_gives_gradients_to_parameters_it_reads_in_place(mode):
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
        (out,) = passes.run_differentiable("k", adapted, (x,), AttentionControl(), (), mode, params=(weight,))
        out.sum().backward()
        assert torch.equal(weight.grad, plain)
    assert passes.replays == 1
