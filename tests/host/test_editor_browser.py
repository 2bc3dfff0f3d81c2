"""The Drag Points Editor widget in a real browser, against a real ComfyUI.

ComfyUI (``comfy_server``) serves its real frontend (``comfyui-frontend-package``)
with this pack installed; Debian's Chromium runs it headless, driven over the
Chrome DevTools protocol with ``websocket-client`` (no browser download, no
extra driver). The main test adds the node, shows an uploaded non-square
image, clicks two handle/target pairs and paints a mask stroke with real
mouse events, then checks that the points and mask survive a save/reload of
the workflow, copy/paste and graph undo, that ``app.graphToPrompt()`` carries
them and that the queued prompt runs and outputs them; then the enlarged
view, right-click delete and replacing the image. Two more tests: a Drag100
sample's state written by Python reads back byte-identical in JS, and a
connected IMAGE is shown (Load Image at once, other sources after a run).
Issue 13: the file combo and upload button hide while an IMAGE is connected;
a MASK input seeds the mask and eraser/brush strokes apply on top; in an
editor -> FastDrag graph the decoded result shows in the editor after a run,
and with Live on a point drop re-runs only the nodes after the points
(counted from ComfyUI's ``executing`` messages), once per pending run.
Screenshots go to ``test-artifacts/editor/<frontend version>-<classic|nodes2>-*.png``.

Skips with a message when ComfyUI (``COMFYUI_PATH``) or Chromium is missing.
Set ``DRAGKIT_CHROMIUM`` to use another Chromium/Chrome binary.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dragkit.datasets import load_drag100
from dragkit.editor_state import editor_state_json, parse_editor_state
from dragkit.points import DragPoints
from dragrun.comfy_host import repo_root

from .browser import Browser, frontend_mode, open_comfyui
from .browser import chromium as _chromium
from .browser import editor_mode  # noqa: F401  (the fixture the page takes: one run per frontend mode)

ARTIFACTS = repo_root() / "test-artifacts" / "editor"
DRAG100_SAMPLE = repo_root().parent / "shared" / "data" / "Drag100" / "bird_0"
NODE_CLASS = "DragKitPointsEditor"
IMAGE_SIZE = (320, 200)  # width, height: non-square on purpose
PAIRS = [((40, 30), (120, 60)), ((250, 150), (200, 100))]
STROKE_Y = 170
BRUSH = 32  # the editor's default brush diameter, in image pixels


pytestmark = pytest.mark.skipif(
    _chromium() is None, reason="no Chromium found (install Debian's: apt-get install chromium; or set DRAGKIT_CHROMIUM)"
)


@pytest.fixture(scope="module")
def browser(editor_mode):
    """A fresh Chromium (its own profile) for each frontend mode, so nothing a page stored carries over."""
    executable = _chromium()
    pytest.importorskip("websocket", reason="websocket-client is needed to drive Chromium")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    chrome = Browser(executable)
    try:
        yield chrome
    finally:
        chrome.close()


@pytest.fixture(scope="module")
def page(comfy_server, browser, editor_mode):
    """The ComfyUI frontend loaded in the browser (classic or Nodes 2.0: ``DRAGKIT_VUE_NODES``), with the pack's
    node registered."""
    return open_comfyui(browser, comfy_server, NODE_CLASS)


def _artifact(chrome: Browser, name: str) -> Path:
    """``test-artifacts/editor/<frontend version>-<classic|nodes2>-<name>``."""
    return ARTIFACTS / f"{frontend_mode(chrome)}-{name}"


def _frontend_version(chrome: Browser) -> tuple[int, ...]:
    return tuple(int(p) for p in chrome.js("window.__COMFYUI_FRONTEND_VERSION__").split(".")[:3])


def _pack_errors(chrome: Browser) -> list[str]:
    """Uncaught exceptions and console errors from the pack's scripts (served under /extensions/dragkit/)."""
    return chrome.errors("extensions/dragkit/")


def _test_image() -> np.ndarray:
    width, height = IMAGE_SIZE
    yy, xx = np.mgrid[:height, :width]
    image = np.stack([xx * 255 // (width - 1), yy * 255 // (height - 1), np.full_like(xx, 90)], axis=-1)
    image[(yy - 60) ** 2 + (xx - 90) ** 2 < 30**2] = (250, 230, 60)  # something to drag
    return image.astype(np.uint8)


def _upload(server, tmp_path: Path, name: str, image: np.ndarray) -> str:
    path = tmp_path / name
    Image.fromarray(image).save(path)
    return server.upload_image(path)


EDITOR = "window.__editorNode.dragPointsEditor"
NEW_GRAPH = ("app.graph.clear(); app.canvas.ds.scale = 1; app.canvas.ds.offset = [0, 0];"
             " const add = (type, pos) => { const n = LiteGraph.createNode(type); n.pos = pos; app.graph.add(n); return n; };")
"""JS: an empty graph at scale 1, and ``add(type, pos)`` to place nodes in it."""


def _view(view: int = 0) -> str:
    """JS for view ``view`` of the bound editor (0: in the node, 1: the enlarged one)."""
    return f"[...{EDITOR}.views][{view}]"


def _source_points(points, view: int = 0) -> str:
    """JS for the viewport points of source pixels ``points`` [(x, y), ...] in an editor view."""
    return "[" + ", ".join(f"{_view(view)}.sourceToClient({x}, {y})" for x, y in points) + "]"


def _click_source(chrome: Browser, x: float, y: float, view: int = 0, button: str = "left") -> None:
    """Click source pixel (x, y) of an editor view through the one click helper (real, hit-tested mouse events
    once the view's canvas is under the point and has stood still: ``Browser.click_at``)."""
    chrome.click_at(f"{_view(view)}.sourceToClient({x}, {y})", f"{_view(view)}.canvas", button)


def _drag_source(chrome: Browser, points, view: int = 0) -> None:
    """Drag through source pixels ``points`` of an editor view with real mouse events (``Browser.drag_through``)."""
    chrome.drag_through(_source_points(points, view), f"{_view(view)}.canvas")


def _control(action: str, view: int = 0) -> str:
    """JS for the toolbar control ``data-action=action`` of the bound editor's view (not the first in the
    document: a frontend may keep other nodes' editors in it, hidden)."""
    return f"{_view(view)}.root.querySelector('.dragkit-pe-bar [data-action={action}]')"


def _press(chrome: Browser, action: str, view: int = 0) -> None:
    """Press a toolbar control as a user does (``Browser.press``: real mouse events at its middle)."""
    chrome.press(_control(action, view))


def _state(chrome: Browser) -> str:
    return chrome.js("window.__editorNode.widgets.find(w => w.name === 'editor_state').value")


def _bind_editor_node(chrome: Browser, nth: int = 0) -> None:
    chrome.js(f"window.__editorNode = app.graph.nodes.filter(n => n.type === '{NODE_CLASS}')"
              f".sort((a, b) => a.id - b.id)[{nth}]; true")
    chrome.wait_for(f"{EDITOR}.imageStatus === 'loaded'")


def test_editor_in_the_browser(comfy_server, page, tmp_path):
    t0 = time.monotonic()
    chrome = page
    file_name = _upload(comfy_server, tmp_path, "dragkit_editor_test.png", _test_image())
    small_name = _upload(comfy_server, tmp_path, "dragkit_editor_small.png", _test_image()[:120, :160])

    # -- a small graph: editor -> preview of the image; editor mask -> MaskToImage -> preview
    chrome.js(f"""(() => {{
        {NEW_GRAPH}
        const editor = add('{NODE_CLASS}', [100, 90]);
        editor.setSize([440, 540]);
        const preview = add('PreviewImage', [620, 90]);
        const toImage = add('MaskToImage', [620, 420]);
        const maskPreview = add('PreviewImage', [900, 420]);
        editor.connect(0, preview, 0);
        editor.connect(2, toImage, 0);
        toImage.connect(0, maskPreview, 0);
        const file = editor.widgets.find(w => w.name === 'image_file');
        file.value = {json.dumps(file_name)};
        file.callback?.(file.value);
        app.canvas.setDirty(true, true);
        window.__editorNode = editor;
        return true;
    }})()""")
    chrome.wait_for(f"{EDITOR}.imageStatus === 'loaded'")
    width, height = IMAGE_SIZE
    assert chrome.js(f"[{EDITOR}.model.width, {EDITOR}.model.height]") == [width, height]
    assert chrome.js("window.__editorNode.widgets.find(w => w.name === 'editor_state').hidden") is True

    # -- two handle/target pairs and a brush stroke, with real mouse events
    for handle, target in PAIRS:
        _click_source(chrome, *handle)
        _click_source(chrome, *target)
    _press(chrome, "brush")
    _drag_source(chrome, [(x, STROKE_Y) for x in range(20, 301, 10)])
    state_text = _state(chrome)
    state = parse_editor_state(state_text, width=width, height=height)
    assert [(h, t) for h, t in zip(state.points.handles, state.points.targets)] == [
        (tuple(map(float, h)), tuple(map(float, t))) for h, t in PAIRS
    ]
    assert state.pending is None
    painted_rows, painted_cols = np.nonzero(state.mask)
    assert state.mask[STROKE_Y, 160] and state.mask[STROKE_Y, 20] and state.mask[STROKE_Y, 300]
    assert abs(painted_rows - STROKE_Y).max() <= BRUSH // 2 + 1
    assert painted_cols.min() >= 20 - BRUSH // 2 - 1 and painted_cols.max() <= 300 + BRUSH // 2 + 1

    _screenshot_node(chrome, _artifact(chrome, "node.png"))

    # -- the workflow JSON holds the state compactly; reloading it restores points and mask
    workflow = chrome.js("app.graph.serialize()")
    saved = next(n for n in workflow["nodes"] if n["type"] == NODE_CLASS)
    assert saved["widgets_values"][:2] == [file_name, state_text]
    assert len(json.dumps(saved)) < 10_000
    chrome.js(f"(async () => {{ await app.loadGraphData({json.dumps(workflow)}); return true; }})()")
    _bind_editor_node(chrome)
    assert _state(chrome) == state_text, (_state(chrome), state_text)
    assert chrome.js(f"{EDITOR}.model.serialize()") == state_text
    assert chrome.js(f"{EDITOR}.model.maskCount") == int(state.mask.sum())

    # -- the API prompt carries the same state
    prompt = chrome.js("(async () => (await app.graphToPrompt()).output)()")
    node_id = chrome.js("String(window.__editorNode.id)")
    assert prompt[node_id]["class_type"] == NODE_CLASS
    assert prompt[node_id]["inputs"]["editor_state"] == state_text
    assert prompt[node_id]["inputs"]["image_file"] == file_name
    assert set(prompt[node_id]["inputs"]) == {"image_file", "editor_state"}

    # -- ... and runs: the node outputs these points and this mask
    entry = comfy_server.run(prompt, timeout=120)
    summary = entry["outputs"][node_id]["dragkit_editor"][0]
    assert summary == {"width": width, "height": height, "pairs": 2, "mask_pixels": int(state.mask.sum())}
    preview_ids = chrome.js("app.graph.nodes.filter(n => n.type === 'PreviewImage')"
                            ".sort((a, b) => a.pos[0] - b.pos[0]).map(n => String(n.id))")
    image_preview_id, mask_preview_id = preview_ids
    [mask_file] = comfy_server.output_files(entry, mask_preview_id)
    assert np.array_equal(np.asarray(Image.open(mask_file).convert("L")) > 127, state.mask)
    [image_file] = comfy_server.output_files(entry, image_preview_id)
    assert np.abs(np.asarray(Image.open(image_file).convert("RGB"), int) - _test_image()).max() <= 1

    # -- copy/paste of the node keeps the state
    chrome.js("(() => { app.canvas.copyToClipboard([window.__editorNode]);"
              " app.canvas.pasteFromClipboard({position: [100, 700]}); return true; })()")
    assert chrome.js(f"app.graph.nodes.filter(n => n.type === '{NODE_CLASS}').length") == 2
    assert chrome.js(f"app.graph.nodes.filter(n => n.type === '{NODE_CLASS}')"
                     f".every(n => n.widgets.find(w => w.name === 'editor_state').value === {json.dumps(state_text)})")
    chrome.js("(() => { const nodes = app.graph.nodes.filter(n => n.type === 'DragKitPointsEditor');"
              " app.graph.remove(nodes.sort((a, b) => a.id - b.id)[1]); return true; })()")

    # -- graph undo (Ctrl+Z on the canvas) restores the state before an edit
    tracker = "app.extensionManager.workflow.activeWorkflow.changeTracker"
    chrome.js(f"{tracker}.checkState(); true")
    _press(chrome, "points")
    _click_source(chrome, 300, 20)  # a third handle, no target yet
    assert parse_editor_state(_state(chrome)).pending == (300.0, 20.0)
    chrome.js("document.activeElement.blur(); true")
    chrome.key("z", "KeyZ", 90, modifiers=2)
    chrome.wait_for(f"app.graph.nodes.find(n => n.type === '{NODE_CLASS}')"
                    f".widgets.find(w => w.name === 'editor_state').value === {json.dumps(state_text)}")
    _bind_editor_node(chrome)

    # -- the enlarged view edits the same state; its undo is the editor's own
    _press(chrome, "enlarge")
    chrome.wait_for("document.querySelector('dialog.dragkit-pe-dialog')?.open === true")
    chrome.wait_for(f"[...{EDITOR}.views].length === 2 && [...{EDITOR}.views][1].fit.scale > 1.5")
    chrome.js("new Promise(r => requestAnimationFrame(() => r(true)))")
    chrome.screenshot(_artifact(chrome, "enlarged.png"))
    node_before = chrome.js("window.__editorNode.id")
    _drag_source(chrome, [(120, 60), (140, 80)], view=1)  # move target 1
    moved = parse_editor_state(_state(chrome))
    assert moved.points.targets[0] == (140.0, 80.0) and moved.points.handles == state.points.handles
    chrome.key("z", "KeyZ", 90, modifiers=2)
    assert _state(chrome) == state_text
    assert chrome.js("window.__editorNode.id") == node_before
    assert chrome.js("app.graph.nodes.includes(window.__editorNode)")  # not re-created by a graph undo
    chrome.key("Escape", "Escape", 27)
    chrome.wait_for("!document.querySelector('dialog.dragkit-pe-dialog')")

    # -- right-click deletes a pair
    _click_source(chrome, *PAIRS[1][1], button="right")
    assert parse_editor_state(_state(chrome)).points.num_pairs == 1

    # -- a smaller image keeps the points that fit and says what was dropped
    _click_source(chrome, *PAIRS[1][0])
    _click_source(chrome, *PAIRS[1][1])
    chrome.js(f"(() => {{ const w = window.__editorNode.widgets.find(w => w.name === 'image_file');"
              f" w.value = {json.dumps(small_name)}; w.callback?.(w.value); return true; }})()")
    chrome.wait_for(f"{EDITOR}.model.width === 160")
    resized = parse_editor_state(_state(chrome), width=160, height=120)
    assert resized.points.handles == (tuple(map(float, PAIRS[0][0])),)
    assert chrome.js(f"{EDITOR}.warning").startswith("The image changed from 320×200 to 160×120: 1 point pair")

    assert not _pack_errors(chrome), _pack_errors(chrome)
    elapsed = time.monotonic() - t0
    _artifact(chrome, "timing.json").write_text(json.dumps({"browser_test_seconds": round(elapsed, 1)}))


@pytest.mark.skipif(not DRAG100_SAMPLE.is_dir(), reason=f"the shipped Drag100 data is not at {DRAG100_SAMPLE}")
def test_a_drag100_sample_shows_in_the_editor(comfy_server, page):
    """A state written by Python (points and run-length mask from Drag100) reads back identically in JS."""
    chrome = page
    sample = load_drag100(DRAG100_SAMPLE)
    file_name = comfy_server.upload_image(DRAG100_SAMPLE / "original.jpg")
    state_text = sample.editor_state()
    chrome.js(f"""(() => {{
        app.graph.clear();
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [0, 0];
        const node = LiteGraph.createNode('{NODE_CLASS}');
        node.pos = [100, 110];
        app.graph.add(node);
        node.setSize([420, 800]);
        node.widgets.find(w => w.name === 'editor_state').value = {json.dumps(state_text)};
        node.dragPointsEditor.loadFromWidget();
        const file = node.widgets.find(w => w.name === 'image_file');
        file.value = {json.dumps(file_name)};
        file.callback?.(file.value);
        app.canvas.setDirty(true, true);
        window.__editorNode = node;
        return true;
    }})()""")
    chrome.wait_for(f"{EDITOR}.imageStatus === 'loaded'")
    assert chrome.js(f"{EDITOR}.model.serialize()") == state_text
    assert chrome.js(f"{EDITOR}.model.maskCount") == int(sample.mask.sum())
    assert chrome.js(f"{EDITOR}.model.pairs.length") == sample.points.num_pairs
    assert chrome.js(f"{EDITOR}.warning") == ""
    _screenshot_node(chrome, _artifact(chrome, "drag100.png"))
    # the warp preview of the same points (a 512 x 768 image is previewed at 512^2 pixels)
    _press(chrome, "warp")
    chrome.wait_for(f"{EDITOR}.shownPreview() != null", 60)
    assert chrome.js(f"{EDITOR}.preview.scale") < 1
    _screenshot_node(chrome, _artifact(chrome, "drag100-warp.png"))
    assert not _pack_errors(chrome), _pack_errors(chrome)


def _screenshot_node(chrome: Browser, path: Path) -> None:
    """A screenshot of the editor node only (its bounding box on screen, with a margin)."""
    chrome.js("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(true))))")
    box = chrome.js("""(() => {
        const n = window.__editorNode, element = document.querySelector(`[data-node-id="${n.id}"]`);
        if (window.LiteGraph.vueNodesMode && element) {  // Nodes 2.0: the node is a DOM element
            const r = element.getBoundingClientRect();
            return {x: r.left - 12, y: r.top - 12, width: r.width + 24, height: r.height + 24};
        }
        const ds = app.canvas.ds, r = app.canvas.canvas.getBoundingClientRect();
        const [x, y] = ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT]);
        return {x: r.left + x - 12, y: r.top + y - 12,
                width: n.size[0] * ds.scale + 24, height: (n.size[1] + LiteGraph.NODE_TITLE_HEIGHT) * ds.scale + 24};
    })()""")
    chrome.screenshot(path, clip=box)


def test_a_connected_image_is_shown_and_wins(comfy_server, page, tmp_path):
    """IMAGE input: a Load Image's file shows at once; any other source after a run (even a failed one)."""
    chrome = page
    file_name = _upload(comfy_server, tmp_path, "dragkit_editor_linked.png", _test_image()[:150, :100])
    chrome.js(f"""(() => {{
        app.graph.clear();
        const add = (type, pos) => {{ const n = LiteGraph.createNode(type); n.pos = pos; app.graph.add(n); return n; }};
        const load = add('LoadImage', [20, 100]);
        const image = load.widgets.find(w => w.name === 'image');
        image.value = {json.dumps(file_name)};
        image.callback?.(image.value);
        const node = add('{NODE_CLASS}', [700, 100]);
        load.connect(0, node, node.findInputSlot('image'));
        node.connect(0, add('PreviewImage', [1200, 100]), 0);
        app.canvas.setDirty(true, true);
        window.__editorNode = node;
        window.__loadNode = load;
        return true;
    }})()""")
    chrome.wait_for(f"{EDITOR}.imageStatus === 'loaded' && {EDITOR}.sourceKey.startsWith('link:')")
    assert chrome.js(f"[{EDITOR}.model.width, {EDITOR}.model.height]") == [100, 150]

    chrome.js("""(() => {
        const invert = LiteGraph.createNode('ImageInvert');
        invert.pos = [380, 100];
        app.graph.add(invert);
        window.__loadNode.connect(0, invert, 0);
        invert.connect(0, window.__editorNode, window.__editorNode.findInputSlot('image'));
        app.canvas.setDirty(true, true);
        return true;
    })()""")
    chrome.wait_for(f"{EDITOR}.imageStatus === 'waiting'")
    chrome.js(RECORD_EVENTS)
    chrome.js("(async () => { await app.queuePrompt(0); return true; })()")
    chrome.wait_for(f"{EDITOR}.sourceKey.startsWith('run:') && {EDITOR}.imageStatus === 'loaded'", 60)
    assert chrome.js(f"{EDITOR}.executedImage.type") == "temp"
    assert chrome.js(f"[{EDITOR}.model.width, {EDITOR}.model.height]") == [100, 150]
    error = chrome.wait_for("window.__events.find(e => e.type === 'execution_error')?.detail.exception_message", 30)
    assert error.startswith("[Drag Points Editor] no handle/target pairs were placed")
    assert not _pack_errors(chrome), _pack_errors(chrome)


# ----------------------------------------------------------------------------------------------
# Issue 13: file widgets hidden while an IMAGE is connected; a MASK input seeds the mask;
# the edited image of the graph shows in the editor; live re-edit re-runs only what follows the points.

RECORD_EVENTS = """(() => {
    const api = window.comfyAPI.api.api;
    if (!window.__events) {
        window.__events = [];
        for (const type of ['executing', 'status', 'execution_cached', 'execution_error'])
            api.addEventListener(type, (e) => window.__events.push({type, detail: e.detail, t: performance.now()}));
    }
    window.__events.length = 0;
    return true;
})()"""

IDLE = ("(() => { const s = window.__events.filter(e => e.type === 'status');"
        " return s.length > 0 && s[s.length - 1].detail?.exec_info?.queue_remaining === 0; })()")


def _close_dialogs(chrome: Browser) -> None:
    """Dismiss dialogs an earlier test left open (e.g. ComfyUI's execution error), which would catch the mouse."""
    for _ in range(3):
        if not chrome.js("document.querySelectorAll('.p-dialog').length"):
            return
        chrome.key("Escape", "Escape", 27)
        time.sleep(0.2)
    assert not chrome.js("document.querySelectorAll('.p-dialog').length"), "a dialog stays open over the canvas"


def _executed(chrome: Browser) -> set[str]:
    """Ids of the nodes that ran (not cached) since the events were last cleared."""
    return set(chrome.js("window.__events.filter(e => e.type === 'executing' && e.detail != null)"
                         ".map(e => String(e.detail))"))


def _wait_idle(chrome: Browser, timeout: float = 240) -> None:
    chrome.wait_for(f"window.__events.some(e => e.type === 'executing' && e.detail === null) && {IDLE}", timeout)


def test_file_widgets_hide_and_a_mask_input_seeds_the_mask(comfy_server, page, tmp_path):
    chrome = page
    _close_dialogs(chrome)
    width, height = 96, 64
    rgba = np.dstack([_test_image()[:height, :width], np.full((height, width), 255, np.uint8)])
    rgba[16:48, 8:40, 3] = 0  # transparent box: Load Image's MASK output is 1 there
    file_name = _upload(comfy_server, tmp_path, "dragkit_editor_mask_input.png", rgba)
    seed = np.zeros((height, width), bool)
    seed[16:48, 8:40] = True
    chrome.js(RECORD_EVENTS)
    chrome.js(f"""(() => {{
        {NEW_GRAPH}
        const load = add('LoadImage', [20, 100]);
        const image = load.widgets.find(w => w.name === 'image');
        image.value = {json.dumps(file_name)};
        image.callback?.(image.value);
        const node = add('{NODE_CLASS}', [380, 60]);
        node.setSize([440, 520]);
        node.widgets.find(w => w.name === 'image_file').value = {json.dumps(file_name)};
        const toImage = add('MaskToImage', [900, 100]);
        node.connect(2, toImage, 0);
        toImage.connect(0, add('PreviewImage', [1150, 100]), 0);
        app.canvas.setDirty(true, true);
        window.__editorNode = node;
        window.__loadNode = load;
        return true;
    }})()""")
    hidden = f"window.__editorNode.widgets.filter(w => ['image_file', 'upload'].includes(w.name)).map(w => !!w.hidden)"
    saved_values = "app.graph.serialize().nodes.find(n => n.type === 'DragKitPointsEditor').widgets_values"
    assert chrome.js(hidden) == [False, False]
    before = chrome.js(saved_values)
    chrome.js("window.__loadNode.connect(0, window.__editorNode, window.__editorNode.findInputSlot('image')); true")
    assert chrome.js(hidden) == [True, True]
    chrome.wait_for(f"{EDITOR}.imageStatus === 'loaded'")
    after = chrome.js(saved_values)  # [image_file, editor_state, upload]: hiding changes no position
    # while the IMAGE is connected the file combo holds "" (no frontend reads it as a missing media file; 1.27's
    # combo cannot be empty and that frontend has no such check: the file stays) ...
    held = "" if _frontend_version(chrome) >= (1, 49) else before[0]
    assert len(after) == len(before) == 3 and before[0] and after[0] == held and after[2] == before[2]
    chrome.js("window.__editorNode.disconnectInput(window.__editorNode.findInputSlot('image')); true")
    assert chrome.js(hidden) == [False, False]
    assert chrome.js(saved_values)[0] == before[0]  # ... and the user's file comes back when it is disconnected
    chrome.js("window.__loadNode.connect(0, window.__editorNode, window.__editorNode.findInputSlot('image'));"
              "window.__loadNode.connect(1, window.__editorNode, window.__editorNode.findInputSlot('mask')); true")
    assert chrome.js(hidden) == [True, True]
    chrome.wait_for(f"{EDITOR}.imageStatus === 'loaded'")
    assert chrome.js(f"[{EDITOR}.model.width, {EDITOR}.model.height]") == [width, height]

    # one pair, then a run: the widget shows the input mask
    _click_source(chrome, 20, 30)
    _click_source(chrome, 60, 30)
    assert parse_editor_state(_state(chrome)).points.num_pairs == 1
    chrome.js("(async () => { await app.queuePrompt(0); return true; })()")
    chrome.wait_for(f"{EDITOR}.model.seed !== null", 60)
    assert chrome.js(f"{EDITOR}.model.editableCount") == int(seed.sum())
    _screenshot_node(chrome, _artifact(chrome, "mask-input.png"))

    # keep editing it: erase a stroke across the box, paint one below it; the node's MASK is the combination
    _press(chrome, "eraser")
    _drag_source(chrome, [(x, 30) for x in range(0, 50, 4)])
    _press(chrome, "brush")
    _drag_source(chrome, [(x, 58) for x in range(50, 90, 4)])
    state = json.loads(_state(chrome))
    assert state.get("erase") and state.get("mask"), (state, chrome.js(f"{EDITOR}.tool"))
    parsed = parse_editor_state(_state(chrome), width=width, height=height)
    expected = (seed | parsed.mask) & ~parsed.erase
    assert chrome.js(f"{EDITOR}.model.editableCount") == int(expected.sum())
    chrome.js(RECORD_EVENTS)
    prompt = chrome.js("(async () => (await app.graphToPrompt()).output)()")
    entry = comfy_server.run(prompt, timeout=120)
    preview_id = chrome.js("String(app.graph.nodes.find(n => n.type === 'PreviewImage').id)")
    [mask_file] = comfy_server.output_files(entry, preview_id)
    assert np.array_equal(np.asarray(Image.open(mask_file).convert("L")) > 127, expected)
    assert not _pack_errors(chrome), _pack_errors(chrome)


def test_the_result_shows_and_live_reedit_reruns_only_what_follows_the_points(comfy_server, page, tmp_path,
                                                                              tiny_checkpoint):
    chrome = page
    _close_dialogs(chrome)
    image = np.asarray(Image.open(repo_root() / "samples" / "art_0" / "original.jpg").convert("RGB").resize((64, 64)))
    file_name = _upload(comfy_server, tmp_path, "dragkit_editor_live.png", image)
    chrome.js(RECORD_EVENTS)
    ids = chrome.js(f"""(() => {{
        app.graph.clear();
        app.canvas.ds.scale = 0.6;
        app.canvas.ds.offset = [0, 0];
        const add = (type, pos, values = {{}}) => {{
            const n = LiteGraph.createNode(type); n.pos = pos; app.graph.add(n);
            for (const [name, value] of Object.entries(values)) {{
                const w = n.widgets.find(w => w.name === name); w.value = value; w.callback?.(value);
            }}
            return n;
        }};
        const link = (a, slot, b, name) => a.connect(slot, b, b.findInputSlot(name));
        const ckpt = add('CheckpointLoaderSimple', [0, 0], {{ckpt_name: {json.dumps(tiny_checkpoint.name)}}});
        const load = add('LoadImage', [0, 200], {{image: {json.dumps(file_name)}}});
        const clip = add('CLIPTextEncode', [400, 0], {{text: ''}});
        const encode = add('VAEEncode', [400, 250]);
        const invert = add('DragKitDDIMInvert', [700, 0], {{steps: 10, strength: 0.7}});
        const editor = add('{NODE_CLASS}', [350, 420]);
        editor.setSize([440, 520]);
        const warp = add('DragKitFastDragWarp', [1000, 300]);
        const sample = add('DragKitKVInjectedSample', [1300, 0]);
        const decode = add('DragKitVAEDecode', [1600, 0]);
        const preview = add('PreviewImage', [1900, 0]);
        link(ckpt, 1, clip, 'clip');
        link(load, 0, encode, 'pixels'); link(ckpt, 2, encode, 'vae');
        link(ckpt, 0, invert, 'model'); link(encode, 0, invert, 'latent'); link(clip, 0, invert, 'positive');
        link(load, 0, editor, 'image');
        link(invert, 0, warp, 'latent'); link(editor, 1, warp, 'points'); link(editor, 2, warp, 'mask');
        link(ckpt, 0, sample, 'model'); link(warp, 0, sample, 'latent'); link(invert, 1, sample, 'attn_cache');
        link(clip, 0, sample, 'positive');
        link(ckpt, 2, decode, 'vae'); link(sample, 0, decode, 'latent'); link(load, 0, decode, 'source_image');
        link(editor, 2, decode, 'mask');
        decode.connect(0, preview, 0);
        app.canvas.setDirty(true, true);
        window.__editorNode = editor;
        const id = (n) => String(n.id);
        return {{upstream: [ckpt, load, clip, encode, invert].map(id),
                 downstream: [editor, warp, sample, decode, preview].map(id), decode: id(decode)}};
    }})()""")
    chrome.wait_for(f"{EDITOR}.imageStatus === 'loaded'")
    # bring the editor's canvas into view for real mouse events
    chrome.js("(() => { const n = window.__editorNode; app.canvas.ds.scale = 1;"
              " app.canvas.ds.offset = [-n.pos[0] + 60, -n.pos[1] + 60]; app.canvas.setDirty(true, true); return true; })()")
    chrome.js("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(true))))")
    _click_source(chrome, 20, 32)
    _click_source(chrome, 30, 32)
    assert parse_editor_state(_state(chrome)).points.num_pairs == 1
    _press(chrome, "mask-handles")

    # the first run: everything runs; the decoded result shows in the editor
    chrome.js("(async () => { await app.queuePrompt(0); return true; })()")
    _wait_idle(chrome, timeout=480)  # the first run loads the checkpoint and inverts; 2 shared cores
    assert set(ids["upstream"] + ids["downstream"]) <= _executed(chrome)
    chrome.wait_for(f"{EDITOR}.result?.nodeId != null && {EDITOR}.showResult", 30)
    assert chrome.js(f"String({EDITOR}.result.nodeId)") == ids["decode"]
    assert chrome.js(f"{EDITOR}.result.image.naturalWidth") == 64
    assert chrome.js(f"{_control('result')}.classList.contains('active')")
    _screenshot_node(chrome, _artifact(chrome, "result.png"))
    _press(chrome, "result")  # back to the source
    assert chrome.js(f"{EDITOR}.showResult") is False

    # live re-edit on (a node property, saved in the workflow; widgets_values unchanged)
    _press(chrome, "live")
    saved = chrome.js("app.graph.serialize().nodes.find(n => n.type === 'DragKitPointsEditor')")
    assert saved["properties"]["dragkit_live"] is True and len(saved["widgets_values"]) == 3
    chrome.js(RECORD_EVENTS)
    old_result = chrome.js(f"{EDITOR}.result.ref.filename")
    _drag_source(chrome, [(30, 32), (36, 34), (40, 36)])  # move target
    assert chrome.js(f"{EDITOR}.liveRuns") == 0  # debounced: nothing queued at once
    chrome.wait_for(f"{EDITOR}.liveRuns === 1", 10)
    # a second drop while that run is pending: queued once, after it
    _drag_source(chrome, [(40, 36), (42, 38)])
    _wait_idle(chrome)
    chrome.wait_for(f"{EDITOR}.liveRuns === 2", 10)
    assert chrome.js(f"{EDITOR}.liveDeferred") == 1  # the second drop waited for the first run
    _wait_idle(chrome)
    queued = chrome.js("window.__events.filter(e => e.type === 'status').map(e => e.detail?.exec_info?.queue_remaining)")
    assert max(queued) == 1, queued  # never two of our runs in ComfyUI's queue at once
    ran = _executed(chrome)
    assert not ran & set(ids["upstream"]), f"upstream nodes re-ran: {sorted(ran & set(ids['upstream']))}"
    assert set(ids["downstream"]) <= ran
    chrome.wait_for(f"{EDITOR}.result.ref.filename !== {json.dumps(old_result)} && {EDITOR}.showResult", 30)
    state = parse_editor_state(_state(chrome), width=64, height=64)
    assert state.points.targets == ((42.0, 38.0),)
    assert not _pack_errors(chrome), _pack_errors(chrome)


# ----------------------------------------------------------------------------------------------
# Issue 23 item 3: the live warp preview. While a point is dragged the editor shows the image warped
# by js/pixel_warp.js and the inpaint mask; fed into "Drag Warp (pixels)", it previews that node's result.

WARP_CLASS = "DragKitPixelWarp"


def _patch_image() -> np.ndarray:
    """96 x 64: a smooth background with a textured 16 x 16 patch at x 16..31, y 16..31."""
    height, width = 64, 96
    yy, xx = np.mgrid[:height, :width]
    image = np.stack([xx * 2, yy * 3, np.full_like(xx, 60)], axis=-1).astype(np.uint8)
    image[16:32, 16:32] = np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    return image


def _preview_arrays(chrome: Browser) -> tuple[np.ndarray, np.ndarray]:
    """The editor's current warp preview: (H, W, 3) uint8 image and (H, W) bool inpaint mask."""
    out = chrome.js(f"""(() => {{
        const p = {EDITOR}.preview, m = {EDITOR}.model;
        const b64 = (a) => btoa(String.fromCharCode(...a));
        let rgba = '', inpaint = '';
        for (let i = 0; i < p.result.rgba.length; i += 30000) rgba += b64(p.result.rgba.subarray(i, i + 30000));
        for (let i = 0; i < p.result.inpaint.length; i += 30000) inpaint += b64(p.result.inpaint.subarray(i, i + 30000));
        return {{rgba: [rgba], inpaint: [inpaint], width: m.width, height: m.height}};
    }})()""")
    width, height = out["width"], out["height"]
    join = lambda parts: b"".join(base64.b64decode(part) for part in parts)  # noqa: E731
    rgba = np.frombuffer(join(out["rgba"]), np.uint8).reshape(height, width, 4)
    inpaint = np.frombuffer(join(out["inpaint"]), np.uint8).reshape(height, width).astype(bool)
    return rgba[..., :3].copy(), inpaint


def test_the_warp_preview_follows_a_dragged_point(comfy_server, page, tmp_path):
    chrome = page
    _close_dialogs(chrome)
    image = _patch_image()
    height, width = image.shape[:2]
    file_name = _upload(comfy_server, tmp_path, "dragkit_editor_warp.png", image)
    mask = np.zeros((height, width), bool)
    mask[16:32, 16:32] = True
    state = editor_state_json(DragPoints(((24.0, 24.0),), ((30.0, 26.0),), width, height), mask)
    has_warp_node = chrome.js(f"!!LiteGraph.registered_node_types['{WARP_CLASS}']")
    chrome.js(RECORD_EVENTS)
    chrome.js(f"""(() => {{
        {NEW_GRAPH}
        const editor = add('{NODE_CLASS}', [100, 60]);
        editor.setSize([440, 520]);
        editor.widgets.find(w => w.name === 'editor_state').value = {json.dumps(state)};
        editor.dragPointsEditor.loadFromWidget();
        const file = editor.widgets.find(w => w.name === 'image_file');
        file.value = {json.dumps(file_name)};
        file.callback?.(file.value);
        if ({json.dumps(has_warp_node)}) {{
            const warp = add('{WARP_CLASS}', [620, 60]);
            editor.connect(0, warp, warp.findInputSlot('image'));
            editor.connect(1, warp, warp.findInputSlot('points'));
            editor.connect(2, warp, warp.findInputSlot('mask'));
            warp.connect(0, add('PreviewImage', [900, 60]), 0);
            const toImage = add('MaskToImage', [900, 360]);
            warp.connect(1, toImage, 0);
            toImage.connect(0, add('PreviewImage', [1150, 360]), 0);
            window.__warpNode = warp;
        }}
        app.canvas.setDirty(true, true);
        window.__editorNode = editor;
        return true;
    }})()""")
    chrome.wait_for(f"{EDITOR}.imageStatus === 'loaded'")
    if has_warp_node:  # the preview switches itself on for an editor that feeds the warp node
        chrome.wait_for(f"{EDITOR}.warpNode?.band === 5 && {EDITOR}.previewOn", 10)
    else:
        _press(chrome, "warp")
    chrome.wait_for(f"{EDITOR}.preview?.result != null", 10)

    # drag the target with real mouse events; while the button is still down the preview shows the move
    dx, dy = 36, 20
    start, end = chrome.settled_points(_source_points([(30, 26), (24 + dx, 24 + dy)]), f"{_view()}.canvas")
    chrome.mouse("mouseMoved", *start)
    chrome.mouse("mousePressed", *start, "left", 1)
    for t in (0.25, 0.5, 0.75, 1.0):
        chrome.mouse("mouseMoved", start[0] + (end[0] - start[0]) * t, start[1] + (end[1] - start[1]) * t, "left", 1)
    moving = f"{EDITOR}.model.pairs[0].target.x === {24 + dx} && {EDITOR}.model.pairs[0].target.y === {24 + dy}"
    chrome.wait_for(f"{moving} && {EDITOR}.shownPreview() != null", 10)
    warped, inpaint = _preview_arrays(chrome)
    _screenshot_node(chrome, _artifact(chrome, "warp-preview.png"))
    chrome.mouse("mouseReleased", *end, "left", 0)
    assert parse_editor_state(_state(chrome)).points.targets == ((float(24 + dx), float(24 + dy)),)

    # the moved patch lands at the target; the uncovered source is in the inpaint mask; the rest is untouched
    assert np.array_equal(warped[16 + dy:32 + dy, 16 + dx:32 + dx], image[16:32, 16:32])
    uncovered = mask & ~np.roll(np.roll(mask, dy, 0), dx, 1)
    assert inpaint[uncovered].all()
    near = np.zeros_like(mask)
    near[16 - 3:32 + dy + 3, 16 - 3:32 + dx + 3] = True  # source, target and the k = 5 band (radius (k + 1) / 2)
    assert not inpaint[~near].any() and np.array_equal(warped[~near], image[~near])
    assert chrome.js(f"{EDITOR}.statusText()").count("warp preview k=5")

    # the same input through the Python warp: equal up to the stated tolerance (tests/test_editor_js.py)
    torch = pytest.importorskip("torch")
    from dragkit.pixel_warp import pixel_warp

    py = pixel_warp(torch.from_numpy(image)[None], torch.from_numpy(mask), torch.tensor([[24.0, 24.0]]),
                    torch.tensor([[float(24 + dx), float(24 + dy)]]), band=5)
    assert (py.image[0].numpy() != warped).any(-1).mean() <= 0.005
    assert (py.inpaint_mask.numpy() != inpaint).mean() <= 0.005

    if has_warp_node:  # the node's own result, run by ComfyUI, is what the editor previewed
        prompt = chrome.js("(async () => (await app.graphToPrompt()).output)()")
        entry = comfy_server.run(prompt, timeout=120)
        previews = chrome.js("app.graph.nodes.filter(n => n.type === 'PreviewImage').sort((a, b) => a.id - b.id)"
                             ".map(n => String(n.id))")
        [image_file] = comfy_server.output_files(entry, previews[0])
        [mask_file] = comfy_server.output_files(entry, previews[1])
        node_image = np.asarray(Image.open(image_file).convert("RGB"))
        node_mask = np.asarray(Image.open(mask_file).convert("L")) > 127
        assert (node_image != warped).any(-1).mean() <= 0.005
        assert (node_mask != inpaint).mean() <= 0.005
    assert not _pack_errors(chrome), _pack_errors(chrome)
