// DragKit: the "Drag Points Editor" widget (node DragKitPointsEditor), layer 3 of 3: the glue to
// ComfyUI's frontend. Everything that depends on the frontend's API lives here and nowhere else.
//
// Click on the image to set a handle (red), click again for its target (blue); drag points to
// adjust them; right-click a point (or select it and press Delete) to remove its pair. Brush and
// eraser paint the editable mask. Points and mask live in the node's hidden "editor_state" STRING
// widget as compact JSON (format: dragkit/editor_state.py), so they are saved in the workflow,
// sent in the API prompt, and restored on reload, paste and undo; the Live flag is the node
// property "dragkit_live". After a run the editor shows the image decoded downstream of it.
//
// Layers (docs/editor.md): editor_model.js (state, no DOM) <- editor.js (one node's editor:
// history, image, result, live preview) <- editor_view.js (toolbar + <canvas>) <- this module.
//
// Frontends: tested with ComfyUI frontend 1.27, 1.49, 1.52 and 1.58, in the classic LiteGraph canvas and
// in Nodes 2.0 (Vue nodes; there onDrawForeground/onDrawBackground and onMouseDown of a node do not
// run). So the editor is one DOM widget (addDOMWidget with the view's element, which both
// renderers mount), the image source is polled by a timer instead of a canvas draw callback, and
// the differences are handled here by what the frontend has, not by its version number:
// - a combo with no choices has the value undefined in 1.58, which its prompt drops (the node
//   then fails validation): the file widget is given "" instead;
// - Nodes 2.0 draws an output preview of image_upload nodes: node.hideOutputImages turns it off
//   (the classic canvas draws it in onDrawBackground, replaced by a no-op);
// - 1.49+ mark an upload combo whose value is not among its files as missing media: while an IMAGE is
//   connected the file combo holds "" (they skip empty values), the user's file is given back after;
// - Nodes 2.0 on 1.52 draws a widget unless options.hidden: hidden widgets set it with `hidden`.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { DragPointsEditor, MASK_INPUT } from "./editor.js";
import { EditorView } from "./editor_view.js";

const NODE_CLASS = "DragKitPointsEditor";
const STATE_WIDGET = "editor_state";
const FILE_WIDGET = "image_file";
const IMAGE_INPUT = "image";
const FILE_WIDGETS = [FILE_WIDGET, "upload"]; // hidden while an IMAGE is connected
const RESULT_KEY = "dragkit_result"; // ui key of VAE Decode (DragKit): its decoded image
const LIVE_PROPERTY = "dragkit_live"; // node property: re-run the graph after each edit
const UI_KEY = "dragkit_editor";
const IMAGE_EVENT = "dragkit.editor.image";
const WARP_CLASS = "DragKitPixelWarp"; // "Drag Warp (pixels)": the editor previews its result
const REFRESH_MS = 250; // how often an editor checks where its image comes from
const INPUT = 1; // LiteGraph.INPUT: onConnectionsChange for an input slot

// ---------------------------------------------------------------------------------------------
// Files and URLs

/** A combo value "sub/name.png [output]" as {filename, subfolder, type}. */
function parseFileValue(value) {
  let name = String(value || "").trim();
  let type = "input";
  const m = name.match(/^(.*?)\s*\[(input|output|temp)\]$/);
  if (m) {
    name = m[1];
    type = m[2];
  }
  const slash = name.lastIndexOf("/");
  return { filename: name.slice(slash + 1), subfolder: slash >= 0 ? name.slice(0, slash) : "", type };
}

function viewUrl({ filename, subfolder, type }) {
  const params = new URLSearchParams({ filename, subfolder: subfolder || "", type: type || "input" });
  return api.apiURL(`/view?${params}`);
}

// ---------------------------------------------------------------------------------------------
// The host: what one node's editor asks of the frontend (the interface editor.js uses).

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function inputSlot(node, name) {
  return node.findInputSlot?.(name) ?? -1;
}

function linked(node, name) {
  const slot = inputSlot(node, name);
  return slot >= 0 && node.inputs[slot].link != null;
}

function makeHost(node) {
  return {
    viewUrl,
    readState: () => widget(node, STATE_WIDGET)?.value ?? "",
    writeState(text) {
      const w = widget(node, STATE_WIDGET);
      if (w) w.value = text;
      node.setDirtyCanvas?.(true, true);
    },
    linked: (name) => linked(node, name),
    /** {linked, upstreamFile, file}: the IMAGE input's state, a Load Image-like file upstream, the own file. */
    imageSource() {
      if (linked(node, IMAGE_INPUT)) {
        const upstream = node.getInputNode?.(inputSlot(node, IMAGE_INPUT));
        const fileWidget = upstream?.widgets?.find((w) => w.name === "image" && typeof w.value === "string");
        return { linked: true, upstreamFile: fileWidget?.value ? parseFileValue(fileWidget.value) : null, file: null };
      }
      const file = widget(node, FILE_WIDGET)?.value;
      return { linked: false, upstreamFile: null, file: file ? parseFileValue(file) : null };
    },
    getLive: () => node.properties?.[LIVE_PROPERTY] === true,
    setLive(on) {
      node.properties = node.properties || {};
      node.properties[LIVE_PROPERTY] = on;
    },
    requestLiveRun: (editor) => liveRunner.request(editor),
    cancelLiveRun: (editor) => liveRunner.cancel(editor),
    /** Keep the graph's own key handling (undo, delete) off while a modal editor is open; returns the release. */
    holdGraphKeys() {
      const appClass = app.constructor;
      const previous = appClass.maskeditor_is_opended;
      appClass.maskeditor_is_opended = () => true;
      return () => {
        appClass.maskeditor_is_opended = previous;
      };
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Live re-edit: one queue at a time for the whole page. An edit while a run is pending (ours or
// anyone's: ComfyUI's queue is not empty) waits, and all such edits are queued once when it empties.

const liveRunner = {
  queueRemaining: 0,
  waiting: new Set(), // editors with an edit not yet queued

  request(editor) {
    this.waiting.add(editor);
    if (this.queueRemaining > 0) {
      editor.liveDeferred++;
      editor.message = "live: queued after the current run";
      editor.redraw();
      return;
    }
    this.run();
  },

  cancel(editor) {
    this.waiting.delete(editor);
  },

  async run() {
    const editors = [...this.waiting];
    this.waiting.clear();
    if (!editors.length) return;
    this.queueRemaining = Math.max(this.queueRemaining, 1); // until the server's status says otherwise
    for (const editor of editors) {
      editor.liveRuns++;
      editor.message = "live: running";
      editor.redraw();
    }
    try {
      await app.queuePrompt(0, 1);
    } catch (err) {
      console.warn("DragKit live re-edit: queueing failed", err);
    }
    // a prompt refused by validation never reaches the queue (no status message follows): ask the server
    try {
      const response = await api.fetchApi("/prompt");
      if (response.ok) this.onStatus(await response.json());
    } catch (err) {
      this.queueRemaining = 0;
    }
  },

  onStatus(status) {
    const remaining = status?.exec_info?.queue_remaining;
    if (typeof remaining !== "number") return;
    this.queueRemaining = remaining;
    if (remaining === 0 && this.waiting.size) this.run();
  },
};

// ---------------------------------------------------------------------------------------------
// Execution messages

function graphLink(graph, linkId) {
  return graph.links?.get?.(linkId) ?? graph.links?.[linkId] ?? graph.getLink?.(linkId);
}

/** Ids of the nodes fed, directly or not, by `node`'s outputs. */
function downstreamIds(node) {
  const graph = node.graph;
  const seen = new Set();
  const stack = [node];
  while (stack.length) {
    const current = stack.pop();
    for (const output of current.outputs ?? []) {
      for (const linkId of output.links ?? []) {
        const link = graphLink(graph, linkId);
        const target = link && graph.getNodeById(link.target_id);
        if (target && !seen.has(target.id)) {
          seen.add(target.id);
          stack.push(target);
        }
      }
    }
  }
  return seen;
}

function editorNodes() {
  const graph = app.graph;
  return (graph?.nodes ?? graph?._nodes ?? []).filter((n) => n.type === NODE_CLASS && n.dragPointsEditor);
}

/** The first pixel-warp node fed (directly or not) by the editor `node`: {id, title, band, neighbours}, or null. */
function warpNodeInfo(node) {
  for (const id of downstreamIds(node)) {
    const n = node.graph.getNodeById(id);
    if (n?.type !== WARP_CLASS) continue;
    const band = Number(widget(n, "band")?.value);
    return { id: n.id, title: n.title || n.type, band: Number.isFinite(band) ? band : undefined,
             neighbours: widget(n, "neighbours")?.value ?? null };
  }
  return null;
}

/** An `executed` message: a decoded result goes to every editor upstream of the node that made it. */
function onExecuted(detail) {
  const ref = detail?.output?.[RESULT_KEY]?.[0];
  const graph = app.graph;
  if (!ref || !graph) return;
  const from = graph.getNodeById?.(detail.display_node ?? detail.node) ?? graph.getNodeById?.(detail.node);
  if (!from) return;
  for (const node of editorNodes()) {
    if (downstreamIds(node).has(from.id)) {
      node.dragPointsEditor.setResult(ref, { id: from.id, title: from.title || from.type });
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The node

/**
 * Hide or show a widget in every renderer: `hidden` is what the classic canvas reads, `options.hidden` what
 * Nodes 2.0 reads (frontend 1.52 draws a widget without it, as the frontend's own extensions set both);
 * the classic layout gives every widget its computeSize height, hidden or not: none while hidden.
 * Returns whether anything changed.
 */
function setWidgetHidden(w, hide) {
  w.options = w.options ?? {};
  if (!!w.hidden === hide && !!w.options.hidden === hide) return false;
  w.hidden = hide;
  w.options.hidden = hide;
  if (hide) {
    if (!("dragkitComputeSize" in w)) {
      w.dragkitComputeSize = Object.prototype.hasOwnProperty.call(w, "computeSize") ? w.computeSize : null;
    }
    w.computeSize = () => [0, -4];
  } else if (w.dragkitComputeSize) {
    w.computeSize = w.dragkitComputeSize;
  } else {
    delete w.computeSize;
  }
  return true;
}

/**
 * While an IMAGE is connected the file is not used, and the combo holds "": the frontends' missing-media
 * check (1.49+) reads an upload combo's non-empty value that is not among its files as a missing file, and
 * skips an empty one. The file comes back when the IMAGE is disconnected. A combo that cannot be empty
 * (1.27 gives its first choice instead; it has no missing-media check) keeps its file. Returns whether
 * anything changed.
 */
function holdFileValue(node, hide) {
  const w = widget(node, FILE_WIDGET);
  if (!w) return false;
  if (hide && w.value) {
    const file = w.value;
    w.value = "";
    if (w.value !== "") {
      w.value = file;
      return false;
    }
    w.dragkitHeldFile = file;
    return true;
  }
  if (!hide && !w.value && w.dragkitHeldFile) {
    w.value = w.dragkitHeldFile;
    delete w.dragkitHeldFile;
    return true;
  }
  return false;
}

/** Show or hide the upload combo and button: an IMAGE input, when connected, wins over them. */
function updateFileWidgets(node) {
  const hide = linked(node, IMAGE_INPUT);
  let changed = holdFileValue(node, hide);
  for (const w of node.widgets ?? []) {
    if (FILE_WIDGETS.includes(w.name)) changed = setWidgetHidden(w, hide) || changed;
  }
  if (changed) node.setDirtyCanvas?.(true, true);
}

/** A file combo with no choices holds undefined on some frontends, and the prompt would drop it. */
function keepFileValue(node) {
  const w = widget(node, FILE_WIDGET);
  if (w && typeof w.value !== "string") w.value = "";
}

/**
 * Nodes 2.0 keeps a node's component when a workflow is reloaded with the same node id (graph undo),
 * and that component mounts a DOM widget's element only once: it goes on showing the previous node's
 * editor. Put this node's element in its place.
 */
function adoptMountedElement(node, element) {
  if (!window.LiteGraph?.vueNodesMode) return;
  const shown = document.querySelector(`[data-node-id="${node.id}"] .${element.className}`);
  if (shown && shown !== element) shown.replaceWith(element);
}

/**
 * Poll the image source while the node is in a graph (no canvas draw callback runs in Nodes 2.0), and
 * only while its editor is on screen: a frontend may build nodes it never shows (1.58 configures a
 * loaded workflow more than once), and their widgets share the shown node's saved values.
 */
function startRefresh(node, editor, element) {
  const timer = setInterval(() => {
    if (node.graph?.getNodeById?.(node.id) !== node) {
      clearInterval(timer);
      return;
    }
    if (!element.isConnected) adoptMountedElement(node, element);
    if (!element.isConnected || !element.getClientRects().length) return;
    keepFileValue(node);
    updateFileWidgets(node);
    editor.setWarpNode(warpNodeInfo(node));
    editor.refreshSource();
  }, REFRESH_MS);
  return () => clearInterval(timer);
}

function setUpNode(node) {
  const editor = new DragPointsEditor(makeHost(node));
  node.dragPointsEditor = editor; // for scripts and tests
  const stateWidget = widget(node, STATE_WIDGET);
  if (stateWidget) setWidgetHidden(stateWidget, true); // kept in sync by the editor
  const fileWidget = widget(node, FILE_WIDGET);
  if (fileWidget) {
    const callback = fileWidget.callback;
    fileWidget.callback = function () {
      const result = callback?.apply(this, arguments);
      editor.refreshSource();
      return result;
    };
  }
  node.hideOutputImages = true;
  const view = new EditorView(editor);
  const domWidget = node.addDOMWidget("drag_points_editor", "dragkit_points_editor", view.root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => 200,
  });
  domWidget.serialize = false;
  const [w, h] = node.size;
  node.setSize([Math.max(w, 380), Math.max(h, 480)]);
  keepFileValue(node);
  editor.loadFromWidget();
  updateFileWidgets(node);
  editor.stopRefresh = startRefresh(node, editor, view.root);
  return editor;
}

app.registerExtension({
  name: "DragKit.DragPointsEditor",

  setup() {
    api.addEventListener(IMAGE_EVENT, ({ detail }) => {
      const editor = app.graph?.getNodeById?.(detail?.node)?.dragPointsEditor;
      if (!editor) return;
      if (detail.image) editor.setExecutedImage(detail.image);
      editor.setInputMask(detail.input_mask ?? null);
    });
    api.addEventListener("executed", ({ detail }) => onExecuted(detail));
    api.addEventListener("status", ({ detail }) => liveRunner.onStatus(detail));
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_CLASS) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      setUpNode(this);
      return result;
    };

    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      if (this.dragPointsEditor) {
        keepFileValue(this);
        this.dragPointsEditor.loadFromWidget();
        updateFileWidgets(this);
        this.dragPointsEditor.refreshSource();
      }
      return result;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      const result = onExecuted?.apply(this, arguments);
      const summary = output?.[UI_KEY]?.[0];
      const editor = this.dragPointsEditor;
      if (editor && summary) {
        if (summary.image) editor.setExecutedImage(summary.image);
        editor.setInputMask(summary.input_mask ?? null);
        editor.message = `last run: ${summary.pairs} pair${summary.pairs === 1 ? "" : "s"}, mask ${summary.mask_pixels} px`;
        editor.redraw();
      }
      return result;
    };

    const onConnectionsChange = nodeType.prototype.onConnectionsChange;
    nodeType.prototype.onConnectionsChange = function (type, index, connected, link, slot) {
      const result = onConnectionsChange?.apply(this, arguments);
      const editor = this.dragPointsEditor;
      const name = type === INPUT ? (slot?.name ?? this.inputs?.[index]?.name) : null;
      if (editor && name === IMAGE_INPUT) {
        editor.setExecutedImage(null);
        updateFileWidgets(this);
        editor.refreshSource();
      }
      if (editor && name === MASK_INPUT && !connected) editor.setInputMask(null);
      return result;
    };

    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      this.dragPointsEditor?.stopRefresh?.();
      this.dragPointsEditor?.destroy();
      return onRemoved?.apply(this, arguments);
    };

    // The editor draws the image itself: no second preview of the uploaded file under it.
    nodeType.prototype.onDrawBackground = function () {};
  },
});
