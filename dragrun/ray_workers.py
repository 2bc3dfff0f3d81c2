"""``--ray [ADDRESS]``: a batch shared out over Ray actors, each with one ComfyUI of its own.

One actor per GPU of the cluster (``--device gpu``, or ``auto`` on a cluster
with GPUs), or one per ``--cpus-per-actor`` CPUs (``--device cpu``, or
``auto`` on a cluster without). Each actor starts one ComfyUI with the pack
on its node through the runner's own host code
(:meth:`dragrun.run_workflow.Models.server`), keeps it and its loaded models
for all its samples, and returns each sample's image
(:func:`dragrun.distribute.run_job`); the driver alone writes ``--out``.

``ADDRESS``: none starts a local cluster (this machine), ``auto`` joins the
running one, else a cluster address (``ray://host:10001`` or ``host:6379``).
Every node must have this repository, the ComfyUI of ``COMFYUI_PATH`` and the
model files at the driver's paths: the run refuses to start otherwise,
naming the nodes and the paths they lack. Ray is optional
(``requirements-cluster.txt``); without it ``--ray`` says what to install.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import replace

from dragkit.errors import DragInputError

from .comfy_host import ComfyServerError, comfyui_path, repo_root
from .distribute import Job, Recipe, Result, WorkerLost, run_job
from .run_progress import say

NAMESPACE = "dragrun"
"""Ray namespace of the actors (named ``dragrun-<i>``)."""
INSTALL = "pip install -r requirements-cluster.txt"
"""The command that installs Ray (the optional cluster extra; also ``pip install "dragkit[cluster]"``)."""


def import_ray():
    """The ``ray`` module; :class:`DragInputError` saying what to install when this Python lacks it."""
    try:
        import ray
    except ImportError:
        raise DragInputError(f"--ray needs Ray, which this Python ({sys.executable}) does not have. Install the "
                             f"cluster extra from this repository:\n  {sys.executable} -m {INSTALL}") from None
    return ray


class ComfyActor:
    """A Ray actor's body: one ComfyUI (``models.server()``) kept for every job it gets."""

    def __init__(self, models) -> None:
        self.server = models.server(die_with_parent=True)
        self.server.start()

    def ready(self) -> dict:
        """Where the actor runs and its ComfyUI's ``/object_info`` (called once, before any job)."""
        import ray

        return {"node": ray.util.get_node_ip_address(), "pid": os.getpid(), "comfyui_pid": self.server.proc.pid,
                "object_info": self.server.object_info()}

    def run(self, recipe: Recipe, job: Job) -> Result:
        """The job's result; when its ComfyUI has exited the actor ends itself (the driver retries elsewhere)."""
        try:
            return run_job(self.server, recipe, job)
        except Exception:
            if self.server.proc.poll() is not None:
                os._exit(1)
            raise


class RayWorker:
    """The driver's handle on one :class:`ComfyActor` (see :class:`dragrun.distribute.Worker`)."""

    def __init__(self, ray, actor, label: str) -> None:
        self.ray, self.actor, self.label = ray, actor, label

    def run(self, recipe: Recipe, job: Job) -> Result:
        try:
            return self.ray.get(self.actor.run.remote(recipe, job))
        except self.ray.exceptions.RayActorError as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise WorkerLost(f"the Ray actor {self.label} died ({reason})") from None
        except self.ray.exceptions.RayTaskError as error:
            cause = error.as_instanceof_cause()
            raise cause from None

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.ray.kill(self.actor)


def actor_layout(resources: dict, device: str, cpus_per_actor: int, where: str) -> tuple[bool, int]:
    """``(gpu, number of actors)`` for a cluster with ``resources`` (Ray's ``cluster_resources()``).

    Raises :class:`DragInputError` for ``--device gpu`` on a cluster without
    a GPU, and when no actor fits.
    """
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if device == "gpu" and gpus == 0:
        raise DragInputError(f"--device gpu: the Ray cluster {where} has no GPU ({cpus} CPUs); "
                             "use --device cpu, or add GPU nodes")
    gpu = device == "gpu" or (device == "auto" and gpus > 0)
    count = gpus if gpu else cpus // cpus_per_actor
    if count == 0:
        raise DragInputError(f"the Ray cluster {where} has {cpus} CPUs, fewer than --cpus-per-actor {cpus_per_actor}")
    return gpu, count


def needed_paths(models) -> list[str]:
    """The paths every node must have: this repository, ComfyUI, and the run's model files."""
    files = [models.checkpoint, models.controlnet, models.upscale_model, *(item[3] for item in models.stand_ins)]
    return [str(p) for p in [repo_root(), comfyui_path(), *files] if p is not None]


def _missing_here(paths: list[str]) -> tuple[str, list[str]]:
    """On a node: its address and which of ``paths`` it lacks."""
    import ray

    return ray.util.get_node_ip_address(), [p for p in paths if not os.path.exists(p)]


def check_nodes(ray, paths: list[str]) -> None:
    """Refuse (:class:`DragInputError`) unless every alive node of the cluster has every one of ``paths``."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(_missing_here)
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    answers = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                       .remote(paths) for node in nodes])
    problems = [f"node {address} lacks {', '.join(missing)}" for address, missing in answers if missing]
    if problems:
        raise DragInputError("every Ray node needs this repository, ComfyUI (COMFYUI_PATH) and the model files at "
                             "the same paths as here (copy them, or mount a shared folder):\n  " + "\n  ".join(problems))


def start_actors(args: argparse.Namespace, models, stack: contextlib.ExitStack) -> tuple[list[RayWorker], dict]:
    """Join or start the cluster, check its nodes, start the actors (stopped by ``stack``); returns them and an
    ``/object_info`` of their ComfyUI."""
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=None if args.ray == "local" else args.ray, namespace=NAMESPACE, include_dashboard=False,
                 log_to_driver=False)
        stack.callback(ray.shutdown)
    where = "started here" if args.ray == "local" else f"at {args.ray}"
    gpu, count = actor_layout(ray.cluster_resources(), args.device, args.cpus_per_actor, where)
    check_nodes(ray, needed_paths(models))
    models = replace(models, gpu=gpu)  # the cluster's device, not the driver's
    env = {"PYTHONPATH": str(repo_root()), "COMFYUI_PATH": str(comfyui_path())}
    actor_class = ray.remote(ComfyActor)
    actors = [actor_class.options(num_gpus=1 if gpu else 0, num_cpus=0 if gpu else args.cpus_per_actor,
                                  name=f"dragrun-{index}", namespace=NAMESPACE, max_restarts=0,
                                  runtime_env={"env_vars": env}).remote(models) for index in range(count)]
    stack.callback(lambda: [ray.kill(actor) for actor in actors])
    say_where = f"{count} Ray actor{'s' if count > 1 else ''} on the {'GPU' if gpu else 'CPU'}"
    say(f"starting {say_where}, one ComfyUI each (10-60 s)")
    try:
        ready = ray.get([actor.ready.remote() for actor in actors])
    except ray.exceptions.RayError as error:
        raise ComfyServerError(f"a Ray actor's ComfyUI did not start: {error}") from None
    workers = [RayWorker(ray, actor, f"{info['node']}#{index}") for index, (actor, info) in enumerate(zip(actors, ready))]
    say(f"{say_where} up: " + ", ".join(worker.label for worker in workers))
    return workers, ready[0]["object_info"]

