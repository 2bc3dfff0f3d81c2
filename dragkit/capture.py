"""Captured UNet passes: capture a model call once per key, replay it afterwards.

A denoising loop is launch-bound on a GPU: one SD1.5 forward pass at 512²
costs ~33 ms eager and ~10 ms replayed from a CUDA graph, forward and
backward ~86 ms eager and ~20 ms replayed (see ``docs/capture.md``).
:class:`PassCache` runs a pure function of tensors ``fn(tree) -> outputs``
(a tensor or a tuple of tensors) through fixed-address ("static") buffers:

1. First call of a key: the inputs are copied into new static buffers and
   ``fn`` runs eagerly on them (the warm-up; its output is the call's
   result). In ``"graph"`` mode the pass is then captured into a CUDA graph
   and replayed once, and that replay is compared with the warm-up output
   (:func:`difference`, :data:`REPLAY_TOLERANCE`; NaN or a different output
   count refuses). A capture that disagrees, or whose check cannot be made
   (non-finite gradients, out of memory), refuses its key: that key runs
   plainly from then on. Any other capture failure switches graphs off for
   the process (every pass then runs plainly); the reason is logged once.
2. Later calls copy the inputs into the static buffers, let the attention
   control fill its :class:`~dragkit.attention.KVSlots` (the injector copies
   the step's cached keys/values in), replay (or, in ``"eager"`` and
   ``"trace"`` modes, run ``fn`` again on the static buffers), let the
   control drain its slots (the recorder copies keys/values out) and return
   a copy of the output.

:meth:`PassCache.run_differentiable` does the same for a pass that is
differentiated (motion supervision): it captures the forward and the
backward (to the inputs that require grad) as two graphs and returns
outputs whose backward replays the second one. Every forward must be
differentiated, if at all, before the next pass through the same cache (the
saved activations live in the cache's shared graph memory); a late backward
is refused.

``"eager"`` mode is the CPU stand-in for replay: the same static buffers,
slots and copies, with ``fn`` run instead of a graph, so the tests can show
on any machine that the static path equals the plain one bit for bit. It
cannot show that the key is complete (every "replay" re-runs the Python), so
``"trace"`` mode also records what the capture reads (:class:`Tracer`) and
requires every replay to read the same.

What a capture bakes in is the caller's job to put in the key: shapes,
dtypes, batch, the attention control's :meth:`signature`, the model's
patches (:func:`tensor_layout` adds grad, inference and autocast state).
The weights' identity is checked before every replay: a changed identity
(the model reloaded, re-patched or moved) drops the entry; ``None`` (a
tensor subclass among the weights, :func:`storage_identity`) runs the call
plainly. A key whose passes keep being evicted and recaptured stops
capturing its group (:data:`THRASH_LIMIT`).
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Union

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .attention import AttentionControl, KVSlots

log = logging.getLogger("DragKit")

MODES = ("off", "eager", "trace", "graph")
"""``off``: plain calls; ``eager``: the static-buffer path without a graph (CPU stand-in); ``trace``: ``eager``
that also checks every replay reads what its capture read (:class:`Tracer`); ``graph``: CUDA graphs."""

ENV_VAR = "DRAGKIT_CAPTURE"
"""Environment variable choosing the mode: ``auto`` (default: ``off`` until a GPU run has proven the graphs),
``on`` (= ``graph``) or one of :data:`MODES`."""

REPLAY_TOLERANCE = 1e-3
"""Largest |replay - eager| accepted at the first replay, relative to max(1, max |eager|)."""

Outputs = Union[torch.Tensor, tuple]
"""What a pass returns: a tensor, or a tuple of tensors."""

REPLAY_OBSERVERS: list[Callable[[torch.Tensor, bool], None]] = []
"""Called at every graph replay with the call's first input tensor and whether it is differentiable: the
passes a forward hook on the UNet cannot see (the benchmark counts them)."""

CAPACITY = 8
"""Captured passes kept (least recently used dropped first)."""

THRASH_LIMIT = 4
"""Recaptures of evicted keys after which a group (a model) captures no new keys (its captured keys still replay)."""


def capture_mode(device: torch.device) -> str:
    """The mode for a pass on ``device``, from :data:`ENV_VAR`.

    ``graph`` only ever on NVIDIA CUDA (``eager`` on other devices); ``off``
    on ROCm (untested there) and once a failed capture has switched graphs
    off for the process (:meth:`PassCache._checked`).
    """
    wanted = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if wanted == "on":
        wanted = "graph"
    if wanted not in MODES + ("auto",):
        log_once(f"env:{wanted}", f"DragKit: {ENV_VAR}={wanted!r} is not one of auto, on, {', '.join(MODES)}; "
                 "using auto")
        wanted = "auto"
    if wanted == "auto":
        return "off"
    if wanted != "graph":
        return wanted
    if device.type != "cuda":
        return "eager"
    if torch.version.hip is not None:
        log_once("rocm", "DragKit: captured UNet passes are not tested on ROCm; UNet passes run plainly")
        return "off"
    return "off" if _graphs_disabled else "graph"


_graphs_disabled: set = set()
"""Indices of the devices on which a capture failed; once any has, no more graphs in this process (see
:meth:`PassCache._checked`)."""


_logged: set[Hashable] = set()


def log_once(key: Hashable, message: str) -> None:
    """Log ``message`` (info) the first time ``key`` is seen in this process."""
    if key not in _logged:
        _logged.add(key)
        log.info(message)


def autocast_state() -> tuple:
    """Whether autocast is on, and to which dtype, for CUDA and the CPU (a capture bakes in the casts it makes)."""
    return tuple((kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) for kind in ("cuda", "cpu"))


def tensor_layout(tree: Any) -> tuple:
    """Hashable ``(shape, dtype, device, requires_grad)`` of every tensor leaf of ``tree``, in order, then whether
    inference mode is on (static buffers made under it are inference tensors, which cannot be written outside it)
    and the :func:`autocast_state`."""
    layout = tuple(
        (tuple(t.shape), t.dtype, t.device, t.requires_grad)
        for t in pytree.tree_leaves(tree)
        if isinstance(t, torch.Tensor)
    )
    return layout + (torch.is_inference_mode_enabled(), autocast_state())


_tensor_tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Per module: ``(table, name)`` of every parameter and buffer under it (a module's ``_parameters``/``_buffers``)."""

PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter) + ((torch.nn.Buffer,) if hasattr(torch.nn, "Buffer") else ())
"""Weight types a capture can bake in; any other tensor subclass (quantised weights from other packs) dispatches
in Python and may have no storage, so its model's passes run plainly."""


def storage_identity(module: torch.nn.Module) -> tuple | None:
    """The storage address of every parameter and buffer under ``module``, in a fixed order; ``None`` (logged
    once) when one is a tensor subclass or has no storage.

    Hosts swap weights by replacing a module's parameter (ComfyUI's patching
    and lowvram casts) or by moving the whole model, so the addresses are read
    through each module's own parameter and buffer tables, listed once per
    module (walking ``parameters()`` on every call costs milliseconds).
    """
    tables = _tensor_tables.get(module)
    if tables is None:
        tables = [(table, name) for sub in module.modules() for table in (sub._parameters, sub._buffers) for name in table]
        _tensor_tables[module] = tables
    try:
        return tuple(_address(table[name]) for table, name in tables)
    except _Unplain as unplain:
        log_once(("subclass", unplain.args[0]), f"DragKit: the model has {unplain.args[0]} weights (a tensor "
                 "subclass); its UNet passes run plainly")
        return None


class _Unplain(Exception):
    """A weight a capture cannot bake in (:data:`PLAIN_TENSOR_TYPES`); the argument names its type."""


def _address(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    if type(t) not in PLAIN_TENSOR_TYPES:
        raise _Unplain(type(t).__name__)
    try:
        return t.data_ptr()
    except RuntimeError:
        raise _Unplain("storage-less") from None


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
    """Largest |a - b| over all outputs, relative to max(``floor``, max |b|) (``floor`` 0: purely relative).

    ``inf`` when the outputs differ in count or shape, or either holds a
    NaN or an infinity: such a capture cannot be shown equal to eager.
    """
    a, b = _as_tuple(a), _as_tuple(b)
    if len(a) != len(b):
        return math.inf
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return math.inf
        if x.numel() == 0:
            continue
        x, y = x.detach().float(), y.detach().float()
        if not bool(torch.isfinite(x).all() & torch.isfinite(y).all()):
            return math.inf
        scale = max(floor, float(y.abs().amax()), 1e-30)
        worst = max(worst, float((x - y).abs().amax()) / scale)
    return worst


def empty_device_cache(device: torch.device) -> None:
    """Hand the caching allocator's unused blocks on ``device`` back to the driver (after graphs were dropped)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def free_for_capture(device: torch.device) -> int:
    """Bytes a new capture can use on CUDA ``device``: free on the device plus the unused blocks cached in the
    allocator's default pool. (Blocks cached in graph pools are usable only by their graphs; ComfyUI's
    ``get_free_memory`` counts them as free.)"""
    free, _ = torch.cuda.mem_get_info(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        segments = torch.cuda.memory_snapshot()
    except RuntimeError:  # an allocator backend without snapshots (cudaMallocAsync): what the driver says is free
        return free
    return free + sum(s["total_size"] - s["active_size"] for s in segments
                      if s.get("device") == index and tuple(s.get("segment_pool_id", (0, 0))) == (0, 0))


def _with(leaves: list, spec, tensors: list[int], values: list[torch.Tensor]) -> Any:
    """``leaves`` rebuilt into their tree, with the tensor leaves at ``tensors`` replaced by ``values``."""
    replaced = list(leaves)
    for i, value in zip(tensors, values):
        replaced[i] = value
    return pytree.tree_unflatten(replaced, spec)


def _observe(call: "_Call", differentiable: bool) -> None:
    for observer in REPLAY_OBSERVERS:
        observer(call.inputs[0], differentiable)


class TraceMismatch(AssertionError):
    """In ``trace`` mode: a replay read something other than its capture (a value missing from the key)."""


class Tracer(TorchDispatchMode):
    """Records every op a pass runs: its name, and each argument as the capture would see it.

    A tensor argument is described by its role and shape: ``("static", i)``
    (the pass's i-th static input), ``("slot", role, layer)``, ``("weight",
    i)`` (the i-th address of the weights identity), ``("made",)`` (made by
    an earlier op of the pass), or ``("external", address, values)`` (read
    from outside: a graph would read that address; values are kept for
    tensors of at most :attr:`SMALL` elements, e.g. a scalar made from a
    Python number). Other arguments (numbers, sizes, dtypes) are kept as they
    are. Two runs of a pass that a graph could replay have equal traces.
    """

    SMALL = 16

    def __init__(self, known: dict[int, tuple]) -> None:
        super().__init__()
        self.known = known
        self.made: set[int] = set()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves, spec = pytree.tree_flatten((args, kwargs))
        described = tuple(self._describe(leaf) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves)
        out = func(*args, **kwargs)
        for made in pytree.tree_leaves(out):
            if isinstance(made, torch.Tensor):
                self.made.add(_storage(made))
        self.ops.append((str(func), str(spec), described))
        return out

    def _describe(self, t: torch.Tensor) -> tuple:
        address = _storage(t)
        role = self.known.get(address) or self.known.get(t.data_ptr())
        if role is None:
            if address in self.made:
                role = ("made",)
            else:
                small = t.numel() <= self.SMALL and t.device.type != "meta"
                values = tuple(t.detach().flatten().tolist()) if small else None
                role = ("external", address, values)
        return role + (tuple(t.shape), t.dtype)


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


def first_difference(expected: list[tuple], found: list[tuple]) -> str:
    """Where two traces part: the first differing op, or the lengths."""
    for index, (want, got) in enumerate(zip(expected, found)):
        if want != got:
            return f"op {index}: captured {want}, replayed {got}"
    return f"the capture ran {len(expected)} ops, the replay {len(found)}"


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
    awaiting backward. ``trace`` (trace mode) is what the capture read.
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
    trace: list | None = None
    clock: list = field(default_factory=lambda: [0])

    def load(self, call: _Call) -> None:
        """Copy the call's input tensors into the static buffers."""
        with torch.no_grad():
            for static, value in zip(self.statics, call.inputs):
                static.copy_(value, non_blocking=True)

    def differentiable(self) -> list[torch.Tensor]:
        """What the backward differentiates for: the static inputs that require grad, then the parameters."""
        return [s for s in self.statics if s.requires_grad] + list(self.params)

    def tracer(self) -> Tracer:
        """A :class:`Tracer` that knows this entry's static inputs, slots and weights."""
        known: dict[int, tuple] = {}
        for index, address in enumerate(_addresses(self.weights)):
            known.setdefault(address, ("weight", index))
        for (role, layer), slot in self.slots.buffers.items():
            known[_storage(slot)] = ("slot", role, layer)
        for index, static in enumerate(self.statics):
            known[_storage(static)] = ("static", index)
        return Tracer(known)

    def traced(self, fn, tree: Any) -> tuple[Outputs, list]:
        """``fn(tree)`` and its trace."""
        with self.tracer() as tracer:
            out = fn(tree)
        return out, tracer.ops

    def check(self, fn, tree: Any) -> Outputs:
        """``fn(tree)``, which must read what the capture read (:class:`TraceMismatch` otherwise)."""
        out, ops = self.traced(fn, tree)
        if ops != self.trace:
            raise TraceMismatch("DragKit: a replay of a captured pass read something other than its capture, so a "
                                f"value that changes between calls is missing from the key ({first_difference(self.trace, ops)})")
        return out


def _addresses(weights: Hashable) -> list[int]:
    """The integer addresses inside a weights identity (nested tuples of ints)."""
    if isinstance(weights, int) and not isinstance(weights, bool):
        return [weights]
    if isinstance(weights, tuple):
        return [address for part in weights for address in _addresses(part)]
    return []


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
                tree = call.on(entry.statics)
                entry.pending = _as_tuple(fn(tree) if entry.trace is None else entry.check(fn, tree))
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


class _Refused(Exception):
    """A capture that cannot be checked or used, for a reason that leaves the allocator sound: only its key is
    refused (the argument says why)."""


_PER_KEY_FAILURES = (FloatingPointError, torch.cuda.OutOfMemoryError)
"""Capture errors that refuse only their key: non-finite check gradients, out of memory (neither breaks the
allocator); anything else switches graphs off for the process."""


@dataclass
class PassCache:
    """Static-buffer runs and captured passes per key (see the module docstring).

    ``group`` maps a key to what it belongs to (e.g. its model): graphs of a
    group share one memory pool per device (dropping a group's entries frees
    its pool) and the thrash guard counts per group.
    """

    capacity: int = CAPACITY
    group: Callable[[Hashable], Hashable] = lambda key: None
    entries: OrderedDict = field(default_factory=OrderedDict)
    pools: dict = field(default_factory=dict)
    streams: dict = field(default_factory=dict)
    clock: list = field(default_factory=lambda: [0])
    """Passes run through this cache, shared with its entries (a backward must follow its own forward directly)."""
    refused: set = field(default_factory=set)
    """Keys that run plainly (their capture differed from eager, or could not be checked)."""
    evicted: set = field(default_factory=set)
    thrash: dict = field(default_factory=dict)
    """Keys dropped for capacity, and per group how many of them came back (recaptures)."""
    captures: int = 0
    replays: int = 0
    rejected: int = 0
    first_replay_errors: list = field(default_factory=list)
    """For tests and the GPU check: graphs captured, replays (graph or eager), captures refused, and each
    accepted capture's first-replay difference from eager (:func:`difference`, see :data:`REPLAY_TOLERANCE`)."""

    def counts(self) -> dict:
        """The counters as a report: captures, replays, captures refused, the largest first-replay difference,
        groups stopped by the thrash guard."""
        return {"captures": self.captures, "replays": self.replays, "rejected": self.rejected,
                "max_first_replay_error": max(self.first_replay_errors, default=None),
                "thrashing": sum(count >= THRASH_LIMIT for count in self.thrash.values())}

    def release(self, doomed: Callable[[Hashable], bool]) -> int:
        """Drop the entries whose key ``doomed`` says and the memory pools no remaining entry uses, and empty the
        allocator's cache when graphs went (their pool memory returns to the device); returns how many went."""
        keys = [key for key in self.entries if doomed(key)]
        devices = {self.entries[key].statics[0].device for key in keys if self.entries[key].graph is not None}
        for key in keys:
            del self.entries[key]
        live = {(entry.statics[0].device, self.group(key)) for key, entry in self.entries.items()}
        for pool in [pool for pool in self.pools if pool not in live]:
            del self.pools[pool]
        for device in devices:
            empty_device_cache(device)
        return len(keys)

    def clear(self) -> None:
        """Drop every entry (and with them the graphs' memory) and reset the counters and refusals."""
        self.release(lambda key: True)
        self.pools.clear()
        self.streams.clear()
        self.refused.clear()
        self.evicted.clear()
        self.thrash.clear()
        self.captures = self.replays = self.rejected = 0
        self.first_replay_errors.clear()

    def run(self, key: Hashable, fn: Callable[[Any], Outputs], tree: Any, control: AttentionControl,
            weights: Hashable, mode: str) -> Outputs:
        """``fn(tree)`` through this key's static buffers (``mode`` ``eager``, ``trace`` or ``graph``), without
        gradients.

        ``tree`` is any nesting of dicts, lists and tuples; its tensor
        leaves are the inputs copied into static buffers, its other leaves are
        passed through as they are (the key must describe what they decide).
        ``control`` is the attention control active in ``fn``; it is bound to
        the entry's slots for the call. ``weights`` is the model weights'
        identity (e.g. their storage addresses; ``None``: the call runs
        plainly). A refused key, or a new key of a thrashing group, runs
        plainly too.
        """
        call = _Call.of(tree)
        self.clock[0] += 1
        entry = self._entry(key, weights)
        if entry is None:
            if not self._may_capture(key, weights):
                return fn(tree)
            entry = self._new(key, call, weights, requires_grad=False)

            def make_tree():
                return call.on(entry.statics)

            try:
                with _bound(control, entry.slots):
                    out = self._warm_up(make_tree, fn, entry) if mode == "graph" else fn(make_tree())
            except _PER_KEY_FAILURES as failure:
                self._refuse(key, entry, failure)
                return fn(tree)
            if mode == "graph":
                with _lent(control, entry.slots):
                    self._capture(key, fn, make_tree, out, entry)
            elif mode == "trace":
                with _lent(control, entry.slots):
                    captured, entry.trace = entry.traced(fn, make_tree())
                if not difference(captured, out) <= REPLAY_TOLERANCE:
                    raise TraceMismatch("DragKit: two eager runs of a pass on the same inputs differ")
            return out
        entry.load(call)
        with _bound(control, entry.slots):
            if entry.graph is not None:
                entry.graph.replay()
                _observe(call, False)
                out = _copy(entry.outputs)
            elif entry.trace is not None:
                out = entry.check(fn, call.on(entry.statics))
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
        and the gradients for :func:`probe_gradients`); in trace mode it
        records a capture's trace, and every forward must match it.
        """
        call = _Call.of(tree)
        entry = None
        if weights is not None:
            try:
                weights = (weights, tuple(_address(p) for p in params))
            except _Unplain:
                weights = None
        if weights is not None:
            entry = self._entry(key, weights)
        if entry is None:
            if not self._may_capture(key, weights):
                return _as_tuple(fn(tree))
            entry = self._new(key, call, weights, requires_grad=True)
            entry.params = tuple(params)
            if mode == "graph":
                with _lent(control, entry.slots):
                    self._capture_differentiable(key, fn, lambda: call.on(entry.statics), entry)
                if key in self.refused:
                    return _as_tuple(fn(tree))
            elif mode == "trace":
                with _lent(control, entry.slots), torch.enable_grad():
                    fn(call.on(entry.statics))
                    entry.trace = entry.traced(fn, call.on(entry.statics))[1]
        else:
            self.replays += 1
        return _DifferentiablePass.apply(entry, fn, call, control, *call.inputs, *entry.params)

    def _may_capture(self, key: Hashable, weights: Hashable) -> bool:
        """Whether a new entry may be made for ``key``: not refused, weights that a capture can bake in, and a
        group the thrash guard has not stopped."""
        if weights is None or key in self.refused:
            return False
        group = self.group(key)
        if key in self.evicted:
            self.evicted.discard(key)
            self.thrash[group] = self.thrash.get(group, 0) + 1
            if self.thrash[group] == THRASH_LIMIT:
                log_once(("thrash", group), f"DragKit: UNet passes were evicted and recaptured {THRASH_LIMIT} times "
                         f"(more than {self.capacity} capture keys in a loop); this model's new keys run plainly")
        return self.thrash.get(group, 0) < THRASH_LIMIT

    def _refuse(self, key: Hashable, entry: _Entry, failure: BaseException) -> None:
        """Refuse ``key`` (it runs plainly from now on) after ``failure``; its entry and memory go."""
        self.rejected += 1
        self.refused.add(key)
        log_once(("capture-refused", type(failure).__name__), f"DragKit: a UNet pass was not captured "
                 f"({type(failure).__name__}: {failure}); that pass runs plainly")
        if self.entries.get(key) is entry:
            self.release(lambda k: k == key)
        empty_device_cache(entry.statics[0].device if entry.statics else torch.device("cpu"))

    def _entry(self, key: Hashable, weights: Hashable) -> _Entry | None:
        entry = self.entries.get(key)
        if entry is not None and entry.weights != weights:
            log.debug("DragKit: model weights moved or changed; recapturing")
            self.release(lambda k: k == key)
            entry = None
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def _new(self, key: Hashable, call: _Call, weights: Hashable, requires_grad: bool) -> _Entry:
        statics = [t.detach().clone().requires_grad_(requires_grad and t.requires_grad) for t in call.inputs]
        entry = _Entry(statics=statics, slots=KVSlots(), weights=weights, clock=self.clock)
        self.entries[key] = entry
        while len(self.entries) > self.capacity:
            evicted, _ = self.entries.popitem(last=False)
            if len(self.evicted) >= 64 * self.capacity:
                self.evicted.clear()
            self.evicted.add(evicted)
        return entry

    def _stream(self, device: torch.device):
        """The device's capture stream: every warm-up and capture runs on it."""
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

    def _capture(self, key: Hashable, fn, make_tree: Callable[[], Any], eager: Outputs, entry: _Entry) -> None:
        """Capture ``fn`` into ``entry``, replay once and keep the graph only if it matches the warm-up output ``eager``.

        The slots still hold the warm-up's inputs (capturing runs nothing), so
        the check replays the very same pass.
        """
        device = entry.statics[0].device

        def capture():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool(device, key), stream=self._stream(device),
                                  capture_error_mode="thread_local"):
                captured = fn(make_tree())
            graph.replay()
            return difference(captured, eager), dict(graph=graph, outputs=captured)

        self._checked(key, capture, entry)

    def _capture_differentiable(self, key: Hashable, fn, make_tree: Callable[[], Any], entry: _Entry) -> None:
        """Warm up, capture the forward and the backward into ``entry`` and check one replay of each against the warm-up.

        Every call of ``fn`` gets a fresh tree (ComfyUI pops ControlNet
        residuals out of the lists it is given).
        """
        device = entry.statics[0].device
        wanted = entry.differentiable()

        def capture():
            try:
                eager, eager_grads = self._warm_up(make_tree, fn, entry, grads=True)
            except torch.cuda.OutOfMemoryError as failure:
                raise _Refused(f"out of memory in the warm-up: {failure}") from None
            forward, backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            pool, stream = self._pool(device, key), self._stream(device)
            with torch.enable_grad():
                with torch.cuda.graph(forward, pool=pool, stream=stream, capture_error_mode="thread_local"):
                    outputs = _as_tuple(fn(make_tree()))
                grad_outputs = probe_gradients(outputs)
                with torch.cuda.graph(backward, pool=pool, stream=stream, capture_error_mode="thread_local"):
                    grad_inputs = tuple(torch.autograd.grad(outputs, wanted, grad_outputs, allow_unused=True))
            forward.replay()
            backward.replay()
            if [g is None for g in grad_inputs] != [e is None for e in eager_grads]:
                raise _Refused("the captured backward reaches other inputs than the eager one")
            used = [(g, e) for g, e in zip(grad_inputs, eager_grads) if e is not None]
            if not all(bool(torch.isfinite(e).all()) for _, e in used):
                raise _Refused("the eager gradients to check the capture against are not finite")
            error = max(difference(outputs, eager),
                        difference(tuple(g for g, _ in used), tuple(e for _, e in used), floor=0.0))
            return error, dict(graph=forward, outputs=outputs, backward_graph=backward, grad_outputs=grad_outputs,
                               grad_inputs=grad_inputs)

        self._checked(key, capture, entry)

    def _pool(self, device: torch.device, key: Hashable):
        """The memory pool of ``key``'s group on ``device`` (freed when the group's last graph goes)."""
        return self.pools.setdefault((device, self.group(key)), torch.cuda.graph_pool_handle())

    def _checked(self, key: Hashable, capture: Callable[[], tuple[float, dict]], entry: _Entry) -> None:
        """Run ``capture`` (-> first-replay error, graph attributes); set them on ``entry`` only within tolerance.

        A capture that differs from eager (NaN included), cannot be checked
        (:class:`_Refused`, e.g. non-finite gradients) or runs out of memory
        refuses its key (:meth:`_refuse`). Any other failure inside CUDA's
        stream capture can leave the caching allocator unable to tell what a
        later capture may use, so it switches graphs off for the rest of the
        process (:func:`capture_mode` then says ``off``), refuses the key and
        drops this cache's other graphs (no longer used). The current stream
        is restored in every case.
        """
        device = entry.statics[0].device
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        try:
            error, graphs = capture()
        except (_Refused, *_PER_KEY_FAILURES) as failure:
            self._refuse(key, entry, failure)
            return
        except Exception as failure:  # noqa: BLE001 - any other capture failure: no more graphs in this process
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            _graphs_disabled.add(device.index if device.index is not None or device.type != "cuda"
                                 else torch.cuda.current_device())
            log_once(("capture-failed", type(failure).__name__), f"DragKit: a UNet pass could not be captured "
                     f"({type(failure).__name__}: {failure}); captured passes are off for this process")
            self._refuse(key, entry, failure)
            self.release(lambda other: True)
            return
        finally:
            if stream is not None:
                torch.cuda.set_stream(stream)
        if not error <= REPLAY_TOLERANCE:
            self._refuse(key, entry, _Refused(f"the first replay differed from eager by {error:.2e} "
                                              f"(> {REPLAY_TOLERANCE:g})"))
            return
        for name, value in graphs.items():
            setattr(entry, name, value)
        self.captures += 1
        self.first_replay_errors.append(error)
        log.debug("DragKit: captured a UNet pass (first replay within %.1e of eager)", error)
