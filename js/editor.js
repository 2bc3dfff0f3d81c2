// DragKit Drag Points Editor, layer 2a of 3: the editor of one node (no frontend API).
//
// Holds the model (editor_model.js), its undo history, the image and the result it shows, and
// draws through its views (editor_view.js). Everything it needs from ComfyUI's frontend goes
// through `host` (the glue in drag_points_editor.js): the saved state string, the image source,
// /view URLs, the node's live flag and the queue. So the same code runs in the classic canvas and
// in Nodes 2.0, and a frontend change touches only the glue.

import { EditorModel, unionRect } from "./editor_model.js";
import { openDialog } from "./editor_view.js";
import { DEFAULT_BAND, WarpInputError, pixelWarp } from "./pixel_warp.js";

export const MASK_INPUT = "mask";
const LIVE_DELAY_MS = 400;
const MAX_HISTORY = 100;
const MASK_RGB = [255, 190, 0];
const MASK_FILL_ALPHA = 100; // of 255: the painted region is a translucent overlay...
const MASK_EDGE_ALPHA = 255; // ...with an opaque outline, visible on any image
const INPAINT_RGBA = [0, 229, 255, 120]; // the warp preview's inpaint mask
const PREVIEW_MAX_PIXELS = 512 * 512; // larger images are previewed scaled down to this many pixels

export class DragPointsEditor {
  /** `host`: the frontend glue of one node (see drag_points_editor.js, makeHost). */
  constructor(host) {
    this.host = host;
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
    // live warp preview (pixel_warp.js): on while a "Drag Warp (pixels)" node is fed by this editor,
    // unless switched off (warpChoice false), or switched on without one (warpChoice true)
    this.warpNode = null; // {id, title, band, neighbours} of such a node, from the glue
    this.warpChoice = null;
    this.preview = null; // {canvas, mask, scale, ms, inpaintPixels} or {error}
    this.previewKey = null;
    this.previewFrame = 0;
    this.previews = 0; // warps computed (for scripts and tests)
    this.maskVersion = 0; // bumped on every change of the editable mask
    this.sourcePixels = null; // {src, scale, width, height, rgba}: the image as the preview reads it
  }

  get live() {
    return this.host.getLive();
  }

  get liveDelayMs() {
    return LIVE_DELAY_MS;
  }

  setLive(on) {
    this.host.setLive(!!on);
    if (!on) this.cancelLiveRun();
    this.redraw();
  }

  /** Whether the MASK input is connected (the eraser then records erasures of the input's pixels). */
  maskInputLinked() {
    return this.host.linked(MASK_INPUT);
  }

  // -- the result of the graph it feeds ---------------------------------------------------------

  /** Show `ref` ({filename, subfolder, type}), decoded by node `fromNode` ({id, title}) downstream of this editor. */
  setResult(ref, fromNode) {
    const img = new Image();
    const key = JSON.stringify(ref);
    this.pendingResult = key;
    img.onload = () => {
      if (this.pendingResult !== key) return;
      this.result = { image: img, ref, nodeId: fromNode.id, title: fromNode.title };
      this.showResult = true;
      this.redraw();
    };
    img.onerror = () => {
      if (this.pendingResult === key) this.pendingResult = null;
    };
    img.src = this.host.viewUrl(ref);
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
    img.src = this.host.viewUrl(ref);
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
      this.host.requestLiveRun(this);
    }, LIVE_DELAY_MS);
  }

  cancelLiveRun() {
    clearTimeout(this.liveTimer);
    this.liveTimer = null;
    this.host.cancelLiveRun(this);
  }

  // -- state <-> widget -----------------------------------------------------------------------

  /** Load the model from the widget (after configure, paste, graph undo). */
  loadFromWidget() {
    try {
      this.model.load(this.host.readState());
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
    this.host.writeState(this.model.serialize());
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
    this.maskVersion++;
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
    this.maskVersion++;
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
    const { linked, upstreamFile, file } = this.host.imageSource();
    if (linked) {
      // a Load Image-like node upstream: its file, live; anything else: what the last run sent
      if (upstreamFile) {
        const url = this.host.viewUrl(upstreamFile);
        return { key: `link:${url}`, url };
      }
      if (this.executedImage) {
        const url = this.host.viewUrl(this.executedImage);
        return { key: `run:${url}`, url };
      }
      return { key: "link:unknown", waiting: "Run the workflow once to show the connected image here." };
    }
    if (!file) return { key: "none", waiting: "Upload an image (button above) or connect an IMAGE." };
    const url = this.host.viewUrl(file);
    return { key: `file:${url}`, url };
  }

  /** Called often (canvas frames, a timer): (re)load the image when its source changed. */
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
      // the source may have changed while this one loaded (a workflow's values arrive after the node is made)
      if (this.currentSource().key !== source.key) {
        this.refreshSource();
        return;
      }
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
      if (this.currentSource().key !== source.key) {
        this.refreshSource();
        return;
      }
      this.image = null;
      this.imageStatus = "missing";
      this.message = "The image could not be loaded (missing file?). Points are kept.";
      this.redraw();
    };
    img.src = source.url;
    this.redraw();
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
    else if (this.maskInputLinked()) parts.push(`mask ${px} px painted; the mask input shows after a run`);
    else parts.push(m.editableCount ? `mask ${px} px` : "no mask (whole image editable)");
    if (this.showResult && this.result) {
      const { image, title, nodeId } = this.result;
      parts.push(`showing the result of ${title} #${nodeId} (${image.naturalWidth}×${image.naturalHeight})`);
    }
    if (this.previewOn) {
      const p = this.preview;
      if (p?.error) {
        parts.push(`warp preview: ${p.error}`);
      } else if (p && this.shownPreview()) {
        const scaled = p.scale < 1 ? `, at ${Math.round(p.scale * 100)}% size` : "";
        parts.push(`warp preview k=${this.warpBand}: ${p.inpaintPixels.toLocaleString()} px to inpaint ` +
          `(${p.ms.toFixed(0)} ms${scaled})`);
      } else if (!m.pairs.length) {
        parts.push("warp preview: place a pair");
      }
    }
    if (this.message) parts.push(this.message);
    return parts.join(" · ");
  }

  // -- live warp preview -------------------------------------------------------------------------

  /** A downstream pixel-warp node ({id, title, band, neighbours}) or null; from the glue. */
  setWarpNode(info) {
    if (JSON.stringify(info) === JSON.stringify(this.warpNode)) return;
    this.warpNode = info;
    this.redraw();
  }

  get previewOn() {
    return this.warpChoice ?? !!this.warpNode;
  }

  setWarpPreview(on) {
    this.warpChoice = !!on;
    this.redraw();
  }

  get warpBand() {
    return this.warpNode?.band ?? DEFAULT_BAND;
  }

  /** The preview to draw instead of the source ({canvas, mask}), or null. */
  shownPreview() {
    const p = this.preview;
    return this.previewOn && !(this.showResult && this.result) && p && !p.error && p.key === this.previewKey ? p : null;
  }

  /** Recompute the preview (once per animation frame) when the pairs, mask, image or band changed. */
  schedulePreview() {
    const m = this.model;
    if (!this.previewOn || !this.image || !m.hasSize || !m.pairs.length) {
      this.preview = null;
      this.previewKey = null;
      return;
    }
    const key = JSON.stringify([this.image.src, m.width, m.height, m.pairs, this.maskVersion, this.warpBand]);
    if (key === this.previewKey) return;
    this.previewKey = key;
    if (this.previewFrame) return;
    this.previewFrame = requestAnimationFrame(() => {
      this.previewFrame = 0;
      this.computePreview();
      for (const view of this.views) view.draw();
    });
  }

  /** The source image's RGBA pixels at the preview's scale (cached per image). */
  readSourcePixels() {
    const img = this.image;
    if (this.sourcePixels?.src === img.src) return this.sourcePixels;
    const scale = Math.min(1, Math.sqrt(PREVIEW_MAX_PIXELS / (img.naturalWidth * img.naturalHeight)));
    const width = Math.max(1, Math.round(img.naturalWidth * scale));
    const height = Math.max(1, Math.round(img.naturalHeight * scale));
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(img, 0, 0, width, height);
    this.sourcePixels = { src: img.src, scale, width, height, rgba: ctx.getImageData(0, 0, width, height).data };
    return this.sourcePixels;
  }

  computePreview() {
    const m = this.model;
    if (!this.previewOn || !this.image || !m.hasSize || !m.pairs.length) return;
    const key = this.previewKey;
    const src = this.readSourcePixels();
    const { width, height } = src;
    const sx = width / m.width;
    const sy = height / m.height;
    let mask = null;
    if (m.editableCount) {
      mask = new Uint8Array(width * height);
      for (let y = 0; y < height; y++) {
        const row = Math.min(m.height - 1, Math.floor((y + 0.5) / sy)) * m.width;
        for (let x = 0; x < width; x++) mask[y * width + x] = m.editable(row + Math.min(m.width - 1, Math.floor((x + 0.5) / sx))) ? 1 : 0;
      }
    }
    const at = (p) => [Math.min(width - 1, p.x * sx), Math.min(height - 1, p.y * sy)];
    const t0 = performance.now();
    let result;
    try {
      result = pixelWarp({
        width, height, rgba: src.rgba, mask,
        handles: m.pairs.map((p) => at(p.handle)),
        targets: m.pairs.map((p) => [p.target.x * sx, p.target.y * sy]),
        band: Math.round(this.warpBand * Math.min(sx, sy)),
      });
    } catch (err) {
      if (!(err instanceof WarpInputError)) throw err;
      this.preview = { key, error: err.message };
      this.previews++;
      return;
    }
    const ms = performance.now() - t0;
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    canvas.getContext("2d").putImageData(new ImageData(result.rgba, width, height), 0, 0);
    const maskCanvas = document.createElement("canvas");
    maskCanvas.width = width;
    maskCanvas.height = height;
    const overlay = new ImageData(width, height);
    let inpaintPixels = 0;
    for (let i = 0; i < result.inpaint.length; i++) {
      if (!result.inpaint[i]) continue;
      overlay.data.set(INPAINT_RGBA, i * 4);
      inpaintPixels++;
    }
    maskCanvas.getContext("2d").putImageData(overlay, 0, 0);
    this.preview = { key, canvas, mask: maskCanvas, scale: src.scale, ms, inpaintPixels, result };
    this.previews++;
  }

  redraw() {
    this.schedulePreview();
    for (const view of this.views) view.draw();
  }

  openEnlarged() {
    if (this.dialog) return;
    this.dialog = openDialog(this);
  }

  destroy() {
    cancelAnimationFrame(this.previewFrame);
    this.cancelLiveRun();
    this.dialog?.close();
    for (const view of this.views) view.destroy();
  }
}

