"""Self-attention layers, the key/value cache, and the controls that record or inject keys/values.

A backend (ComfyUI MODEL or diffusers UNet) lists its self-attention layers
as :class:`AttnLayer` values, in execution order, and calls the active
:class:`AttentionControl` from inside each one, after the key/value
projections and before the attention product::

    k, v = control(layer, k, v)

``k`` and ``v`` are ``(B, tokens, channels)`` with ``tokens = h * w`` of the
layer's feature map (row-major) and ``channels = heads * head_dim``.
Layers are chosen by role (:func:`select_layers`), never by hard-coded SD1.5
indices, so other UNets work.

The :class:`AttnCache` is what DDIM Invert records: per recorded timestep and
layer the source image's keys and values, plus the schedule, the latent
trajectory and the source latent. Keys are the UNet's *timestep argument*:
sampling at timestep t injects what the inversion recorded when it evaluated
the UNet at t (FastDrag's consistency rule).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .errors import DragInputError
from .schedule import DDIMSchedule

STAGES = ("down", "mid", "up")


@dataclass(frozen=True)
class AttnLayer:
    """One self-attention layer of a UNet.

    Attributes:
        index: position among the UNet's self-attention layers in execution
            order (SD1.5: 0-5 encoder, 6 middle, 7-15 decoder).
        stage: ``"down"`` (encoder), ``"mid"`` or ``"up"`` (decoder).
        name: the backend's own name for the layer (for messages).
        channels: width of its keys and values (heads x head_dim).
        downscale: its feature map is the latent's size divided by this
            (1 at the UNet's full resolution; SD1.5's decoder: 4, 2, 1).
    """

    index: int
    stage: str
    name: str
    channels: int
    downscale: int = 1


_RANGE = re.compile(r"^(\d+)\s*-\s*(\d*)$")
_STAGE_WORDS = {"encoder": "down", "down": "down", "middle": "mid", "mid": "mid", "decoder": "up", "up": "up"}

LAYER_SPEC_HELP = (
    'Comma-separated: "decoder", "encoder", "middle", "all", "none", "masactrl" (the decoder layers of every '
    "resolution but the coarsest one that has attention, i.e. MasaCtrl/DragDiffusion's layers 10-15 on SD1.5 "
    "and the 6 layers of the middle decoder level on SDXL), a layer index in execution order "
    '("10"), or a range ("10-15", "10-" = from 10 on). SD1.5 has 16 self-attention layers: 0-5 encoder, '
    "6 middle, 7-15 decoder."
)


def select_layers(layers: tuple[AttnLayer, ...], spec: str) -> tuple[AttnLayer, ...]:
    """The layers a spec names, in execution order (see :data:`LAYER_SPEC_HELP`)."""
    if not isinstance(spec, str):
        raise DragInputError(f"the layer selection must be text, got {type(spec).__name__}")
    chosen: set[int] = set()
    terms = [t.strip().lower() for t in spec.split(",") if t.strip()]
    if not terms:
        raise DragInputError(f"empty layer selection. {LAYER_SPEC_HELP}")
    count = len(layers)
    for term in terms:
        if term == "none":
            continue
        if term == "all":
            chosen.update(layer.index for layer in layers)
        elif term == "masactrl":
            chosen.update(layer.index for layer in masactrl_layers(layers))
        elif term in _STAGE_WORDS:
            chosen.update(layer.index for layer in layers if layer.stage == _STAGE_WORDS[term])
        elif term.isdigit() or _RANGE.match(term):
            lo, hi = _parse_range(term, count)
            chosen.update(range(lo, hi + 1))
        else:
            raise DragInputError(f'cannot read layer selection term "{term}". {LAYER_SPEC_HELP}')
    return tuple(layer for layer in layers if layer.index in chosen)


def masactrl_layers(layers: tuple[AttnLayer, ...]) -> tuple[AttnLayer, ...]:
    """The decoder layers mutual self-attention uses, chosen by role.

    Every decoder self-attention layer finer than the coarsest decoder level
    that has attention (SD1.5: the two highest-resolution of its three
    attention levels, layers 10-15; SDXL: its 2-block level, not the 10-block
    one). When the decoder has attention at one resolution only, all of it.
    """
    decoder = [layer for layer in layers if layer.stage == "up"]
    if not decoder:
        return ()
    coarsest = max(layer.downscale for layer in decoder)
    finer = tuple(layer for layer in decoder if layer.downscale < coarsest)
    return finer or tuple(decoder)


def _parse_range(term: str, count: int) -> tuple[int, int]:
    if term.isdigit():
        lo = hi = int(term)
    else:
        match = _RANGE.match(term)
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) else count - 1
    if lo > hi or hi >= count:
        raise DragInputError(f'layer range "{term}" is outside 0-{count - 1} (this model has {count} self-attention layers)')
    return lo, hi


class AttentionControl:
    """Base control: sees every self-attention layer; leaves keys and values alone.

    Loops call :meth:`begin_step` with the UNet timestep argument before each
    model evaluation, so a control knows which step it is in even when the
    host splits one step into several model calls.

    A captured UNet pass (:mod:`dragkit.capture`) runs the layers' Python
    code once, at capture, and replays its kernels afterwards. So a control
    states in :meth:`signature` every choice it makes in Python for the
    current step (the capture key includes it), and moves step-dependent data
    through the :class:`KVSlots` it is bound to (:meth:`bind`):
    :meth:`before_pass` fills them before each pass, :meth:`after_pass`
    reads them after. Unbound, a control works directly on the tensors.
    """

    def __init__(self) -> None:
        self.timestep: int | None = None
        self.slots: KVSlots | None = None

    def begin_step(self, timestep: int) -> None:
        self.timestep = timestep

    def signature(self) -> tuple:
        """What this control decides in Python for the current step (hashable)."""
        return (type(self).__name__,)

    def bind(self, slots: KVSlots | None) -> None:
        """Read and write step data through ``slots`` (``None``: directly)."""
        self.slots = slots

    def before_pass(self) -> None:
        """Fill the bound slots with this step's inputs (called before every UNet pass)."""

    def after_pass(self) -> None:
        """Collect this step's outputs from the bound slots (called after every UNet pass)."""

    def __call__(self, layer: AttnLayer, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, v


class KVSlots:
    """Fixed-address key/value buffers of one captured UNet pass, per role and layer.

    A CUDA graph reads and writes the addresses it was captured with, so the
    keys/values a control injects or records go through these buffers: the
    first (eager) pass makes them, every later pass reuses them. Each buffer
    has the shape, dtype and device of the tensor it was made like, e.g. a
    layer's ``(B, tokens, channels)`` keys.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, int], torch.Tensor] = {}

    def get(self, role: str, layer_index: int, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The ``(role, layer_index)`` buffer, made like ``like`` if missing; and whether it was just made."""
        buffer = self.buffers.get((role, layer_index))
        if buffer is not None and buffer.shape == like.shape and buffer.dtype == like.dtype and buffer.device == like.device:
            return buffer, False
        buffer = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        self.buffers[(role, layer_index)] = buffer
        return buffer, True


@dataclass
class AttnCache:
    """Keys/values and latents recorded by DDIM inversion of one source latent.

    Attributes:
        schedule: the DDIM schedule of the inversion.
        layers: the recorded layers (may be empty: then only latents are kept).
        model_key: identity of the model that recorded it (backend-defined).
        source: the source latent z0, VP, ``(1, C, h, w)`` float32.
        trajectory: timestep -> the latent after inverting up to that
            timestep, VP ``(1, C, h, w)`` float32 (the last one is z_t*).
        kv: timestep -> layer index -> ``(K, V)``, each ``(1, tokens, channels)``
            in the model's compute dtype, on :attr:`storage_device`.
        storage_device: where the keys/values live (compute device or CPU).
    """

    schedule: DDIMSchedule
    layers: tuple[AttnLayer, ...]
    model_key: str
    source: torch.Tensor
    trajectory: dict[int, torch.Tensor] = field(default_factory=dict)
    kv: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    storage_device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.source.shape)

    @property
    def z_star(self) -> torch.Tensor:
        """The inverted latent at t* (VP)."""
        return self.trajectory[self.schedule.t_star]

    def kv_nbytes(self) -> int:
        """Bytes held by keys and values over all steps and layers."""
        return sum(t.numel() * t.element_size() for step in self.kv.values() for pair in step.values() for t in pair)

    def kv_nbytes_per_step(self) -> int:
        return self.kv_nbytes() // max(len(self.kv), 1)

    def describe(self) -> str:
        """One line for the log: layers, steps and size."""
        mib = self.kv_nbytes() / 2**20
        per_step = self.kv_nbytes_per_step() / 2**20
        return (
            f"{len(self.layers)} self-attention layers x {len(self.kv)} steps = {mib:.1f} MiB "
            f"({per_step:.2f} MiB per step) on {self.storage_device}; trajectory of {len(self.trajectory)} latents"
        )

    def check_compatible(self, latent: torch.Tensor, model_key: str) -> None:
        """Raise unless ``latent`` and the model match what this cache was recorded with."""
        if tuple(latent.shape[1:]) != self.latent_shape[1:]:
            raise DragInputError(
                f"the attention cache was recorded on a latent of shape {self.latent_shape[1:]} (C, h, w) but this "
                f"latent is {tuple(latent.shape[1:])}; invert the same image you edit"
            )
        if model_key != self.model_key:
            raise DragInputError(
                "the attention cache was recorded with a different model; connect the same MODEL "
                "(checkpoint) to DDIM Invert and to this node"
            )

    def stored_kv(self, timestep: int, layer: AttnLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached ``(K, V)`` of ``layer`` at ``timestep`` as stored (on :attr:`storage_device`)."""
        try:
            return self.kv[timestep][layer.index]
        except KeyError:
            raise DragInputError(
                f"the attention cache holds no keys/values for layer {layer.index} ({layer.name}) at timestep "
                f"{timestep}; cache that layer in DDIM Invert or choose cached layers here"
            ) from None

    def kv_at(self, timestep: int, layer: AttnLayer, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached ``(K, V)`` of ``layer`` at ``timestep``, moved to ``device``/``dtype``."""
        k, v = self.stored_kv(timestep, layer)
        return k.to(device=device, dtype=dtype, non_blocking=True), v.to(device=device, dtype=dtype, non_blocking=True)


class PinnedArena:
    """One page-locked host allocation handed out as tensors, for an offloaded attention cache.

    Pinned memory makes copies from the GPU asynchronous, but allocating it
    is slow (one ``cudaHostAlloc`` each); a 35-step SD1.5 inversion stores
    hundreds of keys/values, so the cache takes one arena sized from its
    first step and carves every tensor out of it.
    """

    ALIGN = 256
    """Bytes each tensor's start is aligned to."""

    def __init__(self, nbytes: int, pin: bool = True) -> None:
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.offset = 0

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
        """An uninitialised ``shape``/``dtype`` tensor from the arena, or ``None`` when it is full."""
        start = -(-self.offset // self.ALIGN) * self.ALIGN
        nbytes = shape.numel() * dtype.itemsize
        if start + nbytes > self.buffer.numel():
            return None
        self.offset = start + nbytes
        return self.buffer[start : start + nbytes].view(dtype).view(shape)


class KVRecorder(AttentionControl):
    """Records the keys/values of chosen layers at each step into an :class:`AttnCache`.

    The first step is recorded on the compute device; its measured size times
    ``num_steps`` then decides, by ``policy`` (:func:`choose_storage_device`),
    where the whole cache lives, and the first step moves there if needed.
    Offloaded from a GPU, the keys/values go into one :class:`PinnedArena`
    by asynchronous copies (see :meth:`finish`).
    """

    def __init__(self, cache: AttnCache, layers: tuple[AttnLayer, ...], policy: str, num_steps: int) -> None:
        super().__init__()
        if policy not in CACHE_POLICIES:
            raise DragInputError(f"cache policy must be one of {CACHE_POLICIES}, got {policy!r}")
        self.cache = cache
        self.indices = {layer.index for layer in layers}
        self.policy = policy
        self.num_steps = num_steps
        self.placed = False
        self.arena: PinnedArena | None = None
        self.async_sources: set[torch.device] = set()
        """CUDA devices with copies into pinned CPU memory still in flight (see :meth:`finish`)."""

    def signature(self) -> tuple:
        return ("KVRecorder", tuple(sorted(self.indices)))

    def begin_step(self, timestep: int) -> None:
        if not self.placed and self.cache.kv:
            self._place()
        super().begin_step(timestep)

    def finish(self) -> None:
        """Settle the storage device once recording is over (call after the last step).

        Copies from a CUDA device into pinned CPU memory are asynchronous; this
        waits for them, so the cache can be read on the host as soon as it
        returns.
        """
        if not self.placed and self.cache.kv:
            self._place()
        for device in self.async_sources:
            torch.cuda.synchronize(device)
        self.async_sources.clear()

    def _place(self) -> None:
        estimate = self.cache.kv_nbytes_per_step() * self.num_steps
        device = choose_storage_device(self.policy, self.cache.storage_device, estimate)
        if device != self.cache.storage_device:
            if device.type == "cpu" and self.cache.storage_device.type == "cuda":
                self.arena = PinnedArena(estimate + PinnedArena.ALIGN * 2 * len(self.indices) * self.num_steps)
            for step in self.cache.kv.values():
                for index, (k, v) in step.items():
                    step[index] = (self._store(k, device), self._store(v, device))
            self.cache.storage_device = device
        self.placed = True

    def _store(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A detached copy of ``t`` on ``device``; from CUDA to the CPU an asynchronous copy into pinned memory."""
        t = t.detach()
        if t.device == device:
            return t.clone()
        pin = device.type == "cpu" and t.device.type == "cuda"
        out = self.arena.take(t.shape, t.dtype) if pin and self.arena is not None else None
        if out is None:
            out = torch.empty(t.shape, dtype=t.dtype, device=device, pin_memory=pin)
        if pin:
            self.async_sources.add(t.device)
        return out.copy_(t, non_blocking=pin)

    def _record(self, index: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if not self.placed:
            self.cache.storage_device = k.device
        step = self.cache.kv.setdefault(self.timestep, {})
        step[index] = (self._store(k, self.cache.storage_device), self._store(v, self.cache.storage_device))

    def after_pass(self) -> None:
        if self.slots is None:
            return
        for (role, index), k in self.slots.buffers.items():
            if role == "record k":
                self._record(index, k, self.slots.buffers[("record v", index)])

    def __call__(self, layer: AttnLayer, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer.index in self.indices:
            if k.shape[0] != 1:
                raise DragInputError(f"inversion records one image at a time, got a batch of {k.shape[0]}")
            if self.slots is None:
                self._record(layer.index, k, v)
            else:
                self.slots.get("record k", layer.index, k)[0].copy_(k)
                self.slots.get("record v", layer.index, v)[0].copy_(v)
        return k, v


class KVInjector(AttentionControl):
    """Replaces the keys/values of chosen layers by the cached source ones (FastDrag's consistency).

    Every batch row (edited latent, and the unconditional row under CFG) gets
    the cached source keys/values of the same timestep argument. Steps whose
    timestep is not in ``timesteps`` are left alone. Bound to slots, the
    cached keys/values of the step are copied into them before each pass.
    """

    def __init__(self, cache: AttnCache, layers: tuple[AttnLayer, ...], timesteps: set[int]) -> None:
        super().__init__()
        self.cache = cache
        self.layers = {layer.index: layer for layer in layers}
        self.timesteps = timesteps
        recorded = {layer.index for layer in cache.layers}
        missing = sorted(set(self.layers) - recorded)
        if missing:
            raise DragInputError(
                f"injection layers {missing} were not cached by DDIM Invert (it cached "
                f"{sorted(recorded) or 'none'}); cache them there or inject fewer layers"
            )

    def signature(self) -> tuple:
        return ("KVInjector", tuple(sorted(self.layers)) if self.timestep in self.timesteps else ())

    def before_pass(self) -> None:
        if self.slots is None or self.timestep not in self.timesteps:
            return
        for index, layer in self.layers.items():
            k = self.slots.buffers.get(("inject k", index))
            if k is not None:
                ck, cv = self.cache.stored_kv(self.timestep, layer)
                k.copy_(ck, non_blocking=True)
                self.slots.buffers[("inject v", index)].copy_(cv, non_blocking=True)

    def __call__(self, layer: AttnLayer, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer.index not in self.layers or self.timestep not in self.timesteps:
            return k, v
        if self.slots is not None and ("inject k", layer.index) in self.slots.buffers:
            ck, cv = self.slots.buffers[("inject k", layer.index)], self.slots.buffers[("inject v", layer.index)]
        else:
            ck, cv = self.cache.kv_at(self.timestep, layer, k.device, k.dtype)
            if self.slots is not None:
                ck, cv = self._fill("inject k", layer, ck), self._fill("inject v", layer, cv)
        if ck.shape[1:] != k.shape[1:]:
            raise DragInputError(
                f"cached keys of layer {layer.index} have {ck.shape[1]} tokens x {ck.shape[2]} channels but the model "
                f"produced {k.shape[1]} x {k.shape[2]}; the cache is from another latent size or model"
            )
        return ck.expand(k.shape[0], -1, -1), cv.expand(v.shape[0], -1, -1)

    def _fill(self, role: str, layer: AttnLayer, cached: torch.Tensor) -> torch.Tensor:
        """A new slot holding ``cached`` (the first pass; :meth:`before_pass` refills it for later ones)."""
        slot, _ = self.slots.get(role, layer.index, cached)
        return slot.copy_(cached)


class MutualSelfAttention(AttentionControl):
    """MasaCtrl-style mutual self-attention for a batch of (reference, edited) pairs.

    Rows alternate reference, edited (``[ref, edit]``, or ``[ref, edit, ref,
    edit]`` when a host stacks conditional and unconditional chunks). In the
    chosen layers each edited row's keys and values are replaced by its
    reference row's, so the edited branch attends to the unedited image; the
    reference rows are left alone.
    """

    def __init__(self, layers: tuple[AttnLayer, ...], timesteps: set[int]) -> None:
        super().__init__()
        self.indices = {layer.index for layer in layers}
        self.timesteps = timesteps

    def signature(self) -> tuple:
        return ("MutualSelfAttention", tuple(sorted(self.indices)) if self.timestep in self.timesteps else ())

    def __call__(self, layer: AttnLayer, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer.index not in self.indices or self.timestep not in self.timesteps:
            return k, v
        if k.shape[0] % 2:
            raise DragInputError(f"mutual self-attention needs (reference, edited) pairs, got a batch of {k.shape[0]}")
        k, v = k.clone(), v.clone()
        k[1::2] = k[0::2]
        v[1::2] = v[0::2]
        return k, v


KV_BUDGET_BYTES = 512 * 2**20
"""Caches up to this size stay on the compute device under the "auto" policy."""

CACHE_POLICIES = ("auto", "compute_device", "offload")


def choose_storage_device(policy: str, compute_device: torch.device, estimated_bytes: int) -> torch.device:
    """Where an attention cache lives.

    ``"compute_device"`` keeps it next to the model (fastest re-edits),
    ``"offload"`` puts it in CPU memory and moves one step at a time, and
    ``"auto"`` keeps it on the compute device when it is at most
    :data:`KV_BUDGET_BYTES` and offloads otherwise. On a CPU-only machine
    all three are the CPU.
    """
    if policy not in CACHE_POLICIES:
        raise DragInputError(f"cache policy must be one of {CACHE_POLICIES}, got {policy!r}")
    if policy == "offload" or (policy == "auto" and estimated_bytes > KV_BUDGET_BYTES):
        return torch.device("cpu")
    return torch.device(compute_device)
