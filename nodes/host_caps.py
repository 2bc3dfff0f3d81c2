"""The one place DragKit asks the ComfyUI host what it can do (Dynamic VRAM, its own CUDA graphs, memory).

Supported hosts run from ComfyUI 0.3.64 (no Dynamic VRAM) to 0.33.0, where
``comfy-aimdo`` streams a ``ModelPatcherDynamic``'s weights through a
virtual buffer layer by layer during the forward pass
(``comfy/ops.py cast_modules_with_vbar``, ``comfy/model_prefetch.py``), and
on to 0.36's model compiler (comfy-aimdo "malloc graphs"). Every other
module decides by these functions, never by a version number:

- :func:`is_dynamic` -- is this MODEL's weight storage streamed (and reused)
  by the host?
- :func:`dynamic_vram_enabled`, :func:`host_graphs_enabled` -- is the
  host's streaming / its own prefetch CUDA graphs switched on for the process?
- :func:`autograd_patcher` -- a patcher whose weights stay put while a
  backward reads them (the host's non-dynamic delegate for a dynamic MODEL).
- :func:`capture_refusal`, :func:`stream_cast_refusal` -- why the host forbids
  capturing a MODEL's UNet pass in a CUDA graph of this pack (its own graphs,
  its model compiler, weights cast on its offload streams), or ``None``.
- :func:`training_mode` -- the host's training flag around passes with autograd.
- :func:`free_memory_for`, :func:`make_room` -- memory as the host accounts it.

A host that has the newer machinery (``ModelPatcherDynamic``, the
``--disable-comfy-compiler`` option) but not the capability a function relies
on raises :class:`HostCapabilityError` naming what is missing, instead of
guessing.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Iterator

import comfy.model_management
import comfy.model_patcher
import torch


class HostCapabilityError(RuntimeError):
    """The ComfyUI host lacks (or has renamed) a capability DragKit relies on; the message names it."""


def _host_has_dynamic_vram_code() -> bool:
    """Whether this ComfyUI has Dynamic VRAM at all (0.33.0: ``comfy.model_patcher.ModelPatcherDynamic``)."""
    return hasattr(comfy.model_patcher, "ModelPatcherDynamic")


def _missing(what: str) -> HostCapabilityError:
    return HostCapabilityError(
        f"this ComfyUI has Dynamic VRAM (ModelPatcherDynamic) but not {what}, which DragKit was written against "
        "(ComfyUI 0.33.0); update DragKit, or start ComfyUI with --disable-dynamic-vram"
    )


def _renamed(has: str, what: str, written_against: str) -> HostCapabilityError:
    return HostCapabilityError(
        f"this ComfyUI has {has} but not {what}, which DragKit was written against ({written_against}); update DragKit"
    )


def is_dynamic(patcher) -> bool:
    """Whether ``patcher``'s weights are streamed by the host's Dynamic VRAM (and their buffers reused).

    Mirrors ``ModelPatcher.is_dynamic()`` of ComfyUI 0.33.0
    (``comfy/model_patcher.py``: ``False`` on ``ModelPatcher``, ``True`` on
    ``ModelPatcherDynamic``). ComfyUI 0.3.64's patchers have no such method
    and are never dynamic; on a host with ``ModelPatcherDynamic`` a patcher
    without the method fails loudly.
    """
    method = getattr(patcher, "is_dynamic", None)
    if method is None:
        if _host_has_dynamic_vram_code():
            raise _missing(f"ModelPatcher.is_dynamic() on {type(patcher).__name__}")
        return False
    return bool(method())


def _memory_management():
    """ComfyUI 0.33.0's ``comfy.memory_management`` (``None`` on hosts without it, e.g. 0.3.64)."""
    try:
        return importlib.import_module("comfy.memory_management")
    except ImportError:
        return None


def dynamic_vram_enabled() -> bool:
    """Whether the host streams weights with Dynamic VRAM in this process.

    Mirrors ``comfy.memory_management.aimdo_enabled`` of ComfyUI 0.33.0 (set by
    ``main.py`` when comfy-aimdo initialised its devices; off with
    ``--disable-dynamic-vram``, ``--cpu``, ``--highvram``, ``--gpu-only``).
    Always ``False`` on ComfyUI 0.3.64.
    """
    if not _host_has_dynamic_vram_code():
        return False
    mm = _memory_management()
    if mm is None or not hasattr(mm, "aimdo_enabled"):
        raise _missing("comfy.memory_management.aimdo_enabled")
    return bool(mm.aimdo_enabled)


def host_graphs_enabled() -> bool:
    """Whether the host captures its own CUDA graphs of the weight prefetch in this process.

    Mirrors ComfyUI 0.33.0 ``comfy/model_prefetch.py prefetch_queue_pop``:
    graphs are captured for vbar-streamed modules (Dynamic VRAM on) unless
    ComfyUI was started with ``--disable-cuda-graphs``. ComfyUI 0.3.64 has
    no graphs of its own.
    """
    if not dynamic_vram_enabled():
        return False
    args = comfy.model_management.args
    if not hasattr(args, "disable_cuda_graphs"):
        raise _missing("the --disable-cuda-graphs option (comfy.cli_args args.disable_cuda_graphs)")
    return not args.disable_cuda_graphs


COMPILER_SOURCE = "ComfyUI 0.36+ comfy/model_prefetch.py"
"""What :func:`malloc_graph_recording` and :func:`capture_refusal` read the model compiler's state against."""


def _model_compiler():
    """ComfyUI's ``comfy.model_prefetch`` where the host has the model compiler (the ``--disable-comfy-compiler``
    option, 0.36+), else ``None`` (0.3.64, 0.33.0)."""
    if not hasattr(comfy.model_management.args, "disable_comfy_compiler"):
        return None
    try:
        prefetch = importlib.import_module("comfy.model_prefetch")
    except ImportError as error:
        raise _renamed("--disable-comfy-compiler", "comfy.model_prefetch", COMPILER_SOURCE) from error
    if not callable(getattr(prefetch, "malloc_graph_enabled", None)):
        raise _renamed("--disable-comfy-compiler", "comfy.model_prefetch.malloc_graph_enabled(device)", COMPILER_SOURCE)
    return prefetch


def malloc_graph_recording() -> bool:
    """Whether the host's model compiler is recording a comfy-aimdo malloc graph on this thread now.

    Mirrors ``comfy/model_prefetch.py`` of ComfyUI 0.36+: ``malloc_graph_begin``
    keeps the thread's graph in ``MALLOC_GRAPHS[threading.get_ident()]`` with
    ``_comfy_active`` set until ``malloc_graph_end`` (earlier builds: the
    thread's entry in ``ACTIVE_MALLOC_GRAPHS`` while it records). A CUDA graph
    captured inside one records allocations the malloc graph cannot replay
    ("aimdo memory compile error"). ``False`` on hosts without the compiler.
    """
    prefetch = _model_compiler()
    if prefetch is None:
        return False
    thread = threading.get_ident()
    graphs = getattr(prefetch, "MALLOC_GRAPHS", None)
    if isinstance(graphs, dict):
        graph = graphs.get(thread)
        if graph is None:
            return False
        if not hasattr(graph, "_comfy_active"):
            raise _renamed("--disable-comfy-compiler", "the _comfy_active flag on comfy.model_prefetch.MALLOC_GRAPHS' "
                           "graphs", COMPILER_SOURCE)
        return bool(graph._comfy_active)
    active = getattr(prefetch, "ACTIVE_MALLOC_GRAPHS", None)
    if isinstance(active, dict):
        return active.get(thread) is not None
    raise _renamed("--disable-comfy-compiler", "comfy.model_prefetch.MALLOC_GRAPHS (or ACTIVE_MALLOC_GRAPHS)",
                   COMPILER_SOURCE)


def capture_refusal(patcher, device: torch.device, graphs: bool) -> str | None:
    """Why the host's state forbids running ``patcher``'s UNet passes on ``device`` through this pack's captured
    passes (``graphs``: as CUDA graphs; otherwise the static-buffer path), or ``None``. In this order:

    - a Dynamic VRAM patcher (:func:`is_dynamic`): its weights stream into
      reused buffers during the pass, under the host's own CUDA graphs;
    - a malloc graph of the host's model compiler recording on this thread
      (:func:`malloc_graph_recording`);
    - the model compiler on for ``device``: the host's own
      ``comfy.model_prefetch.malloc_graph_enabled(device)`` (0.36+: not
      ``--disable-comfy-compiler``, comfy-aimdo initialised, a CUDA device),
      where the model's forward opens a malloc graph inside the pass a capture
      would record;
    - with ``graphs``, the host's CUDA graphs switched off
      (``args.disable_cuda_graphs``: ``--disable-cuda-graphs``, 0.33+, and
      ``--disable-comfy-compiler``, which sets it too, 0.36+).

    Whether the weights are cast on offload streams depends on where they are
    at the call: :func:`stream_cast_refusal`.
    """
    if is_dynamic(patcher):
        return "the MODEL is loaded with Dynamic VRAM (its weights stream in during the pass, under ComfyUI's own graphs)"
    if malloc_graph_recording():
        return "ComfyUI's model compiler is recording a comfy-aimdo malloc graph around the pass"
    prefetch = _model_compiler()
    if prefetch is not None and prefetch.malloc_graph_enabled(device):
        return (f"ComfyUI's model compiler (comfy-aimdo malloc graphs) is on for {device}; start ComfyUI with "
                "--disable-dynamic-vram for captured passes")
    args = comfy.model_management.args
    if graphs and getattr(args, "disable_cuda_graphs", False):
        if getattr(args, "disable_comfy_compiler", False):
            return "ComfyUI runs with --disable-comfy-compiler, which turns its CUDA graphs off too (disable_cuda_graphs)"
        return "ComfyUI runs with --disable-cuda-graphs"
    return None


def offload_streams() -> int:
    """How many offload streams the host casts weights on (0: it casts them on the compute stream).

    Mirrors ``comfy.model_management.get_offload_stream``: ComfyUI 0.33.0 makes
    ``NUM_STREAMS`` streams when it is above 0 (2 by default on NVIDIA and AMD;
    ``--async-offload N`` sets it, ``--disable-async-offload`` makes it 0);
    ComfyUI 0.3.64 (no ``--disable-async-offload``) uses streams only when it
    is above 1 (``--async-offload``: 2; else 1).
    """
    mm = comfy.model_management
    if not hasattr(mm, "NUM_STREAMS"):
        raise HostCapabilityError("this ComfyUI has no comfy.model_management.NUM_STREAMS, which DragKit reads to know "
                                  "whether weights are cast on offload streams (ComfyUI 0.3.64-0.33.0); update DragKit")
    streams = int(mm.NUM_STREAMS)
    if hasattr(mm.args, "disable_async_offload"):
        return max(streams, 0)
    return streams if streams > 1 else 0


def stream_cast_refusal(patcher, device: torch.device) -> str | None:
    """Why ``patcher``'s weights, where they are now, would be cast on the host's offload streams during a pass on
    ``device``, or ``None``.

    Mirrors ``comfy/ops.py cast_bias_weight`` (the same in ComfyUI 0.3.64,
    0.33.0 and 0.36): a layer's weight and bias are copied to the compute
    device on an offload stream (:func:`offload_streams`) only when one of
    them is not on that device, i.e. a partially loaded (lowvram) model's
    offloaded layers; a Dynamic VRAM layer streams on its own path
    (:func:`capture_refusal`). A fully loaded non-dynamic model, e.g. the
    delegate motion supervision and LoRA Fine-tune run on, casts nothing on a
    stream, whatever the number of streams.

    The host's own record says which models keep weights off the device:
    ``model_lowvram``, set by ``ModelPatcher.load`` when not every layer fits
    and by ``partially_unload`` (0.3.64 and 0.33.0); only then are the weights
    looked at (a scan of every parameter on each call of a fully loaded model
    would cost a captured pass a good part of its gain).
    """
    streams = offload_streams()
    if streams == 0 or not getattr(patcher.model, "model_lowvram", False):
        return None
    name, where = next(((n, p.device) for n, p in patcher.model.named_parameters() if p.device != device), (None, None))
    if name is None:
        return None
    args = comfy.model_management.args
    if getattr(args, "async_offload", None) not in (None, False):
        cause = f"ComfyUI runs with --async-offload ({streams} streams)"
    else:
        cause = (f"ComfyUI offloads asynchronously by default on NVIDIA and AMD ({streams} streams; "
                 "--disable-async-offload turns it off)")
    return (f"the model is partially loaded and ComfyUI casts its offloaded weights ({name} is on {where}) to "
            f"{device} on offload streams: {cause}")


def autograd_patcher(patcher):
    """``patcher``, or a patcher of the same model (same patches and options) whose weights a backward may read.

    A dynamic patcher's weights live in a buffer the prefetch reuses for the
    next layer, so a gradient computed later would read another layer's
    weights. For one, this returns the host's non-dynamic delegate: mirrors
    ComfyUI 0.33.0 ``ModelPatcherDynamic.get_non_dynamic_delegate()`` (a
    ``clone(disable_dynamic=True)`` that keeps the delegate's model on the
    dynamic patcher, so later runs reuse it; the sampler does the same for
    hooked conditioning) and otherwise ``clone(disable_dynamic=True)`` as
    ``comfy_extras/nodes_torch_compile.py`` takes it. A non-dynamic patcher
    (every patcher on ComfyUI 0.3.64) is returned as it is: clone it before
    adding patches.
    """
    if not is_dynamic(patcher):
        return patcher
    delegate = getattr(patcher, "get_non_dynamic_delegate", None)
    try:
        result = delegate() if delegate is not None else patcher.clone(disable_dynamic=True)
    except TypeError as error:
        raise _missing(f"ModelPatcher.clone(disable_dynamic=True) ({error})") from error
    except RuntimeError as error:
        raise HostCapabilityError(
            f"this MODEL is streamed by ComfyUI's Dynamic VRAM and the host could not make the non-dynamic copy that "
            f"training needs ({error}); load it with a core loader (Load Checkpoint / Load Diffusion Model) or start "
            "ComfyUI with --disable-dynamic-vram"
        ) from error
    if is_dynamic(result):
        raise _missing("a non-dynamic delegate (clone(disable_dynamic=True) returned a dynamic patcher)")
    return result


@contextlib.contextmanager
def training_mode() -> Iterator[None]:
    """Run the block with the host's training flag set, restored afterwards.

    Mirrors ComfyUI 0.33.0 ``comfy.model_management.in_training``, which
    ``comfy_extras/nodes_train.py`` sets around its training loop so model code
    and ops take their autograd-safe paths (e.g. ``comfy/ops.py
    linear_input_act`` skips the fused INT8 kernel). Hosts without the flag
    (0.3.64) run the block unchanged.
    """
    mm = comfy.model_management
    if not hasattr(mm, "in_training"):
        if _host_has_dynamic_vram_code():
            raise _missing("comfy.model_management.in_training")
        yield
        return
    before = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = before


def free_memory_for(patcher, device: torch.device) -> int:
    """Bytes the host can give ``patcher``'s next allocations on ``device``.

    Mirrors ComfyUI 0.33.0 ``ModelPatcher.get_free_memory(device)`` (what the
    sampler asks before batching, ``comfy/samplers.py``): torch's free memory
    plus what comfy-aimdo can evict from streamed models
    (``comfy_aimdo.model_vbar.vbars_analyze``). ComfyUI 0.3.64 has no such
    method; there it is ``comfy.model_management.get_free_memory(device)``.
    """
    method = getattr(patcher, "get_free_memory", None)
    if method is None:
        if _host_has_dynamic_vram_code():
            raise _missing(f"ModelPatcher.get_free_memory(device) on {type(patcher).__name__}")
        return int(comfy.model_management.get_free_memory(device))
    return int(method(device))


def make_room(patcher, nbytes: float, keep_loaded: list) -> None:
    """Offload models outside ``keep_loaded`` until ``nbytes`` (plus the host's reserve) fit beside ``patcher``.

    Nothing happens when :func:`free_memory_for` already covers it (on 0.33.0
    that counts the Dynamic VRAM budget, which streamed models give up on
    demand). Otherwise mirrors the ``free_memory`` call of
    ``comfy.model_management.load_models_gpu``: on ComfyUI 0.33.0 with
    ``for_dynamic`` = whether ``patcher`` is dynamic (dynamic models are then
    not unloaded for it), on 0.3.64 without that argument.
    """
    device = torch.device(patcher.load_device)
    if device.type == "cpu":
        return
    mm = comfy.model_management
    need = float(nbytes) + mm.extra_reserved_memory()
    if free_memory_for(patcher, device) >= need:
        return
    if _host_has_dynamic_vram_code():
        mm.free_memory(need, device, keep_loaded=keep_loaded, for_dynamic=is_dynamic(patcher))
    else:
        mm.free_memory(need, device, keep_loaded=keep_loaded)
