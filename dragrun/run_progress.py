"""What the headless runner is doing, printed as it happens (stderr): ComfyUI's start and each node it executes.

ComfyUI sends execution events over its websocket to the client that queued
a prompt (``/ws?clientId=<ComfyServer.client_id>``): ``execution_start``,
``execution_cached`` (nodes served from its cache), ``executing`` (a node
starts; ``node: null`` when the prompt is done) and ``progress`` (a node's
own progress bar: ``value`` of ``max``). :class:`NodeProgress` listens on a
thread while a prompt runs and prints one line when a node starts, its
progress at most every :data:`PROGRESS_EVERY` seconds, and its time when the
next one starts. Without the ``websocket-client`` package (which
``scripts/test.sh`` installs) or when the socket cannot be opened it prints
one line saying so and the run goes on without node lines.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, TextIO

PREFIX = "[run]"
PROGRESS_EVERY = 5.0
"""Seconds between two progress lines of one node (its first and last step are always printed)."""


def say(message: str, stream: TextIO | None = None) -> None:
    """One progress line on stderr (flushed, so a pipe or a log gets it at once)."""
    stream = stream or sys.stderr
    print(f"{PREFIX} {message}", file=stream, flush=True)


def node_names(prompt: dict, object_info: dict) -> dict[str, str]:
    """``{node id: "Display Name (#id)"}`` for an API prompt, with names from ``/object_info``."""
    names = {}
    for node_id, node in prompt.items():
        class_type = node.get("class_type", "?")
        display = (object_info.get(class_type) or {}).get("display_name") or class_type
        names[str(node_id)] = f"{display} (#{node_id})"
    return names


class NodeProgress:
    """Prints the execution events of one ComfyServer's client while used as a context manager.

    ``server``: a started :class:`dragrun.comfy_host.ComfyServer`; ``names``:
    :func:`node_names` of the prompt about to be queued (its length is the
    "of N" in the lines). Open the context *before* queueing, so no event is
    missed.
    """

    def __init__(self, server, names: dict[str, str], stream: TextIO | None = None) -> None:
        self.server = server
        self.names = names
        self.stream = stream or sys.stderr
        self._socket = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._node: str | None = None
        self._node_start = 0.0
        self._last_progress = 0.0
        self._last_value: float | None = None
        self._count = 0

    def __enter__(self) -> "NodeProgress":
        try:
            import websocket
        except ImportError:
            say("(no websocket-client in this Python: no per-node progress; pip install websocket-client)", self.stream)
            return self
        url = f"ws://127.0.0.1:{self.server.port}/ws?clientId={self.server.client_id}"
        try:
            self._socket = websocket.create_connection(url, timeout=10)
        except (OSError, websocket.WebSocketException) as error:
            say(f"(could not open ComfyUI's websocket: {error}; no per-node progress)", self.stream)
            return self
        self._socket.settimeout(0.5)
        self._thread = threading.Thread(target=self._listen, name="dragkit-run-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._socket is not None:
            self._socket.close()

    def _listen(self) -> None:
        import websocket

        while not self._stop.is_set():
            try:
                message = self._socket.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except (OSError, websocket.WebSocketException):
                return
            if isinstance(message, (bytes, bytearray)):
                continue  # preview images
            try:
                event = json.loads(message)
            except ValueError:
                continue
            self.handle(event.get("type"), event.get("data") or {})

    def handle(self, kind: str | None, data: dict) -> None:
        """Print the line(s) for one event (see the module docstring)."""
        now = time.monotonic()
        if kind == "execution_start":
            say(f"executing the workflow ({len(self.names)} nodes)", self.stream)
        elif kind == "execution_cached":
            cached = [self.names.get(str(n), f"#{n}") for n in data.get("nodes") or []]
            if cached:
                say(f"  from ComfyUI's cache: {', '.join(cached)}", self.stream)
        elif kind == "executing":
            self._finish(now)
            node = data.get("node")
            if node is None:
                return
            self._node, self._node_start, self._last_progress, self._last_value = str(node), now, now, None
            self._count += 1
            say(f"  [{self._count}/{len(self.names)}] {self.names.get(self._node, f'#{node}')} ...", self.stream)
        elif kind == "progress":
            value, total = data.get("value"), data.get("max")
            if not isinstance(value, (int, float)) or not isinstance(total, (int, float)) or total <= 0:
                return
            if value == self._last_value:
                return
            if value in (1, total) or now - self._last_progress >= PROGRESS_EVERY:
                self._last_progress, self._last_value = now, value
                say(f"      step {value:g}/{total:g} ({now - self._node_start:.0f} s)", self.stream)

    def _finish(self, now: float) -> None:
        if self._node is not None:
            say(f"      done in {now - self._node_start:.1f} s", self.stream)
            self._node = None


@contextmanager
def started(server, stream: TextIO | None = None) -> Iterator:
    """Start ``server`` (a :class:`dragrun.comfy_host.ComfyServer`) saying so before and after; stops it on exit."""
    where = "the GPU" if not server.cpu else "the CPU"
    say(f"starting ComfyUI from {server.comfyui} on {where} (10-60 s, minutes on busy cores: it imports torch "
        f"and loads its nodes and this pack)", stream)
    with server:
        say(f"ComfyUI is up after {server.startup_seconds:.0f} s", stream)
        yield server
