"""Convert a ComfyUI UI-format workflow into an API prompt, by the frontend's rules.

The backend never reads the UI ("save") format: the frontend turns the graph
into an API prompt (``graphToPrompt``). This module does the same for
headless runs and tests, using the node definitions of ``/object_info``:

- a node's ``widgets_values`` are positional over its widget inputs, in the
  order of ``input.required`` then ``input.optional``; an input that is a
  widget type (a combo list, INT, FLOAT, STRING, BOOLEAN) takes a slot even
  when a link feeds it (a converted widget), and a link then wins;
- a widget with ``control_after_generate`` (seeds) is followed by one extra
  value ("fixed", "randomize", ...), and a combo with ``image_upload`` by the
  upload button's value; neither reaches the prompt;
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
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _widget_slots(node_def: dict) -> list[tuple[str, int]]:
    """``(input name, extra values after it)`` for each widget input, in widgets_values order."""
    slots = []
    for section in ("required", "optional"):
        for name, spec in node_def.get("input", {}).get(section, {}).items():
            if not _is_widget(spec):
                continue
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            extra = 1 if options.get("control_after_generate") or options.get("image_upload") else 0
            slots.append((name, extra))
    return slots


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
            position = 0
            for name, extra in _widget_slots(object_info[kind]):
                if position < len(values):
                    value = values[position]
                    inputs[name] = {"__value__": value} if isinstance(value, list) else value
                position += 1 + extra
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                inputs[socket["name"]] = source_of(socket["link"])
        prompt[node_id] = {"class_type": kind, "inputs": inputs, "_meta": {"title": node.get("title", kind)}}
    return prompt
