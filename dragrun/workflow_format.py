"""Convert a ComfyUI UI-format workflow into an API prompt, by the frontend's rules.

The backend never reads the UI ("save") format: the frontend turns the graph
into an API prompt (``graphToPrompt``). This module does the same for
headless runs and tests, using the node definitions of ``/object_info``:

- a node's ``widgets_values`` are positional over its widgets in the
  frontend's order (:func:`widget_layout`): the ``input_order`` of
  ``/object_info`` (required, then optional), then the upload button that
  the frontend's ``Comfy.UploadImage`` extension appends to a node with an
  ``image_upload`` combo (so it comes after every other widget, optional
  ones included); an input that is a widget type (a combo list, INT, FLOAT,
  STRING, BOOLEAN) takes a slot even when a link feeds it (a converted
  widget), and a link then wins;
- an INT or combo with ``control_after_generate`` (by default INTs named
  ``seed`` / ``noise_seed``) is followed by its control value ("fixed",
  "randomize", ...); neither that nor the upload button's value reaches the
  prompt;
- frontend-only nodes (Note, MarkdownNote) are dropped, Reroute nodes are
  followed to their source, muted nodes (mode 2) are dropped, and bypassed
  nodes (mode 4) pass their first input of a matching type through;
- a widget value that is a list is sent as ``{"__value__": [...]}`` (a bare
  two-element list would be read as a link).
"""

from __future__ import annotations

from typing import Any

FRONTEND_ONLY = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MODE_MUTED = 2
MODE_BYPASS = 4


class WorkflowError(ValueError):
    """The workflow cannot be converted (unknown node type, broken link, ...)."""


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    if _options(spec).get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _options(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def ordered_inputs(node_def: dict) -> list[tuple[str, list]]:
    """``(name, spec)`` of every required and optional input in the frontend's order.

    Mirrors ``getOrderedInputSpecs`` of comfyui-frontend-package 1.27.10:
    ``input_order.required``, then ``input_order.optional``, then anything
    not listed (in definition order); without ``input_order``, definition order.
    """
    sections = node_def.get("input", {})
    specs = {name: spec for section in ("required", "optional") for name, spec in sections.get(section, {}).items()}
    order = node_def.get("input_order") or {}
    names = [n for section in ("required", "optional") for n in order.get(section, []) if n in sections.get(section, {})]
    names += [n for n in specs if n not in names]
    return [(name, specs[name]) for name in names]


def widget_layout(node_def: dict) -> list[tuple[str | None, Any]]:
    """The node's ``widgets_values`` slots as the frontend saves them, in order.

    Each slot is ``(input name, None)`` for a widget input, or ``(None,
    value)`` for a UI-only value with what a new node saves there (a control
    widget: ``"fixed"``; the upload button: ``"image"``). See the module
    docstring for the rules.
    """
    slots: list[tuple[str | None, Any]] = []
    required = node_def.get("input", {}).get("required", {})
    upload = pending = False  # Comfy.UploadImage: one button, for the first required upload combo
    for name, spec in ordered_inputs(node_def):
        if not _is_widget(spec):
            continue
        if pending and name not in required and not node_def.get("input_order"):
            slots.append((None, "image"))  # without input_order the button follows the required widgets
            pending = False
        slots.append((name, None))
        options = _options(spec)
        is_combo = isinstance(spec[0], list) or spec[0] == "COMBO"
        control = options.get("control_after_generate")
        if control is None:
            control = spec[0] == "INT" and name in ("seed", "noise_seed")
        if control and (spec[0] == "INT" or is_combo):
            slots.append((None, "fixed"))
        uploads = any(options.get(k) for k in ("image_upload", "video_upload", "animated_image_upload"))
        if is_combo and uploads and name in required and not upload:
            upload = pending = True
    if pending:
        slots.append((None, "image"))
    return slots


def widget_names(node_def: dict) -> list[str]:
    """Names of the node's widget inputs (the inputs that have a ``widgets_values`` slot)."""
    return [name for name, _ in widget_layout(node_def) if name is not None]


def ui_to_api(workflow: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """The API prompt (``{node id: {"class_type", "inputs", "_meta"}}``) of a UI-format workflow."""
    nodes = {str(node["id"]): node for node in workflow.get("nodes", [])}
    links = {link[0]: link for link in workflow.get("links", [])}

    def source_of(link_id: int) -> list:
        """Follow Reroutes and bypassed nodes back to a real ``[node id, slot]``."""
        seen = set()
        while True:
            if link_id not in links or link_id in seen:
                raise WorkflowError(f"link {link_id} is missing or loops")
            seen.add(link_id)
            _, origin, slot, _, _, link_type = links[link_id]
            node = nodes.get(str(origin))
            if node is None:
                raise WorkflowError(f"link {link_id} starts at missing node {origin}")
            if node["type"] == "Reroute" or node.get("mode") == MODE_BYPASS:
                inputs = [i for i in node.get("inputs", []) if i.get("link") is not None]
                match = [i for i in inputs if i.get("type") in (link_type, "*")] or inputs
                if not match:
                    raise WorkflowError(f"{node['type']} node {origin} has no input to pass through")
                link_id = match[0]["link"]
                continue
            return [str(origin), slot]

    prompt = {}
    for node_id, node in nodes.items():
        kind = node["type"]
        if kind in FRONTEND_ONLY or kind == "Reroute" or node.get("mode") in (MODE_MUTED, MODE_BYPASS):
            continue
        if kind not in object_info:
            raise WorkflowError(f"node {node_id} is of type {kind!r}, which this ComfyUI does not have")
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values") or []
        if isinstance(values, dict):
            inputs.update(values)
        else:
            for (name, _), value in zip(widget_layout(object_info[kind]), values):
                if name is not None:
                    inputs[name] = {"__value__": value} if isinstance(value, list) else value
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                inputs[socket["name"]] = source_of(socket["link"])
        prompt[node_id] = {"class_type": kind, "inputs": inputs, "_meta": {"title": node.get("title", kind)}}
    return prompt
