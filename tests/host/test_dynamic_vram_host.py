"""Which path each node takes for a Dynamic VRAM MODEL, and how the pack asks the host about memory (issue 21).

ComfyUI 0.33.0 streams a ``ModelPatcherDynamic``'s weights through a buffer
its prefetch reuses (``comfy/ops.py cast_modules_with_vbar``). With ``--cpu``
it never makes one, so :func:`dynamic_model` builds one the way the host's
loader does when comfy-aimdo is up: ``main.py`` sets
``comfy.model_patcher.CoreModelPatcher = ModelPatcherDynamic`` and
``comfy.sd.load_checkpoint_guess_config`` makes the patcher for a CUDA load
device (and records ``cached_patcher_init`` for the non-dynamic delegate).
Only comfy-aimdo's host buffers, which need its CUDA library, are stood in.
Nothing runs on that patcher's device: the tests stop each node where it
hands a patcher to the host (the guider, the model manager) and look at which
patcher that is. Decisions that do not need a dynamic patcher (memory, the
training flag, the autograd-safe weights) run on both hosts (0.3.64 has no
Dynamic VRAM, and every patcher is non-dynamic there).

Whether the host has Dynamic VRAM is decided by its version
(``tools.comfy_vram.DYNAMIC_VRAM_SINCE``): the tests of the dynamic patcher skip below it,
and a host at or above it without ``ModelPatcherDynamic`` fails them, so a
host that renamed it cannot pass quietly. ``DRAGKIT_EXPECT_AIMDO`` names the
comfy-aimdo version these tests must have imported
(``tests/host/test_aimdo_versions_host.py`` runs them again with 0.5.5).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch

from dragrun.comfy_host import comfyui_version
from tools.comfy_vram import NO_DYNAMIC_VRAM, version_has_dynamic_vram

pytestmark = pytest.mark.host


def host_has_dynamic_vram() -> bool:
    """Whether the host under test has Dynamic VRAM by its version (``comfyui_version.py``; 0.33 and later)."""
    version = comfyui_version()
    assert version, "the host under test has no comfyui_version.py"
    return version_has_dynamic_vram(version)

POSITIVE = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)), {}]]


class _HandedToHost(Exception):
    """Raised by a spy where a node hands a patcher to the host, to stop before any device work."""


class _NoHostBuffer:
    """Stands in for ``comfy_aimdo.host_buffer.HostBuffer`` (its native library needs CUDA); the patcher only stores it."""

    def __init__(self, *args, **kwargs) -> None:
        pass


@pytest.fixture(scope="module")
def caps(comfy_inproc):
    return importlib.import_module(comfy_inproc.module_name + ".nodes.host_caps")


@pytest.fixture(scope="module")
def dynamic_model(comfy_inproc, tiny_checkpoint):
    """A ``ModelPatcherDynamic`` of the tiny checkpoint for ``cuda:0``, made by ComfyUI 0.33.0's own loader."""
    import comfy.model_patcher as mp

    if not host_has_dynamic_vram():
        pytest.skip(NO_DYNAMIC_VRAM)
    assert hasattr(mp, "ModelPatcherDynamic"), \
        f"ComfyUI {comfyui_version()} should have Dynamic VRAM but has no comfy.model_patcher.ModelPatcherDynamic"
    import comfy.sd
    import comfy_aimdo.host_buffer

    patch = pytest.MonkeyPatch()
    patch.setattr(comfy_aimdo.host_buffer, "HostBuffer", _NoHostBuffer)
    patch.setattr(mp, "CoreModelPatcher", mp.ModelPatcherDynamic)  # what main.py does when comfy-aimdo initialised
    try:
        with torch.inference_mode():
            model = comfy.sd.load_checkpoint_guess_config(
                str(tiny_checkpoint), output_vae=False, output_clip=False,
                model_options={"load_device": torch.device("cuda", 0)},
            )[0]
    finally:
        patch.setattr(mp, "CoreModelPatcher", mp.ModelPatcher)
    assert type(model) is mp.ModelPatcherDynamic and model.cached_patcher_init is not None
    yield model
    model.model.dynamic_patchers.clear()  # the patchers' __del__ then leaves comfy-aimdo alone
    patch.undo()


@pytest.fixture
def guider_spy(monkeypatch):
    """Every patcher a node hands to ``comfy.samplers.CFGGuider``; the node stops there."""
    import comfy.samplers

    seen = []

    def spy(self, model_patcher, *args, **kwargs):
        seen.append(model_patcher)
        raise _HandedToHost

    monkeypatch.setattr(comfy.samplers.CFGGuider, "__init__", spy)
    return seen


@pytest.fixture(scope="module")
def inverted(comfy_inproc, tiny_comfy_models):
    """A real DDIM Invert on the (non-dynamic) tiny MODEL: the latent and attention cache the later nodes take."""
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 3}
    return comfy_inproc.run_node("DragKitDDIMInvert", model=tiny_comfy_models.model, latent=latent, positive=POSITIVE,
                                 steps=10, strength=0.7, cache_layers="decoder", cache_device="auto")


def _recorded_by(comfy_inproc, cache, model):
    """``cache`` as if DDIM Invert had recorded it with ``model`` (which cannot run here: its device is CUDA)."""
    import dataclasses

    return dataclasses.replace(cache, model_key=comfy_inproc.pack.nodes.comfy_backend.ComfyBackend(model).model_key)


def _points(comfy_inproc):
    return comfy_inproc.pack.dragkit.points.parse_drag_points('{"points": [[16, 24], [48, 24]]}', 64, 64)


# -- the host's dynamic patcher -----------------------------------------------------------------------


def test_the_host_caps_see_a_dynamic_patcher_and_give_its_non_dynamic_delegate(caps, dynamic_model):
    assert caps.is_dynamic(dynamic_model) and caps.is_dynamic(dynamic_model.clone())
    assert not caps.dynamic_vram_enabled() and not caps.host_graphs_enabled(), "--cpu: comfy-aimdo is not initialised"
    patched = dynamic_model.clone()
    patched.set_model_attn1_replace(lambda q, k, v, extra_options: q, "output", 3, 0)
    delegate = caps.autograd_patcher(patched)
    assert type(delegate).__name__ == "ModelPatcher" and not caps.is_dynamic(delegate)
    assert delegate.model is not dynamic_model.model, "the delegate has weights of its own, which the prefetch never reuses"
    assert delegate.load_device == dynamic_model.load_device
    assert repr(delegate.model_options) == repr(patched.model_options), "the delegate keeps the MODEL's patches"
    assert caps.autograd_patcher(patched).model is delegate.model, "the host keeps the delegate's model for the next run"


def test_a_dynamic_patcher_the_host_cannot_copy_fails_loudly(caps, dynamic_model):
    orphan = dynamic_model.clone()
    orphan.cached_patcher_init = None  # e.g. a MODEL from a loader that does not record how to reload it
    with pytest.raises(caps.HostCapabilityError, match=r"could not make the non-dynamic copy .*--disable-dynamic-vram"):
        caps.autograd_patcher(orphan)


def test_autograd_is_never_prepared_on_a_dynamic_patcher(comfy_inproc, caps, dynamic_model):
    autograd = importlib.import_module(comfy_inproc.module_name + ".nodes.comfy_autograd")
    with pytest.raises(caps.HostCapabilityError, match="non-dynamic delegate"):
        autograd.prepare_for_backward(dynamic_model, lambda h, w: None, (1, 4, 8, 8))


@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_captured_passes_are_refused_for_a_dynamic_patcher(comfy_inproc, caps, dynamic_model, monkeypatch, mode):
    """The host's own ModelPatcherDynamic (not a stand-in): no UNet wrapper is installed, whatever capture mode is asked;
    its non-dynamic delegate (same load device, same host state) gets one."""
    capture = importlib.import_module(comfy_inproc.module_name + ".nodes.comfy_capture")
    attention = importlib.import_module(comfy_inproc.module_name + ".dragkit.attention")
    monkeypatch.setenv("DRAGKIT_CAPTURE", mode)
    clone = dynamic_model.clone()
    assert clone.is_dynamic()
    capture.install(clone, attention.AttentionControl())
    assert "model_function_wrapper" not in clone.model_options
    delegate = caps.autograd_patcher(dynamic_model).clone()
    assert not delegate.is_dynamic() and delegate.load_device == clone.load_device
    capture.install(delegate, attention.AttentionControl())
    assert "model_function_wrapper" in delegate.model_options, "the same check sees a wrapper when one is installed"


def test_ddim_invert_streams_through_the_dynamic_patcher(comfy_inproc, caps, dynamic_model, guider_spy):
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with pytest.raises(_HandedToHost):
        comfy_inproc.run_node("DragKitDDIMInvert", model=dynamic_model, latent=latent, positive=POSITIVE,
                              steps=10, strength=0.7, cache_layers="decoder", cache_device="auto")
    (patcher,) = guider_spy
    assert caps.is_dynamic(patcher) and patcher.model is dynamic_model.model


@pytest.mark.parametrize("kv_source", ["inversion cache", "reference branch"])
def test_kv_injected_sample_streams_through_the_dynamic_patcher(comfy_inproc, caps, dynamic_model, inverted,
                                                               guider_spy, kv_source):
    z_t, cache = inverted
    with pytest.raises(_HandedToHost):
        comfy_inproc.run_node("DragKitKVInjectedSample", model=dynamic_model, latent=z_t,
                              attn_cache=_recorded_by(comfy_inproc, cache, dynamic_model),
                              positive=POSITIVE, kv_source=kv_source, inject_layers="masactrl", inject_start=0.0,
                              inject_end=1.0)
    (patcher,) = guider_spy
    assert caps.is_dynamic(patcher) and patcher.model is dynamic_model.model


@pytest.mark.parametrize("mode, options", [
    ("dragdiffusion", {}),
    ("gooddrag", {"drag_steps": 2, "drags_per_step": 2, "grad_steps": 1, "beta": 4.0, "max_unchanged": 0}),
], ids=["dragdiffusion", "gooddrag"])
def test_motion_supervision_runs_on_the_non_dynamic_delegate(comfy_inproc, caps, dynamic_model, inverted, guider_spy,
                                                             mode, options):
    z_t, cache = inverted
    node = comfy_inproc.pack.nodes.optimize.MotionSupervisionOptimize()
    with pytest.raises(_HandedToHost), torch.inference_mode():
        node.optimize(dynamic_model, z_t, _recorded_by(comfy_inproc, cache, dynamic_model), POSITIVE,
                      _points(comfy_inproc), mode, 2, -1, -1, -1, -1, **options)
    patcher = guider_spy[0]
    assert not caps.is_dynamic(patcher)
    assert patcher.model is caps.autograd_patcher(dynamic_model).model
    assert patcher.get_model_object("model_sampling") is not None


def test_lora_finetune_trains_and_fingerprints_the_non_dynamic_delegate(comfy_inproc, caps, dynamic_model,
                                                                        tiny_comfy_models, monkeypatch):
    import comfy.model_management as mm

    loaded = []

    def spy(models, *args, **kwargs):
        loaded.extend(models)
        raise _HandedToHost

    monkeypatch.setattr(mm, "load_models_gpu", spy)
    lora = importlib.import_module(comfy_inproc.module_name + ".nodes.lora")
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    with pytest.raises(_HandedToHost), torch.inference_mode():
        lora.LoRAFineTune().finetune(model=dynamic_model, vae=tiny_comfy_models.vae, image=image, positive=POSITIVE,
                                     steps=2, rank=4, alpha=4.0, lr=1e-3, batch=1, seed=0, save_name="", use_cache=False)
    (patcher,) = loaded
    delegate_model = caps.autograd_patcher(dynamic_model).model
    assert not caps.is_dynamic(patcher) and patcher.model is delegate_model
    config = comfy_inproc.pack.dragkit.lora.LoRATrainingConfig(steps=2, rank=4, alpha=4.0, lr=1e-3, batch=1, seed=0)
    trainer = comfy_inproc.pack.nodes.comfy_lora.ComfyLoRATrainer(dynamic_model, POSITIVE, config)
    assert not caps.is_dynamic(trainer.model) and trainer.model.model is delegate_model


# -- a host that changed what the pack relies on ----------------------------------------------------------


def test_the_host_has_dynamic_vram_exactly_from_its_first_version(comfy_inproc):
    """Below 0.33 no ``ModelPatcherDynamic``; from 0.33 on it must be there (a renamed one fails here, not quietly)."""
    import comfy.model_patcher as mp

    assert hasattr(mp, "ModelPatcherDynamic") == host_has_dynamic_vram(), comfyui_version()


def test_the_comfy_aimdo_the_tests_imported(comfy_inproc):
    """The host's pinned comfy-aimdo, or the one ``DRAGKIT_EXPECT_AIMDO`` names (0.5.5, put first on the path)."""
    if not host_has_dynamic_vram():
        pytest.skip(NO_DYNAMIC_VRAM)
    import importlib.metadata

    import comfy_aimdo.control

    from tools.comfy_vram import aimdo_version

    expected = os.environ.get("DRAGKIT_EXPECT_AIMDO") or importlib.metadata.version("comfy-aimdo")
    assert aimdo_version() == expected, comfy_aimdo.control.__file__


def test_a_patcher_without_is_dynamic_is_an_error_only_where_the_host_has_dynamic_vram(caps, tiny_comfy_models):
    class ForeignPatcher:
        load_device = torch.device("cpu")

    if host_has_dynamic_vram():
        with pytest.raises(caps.HostCapabilityError, match=r"ModelPatcher.is_dynamic\(\) on ForeignPatcher"):
            caps.is_dynamic(ForeignPatcher())
    else:
        assert caps.is_dynamic(ForeignPatcher()) is False
    assert caps.is_dynamic(tiny_comfy_models.model) is False
    assert caps.autograd_patcher(tiny_comfy_models.model) is tiny_comfy_models.model


def test_renamed_host_switches_fail_loudly(caps, monkeypatch):
    import comfy.model_management as mm

    if not host_has_dynamic_vram():
        assert not caps.dynamic_vram_enabled() and not caps.host_graphs_enabled()
        return
    memory_management = importlib.import_module("comfy.memory_management")
    monkeypatch.setattr(memory_management, "aimdo_enabled", True)
    monkeypatch.setattr(mm.args, "disable_cuda_graphs", False)
    assert caps.dynamic_vram_enabled() and caps.host_graphs_enabled()
    monkeypatch.setattr(mm.args, "disable_cuda_graphs", True)
    assert caps.dynamic_vram_enabled() and not caps.host_graphs_enabled()
    monkeypatch.delattr(mm.args, "disable_cuda_graphs")
    with pytest.raises(caps.HostCapabilityError, match="disable-cuda-graphs"):
        caps.host_graphs_enabled()
    monkeypatch.delattr(memory_management, "aimdo_enabled")
    with pytest.raises(caps.HostCapabilityError, match=r"comfy\.memory_management\.aimdo_enabled"):
        caps.dynamic_vram_enabled()
    monkeypatch.delattr(mm, "in_training")
    with pytest.raises(caps.HostCapabilityError, match="in_training"), caps.training_mode():
        pass


# -- both hosts: memory, the training flag, autograd-safe weights ----------------------------------------


@pytest.fixture
def on_gpu(tiny_comfy_models, monkeypatch):
    """A clone of the tiny MODEL that says it loads on ``cuda:0``, with the host's free-memory query faked:
    set ``free["torch"]`` (what ``get_free_memory`` reports) and ``free["aimdo"]`` (comfy-aimdo's budget)."""
    import comfy.model_management as mm

    free = {"torch": 0, "aimdo": None}
    patcher = tiny_comfy_models.model.clone()
    patcher.load_device = torch.device("cuda", 0)
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: free["torch"])
    memory_management = importlib.util.find_spec("comfy.memory_management")
    if memory_management is not None:
        import comfy.memory_management
        import comfy_aimdo.model_vbar

        monkeypatch.setattr(comfy.memory_management, "aimdo_enabled", True)
        monkeypatch.setattr(comfy_aimdo.model_vbar, "vbars_analyze", lambda device=None: free["aimdo"])
        free["aimdo"] = 0
    return patcher, free


def test_free_memory_is_asked_the_way_the_host_accounts_it(caps, on_gpu):
    patcher, free = on_gpu
    free["torch"] = 3 * 2**30
    if free["aimdo"] is None:  # ComfyUI 0.3.64: torch's free memory is all there is
        assert caps.free_memory_for(patcher, patcher.load_device) == 3 * 2**30
    else:  # ComfyUI 0.33.0: ModelPatcher.get_free_memory adds what comfy-aimdo can evict
        free["aimdo"] = 5 * 2**30
        assert caps.free_memory_for(patcher, patcher.load_device) == 8 * 2**30


def test_room_for_backward_counts_the_dynamic_budget_and_keeps_the_models_in_use(comfy_inproc, tiny_comfy_models, on_gpu,
                                                                                monkeypatch):
    import comfy.model_management as mm

    patcher, free = on_gpu
    autograd = importlib.import_module(comfy_inproc.module_name + ".nodes.comfy_autograd")
    mm.load_models_gpu([tiny_comfy_models.model])
    in_use = [loaded for loaded in mm.current_loaded_models if loaded.currently_used]
    assert in_use, "the host marks the models a run loaded as currently_used"
    calls = []
    monkeypatch.setattr(mm, "free_memory", lambda need, device, keep_loaded=(), **options: calls.append(
        (need, device, keep_loaded, options)))
    need = 2**30
    free["torch"] = need // 2
    if free["aimdo"] is not None:
        free["aimdo"] = 2 * need  # enough once comfy-aimdo's budget counts: nothing is offloaded
        autograd.reserve(patcher, need)
        assert calls == []
        free["aimdo"] = 0
    autograd.reserve(patcher, need)
    ((asked, device, keep, options),) = calls
    assert asked >= need and device == torch.device("cuda", 0) and keep == in_use
    assert options == ({} if free["aimdo"] is None else {"for_dynamic": False})
    calls.clear()
    cpu = patcher.clone()
    cpu.load_device = torch.device("cpu")
    autograd.reserve(cpu, need)
    assert calls == [], "nothing to offload on a CPU"


def test_only_weights_on_the_compute_device_are_made_autograd_safe(comfy_inproc):
    autograd = importlib.import_module(comfy_inproc.module_name + ".nodes.comfy_autograd")
    with torch.inference_mode():
        module = torch.nn.Linear(4, 3)
    assert module.weight.is_inference()
    assert autograd.make_weights_autograd_safe(module, torch.device("cuda", 0)) == 0, \
        "offloaded weights (cast per forward, maybe pinned by the host) are left as they are"
    assert module.weight.is_inference()
    assert autograd.make_weights_autograd_safe(module, "cpu") == (12 + 3) * 4
    assert not module.weight.is_inference() and not module.bias.is_inference()
    assert autograd.make_weights_autograd_safe(module, "cpu") == 0


def test_gradient_passes_run_in_the_host_training_mode(comfy_inproc, tiny_comfy_models, inverted, monkeypatch):
    """Motion supervision and LoRA steps run with ``comfy.model_management.in_training`` set (0.33.0; absent on 0.3.64)
    and leave it as it was."""
    import comfy.model_management as mm

    backend = importlib.import_module(comfy_inproc.module_name + ".nodes.comfy_backend")
    comfy_lora = importlib.import_module(comfy_inproc.module_name + ".nodes.comfy_lora")
    flags = []

    def recording(real):
        def wrapper(*args, **kwargs):
            flags.append(getattr(mm, "in_training", None))
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(backend, "prepare_for_backward", recording(backend.prepare_for_backward))
    monkeypatch.setattr(comfy_lora, "train_lora", recording(comfy_lora.train_lora))
    z_t, cache = inverted
    node = comfy_inproc.pack.nodes.optimize.MotionSupervisionOptimize()
    with torch.inference_mode():
        node.optimize(tiny_comfy_models.model, z_t, cache, POSITIVE, _points(comfy_inproc), "dragdiffusion", 1,
                      -1, -1, -1, -1)
    config = comfy_inproc.pack.dragkit.lora.LoRATrainingConfig(steps=1, rank=2, alpha=2.0, lr=1e-3, batch=1, seed=0)
    trainer = comfy_lora.ComfyLoRATrainer(tiny_comfy_models.model, POSITIVE, config)
    try:
        with torch.inference_mode():
            trainer.train(torch.zeros(1, 4, 8, 8))
    finally:
        trainer.close()
    expected = True if hasattr(mm, "in_training") else None
    assert flags == [expected, expected]
    assert getattr(mm, "in_training", False) is False
