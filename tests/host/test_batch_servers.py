"""``--server URL``: a batch shared out over ComfyUI servers that are already running (two started here, headless).

The same three Drag100 samples (downscaled 4x, 128 px wide) through the tiny
SD1.5 checkpoint, once as a one-server run (the runner starts its own
ComfyUI) and once over two servers (the tests' shared server, which holds the
same checkpoint, and one more): the same files, the same records and the
same images. Servers that lack the pack or a model (stand-ins serving a
real server's ``/object_info`` with the pack's node classes, or the
checkpoint, taken out) and an address where nothing answers are refused
before anything runs.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dragkit.metrics import DAI_PAPER
from dragrun import comfy_host, evaluate
from dragrun.run_workflow import main
from tools import tiny_models

from .batch_data import files, records, small_samples

pytestmark = pytest.mark.host

FASTDRAG = Path(__file__).resolve().parents[2] / "workflows" / "fastdrag.json"
SAMPLES = ("antelopes_0", "art_0", "art_1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_samples(tmp_path_factory.mktemp("batch-data"), SAMPLES)


@pytest.fixture(scope="module")
def two_servers(comfy_server):
    """The tests' shared server and one more started here, both with the tiny SD1.5 checkpoint."""
    with comfy_host.ComfyServer(checkpoints=[tiny_models.tiny_checkpoint_path()]) as another:
        yield comfy_server, another


@pytest.fixture(scope="module")
def one_server_run(data, comfyui, tmp_path_factory):
    """The reference: the same batch as a one-server run (the runner's own ComfyUI)."""
    out = tmp_path_factory.mktemp("one-server") / "out"
    assert main([str(FASTDRAG), "--batch", str(data), "--out", str(out)]) == 0
    return out


def prompts_run(server) -> int:
    return len(server.get_json("/history"))


def test_two_servers_give_the_files_and_records_of_a_one_server_run(data, two_servers, one_server_run, tmp_path, capsys):
    out = tmp_path / "out"
    history = [prompts_run(server) for server in two_servers]  # the shared server ran other tests' prompts
    argv = [str(FASTDRAG), "--batch", str(data), "--out", str(out)] + [a for s in two_servers for a in ("--server", s.url)]
    assert main(argv) == 0
    assert files(out) == files(one_server_run) == sorted(
        [f"{name}/{file}" for name in SAMPLES for file in ("edited.png", "side_by_side.png")] + ["timings.json"])
    assert records(out) == records(one_server_run)
    assert set(records(out)["samples"]) == set(SAMPLES)
    for name in SAMPLES:
        for file in ("edited.png", "side_by_side.png"):
            ours, theirs = (np.asarray(Image.open(folder / name / file)) for folder in (out, one_server_run))
            assert np.array_equal(ours, theirs), f"{name}/{file}"
    taken = [prompts_run(server) - before for server, before in zip(two_servers, history)]
    assert min(taken) >= 1 and sum(taken) == len(SAMPLES), taken  # both servers took samples, each sample once
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]

    reports = {}
    for name, folder in (("servers", out), ("one", one_server_run)):  # the evaluator reads the merged folder as is
        assert evaluate.main(["--data", str(data), "--edited", f"fastdrag={folder}", "--report",
                              str(tmp_path / f"{name}.json")]) == 0
        summary = json.loads((tmp_path / f"{name}.json").read_text())["methods"]["fastdrag"]["summary"]
        reports[name] = {key: value for key, value in summary.items() if key != "median seconds"}
    assert reports["servers"] == reports["one"] and reports["servers"]["evaluated"] == len(SAMPLES)
    assert reports["servers"][DAI_PAPER]  # the DAI means are there (and equal)

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert main(argv) == 0  # everything done: skipped, nothing run again
    assert json.loads((out / "timings.json").read_text())["summary"]["skipped"] == len(SAMPLES)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before
    assert sum(prompts_run(server) for server in two_servers) == sum(history) + len(SAMPLES)
    capsys.readouterr()
    assert main(argv + ["--prompt", "another prompt"]) == 2  # a changed run against this out/: refused
    assert "holds the results of another run" in capsys.readouterr().err


class ObjectInfoOnly(BaseHTTPRequestHandler):
    """A stand-in server: answers ``/object_info`` with ``self.server.info`` and records every other request."""

    def do_GET(self):
        if self.path.startswith("/object_info"):
            body = json.dumps(self.server.info).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.server.requests.append(self.path)
            self.send_response(404)
            self.end_headers()

    def do_POST(self):
        self.server.requests.append(self.path)
        self.send_response(500)
        self.end_headers()

    def log_message(self, *args):
        pass


def stand_in(info: dict) -> ThreadingHTTPServer:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ObjectInfoOnly)
    httpd.info, httpd.requests = info, []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def test_servers_without_the_pack_or_the_model_are_refused_before_anything_runs(data, two_servers, tmp_path, capsys):
    real = two_servers[0]
    info = real.object_info()
    checkpoint = tiny_models.tiny_checkpoint_path().name
    no_pack = {name: spec for name, spec in info.items() if not name.startswith("DragKit")}
    no_model = json.loads(json.dumps(info))
    loader = no_model["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"]
    options = loader[0] if isinstance(loader[0], list) else loader[1]["options"]
    assert checkpoint in options
    options.remove(checkpoint)
    stand_ins = [stand_in(no_pack), stand_in(no_model)]
    urls = [f"http://127.0.0.1:{s.server_address[1]}" for s in stand_ins]
    history = prompts_run(real)
    try:
        capsys.readouterr()
        code = main([str(FASTDRAG), "--batch", str(data), "--out", str(tmp_path / "out"),
                     "--server", real.url, "--server", urls[0], "--server", urls[1]])
        error = capsys.readouterr().err
    finally:
        for s in stand_ins:
            s.shutdown()
            s.server_close()
    assert code == 2
    assert f"{urls[0]} lacks node classes DragKit" in error and "is the DragKit pack installed there?" in error
    assert f"{urls[1]} lacks model {checkpoint!r} (CheckpointLoaderSimple.ckpt_name)" in error
    assert f"{real.url} lacks" not in error and f"{urls[1]} lacks node classes" not in error
    assert [s.requests for s in stand_ins] == [[], []]  # nothing uploaded or queued anywhere
    assert prompts_run(real) == history
    assert not (tmp_path / "out").exists()


def test_an_address_where_nothing_answers_is_refused(data, comfyui, tmp_path, capsys):
    url = f"http://127.0.0.1:{comfy_host.free_port()}"
    assert main([str(FASTDRAG), "--batch", str(data), "--out", str(tmp_path / "out"), "--server", url]) == 2
    error = capsys.readouterr().err
    assert f"--server {url}: no ComfyUI answers there (ConnectionError" in error
    assert not (tmp_path / "out").exists()
