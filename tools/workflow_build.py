"""Build UI-format workflow JSON (what the frontend saves and loads) from a short graph description.

The shipped workflows in ``workflows/`` are generated with this builder from
``tools/make_workflows.py``, so sockets, widget order and link tables always
match the node definitions of ``/object_info``. The result loads in the
ComfyUI frontend and converts back to an API prompt with
:func:`dragrun.workflow_format.ui_to_api`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dragrun.workflow_format import ordered_inputs, widget_layout, widget_names

NODE_WIDTH = 320
COLUMN = 380


@dataclass(frozen=True)
class Out:
    """An output socket: node id and slot."""

    node: int
    slot: int


class WorkflowBuilder:
    """Collects nodes and links; :meth:`to_json` gives the UI-format dict (version 0.4)."""

    def __init__(self, object_info: dict[str, Any]) -> None:
        self.info = object_info
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.row_shift = 0
        """Pixels every later node moves down (below a :meth:`lead_note`)."""

    def add(
        self,
        kind: str,
        column: int,
        row: int,
        widgets: dict[str, Any] | None = None,
        inputs: dict[str, Out] | None = None,
        title: str | None = None,
        height: int = 120,
    ) -> int:
        """Add a node of ``kind`` at grid cell (column, row); return its id.

        ``widgets`` sets widget values by input name (others keep their
        defaults); ``inputs`` links sockets to other nodes' outputs.
        """
        definition = self.info[kind]
        widgets = dict(widgets or {})
        inputs = dict(inputs or {})
        node_id = len(self.nodes) + 1
        values = []
        for name, ui_value in widget_layout(definition):
            if name is None:
                values.append(ui_value)
                continue
            spec = definition["input"].get("required", {}).get(name) or definition["input"]["optional"][name]
            values.append(widgets.pop(name) if name in widgets else _default(spec))
        if widgets:
            raise KeyError(f"{kind} has no widgets {sorted(widgets)}")
        sockets = []
        widget_inputs = widget_names(definition)
        for name, spec in ordered_inputs(definition):
            if name in inputs or name not in widget_inputs:
                socket = {"name": name, "type": _type_name(spec[0]), "link": None}
                if name in inputs:
                    source = inputs.pop(name)
                    link_id = len(self.links) + 1
                    self.links.append([link_id, source.node, source.slot, node_id, len(sockets), socket["type"]])
                    self._node(source.node)["outputs"][source.slot]["links"].append(link_id)
                    socket["link"] = link_id
                    if name in widget_inputs:  # a widget fed by a link: the frontend keeps its widget behind it
                        socket["widget"] = {"name": name}
                sockets.append(socket)
        if inputs:
            raise KeyError(f"{kind} has no inputs {sorted(inputs)}")
        outputs = [
            {"name": name, "type": kind_, "links": [], "slot_index": i}
            for i, (name, kind_) in enumerate(zip(definition["output_name"], definition["output"]))
        ]
        self.nodes.append(
            {
                "id": node_id,
                "type": kind,
                "pos": [40 + column * COLUMN, 40 + row * 160 + self.row_shift],
                "size": [NODE_WIDTH, height],
                "flags": {},
                "order": node_id - 1,
                "mode": 0,
                "inputs": sockets,
                "outputs": outputs,
                "properties": {"Node name for S&R": kind},
                "widgets_values": values,
                **({"title": title} if title else {}),
            }
        )
        return node_id

    def note(self, text: str, column: int, row: int, width: int = 420, height: int = 240) -> int:
        """Add a Note node (frontend-only; never sent to the backend)."""
        node_id = len(self.nodes) + 1
        self.nodes.append(
            {
                "id": node_id,
                "type": "Note",
                "pos": [40 + column * COLUMN, 40 + row * 160 + self.row_shift],
                "size": [width, height],
                "flags": {},
                "order": node_id - 1,
                "mode": 0,
                "inputs": [],
                "outputs": [],
                "properties": {},
                "widgets_values": [text],
                "color": "#432",
                "bgcolor": "#653",
            }
        )
        return node_id

    def lead_note(self, text: str, width: int = 800, height: int = 420) -> int:
        """Add the workflow's main Note at the top left, where the view opens, and move every node below it."""
        shift = height + 80
        for node in self.nodes:
            node["pos"][1] += shift
        self.row_shift += shift
        node_id = self.note(text, 0, 0, width=width, height=height)
        self._node(node_id)["pos"] = [40, 40]
        return node_id

    def _node(self, node_id: int) -> dict:
        return self.nodes[node_id - 1]

    def to_json(self) -> dict[str, Any]:
        """The UI-format workflow; output nodes nothing reads from are written without outputs (:func:`sink_outputs`)."""
        for node in self.nodes:
            node["outputs"] = sink_outputs(self.info.get(node["type"], {}), node["outputs"])
        return {
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
            "version": 0.4,
        }


def sink_outputs(definition: dict, outputs: list[dict]) -> list[dict]:
    """A node's ``outputs`` as written: none for an output node (``output_node``) whose outputs nothing links to.

    ComfyUI 0.33.0 gave SaveImage and PreviewImage a pass-through IMAGE output
    that 0.3.64 lacks. A sink written without outputs is what a workflow saved
    on 0.3.64 holds, and it loads on both hosts (the frontend keeps a saved
    node's outputs), so the file is the same whichever host's ``/object_info``
    made it; an output node whose output the workflow links keeps them all.
    """
    if definition.get("output_node") and not any(output["links"] for output in outputs):
        return []
    return outputs


def _type_name(kind: Any) -> str:
    return "COMBO" if isinstance(kind, list) else kind


def _default(spec: list) -> Any:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in options:
        return options["default"]
    if isinstance(kind, list):
        return kind[0] if kind else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind)
