"""Timing, peak memory and UNet-pass counting of one benchmark stage."""

from __future__ import annotations

import os
import platform
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch

from dragkit import capture

from .goals import CAPTURED

PASS_FIELDS = ("unet_passes", "unet_rows", "unet_passes_with_grad", "unet_rows_with_grad")
"""What :class:`PassCounter` counts: UNet calls and batch rows, all and with autograd on."""


class PassCounter:
    """Counts forward calls of a UNet module (a forward pre-hook; removed by :meth:`close`).

    Replays of captured passes count too (they run no Python, so no hook:
    :data:`dragkit.capture.REPLAY_OBSERVERS`). A call counts as a pass even
    when the caller stops the forward early (the
    motion-supervision loops stop after the feature block when they need no
    ε); rows are the batch size of the call's first tensor argument; calls
    made with autograd enabled are counted again under ``*_with_grad``.
    """

    def __init__(self, module: torch.nn.Module, replay_observers: list | None = None,
                 mark: Callable[[Callable], Callable] | None = None) -> None:
        """``replay_observers``: the :data:`~dragkit.capture.REPLAY_OBSERVERS` of the capture module the model's
        backend uses (the pack loaded in ComfyUI has its own copy of ``dragkit``); default: this process's.
        ``mark``: the capture adapter's marker for hooks a captured pass may keep (``nodes.comfy_capture.capturable``;
        it refuses to capture a UNet with any other hook): the counting hook changes nothing in the pass."""
        self.counts = dict.fromkeys(PASS_FIELDS, 0)

        def hook(module, args, kwargs):
            self._hook(module, args, kwargs)

        self._handle = module.register_forward_pre_hook(mark(hook) if mark else hook, with_kwargs=True)
        self._observers = capture.REPLAY_OBSERVERS if replay_observers is None else replay_observers
        self._observers.append(self._replayed)

    def _hook(self, module, args, kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        self._count(int(tensors[0].shape[0]) if tensors else 1, torch.is_grad_enabled())

    def _replayed(self, first_input: torch.Tensor, differentiable: bool) -> None:
        """A captured pass replayed (:mod:`dragkit.capture`): the UNet's Python, and so the hook, did not run."""
        self._count(int(first_input.shape[0]), differentiable)

    def _count(self, rows: int, grad: bool) -> None:
        self.counts["unet_passes"] += 1
        self.counts["unet_rows"] += rows
        self.counts["unet_passes_with_grad"] += int(grad)
        self.counts["unet_rows_with_grad"] += rows * int(grad)

    def reset(self) -> None:
        self.counts = dict.fromkeys(PASS_FIELDS, 0)

    def close(self) -> None:
        self._handle.remove()
        self._observers.remove(self._replayed)


def machine(device: torch.device) -> dict:
    """What a benchmark ran on: platform, processor, torch's CPU threads, the device's name and torch's version."""
    return {"platform": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device, counter: PassCounter) -> dict:
    """Run ``fn`` ``warmup`` times, then ``repeats`` times measured.

    Returns median / p10 / p90 wall time in ms over the repeats (percentiles
    interpolated linearly between the sorted times), the peak
    allocated CUDA memory in MiB (``None`` on a CPU, where torch does not
    track it), the UNet passes of the last repeat, and ``fn``'s last result
    under ``"result"``.
    """
    result = None
    for _ in range(warmup):
        result = fn()
    times, peaks = [], []
    for _ in range(repeats):
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        counter.reset()
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
        if device.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated(device) / 2**20)
    p10, median, p90 = np.percentile(times, [10, 50, 90])  # linear interpolation between order statistics
    return {
        "median_ms": float(median),
        "p10_ms": float(p10),
        "p90_ms": float(p90),
        "repeats": repeats,
        "peak_mib": max(peaks) if peaks else None,
        **counter.counts,
        "result": result,
    }


@contextmanager
def capture_setting(mode: str) -> Iterator[None]:
    """``DRAGKIT_CAPTURE=mode`` for the duration (read by the pack on every pass), restored after."""
    saved = os.environ.get(capture.ENV_VAR)
    os.environ[capture.ENV_VAR] = mode
    try:
        yield
    finally:
        if saved is None:
            del os.environ[capture.ENV_VAR]
        else:
            os.environ[capture.ENV_VAR] = saved


class Stager:
    """Runs the stages of one resolution and keeps their measurements in :attr:`stages`.

    :meth:`fast` stages run ``warmup`` times, then ``repeats`` times;
    :meth:`slow` stages (seconds each: LoRA, the optimisers, whole
    DragDiffusion/GoodDrag edits) run an optional short warm-up call, then
    ``slow_repeats`` times. ``grad=False`` calls run under
    ``torch.inference_mode`` (as ComfyUI's executor runs nodes); ``grad=True``
    outside it, for loops that need autograd.

    Every stage runs with captured UNet passes off (``DRAGKIT_CAPTURE=off``,
    whatever the environment says); a stage marked ``twin`` runs again with
    them on (``graph``; on a CPU that is the static-buffer path without
    graphs) as ``<name>_captured`` (:data:`~benchmarks.goals.CAPTURED`) when
    ``twins`` is set. ``on_stage(name)`` is called after each stage is
    recorded (the benchmark rewrites its JSON there, so a run cut short keeps
    what it measured).
    """

    def __init__(self, device: torch.device, counter: PassCounter, warmup: int, repeats: int, slow_repeats: int,
                 twins: bool = True, on_stage: Callable[[str], None] | None = None) -> None:
        self.device, self.counter = device, counter
        self.warmup, self.repeats, self.slow_repeats = warmup, repeats, slow_repeats
        self.twins, self.on_stage = twins, on_stage
        self.stages: dict[str, dict] = {}

    @staticmethod
    def _mode(fn: Callable[[], object], grad: bool, capture_mode: str) -> Callable[[], object]:
        def call():
            with torch.inference_mode(mode=not grad), capture_setting(capture_mode):
                return fn()

        return call

    def _record(self, name: str, stage: dict):
        self.stages[name] = stage
        if self.on_stage is not None:
            self.on_stage(name)
        return stage["result"]

    def _modes(self, name: str, twin: bool) -> list[tuple[str, str]]:
        """``(stage name, capture mode)`` of a stage and, when it has one, its captured twin."""
        return [(name, "off")] + ([(name + CAPTURED, "graph")] if twin and self.twins else [])

    def fast(self, name: str, fn: Callable[[], object], twin: bool = False):
        """Time ``fn`` (under inference mode) as stage ``name`` (and its captured twin); returns its last result."""
        result = None
        for stage, mode in self._modes(name, twin):
            result = self._record(stage, timed(self._mode(fn, False, mode), self.warmup, self.repeats, self.device,
                                               self.counter))
        return result

    def slow(self, name: str, fn: Callable[[], object], warm: Callable[[], object] | None = None, grad: bool = False,
             steps: int | None = None, twin: bool = False):
        """Call ``warm`` once (a shortened run), then time ``fn`` ``slow_repeats`` times, for the stage and its
        captured twin; returns the last result.

        ``steps``: the stage is that many optimiser steps; the entry also gets
        ``steps`` and ``seconds_per_step``.
        """
        result = None
        for stage_name, mode in self._modes(name, twin):
            if warm is not None:
                self._mode(warm, grad, mode)()
            stage = timed(self._mode(fn, grad, mode), 0, self.slow_repeats, self.device, self.counter)
            if steps is not None:
                stage.update(steps=steps, seconds_per_step=stage["median_ms"] / 1000 / steps)
            result = self._record(stage_name, stage)
        return result


@torch.no_grad()
def attn_cache_summary(cache) -> dict:
    """Layers, steps, storage device and size (MiB per step and in all) of an :class:`~dragkit.attention.AttnCache`."""
    return {
        "layers": len(cache.layers), "steps": len(cache.kv), "storage": str(cache.storage_device),
        "mib_per_step": cache.kv_nbytes_per_step() / 2**20, "mib_total": cache.kv_nbytes() / 2**20,
    }
