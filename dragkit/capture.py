"""Captured UNet passes: capture a model call once per key, replay it afterwards.

A denoising loop is launch-bound on a GPU: one SD1.5 forward pass at 512²
costs ~33 ms eager and ~10 ms replayed from a CUDA graph, forward and
backward ~86 ms eager and ~20 ms replayed (see ``docs/gpu-device.md``).
:class:`PassCache` runs a pure function of tensors ``fn(tree) -> outputs``
(a tensor or a tuple of tensors) through fixed-address ("static") buffers:

1. First call of a key: the inputs are copied into new static buffers and
   ``fn`` runs eagerly on them (the warm-up; its output is the call's
   result). In ``"graph"`` mode the pass is then captured into a CUDA graph
   and replayed once, and that replay is compared with the warm-up output
   (:data:`REPLAY_TOLERANCE`); a capture that disagrees is never used (the
   key runs eagerly from then on), one that fails switches graphs off for the
   process; the reason is logged once.
2. Later calls copy the inputs into the static buffers, let the attention
   control fill its :class:`~dragkit.attention.KVSlots` (the injector copies
   the step's cached keys/values in), replay (or, in ``"eager"`` mode, run
   ``fn`` again on the static buffers), let the control drain its slots (the
   recorder copies keys/values out) and return a copy of the output.

:meth:`PassCache.run_differentiable` does the same for a pass that is
differentiated (motion supervision): it captures the forward and the
backward (to the inputs that require grad) as two graphs and returns
outputs whose backward replays the second one. Every forward must be
differentiated, if at all, before the next pass through the same cache (the
saved activations live in the cache's shared graph memory); a late backward
is refused.

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
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Union

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

Outputs = Union[torch.Tensor, tuple]
"""What a pass returns: a tensor, or a tuple of tensors."""

REPLAY_OBSERVERS: list[Callable[[torch.Tensor, bool], None]] = []
"""Called at every graph replay with the call's first input tensor and whether it is differentiable: the
passes a forward hook on the UNet cannot see (the benchmark counts them)."""

CAPACITY = 8
"""Captured passes kept (least recently used dropped first); they share one memory pool per device."""


def capture_mode(device: torch.device) -> str:
    """The mode for a pass on ``device``, from :data:`ENV_VAR` (``graph`` only ever on CUDA)."""
    wanted = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if wanted not in MODES + ("auto",):
        log_once(f"env:{wanted}", f"DragKit: {ENV_VAR}={wanted!r} is not one of auto, {', '.join(MODES)}; using auto")
        wanted = "auto"
    if wanted == "auto":
        wanted = "graph" if device.type == "cuda" else "off"
    if wanted == "graph" and (device.type != "cuda" or _graphs_disabled):
        return "eager"
    return wanted


_graphs_disabled: set = set()
"""Indices of the devices on which a capture failed; once any has, no more graphs in this process (see
:meth:`PassCache._checked`)."""


_logged: set[Hashable] = set()


def log_once(key: Hashable, message: str) -> None:
    """Log ``message`` (info) the first time ``key`` is seen in this process."""
    if key not in _logged:
        _logged.add(key)
        log.info(message)


def tensor_layout(tree: Any) -> tuple:
    """Hashable ``(shape, dtype, device, requires_grad)`` of every tensor leaf of ``tree``, in order, and whether
    inference mode is on (static buffers made under it are inference tensors, which cannot be written outside it)."""
    layout = tuple(
        (tuple(t.shape), t.dtype, t.device, t.requires_grad)
        for t in pytree.tree_leaves(tree)
        if isinstance(t, torch.Tensor)
    )
    return layout + (torch.is_inference_mode_enabled(),)


_tensor_tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Per module: ``(table, name)`` of every parameter and buffer under it (a module's ``_parameters``/``_buffers``)."""


def storage_identity(module: torch.nn.Module) -> tuple:
    """The storage address of every parameter and buffer under ``module``, in a fixed order.

    Hosts swap weights by replacing a module's parameter (ComfyUI's patching
    and lowvram casts) or by moving the whole model, so the addresses are read
    through each module's own parameter and buffer tables, listed once per
    module (walking ``parameters()`` on every call costs milliseconds).
    """
    tables = _tensor_tables.get(module)
    if tables is None:
        tables = [(table, name) for sub in module.modules() for table in (sub._parameters, sub._buffers) for name in table]
        _tensor_tables[module] = tables
    return tuple(table[name].data_ptr() if table[name] is not None else 0 for table, name in tables)


def probe_gradients(outputs: tuple) -> tuple:
    """Output gradients for checking a captured backward: seeded normal values scaled by 1/√numel (all-ones
    gradients over a large fp16 feature map can overflow the backward), the same for the same shapes."""
    grads = []
    for index, out in enumerate(outputs):
        generator = torch.Generator(device=out.device).manual_seed(index)
        values = torch.randn(out.shape, generator=generator, device=out.device, dtype=torch.float32)
        grads.append((values / max(out.numel(), 1) ** 0.5).to(out.dtype))
    return tuple(grads)


def _as_tuple(out: Outputs) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _copy(out: Outputs) -> Outputs:
    """Detached copies of ``out`` (a replay's outputs live in the graph's memory, which the next replay overwrites)."""
    return tuple(o.detach().clone() for o in out) if isinstance(out, tuple) else out.detach().clone()


def difference(a: Outputs, b: Outputs, floor: float = 1.0) -> float:
    """Largest |a - b| over all outputs, relative to max(``floor``, max |b|) (``floor`` 0: purely relative)."""
    worst = 0.0
    for x, y in zip(_as_tuple(a), _as_tuple(b)):
        scale = max(floor, float(y.detach().float().abs().max()), 1e-30)
        worst = max(worst, float((x.detach().float() - y.detach().float()).abs().max()) / scale)
    return worst


def _with(leaves: list, spec, tensors: list[int], values: list[torch.Tensor]) -> Any:
    """``leaves`` rebuilt into their tree, with the tensor leaves at ``tensors`` replaced by ``values``."""
    replaced = list(leaves)
    for i, value in zip(tensors, values):
        replaced[i] = value
    return pytree.tree_unflatten(replaced, spec)


def _observe(call: "_Call", differentiable: bool) -> None:
    for observer in REPLAY_OBSERVERS:
        observer(call.inputs[0], differentiable)


@dataclass
class _Call:
    """One call's tree, flattened: its leaves, structure, and which leaves are tensors."""

    leaves: list
    spec: Any
    tensors: list[int]

    @classmethod
    def of(cls, tree: Any) -> "_Call":
        leaves, spec = pytree.tree_flatten(tree)
        return cls(leaves, spec, [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)])

    @property
    def inputs(self) -> list[torch.Tensor]:
        return [self.leaves[i] for i in self.tensors]

    def on(self, statics: list[torch.Tensor]) -> Any:
        """The tree with its tensors replaced by ``statics``."""
        return _with(self.leaves, self.spec, self.tensors, statics)


@dataclass
class _Entry:
    """One key's static inputs, slots and (graph mode) CUDA graphs.

    ``outputs`` are the forward graph's outputs; for a differentiable pass
    ``grad_outputs``/``grad_inputs`` are the backward graph's, and
    ``pending`` the eager stand-in's outputs (with their autograd graph)
    awaiting backward.
    """

    statics: list[torch.Tensor]
    slots: KVSlots
    weights: Hashable
    graph: Any = None
    outputs: Outputs | None = None
    backward_graph: Any = None
    grad_outputs: tuple = ()
    grad_inputs: tuple = ()
    pending: tuple | None = None
    params: tuple = ()
    clock: list = field(default_factory=lambda: [0])

    def load(self, call: _Call) -> None:
        """Copy the call's input tensors into the static buffers."""
        with torch.no_grad():
            for static, value in zip(self.statics, call.inputs):
                static.copy_(value, non_blocking=True)

    def differentiable(self) -> list[torch.Tensor]:
        """What the backward differentiates for: the static inputs that require grad, then the parameters."""
        return [s for s in self.statics if s.requires_grad] + list(self.params)


class _DifferentiablePass(torch.autograd.Function):
    """Autograd node of one differentiable pass: forward and backward replay the entry's graphs (or run eagerly)."""

    @staticmethod
    def forward(ctx, entry: _Entry, fn, call: _Call, control: AttentionControl, *inputs: torch.Tensor):
        entry.load(call)
        entry.clock[0] += 1
        ctx.entry, ctx.tick = entry, entry.clock[0]
        with _bound(control, entry.slots):
            if entry.graph is not None:
                entry.graph.replay()
                _observe(call, True)
                return _as_tuple(_copy(entry.outputs))
            with torch.enable_grad():
                entry.pending = _as_tuple(fn(call.on(entry.statics)))
            return _as_tuple(_copy(entry.pending))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        entry: _Entry = ctx.entry
        if ctx.tick != entry.clock[0]:
            raise RuntimeError(
                "DragKit: a captured UNet pass was differentiated after a later pass of the same cache (its "
                "activations share the cache's graph memory); run each backward before the next pass"
            )
        wanted = entry.differentiable()
        if entry.backward_graph is not None:
            for static, grad in zip(entry.grad_outputs, grads):
                static.copy_(grad)
            entry.backward_graph.replay()
            found = [None if g is None else g.clone() for g in entry.grad_inputs]
        else:
            outputs, entry.pending = entry.pending, None
            found = torch.autograd.grad(outputs, wanted, grads, allow_unused=True)
        given = iter(found)
        inputs = [next(given) if s.requires_grad else None for s in entry.statics]
        return (None, None, None, None, *inputs, *given)


class _lent:
    """Context: ``control`` bound to ``slots`` (for a capture: no step data moves in or out)."""

    def __init__(self, control: AttentionControl, slots: KVSlots) -> None:
        self.control, self.slots = control, slots

    def __enter__(self) -> None:
        self.control.bind(self.slots)

    def __exit__(self, kind, value, traceback) -> None:
        self.control.bind(None)


class _bound(_lent):
    """Context: ``control`` bound to ``slots``, its :meth:`before_pass` on entry, :meth:`after_pass` on a clean exit."""

    def __enter__(self) -> None:
        super().__enter__()
        try:
            self.control.before_pass()
        except BaseException:
            self.control.bind(None)
            raise

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                self.control.after_pass()
        finally:
            super().__exit__(kind, value, traceback)


@dataclass
class PassCache:
    """Static-buffer runs and captured passes per key (see the module docstring)."""

    capacity: int = CAPACITY
    entries: OrderedDict = field(default_factory=OrderedDict)
    pools: dict = field(default_factory=dict)
    streams: dict = field(default_factory=dict)
    clock: list = field(default_factory=lambda: [0])
    """Passes run through this cache, shared with its entries (a backward must follow its own forward directly)."""
    captures: int = 0
    replays: int = 0
    rejected: int = 0
    first_replay_errors: list = field(default_factory=list)
    """For tests and the GPU check: graphs captured, replays (graph or eager), captures refused, and each
    accepted capture's first-replay difference from eager (:func:`difference`, see :data:`REPLAY_TOLERANCE`)."""

    def counts(self) -> dict:
        """The counters as a report: captures, replays, captures refused, the largest first-replay difference."""
        return {"captures": self.captures, "replays": self.replays, "rejected": self.rejected,
                "max_first_replay_error": max(self.first_replay_errors, default=None)}

    def drop_where(self, doomed: Callable[[Hashable], bool]) -> None:
        """Drop the entries whose key ``doomed`` says."""
        for key in [key for key in self.entries if doomed(key)]:
            del self.entries[key]

    def clear(self) -> None:
        """Drop every entry (and with them the graphs' memory) and reset the counters."""
        self.entries.clear()
        self.pools.clear()
        self.streams.clear()
        self.captures = self.replays = self.rejected = 0
        self.first_replay_errors.clear()

    def run(self, key: Hashable, fn: Callable[[Any], Outputs], tree: Any, control: AttentionControl,
            weights: Hashable, mode: str) -> Outputs:
        """``fn(tree)`` through this key's static buffers (``mode`` ``eager`` or ``graph``), without gradients.

        ``tree`` is any nesting of dicts, lists and tuples; its tensor
        leaves are the inputs copied into static buffers, its other leaves are
        passed through as they are (the key must describe what they decide).
        ``control`` is the attention control active in ``fn``; it is bound to
        the entry's slots for the call. ``weights`` is the model weights'
        identity (e.g. their storage addresses).
        """
        call = _Call.of(tree)
        self.clock[0] += 1
        entry = self._entry(key, weights)
        if entry is None:
            entry = self._new(key, call, weights, requires_grad=False)

            def make_tree():
                return call.on(entry.statics)

            with _bound(control, entry.slots):
                out = self._warm_up(make_tree, fn, entry) if mode == "graph" else fn(make_tree())
            if mode == "graph":
                with _lent(control, entry.slots):
                    self._capture(fn, make_tree, out, entry)
            return out
        entry.load(call)
        with _bound(control, entry.slots):
            if entry.graph is not None:
                entry.graph.replay()
                _observe(call, False)
                out = _copy(entry.outputs)
            else:
                out = fn(call.on(entry.statics))
        self.replays += 1
        return out

    def run_differentiable(self, key: Hashable, fn: Callable[[Any], Outputs], tree: Any, control: AttentionControl,
                           weights: Hashable, mode: str, params: tuple = ()) -> tuple:
        """Like :meth:`run`, for a pass to be differentiated: the outputs (a tuple) backpropagate to ``tree``'s
        tensors that require grad and to ``params``.

        ``params`` are leaf tensors ``fn`` reads in place (not through
        ``tree``; e.g. LoRA adapters in forward hooks): they are their own
        static buffers, so their identity is part of the weights check. In
        graph mode the first call of a key captures the forward and the
        backward and checks one replay of each against an eager run (outputs,
        and the gradients for :func:`probe_gradients`).
        """
        call = _Call.of(tree)
        weights = (weights, tuple(p.data_ptr() for p in params))
        entry = self._entry(key, weights)
        if entry is None:
            entry = self._new(key, call, weights, requires_grad=True)
            entry.params = tuple(params)
            if mode == "graph":
                with _lent(control, entry.slots):
                    self._capture_differentiable(fn, lambda: call.on(entry.statics), entry)
        else:
            self.replays += 1
        return _DifferentiablePass.apply(entry, fn, call, control, *call.inputs, *entry.params)

    def _entry(self, key: Hashable, weights: Hashable) -> _Entry | None:
        entry = self.entries.get(key)
        if entry is not None and entry.weights != weights:
            log.debug("DragKit: model weights moved or changed; recapturing")
            del self.entries[key]
            entry = None
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def _new(self, key: Hashable, call: _Call, weights: Hashable, requires_grad: bool) -> _Entry:
        statics = [t.detach().clone().requires_grad_(requires_grad and t.requires_grad) for t in call.inputs]
        entry = _Entry(statics=statics, slots=KVSlots(), weights=weights, clock=self.clock)
        self.entries[key] = entry
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return entry

    def _stream(self, device: torch.device):
        """The device's capture stream: every warm-up and capture into the shared pool runs on it."""
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return self.streams[device]

    def _warm_up(self, make_tree: Callable[[], Any], fn, entry: _Entry, grads: bool = False):
        """``fn`` run eagerly on the capture stream, as CUDA graph capture wants before its first capture.

        With ``grads``, also the backward to :meth:`_Entry.differentiable`
        for :func:`probe_gradients`; returns ``(outputs, gradients)`` then.
        What the warm-up allocates (outputs, gradients, slots) is marked as
        used on the main stream, so the allocator never hands that memory to
        the capture stream while the main stream still reads it.
        """
        device = entry.statics[0].device
        main = torch.cuda.current_stream(device)
        side = self._stream(device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            if grads:
                with torch.enable_grad():
                    out = _as_tuple(fn(make_tree()))
                    found = torch.autograd.grad(out, entry.differentiable(), probe_gradients(out), allow_unused=True)
            else:
                out, found = fn(make_tree()), ()
        main.wait_stream(side)
        for tensor in [*_as_tuple(out), *found, *entry.slots.buffers.values()]:
            if tensor is not None:
                tensor.record_stream(main)
        return (out, found) if grads else out

    def _capture(self, fn, make_tree: Callable[[], Any], eager: Outputs, entry: _Entry) -> None:
        """Capture ``fn`` into ``entry``, replay once and keep the graph only if it matches the warm-up output ``eager``.

        The slots still hold the warm-up's inputs (capturing runs nothing), so
        the check replays the very same pass.
        """
        device = entry.statics[0].device

        def capture():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool(device), stream=self._stream(device),
                                  capture_error_mode="thread_local"):
                captured = fn(make_tree())
            graph.replay()
            return difference(captured, eager), dict(graph=graph, outputs=captured)

        self._checked(capture, entry)

    def _capture_differentiable(self, fn, make_tree: Callable[[], Any], entry: _Entry) -> None:
        """Warm up, capture the forward and the backward into ``entry`` and check one replay of each against the warm-up.

        Every call of ``fn`` gets a fresh tree (ComfyUI pops ControlNet
        residuals out of the lists it is given).
        """
        device = entry.statics[0].device
        wanted = entry.differentiable()

        def capture():
            eager, eager_grads = self._warm_up(make_tree, fn, entry, grads=True)
            forward, backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            pool, stream = self._pool(device), self._stream(device)
            with torch.enable_grad():
                with torch.cuda.graph(forward, pool=pool, stream=stream, capture_error_mode="thread_local"):
                    outputs = _as_tuple(fn(make_tree()))
                grad_outputs = probe_gradients(outputs)
                with torch.cuda.graph(backward, pool=pool, stream=stream, capture_error_mode="thread_local"):
                    grad_inputs = tuple(torch.autograd.grad(outputs, wanted, grad_outputs, allow_unused=True))
            forward.replay()
            backward.replay()
            used = [(g, e) for g, e in zip(grad_inputs, eager_grads) if g is not None and e is not None]
            if not all(bool(torch.isfinite(e).all()) for _, e in used):
                raise FloatingPointError("the eager gradients to check the capture against are not finite")
            error = max(difference(outputs, eager),
                        difference(tuple(g for g, _ in used), tuple(e for _, e in used), floor=0.0))
            return error, dict(graph=forward, outputs=outputs, backward_graph=backward, grad_outputs=grad_outputs,
                               grad_inputs=grad_inputs)

        self._checked(capture, entry)

    def _pool(self, device: torch.device):
        return self.pools.setdefault(device, torch.cuda.graph_pool_handle())

    def _checked(self, capture: Callable[[], tuple[float, dict]], entry: _Entry) -> None:
        """Run ``capture`` (-> first-replay error, graph attributes); set them on ``entry`` only within tolerance.

        A capture that raises leaves this key eager. A failure inside CUDA's
        stream capture can leave the caching allocator unable to tell what a
        later capture may use, so after any failure graphs are switched off
        for the rest of the process (:func:`capture_mode` then says
        ``eager``); the current stream is restored in every case.
        """
        device = entry.statics[0].device
        stream = torch.cuda.current_stream(device)
        try:
            error, graphs = capture()
        except Exception as failure:  # noqa: BLE001 - any capture failure means: run eagerly from now on
            torch.cuda.synchronize(device)
            self.rejected += 1
            _graphs_disabled.add(device.index if device.index is not None else torch.cuda.current_device())
            log_once(("capture-failed", type(failure).__name__), f"DragKit: a UNet pass could not be captured "
                     f"({type(failure).__name__}: {failure}); UNet passes run eagerly from now on")
            return
        finally:
            torch.cuda.set_stream(stream)
        if not error <= REPLAY_TOLERANCE:
            self.rejected += 1
            log_once("capture-mismatch", f"DragKit: a captured UNet pass differed from eager by {error:.2e} "
                     f"(> {REPLAY_TOLERANCE:g}); it runs eagerly")
            return
        for name, value in graphs.items():
            setattr(entry, name, value)
        self.captures += 1
        self.first_replay_errors.append(error)
        log.debug("DragKit: captured a UNet pass (first replay within %.1e of eager)", error)

