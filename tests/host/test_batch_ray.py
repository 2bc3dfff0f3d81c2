"""``--ray``: a batch on a local Ray cluster on the CPU (two actors, one ComfyUI each, the tiny SD1.5 checkpoint).

Four Drag100 samples (downscaled 4x, 128 px wide): the same files, records
and images as a one-server run (on the tests' shared server, which holds the
same checkpoint); an actor's process killed mid-batch (its
sample goes to the other actor), then the other's (no worker left): every
sample ends ok or failed with the reason, nothing half-written, and a rerun
runs only what is missing. Refused: ``--device gpu`` on a cluster without a
GPU, a path a node lacks. Skipped when Ray (``requirements-cluster.txt``) is
not installed.
"""

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dragrun.run_workflow import main

from .batch_data import files, records, small_samples

RAY_SKIP = "ray is not installed (the --ray tests need the cluster extra: pip install -r requirements-cluster.txt)"
ray = pytest.importorskip("ray", reason=RAY_SKIP)

pytestmark = pytest.mark.host

FASTDRAG = Path(__file__).resolve().parents[2] / "workflows" / "fastdrag.json"
SAMPLES = ("antelopes_0", "art_0", "art_1", "art_2")
RAY_ARGS = ["--ray", "--device", "cpu", "--cpus-per-actor", "1"]


@pytest.fixture(scope="module")
def cluster(comfyui):
    """A local Ray cluster of two CPUs (two actors of one CPU each), as small as Ray allows."""
    ray.init(num_cpus=2, namespace="dragrun", include_dashboard=False, log_to_driver=False,
             object_store_memory=80 * 1024 * 1024)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_samples(tmp_path_factory.mktemp("ray-data"), SAMPLES)


def actor_processes() -> list:
    """This test's Ray actor processes (descendants of this process only)."""
    import psutil

    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "ComfyActor" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass
    return found


def gone(processes: list, seconds: float = 30.0) -> bool:
    """Whether all ``processes`` (psutil) have ended within ``seconds`` (a killed actor takes a moment)."""
    import psutil

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
            return True
        time.sleep(0.2)
    return False


def test_two_actors_give_the_files_and_records_of_a_one_server_run(cluster, data, comfy_server, tmp_path):
    one, two = tmp_path / "one", tmp_path / "ray"
    assert main([str(FASTDRAG), "--batch", str(data), "--out", str(one), "--server", comfy_server.url]) == 0
    assert main([str(FASTDRAG), "--batch", str(data), "--out", str(two), *RAY_ARGS]) == 0
    assert files(two) == files(one) and len(files(one)) == 2 * len(SAMPLES) + 1
    assert records(two) == records(one)
    for name in SAMPLES:
        for file in ("edited.png", "side_by_side.png"):
            assert np.array_equal(*(np.asarray(Image.open(out / name / file)) for out in (one, two))), f"{name}/{file}"
    assert gone(actor_processes())  # the actors ended with the run


def test_killed_actors_leave_every_sample_ok_or_failed_and_a_rerun_finishes_the_rest(cluster, data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [str(FASTDRAG), "--batch", str(data), "--out", str(out), *RAY_ARGS]
    killed, servers, codes = [], [], []

    def ok_count() -> int:
        try:
            return json.loads((out / "timings.json").read_text())["summary"]["done"]
        except (OSError, ValueError, KeyError):
            return 0

    def killer() -> None:
        for after in (1, 2):  # one actor after the first sample, the other after the second
            deadline = time.monotonic() + 600
            while ok_count() < after and time.monotonic() < deadline and not codes:
                time.sleep(0.2)
            alive = actor_processes()
            if alive:
                killed.append(alive[0])
                servers.extend(alive[0].children())
                os.kill(alive[0].pid, signal.SIGKILL)

    thread = threading.Thread(target=killer)
    thread.start()
    codes.append(main(argv))
    thread.join()
    assert len(killed) == 2 and codes == [3]  # no actor left: stopped as when ComfyUI exits
    assert len(servers) == 2 and gone(servers)  # a killed actor's ComfyUI ends with it
    timings = json.loads((out / "timings.json").read_text())
    for name, entry in timings["samples"].items():
        assert entry["status"] in ("ok", "error"), name
        if entry["status"] == "error":
            assert "WorkerLost: lost" in entry["error"] and "died" in entry["error"] and not (out / name).exists()
        else:
            assert {p.name for p in (out / name).iterdir()} == {"edited.png", "side_by_side.png"}
    done = {name for name, entry in timings["samples"].items() if entry["status"] == "ok"}
    retried = [entry for entry in timings["samples"].values() if entry.get("lost_workers") or "lost 2" in entry.get("error", "")]
    assert retried  # the first killed actor's sample went to the other one
    assert len(done) >= 2 and not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert "Rerun the same command to resume" in capsys.readouterr().err
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}

    assert main(argv) == 0  # the rest only
    again = json.loads((out / "timings.json").read_text())
    assert {entry["status"] for entry in again["samples"].values()} == {"ok"} and set(again["samples"]) == set(SAMPLES)
    assert again["summary"]["skipped"] == len(done)
    assert {p: p.stat().st_mtime_ns for p in written} == written  # the finished samples were not written again
    assert gone(actor_processes())


def test_gpu_on_a_cluster_without_one_is_refused(cluster, data, tmp_path, capsys):
    assert main([str(FASTDRAG), "--batch", str(data), "--out", str(tmp_path / "out"), "--ray", "--device", "gpu"]) == 2
    assert "--device gpu: the Ray cluster started here has no GPU (2 CPUs)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_path_a_node_lacks_is_refused_naming_the_node(cluster, tmp_path):
    from dragkit.errors import DragInputError
    from dragrun.ray_workers import check_nodes

    present = tmp_path / "here.safetensors"
    present.write_bytes(b"")
    check_nodes(ray, [str(present)])
    with pytest.raises(DragInputError, match=rf"node [0-9.]+ lacks {tmp_path / 'gone.safetensors'}"):
        check_nodes(ray, [str(present), str(tmp_path / "gone.safetensors")])
