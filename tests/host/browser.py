"""Headless Chromium driven over the DevTools protocol, for the browser tests.

Debian's Chromium (``apt-get install chromium``) or ``DRAGKIT_CHROMIUM``;
driven with ``websocket-client`` (no browser download, no extra driver).
Shared by ``test_editor_browser.py`` and ``test_workflows_browser.py``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

VIEWPORT = (1400, 1000)
STILL_FRAMES = 10
"""Animation frames a click's target must stay in place before the click (:meth:`Browser.settled_points`)."""


def chromium() -> str | None:
    """The Chromium/Chrome executable to drive (``DRAGKIT_CHROMIUM`` or the first found on PATH), or None."""
    explicit = os.environ.get("DRAGKIT_CHROMIUM")
    if explicit:
        return explicit if shutil.which(explicit) else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


class PageChanged(RuntimeError):
    """An evaluation ended without a result because the page navigated (reload, workflow switch)."""


class Browser:
    """One headless Chromium page, driven over the DevTools protocol."""

    def __init__(self, executable: str) -> None:
        import websocket

        width, height = VIEWPORT
        self.user_dir = tempfile.mkdtemp(prefix="dragkit-chromium-")
        self.proc = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
             "--disable-dev-shm-usage", f"--user-data-dir={self.user_dir}", "--remote-debugging-port=0",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        port_file = Path(self.user_dir) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"{executable} did not start a DevTools endpoint")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []
        self.send("Runtime.enable")
        self.send("Page.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def send(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)
                if msg["method"] == "Page.javascriptDialogOpening":
                    # the frontend's "leave the page?" (unsaved workflow) would block a navigation
                    self.next_id += 1
                    self.ws.send(json.dumps({"id": self.next_id, "method": "Page.handleJavaScriptDialog",
                                             "params": {"accept": True}}))

    def js(self, expression: str, timeout: float = 60):
        """Evaluate ``expression`` in the page (promises awaited) and return its JSON value."""
        result = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True,
                           timeout=int(timeout * 1000))
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise AssertionError(f"JS error: {details.get('exception', {}).get('description') or details.get('text')}")
        if "result" not in result:  # the page navigated while evaluating
            raise PageChanged(f"the page changed while evaluating: {expression[:200]}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.js(expression)
            except PageChanged:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for: {expression}")
            time.sleep(0.05)

    def mouse(self, kind: str, x: float, y: float, button: str = "none", buttons: int = 0) -> None:
        """One real mouse event at viewport (x, y) (``Input.dispatchMouseEvent``: hit-tested as a user's)."""
        self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button=button, buttons=buttons, clickCount=1)

    def settled_points(self, points_js: str, target_js: str) -> list[tuple[float, float]]:
        """Viewport points, once they are still and on their target.

        ``points_js``: a JS expression giving a list of ``{x, y}`` viewport points
        (recomputed each animation frame); ``target_js``: one giving the element
        they are meant for. Returns the points once ``target_js`` (or an element
        inside it) is what lies under every one of them and they have stayed the
        same for :data:`STILL_FRAMES` frames: the frontends move DOM widgets a frame
        or more after the graph changes, and a node may be laid out again after
        its content loads; a click before that lands elsewhere (issue 29: with two
        frames a click on 1.58.1 landed 2 to 6 pixels off).
        """
        found = self.js(f"""new Promise((resolve) => {{
            let last = null, still = 0, tries = 0;
            const step = () => {{
                const target = ({target_js});
                const points = ({points_js}).map(p => ({{x: p.x, y: p.y}}));
                const hit = !!target && points.every(p => {{
                    const under = document.elementFromPoint(p.x, p.y);
                    return under === target || target.contains(under);
                }});
                const key = JSON.stringify(points);
                still = hit && key === last ? still + 1 : 0;
                if (still >= {STILL_FRAMES} || ++tries > {STILL_FRAMES * 24}) return resolve({{points, hit}});
                last = hit ? key : null;
                requestAnimationFrame(step);
            }};
            step();
        }})""")
        assert found["hit"], f"{target_js} is not under {found['points']} (or they never stood still)"
        return [(p["x"], p["y"]) for p in found["points"]]

    def click_at(self, point_js: str, target_js: str, button: str = "left") -> tuple[float, float]:
        """Click the viewport point ``point_js`` (JS giving ``{x, y}``) meant for the element ``target_js``, with
        real mouse events, once it is still and on its target (:meth:`settled_points`); returns where."""
        [(x, y)] = self.settled_points(f"[{point_js}]", target_js)
        mask = {"left": 1, "right": 2}[button]
        self.mouse("mouseMoved", x, y)
        self.mouse("mousePressed", x, y, button, mask)
        self.mouse("mouseReleased", x, y, button, 0)
        return x, y

    def press(self, element_js: str) -> tuple[float, float]:
        """Click the middle of the element ``element_js`` (a button, a checkbox) as a user does: real mouse events,
        hit-tested, once it stands still (never DOM ``.click()``, which skips hit-testing)."""
        centre = f"(() => {{ const r = ({element_js}).getBoundingClientRect(); return {{x: r.left + r.width / 2, y: r.top + r.height / 2}}; }})()"
        return self.click_at(centre, element_js)

    def drag_through(self, points_js: str, target_js: str) -> list[tuple[float, float]]:
        """Press at the first of the points ``points_js`` (JS giving a list of ``{x, y}``), move through the others
        and release at the last, once they are still and on ``target_js`` (:meth:`settled_points`)."""
        points = self.settled_points(points_js, target_js)
        self.mouse("mouseMoved", *points[0])
        self.mouse("mousePressed", *points[0], "left", 1)
        for point in points[1:]:
            self.mouse("mouseMoved", *point, "left", 1)
        self.mouse("mouseReleased", *points[-1], "left", 0)
        return points

    def key(self, key: str, code: str, key_code: int, modifiers: int = 0) -> None:
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, key=key, code=code, windowsVirtualKeyCode=key_code,
                      modifiers=modifiers)

    def screenshot(self, path: Path, clip: dict | None = None) -> None:
        params = {"format": "png"}
        if clip:
            params["clip"] = {**clip, "scale": 1}
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", **params)["data"]))

    def errors(self, needle: str) -> list[str]:
        """Uncaught exceptions and console errors whose text contains ``needle``."""
        found = []
        for event in self.events:
            params = event.get("params", {})
            if event["method"] == "Runtime.exceptionThrown":
                text = json.dumps(params.get("exceptionDetails", {}))
            elif event["method"] == "Runtime.consoleAPICalled" and params.get("type") == "error":
                text = json.dumps(params.get("args", []))
            else:
                continue
            if needle in text:
                found.append(text[:2000])
        return found

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.user_dir, ignore_errors=True)


def editor_modes() -> list[bool]:
    """The frontend modes the browser tests run in, Nodes 2.0 or not, from ``DRAGKIT_VUE_NODES``: unset or ``0``
    classic, ``1`` Nodes 2.0, ``both`` classic then Nodes 2.0 on the same server (one pytest run per frontend)."""
    value = os.environ.get("DRAGKIT_VUE_NODES", "")
    if value == "both":
        return [False, True]
    return [value not in ("", "0")]


_mode_in_use: bool | None = None


def vue_nodes() -> bool:
    """Whether the page under test runs Nodes 2.0: nodes drawn as Vue/DOM components instead of on the LiteGraph
    canvas (setting ``Comfy.VueNodes.Enabled``, frontend 1.27+ knows it; older ones ignore it). The mode of the
    :func:`editor_mode` fixture in use; outside one, the first of :func:`editor_modes`."""
    return editor_modes()[0] if _mode_in_use is None else _mode_in_use


@pytest.fixture(scope="module", params=editor_modes(), ids=lambda on: "nodes2" if on else "classic")
def editor_mode(request):
    """One of :func:`editor_modes` for a browser test module: its page fixtures take this fixture, so pytest runs
    the module's tests in each mode in turn, each with a page loaded in that mode."""
    global _mode_in_use
    _mode_in_use = request.param
    try:
        yield request.param
    finally:
        _mode_in_use = None


def open_comfyui(browser: Browser, server, node_class: str, timeout: float = 90) -> Browser:
    """Load ComfyUI's frontend from ``server`` (a ComfyServer) in ``browser``, without the "Get started"
    dialog, in classic or Nodes 2.0 mode (:func:`vue_nodes`; the setting is written before loading), and
    wait until ``node_class`` is registered; returns ``browser``."""
    assert server.post("/settings/Comfy.TutorialCompleted", json=True).status_code == 200
    assert server.post("/settings/Comfy.VueNodes.Enabled", json=vue_nodes()).status_code == 200
    browser.send("Page.navigate", url=server.url)
    browser.wait_for(f"!!(window.app?.graph && window.LiteGraph?.registered_node_types?.['{node_class}'])", timeout)
    if vue_nodes():
        browser.wait_for("window.LiteGraph.vueNodesMode === true", timeout)
    return browser


@contextlib.contextmanager
def comfyui_page(server, node_class: str):
    """A fresh headless Chromium page with the frontend of ``server`` loaded (:func:`open_comfyui`), closed after."""
    browser = Browser(chromium())
    try:
        yield open_comfyui(browser, server, node_class)
    finally:
        browser.close()


def frontend_mode(browser: Browser) -> str:
    """``<frontend version>-<classic|nodes2>`` of the loaded page, for artifact names."""
    version = browser.js("window.__COMFYUI_FRONTEND_VERSION__ || 'unknown'")
    return f"{version}-{'nodes2' if browser.js('!!window.LiteGraph.vueNodesMode') else 'classic'}"
