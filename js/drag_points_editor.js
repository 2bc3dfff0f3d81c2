// DragKit: the "Drag Points Editor" widget (node DragKitPointsEditor).
//
// Click on the image to set a handle (red), click again for its target (blue);
// drag points to adjust them; right-click a point (or select it and press
// Delete) to remove its pair. Brush and eraser paint the editable mask.
// Points and mask live in the node's hidden "editor_state" STRING widget as
// compact JSON (format: dragkit/editor_state.py), so they are saved in the
// workflow, sent in the API prompt, and restored on reload, paste and undo.
// All coordinates are (x, y) pixels of the source image.
//
// A MASK input seeds the editable region: the widget shows it (after a run) and
// the brush/eraser strokes are kept in the state on top of it ("mask" = painted,
// "erase" = erased), so the node's mask is (input OR painted) AND NOT erased.
// After a run the editor shows the image decoded downstream of it (any
// "VAE Decode (DragKit)" fed by this node's outputs; Source/Result toggle), and
// with "Live" on (node property dragkit_live) it queues the graph 400 ms after a
// point is dropped or a stroke ends, once, after any run already pending.
//
// Plain JavaScript for the ComfyUI frontend (1.27), no build step.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_CLASS = "DragKitPointsEditor";
const STATE_WIDGET = "editor_state";
const FILE_WIDGET = "image_file";
const IMAGE_INPUT = "image";
const MASK_INPUT = "mask";
const FILE_WIDGETS = [FILE_WIDGET, "upload"]; // hidden while an IMAGE is connected
const RESULT_KEY = "dragkit_result"; // ui key of VAE Decode (DragKit): its decoded image
const LIVE_PROPERTY = "dragkit_live"; // node property: re-run the graph after each edit
const LIVE_DELAY_MS = 400;
const UI_KEY = "dragkit_editor";
const IMAGE_EVENT = "dragkit.editor.image";
const STATE_VERSION = 1;
const MAX_PAIRS = 128;
const MAX_HISTORY = 100;
const HIT_RADIUS = 9; // display pixels
const MASK_RGB = [255, 190, 0];
const MASK_FILL_ALPHA = 100; // of 255: the painted region is a translucent overlay...
const MASK_EDGE_ALPHA = 255; // ...with an opaque outline, visible on any image
const HANDLE_COLOR = "#e53935";
const TARGET_COLOR = "#1e88e5";

const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));

// ---------------------------------------------------------------------------------------------
// Mask run-length encoding (same format as dragkit/editor_state.py encode_mask/decode_mask):
// row-major runs alternating not-editable/editable, starting with not-editable, as unsigned
// LEB128 varints, base64 encoded.

function encodeMask(mask) {
  const bytes = [];
  const push = (value) => {
    while (value >= 0x80) {
      bytes.push((value % 0x80) | 0x80);
      value = Math.floor(value / 0x80);
    }
    bytes.push(value);
  };
  let current = 0;
  let run = 0;
  for (let i = 0; i < mask.length; i++) {
    const bit = mask[i] ? 1 : 0;
    if (bit === current) {
      run++;
    } else {
      push(run);
      current = bit;
      run = 1;
    }
  }
  push(run);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode.apply(null, bytes.slice(i, i + 0x8000));
  }
  return btoa(text);
}

function decodeMask(data, width, height) {
  if (typeof data !== "string") throw new Error("the mask encoding is not a string");
  const raw = atob(data);
  const mask = new Uint8Array(width * height);
  let pos = 0;
  let painted = 0;
  let runIndex = 0;
  let i = 0;
  while (i < raw.length) {
    let value = 0;
    let scale = 1;
    let byte;
    do {
      if (i >= raw.length) throw new Error("the mask encoding is truncated");
      byte = raw.charCodeAt(i++);
      value += (byte & 0x7f) * scale;
      scale *= 0x80;
    } while (byte & 0x80);
    if (runIndex > 0 && value === 0) throw new Error("the mask encoding has an empty run");
    if (pos + value > mask.length) throw new Error("the mask is larger than the image");
    if (runIndex % 2 === 1) {
      mask.fill(1, pos, pos + value);
      painted += value;
    }
    pos += value;
    runIndex++;
  }
  if (pos !== mask.length) throw new Error(`the mask covers ${pos} pixels, the image has ${mask.length}`);
  return { mask, painted };
}

// ---------------------------------------------------------------------------------------------
// The model: points and mask of one node, in source-image pixels.

function readPoint(value, width, height, what) {
  if (!Array.isArray(value) || value.length !== 2 || !value.every((c) => typeof c === "number" && isFinite(c))) {
    throw new Error(`${what} is not [x, y]`);
  }
  const [x, y] = value;
  if (x < 0 || y < 0 || x > width - 1 || y > height - 1) throw new Error(`${what} is outside the image`);
  return { x, y };
}

class EditorModel {
  constructor() {
    this.width = 0;
    this.height = 0;
    this.pairs = []; // [{handle: {x, y}, target: {x, y}}]
    this.pending = null; // {x, y}: a handle waiting for its target
    this.mask = null; // Uint8Array(width * height), 1 = painted with the brush
    this.maskCount = 0;
    this.erase = null; // Uint8Array(width * height), 1 = erased on top of the MASK input
    this.eraseCount = 0;
    this.seed = null; // Uint8Array(width * height) from the MASK input (not part of the state), or null
    this.editableCount = 0; // pixels of (seed OR mask) AND NOT erase
    this.eraseOverSeed = false; // whether the eraser records erasures (a MASK input is connected)
  }

  editable(i) {
    return ((this.seed !== null && this.seed[i] === 1) || this.mask[i] === 1) && this.erase[i] !== 1;
  }

  recountEditable() {
    let n = 0;
    if (this.mask) for (let i = 0; i < this.mask.length; i++) n += this.editable(i) ? 1 : 0;
    this.editableCount = n;
  }

  /** Use `seed` (Uint8Array of this size, or null) as the MASK input under the strokes. */
  setSeed(seed) {
    this.seed = seed && seed.length === this.width * this.height ? seed : null;
    this.recountEditable();
  }

  get hasSize() {
    return this.width > 0 && this.height > 0;
  }

  get isEmpty() {
    return !this.pairs.length && !this.pending && !this.maskCount && !this.eraseCount;
  }

  setSize(width, height) {
    this.width = width;
    this.height = height;
    this.pairs = [];
    this.pending = null;
    this.mask = new Uint8Array(width * height);
    this.maskCount = 0;
    this.erase = new Uint8Array(width * height);
    this.eraseCount = 0;
    this.seed = null;
    this.editableCount = 0;
  }

  /** The widget string: "" before any image was shown, else version-1 JSON. */
  serialize() {
    if (!this.hasSize) return "";
    const pt = (p) => [p.x, p.y];
    return JSON.stringify({
      version: STATE_VERSION,
      width: this.width,
      height: this.height,
      pairs: this.pairs.map((p) => ({ handle: pt(p.handle), target: pt(p.target) })),
      pending: this.pending ? pt(this.pending) : null,
      mask: this.maskCount ? { rle: encodeMask(this.mask) } : null,
      ...(this.eraseCount ? { erase: { rle: encodeMask(this.erase) } } : {}),
    });
  }

  /** Replace the model by a widget string; throws (leaving the model unchanged) when it is malformed. */
  load(text) {
    if (!text || !String(text).trim()) {
      Object.assign(this, new EditorModel(), { eraseOverSeed: this.eraseOverSeed });
      return;
    }
    const state = JSON.parse(text);
    if (!state || typeof state !== "object" || state.version !== STATE_VERSION) {
      throw new Error(`not a version ${STATE_VERSION} editor state`);
    }
    const { width, height } = state;
    if (!Number.isInteger(width) || !Number.isInteger(height) || width < 1 || height < 1) {
      throw new Error("the image size is not a pair of whole numbers");
    }
    if (!Array.isArray(state.pairs) || state.pairs.length > MAX_PAIRS) throw new Error("the pairs are not a list");
    const pairs = state.pairs.map((p, i) => ({
      handle: readPoint(p && p.handle, width, height, `handle ${i + 1}`),
      target: readPoint(p && p.target, width, height, `target ${i + 1}`),
    }));
    const pending = state.pending == null ? null : readPoint(state.pending, width, height, "the unfinished handle");
    let mask = new Uint8Array(width * height);
    let maskCount = 0;
    if (state.mask != null) {
      ({ mask, painted: maskCount } = decodeMask(state.mask.rle, width, height));
    }
    let erase = new Uint8Array(width * height);
    let eraseCount = 0;
    if (state.erase != null) {
      ({ mask: erase, painted: eraseCount } = decodeMask(state.erase.rle, width, height));
    }
    const seed = this.seed && this.width === width && this.height === height ? this.seed : null;
    Object.assign(this, { width, height, pairs, pending, mask, maskCount, erase, eraseCount, seed });
    this.recountEditable();
  }

  /** A click at (x, y): sets a pending handle, or completes the pending one with this target. */
  click(x, y) {
    if (this.pending) {
      this.pairs.push({ handle: this.pending, target: { x, y } });
      this.pending = null;
      return { pair: this.pairs.length - 1, role: "target" };
    }
    if (this.pairs.length >= MAX_PAIRS) return null;
    this.pending = { x, y };
    return { pair: this.pairs.length, role: "pending" };
  }

  pointAt(ref) {
    if (!ref) return null;
    if (ref.role === "pending") return this.pending;
    const pair = this.pairs[ref.pair];
    return pair ? pair[ref.role] : null;
  }

  movePoint(ref, x, y) {
    const point = this.pointAt(ref);
    if (point) {
      point.x = x;
      point.y = y;
    }
  }

  deletePoint(ref) {
    if (!ref) return;
    if (ref.role === "pending") this.pending = null;
    else this.pairs.splice(ref.pair, 1);
  }

  /** Paint (value 1) or erase (0) a disc of radius r around continuous source coords (u, v); returns the dirty rect. */
  paintDisc(u, v, r, value) {
    const x0 = clamp(Math.floor(u - r), 0, this.width - 1);
    const x1 = clamp(Math.ceil(u + r), 0, this.width - 1);
    const y0 = clamp(Math.floor(v - r), 0, this.height - 1);
    const y1 = clamp(Math.ceil(v + r), 0, this.height - 1);
    const r2 = r * r;
    for (let y = y0; y <= y1; y++) {
      const dy = y + 0.5 - v;
      for (let x = x0; x <= x1; x++) {
        const dx = x + 0.5 - u;
        if (dx * dx + dy * dy > r2) continue;
        const i = y * this.width + x;
        const was = this.editable(i);
        if (this.mask[i] !== value) {
          this.mask[i] = value;
          this.maskCount += value ? 1 : -1;
        }
        // the brush un-erases; the eraser erases the MASK input's pixels too (while one is connected)
        const erased = value ? 0 : this.eraseOverSeed ? 1 : this.erase[i];
        if (this.erase[i] !== erased) {
          this.erase[i] = erased;
          this.eraseCount += erased ? 1 : -1;
        }
        this.editableCount += (this.editable(i) ? 1 : 0) - (was ? 1 : 0);
      }
    }
    return { x0, y0, x1, y1 };
  }

  /** Paint a stroke segment from (u0, v0) to (u1, v1); returns the dirty rect. */
  paintLine(u0, v0, u1, v1, r, value) {
    const steps = Math.max(1, Math.ceil(Math.hypot(u1 - u0, v1 - v0) / Math.max(0.5, r / 2)));
    let rect = null;
    for (let s = 0; s <= steps; s++) {
      const t = s / steps;
      rect = unionRect(rect, this.paintDisc(u0 + (u1 - u0) * t, v0 + (v1 - v0) * t, r, value));
    }
    return rect;
  }

  /** Paint a capsule around every handle -> target path (radius: the brush radius or half the drag, the larger). */
  maskAroundHandles(brushRadius) {
    let rect = null;
    for (const { handle, target } of this.pairs) {
      const length = Math.hypot(target.x - handle.x, target.y - handle.y);
      const r = Math.max(brushRadius, length / 2);
      rect = unionRect(rect, this.paintLine(handle.x + 0.5, handle.y + 0.5, target.x + 0.5, target.y + 0.5, r, 1));
    }
    return rect;
  }

  /** Drop the painted and erased strokes (with a MASK input, back to the input mask). */
  clearMask() {
    this.mask?.fill(0);
    this.erase?.fill(0);
    this.maskCount = 0;
    this.eraseCount = 0;
    this.recountEditable();
  }

  /**
   * Adopt a new image size, keeping the points and painted pixels that still fit.
   * Returns {dropped, maskLost}: pairs removed and painted pixels cut off.
   */
  resizeTo(width, height) {
    const inside = (p) => p.x <= width - 1 && p.y <= height - 1;
    const kept = this.pairs.filter((p) => inside(p.handle) && inside(p.target));
    const dropped = this.pairs.length - kept.length + (this.pending && !inside(this.pending) ? 1 : 0);
    const crop = (layer) => {
      const out = new Uint8Array(width * height);
      for (let y = 0; y < Math.min(height, this.height); y++) {
        out.set(layer.subarray(y * this.width, y * this.width + Math.min(width, this.width)), y * width);
      }
      let count = 0;
      for (let i = 0; i < out.length; i++) count += out[i];
      return [out, count];
    };
    const [mask, maskCount] = crop(this.mask);
    const [erase, eraseCount] = crop(this.erase);
    const maskLost = this.maskCount - maskCount;
    Object.assign(this, {
      width,
      height,
      pairs: kept,
      pending: this.pending && inside(this.pending) ? this.pending : null,
      mask,
      maskCount,
      erase,
      eraseCount,
      seed: null, // the MASK input of the old size no longer applies; the next run brings the new one
    });
    this.recountEditable();
    return { dropped, maskLost };
  }
}

function unionRect(a, b) {
  if (!a) return b;
  if (!b) return a;
  return { x0: Math.min(a.x0, b.x0), y0: Math.min(a.y0, b.y0), x1: Math.max(a.x1, b.x1), y1: Math.max(a.y1, b.y1) };
}

// ---------------------------------------------------------------------------------------------
// Where the image comes from: the upload combo's file, or the connected IMAGE.

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
// The editor of one node: model, history, image, views.

class DragPointsEditor {
  constructor(node) {
    this.node = node;
    this.model = new EditorModel();
    this.undoStack = [];
    this.redoStack = [];
    this.views = new Set();
    this.tool = "points";
    this.brushSize = 32; // diameter in source pixels
    this.selected = null; // {pair, role}
    this.message = "";
    this.warning = "";
    this.image = null; // HTMLImageElement once loaded
    this.imageStatus = "none"; // none | loading | loaded | missing | waiting
    this.sourceKey = null;
    this.executedImage = null; // {filename, subfolder, type} of a connected IMAGE, from the last run
    this.maskCanvas = document.createElement("canvas");
    this.maskPixels = null;
    this.dialog = null;
    this.unreadable = false; // the widget holds a state this editor could not read: keep it until an edit
    this.result = null; // {image, ref, nodeId, title}: the image decoded downstream by the last run
    this.showResult = false;
    this.inputMaskRef = null; // {filename, subfolder, type} of the MASK input, from the last run
    this.liveTimer = null;
    this.liveRuns = 0; // graphs queued by live re-edit (for scripts and tests)
    this.liveDeferred = 0; // edits that waited for a pending run to finish
  }

  get live() {
    return this.node.properties?.[LIVE_PROPERTY] === true;
  }

  setLive(on) {
    this.node.properties = this.node.properties || {};
    this.node.properties[LIVE_PROPERTY] = !!on;
    if (!on) liveRunner.cancel(this);
    this.redraw();
  }

  linked(name) {
    const slot = this.node.findInputSlot?.(name) ?? -1;
    return slot >= 0 && this.node.inputs[slot].link != null;
  }

  // -- the result of the graph it feeds ---------------------------------------------------------

  /** Show `ref` ({filename, subfolder, type}), decoded by node `fromNode` downstream of this editor. */
  setResult(ref, fromNode) {
    const img = new Image();
    const key = JSON.stringify(ref);
    this.pendingResult = key;
    img.onload = () => {
      if (this.pendingResult !== key) return;
      this.result = { image: img, ref, nodeId: fromNode.id, title: fromNode.title || fromNode.type };
      this.showResult = true;
      this.redraw();
    };
    img.onerror = () => {
      if (this.pendingResult === key) this.pendingResult = null;
    };
    img.src = viewUrl(ref);
  }

  clearResult() {
    this.result = null;
    this.pendingResult = null;
    this.showResult = false;
  }

  toggleResult() {
    this.showResult = !this.showResult && !!this.result;
    this.redraw();
  }

  // -- the MASK input ---------------------------------------------------------------------------

  /** Seed the mask with the MASK input's preview file (null: no input mask). */
  setInputMask(ref) {
    const key = ref ? JSON.stringify(ref) : null;
    if (key === this.inputMaskKey) return;
    this.inputMaskKey = key;
    this.inputMaskRef = ref;
    if (!ref) {
      if (this.model.seed) {
        this.model.setSeed(null);
        this.rebuildMaskOverlay();
        this.redraw();
      }
      return;
    }
    const img = new Image();
    img.onload = () => {
      if (this.inputMaskKey !== key) return;
      const { width, height } = this.model;
      if (img.naturalWidth !== width || img.naturalHeight !== height) {
        if (this.imageStatus === "loading" || !this.model.hasSize) return; // applied once the image is in
        this.warning = `The mask input is ${img.naturalWidth}×${img.naturalHeight} but the image is ${width}×${height}.`;
        this.redraw();
        return;
      }
      const canvas = document.createElement("canvas");
      canvas.width = width;
      canvas.height = height;
      const ctx = canvas.getContext("2d", { willReadFrequently: true });
      ctx.drawImage(img, 0, 0);
      const data = ctx.getImageData(0, 0, width, height).data;
      const seed = new Uint8Array(width * height);
      for (let i = 0; i < seed.length; i++) seed[i] = data[i * 4] > 127 ? 1 : 0;
      const old = this.model.seed;
      const changed = old && (old.length !== seed.length || old.some((v, i) => v !== seed[i]));
      if (changed && (this.model.maskCount || this.model.eraseCount)) {
        this.warning = "The mask input changed: your brush and eraser strokes are applied on top of the new mask " +
          "(Clear mask drops them).";
      }
      this.model.setSeed(seed);
      this.rebuildMaskOverlay();
      this.redraw();
    };
    img.src = viewUrl(ref);
  }

  // -- live re-edit -----------------------------------------------------------------------------

  /** After an edit with Live on: queue the graph once the edits pause for LIVE_DELAY_MS. */
  scheduleLiveRun() {
    if (!this.live) return;
    clearTimeout(this.liveTimer);
    this.liveTimer = setTimeout(() => {
      this.liveTimer = null;
      const m = this.model;
      if (m.pending || !m.pairs.length) return; // nothing the node could run with yet
      liveRunner.request(this);
    }, LIVE_DELAY_MS);
  }

  get stateWidget() {
    return this.node.widgets?.find((w) => w.name === STATE_WIDGET);
  }

  // -- state <-> widget -----------------------------------------------------------------------

  /** Load the model from the widget (after configure, paste, graph undo). */
  loadFromWidget() {
    try {
      this.model.load(this.stateWidget?.value ?? "");
      this.unreadable = false;
      this.warning = "";
    } catch (err) {
      this.unreadable = true;
      this.warning = `The saved points are unreadable (${err.message}); the node will report it. Clear points to start over.`;
    }
    this.selected = null;
    this.rebuildMaskOverlay();
    if (this.image) this.adoptImageSize();
    this.redraw();
  }

  writeWidget() {
    this.unreadable = false;
    const widget = this.stateWidget;
    if (widget) widget.value = this.model.serialize();
    this.node.setDirtyCanvas?.(true, true);
  }

  /** Record an edit that started from the serialized state `before`. */
  commit(before) {
    const after = this.model.serialize();
    if (after !== before || this.unreadable) {
      this.undoStack.push(before);
      if (this.undoStack.length > MAX_HISTORY) this.undoStack.shift();
      this.redoStack.length = 0;
      this.writeWidget();
    }
    this.redraw();
  }

  edit(action) {
    const before = this.model.serialize();
    this.warning = "";
    action();
    this.commit(before);
  }

  restore(from, to) {
    if (!from.length) return;
    to.push(this.model.serialize());
    this.model.load(from.pop());
    this.selected = null;
    this.warning = "";
    this.rebuildMaskOverlay();
    this.writeWidget();
    this.redraw();
  }

  undo() {
    this.restore(this.undoStack, this.redoStack);
  }

  redo() {
    this.restore(this.redoStack, this.undoStack);
  }

  // -- actions --------------------------------------------------------------------------------

  clearPoints() {
    this.edit(() => {
      this.model.pairs = [];
      this.model.pending = null;
      this.selected = null;
    });
  }

  clearMask() {
    this.edit(() => {
      this.model.clearMask();
      this.rebuildMaskOverlay();
    });
  }

  maskAroundHandles() {
    if (!this.model.pairs.length) {
      this.warning = "Place at least one handle/target pair first.";
      this.redraw();
      return;
    }
    let rect = null;
    this.edit(() => {
      rect = this.model.maskAroundHandles(this.brushSize / 2);
    });
    this.updateMaskOverlay(rect);
    this.redraw();
  }

  deleteSelected() {
    if (!this.selected || !this.model.pointAt(this.selected)) return;
    this.edit(() => {
      this.model.deletePoint(this.selected);
      this.selected = null;
    });
  }

  setTool(tool) {
    this.tool = tool;
    this.redraw();
  }

  // -- mask overlay (a W x H canvas drawn over the image) --------------------------------------

  rebuildMaskOverlay() {
    const { width, height } = this.model;
    if (!this.model.hasSize) {
      this.maskPixels = null;
      return;
    }
    this.maskCanvas.width = width;
    this.maskCanvas.height = height;
    this.maskPixels = this.maskCanvas.getContext("2d").createImageData(width, height);
    this.updateMaskOverlay({ x0: 0, y0: 0, x1: width - 1, y1: height - 1 });
  }

  updateMaskOverlay(rect) {
    if (!rect || !this.maskPixels) return;
    const model = this.model;
    const { width, height } = model;
    const data = this.maskPixels.data;
    // one pixel more on each side: a change moves the outline of its neighbours too
    const x0 = Math.max(0, rect.x0 - 1);
    const y0 = Math.max(0, rect.y0 - 1);
    const x1 = Math.min(width - 1, rect.x1 + 1);
    const y1 = Math.min(height - 1, rect.y1 + 1);
    const painted = (x, y) => x >= 0 && y >= 0 && x < width && y < height && model.editable(y * width + x);
    for (let y = y0; y <= y1; y++) {
      for (let x = x0; x <= x1; x++) {
        const o = (y * width + x) * 4;
        data[o] = MASK_RGB[0];
        data[o + 1] = MASK_RGB[1];
        data[o + 2] = MASK_RGB[2];
        if (!painted(x, y)) data[o + 3] = 0;
        else if (painted(x - 1, y) && painted(x + 1, y) && painted(x, y - 1) && painted(x, y + 1)) {
          data[o + 3] = MASK_FILL_ALPHA;
        } else data[o + 3] = MASK_EDGE_ALPHA;
      }
    }
    this.maskCanvas.getContext("2d").putImageData(this.maskPixels, 0, 0, x0, y0, x1 - x0 + 1, y1 - y0 + 1);
  }

  // -- the image -------------------------------------------------------------------------------

  /** Where the image comes from now: {key, url} or {key, waiting: message}. */
  currentSource() {
    const node = this.node;
    const slot = node.findInputSlot?.(IMAGE_INPUT) ?? -1;
    const input = slot >= 0 ? node.inputs[slot] : null;
    if (input && input.link != null) {
      // a Load Image-like node upstream: its file, live; anything else: what the last run sent
      const upstream = node.getInputNode?.(slot);
      const fileWidget = upstream?.widgets?.find((w) => w.name === "image" && typeof w.value === "string");
      if (fileWidget && fileWidget.value) {
        const url = viewUrl(parseFileValue(fileWidget.value));
        return { key: `link:${url}`, url };
      }
      if (this.executedImage) {
        const url = viewUrl(this.executedImage);
        return { key: `run:${url}`, url };
      }
      return { key: "link:unknown", waiting: "Run the workflow once to show the connected image here." };
    }
    const file = node.widgets?.find((w) => w.name === FILE_WIDGET)?.value;
    if (!file) return { key: "none", waiting: "Upload an image (button above) or connect an IMAGE." };
    const url = viewUrl(parseFileValue(file));
    return { key: `file:${url}`, url };
  }

  /** Called on every canvas frame: (re)load the image when its source changed. */
  refreshSource() {
    const source = this.currentSource();
    if (source.key === this.sourceKey) return;
    this.sourceKey = source.key;
    if (source.waiting) {
      this.image = null;
      this.imageStatus = "waiting";
      this.message = source.waiting;
      this.redraw();
      return;
    }
    this.imageStatus = "loading";
    this.message = "Loading the image…";
    const img = new Image();
    img.onload = () => {
      if (this.sourceKey !== source.key) return;
      const previous = this.image;
      if (previous && previous.src !== img.src && !source.key.startsWith("run:")) this.clearResult();
      this.image = img;
      this.imageStatus = "loaded";
      this.message = "";
      this.adoptImageSize();
      if (this.inputMaskRef && !this.model.seed) {
        // the mask input arrived before this image (or belonged to another size): apply it again
        const ref = this.inputMaskRef;
        this.inputMaskKey = null;
        this.setInputMask(ref);
      }
      this.redraw();
    };
    img.onerror = () => {
      if (this.sourceKey !== source.key) return;
      this.image = null;
      this.imageStatus = "missing";
      this.message = "The image could not be loaded (missing file?). Points are kept.";
      this.redraw();
    };
    img.src = source.url;
    this.redraw();
  }

  /** Show or hide the upload combo and button: an IMAGE input, when connected, wins over them. */
  updateFileWidgets() {
    const hide = this.linked(IMAGE_INPUT);
    let changed = false;
    for (const w of this.node.widgets ?? []) {
      if (FILE_WIDGETS.includes(w.name) && !!w.hidden !== hide) {
        w.hidden = hide;
        // the layout gives every widget its computeSize height, hidden or not: none while hidden
        if (hide) {
          w.dragkitComputeSize = Object.prototype.hasOwnProperty.call(w, "computeSize") ? w.computeSize : null;
          w.computeSize = () => [0, -4];
        } else if (w.dragkitComputeSize) {
          w.computeSize = w.dragkitComputeSize;
        } else {
          delete w.computeSize;
        }
        changed = true;
      }
    }
    if (changed) this.node.setDirtyCanvas?.(true, true);
  }

  /** Make the model's size the image's: keep what still fits and warn about the rest. */
  adoptImageSize() {
    const width = this.image.naturalWidth;
    const height = this.image.naturalHeight;
    const model = this.model;
    if (model.width === width && model.height === height) return;
    const before = model.serialize();
    if (!model.hasSize || model.isEmpty) {
      model.setSize(width, height);
    } else {
      const old = `${model.width}×${model.height}`;
      const { dropped, maskLost } = model.resizeTo(width, height);
      const lost = [];
      if (dropped) lost.push(`${dropped} point pair${dropped > 1 ? "s" : ""} no longer fit and were removed`);
      if (maskLost) lost.push(`${maskLost} painted mask pixels fell outside`);
      this.warning = lost.length
        ? `The image changed from ${old} to ${width}×${height}: ${lost.join("; ")}.`
        : `The image changed from ${old} to ${width}×${height}; all points still fit and were kept.`;
    }
    this.selected = null;
    // a different image: the editor's history belongs to the old one (graph undo still restores both)
    this.undoStack.length = 0;
    this.redoStack.length = 0;
    this.rebuildMaskOverlay();
    if (model.serialize() !== before && !this.unreadable) this.writeWidget();
  }

  setExecutedImage(image) {
    const changed = JSON.stringify(image) !== JSON.stringify(this.executedImage);
    this.executedImage = image;
    if (changed) this.refreshSource();
  }

  // -- views ----------------------------------------------------------------------------------

  statusText() {
    const m = this.model;
    if (!m.hasSize) return this.message || "No image yet.";
    const parts = [`${m.width}×${m.height}`, `${m.pairs.length} pair${m.pairs.length === 1 ? "" : "s"}`];
    if (m.pending) parts.push("1 handle waiting for its target");
    const px = m.editableCount.toLocaleString();
    if (m.seed) parts.push(`mask ${px} px (input mask + your strokes)`);
    else if (this.linked(MASK_INPUT)) parts.push(`mask ${px} px painted; the mask input shows after a run`);
    else parts.push(m.editableCount ? `mask ${px} px` : "no mask (whole image editable)");
    if (this.showResult && this.result) {
      const { image, title, nodeId } = this.result;
      parts.push(`showing the result of ${title} #${nodeId} (${image.naturalWidth}×${image.naturalHeight})`);
    }
    if (this.message) parts.push(this.message);
    return parts.join(" · ");
  }

  redraw() {
    for (const view of this.views) view.draw();
  }

  openEnlarged() {
    if (this.dialog) return;
    this.dialog = openDialog(this);
  }

  destroy() {
    this.dialog?.close();
    for (const view of this.views) view.destroy();
  }
}

// ---------------------------------------------------------------------------------------------
// A view: toolbar, canvas and status line, drawing one editor (inline in the node, or enlarged).

const STYLE = `
.dragkit-pe { display: flex; flex-direction: column; gap: 4px; width: 100%; height: 100%; box-sizing: border-box;
  font: 11px sans-serif; color: var(--input-text, #ddd); }
.dragkit-pe-bar { display: flex; flex-wrap: wrap; gap: 3px; align-items: center; }
.dragkit-pe-bar button { font: inherit; padding: 2px 6px; border-radius: 4px; cursor: pointer;
  border: 1px solid var(--border-color, #555); background: var(--comfy-input-bg, #222); color: inherit; }
.dragkit-pe-bar button.active { background: #3b6fd1; border-color: #3b6fd1; color: #fff; }
.dragkit-pe-bar label { display: flex; align-items: center; gap: 3px; }
.dragkit-pe-bar input[type=range] { width: 80px; }
.dragkit-pe canvas { flex: 1 1 auto; min-height: 80px; width: 100%; background: #111; border-radius: 4px;
  outline: none; touch-action: none; cursor: crosshair; }
.dragkit-pe-status { min-height: 14px; line-height: 14px; opacity: 0.85; }
.dragkit-pe-status .warn { color: #ffb74d; }
dialog.dragkit-pe-dialog { width: 92vw; height: 92vh; padding: 10px; border: 1px solid #555; border-radius: 8px;
  background: var(--comfy-menu-bg, #202020); box-sizing: border-box; }
dialog.dragkit-pe-dialog::backdrop { background: rgba(0, 0, 0, 0.6); }
dialog.dragkit-pe-dialog .dragkit-pe { font-size: 13px; }
`;

function ensureStyle() {
  if (document.getElementById("dragkit-pe-style")) return;
  const style = document.createElement("style");
  style.id = "dragkit-pe-style";
  style.textContent = STYLE;
  document.head.append(style);
}

class EditorView {
  constructor(editor, { enlarged = false, onClose = null } = {}) {
    ensureStyle();
    this.editor = editor;
    this.enlarged = enlarged;
    this.fit = { scale: 1, ox: 0, oy: 0 };
    this.drag = null; // {kind: "point"|"paint", before, ref?, last?, value?}
    this.hover = null; // source coords under the pointer
    this.root = document.createElement("div");
    this.root.className = "dragkit-pe";
    this.bar = document.createElement("div");
    this.bar.className = "dragkit-pe-bar";
    this.canvas = document.createElement("canvas");
    this.canvas.tabIndex = 0;
    this.status = document.createElement("div");
    this.status.className = "dragkit-pe-status";
    this.root.append(this.bar, this.canvas, this.status);
    this.buildToolbar(onClose);
    this.bindEvents();
    this.resizeObserver = new ResizeObserver(() => this.draw());
    this.resizeObserver.observe(this.canvas);
    editor.views.add(this);
  }

  buildToolbar(onClose) {
    const button = (label, title, action, name) => {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = label;
      b.title = title;
      if (name) b.dataset.action = name;
      b.addEventListener("click", (e) => {
        e.preventDefault();
        action();
      });
      this.bar.append(b);
      return b;
    };
    const ed = this.editor;
    this.toolButtons = {
      points: button("Points", "Click: handle, then target. Drag a point to move it; right-click deletes its pair.",
        () => ed.setTool("points"), "points"),
      brush: button("Brush", "Paint the editable region", () => ed.setTool("brush"), "brush"),
      eraser: button("Eraser", "Erase the editable region", () => ed.setTool("eraser"), "eraser"),
    };
    const label = document.createElement("label");
    label.title = "Brush and eraser diameter, in pixels of the image";
    this.sizeInput = document.createElement("input");
    this.sizeInput.type = "range";
    this.sizeInput.min = "1";
    this.sizeInput.max = "256";
    this.sizeInput.dataset.action = "size";
    this.sizeLabel = document.createElement("span");
    this.sizeInput.addEventListener("input", () => {
      ed.brushSize = Number(this.sizeInput.value);
      ed.redraw();
    });
    label.append(this.sizeInput, this.sizeLabel);
    this.bar.append(label);
    button("Mask handles", "Paint the region around every handle → target path", () => ed.maskAroundHandles(),
      "mask-handles");
    this.undoButton = button("Undo", "Undo the last editor change", () => ed.undo(), "undo");
    this.redoButton = button("Redo", "Redo", () => ed.redo(), "redo");
    button("Clear points", "Remove all handle/target pairs", () => ed.clearPoints(), "clear-points");
    button("Clear mask", "Erase the whole mask (with a mask input: drop your strokes, back to the input mask)",
      () => ed.clearMask(), "clear-mask");
    this.resultButton = button("Result", "Show the image decoded from this editor's points by the last run " +
      "(VAE Decode (DragKit) downstream); click again for the source", () => ed.toggleResult(), "result");
    const live = document.createElement("label");
    live.title = `Live re-edit: queue the graph ${LIVE_DELAY_MS} ms after a point is dropped or a stroke ends ` +
      "(only what depends on the points re-runs; saved in the workflow)";
    this.liveInput = document.createElement("input");
    this.liveInput.type = "checkbox";
    this.liveInput.dataset.action = "live";
    this.liveInput.addEventListener("change", () => ed.setLive(this.liveInput.checked));
    live.append(this.liveInput, "Live");
    this.bar.append(live);
    if (this.enlarged) button("Close", "Close the large view (Esc)", onClose, "close");
    else button("Enlarge", "Open a large editing view", () => ed.openEnlarged(), "enlarge");
  }

  bindEvents() {
    const c = this.canvas;
    c.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    c.addEventListener("pointermove", (e) => this.onPointerMove(e));
    c.addEventListener("pointerup", (e) => this.onPointerUp(e));
    c.addEventListener("pointercancel", (e) => this.onPointerUp(e));
    c.addEventListener("pointerleave", () => {
      this.hover = null;
      this.draw();
    });
    c.addEventListener("contextmenu", (e) => {
      e.preventDefault();
      e.stopPropagation();
      const ref = this.hitTest(e);
      if (ref) {
        this.editor.selected = ref;
        this.editor.deleteSelected();
      }
    });
    c.addEventListener("keydown", (e) => this.onKeyDown(e));
  }

  destroy() {
    this.resizeObserver.disconnect();
    this.editor.views.delete(this);
  }

  // -- coordinates ------------------------------------------------------------------------------

  /** Continuous source-image coordinates under a pointer event (may lie outside the image). */
  eventToSource(e) {
    const rect = this.canvas.getBoundingClientRect();
    const zoom = rect.width / (this.canvas.clientWidth || 1);
    const lx = (e.clientX - rect.left) / zoom;
    const ly = (e.clientY - rect.top) / zoom;
    return { u: (lx - this.fit.ox) / this.fit.scale, v: (ly - this.fit.oy) / this.fit.scale };
  }

  /** The pixel (x, y) a continuous source position falls in, clamped into the image. */
  toPixel({ u, v }) {
    const m = this.editor.model;
    return { x: clamp(Math.floor(u), 0, m.width - 1), y: clamp(Math.floor(v), 0, m.height - 1) };
  }

  /** Viewport (client) coordinates of the centre of source pixel (x, y); for scripts and tests. */
  sourceToClient(x, y) {
    const rect = this.canvas.getBoundingClientRect();
    const zoom = rect.width / (this.canvas.clientWidth || 1);
    return {
      x: rect.left + (this.fit.ox + (x + 0.5) * this.fit.scale) * zoom,
      y: rect.top + (this.fit.oy + (y + 0.5) * this.fit.scale) * zoom,
    };
  }

  displayOf(p) {
    return { x: this.fit.ox + (p.x + 0.5) * this.fit.scale, y: this.fit.oy + (p.y + 0.5) * this.fit.scale };
  }

  hitTest(e) {
    const m = this.editor.model;
    if (!m.hasSize) return null;
    const { u, v } = this.eventToSource(e);
    const here = { x: this.fit.ox + u * this.fit.scale, y: this.fit.oy + v * this.fit.scale };
    const refs = [];
    if (m.pending) refs.push({ pair: m.pairs.length, role: "pending" });
    for (let i = m.pairs.length - 1; i >= 0; i--) refs.push({ pair: i, role: "target" }, { pair: i, role: "handle" });
    for (const ref of refs) {
      const d = this.displayOf(m.pointAt(ref));
      if (Math.hypot(d.x - here.x, d.y - here.y) <= HIT_RADIUS) return ref;
    }
    return null;
  }

  // -- pointer and keys -------------------------------------------------------------------------

  onPointerDown(e) {
    const ed = this.editor;
    const m = ed.model;
    this.canvas.focus({ preventScroll: true });
    if (e.button !== 0 || !m.hasSize || !ed.image) return;
    e.preventDefault();
    this.canvas.setPointerCapture(e.pointerId);
    const before = m.serialize();
    ed.warning = "";
    m.eraseOverSeed = ed.linked(MASK_INPUT);
    if (ed.tool === "points") {
      const ref = this.hitTest(e);
      if (ref) {
        ed.selected = ref;
        this.drag = { kind: "point", before, ref };
      } else {
        const { x, y } = this.toPixel(this.eventToSource(e));
        const placed = m.click(x, y);
        if (!placed) ed.warning = `At most ${MAX_PAIRS} pairs.`;
        ed.selected = placed;
        this.drag = { kind: "click", before };
      }
    } else {
      const { u, v } = this.eventToSource(e);
      const value = ed.tool === "brush" ? 1 : 0;
      ed.updateMaskOverlay(m.paintDisc(u, v, ed.brushSize / 2, value));
      this.drag = { kind: "paint", before, last: { u, v }, value };
    }
    ed.redraw();
  }

  onPointerMove(e) {
    const ed = this.editor;
    const m = ed.model;
    if (!m.hasSize) return;
    const pos = this.eventToSource(e);
    this.hover = pos;
    const drag = this.drag;
    if (drag?.kind === "point") {
      const { x, y } = this.toPixel(pos);
      m.movePoint(drag.ref, x, y);
      ed.redraw();
    } else if (drag?.kind === "paint") {
      ed.updateMaskOverlay(m.paintLine(drag.last.u, drag.last.v, pos.u, pos.v, ed.brushSize / 2, drag.value));
      drag.last = pos;
      ed.redraw();
    } else {
      this.draw();
    }
  }

  onPointerUp(e) {
    const drag = this.drag;
    if (!drag) return;
    this.drag = null;
    if (this.canvas.hasPointerCapture(e.pointerId)) this.canvas.releasePointerCapture(e.pointerId);
    this.editor.commit(drag.before);
    if (this.editor.model.serialize() !== drag.before) this.editor.scheduleLiveRun();
  }

  onKeyDown(e) {
    const ed = this.editor;
    const key = e.key.toLowerCase();
    const ctrl = e.ctrlKey || e.metaKey;
    if (!ctrl && (e.key === "Delete" || e.key === "Backspace")) {
      ed.deleteSelected();
    } else if (this.enlarged && ctrl && ((key === "z" && e.shiftKey) || key === "y")) {
      ed.redo();
    } else if (this.enlarged && ctrl && key === "z") {
      ed.undo();
    } else {
      return;
    }
    e.preventDefault();
    e.stopPropagation();
  }

  // -- drawing ----------------------------------------------------------------------------------

  draw() {
    const ed = this.editor;
    const m = ed.model;
    for (const [tool, b] of Object.entries(this.toolButtons)) b.classList.toggle("active", ed.tool === tool);
    this.sizeInput.value = String(ed.brushSize);
    this.sizeLabel.textContent = `${ed.brushSize}px`;
    this.undoButton.disabled = !ed.undoStack.length;
    this.redoButton.disabled = !ed.redoStack.length;
    this.resultButton.disabled = !ed.result;
    this.resultButton.classList.toggle("active", ed.showResult && !!ed.result);
    this.liveInput.checked = ed.live;
    this.status.textContent = ed.statusText();
    if (ed.warning) {
      const warn = document.createElement("div");
      warn.className = "warn";
      warn.textContent = ed.warning;
      this.status.append(warn);
    }

    const canvas = this.canvas;
    const cssW = canvas.clientWidth;
    const cssH = canvas.clientHeight;
    if (!cssW || !cssH) return;
    const dpr = Math.min(window.devicePixelRatio || 1, 2);
    if (canvas.width !== Math.round(cssW * dpr) || canvas.height !== Math.round(cssH * dpr)) {
      canvas.width = Math.round(cssW * dpr);
      canvas.height = Math.round(cssH * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cssW, cssH);
    if (!m.hasSize) {
      this.drawMessage(ctx, cssW, cssH, ed.message || "No image yet.");
      return;
    }
    const scale = Math.min(cssW / m.width, cssH / m.height);
    this.fit = { scale, ox: (cssW - m.width * scale) / 2, oy: (cssH - m.height * scale) / 2 };
    const { ox, oy } = this.fit;
    const w = m.width * scale;
    const h = m.height * scale;
    // the result may have another size (e.g. cropped to multiples of 8): it is drawn over the source's frame
    const shown = ed.showResult && ed.result ? ed.result.image : ed.image;
    if (shown) {
      ctx.imageSmoothingEnabled = scale < 1 || shown !== ed.image;
      ctx.drawImage(shown, ox, oy, w, h);
    } else {
      ctx.fillStyle = "#333";
      ctx.fillRect(ox, oy, w, h);
    }
    if (m.editableCount && (!(ed.showResult && ed.result) || ed.tool !== "points")) {
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(ed.maskCanvas, ox, oy, w, h);
    }
    this.drawPoints(ctx);
    if (ed.tool !== "points" && this.hover) {
      ctx.beginPath();
      ctx.arc(ox + this.hover.u * scale, oy + this.hover.v * scale, Math.max(1, (ed.brushSize / 2) * scale), 0,
        Math.PI * 2);
      ctx.strokeStyle = ed.tool === "brush" ? "#fff" : "#ff8a80";
      ctx.lineWidth = 1;
      ctx.stroke();
    }
    if (!ed.image) this.drawMessage(ctx, cssW, cssH, ed.message);
  }

  drawMessage(ctx, w, h, text) {
    if (!text) return;
    ctx.fillStyle = "#bbb";
    ctx.font = "12px sans-serif";
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText(text, w / 2, h / 2, w - 16);
  }

  drawPoints(ctx) {
    const ed = this.editor;
    const m = ed.model;
    const r = this.enlarged ? 6 : 5;
    const isSelected = (pair, role) => ed.selected && ed.selected.pair === pair && ed.selected.role === role;
    const dot = (p, color, selected) => {
      const d = this.displayOf(p);
      ctx.beginPath();
      ctx.arc(d.x, d.y, r, 0, Math.PI * 2);
      ctx.fillStyle = color;
      ctx.fill();
      ctx.lineWidth = selected ? 3 : 1.5;
      ctx.strokeStyle = selected ? "#ffeb3b" : "#fff";
      ctx.stroke();
      return d;
    };
    m.pairs.forEach(({ handle, target }, i) => {
      const a = this.displayOf(handle);
      const b = this.displayOf(target);
      const len = Math.hypot(b.x - a.x, b.y - a.y);
      if (len > r * 2) {
        const ux = (b.x - a.x) / len;
        const uy = (b.y - a.y) / len;
        const tipX = b.x - ux * r;
        const tipY = b.y - uy * r;
        const head = Math.min(10, len / 3);
        ctx.beginPath();
        ctx.moveTo(a.x + ux * r, a.y + uy * r);
        ctx.lineTo(tipX, tipY);
        ctx.lineWidth = 2;
        ctx.strokeStyle = "#fff";
        ctx.stroke();
        ctx.beginPath();
        ctx.moveTo(tipX, tipY);
        ctx.lineTo(tipX - ux * head - uy * head * 0.5, tipY - uy * head + ux * head * 0.5);
        ctx.lineTo(tipX - ux * head + uy * head * 0.5, tipY - uy * head - ux * head * 0.5);
        ctx.closePath();
        ctx.fillStyle = "#fff";
        ctx.fill();
      }
      dot(handle, HANDLE_COLOR, isSelected(i, "handle"));
      dot(target, TARGET_COLOR, isSelected(i, "target"));
      ctx.font = `bold ${this.enlarged ? 13 : 11}px sans-serif`;
      ctx.textAlign = "left";
      ctx.textBaseline = "bottom";
      ctx.lineWidth = 3;
      ctx.strokeStyle = "#000";
      ctx.strokeText(String(i + 1), a.x + r + 1, a.y - r + 1);
      ctx.fillStyle = "#fff";
      ctx.fillText(String(i + 1), a.x + r + 1, a.y - r + 1);
    });
    if (m.pending) {
      const d = dot(m.pending, HANDLE_COLOR, isSelected(m.pairs.length, "pending"));
      ctx.beginPath();
      ctx.setLineDash([3, 3]);
      ctx.arc(d.x, d.y, r + 5, 0, Math.PI * 2);
      ctx.strokeStyle = HANDLE_COLOR;
      ctx.lineWidth = 1.5;
      ctx.stroke();
      ctx.setLineDash([]);
    }
  }
}

function openDialog(editor) {
  const dialog = document.createElement("dialog");
  dialog.className = "dragkit-pe-dialog";
  const view = new EditorView(editor, { enlarged: true, onClose: () => dialog.close() });
  dialog.append(view.root);
  document.body.append(dialog);
  // While this modal editor is open, graph-level key handling (undo, delete) must not act on the graph.
  const appClass = app.constructor;
  const previous = appClass.maskeditor_is_opended;
  appClass.maskeditor_is_opended = () => true;
  dialog.addEventListener("keydown", (e) => {
    if (e.key === "Escape") {
      e.preventDefault();
      dialog.close();
    }
    e.stopPropagation();
  });
  dialog.addEventListener("close", () => {
    appClass.maskeditor_is_opended = previous;
    view.destroy();
    dialog.remove();
    editor.dialog = null;
    editor.redraw();
  });
  dialog.showModal();
  view.canvas.focus({ preventScroll: true });
  view.draw();
  return dialog;
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
    clearTimeout(editor.liveTimer);
    editor.liveTimer = null;
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

/** Ids of the nodes fed, directly or not, by `node`'s outputs. */
function downstreamIds(node) {
  const graph = node.graph;
  const seen = new Set();
  const stack = [node];
  while (stack.length) {
    const current = stack.pop();
    for (const output of current.outputs ?? []) {
      for (const linkId of output.links ?? []) {
        const link = graph.links?.get?.(linkId) ?? graph.links?.[linkId] ?? graph.getLink?.(linkId);
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

/** An `executed` message: a decoded result goes to every editor upstream of the node that made it. */
function onExecuted(detail) {
  const ref = detail?.output?.[RESULT_KEY]?.[0];
  const graph = app.graph;
  if (!ref || !graph) return;
  const from = graph.getNodeById?.(detail.display_node ?? detail.node) ?? graph.getNodeById?.(detail.node);
  if (!from) return;
  for (const node of graph.nodes ?? graph._nodes ?? []) {
    if (node.type === NODE_CLASS && node.dragPointsEditor && downstreamIds(node).has(from.id)) {
      node.dragPointsEditor.setResult(ref, from);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Registration

function setUpNode(node) {
  const editor = new DragPointsEditor(node);
  node.dragPointsEditor = editor; // for scripts and tests
  const stateWidget = editor.stateWidget;
  if (stateWidget) {
    // kept in sync by the editor; hidden and taking no space in the node
    stateWidget.hidden = true;
    stateWidget.computeSize = () => [0, -4];
  }
  const view = new EditorView(editor);
  const widget = node.addDOMWidget("drag_points_editor", "dragkit_points_editor", view.root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => 200,
    onDraw: () => editor.refreshSource(),
  });
  widget.serialize = false;
  const [w, h] = node.size;
  node.setSize([Math.max(w, 380), Math.max(h, 480)]);
  editor.loadFromWidget();
  editor.updateFileWidgets();
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
      this.dragPointsEditor?.loadFromWidget();
      this.dragPointsEditor?.updateFileWidgets();
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
      if (editor && slot?.name === IMAGE_INPUT) {
        editor.setExecutedImage(null);
        editor.updateFileWidgets();
      }
      if (editor && slot?.name === MASK_INPUT && !connected) editor.setInputMask(null);
      return result;
    };

    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      if (this.dragPointsEditor) liveRunner.cancel(this.dragPointsEditor);
      this.dragPointsEditor?.destroy();
      return onRemoved?.apply(this, arguments);
    };

    // The editor draws the image itself: no second preview of the uploaded file under it.
    nodeType.prototype.onDrawBackground = function () {};
  },
});
