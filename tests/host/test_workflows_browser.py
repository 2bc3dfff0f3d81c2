"""Every shipped workflow in the real ComfyUI frontend, as a user opens it from the template browser.

ComfyUI 0.3.64 (``comfy_server``: tiny checkpoint, tiny ControlNet and
upscaler) serves its real frontend (``comfyui-frontend-package`` 1.27.10);
Debian's Chromium drives it headless (``tests/host/browser.py``). Per
workflow in ``workflows/``:

1. The pack's template list (``/workflow_templates``) names it and its
   thumbnail is served; it is loaded the way the template browser loads it
   (``/api/workflow_templates/dragkit/<name>.json`` then
   ``app.loadGraphData``).
2. The frontend reads it as saved: its widget names per node are those of
   :func:`dragrun.workflow_format.widget_layout`, re-serializing the graph
   gives the same ``widgets_values``, and ``app.graphToPrompt()`` gives the
   same API prompt as :func:`dragrun.workflow_format.ui_to_api` (which the
   headless runner and the host tests use).
3. A user picks the image (Load Image), the checkpoint (the tiny stand-in
   for the workflow's placeholder: the tiny SDXL one with its text encoders
   for the SDXL workflows, the tiny inpainting ones for ``warp_inpaint_*``;
   and ControlNet / upscale model, LoRA, FLUX Fill, VAE; the FLUX workflow's
   DualCLIPLoader is replaced by a CLIPLoader of the tiny CLIP-L, as
   ``tools.tiny_inpaint`` explains), clicks handle/target pairs in the Drag Points Editor with
   real mouse events and presses "Mask handles" (the JSON-points workflow:
   types the points and picks the mask). Then no editor warning, no console
   error from the pack, and Queue (``app.queuePrompt``) gives no validation
   error.
4. The FastDrag and warp + inpaint workflows run to the end (the editor →
   FastDrag graph included, SDXL's too; editor → warp → inpaint with one
   sampler step; on a 128×128 copy of ``samples/art_0``); the others (the LoRA of
   DragDiffusion / GoodDrag takes many minutes on a CPU, the round trip 50
   steps) are interrupted once queued. With ``DRAGKIT_BROWSER_QUEUE_ONLY=1``
   every workflow is interrupted once queued: CI's extra runs on the newest
   frontend check loading and queueing there, while the runs to the end are
   the host runs' (the frontend builds the same prompt, step 2).

Skips with a message when ComfyUI (``COMFYUI_PATH``) or Chromium is missing.
Screenshots go to ``test-artifacts/workflows-browser/``.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from PIL import Image

from dragrun.comfy_host import PACK_FOLDER_NAME, repo_root
from dragrun.workflow_format import FRONTEND_ONLY, ui_to_api, widget_layout
from tools.make_workflows import missing_on_host
from tools.tiny_inpaint import TINY_CLIP_TYPE, stand_ins, tiny_checkpoints, tiny_clip_l_path

from .browser import Browser, chromium, comfyui_page
from .browser import editor_mode  # noqa: F401  (the fixture the page takes: one run per frontend mode)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(chromium() is None,
                       reason="no Chromium found (install Debian's: apt-get install chromium; or set DRAGKIT_CHROMIUM)"),
]

WORKFLOWS = sorted((repo_root() / "workflows").glob("*.json"))
SAMPLE = repo_root() / "samples" / "art_0"
ARTIFACTS = repo_root() / "test-artifacts" / "workflows-browser"
EDITOR_CLASS = "DragKitPointsEditor"
SCALE = 4  # the 512x512 sample at 128x128: the tiny UNet on a CPU
RUN_TO_END = {"fastdrag", "fastdrag_refine", "fastdrag_controlnet_upscale", "fastdrag_json_points", "fastdrag_sdxl",
              "warp_inpaint_sd15", "warp_inpaint_sdxl", "warp_inpaint_flux_fill"}
UI_ONLY_NAMES = {"fixed": "control_after_generate", "image": "upload"}


@pytest.fixture(scope="module")
def page(comfy_server, editor_mode):
    """The frontend loaded in headless Chromium, with the pack's nodes registered."""
    pytest.importorskip("websocket", reason="websocket-client is needed to drive Chromium")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with comfyui_page(comfy_server, EDITOR_CLASS) as page:
        yield page


@pytest.fixture(scope="module")
def sample(comfy_server, tmp_path_factory):
    """``samples/art_0`` at 1/4 size, uploaded: (image name, mask name, [(handle, target), ...])."""
    folder = tmp_path_factory.mktemp("sample")
    with Image.open(SAMPLE / "original.jpg") as image:
        small = image.convert("RGB").resize((image.width // SCALE, image.height // SCALE), Image.LANCZOS)
    small.save(folder / "dragkit_art_0.png")
    with Image.open(SAMPLE / "mask.png") as mask:
        mask.convert("L").resize(small.size, Image.NEAREST).save(folder / "dragkit_art_0_mask.png")
    flat = json.loads((SAMPLE / "points.json").read_text())["points"]
    points = [[round(x / SCALE), round(y / SCALE)] for x, y in flat]
    pairs = list(zip(points[0::2], points[1::2]))
    return (comfy_server.upload_image(folder / "dragkit_art_0.png"),
            comfy_server.upload_image(folder / "dragkit_art_0_mask.png"), pairs)


def _history_ids(server) -> set[str]:
    return set(server.get_json("/history"))


def _new_entry(server, before: set[str], timeout: float, interrupt: bool = False) -> dict:
    """The history entry of the one prompt queued since ``before`` was taken, once it finished.

    ``interrupt``: keep interrupting until it finishes (an interrupt that comes
    before the prompt starts executing is reset by the executor).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if interrupt:
            server.interrupt()
        history = server.get_json("/history")
        new = [key for key in history if key not in before]
        if new and history[new[0]].get("status", {}).get("completed") is not None:
            return history[new[0]]
        time.sleep(0.5)
    raise AssertionError(f"no finished prompt after {timeout:.0f} s; server log:\n{server.log_tail()}")


def _set_widget(chrome: Browser, node_type: str, name: str, value) -> None:
    chrome.js(f"""(() => {{
        for (const n of app.graph.nodes.filter(n => n.type === {json.dumps(node_type)})) {{
            const w = n.widgets.find(w => w.name === {json.dumps(name)});
            w.value = {json.dumps(value)};
            w.callback?.(w.value);
        }}
        app.canvas.setDirty(true, true);
        return true;
    }})()""")


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_loads_clean_and_queues_in_the_frontend(workflow, comfy_server, page, sample, tiny_checkpoint,
                                                         tiny_controlnet, tiny_upscaler):
    chrome, name, saved = page, workflow.stem, json.loads(workflow.read_text())
    if missing_on_host(workflow.name, comfy_server.object_info()):
        pytest.skip(missing_on_host(workflow.name, comfy_server.object_info()))

    # -- 1. listed as a template, with a thumbnail, and loaded as the template browser loads it
    templates = comfy_server.get_json("/workflow_templates")
    assert name in templates[PACK_FOLDER_NAME]
    category = comfy_server.get_json("/i18n")["en"]["templateWorkflows"]["category"][PACK_FOLDER_NAME]
    assert category.startswith("DragKit")  # the pack's heading in the template browser (locales/en/main.json)
    thumbnail = comfy_server.get(f"/api/workflow_templates/{PACK_FOLDER_NAME}/{name}.jpg")
    assert thumbnail.status_code == 200 and thumbnail.headers["Content-Type"] == "image/jpeg"
    chrome.js(f"""(async () => {{
        const url = '/api/workflow_templates/{PACK_FOLDER_NAME}/{name}.json';  // what api.apiURL() gives
        await app.loadGraphData(await (await fetch(url)).json(), true, true, {json.dumps(name)});
        return true;
    }})()""")
    assert chrome.js("app.graph.nodes.length") == len(saved["nodes"])
    has_editor = chrome.js(f"app.graph.nodes.some(n => n.type === '{EDITOR_CLASS}')")
    if has_editor:  # a template ships no points: the state is empty, not another widget's value
        assert chrome.js(f"app.graph.nodes.find(n => n.type === '{EDITOR_CLASS}')"
                         ".widgets.find(w => w.name === 'editor_state').value") == ""

    # -- 2. the frontend reads the widgets as saved, and converts it like dragrun.workflow_format
    info = comfy_server.object_info()
    frontend_widgets = chrome.js("Object.fromEntries(app.graph.nodes.map(n => [n.id, (n.widgets ?? [])"
                                 ".filter(w => w.serialize !== false).map(w => w.name)]))")
    reserialized = {n["id"]: n.get("widgets_values", []) for n in chrome.js("app.graph.serialize()")["nodes"]}
    held = _empty_combo_reads_as(chrome) if has_editor else ""
    for node in saved["nodes"]:
        expected = list(node["widgets_values"])
        if node["type"] == EDITOR_CLASS and expected and expected[0] == "":
            expected[0] = held
        assert reserialized[node["id"]] == expected, (node["type"], reserialized[node["id"]])
        if node["type"] in FRONTEND_ONLY:
            continue
        ours = [slot or UI_ONLY_NAMES[value] for slot, value in widget_layout(info[node["type"]])]
        assert frontend_widgets[str(node["id"])][:len(ours)] == ours, node["type"]
    frontend_prompt = chrome.js("(async () => (await app.graphToPrompt()).output)()")
    ours = ui_to_api(saved, info)
    for node in ours.values():
        if node["class_type"] == EDITOR_CLASS and node["inputs"].get("image_file") == "":
            node["inputs"]["image_file"] = held
    assert {k: v["inputs"] for k, v in frontend_prompt.items()} == {k: v["inputs"] for k, v in ours.items()}

    # -- 3. the user picks the image and models, places points, paints the mask
    image_name, mask_name, pairs = sample
    _set_widget(chrome, "LoadImage", "image", image_name)
    named = {n["widgets_values"][0] for n in saved["nodes"] if n["type"] == "CheckpointLoaderSimple"}
    checkpoint = next((build() for placeholder, build in tiny_checkpoints().items() if placeholder in named),
                      tiny_checkpoint)
    _set_widget(chrome, "CheckpointLoaderSimple", "ckpt_name", checkpoint.name)
    for (loader, widget, _), (_, build) in stand_ins().items():
        if loader == "DualCLIPLoader":
            _replace_dual_clip_loader(chrome, build().name)
        else:
            _set_widget(chrome, loader, widget, build().name)
    _set_widget(chrome, "CLIPLoader", "clip_name", tiny_clip_l_path().name)  # Wan's UMT5: no tiny one (tiny_wan)
    _set_widget(chrome, "CLIPLoader", "type", TINY_CLIP_TYPE)
    _remove_nodes(chrome, "CLIPVisionLoader", "CLIPVisionEncode")  # CLIP vision: no tiny one (tools/tiny_wan.py)
    _set_widget(chrome, "KSampler", "steps", 1)
    _set_widget(chrome, "ControlNetLoader", "control_net_name", tiny_controlnet.name)
    _set_widget(chrome, "UpscaleModelLoader", "model_name", tiny_upscaler.name)
    _set_widget(chrome, "LoadImageMask", "image", mask_name)
    _set_widget(chrome, "DragKitPointsFromJSON", "points_json", json.dumps({"points": [p for pair in pairs for p in pair]}))
    if has_editor:
        _place_points(chrome, pairs)
    chrome.screenshot(ARTIFACTS / f"{name}.png")

    # -- 4. queue: no validation error; run to the end, or interrupt the LoRA workflows
    before = _history_ids(comfy_server)
    chrome.js("(async () => { await app.queuePrompt(0); return true; })()")
    errors = chrome.js("app.lastNodeErrors")
    assert not errors, errors
    run_to_end = name in RUN_TO_END and not os.environ.get("DRAGKIT_BROWSER_QUEUE_ONLY")
    entry = _new_entry(comfy_server, before, timeout=600 if run_to_end else 120, interrupt=not run_to_end)
    if run_to_end:
        assert entry["status"]["status_str"] == "success", entry["status"]
        saved_images = [p for p in comfy_server.output_files(entry) if "/output/" in str(p)]
        assert saved_images, entry["outputs"]
        if has_editor:
            editor_id = chrome.js(f"String(app.graph.nodes.find(n => n.type === '{EDITOR_CLASS}').id)")
            summary = entry["outputs"][editor_id]["dragkit_editor"][0]
            assert summary["pairs"] == len(pairs) and summary["mask_pixels"] > 0
    if has_editor:
        assert chrome.js(f"app.graph.nodes.find(n => n.type === '{EDITOR_CLASS}').dragPointsEditor.warning") == ""
    pack_errors = chrome.errors("dragkit") + chrome.errors("drag_points")
    assert not pack_errors, pack_errors


def _empty_combo_reads_as(chrome: Browser) -> str:
    """What the editor's file combo holds after loading a template that saved ``""`` there (its image comes from the
    IMAGE input): ``""`` from frontend 1.49 on; 1.27's combo cannot be empty and reads back its first choice (that
    frontend has no missing-media check; the node reads the connected IMAGE either way)."""
    version = tuple(int(p) for p in chrome.js("window.__COMFYUI_FRONTEND_VERSION__").split(".")[:2])
    if version >= (1, 49):
        return ""
    widget = f"app.graph.nodes.find(n => n.type === '{EDITOR_CLASS}').widgets.find(w => w.name === 'image_file')"
    value, choices = chrome.js(f"[{widget}.value, {widget}.options.values]")
    assert value == (choices[0] if choices else "undefined"), (value, choices)   # 1.27: "undefined" with no choice
    return value


def _replace_dual_clip_loader(chrome: Browser, clip_name: str) -> None:
    """Replace any DualCLIPLoader by a CLIPLoader of ``clip_name`` (type sd3) feeding the same inputs, as a user would."""
    chrome.js(f"""(() => {{
        for (const old of app.graph.nodes.filter(n => n.type === 'DualCLIPLoader')) {{
            const node = LiteGraph.createNode('CLIPLoader');
            node.pos = [...old.pos];
            app.graph.add(node);
            node.widgets.find(w => w.name === 'clip_name').value = {json.dumps(clip_name)};
            node.widgets.find(w => w.name === 'type').value = {json.dumps(TINY_CLIP_TYPE)};
            const links = app.graph.links instanceof Map ? app.graph.links : new Map(Object.entries(app.graph.links));
            for (const id of [...(old.outputs[0].links ?? [])]) {{
                const link = links.get(id) ?? links.get(String(id));
                node.connect(0, app.graph.getNodeById(link.target_id), link.target_slot);
            }}
            app.graph.remove(old);
        }}
        app.canvas.setDirty(true, true);
        return true;
    }})()""")


def _remove_nodes(chrome: Browser, *node_types: str) -> None:
    """Remove every node of these types from the graph (with its links), as a user would."""
    chrome.js(f"""(() => {{
        for (const n of app.graph.nodes.filter(n => {json.dumps(list(node_types))}.includes(n.type))) app.graph.remove(n);
        app.canvas.setDirty(true, true);
        return true;
    }})()""")


def _place_points(chrome: Browser, pairs: list) -> None:
    """Show the editor at scale 1 on screen, click each handle then its target, and press "Mask handles"."""
    editor = f"app.graph.nodes.find(n => n.type === '{EDITOR_CLASS}')"
    chrome.js(f"""(() => {{
        const n = {editor};
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [80 - n.pos[0], 80 - n.pos[1]];
        app.canvas.setDirty(true, true);
        return true;
    }})()""")
    chrome.wait_for(f"{editor}.dragPointsEditor.imageStatus === 'loaded'", 30)
    assert chrome.js(f"{editor}.dragPointsEditor.warning") == ""
    view = f"[...{editor}.dragPointsEditor.views][0]"
    for handle, target in pairs:  # through the one click helper: real mouse events once the canvas stands still
        for x, y in (handle, target):
            chrome.click_at(f"{view}.sourceToClient({x}, {y})", f"{view}.canvas")
    chrome.press(f"{view}.root.querySelector('.dragkit-pe-bar [data-action=mask-handles]')")
    state = json.loads(chrome.js(f"{editor}.widgets.find(w => w.name === 'editor_state').value"))
    assert [[p["handle"], p["target"]] for p in state["pairs"]] == [[list(h), list(t)] for h, t in pairs]
    assert state["pending"] is None and state["mask"]

