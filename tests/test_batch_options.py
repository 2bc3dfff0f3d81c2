"""The runner's --server / --ray options without a server or a cluster: argument errors, Ray missing, the actor
layout, the servers' checks on a made-up ``/object_info``, and the driver's loop with workers that fail or get lost."""

import sys
import threading

import pytest

from dragkit.errors import DragInputError
from dragrun import distribute, ray_workers, run_workflow, servers


@pytest.mark.parametrize("argv, message", [
    (["--image", "x.png", "--server", "http://a:8188"], "--server and --ray share out a --batch"),
    (["--batch", "data", "--server", "http://a:8188", "--ray"], "give --server or --ray, not both"),
    (["--batch", "data", "--ray", "--cpus-per-actor", "0"], "--cpus-per-actor must be at least 1"),
])
def test_bad_combinations_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        run_workflow.parse_args(["w.json", *argv])
    assert message in capsys.readouterr().err


def test_ray_address_is_optional():
    assert run_workflow.parse_args(["w.json", "--batch", "d", "--ray"]).ray == "local"
    assert run_workflow.parse_args(["w.json", "--batch", "d", "--ray", "auto"]).ray == "auto"
    assert run_workflow.parse_args(["w.json", "--batch", "d"]).ray is None


def test_ray_missing_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(DragInputError, match=r"--ray needs Ray.*\n.* -m pip install -r requirements-cluster.txt"):
        ray_workers.import_ray()


def test_actor_layout_follows_the_cluster():
    assert ray_workers.actor_layout({"CPU": 64, "GPU": 4}, "auto", 4, "x") == (True, 4)
    assert ray_workers.actor_layout({"CPU": 64, "GPU": 4}, "cpu", 8, "x") == (False, 8)
    assert ray_workers.actor_layout({"CPU": 9}, "auto", 4, "x") == (False, 2)
    with pytest.raises(DragInputError, match="--device gpu: the Ray cluster at h:6379 has no GPU \\(16 CPUs\\)"):
        ray_workers.actor_layout({"CPU": 16}, "gpu", 4, "at h:6379")
    with pytest.raises(DragInputError, match="has 2 CPUs, fewer than --cpus-per-actor 4"):
        ray_workers.actor_layout({"CPU": 2}, "cpu", 4, "x")


def test_servers_are_checked_for_node_classes_and_model_files():
    info = {"CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["a.safetensors"], {}]}}},
            "KSampler": {"input": {"required": {"sampler_name": ["COMBO", {"options": ["euler"]}]}}}}
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
              "2": {"class_type": "KSampler", "inputs": {"sampler_name": "euler"}},
              "3": {"class_type": "DragKitWarp", "inputs": {}}}
    assert servers.missing_on(prompt, info) == ["node classes DragKitWarp (is the DragKit pack installed there?)"]
    prompt["1"]["inputs"]["ckpt_name"] = "b.safetensors"
    prompt["2"]["inputs"]["sampler_name"] = "heun"
    assert servers.missing_on(prompt, {**info, "DragKitWarp": {}})[0] == "model 'b.safetensors' (CheckpointLoaderSimple.ckpt_name)"
    assert servers.is_model_input("clip_name2") and not servers.is_model_input("image")


class Fake:
    """A worker that fails the samples named in ``bad`` and is lost at its ``lose_at``-th job."""

    def __init__(self, label, lose_at=None, bad=()):
        self.label, self.lose_at, self.bad, self.jobs = label, lose_at, bad, []

    def run(self, recipe, job):
        self.jobs.append(job.name)
        if len(self.jobs) == self.lose_at:
            raise distribute.WorkerLost(f"{self.label} went away")
        if job.name in self.bad:
            raise ValueError(f"{job.name} is bad")
        return distribute.Result(job.name, b"png", b"png", 1.0)

    def stop(self):
        pass


def jobs(*names):
    return [distribute.Job(name, {}, None) for name in names]


def test_a_lost_worker_hands_its_sample_on_and_bad_samples_fail_once():
    done, failed = {}, {}
    workers = [Fake("a", lose_at=2), Fake("b", bad=("s3",))]
    left, lost = distribute.distribute(jobs("s1", "s2", "s3", "s4", "s5"), workers, None,
                                       lambda w, job, result: done.setdefault(job.name, (w.label, job.attempt)),
                                       lambda w, job, error, seconds: failed.setdefault(job.name, str(error)))
    assert left == [] and lost == ["a: a went away"]
    assert set(done) == {"s1", "s2", "s4", "s5"} and failed == {"s3": "s3 is bad"}
    lost_job = workers[0].jobs[1]
    assert done[lost_job] == ("b", 1) and workers[1].jobs.count(lost_job) == 1


def test_a_sample_is_tried_on_three_workers_at_most():
    failed = {}
    workers = [Fake(label, lose_at=1) for label in "abcd"]
    left, lost = distribute.distribute(jobs("s1"), workers, None, lambda *a: None,
                                       lambda w, job, error, seconds: failed.setdefault(job.name, str(error)))
    assert left == [] and len(lost) == 3 and sum(len(w.jobs) for w in workers) == 3
    assert failed["s1"].startswith("lost 3 workers while running it; the last: ")


def test_with_no_worker_left_the_sample_fails_with_the_reason_and_the_rest_is_left():
    failed = {}
    left, lost = distribute.distribute(jobs("s1", "s2", "s3"), [Fake("a", lose_at=1)], None, lambda *a: None,
                                       lambda w, job, error, seconds: failed.setdefault(job.name, str(error)))
    assert [job.name for job in left] == ["s2", "s3"] and lost == ["a: a went away"]
    assert failed == {"s1": "lost 1 worker while running it; the last: a went away"}


class StopsOnCtrlC(Fake):
    """Finishes its first job; at the second it says so and waits until the driver stops it."""

    def __init__(self):
        super().__init__("w")
        self.at_second = threading.Event()
        self.stopped = threading.Event()

    def run(self, recipe, job):
        self.jobs.append(job.name)
        if len(self.jobs) == 1:
            return distribute.Result(job.name, b"png", b"png", 1.0)
        self.at_second.set()
        assert self.stopped.wait(10)
        raise RuntimeError("interrupted by the driver")

    def stop(self):
        self.stopped.set()


def test_ctrl_c_stops_the_workers_keeps_what_finished_and_records_no_verdict(monkeypatch):
    """Ctrl+C lands where the driver waits for its threads (``Thread.join``): raised there once the worker runs its
    second job, deterministically (``_thread.interrupt_main`` is delivered whenever the main thread next runs
    Python code, which under pytest-xdist can be after the test)."""
    done, failed = [], []
    worker = StopsOnCtrlC()
    join, pressed = threading.Thread.join, []

    def join_or_ctrl_c(thread, timeout=None):
        if worker.at_second.is_set() and not pressed:
            pressed.append(thread.name)
            raise KeyboardInterrupt
        return join(thread, timeout)

    monkeypatch.setattr(threading.Thread, "join", join_or_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        distribute.distribute(jobs("s1", "s2", "s3"), [worker], None, lambda w, job, result: done.append(job.name),
                              lambda w, job, error, seconds: failed.append(job.name))
    assert pressed == ["dragrun-w"]
    assert worker.stopped.is_set() and done == ["s1"] and failed == [] and worker.jobs == ["s1", "s2"]
