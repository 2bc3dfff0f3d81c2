"""Flow inversion with a key/value cache, and KV-injected flow sampling (FLUX; DragFlow's FastDrag chain).

A rectified-flow model predicts a velocity ``v(x_t, t)`` for the latent
``x_t = (1 - t) x_0 + t ε`` at time ``t`` in [0, 1] (1 = pure noise), so
``dx/dt = v``. Both directions integrate that ODE over the schedule's times:

- **Euler**: ``x ← x + (t_next - t) v(x, t)``, one model call per step.
- **FireFlow** (Deng et al. 2024; DragFlow's ``inverse_fireflow`` and
  ``sampling_step_fireflow``): a midpoint step whose first-stage velocity is
  the previous step's midpoint velocity, so after the first step it costs one
  model call::

      v   = v_mid of the previous step (the first step calls v(x, t))
      x_m = x + (t_next - t) / 2 · v
      v_mid = v(x_m, t + (t_next - t) / 2)
      x   ← x + (t_next - t) · v_mid

Inversion runs this from ``t = 0`` up to ``t* = σ[skip]`` and records, at
every model call, the keys/values of the chosen transformer blocks
(:mod:`dragkit.flow_hooks`); sampling runs it back down from ``t*`` to 0 and
replaces those keys/values by the recorded ones (full replacement, DragFlow's
``eta = 0``). The pairing of sampling calls with recorded calls is DragFlow's:
the k-th model call of sampling gets the k-th *last* recorded call (a stack),
see :func:`released_pairing`; ``pairing="time"`` pairs each call with the
recorded call nearest in time instead (see docs/methods.md, FLUX).

Latents are ``(1, C, h, w)`` float32 in the model's own latent space (FLUX:
C = 16 channels, h, w = image size / 8); the backend packs 2x2 latent patches
into ``(h/2)(w/2)`` image tokens of 64 values. The cache's keys/values are the
backend's (:class:`~dragkit.flow_hooks`): ``(1, tokens, hidden)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from .attention import AttentionControl, AttnCache, AttnLayer, KVInjector, KVRecorder
from .errors import DragInputError

FLOW_SOLVERS = ("fireflow", "euler")
PAIRINGS = ("released", "time")

Velocity = Callable[[torch.Tensor, float], torch.Tensor]
"""``velocity(x, t) -> v``: the model's velocity for latent ``x`` ``(B, C, h, w)`` at time ``t``; float32, shape of ``x``."""

FlowLoop = Callable[[Velocity, torch.Tensor], torch.Tensor]
"""``loop(velocity, x_start) -> x_end``: an engine loop over model evaluations."""

Progress = Callable[[int, torch.Tensor], None]
"""``progress(steps_done, x0_prediction)``; may raise to cancel (ComfyUI's interrupt)."""


class FlowBackend(Protocol):
    """What the engine knows of a flow transformer (FLUX)."""

    @property
    def model_key(self) -> str:
        """Identity of the underlying network, to tell caches of different models apart."""

    def kv_layers(self) -> tuple[AttnLayer, ...]:
        """Every block whose keys/values can be recorded/injected, in execution order (:func:`dragkit.flow_hooks.flux_layers`)."""

    def run(self, loop: FlowLoop, x_start: torch.Tensor, conditioning: Any, control: AttentionControl, times: list[float]) -> torch.Tensor:
        """Run ``loop`` with a velocity function whose blocks call ``control`` on their keys/values.

        ``x_start`` ``(1, C, h, w)``; the loop receives it float32 on the
        compute device and its result comes back float32 on ``x_start``'s
        device. ``times`` are the times the loop evaluates, in order.
        """


def shift_time(t: torch.Tensor, mu: float) -> torch.Tensor:
    """FLUX's time shift ``e^μ / (e^μ + 1/t - 1)`` (t = 0 stays 0, t = 1 stays 1)."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


def flux_mu(image_seq_len: int) -> float:
    """FLUX.1 [dev]'s shift μ for ``image_seq_len`` image tokens: linear from 0.5 at 256 tokens to 1.15 at 4096 (1024²)."""
    return 0.5 + (1.15 - 0.5) / (4096 - 256) * (image_seq_len - 256)


def flux_sigmas(num_steps: int, mu: float | None) -> tuple[float, ...]:
    """The ``num_steps + 1`` times of BFL's FLUX schedule, 1 down to 0: ``linspace(1, 0)`` (float32) shifted by ``mu`` (``None``: unshifted, schnell)."""
    t = torch.linspace(1, 0, num_steps + 1)
    if mu is not None:
        t = shift_time(t, mu)
    return tuple(t.tolist())


@dataclass(frozen=True)
class FlowSchedule:
    """An N-step flow schedule and how much of it is inverted.

    Attributes:
        sigmas: the N + 1 times, descending from 1 to 0 (the model's own
            schedule: :func:`flux_sigmas` or the host's model sampling).
        skip: steps left out at the noisy end (DragFlow's ``skip_step_num``,
            6 of 25): inversion stops at ``t* = sigmas[skip]``.
        solver: ``"fireflow"`` or ``"euler"``.
    """

    sigmas: tuple[float, ...]
    skip: int
    solver: str = "fireflow"

    def __post_init__(self) -> None:
        if len(self.sigmas) < 2:
            raise DragInputError("a flow schedule needs at least one step")
        if not 0 <= self.skip < self.num_steps:
            raise DragInputError(f"skip must be 0 to {self.num_steps - 1} for {self.num_steps} steps, got {self.skip}")
        if self.solver not in FLOW_SOLVERS:
            raise DragInputError(f"the flow solver must be one of {FLOW_SOLVERS}, got {self.solver!r}")

    @classmethod
    def from_strength(cls, sigmas: tuple[float, ...], strength: float, solver: str = "fireflow") -> FlowSchedule:
        """``round(strength · N)`` steps inverted (Python's rounding): DragFlow's 19 of 25 is strength 0.76."""
        steps = len(sigmas) - 1
        inverted = round(strength * steps)
        if inverted < 1:
            raise DragInputError(f"strength {strength} inverts no step of {steps}; raise it or the steps")
        return cls(tuple(sigmas), steps - inverted, solver)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def num_inversion_steps(self) -> int:
        return self.num_steps - self.skip

    @property
    def t_star(self) -> float:
        return self.sigmas[self.skip]

    def inversion_times(self) -> list[float]:
        """Ascending times 0 .. t* the inversion steps between."""
        return list(self.sigmas[self.skip :][::-1])

    def sampling_times(self, from_index: int) -> list[float]:
        """Descending times from ``sigmas[from_index]`` to 0."""
        if not 0 <= from_index < self.num_steps:
            raise DragInputError(f"step index {from_index} is outside the {self.num_steps}-step schedule")
        return list(self.sigmas[from_index:])


def call_times(times: list[float], solver: str) -> list[float]:
    """The time of every model call that integrating over ``times`` makes, in order (see the module docstring)."""
    pairs = list(zip(times[:-1], times[1:]))
    if solver == "euler":
        return [t for t, _ in pairs]
    return [times[0]] + [t + (t_next - t) / 2 for t, t_next in pairs]


def integrate(
    velocity: Velocity,
    x: torch.Tensor,
    times: list[float],
    solver: str,
    before_call: Callable[[int], None] | None = None,
    after_step: Callable[[int, torch.Tensor, float, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Integrate ``dx/dt = velocity`` over ``times`` (ascending: inversion; descending: sampling).

    Args:
        velocity: the model.
        x: latent at ``times[0]``, ``(B, C, h, w)`` float32.
        times: the step boundaries.
        solver: ``"fireflow"`` (DragFlow's released update; about one call
            per step) or ``"euler"``.
        before_call: called with the model-call number (0, 1, ...) before
            each model call (the K/V controls key on it).
        after_step: ``after_step(step, x, t, v)`` after each step, with the
            new latent, the time it is at, and the last velocity.

    Returns:
        The latent at ``times[-1]``.
    """
    calls = 0

    def call(z: torch.Tensor, t: float) -> torch.Tensor:
        nonlocal calls
        if before_call is not None:
            before_call(calls)
        calls += 1
        return velocity(z, t)

    v_last = None
    for step, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        dt = t_next - t
        if solver == "euler":
            v = call(x, t)
            x = x + dt * v
        else:
            v_first = call(x, t) if v_last is None else v_last  # released: reuse the previous midpoint velocity
            v = call(x + dt / 2 * v_first, t + dt / 2)
            x = x + dt * v
        v_last = v
        if after_step is not None:
            after_step(step, x, t_next, v)
    return x


def predicted_x0(x: torch.Tensor, t: float, v: torch.Tensor) -> torch.Tensor:
    """The clean latent a velocity implies: ``x_0 = x_t - t · v`` (for previews)."""
    return x - t * v


@dataclass
class FlowCache:
    """What flow inversion records of one source latent.

    Attributes:
        schedule: the flow schedule of the inversion.
        layers: the recorded blocks (may be empty: then only latents are kept).
        model_key: identity of the model that recorded it (backend-defined).
        source: the source latent x_0, ``(1, C, h, w)`` float32.
        trajectory: step index of the schedule -> the latent at that time,
            ``(1, C, h, w)`` float32 (index ``skip`` is x_t*).
        call_times: the time of each recorded model call, in call order.
        kv: call number -> layer index -> ``(K, V)``, each ``(1, tokens, hidden)``
            in the model's compute dtype, on :attr:`storage_device`.
        storage_device: where the keys/values live.
        references: the shapes of the reference latents (FLUX Kontext) the inversion's conditioning carried;
            their tokens are part of the recorded keys/values, so sampling must carry the same.
    """

    schedule: FlowSchedule
    layers: tuple[AttnLayer, ...]
    model_key: str
    source: torch.Tensor
    trajectory: dict[int, torch.Tensor] = field(default_factory=dict)
    call_times: list[float] = field(default_factory=list)
    kv: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    storage_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    references: tuple[tuple[int, ...], ...] = ()

    family = "flux"

    @property
    def x_star(self) -> torch.Tensor:
        """The inverted latent at t*."""
        return self.trajectory[self.schedule.skip]

    kv_nbytes = AttnCache.kv_nbytes
    kv_nbytes_per_step = AttnCache.kv_nbytes_per_step
    kv_at = AttnCache.kv_at

    def describe(self) -> str:
        """One line for the log: blocks, model calls and size."""
        mib = self.kv_nbytes() / 2**20
        return (
            f"{len(self.layers)} transformer blocks x {len(self.kv)} model calls = {mib:.1f} MiB "
            f"({self.kv_nbytes_per_step() / 2**20:.2f} MiB per call) on {self.storage_device}"
        )

    def check_compatible(self, x: torch.Tensor, model_key: str) -> None:
        """Raise unless ``x`` and the model match what this cache was recorded with."""
        if tuple(x.shape[1:]) != tuple(self.source.shape[1:]):
            raise DragInputError(
                f"the attention cache was recorded on a latent of shape {tuple(self.source.shape[1:])} (C, h, w) but "
                f"this latent is {tuple(x.shape[1:])}; invert the same image you edit"
            )
        if model_key != self.model_key:
            raise DragInputError(
                "the attention cache was recorded with a different model; connect the same MODEL to DDIM Invert and "
                "to this node"
            )

    def check_references(self, references: tuple[tuple[int, ...], ...]) -> None:
        """Raise unless a conditioning's reference latent shapes are the inversion's (Kontext: same reference image)."""
        if tuple(references) != tuple(self.references):
            raise DragInputError(
                f"this prompt carries reference latents {list(references) or 'none'} but DDIM Invert's carried "
                f"{list(self.references) or 'none'}; the reference image's tokens are part of the recorded keys/values, "
                "so give both prompts the same ReferenceLatent (FLUX Kontext) or none"
            )

    def stored_kv(self, call: int, layer: AttnLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """The recorded ``(K, V)`` of ``layer`` at model call ``call``, as stored."""
        try:
            return self.kv[call][layer.index]
        except KeyError:
            raise DragInputError(
                f"the attention cache holds no keys/values for block {layer.index} ({layer.name}) at model call "
                f"{call}; cache that block in DDIM Invert or choose cached blocks here"
            ) from None


def check_latent(x: torch.Tensor, what: str = "latent") -> None:
    """Raise unless ``x`` is one finite ``(1, C, h, w)`` latent."""
    if x.dim() != 4 or x.shape[0] != 1:
        raise DragInputError(f"the {what} must be one (1, channels, height, width) latent, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise DragInputError(f"the {what} contains NaN or infinite values")


def flow_invert(
    backend: FlowBackend,
    x0: torch.Tensor,
    conditioning: Any,
    schedule: FlowSchedule,
    record_layers: tuple[AttnLayer, ...],
    cache_policy: str = "auto",
    progress: Progress | None = None,
) -> FlowCache:
    """Invert ``x0`` from t = 0 to t* and record the trajectory and the keys/values of ``record_layers``.

    Args:
        backend: the model.
        x0: the source latent, ``(1, C, h, w)``.
        conditioning: the backend's conditioning (DragFlow inverts at guidance 1).
        schedule: times, skip and solver.
        record_layers: blocks whose keys/values are recorded at every model call.
        cache_policy: where the cache lives (:func:`~dragkit.attention.choose_storage_device`).
        progress: called after each step with the predicted clean latent.

    Returns:
        The cache; ``cache.x_star`` is the latent at t*.
    """
    check_latent(x0, "source latent")
    x0 = x0.to(torch.float32)
    cache = FlowCache(schedule=schedule, layers=record_layers, model_key=backend.model_key, source=x0.detach().cpu())
    times = schedule.inversion_times()
    cache.call_times = call_times(times, schedule.solver)
    recorder = KVRecorder(cache, record_layers, cache_policy, len(cache.call_times))
    trajectory = {schedule.num_steps: x0.detach().cpu()}

    def after_step(step: int, x: torch.Tensor, t: float, v: torch.Tensor) -> None:
        trajectory[schedule.num_steps - 1 - step] = x.detach()
        if progress is not None:
            progress(step + 1, predicted_x0(x, t, v))

    def loop(velocity: Velocity, x: torch.Tensor) -> torch.Tensor:
        return integrate(velocity, x, times, schedule.solver, recorder.begin_step, after_step)

    backend.run(loop, x0, conditioning, recorder, cache.call_times)
    recorder.finish()
    cache.trajectory.update({i: x.cpu() for i, x in trajectory.items()})
    return cache


def released_pairing(recorded: int, calls: int) -> list[int]:
    """DragFlow's pairing: sampling call k injects recorded call ``recorded - 1 - k`` (a stack; the pointer stops at 0).

    With FireFlow both ways this puts the first sampling call (at t*) on the
    last inversion midpoint and every later midpoint on the recorded call one
    step less noisy (``KVHookHub.countdown_hooks``; docs/methods.md, FLUX).
    """
    return [max(recorded - 1 - k, 0) for k in range(calls)]


def time_pairing(recorded_times: list[float], sampling_times: list[float]) -> list[int]:
    """Each sampling call injects the recorded call nearest in time (ties: the earlier recorded call)."""
    if not recorded_times:
        return [0] * len(sampling_times)
    return [min(range(len(recorded_times)), key=lambda i: abs(recorded_times[i] - t)) for t in sampling_times]


class _PairedInjector(KVInjector):
    """:class:`KVInjector` whose step key is the sampling call number, mapped to a recorded call."""

    def __init__(self, cache: FlowCache, layers, pairing: list[int], active_calls: set[int]) -> None:
        super().__init__(cache, layers, {pairing[c] for c in active_calls})
        self.pairing = pairing
        self.active_calls = active_calls

    def begin_step(self, call: int) -> None:
        super().begin_step(self.pairing[call] if call in self.active_calls else -1)


def active_calls(times: list[float], solver: str, start: float, end: float) -> set[int]:
    """Sampling call numbers of the steps whose fraction ``k / steps`` lies in ``[start, end)`` (k from 0)."""
    if not 0.0 <= start <= end <= 1.0:
        raise DragInputError(f"injection range must satisfy 0 <= start <= end <= 1, got start={start}, end={end}")
    steps = len(times) - 1
    on = [start <= k / steps < end for k in range(steps)]
    if solver == "euler":
        return {k for k in range(steps) if on[k]}
    calls = {k + 1 for k in range(steps) if on[k]}  # the midpoint call of step k
    if on[0]:
        calls.add(0)  # the first step's extra call at t*
    return calls


def flow_sample(
    backend: FlowBackend,
    x: torch.Tensor,
    conditioning: Any,
    cache: FlowCache,
    from_index: int,
    inject_layers: tuple[AttnLayer, ...],
    inject_start: float = 0.0,
    inject_end: float = 1.0,
    progress: Progress | None = None,
    pairing: str = "released",
) -> torch.Tensor:
    """Sample ``x`` from ``sigmas[from_index]`` down to t = 0 with the recorded keys/values injected.

    Args:
        backend: the model that recorded ``cache``.
        x: latent at ``cache.schedule.sigmas[from_index]``, ``(1, C, h, w)``.
        conditioning: the backend's conditioning (DragFlow samples at guidance 3.5).
        cache: the inversion's cache.
        from_index: step index of ``x`` in the cache's schedule.
        inject_layers: blocks whose keys/values are replaced (empty: plain sampling).
        inject_start, inject_end: fraction of the sampling steps, from the
            first, during which injection is on.
        progress: called after each step with the predicted clean latent.
        pairing: ``"released"`` (:func:`released_pairing`) or ``"time"``
            (:func:`time_pairing`).

    Returns:
        The clean latent, float32 ``(1, C, h, w)``.
    """
    check_latent(x, "latent")
    cache.check_compatible(x, backend.model_key)
    if pairing not in PAIRINGS:
        raise DragInputError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    solver = cache.schedule.solver
    times = cache.schedule.sampling_times(from_index)
    sampling_calls = call_times(times, solver)
    if pairing == "released":
        paired = released_pairing(len(cache.call_times), len(sampling_calls))
    else:
        paired = time_pairing(cache.call_times, sampling_calls)
    injector = _PairedInjector(cache, inject_layers, paired, active_calls(times, solver, inject_start, inject_end))

    def after_step(step: int, z: torch.Tensor, t: float, v: torch.Tensor) -> None:
        if progress is not None:
            progress(step + 1, predicted_x0(z, t, v))

    def loop(velocity: Velocity, z: torch.Tensor) -> torch.Tensor:
        return integrate(velocity, z, times, solver, injector.begin_step, after_step)

    return backend.run(loop, x.to(torch.float32), conditioning, injector, sampling_calls)
