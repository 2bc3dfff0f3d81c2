"""Captured UNet passes: capture a model call once per key, replay it afterwards.

A denoising loop is launch-bound on a GPU: one SD1.5 forward pass at 512²
costs ~33 ms eager and ~10 ms replayed from a CUDA graph (see
``docs/gpu-device.md``). :class:`PassCache` runs a pure function of tensors
``fn(tree) -> tensor`` through fixed-address ("static") buffers:

1. First call of a key: the inputs are copied into new static buffers and
   ``fn`` runs eagerly on them (the warm-up; its output is the call's
   result). In ``"graph"`` mode the pass is then captured into a CUDA graph
   and replayed once, and that replay is compared with the warm-up output
   (:data:`REPLAY_TOLERANCE`); a capture that fails or disagrees is never used
   (the key runs eagerly from then on, and the reason is logged once).
2. Later calls copy the inputs into the static buffers, let the attention
   control fill its :class:`~dragkit.attention.KVSlots` (the injector copies
   the step's cached keys/values in), replay (or, in ``"eager"`` mode, run
   ``fn`` again on the static buffers), let the control drain its slots (the
   recorder copies keys/values out) and return a copy of the output.

``"eager"`` mode is the CPU stand-in for replay: the same static buffers,
slots and copies, with ``fn`` run instead of a graph, so the tests can show
on any machine that the static path equals the plain one bit for bit.

What a capture bakes in is the caller's job to put in the key: shapes,
dtypes, batch, the attention control's :meth:`signature`, the model's
patches. The weights' identity is checked before every replay: a changed
identity (the model reloaded, re-patched or moved) drops the entry.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch
from torch.utils import _pytree as pytree

from .attention import AttentionControl, KVSlots

log = logging.getLogger("DragKit")

MODES = ("off", "eager", "graph")
"""``off``: plain calls; ``eager``: the static-buffer path without a graph (CPU stand-in); ``graph``: CUDA graphs."""

ENV_VAR = "DRAGKIT_CAPTURE"
"""Environment variable choosing the mode: ``auto`` (default: ``graph`` on CUDA, ``off`` elsewhere) or one of :data:`MODES`."""

REPLAY_TOLERANCE = 1e-3
"""Largest |replay - eager| accepted at the first replay, relative to max(1, max |eager|)."""

CAPACITY = 8
"""Captured passes kept (least recently used dropped first); they share one memory pool per device."""


def capture_mode(device: torch.device) -> str:
    """The mode for a pass on ``device``, from :data:`ENV_VAR` (``graph`` only ever on CUDA)."""
    wanted = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if wanted not in MODES + ("auto",):
        log_once(f"env:{wanted}", f"DragKit: {ENV_VAR}={wanted!r} is not one of auto, {', '.join(MODES)}; using auto")
        wanted = "auto"
    if wanted == "auto":
        return "graph" if device.type == "cuda" else "off"
    if wanted == "graph" and device.type != "cuda":
        return "eager"
    return wanted


_logged: set[Hashable] = set()


def log_once(key: Hashable, message: str) -> None:
    """Log ``message`` (info) the first time ``key`` is seen in this process."""
    if key not in _logged:
        _logged.add(key)
        log.info(message)


def tensor_layout(tree: Any) -> tuple:
    """Hashable ``(shape, dtype, device, requires_grad)`` of every tensor leaf of ``tree``, in order."""
    return tuple(
        (tuple(t.shape), t.dtype, t.device, t.requires_grad)
        for t in pytree.tree_leaves(tree)
        if isinstance(t, torch.Tensor)
    )


@dataclass
class _Entry:
    """One key's static inputs, output and (graph mode) CUDA graph."""

    statics: list[torch.Tensor]
    slots: KVSlots
    weights: Hashable
    graph: Any = None
    output: torch.Tensor | None = None


@dataclass
class PassCache:
    """Static-buffer runs and captured passes per key (see the module docstring)."""

    capacity: int = CAPACITY
    entries: OrderedDict = field(default_factory=OrderedDict)
    pools: dict = field(default_factory=dict)
    captures: int = 0
    replays: int = 0
    rejected: int = 0
    first_replay_errors: list = field(default_factory=list)
    """For tests and the GPU check: graphs captured, replays (graph or eager), captures refused, and each
    accepted graph's first-replay difference from eager (relative, see :data:`REPLAY_TOLERANCE`)."""

    def clear(self) -> None:
        """Drop every entry (and with them the graphs' memory) and reset the counters."""
        self.entries.clear()
        self.pools.clear()
        self.captures = self.replays = self.rejected = 0
        self.first_replay_errors.clear()

    def run(
        self,
        key: Hashable,
        fn: Callable[[Any], torch.Tensor],
        tree: Any,
        control: AttentionControl,
        weights: Hashable,
        mode: str,
    ) -> torch.Tensor:
        """``fn(tree)`` through this key's static buffers (``mode`` ``eager`` or ``graph``).

        ``tree`` is any nesting of dicts, lists and tuples; its tensor
        leaves are the inputs copied into static buffers, its other leaves are
        passed through as they are (the key must describe what they decide).
        ``control`` is the attention control active in ``fn``; it is bound to
        the entry's slots for the call. ``weights`` is the model weights'
        identity (e.g. their storage addresses).
        """
        leaves, spec = pytree.tree_flatten(tree)
        tensors = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        entry = self.entries.get(key)
        if entry is not None and entry.weights != weights:
            log.debug("DragKit: model weights moved or changed; recapturing")
            del self.entries[key]
            entry = None
        if entry is None:
            return self._first(key, fn, leaves, spec, tensors, control, weights, mode)
        self.entries.move_to_end(key)
        for static, i in zip(entry.statics, tensors):
            static.copy_(leaves[i], non_blocking=True)
        control.bind(entry.slots)
        try:
            control.before_pass()
            if entry.graph is not None:
                entry.graph.replay()
                out = entry.output.clone()
            else:
                out = fn(_with(leaves, spec, tensors, entry.statics))
            control.after_pass()
        finally:
            control.bind(None)
        self.replays += 1
        return out

    def _first(self, key, fn, leaves, spec, tensors, control, weights, mode) -> torch.Tensor:
        statics = [leaves[i].detach().clone() for i in tensors]
        entry = _Entry(statics=statics, slots=KVSlots(), weights=weights)
        static_tree = _with(leaves, spec, tensors, statics)
        control.bind(entry.slots)
        try:
            control.before_pass()
            out = self._warm_up(fn, static_tree, entry.slots, statics[0].device) if mode == "graph" else fn(static_tree)
            control.after_pass()
            if mode == "graph":
                self._capture(fn, static_tree, out, entry)
        finally:
            control.bind(None)
        self.entries[key] = entry
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return out

    @staticmethod
    def _warm_up(fn, static_tree, slots: KVSlots, device: torch.device) -> torch.Tensor:
        """``fn`` run eagerly on a side stream, as CUDA graph capture wants before its first capture.

        What it allocates (the output, the slots) is then marked as used on
        the main stream, so the allocator never hands that memory to the side
        stream's next user while the main stream still reads it.
        """
        main = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            out = fn(static_tree)
        main.wait_stream(side)
        for tensor in [out, *slots.buffers.values()]:
            tensor.record_stream(main)
        return out

    def _capture(self, fn, static_tree, eager: torch.Tensor, entry: _Entry) -> None:
        """Capture ``fn`` into ``entry``, replay once and keep the graph only if it matches the warm-up output ``eager``.

        The slots still hold the warm-up's inputs (capturing runs nothing), so
        the check replays the very same pass.
        """
        device = entry.statics[0].device
        try:
            graph = torch.cuda.CUDAGraph()
            pool = self.pools.setdefault(device, torch.cuda.graph_pool_handle())
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                captured = fn(static_tree)
            graph.replay()
            scale = max(1.0, float(eager.float().abs().max()))
            error = float((captured.float() - eager.float()).abs().max()) / scale
        except Exception as failure:  # noqa: BLE001 - any capture failure means: run this pass eagerly
            torch.cuda.synchronize(device)
            self.rejected += 1
            log_once(("capture-failed", type(failure).__name__), f"DragKit: a UNet pass could not be captured "
                     f"({type(failure).__name__}: {failure}); it runs eagerly")
            return
        if not error <= REPLAY_TOLERANCE:
            self.rejected += 1
            log_once("capture-mismatch", f"DragKit: a captured UNet pass differed from eager by {error:.2e} "
                     f"(> {REPLAY_TOLERANCE:g}); it runs eagerly")
            return
        entry.graph, entry.output = graph, captured
        self.captures += 1
        self.first_replay_errors.append(error)
        log.debug("DragKit: captured a UNet pass (first replay within %.1e of eager)", error)


def _with(leaves: list, spec, tensors: list[int], values: list[torch.Tensor]) -> Any:
    """``leaves`` rebuilt into their tree, with the tensor leaves at ``tensors`` replaced by ``values``."""
    replaced = list(leaves)
    for i, value in zip(tensors, values):
        replaced[i] = value
    return pytree.tree_unflatten(replaced, spec)
