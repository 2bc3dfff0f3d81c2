"""The pack loads in a real ComfyUI and presents itself properly to the frontend.

Runs against a headless ComfyUI server (``comfy_server``) with the pack in
``custom_nodes/dragkit``, and against ComfyUI in-process (``comfy_inproc``).
Every test here is marked ``host`` (by conftest) and skips without COMFYUI_PATH.
"""

from __future__ import annotations

import json

import pytest

from dragrun.comfy_host import PACK_FOLDER_NAME

PACK_MODULE = f"custom_nodes.{PACK_FOLDER_NAME}"
PACK_CATEGORY = "DragKit"


def _pack_infos(object_info: dict) -> dict:
    return {k: v for k, v in object_info.items() if v.get("python_module") == PACK_MODULE}


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.object_info()


@pytest.fixture(scope="module")
def pack_infos(object_info) -> dict:
    infos = _pack_infos(object_info)
    assert infos, f"/object_info has no node from {PACK_MODULE}"
    return infos


def test_server_log_has_no_import_failure(comfy_server):
    log = comfy_server.log_text()
    pack_dir = str(comfy_server.base / "custom_nodes" / PACK_FOLDER_NAME)
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and PACK_FOLDER_NAME in line]
    assert not failed, f"{failed}\n--- server log ---\n{log}"
    assert f"Cannot import {pack_dir}" not in log, log
    loaded = [line for line in log.splitlines() if line.rstrip().endswith(pack_dir) and "seconds" in line]
    assert loaded, f"the pack's import time line is missing (was it found?)\n{log}"
    info_errors = [line for line in log.splitlines() if "An error occurred while retrieving information" in line]
    assert not info_errors, "\n".join(info_errors)


def test_pack_loads_in_process(comfy_inproc):
    ids = comfy_inproc.node_ids
    assert ids, "the pack's NODE_CLASS_MAPPINGS is empty"
    mappings = comfy_inproc.pack.NODE_CLASS_MAPPINGS
    for node_id in ids:
        # a pack cannot override a built-in id: ComfyUI would silently keep the built-in
        assert comfy_inproc.nodes.NODE_CLASS_MAPPINGS.get(node_id) is mappings[node_id], node_id
        cls = mappings[node_id]
        assert isinstance(cls.INPUT_TYPES(), dict), node_id
        assert callable(getattr(cls, cls.FUNCTION)), node_id
        assert isinstance(cls.RETURN_TYPES, tuple), node_id
    display = getattr(comfy_inproc.pack, "NODE_DISPLAY_NAME_MAPPINGS", {}) or {}
    assert set(display) <= set(ids)


def test_object_info_lists_every_node(pack_infos, comfy_inproc):
    assert set(pack_infos) == set(comfy_inproc.node_ids)
    wrong_category = {k: v.get("category") for k, v in pack_infos.items()
                      if str(v.get("category", "")).split("/")[0] != PACK_CATEGORY}
    assert not wrong_category, f"nodes outside the {PACK_CATEGORY!r} menu category: {wrong_category}"


def _tooltip_problems(node_id: str, info: dict) -> list[str]:
    problems = []
    if not str(info.get("description") or "").strip():
        problems.append(f"{node_id}: no description (DESCRIPTION)")
    inputs = info.get("input") or {}
    for section in ("required", "optional"):
        for name, spec in (inputs.get(section) or {}).items():
            options = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 else {}
            tooltip = options.get("tooltip") if isinstance(options, dict) else None
            if not (isinstance(tooltip, str) and tooltip.strip()):
                problems.append(f"{node_id}: {section} input {name!r} has no tooltip")
    outputs = list(info.get("output") or [])
    names = list(info.get("output_name") or outputs)
    tooltips = list(info.get("output_tooltips") or [])
    if outputs and len(tooltips) != len(outputs):
        problems.append(f"{node_id}: {len(outputs)} outputs but {len(tooltips)} output_tooltips (OUTPUT_TOOLTIPS)")
    for i, out in enumerate(outputs):
        tip = tooltips[i] if i < len(tooltips) else None
        if not (isinstance(tip, str) and tip.strip()):
            label = names[i] if i < len(names) else out
            problems.append(f"{node_id}: output {i} ({label}) has no tooltip")
    return problems


def test_every_input_and_output_has_a_tooltip(pack_infos):
    problems = [p for node_id, info in sorted(pack_infos.items()) for p in _tooltip_problems(node_id, info)]
    assert not problems, "\n".join(problems)


def test_js_extensions_are_served(comfy_server, repo_root, comfy_inproc):
    web_dir = getattr(comfy_inproc.pack, "WEB_DIRECTORY", None)
    assert web_dir == "./js", f"the pack's WEB_DIRECTORY is {web_dir!r}: the Drag Points Editor would not load"
    js_root = (repo_root / web_dir).resolve()
    js_files = sorted(p.relative_to(js_root).as_posix() for p in js_root.rglob("*.js"))
    assert "drag_points_editor.js" in js_files, f"{js_root} lacks the editor's extension: {js_files}"
    listed = comfy_server.get_json("/extensions")
    expected = [f"/extensions/{PACK_FOLDER_NAME}/{f}" for f in js_files]
    missing = [e for e in expected if e not in listed]
    assert not missing, f"GET /extensions lacks {missing}"
    for url in expected:
        r = comfy_server.get(url)
        assert r.status_code == 200, (url, r.status_code)


def test_workflow_templates_are_listed(comfy_server, repo_root):
    workflows = sorted(p for p in (repo_root / "workflows").glob("*.json"))
    assert "fastdrag" in [p.stem for p in workflows], "workflows/ lacks the README's main workflow"
    listed = comfy_server.get_json("/workflow_templates").get(PACK_FOLDER_NAME, [])
    assert sorted(listed) == sorted(p.stem for p in workflows)
    for path in workflows:
        r = comfy_server.get(f"/api/workflow_templates/{PACK_FOLDER_NAME}/{path.name}")
        assert r.status_code == 200, (path.name, r.status_code)
        assert json.loads(r.text) == json.loads(path.read_text())


def _drag_prompt(checkpoint: str) -> dict:
    """An API prompt that runs every override the pack installs: DDIM Invert and KV-Injected Sample (attn1 replace
    patches, the UNet function wrapper, the KSAMPLER function) and Motion-Supervision Optimize (the output-block patch,
    autograd on the model), on the tiny checkpoint at 64x64."""
    points = json.dumps({"width": 64, "height": 64, "points": [[16, 24], [40, 24]]})
    motion = {"mode": "dragdiffusion", "iterations": 2, "lr": -1.0, "lam": -1.0, "r1": -1, "r2": -1, "drag_steps": 2,
              "drags_per_step": 2, "grad_steps": 1, "beta": 4.0, "max_unchanged": 0}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "DragKitDDIMInvert", "inputs": {"model": ["1", 0], "latent": ["3", 0], "positive": ["2", 0],
                                                            "steps": 10, "strength": 0.7, "cache_layers": "decoder",
                                                            "cache_device": "auto"}},
        "5": {"class_type": "DragKitPointsFromJSON", "inputs": {"points_json": points}},
        "6": {"class_type": "DragKitMotionSupervisionOptimize",
              "inputs": {"model": ["1", 0], "latent": ["4", 0], "attn_cache": ["4", 1], "positive": ["2", 0],
                         "points": ["5", 0], **motion}},
        "7": {"class_type": "DragKitKVInjectedSample",
              "inputs": {"model": ["1", 0], "latent": ["6", 0], "attn_cache": ["4", 1], "positive": ["2", 0],
                         "kv_source": "reference branch", "inject_layers": "masactrl", "inject_start": 0.0,
                         "inject_end": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }


def test_the_server_shows_every_warning(comfy_server):
    """The shared server runs with ``PYTHONWARNINGS=always`` (conftest): Python's default filters would hide a
    DeprecationWarning raised outside ``__main__`` and print a repeated warning once, so a warning from the pack
    could pass the check below unseen."""
    assert (comfy_server.env or {}).get("PYTHONWARNINGS") == "always"


def test_running_the_pack_logs_no_deprecation_or_warning_of_its_own(comfy_server, tiny_checkpoint):
    """Issue 21 item 3: the host (0.3.64 or 0.33.0) logs nothing deprecated about what the pack calls or installs
    while a drag runs, and no Python warning in the server's whole log (the pack's import, every test's prompts so
    far and this drag) comes from the pack's files."""
    before = len(comfy_server.log_text().splitlines())
    comfy_server.run(_drag_prompt(tiny_checkpoint.name), timeout=600)
    log = comfy_server.log_text().splitlines()
    new = log[before:]
    deprecated = [line for line in new if "deprecat" in line.lower()]
    ours = [line for line in log if "Warning" in line and f"custom_nodes/{PACK_FOLDER_NAME}/" in line]
    assert not deprecated and not ours, "\n".join(deprecated + ours + ["--- log of the run ---", *new])
