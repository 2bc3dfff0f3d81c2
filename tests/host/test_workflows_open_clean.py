"""Every shipped workflow opens clean in the served frontend: no warning on a pack node (issue 31).

The frontend is the host's own (ComfyUI 0.3.64: 1.27.10, 0.33.0: 1.49.6) or
``DRAGKIT_FRONTEND_ROOT``'s, in classic or Nodes 2.0 mode (``DRAGKIT_VUE_NODES``);
the first test asserts that the page serves that version, so an ignored
``--front-end-root`` cannot pass as another frontend. Per workflow, as a
user opens it: the template is loaded as the template browser loads it, the
photo (and mask) uploaded beforehand are chosen from the Load Image combos'
own lists (the combo's ``setValue``, the path of a user's pick), and then the
frontend's own validation state is read (:data:`READ_MARKS`: its
missing-media, missing-model and node-error lists where the version has them,
nodes it outlines, its error banner) with the editor's own warning and
message. Nothing may concern a pack node. A positive control opens the same
workflow with the editor's IMAGE link removed and a file that does not exist:
the reader must see the mark (the frontend's own from 1.49, whose missing-media
check is what issue 31 was about; the editor's own message on 1.27.10, which
has no such check); an editor with neither image nor file shows its message.

The editor's hidden widgets (``editor_state`` always, ``image_file`` and
``upload`` while an IMAGE is connected) are checked where each renderer reads
them: the flags the classic canvas skips, and in Nodes 2.0 the node's DOM (no
element of theirs with a size), with a control that the same DOM reader finds
``image_file`` when no IMAGE is connected. The editor's canvas keeps its place
from the first frame its image is drawn (a click there lands where the user
aimed, issue 29). Screenshots: ``test-artifacts/workflows-open/<version>-<mode>-<workflow>.png``.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from PIL import Image

from dragrun.comfy_host import PACK_FOLDER_NAME, comfyui_path, repo_root

from .browser import Browser, chromium, comfyui_page, editor_modes, frontend_mode, vue_nodes
from .browser import editor_mode  # noqa: F401  (the fixture the page takes: one run per frontend mode)

NODES2_SINCE = (1, 49)
"""First frontend whose Nodes 2.0 mounts a node's DOM widget (1.27.10's draws the node without the editor)."""

WORKFLOWS = sorted((repo_root() / "workflows").glob("*.json"))
ARTIFACTS = repo_root() / "test-artifacts" / "workflows-open"
EDITOR_CLASS = "DragKitPointsEditor"
PACK_PREFIX = "DragKit"  # every node class of the pack starts with it
MISSING_MEDIA_SINCE = (1, 49)
"""First tested frontend with a missing-media check (1.27.10 has none; 1.49.6 flagged the editor, issue 31)."""
FILE_LOADERS = {"LoadImage": "photo", "LoadImageMask": "mask"}  # loader -> which upload its `image` combo gets
STABLE_FRAMES = 30

READ_MARKS = """(() => {
    const marks = [];
    const nodeOf = (id) => app.graph.getNodeById(Number(String(id).split(':').pop()));
    const add = (source, id, detail) =>
        marks.push({source, node: String(id), type: nodeOf(id)?.type ?? null, detail: String(detail ?? '').slice(0, 300)});
    const pinia = document.querySelector('#vue-app')?.__vue_app__?.config?.globalProperties?.$pinia;
    const readers = [];
    for (const [id, store] of pinia?._s ?? []) {
        if ('missingMediaCandidates' in store) readers.push(`${id}.missingMediaCandidates`);
        if ('missingModelCandidates' in store) readers.push(`${id}.missingModelCandidates`);
        if ('lastNodeErrors' in store) readers.push(`${id}.lastNodeErrors`);
        for (const c of store.missingMediaCandidates ?? []) if (c.isMissing !== false) add('missing media', c.nodeId, c.name);
        for (const c of store.missingModelCandidates ?? []) if (c.isMissing !== false) add('missing model', c.nodeId, c.name);
        for (const [id, e] of Object.entries(store.lastNodeErrors ?? {})) add('node error', id, JSON.stringify(e?.errors ?? e));
        for (const t of store.missingNodesError?.nodeTypes ?? []) if (t?.nodeId != null) add('missing node', t.nodeId, t.type);
    }
    for (const n of app.graph.nodes) {
        if (n.has_errors) add('outlined', n.id, 'has_errors');
        const editor = n.dragPointsEditor;
        if (editor?.warning) add('editor warning', n.id, editor.warning);
        if (editor && ['missing', 'waiting'].includes(editor.imageStatus)) add('editor message', n.id, editor.message);
    }
    const banner = [...document.querySelectorAll('[role=alert], .p-toast-message, [class*=error-overlay], [class*=ErrorOverlay], [data-testid*=error]')]
        .filter(e => e.getClientRects().length).map(e => e.innerText.trim()).filter(Boolean);
    const pending = [...(pinia?._s?.values() ?? [])].some(s => (s.missingMediaCandidates ?? []).some(c => c.isMissing === undefined));
    return {marks, banner, readers, pending};
})()"""

CHOOSE_FILES = """(async (choices) => {
    await app.refreshComboInNodes?.();
    const chosen = [];
    for (const node of app.graph.nodes) {
        const name = choices[node.type];
        const w = name && node.widgets?.find(w => w.name === 'image');
        if (!w) continue;
        const values = typeof w.options.values === 'function' ? w.options.values(w, node) : w.options.values;
        const entry = values.find(v => v === name);
        if (entry === undefined) throw new Error(`${name} is not in ${node.type}'s list: ${values}`);
        if (w.setValue) w.setValue(entry, {node, canvas: app.canvas});  // what a pick in the combo's list calls
        else {  // frontend 1.27's widgets: the list's callback
            const old = w.value;
            w.value = entry;
            w.callback?.(entry, app.canvas, node);
            node.onWidgetChanged?.(w.name, entry, old, w);
        }
        chosen.push([node.id, entry]);
    }
    app.canvas.setDirty(true, true);
    return chosen;
})"""

HIDDEN = """((id) => {
    const n = app.graph.getNodeById(id);
    const image = n.findInputSlot('image');
    const linked = image >= 0 && n.inputs[image].link != null;
    return n.widgets.filter(w => w.name === 'editor_state' || (linked && ['image_file', 'upload'].includes(w.name)))
        .map(w => ({name: w.name, label: w.label ?? w.name, value: String(w.value ?? ''), hidden: !!w.hidden,
                    optionsHidden: !!w.options?.hidden, height: w.computeSize ? w.computeSize(400)[1] : null}));
})"""

DRAWN_IN_DOM = """((id, texts) => {
    const root = document.querySelector(`[data-node-id="${id}"]`);
    if (!root) return null;
    const sized = (e) => { const r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
    const found = [];
    for (const e of root.querySelectorAll('*')) {
        if (!sized(e)) continue;
        const own = e.children.length ? '' : e.textContent.trim();
        const value = 'value' in e && typeof e.value === 'string' ? e.value : '';
        for (const t of texts) if (t && (own === t || value === t)) found.push(t);
    }
    return found;
})"""

FOLLOW_CANVAS = """((id) => new Promise((resolve) => {
    const editor = app.graph.getNodeById(id).dragPointsEditor;
    const rects = [];
    let tries = 0;
    const step = () => {
        const view = [...editor.views][0];
        if (editor.imageStatus === 'loaded' && view?.canvas.isConnected) {
            const r = view.canvas.getBoundingClientRect();
            rects.push([r.left, r.top, r.width, r.height]);
        }
        if (rects.length >= FRAMES || ++tries > 600) return resolve({rects, status: editor.imageStatus});
        requestAnimationFrame(step);
    };
    step();
}))""".replace("FRAMES", str(STABLE_FRAMES))


def expected_frontend_version() -> str:
    """The frontend version the server was asked to serve: ``DRAGKIT_FRONTEND_ROOT``'s package (the
    ``comfyui_frontend_package-<version>.dist-info`` beside it), else the host's pin in its requirements.txt."""
    root = os.environ.get("DRAGKIT_FRONTEND_ROOT")
    if root:
        infos = sorted(Path(root).resolve().parent.parent.glob("comfyui_frontend_package-*.dist-info"))
        assert len(infos) == 1, f"no single comfyui_frontend_package-*.dist-info beside DRAGKIT_FRONTEND_ROOT={root}"
        return infos[0].name[len("comfyui_frontend_package-"):-len(".dist-info")]
    pin = re.search(r"^comfyui-frontend-package==(\S+)", (comfyui_path() / "requirements.txt").read_text(), re.M)
    assert pin, "the host's requirements.txt pins no comfyui-frontend-package"
    return pin.group(1)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def _nodes2_unsupported() -> bool:
    """Nodes 2.0 asked for on a frontend whose Nodes 2.0 cannot show the editor."""
    if not any(editor_modes()) or (comfyui_path() is None and not os.environ.get("DRAGKIT_FRONTEND_ROOT")):
        return False
    return _version_tuple(expected_frontend_version()) < NODES2_SINCE


pytestmark = [
    pytest.mark.skipif(chromium() is None,
                       reason="no Chromium found (install Debian's: apt-get install chromium; or set DRAGKIT_CHROMIUM)"),
    pytest.mark.skipif(_nodes2_unsupported(), reason="Nodes 2.0 needs frontend >= 1.49 (1.27's mounts no DOM widget)"),
]


@pytest.fixture(scope="module")
def uploads(comfy_server, tmp_path_factory) -> dict[str, str]:
    """A photo and a mask uploaded as a user would before opening a workflow: {loader class: file name}."""
    folder = tmp_path_factory.mktemp("open-clean")
    Image.new("RGB", (160, 120), (180, 120, 60)).save(folder / "dragkit_open_photo.png")
    Image.new("L", (160, 120), 255).save(folder / "dragkit_open_mask.png")
    names = {"photo": comfy_server.upload_image(folder / "dragkit_open_photo.png"),
             "mask": comfy_server.upload_image(folder / "dragkit_open_mask.png")}
    return {loader: names[kind] for loader, kind in FILE_LOADERS.items()}


@pytest.fixture(scope="module")
def page(comfy_server, uploads, editor_mode):
    """One page for the module: the frontend loaded after the uploads, the pack's nodes registered."""
    pytest.importorskip("websocket", reason="websocket-client is needed to drive Chromium")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with comfyui_page(comfy_server, EDITOR_CLASS) as page:
        yield page


def _open(chrome: Browser, name: str, workflow: dict | None = None) -> None:
    """Load a workflow as the template browser does (``workflow``: a changed copy of template ``name``)."""
    source = json.dumps(workflow) if workflow is not None else \
        f"await (await fetch('/api/workflow_templates/{PACK_FOLDER_NAME}/{name}.json')).json()"
    chrome.js(f"(async () => {{ await app.loadGraphData({source}, true, true, {json.dumps(name)}); return true; }})()")


def _marks(chrome: Browser, timeout: float = 10) -> dict:
    """The page's marks once the frontend has settled (no media check pending, the same marks for 0.5 s)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        now = chrome.js(READ_MARKS)
        if not now["pending"] and now == last:
            return now
        if time.monotonic() > deadline:
            return now
        last = now
        time.sleep(0.5)


def _pack_marks(found: dict, pack_titles: list[str]) -> list:
    """The marks and banner lines that concern a pack node."""
    marks = [m for m in found["marks"] if (m["type"] or "").startswith(PACK_PREFIX)]
    banner = [line for line in found["banner"] if any(t in line for t in pack_titles)]
    return marks + banner


@pytest.fixture(scope="module")
def pack_titles(comfy_server) -> list[str]:
    """What a banner may call a pack node: its display name, its class and the class in words (1.49.6's
    "Media input missing" named the editor "Drag Kit Points Editor")."""
    info = comfy_server.object_info()
    classes = [c for c in info if c.startswith(PACK_PREFIX)]
    return [info[c]["display_name"] for c in classes] + classes + [re.sub(r"(?<!^)(?=[A-Z])", " ", c) for c in classes]


def _editor_ids(chrome: Browser) -> list[int]:
    return chrome.js(f"app.graph.nodes.filter(n => n.type === '{EDITOR_CLASS}').map(n => n.id)")


def _show_node(chrome: Browser, node_id: int) -> None:
    """Put the node at scale 1 near the top left of the canvas (Nodes 2.0 draws no widget of a far-off node), and
    wait until its box has stood still for ten frames (the frontends move DOM a frame or more later)."""
    chrome.js(f"""new Promise((resolve) => {{
        const n = app.graph.getNodeById({node_id});
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [80 - n.pos[0], 80 - n.pos[1]];
        app.canvas.setDirty(true, true);
        const box = () => {{
            const e = document.querySelector(`[data-node-id="${{n.id}}"]`) ?? [...(n.dragPointsEditor?.views ?? [])][0]?.root;
            const r = e?.getBoundingClientRect();
            return r ? [r.left, r.top, r.width, r.height].join() : '';
        }};
        let last = null, still = 0, tries = 0;
        const step = () => {{
            const now = box();
            still = now === last ? still + 1 : 0;
            last = now;
            if (still >= 10 || ++tries > 240) return resolve(true);
            requestAnimationFrame(step);
        }};
        step();
    }})""")


def _assert_hidden_widgets_not_drawn(chrome: Browser, node_id: int) -> None:
    hidden = chrome.js(f"({HIDDEN})({node_id})")
    assert any(w["name"] == "editor_state" for w in hidden)
    for w in hidden:  # what each renderer reads: the classic canvas `hidden` and the height, Nodes 2.0 options.hidden
        assert w["hidden"] and w["optionsHidden"] and (w["height"] is None or w["height"] <= 0), w
    if vue_nodes():
        texts = [w["label"] for w in hidden] + [w["value"] for w in hidden if w["name"] == "editor_state"]
        drawn = chrome.js(f"({DRAWN_IN_DOM})({node_id}, {json.dumps(texts)})")
        assert drawn == [], f"Nodes 2.0 draws hidden widgets of the editor: {drawn}"


def test_the_served_frontend_is_the_one_asked_for(page):
    served = page.js("window.__COMFYUI_FRONTEND_VERSION__ ?? null")
    assert served == expected_frontend_version(), (served, os.environ.get("DRAGKIT_FRONTEND_ROOT"))
    assert page.js("!!window.LiteGraph.vueNodesMode") == vue_nodes()


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_a_shipped_workflow_opens_with_no_mark_on_a_pack_node(page, workflow, uploads, pack_titles):
    chrome, name = page, workflow.stem
    _open(chrome, name)
    editors = _editor_ids(chrome)
    if editors:  # in view before its image loads: from then on nothing but the editor itself could move it
        _show_node(chrome, editors[0])
    chosen = chrome.js(f"({CHOOSE_FILES})({json.dumps(uploads)})")
    assert chosen, "no Load Image to choose the photo in"
    if editors:
        follow = chrome.js(f"({FOLLOW_CANVAS})({editors[0]})")
        assert follow["status"] == "loaded" and len(follow["rects"]) == STABLE_FRAMES, follow
        assert len({tuple(r) for r in follow["rects"]}) == 1, f"the editor's canvas moved after its image loaded: {follow['rects']}"
    found = _marks(chrome)
    chrome.screenshot(ARTIFACTS / f"{frontend_mode(chrome)}-{name}.png")
    assert not _pack_marks(found, pack_titles), (_pack_marks(found, pack_titles), found)
    for node_id in editors:
        _show_node(chrome, node_id)
        _assert_hidden_widgets_not_drawn(chrome, node_id)


def test_the_reader_sees_an_editor_without_its_image(page, uploads, pack_titles):
    """Positive control: the fastdrag workflow with the editor's IMAGE link removed and a file that does not exist
    is marked (by the frontend itself from 1.49 on); with no file either, the editor says what to do."""
    chrome = page
    saved = json.loads((repo_root() / "workflows" / "fastdrag.json").read_text())
    editor = next(n for n in saved["nodes"] if n["type"] == EDITOR_CLASS)
    [image_input] = [i for i in editor["inputs"] if i["name"] == "image"]
    saved["links"] = [link for link in saved["links"] if link[0] != image_input["link"]]
    for node in saved["nodes"]:
        for output in node.get("outputs", []):
            if output.get("links"):
                output["links"] = [i for i in output["links"] if i != image_input["link"]]
    image_input["link"] = None
    editor["widgets_values"][0] = "dragkit_no_such_photo.png"
    _open(chrome, "fastdrag_without_image", saved)
    chrome.js(f"({CHOOSE_FILES})({json.dumps(uploads)})")
    found = _marks(chrome)
    chrome.screenshot(ARTIFACTS / f"{frontend_mode(chrome)}-control-missing-file.png")
    on_editor = {m["source"] for m in found["marks"] if m["type"] == EDITOR_CLASS}
    assert "editor message" in on_editor, found
    if _version_tuple(expected_frontend_version()) >= MISSING_MEDIA_SINCE:
        assert "missing media" in on_editor, found
        assert any("missingMediaCandidates" in r for r in found["readers"]), found["readers"]

    # an editor with neither image nor file: no file for the frontend to check, and the editor says what to do
    # (1.27's combo cannot be empty: it takes the first file of its list, which the editor then shows)
    editor["widgets_values"][0] = ""
    _open(chrome, "fastdrag_without_image", saved)
    [node_id] = _editor_ids(chrome)
    node = f"app.graph.getNodeById({node_id})"
    file = chrome.js(f"{node}.widgets.find(w => w.name === 'image_file').value")
    if file == "":
        chrome.wait_for(f"{node}.dragPointsEditor.imageStatus === 'waiting'", 10)
        assert "Upload an image" in chrome.js(f"{node}.dragPointsEditor.message")
    else:
        assert _version_tuple(expected_frontend_version()) < MISSING_MEDIA_SINCE, file
        assert file in chrome.js(f"{node}.widgets.find(w => w.name === 'image_file').options.values"), file
        chrome.wait_for(f"{node}.dragPointsEditor.imageStatus === 'loaded'", 10)
    if vue_nodes():  # control for the DOM reader: with no IMAGE connected the file combo is drawn and found
        _show_node(chrome, node_id)
        chrome.wait_for(f"({DRAWN_IN_DOM})({node_id}, ['image_file'])?.length > 0", 10)
