"""Batch work handed to one or more ComfyUI servers: the job, what a worker does with it, and the driver's loop.

A **job** carries everything a worker needs for one sample (the sample
folder's files as bytes), so a worker may be on another machine: a ComfyUI this process started, one already running (``--server``)
or a Ray actor (``--ray``, :mod:`dragrun.ray_workers`). A worker uploads the
inputs, queues the prompt, follows it through ``/history`` and downloads the
first saved image through ``/view``, and composes the side-by-side
(:func:`run_job`); only the driver writes the output folder (:func:`distribute` calls back for each result).

A sample whose worker is lost (its ComfyUI exited, its server stopped
answering, its Ray actor died) goes back to the queue for another worker, at
most :data:`MAX_RETRIES` times; then, or when no worker is left, it is
recorded failed with the reason. A sample that fails on a working server is
recorded failed at once (as in a one-server run).
"""

from __future__ import annotations

import copy
import io
import json
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Protocol

MAX_RETRIES = 2
"""How often a sample whose worker was lost is handed to another worker before it is recorded failed."""


@dataclass(frozen=True)
class Job:
    """One sample, ready to send to any server: its folder's files (Drag100 or DragBench layout) as bytes.

    ``text``: the ``--prompt`` override (None: the sample's own prompt, else
    the workflow's). ``attempt`` counts the workers lost on it.
    """

    name: str
    files: dict
    text: str | None
    attempt: int = 0


@dataclass(frozen=True)
class Recipe:
    """What every job of a batch shares: the API prompt (overrides applied) and the model file names to fill in."""

    template: dict
    checkpoint: str
    controlnet: str | None
    upscale_model: str | None
    stand_ins: tuple
    timeout: float


@dataclass(frozen=True)
class Result:
    """A finished job: the first saved image, the side-by-side (source | edit, points drawn) as PNG bytes, and the
    prompt's wall time (queue to finish)."""

    name: str
    edited_png: bytes
    side_by_side_png: bytes
    seconds: float


class WorkerLost(RuntimeError):
    """The worker can take no more jobs (its server exited or stopped answering, its actor died)."""


class Worker(Protocol):
    """Runs jobs one at a time (see :class:`ServerWorker`, :class:`dragrun.ray_workers.RayWorker`)."""

    label: str

    def run(self, recipe: Recipe, job: Job) -> Result:
        """The job's result; raises :class:`WorkerLost`, or the sample's own error."""

    def stop(self) -> None:
        """Stop taking jobs and stop a running one where possible (Ctrl+C)."""


def run_job(client, recipe: Recipe, job: Job) -> Result:
    """Run ``job`` on ``client`` (a :class:`dragrun.comfy_host.ComfyClient`): upload, queue, wait, download.

    The worker reads the sample from its files, uploads its image and mask
    (PNG) to the input sub-folder ``<job.name>``, gives its points to every
    points node and composes the side-by-side, so the driver only writes
    bytes. Raises ``RuntimeError`` when the workflow saved no image, and the
    client's :class:`~dragrun.comfy_host.ComfyServerError` when the prompt failed.
    """
    from PIL import Image

    from dragkit.datasets import load_sample

    from .run_workflow import fill_inputs, png_bytes, side_by_side_image

    with tempfile.TemporaryDirectory(prefix="dragrun-job-") as staging:
        folder = Path(staging) / job.name
        folder.mkdir()
        for name, data in job.files.items():
            (folder / name).write_bytes(data)
        sample = load_sample(folder)
        source = Image.fromarray(sample.image)
        (Path(staging) / "image.png").write_bytes(png_bytes(source))
        mask_name = None
        if sample.mask is not None:
            (Path(staging) / "mask.png").write_bytes(png_bytes(Image.fromarray(sample.mask.astype("uint8") * 255)))
            mask_name = client.upload_image(Path(staging) / "mask.png", subfolder=job.name)
        image_name = client.upload_image(Path(staging) / "image.png", subfolder=job.name)
    flat = [list(p) for pair in zip(sample.points.handles, sample.points.targets) for p in pair]
    text = job.text if job.text is not None else (sample.prompt or None)
    prompt = copy.deepcopy(recipe.template)
    fill_inputs(prompt, image_name, mask_name, json.dumps({"points": flat}), recipe.checkpoint, text,
                sample.editor_state(), recipe.controlnet, recipe.upscale_model, stand_ins=recipe.stand_ins)
    start = time.monotonic()
    entry = client.run(prompt, timeout=recipe.timeout)
    seconds = time.monotonic() - start
    items = client.output_items(entry)
    if not items:
        raise RuntimeError("the workflow saved no image")
    edited = client.download(items[0])
    combined = side_by_side_image(source, Image.open(io.BytesIO(edited)), sample.points)
    return Result(job.name, edited, png_bytes(combined), seconds)


class ServerWorker:
    """A worker on one ComfyUI server reached over HTTP: one this process started, or one given with ``--server``."""

    def __init__(self, client, label: str) -> None:
        self.client = client
        self.label = label

    def run(self, recipe: Recipe, job: Job) -> Result:
        import requests

        try:
            return run_job(self.client, recipe, job)
        except requests.ConnectionError as error:
            raise WorkerLost(f"{self.label} stopped answering: {error}") from None
        except Exception:
            proc = self.client.proc
            if proc is not None and proc.poll() is not None:
                raise WorkerLost(f"ComfyUI exited (code {proc.returncode})") from None
            raise

    def stop(self) -> None:
        """Interrupt what the server runs for us (best effort: Ctrl+C must not wait for a slow server)."""
        import requests

        try:
            self.client.post("/interrupt", timeout=5)
        except requests.RequestException:
            pass


def distribute(
    jobs: list[Job],
    workers: list[Worker],
    recipe: Recipe,
    on_result: Callable[[Worker, Job, Result], None],
    on_failure: Callable[[Worker, Job, BaseException, float], None],
) -> tuple[list[Job], list[str]]:
    """Run ``jobs`` on ``workers`` (one thread each, one job at a time).

    Returns the jobs left unrun and why each lost worker was lost.
    ``on_result`` / ``on_failure(worker, job, error, seconds until it failed)`` are called
    under one lock, so the driver's bookkeeping and writes never interleave.
    Jobs are left unrun only when every worker was lost, or on Ctrl+C
    (``KeyboardInterrupt`` stops the workers, waits for the threads and is
    raised again; the jobs they were running are left unrecorded, a result
    that arrives is still handed to ``on_result``).
    """
    queue = list(jobs)
    lock = threading.Condition()
    state = {"busy": 0, "alive": len(workers), "stop": False}
    lost_workers: list[str] = []

    def loop(worker: Worker) -> None:
        while True:
            with lock:
                while not queue and state["busy"] and not state["stop"]:
                    lock.wait()
                if not queue or state["stop"]:
                    lock.notify_all()
                    return
                job = queue.pop(0)
                state["busy"] += 1
            start = time.monotonic()
            try:
                result = worker.run(recipe, job)
            except WorkerLost as lost:
                with lock:
                    state["busy"] -= 1
                    state["alive"] -= 1
                    lost_workers.append(f"{worker.label}: {lost}")
                    if state["stop"]:
                        pass  # Ctrl+C: left unrecorded, a rerun runs it
                    elif job.attempt < MAX_RETRIES and state["alive"] > 0:
                        queue.insert(0, replace(job, attempt=job.attempt + 1))
                    else:
                        tries = f"{job.attempt + 1} worker{'s' if job.attempt else ''}"
                        on_failure(worker, job, WorkerLost(f"lost {tries} while running it; the last: {lost}"),
                                   time.monotonic() - start)
                    lock.notify_all()
                return
            except Exception as error:  # noqa: BLE001 - one bad sample must not stop the batch
                with lock:
                    state["busy"] -= 1
                    if not state["stop"]:  # after Ctrl+C a stopped prompt's error is no verdict on the sample
                        on_failure(worker, job, error, time.monotonic() - start)
                    lock.notify_all()
                continue
            with lock:
                state["busy"] -= 1
                on_result(worker, job, result)
                lock.notify_all()

    threads = [threading.Thread(target=loop, args=(worker,), name=f"dragrun-{worker.label}", daemon=True)
               for worker in workers]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.5)
    except KeyboardInterrupt:
        with lock:
            state["stop"] = True
            lock.notify_all()
        for worker in workers:
            worker.stop()
        for thread in threads:
            if thread.ident is not None:
                thread.join(timeout=30)
        raise
    return queue, lost_workers
