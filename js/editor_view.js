// DragKit Drag Points Editor, layer 2b of 3: the canvas view (DOM only, no frontend API).
//
// A view is a toolbar, a <canvas> and a status line drawing one editor (editor.js): inline in the
// node (inside the DOM widget the glue adds) or enlarged in a modal dialog. It turns pointer and
// key events into edits of the editor's model, in source-image pixels.

import { MAX_PAIRS, clamp } from "./editor_model.js";

const HIT_RADIUS = 9; // display pixels
const HANDLE_COLOR = "#e53935";
const TARGET_COLOR = "#1e88e5";

const STYLE = `
.dragkit-pe { display: flex; flex-direction: column; gap: 4px; width: 100%; height: 100%; box-sizing: border-box;
  font: 11px sans-serif; color: var(--input-text, #ddd); }
.dragkit-pe-bar { display: flex; flex-wrap: wrap; gap: 3px; align-items: center; flex: none; }
.dragkit-pe-bar button { font: inherit; padding: 2px 6px; border-radius: 4px; cursor: pointer;
  border: 1px solid var(--border-color, #555); background: var(--comfy-input-bg, #222); color: inherit; }
.dragkit-pe-bar button.active { background: #3b6fd1; border-color: #3b6fd1; color: #fff; }
.dragkit-pe-bar label { display: flex; align-items: center; gap: 3px; }
.dragkit-pe-bar input[type=range] { width: 80px; }
.dragkit-pe canvas { flex: 1 1 0; min-height: 80px; width: 100%; background: #111; border-radius: 4px;
  outline: none; touch-action: none; cursor: crosshair; }
.dragkit-pe-bar .dragkit-pe-size { display: inline-block; min-width: 4.5em; }
.dragkit-pe-status { flex: none; height: 28px; line-height: 14px; overflow-y: auto; opacity: 0.85; }
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

export class EditorView {
  constructor(editor, { enlarged = false, onClose = null } = {}) {
    ensureStyle();
    this.editor = editor;
    this.enlarged = enlarged;
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
    this.sizeLabel.className = "dragkit-pe-size";
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
    live.title = `Live re-edit: queue the graph ${ed.liveDelayMs} ms after a point is dropped or a stroke ends ` +
      "(only what depends on the points re-runs; saved in the workflow)";
    this.liveInput = document.createElement("input");
    this.liveInput.type = "checkbox";
    this.liveInput.dataset.action = "live";
    this.liveInput.addEventListener("change", () => ed.setLive(this.liveInput.checked));
    live.append(this.liveInput, "Live");
    this.bar.append(live);
    const warp = document.createElement("label");
    warp.title = "Warp preview: while you drag a point, show the image warped by the pixel warp (Drag Warp " +
      "(pixels)) and, in cyan, the mask the inpainting will fill; on by itself when this editor feeds that node";
    this.warpInput = document.createElement("input");
    this.warpInput.type = "checkbox";
    this.warpInput.dataset.action = "warp";
    this.warpInput.addEventListener("change", () => ed.setWarpPreview(this.warpInput.checked));
    warp.append(this.warpInput, "Warp");
    this.bar.append(warp);
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

  /**
   * How the image fits the canvas now: {scale, ox, oy} in the canvas's CSS pixels, from its current size, not
   * from the last draw's: a pointer event that comes after a layout change maps by the layout it hit.
   */
  get fit() {
    const m = this.editor.model;
    const w = this.canvas.clientWidth;
    const h = this.canvas.clientHeight;
    if (!m.hasSize || !w || !h) return { scale: 1, ox: 0, oy: 0 };
    const scale = Math.min(w / m.width, h / m.height);
    return { scale, ox: (w - m.width * scale) / 2, oy: (h - m.height * scale) / 2 };
  }

  /** Continuous source-image coordinates under a pointer event (may lie outside the image). */
  eventToSource(e) {
    const rect = this.canvas.getBoundingClientRect();
    const zoom = rect.width / (this.canvas.clientWidth || 1);
    const lx = (e.clientX - rect.left) / zoom;
    const ly = (e.clientY - rect.top) / zoom;
    const { scale, ox, oy } = this.fit;
    return { u: (lx - ox) / scale, v: (ly - oy) / scale };
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
    const { scale, ox, oy } = this.fit;
    return { x: rect.left + (ox + (x + 0.5) * scale) * zoom, y: rect.top + (oy + (y + 0.5) * scale) * zoom };
  }

  displayOf(p) {
    const { scale, ox, oy } = this.fit;
    return { x: ox + (p.x + 0.5) * scale, y: oy + (p.y + 0.5) * scale };
  }

  hitTest(e) {
    const m = this.editor.model;
    if (!m.hasSize) return null;
    const { u, v } = this.eventToSource(e);
    const { scale, ox, oy } = this.fit;
    const here = { x: ox + u * scale, y: oy + v * scale };
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
    m.eraseOverSeed = ed.maskInputLinked();
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
    this.warpInput.checked = ed.previewOn;
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
    const { scale, ox, oy } = this.fit;
    const w = m.width * scale;
    const h = m.height * scale;
    // the result may have another size (e.g. cropped to multiples of 8): it is drawn over the source's frame
    // the warp preview (the warped image and, over it, what the inpainting will fill) replaces the source
    const preview = ed.shownPreview();
    const shown = ed.showResult && ed.result ? ed.result.image : preview ? preview.canvas : ed.image;
    if (shown) {
      ctx.imageSmoothingEnabled = scale < 1 || shown !== ed.image;
      ctx.drawImage(shown, ox, oy, w, h);
    } else {
      ctx.fillStyle = "#333";
      ctx.fillRect(ox, oy, w, h);
    }
    if (preview) {
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(preview.mask, ox, oy, w, h);
    }
    if (m.editableCount && ((!(ed.showResult && ed.result) && !preview) || ed.tool !== "points")) {
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

export function openDialog(editor) {
  const dialog = document.createElement("dialog");
  dialog.className = "dragkit-pe-dialog";
  const view = new EditorView(editor, { enlarged: true, onClose: () => dialog.close() });
  dialog.append(view.root);
  document.body.append(dialog);
  // While this modal editor is open, graph-level key handling (undo, delete) must not act on the graph.
  const releaseKeys = editor.host.holdGraphKeys();
  dialog.addEventListener("keydown", (e) => {
    if (e.key === "Escape") {
      e.preventDefault();
      dialog.close();
    }
    e.stopPropagation();
  });
  dialog.addEventListener("close", () => {
    releaseKeys();
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

