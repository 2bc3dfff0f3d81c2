"""The one way DragKit runs autograd through a ComfyUI MODEL (LoRA Fine-tune and motion supervision).

Autograd runs on a patcher whose weights stay where they are until the
backward has read them: never on a Dynamic VRAM patcher (ComfyUI 0.33.0
streams those through a buffer the prefetch reuses layer after layer), but on
the host's non-dynamic delegate (:func:`nodes.host_caps.autograd_patcher`);
:func:`prepare_for_backward` refuses a dynamic one.

ComfyUI loads weights under ``torch.inference_mode()``, and autograd may not
save inference tensors for backward. Earlier versions worked around that by
copying weights: identity weight wrappers during LoRA training (a fresh copy
of every weight on every forward, kept for backward) and a second copy of
every UNet parameter during motion supervision. Both cost a full copy of the
UNet or more on the GPU. Instead:

- :func:`make_weights_autograd_safe` turns the loaded module's inference-mode
  parameters into ordinary tensors **in place, one tensor at a time** (same
  values, same device and dtype; the peak is one extra tensor, not one extra
  model). The ModelPatcher is not touched, so ComfyUI neither re-patches nor
  reloads the model afterwards; ordinary tensors work under inference mode
  too, so nothing has to be put back. A later reload of the model under
  inference mode brings inference tensors back, and the next call converts
  them again. Only weights on the compute device are converted: offloaded
  (lowvram) weights are cast into fresh tensors per forward anyway, and
  ComfyUI 0.33.0 may have pinned them (its ``pin_weight_to_device``), which a
  replacement tensor would leave registered.
- :func:`backward_memory` measures what a training or optimisation step keeps
  for backward (saved-tensor hooks on two small probe steps, extrapolated in
  the number of latent tokens), and :func:`reserve` asks the host for that
  much room the way the host accounts memory (:func:`nodes.host_caps.make_room`:
  on ComfyUI 0.33.0 the free memory includes the Dynamic VRAM budget), so
  models the run does not use are offloaded first instead of the step running
  out of memory. :func:`release` hands cached blocks back afterwards
  (``comfy.model_management.soft_empty_cache``).
"""

from __future__ import annotations

import logging
from typing import Callable

import comfy.model_management
import torch

from .host_caps import HostCapabilityError, is_dynamic, make_room

log = logging.getLogger("DragKit")

PROBE_SIDES = (8, 16)
"""Latent sides ``h = w`` of the two probe steps (8 keeps every SD UNet level at least 1x1)."""

MARGIN = 1.25
"""Headroom on the extrapolated saved bytes (allocator rounding, transient gradients)."""

FALLBACK_FACTOR = 3.0
"""When the probe cannot run (a model patch that refuses the small probe latent), the saved bytes are taken
as this many times ComfyUI's inference estimate, and the log says why."""


def make_weights_autograd_safe(module: torch.nn.Module, device: torch.device | str) -> int:
    """Replace ``module``'s inference-mode parameters on ``device`` by ordinary tensors, in place; returns the bytes converted.

    Values, device, dtype and ``requires_grad=False`` are unchanged, so the
    module computes exactly what it did. Parameters that are already ordinary
    tensors, and parameters elsewhere (offloaded weights, cast per forward into
    new tensors), are left alone (a second call converts nothing).
    """
    device = torch.device(device)
    converted = 0
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is None or not param.is_inference() or not _on(param, device):
                    continue
                sub._parameters[name] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
                converted += param.numel() * param.element_size()
    return converted


def _on(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether ``tensor`` lives on ``device`` (``cuda`` matches the current CUDA device's index)."""
    if tensor.device.type != device.type:
        return False
    if device.index is None or tensor.device.index is None:
        return True
    return tensor.device.index == device.index


def _storage(tensor: torch.Tensor) -> tuple[int, int]:
    """``(identity, bytes)`` of the memory behind ``tensor``; tensor subclasses without a plain storage
    (e.g. quantised weights from other packs) count as themselves."""
    try:
        storage = tensor.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return id(tensor), tensor.numel() * tensor.element_size()


def saved_tensors(step: Callable[[], None]) -> list[torch.Tensor]:
    """Every distinct tensor storage that ``step`` (a forward and backward) saved for backward.

    Parameters saved by reference are included (callers filter them); the
    list keeps the tensors alive, so only use it in tests and small probes.
    """
    seen: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "meta":
            seen.setdefault(_storage(tensor)[0], tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return list(seen.values())


def saved_activation_bytes(step: Callable[[], None], module: torch.nn.Module) -> int:
    """Bytes ``step`` saved for backward beyond ``module``'s own parameters (which are saved by reference)."""
    weights = {_storage(p)[0] for p in module.parameters()}
    return sum(nbytes for key, nbytes in map(_storage, saved_tensors(step)) if key not in weights)


def backward_memory(probe: Callable[[int, int], None], module: torch.nn.Module, latent_hw: tuple[int, int]) -> int:
    """Bytes one step at latent size ``latent_hw`` keeps for backward, measured.

    ``probe(h, w)`` runs one forward and backward of the real step on a latent
    of that size (same batch, model and options). It runs at the two
    :data:`PROBE_SIDES`; the saved bytes are fitted as ``a·N + b·N²`` in the
    token count N = h·w (attention that materialises its weights grows with
    N²) and extrapolated to ``latent_hw``, times :data:`MARGIN`.
    """
    sizes = [side * side for side in PROBE_SIDES]
    measured = [saved_activation_bytes(lambda s=side: probe(s, s), module) for side in PROBE_SIDES]
    (n1, n2), (b1, b2) = sizes, measured
    quadratic = max(0.0, (b2 / n2 - b1 / n1) / (n2 - n1))
    linear = max(0.0, b1 / n1 - quadratic * n1)
    tokens = int(latent_hw[0]) * int(latent_hw[1])
    return int(MARGIN * (linear * tokens + quadratic * tokens * tokens))


def reserve(patcher, nbytes: float) -> None:
    """Make ``nbytes`` free beside ``patcher``, offloading only models the current run does not use.

    :func:`nodes.host_caps.make_room` with ``keep_loaded`` = the loaded models
    marked ``currently_used`` (``comfy.model_management.current_loaded_models``):
    called inside a sampler run, it must not offload the UNet or a ControlNet
    that the run loaded. Nothing to do on a CPU.
    """
    mm = comfy.model_management
    make_room(patcher, nbytes, [loaded for loaded in mm.current_loaded_models if loaded.currently_used])


def release() -> None:
    """Give the allocator's cached blocks back after a training or optimisation run."""
    comfy.model_management.soft_empty_cache()


def prepare_for_backward(patcher, probe: Callable[[int, int], None], latent_shape: tuple[int, ...]) -> int:
    """Make a loaded ``patcher``'s weights autograd-safe and reserve the measured backward memory.

    The model must already be loaded (fully or partially: partially loaded
    weights are cast per forward into ordinary tensors, which autograd can
    save). ``latent_shape`` is one step's ``(B, C, h, w)``; ComfyUI's own
    inference estimate of the forward work space for it is added to the
    measured saved bytes. Returns the bytes needed (measured on a CPU too,
    where :func:`reserve` has nothing to offload). A Dynamic VRAM patcher is
    refused (:class:`nodes.host_caps.HostCapabilityError`): take
    :func:`nodes.host_caps.autograd_patcher` of it first.
    """
    if is_dynamic(patcher):
        raise HostCapabilityError(
            "DragKit: autograd was asked to run on a Dynamic VRAM patcher, whose weight buffers the host reuses "
            "during the pass; it must run on the non-dynamic delegate (nodes.host_caps.autograd_patcher)"
        )
    base = patcher.model
    latent_hw = tuple(latent_shape[-2:])
    forward_space = base.memory_required(list(latent_shape))
    converted = make_weights_autograd_safe(base.diffusion_model, patcher.load_device)
    if converted:
        log.debug("DragKit: made %.1f MiB of inference-mode weights usable by autograd", converted / 2**20)
    try:
        saved = backward_memory(probe, base.diffusion_model, latent_hw)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - a measurement must not fail the user's run
        saved = int(FALLBACK_FACTOR * forward_space)
        log.warning("DragKit: could not measure the backward memory (%s: %s); assuming %.0f MiB",
                    type(error).__name__, error, saved / 2**20)
    need = saved + forward_space
    log.info("DragKit: reserving %.0f MiB for backward (measured %.0f MiB of saved activations)", need / 2**20, saved / 2**20)
    reserve(patcher, need)
    return int(need)
