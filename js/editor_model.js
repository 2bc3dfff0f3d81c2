// DragKit Drag Points Editor, layer 1 of 3: the state model (no DOM, no frontend).
//
// Points and mask of one editor in source-image pixels, (x, y) with x to the right and y down,
// and the widget string they are saved as (format: dragkit/editor_state.py, version 1).
// The mask is kept as layers of width*height bytes: "mask" = painted with the brush, "erase" =
// erased on top of the MASK input ("seed"); editable = (seed OR mask) AND NOT erase.
// Runs in the browser and under Node (tests/test_editor_state.py drives it there).

export const STATE_VERSION = 1;
export const MAX_PAIRS = 128;

export const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));

// ---------------------------------------------------------------------------------------------
// Mask run-length encoding (same format as dragkit/editor_state.py encode_mask/decode_mask):
// row-major runs alternating not-editable/editable, starting with not-editable, as unsigned
// LEB128 varints, base64 encoded.

export function encodeMask(mask) {
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

export function decodeMask(data, width, height) {
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

export class EditorModel {
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

export function unionRect(a, b) {
  if (!a) return b;
  if (!b) return a;
  return { x0: Math.min(a.x0, b.x0), y0: Math.min(a.y0, b.y0), x1: Math.max(a.x1, b.x1), y1: Math.max(a.y1, b.y1) };
}
