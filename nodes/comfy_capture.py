"""Captured UNet passes on a ComfyUI MODEL (:mod:`dragkit.capture` behind ComfyUI's UNet function wrapper).

:func:`install` sets a ``model_function_wrapper`` on the backend's private
clone of the MODEL. ComfyUI 0.3.64 calls it from ``calc_cond_batch`` with
``apply_model`` and that call's ``input``, ``timestep`` and ``c`` (prompt
embeddings, SDXL's ``y``, ControlNet residuals, ``transformer_options``).
ControlNet and the rest of the sampler stay eager; only ``apply_model`` (the
UNet and the model-sampling arithmetic around it) is captured.

The capture key holds what a replay bakes in: the UNet, the MODEL's patch
identity (``patches_uuid``), its model sampling (object-patched by e.g.
ModelSamplingDiscrete), the attention control's signature, every
input tensor's shape/dtype/device, grad, inference and autocast state, the
structure and plain values of ``c`` (which attention patches sit on which
blocks, ``cond_or_uncond``) and this pack's forward hooks on the UNet (the
LoRA adapters while training). The weights' identity (the storage address
of every parameter and buffer) is checked before each replay.

Capture is off unless ``DRAGKIT_CAPTURE`` turns it on (``graph``/``on``;
see ``docs/capture.md``). :func:`_mode` is the one place that decides by the
host's state (:func:`host_caps.capture_refusal`): a Dynamic VRAM patcher
(ComfyUI 0.33's ``ModelPatcherDynamic``, whose weights stream in during the
pass, under the host's own CUDA graphs), the host's model compiler (0.36's
comfy-aimdo malloc graphs: on for the device, or recording on this thread),
CUDA graphs switched off (``--disable-cuda-graphs``, or
``--disable-comfy-compiler``, which sets it), a pass inside the host's own
graph capture or ``torch.compile`` tracing all run plainly.
:func:`install` adds an ``ON_DETACH`` callback (:func:`release_on_unload`):
when ComfyUI unloads the model (``detach`` with ``unpatch_all``, e.g.
``model_unload`` to free memory) the model's captured passes and their graph
memory go at once, so ComfyUI's free-memory count is true again.

Motion supervision's feature passes (:func:`install_features`) and LoRA
steps (:func:`training_pass`) capture the forward and the backward (to the
latent; to the adapters' parameters), each run with a private
:class:`~dragkit.capture.PassCache` freed when it ends.

A pass runs plainly, with the reason logged once, when the capture cannot
honour it: gradients are needed outside those two; ComfyUI would cast a
partially loaded model's offloaded weights on its offload streams
(:func:`host_caps.stream_cast_refusal`; a fully loaded model casts nothing
there, so the default two streams of ComfyUI 0.33+ on NVIDIA refuse nothing
else); a model patch, wrapper, callback, weight wrapper or module forward hook this
pack did not make is present; the MODEL has weight hooks or object patches
other than the model sampling; the model sampling's buffers are not on the
UNet's device; a weight is a tensor subclass; the model is partially loaded
(lowvram); or there is too little free memory for a new capture.
"""

from __future__ import annotations

import uuid
import weakref

import comfy.model_management
import comfy.patcher_extension
import torch
from torch.utils import _pytree as pytree

from ..dragkit.attention import AttentionControl
from ..dragkit.capture import (
    PassCache,
    capture_mode,
    empty_device_cache,
    free_for_capture,
    log_once,
    storage_identity,
    tensor_layout,
)
from .host_caps import capture_refusal, stream_cast_refusal

PASSES = PassCache(group=lambda key: key[0])
"""The process's captured passes (shared by every node run, so a re-edit replays what the first edit captured),
grouped by model (``id`` of the BaseModel: one graph pool and one thrash count per model)."""

RELEASE_KEY = "dragkit_capture_release"
"""Key of the ``ON_DETACH`` callback :func:`release_on_unload` adds (:func:`_release_detached`)."""

GRADIENT_COUNTS = {"captures": 0, "replays": 0, "rejected": 0, "max_first_replay_error": None}
"""The capture counters of passes with gradients (motion supervision, LoRA), summed over their runs (each run's
own cache is freed when it ends)."""

CAPTURABLE = "dragkit_capturable"
"""Attribute this pack sets on the patch functions a capture may bake in (:func:`capturable`)."""

PASS_THROUGH_OPTIONS = {"cond_or_uncond", "sigmas", "uuids"}
"""``transformer_options`` entries ComfyUI sets on every call, which a captured pass may carry."""

PATCH_OPTIONS = {"patches", "patches_replace"}
"""``transformer_options`` entries holding patch functions (each must be :func:`capturable`)."""

EMPTY_OPTIONS = {"wrappers", "callbacks"}
"""``transformer_options`` entries that must hold nothing but this pack's own (:func:`capturable`) functions for
a capture (another extension's code runs there)."""

CAPTURE_MEMORY_FACTOR = 1.5
"""A new capture needs this many times the model's own estimate of one pass's memory free on the device."""


def capturable(fn):
    """Mark a patch function of this pack as safe to bake into a captured pass; returns ``fn``."""
    setattr(fn, CAPTURABLE, True)
    return fn


def install(patcher, control: AttentionControl) -> None:
    """Route ``patcher``'s UNet calls through :data:`PASSES` (a MODEL with its own UNet wrapper runs plainly), and
    release the model's passes when ComfyUI unloads it (:func:`release_on_unload`)."""
    if not _can_wrap(patcher):
        return
    release_on_unload(patcher)

    def unet_function_wrapper(apply_model, args: dict) -> torch.Tensor:
        x, timestep, c = args["input"], args["timestep"], args["c"]
        plan = _plan(patcher, PASSES, control, x, timestep, c, forget_stale=True)
        if plan is None:
            return apply_model(x, timestep, **c)
        mode, key, captured_c, weights = plan
        return PASSES.run(
            key, lambda tree: apply_model(tree[0], tree[1], **tree[2]), (x, timestep, captured_c), control, weights, mode
        )

    patcher.set_model_unet_function_wrapper(unet_function_wrapper)


def install_features(patcher, control: AttentionControl, state: dict, stop: type[Exception], passes: PassCache) -> None:
    """Route the feature passes of motion supervision through ``passes``, differentiable ones included.

    The feature output-block patch (which must be :func:`capturable`) puts
    the features in ``state["features"]`` and raises ``stop`` to end the
    forward early when ``state["with_eps"]`` is false. A captured pass returns
    the features as an output instead, and this wrapper puts them back in
    ``state`` (and raises ``stop`` itself), so the caller sees no difference.
    While ``state["probing"]`` is set (the backward-memory probes at other
    sizes) calls run plainly.
    """
    if not _can_wrap(patcher):
        return

    def unet_function_wrapper(apply_model, args: dict) -> torch.Tensor:
        x, timestep, c = args["input"], args["timestep"], args["c"]
        differentiable = torch.is_grad_enabled() and x.requires_grad
        with_eps = bool(state["with_eps"])
        plan = None if state.get("probing") else _plan(patcher, passes, control, x, timestep, c, allow_grad=True,
                                                       tag=("features", with_eps, differentiable))
        if plan is None:
            return apply_model(x, timestep, **c)
        mode, key, captured_c, weights = plan

        def features_pass(tree) -> tuple:
            state.pop("features", None)
            try:
                denoised = apply_model(tree[0], tree[1], **tree[2])
            except stop:
                return (state["features"],)
            return denoised, state["features"]

        run = passes.run_differentiable if differentiable else passes.run
        outputs = run(key, features_pass, (x, timestep, captured_c), control, weights, mode)
        state["features"] = outputs[-1]
        if not with_eps:
            raise stop
        return outputs[0]

    patcher.set_model_unet_function_wrapper(unet_function_wrapper)


def tally_gradient_run(passes: PassCache) -> None:
    """Add a finished motion-supervision or LoRA run's counters to :data:`GRADIENT_COUNTS`."""
    counts = passes.counts()
    for name in ("captures", "replays", "rejected"):
        GRADIENT_COUNTS[name] += counts[name]
    errors = [e for e in (GRADIENT_COUNTS["max_first_replay_error"], counts["max_first_replay_error"]) if e is not None]
    GRADIENT_COUNTS["max_first_replay_error"] = max(errors, default=None)


def reset() -> None:
    """Drop every captured pass and zero the counters (the benchmark does this per resolution)."""
    PASSES.clear()
    GRADIENT_COUNTS.update(captures=0, replays=0, rejected=0, max_first_replay_error=None)


def report() -> dict:
    """Capture counters for the benchmark and the GPU check: the mode, sampling/inversion passes, passes with gradients."""
    device = comfy.model_management.get_torch_device()
    return {"mode": capture_mode(device), "passes": PASSES.counts(), "gradient": dict(GRADIENT_COUNTS)}


def training_pass(patcher, passes: PassCache, apply_model, x: torch.Tensor, timestep: torch.Tensor, c: dict,
                  params: tuple) -> torch.Tensor:
    """``apply_model(x, timestep, **c)`` of a LoRA step, captured through ``passes`` with gradients to ``params``.

    ``params`` are the adapters' parameters, read by their forward hooks;
    plain when capture is off or the call cannot be captured.
    """
    control = AttentionControl()
    plan = _plan(patcher, passes, control, x, timestep, c, allow_grad=True, tag=("training",))
    if plan is None:
        return apply_model(x, timestep, **c)
    mode, key, captured_c, weights = plan
    outputs = passes.run_differentiable(key, lambda tree: (apply_model(tree[0], tree[1], **tree[2]),),
                                        (x, timestep, captured_c), control, weights, mode, params=params)
    return outputs[0]


def release_on_unload(patcher) -> None:
    """Add an ``ON_DETACH`` callback (:func:`_release_detached`) to ``patcher`` (this pack's private clone) and
    to every patcher it was cloned from, once each.

    ComfyUI keeps a loaded model through a weak reference to its patcher and
    moves to the parent patcher when a clone dies, so the user's MODEL (and
    what it was cloned from) is what is usually unloaded later; clones made
    from it afterwards (a KSampler's) copy the callback. The callback only
    drops this pack's passes for the model; it changes nothing in the MODEL.
    """
    on_detach = comfy.patcher_extension.CallbacksMP.ON_DETACH
    holder = patcher
    while holder is not None:
        if not holder.get_callbacks(on_detach, RELEASE_KEY):
            holder.add_callback_with_key(on_detach, RELEASE_KEY, _release_detached)
        holder = getattr(holder, "parent", None)


@capturable
def _release_detached(detached, unpatch_all: bool) -> None:
    """``ON_DETACH`` callback: when ComfyUI detaches a patcher with ``unpatch_all`` (its weights leave the device:
    ``model_unload``, ``unload_all_models``), drop the model's captured passes and empty the allocator's cache,
    so their graph memory returns to the device at once and ComfyUI's free-memory count is true again.

    A detach without ``unpatch_all`` (another clone of the model takes over,
    or a patcher is collected) leaves the weights where they are; the passes
    stay for the next run and go when their weights move (:func:`_forget_stale`).
    """
    if not unpatch_all:
        return
    model_id = id(detached.model)
    PASSES.release(lambda key: key[0] == model_id)
    _last_weights.pop(model_id, None)
    empty_device_cache(torch.device(detached.load_device))


def _can_wrap(patcher) -> bool:
    """Whether capture is on for ``patcher`` (:func:`_mode`) and its UNet function wrapper is free for this pack."""
    if _mode(patcher, torch.device(patcher.load_device)) == "off":
        return False
    if "model_function_wrapper" in patcher.model_options:
        log_once("foreign-wrapper", "DragKit: this MODEL already has a UNet function wrapper; its passes run eagerly")
        return False
    return True


def _plan(patcher, passes: PassCache, control: AttentionControl, x: torch.Tensor, timestep: torch.Tensor, c: dict,
          allow_grad: bool = False, tag: tuple = (), forget_stale: bool = False) -> tuple | None:
    """``(mode, key, c as captured, weights identity)`` for sending this call through ``passes``, or ``None``
    when it runs plainly: capture off, a call the capture cannot honour (logged once), or no room for a new
    capture. ``tag`` ends the key; ``forget_stale`` drops the model's passes first if its weights moved
    (:func:`_forget_stale`, for the process-wide :data:`PASSES`)."""
    mode = _mode(patcher, x.device)
    if mode == "off":
        return None
    captured_c = _for_capture(c)
    described = _describe(patcher, captured_c, x, allow_grad)
    if described is None:
        return None
    weights = _weights(patcher)
    if weights is None:
        return None
    if forget_stale:
        _forget_stale(patcher, weights)
    key = _key(patcher, control, described, (x, timestep, captured_c)) + tag
    if mode == "graph" and key not in passes.entries and not _room_for_capture(patcher, x):
        return None
    return mode, key, captured_c, weights


def _mode(patcher, device: torch.device) -> str:
    """The capture mode for ``patcher``'s passes on ``device``: :func:`~dragkit.capture.capture_mode`, or ``off``
    (logged once) where the host's own machinery forbids a capture (:func:`_host_refusal`)."""
    mode = capture_mode(device)
    if mode == "off":
        return mode
    reason = _host_refusal(patcher, device, mode)
    if reason is not None:
        log_once(("host", reason), f"DragKit: UNet passes run plainly: {reason}")
        return "off"
    return mode


def _host_refusal(patcher, device: torch.device, mode: str) -> str | None:
    """Why the host forbids capturing ``patcher``'s passes on ``device``, or ``None``: the host's state
    (:func:`host_caps.capture_refusal`: Dynamic VRAM, its model compiler, CUDA graphs switched off), and a
    graph capture or compile under way."""
    reason = capture_refusal(patcher, device, graphs=mode == "graph")
    if reason is not None:
        return reason
    if torch.compiler.is_compiling():
        return "the pass is being compiled (torch.compile)"
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "the host is capturing a CUDA graph around the pass"
    return None


def _for_capture(c: dict) -> dict:
    """``c`` without ``transformer_options["sample_sigmas"]`` (the sampler's whole schedule, which no pass of
    this pack reads): kept, its length would make every step count a new capture."""
    options = c.get("transformer_options")
    if not options or "sample_sigmas" not in options:
        return c
    return dict(c, transformer_options={k: v for k, v in options.items() if k != "sample_sigmas"})


def _key(patcher, control: AttentionControl, described: tuple, inputs: tuple) -> tuple:
    """What a replay bakes in (see the module docstring)."""
    sampling = patcher.get_model_object("model_sampling")
    return (id(patcher.model), patcher.patches_uuid, id(sampling), type(sampling).__qualname__, control.signature(),
            described, tensor_layout(inputs))


def _describe(patcher, c: dict, x: torch.Tensor, allow_grad: bool = False) -> tuple | None:
    """The key part for ``c``'s structure and plain values and the UNet's hooks (:func:`_hooks`), or ``None``
    (logged once) when a capture cannot honour the call."""
    reason = _refusal(patcher, c, x, allow_grad)
    if reason is not None:
        log_once(("eager", reason), f"DragKit: UNet passes run eagerly: {reason}")
        return None
    leaves, spec = pytree.tree_flatten(c)
    plain = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            continue
        if callable(leaf):
            plain.append(getattr(leaf, "__qualname__", "patch"))
        elif isinstance(leaf, uuid.UUID):
            plain.append("uuid")
        elif leaf is None or isinstance(leaf, (int, float, str, bool)):
            plain.append(leaf)
        else:
            log_once(("eager", type(leaf).__name__), f"DragKit: UNet passes run eagerly: a {type(leaf).__name__} "
                     "in the model call's conditioning")
            return None
    hooks = _hooks(patcher.model.diffusion_model)
    if hooks is None:
        log_once(("eager", "hook"), "DragKit: UNet passes run eagerly: a module hook this pack did not make is "
                 "registered on the UNet")
        return None
    return str(spec), tuple(plain), hooks


def _refusal(patcher, c: dict, x: torch.Tensor, allow_grad: bool) -> str | None:
    """Why this call cannot run through a captured pass, or ``None``."""
    if not allow_grad and torch.is_grad_enabled() and x.requires_grad:
        return "gradients are taken through the UNet outside motion supervision"
    streamed = stream_cast_refusal(patcher, x.device)
    if streamed is not None:
        return streamed
    if getattr(patcher.model, "model_lowvram", False):
        return "the model is partially loaded (lowvram)"
    if getattr(patcher, "hook_patches", None):
        return "the MODEL has weight hooks"
    if any(getattr(patcher, "weight_wrapper_patches", None) or ()):
        return "the MODEL has weight wrapper patches (another extension's code runs on every weight)"
    foreign_objects = sorted(set(getattr(patcher, "object_patches", {})) - {"model_sampling"})
    if foreign_objects:
        return f"the MODEL replaces {foreign_objects[0]!r} (an object patch)"
    misplaced = [b.device for b in patcher.get_model_object("model_sampling").buffers() if b.device != x.device]
    if misplaced:
        return (f"the model sampling's buffers are on {misplaced[0]}, the UNet runs on {x.device} (an object patch "
                "on a model that was already loaded)")

    options = c.get("transformer_options", {})
    for name, value in options.items():
        if name in PASS_THROUGH_OPTIONS:
            continue
        if name in EMPTY_OPTIONS:
            if any(v and not getattr(v, CAPTURABLE, False) for v in _flat_values(value)):
                return f"another extension's {name} are set on the MODEL"
        elif name in PATCH_OPTIONS:
            foreign = [fn for fn in _flat_values(value) if not getattr(fn, CAPTURABLE, False)]
            if foreign:
                return f"the MODEL carries a patch this pack cannot capture ({getattr(foreign[0], '__qualname__', foreign[0])})"
        elif value:
            return f"the MODEL sets transformer option {name!r}"
    return None


def _flat_values(value) -> list:
    """Every non-container value inside nested dicts, lists and tuples."""
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _flat_values(v)]
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _flat_values(v)]
    return [value]


_module_lists: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Per UNet: its modules, listed once (their hook tables are read on every call)."""

HOOK_TABLES = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
"""A module's hook tables; what their hooks do runs inside the pass."""


def _hooks(unet: torch.nn.Module) -> tuple | None:
    """The key part for the hooks on ``unet``'s modules: ``(module index, table, hook id)`` of each
    :func:`capturable` one (this pack's LoRA adapters), or ``None`` when any other hook is registered there or
    globally (``torch.nn.modules.module.register_module_forward_hook`` and the like)."""
    modules = _module_lists.get(unet)
    if modules is None:
        modules = _module_lists[unet] = list(unet.modules())
    module_globals = torch.nn.modules.module
    if any(getattr(module_globals, f"_global{name}", None) for name in HOOK_TABLES):
        return None
    found = []
    for index, module in enumerate(modules):
        for name in HOOK_TABLES:
            for hook_id, hook in getattr(module, name, {}).items():
                if not getattr(hook, CAPTURABLE, False):
                    return None
                found.append((index, name, hook_id))
    return tuple(found)


def _weights(patcher) -> tuple | None:
    """The model's weights' identity (:func:`~dragkit.capture.storage_identity` of the BaseModel) and its model
    sampling's buffers (an object patch replaces that module, so it is read each call); ``None`` when a weight
    is a tensor subclass (logged once)."""
    sampling = patcher.get_model_object("model_sampling")
    weights = storage_identity(patcher.model)
    return None if weights is None else weights + tuple(t.data_ptr() for t in sampling.buffers())


_last_weights: dict = {}
"""id(BaseModel) -> (weak reference, weights identity) as last seen, to drop a moved model's passes at once."""


def _forget_stale(patcher, weights: tuple) -> None:
    """Drop every captured pass of a model whose weights moved, and of models that no longer exist.

    A model that ComfyUI unloaded or re-patched has new weight addresses: all
    its passes are stale at once, not only the one being called. The pool
    memory of dropped graphs returns when the last graph using it goes.
    """
    base = patcher.model
    known = _last_weights.get(id(base))
    if known is not None and (known[0]() is not base or known[1] != weights):
        PASSES.release(lambda key: key[0] == id(base))
    for model_id, (ref, _) in list(_last_weights.items()):
        if ref() is None:
            PASSES.release(lambda key, model_id=model_id: key[0] == model_id)
            del _last_weights[model_id]
    _last_weights[id(base)] = (weakref.ref(base), weights)


def _room_for_capture(patcher, x: torch.Tensor) -> bool:
    """Whether the device has room for a new capture (:data:`CAPTURE_MEMORY_FACTOR`); logs once when not."""
    needed = CAPTURE_MEMORY_FACTOR * patcher.model.memory_required(tuple(x.shape))
    if free_for_capture(x.device) >= needed:
        return True
    log_once("capture-memory", f"DragKit: too little free GPU memory to capture a UNet pass ({needed / 2**20:.0f} MiB "
             "wanted); passes run eagerly")
    return False
