// DragKit: Inpaint4Drag's bidirectional pixel warp in plain JavaScript, for the editor's live
// preview (no DOM, no frontend; runs under Node for the tests).
//
// A port of dragkit/pixel_warp.py (the definition: ../shared/METHODS.md "Warp and inpaint"; that
// module's docstring gives each step). Same conventions: points are pixel (x, y), x the column and
// y the row, pixel (row, col) has its centre at (col, row); masks are width*height bytes in raster
// order (top to bottom, then left to right), 1 = editable. Steps, per region with a handle:
// 1. regions: 8-connected components of the hole-filled mask (background 4-connected); a handle
//    belongs to the region holding its nearest pixel (round half to even);
// 2. forward: p -> round(p + IDW(p)) over the k = 4 nearest handles; the region's pixel-edge
//    contour, corners moved to the nearest corner of c + IDW(c), filled even-odd = the target region;
// 3. backward: every target pixel q takes the colour of round(q + b(q)), b the IDW over the k = 4
//    nearest moved pixels (exact search, ties by (|o|^2, dy, dx)) of the vectors back to their
//    sources (one per moved pixel: the one nearest a handle); a source outside the image keeps q's
//    colour and puts q in the inpaint mask;
// 4. inpaint mask = dilate(S and not T, k x k) or band(T, k) or (no source), band(T, k) = the
//    lattice disc of radius (k + 1) / 2 (k = 1: the pixel) around each boundary pixel of each target
//    region, the image border counting where the target ends there (OpenCV's thick line, as released).
// Regions are pasted bottom-up (OpenCV's contour order): the upper region's paste wins.
// Python computes the geometry in float32, this port in float64: a point within ~1e-6 of a rounding
// boundary may land one pixel apart (tests/test_editor_js.py states the tolerance).
//
// Speed (the preview follows the mouse): each step works inside the bounding box of its region
// (the moved region's box for the fill and the backward map), per-pixel data lives in typed arrays
// from a module-level scratch pool reused across calls, and inner loops allocate nothing. Under V8
// (Node, Chromium) the results are the same bytes as the earlier whole-image version of this file;
// benchmarks/js_warp.mjs times it.

export const NEAREST = 4;
export const DEFAULT_BAND = 5;
const IDW_EPS = 1e-6;

/** round half to even, as torch.round (v - floor(v) is exact in floating point). */
function roundEven(v) {
  const f = Math.floor(v);
  const d = v - f;
  if (d < 0.5) return f;
  if (d > 0.5) return f + 1;
  return f % 2 === 0 ? f : f + 1;
}

/** An error of the warp's input: the message is for the user (the editor shows it). */
export class WarpInputError extends Error {}

/** The kernel the released code uses for `band`: an even value becomes the next odd one, 0 stays 0. */
export function releasedBand(band) {
  return band > 0 && band % 2 === 0 ? band + 1 : band;
}

/**
 * How far OpenCV's line of odd thickness `kernel` reaches from its centre line: a rectangle of
 * half-width kernel / 2 + 0.5 with a filled circle of radius (kernel + 1) >> 1 on each vertex;
 * thickness 1 is the one-pixel line (0).
 */
export function bandRadius(kernel) {
  return kernel > 1 ? (kernel + 1) >> 1 : 0;
}

// -- scratch memory ------------------------------------------------------------------------------

const POOL = new Map();

/**
 * A typed array of `length` elements kept under `name` and reused by later calls (grown when too
 * small). Its contents are whatever the last user left: callers initialise what they read. Nothing
 * returned to the caller of pixelWarp lives here.
 */
function scratch(name, Type, length) {
  let buffer = POOL.get(name);
  if (!buffer || buffer.length < length) {
    buffer = new Type(Math.max(length, buffer ? Math.ceil(buffer.length * 1.5) : 0));
    POOL.set(name, buffer);
  }
  return buffer.subarray(0, length);
}

// -- regions -----------------------------------------------------------------------------------

/**
 * Regions of an editable mask on the padded lattice: (width + 2) x (height + 2) cells, image pixel
 * (x, y) at cell (y + 1) * (width + 2) + x + 1, a one-cell frame around the image.
 *
 * Holes (background the frame cannot reach 4-connected) are filled, then the filled set is labelled
 * 8-connected in raster order of the components' first pixels. Only the bounding box of the
 * editable pixels is searched: everything outside it is background that reaches the frame.
 *
 * @param {ArrayLike<number>} editable  width*height, nonzero = editable
 * @param {Int32Array} labels  (width + 2) * (height + 2) cells, written: region label, -1 elsewhere
 * @returns {{count: number, boxes: number[]}}  boxes: [x0, y0, x1, y1] per label (inclusive pixels)
 */
function labelPadded(editable, width, height, labels) {
  const pw = width + 2;
  labels.fill(-1);
  let ex0 = width;
  let ey0 = height;
  let ex1 = -1;
  let ey1 = -1;
  for (let y = 0; y < height; y++) {
    const from = y * width;
    let first = -1;
    let last = -1;
    for (let x = 0; x < width; x++) {
      if (!editable[from + x]) continue;
      if (first < 0) first = x;
      last = x;
    }
    if (first < 0) continue;
    if (ey1 < 0) ey0 = y;
    ey1 = y;
    if (first < ex0) ex0 = first;
    if (last > ex1) ex1 = last;
  }
  const boxes = [];
  if (ey1 < 0) return { count: 0, boxes };
  // -1: frame or background reached from outside; -2: background not reached (yet); -3: editable
  for (let y = ey0; y <= ey1; y++) {
    const row = (y + 1) * pw + 1;
    const from = y * width;
    for (let x = ex0; x <= ex1; x++) labels[row + x] = editable[from + x] ? -3 : -2;
  }
  const stack = scratch("stack", Int32Array, (ex1 - ex0 + 1) * (ey1 - ey0 + 1));
  let top = 0;
  for (let y = ey0; y <= ey1; y++) {
    const row = (y + 1) * pw + 1;
    const step = y === ey0 || y === ey1 ? 1 : Math.max(1, ex1 - ex0); // the box's edge cells
    for (let x = ex0; x <= ex1; x += step) {
      if (labels[row + x] === -2) {
        labels[row + x] = -1;
        stack[top++] = row + x;
      }
    }
  }
  while (top) {
    const i = stack[--top];
    if (labels[i - 1] === -2) { labels[i - 1] = -1; stack[top++] = i - 1; }
    if (labels[i + 1] === -2) { labels[i + 1] = -1; stack[top++] = i + 1; }
    if (labels[i - pw] === -2) { labels[i - pw] = -1; stack[top++] = i - pw; }
    if (labels[i + pw] === -2) { labels[i + pw] = -1; stack[top++] = i + pw; }
  }
  // now every cell <= -2 is filled (editable or a hole): label 8-connected components
  let count = 0;
  for (let y = ey0; y <= ey1; y++) {
    const row = (y + 1) * pw + 1;
    for (let x = ex0; x <= ex1; x++) {
      const start = row + x;
      if (labels[start] > -2) continue;
      let x0 = x;
      let x1 = x;
      let y1 = y; // y is the first row: raster order
      labels[start] = count;
      stack[top++] = start;
      while (top) {
        const i = stack[--top];
        const cy = ((i / pw) | 0) - 1;
        const cx = i - (cy + 1) * pw - 1;
        if (cx < x0) x0 = cx;
        if (cx > x1) x1 = cx;
        if (cy > y1) y1 = cy;
        top = visit(labels, stack, top, i - pw - 1, count);
        top = visit(labels, stack, top, i - pw, count);
        top = visit(labels, stack, top, i - pw + 1, count);
        top = visit(labels, stack, top, i - 1, count);
        top = visit(labels, stack, top, i + 1, count);
        top = visit(labels, stack, top, i + pw - 1, count);
        top = visit(labels, stack, top, i + pw, count);
        top = visit(labels, stack, top, i + pw + 1, count);
      }
      boxes.push(x0, y, x1, y1);
      count++;
    }
  }
  return { count, boxes };
}

/** Label cell `j` and push it when it is filled and unlabelled; returns the new stack top. */
function visit(labels, stack, top, j, label) {
  if (labels[j] > -2) return top;
  labels[j] = label;
  stack[top] = j;
  return top + 1;
}

/** Regions of an editable mask: {labels (Int32Array, width*height, -1 outside), count}. */
export function regionLabels(editable, width, height) {
  const pw = width + 2;
  const padded = new Int32Array(pw * (height + 2));
  const { count } = labelPadded(editable, width, height, padded);
  const labels = new Int32Array(width * height);
  for (let y = 0; y < height; y++) labels.set(padded.subarray((y + 1) * pw + 1, (y + 1) * pw + 1 + width), y * width);
  return { labels, count };
}

// -- inverse-distance interpolation ----------------------------------------------------------

/**
 * |(x, y)| as V8's Math.hypot computes it (max * sqrt(1 + (min / max)^2), the two-argument case of
 * its normalised sum), the same bits at a third of the cost: Math.hypot allocates. Infinite, NaN
 * and zero arguments go to Math.hypot.
 */
function hypot(x, y) {
  const a = Math.abs(x);
  const b = Math.abs(y);
  const max = a > b ? a : b;
  if (!(max > 0) || max === Infinity) return Math.hypot(x, y);
  const r = (a > b ? b : a) / max;
  return Math.sqrt(1 + r * r) * max;
}

const IDW = new Float64Array(3); // the last idwAt result: vx, vy, nearest handle distance
const PICK = new Int32Array(NEAREST); // the chosen handles, nearest first
const PICK_DIST = new Float64Array(NEAREST);

/**
 * IDW at (px, py) over the `NEAREST` nearest handles of `h` ({x, y, dx, dy: Float64Array, n}), ties
 * by index; all of them, in index order, when there are at most NEAREST. Writes IDW = [vx, vy,
 * distance to the nearest handle].
 */
function idwAt(px, py, h) {
  const n = h.n;
  let closest = Infinity;
  let sw = 0;
  let vx = 0;
  let vy = 0;
  if (n <= NEAREST) {
    for (let j = 0; j < n; j++) {
      const d = hypot(px - h.x[j], py - h.y[j]);
      closest = Math.min(closest, d);
      const w = 1 / (d + IDW_EPS);
      sw += w;
      vx += w * h.dx[j];
      vy += w * h.dy[j];
    }
  } else {
    let picked = 0; // insertion into the NEAREST smallest (distance, index), kept sorted
    for (let j = 0; j < n; j++) {
      const d = hypot(px - h.x[j], py - h.y[j]);
      closest = Math.min(closest, d);
      if (picked === NEAREST && d >= PICK_DIST[NEAREST - 1]) continue;
      let at = picked < NEAREST ? picked++ : NEAREST - 1;
      while (at > 0 && PICK_DIST[at - 1] > d) {
        PICK_DIST[at] = PICK_DIST[at - 1];
        PICK[at] = PICK[at - 1];
        at--;
      }
      PICK_DIST[at] = d;
      PICK[at] = j;
    }
    for (let t = 0; t < NEAREST; t++) {
      const j = PICK[t];
      const w = 1 / (PICK_DIST[t] + IDW_EPS);
      sw += w;
      vx += w * h.dx[j];
      vy += w * h.dy[j];
    }
  }
  IDW[0] = vx / sw;
  IDW[1] = vy / sw;
  IDW[2] = closest;
}

/** Lattice offsets with |o| <= radius, ordered by (|o|^2, dy, dx): {radius, dx, dy (Int32Array), weight (1/(|o| + eps))}. */
function disc(radius) {
  const all = [];
  for (let dy = -radius; dy <= radius; dy++) {
    for (let dx = -radius; dx <= radius; dx++) {
      const s = dx * dx + dy * dy;
      if (s <= radius * radius) all.push([dx, dy, s]);
    }
  }
  all.sort((a, b) => a[2] - b[2] || a[1] - b[1] || a[0] - b[0]);
  return {
    radius,
    dx: Int32Array.from(all, (o) => o[0]),
    dy: Int32Array.from(all, (o) => o[1]),
    weight: Float64Array.from(all, (o) => 1 / (Math.sqrt(o[2]) + IDW_EPS)),
  };
}

// The offsets the backward search walks; a larger disc starts with the smaller one's offsets in the
// same order, so it only grows (doubling) and is kept across calls.
let DISC = disc(8);

// -- masks ---------------------------------------------------------------------------------------

/**
 * Dilate `mask` (width*height bytes, set only inside the box [x0, x1] x [y0, y1]) by a
 * (2 * reach + 1) square into `out`, which is written inside the box grown by `reach` (clipped to
 * the image) and left alone elsewhere. One pass per axis, each remembering the last set cell.
 */
function dilateBox(mask, out, width, height, x0, y0, x1, y1, reach) {
  const X0 = Math.max(0, x0 - reach);
  const X1 = Math.min(width - 1, x1 + reach);
  const Y0 = Math.max(0, y0 - reach);
  const Y1 = Math.min(height - 1, y1 + reach);
  const rows = scratch("rows", Uint8Array, width * height);
  for (let y = y0; y <= y1; y++) {
    const row = y * width;
    let last = -Infinity;
    for (let p = x0; p <= Math.min(x1, X0 + reach - 1); p++) if (mask[row + p]) last = p;
    for (let x = X0; x <= X1; x++) {
      const p = x + reach;
      if (p >= x0 && p <= x1 && mask[row + p]) last = p;
      rows[row + x] = last >= x - reach ? 1 : 0;
    }
  }
  const lastRow = scratch("lastRow", Float64Array, width).fill(-Infinity);
  for (let q = y0; q <= Math.min(y1, Y0 + reach - 1); q++) {
    for (let x = X0; x <= X1; x++) if (rows[q * width + x]) lastRow[x] = q;
  }
  for (let y = Y0; y <= Y1; y++) {
    const q = y + reach;
    if (q >= y0 && q <= y1) {
      for (let x = X0; x <= X1; x++) if (rows[q * width + x]) lastRow[x] = q;
    }
    const row = y * width;
    for (let x = X0; x <= X1; x++) out[row + x] = lastRow[x] >= y - reach ? 1 : 0;
  }
}

/** A w*h byte mask dilated by a kernel x kernel square (odd kernel), clipped to the image. */
export function dilate(mask, width, height, kernel) {
  const out = new Uint8Array(width * height);
  if (width && height) dilateBox(mask, out, width, height, 0, 0, width - 1, height - 1, kernel >> 1);
  return out;
}

// -- the warp ------------------------------------------------------------------------------------

/**
 * Forward map of one region (label `id` of the padded `labels`, inside `box` [x0, y0, x1, y1]):
 * every region pixel p, in raster order, to round(p + IDW(p)) over the handles `h`; marks the
 * region in `source` (width*height bytes). Leaves p in scratch px/py, the moved pixel in mx/my and
 * p's distance to its nearest handle in "near"; returns {count, box: the moved pixels' box}.
 */
function forwardMap(id, box, labels, width, h, source) {
  const pw = width + 2;
  const [bx0, by0, bx1, by1] = box;
  const bw = bx1 - bx0 + 1;
  const bh = by1 - by0 + 1;
  const px = scratch("px", Int32Array, bw * bh);
  const py = scratch("py", Int32Array, bw * bh);
  const mx = scratch("mx", Int32Array, bw * bh);
  const my = scratch("my", Int32Array, bw * bh);
  const near = scratch("near", Float64Array, bw * bh);
  let m = 0;
  let mx0 = Infinity;
  let my0 = Infinity;
  let mx1 = -Infinity;
  let my1 = -Infinity;
  for (let y = by0; y <= by1; y++) {
    const row = (y + 1) * pw + 1;
    for (let x = bx0; x <= bx1; x++) {
      if (labels[row + x] !== id) continue;
      idwAt(x, y, h);
      const tx = roundEven(x + IDW[0]);
      const ty = roundEven(y + IDW[1]);
      px[m] = x;
      py[m] = y;
      mx[m] = tx;
      my[m] = ty;
      near[m] = IDW[2];
      m++;
      source[y * width + x] = 1;
      if (tx < mx0) mx0 = tx;
      if (tx > mx1) mx1 = tx;
      if (ty < my0) my0 = ty;
      if (ty > my1) my1 = ty;
    }
  }
  return { count: m, box: [mx0, my0, mx1, my1] };
}

/**
 * Target of one region (label `id` of the padded `labels`, inside `box`): its pixel-edge contour
 * with every corner c moved to the nearest pixel corner of c + IDW(c), filled even-odd at pixel
 * centres over the image grown by `margin` pixels each side. Marks the target's pixels inside the
 * image in `landed` and, when any, stamps the disc of `radius` (dx^2 + dy^2 <= radius^2) around
 * each boundary pixel of the target (a 4-neighbour outside it; the image border counts only where
 * the target really ends there) into `band` (width*height bytes each): OpenCV's thick line. Leaves
 * the target pixels inside the image (the backward map's queries) in raster order in scratch qx/qy;
 * returns {count, box, bandBox}: the box [x0, y0, x1, y1] of those pixels (x0 > x1 when there are
 * none) and, when there are, the box the band may reach (the filled box grown by `radius`, unclipped).
 */
function movedTarget(id, box, labels, width, height, h, landed, margin, radius, band) {
  const pw = width + 2;
  const [bx0, by0, bx1, by1] = box;
  const bw = bx1 - bx0 + 1;
  const bh = by1 - by0 + 1;
  // the pixel-edge contour: edges between lattice corners (X, Y) = pixel corner (X - 0.5, Y - 0.5)
  const cw = bw + 1;
  const corners = cw * (bh + 1);
  const stamp = scratch("cornerStamp", Uint8Array, corners).fill(0);
  const kx = scratch("cornerX", Int32Array, corners); // moved corner = (kx - 0.5, ky - 0.5)
  const ky = scratch("cornerY", Int32Array, corners);
  const edges = scratch("edges", Int32Array, 2 * (bh * (bw + 1) + (bh + 1) * bw));
  let e = 0;
  for (let y = by0; y <= by1; y++) {
    const row = (y + 1) * pw + 1;
    for (let x = bx0; x <= bx1 + 1; x++) {
      if ((labels[row + x] === id) === (labels[row + x - 1] === id)) continue;
      const c = (y - by0) * cw + (x - bx0);
      edges[e++] = c; // (x - 0.5, y - 0.5) -> (x - 0.5, y + 0.5)
      edges[e++] = c + cw;
    }
  }
  for (let y = by0; y <= by1 + 1; y++) {
    const row = (y + 1) * pw + 1;
    for (let x = bx0; x <= bx1; x++) {
      if ((labels[row + x] === id) === (labels[row + x - pw] === id)) continue;
      const c = (y - by0) * cw + (x - bx0);
      edges[e++] = c; // (x - 0.5, y - 0.5) -> (x + 0.5, y - 0.5)
      edges[e++] = c + 1;
    }
  }
  // corners of the contour moved to the nearest corner of c + IDW(c); their extent bounds the target
  let kx0 = Infinity;
  let ky0 = Infinity;
  let kx1 = -Infinity;
  let ky1 = -Infinity;
  for (let t = 0; t < e; t++) {
    const c = edges[t];
    if (stamp[c]) continue;
    stamp[c] = 1;
    const cy = by0 + ((c / cw) | 0);
    const cx = bx0 + (c % cw);
    idwAt(cx - 0.5, cy - 0.5, h);
    const X = roundEven(cx - 0.5 + IDW[0] + 0.5);
    const Y = roundEven(cy - 0.5 + IDW[1] + 0.5);
    kx[c] = X;
    ky[c] = Y;
    if (X < kx0) kx0 = X;
    if (X > kx1) kx1 = X;
    if (Y < ky0) ky0 = Y;
    if (Y > ky1) ky1 = Y;
  }
  // even-odd fill at pixel centres: rows strictly between an edge's ends, columns [c0, c1], all
  // within the image grown by `margin`
  const ty0 = Math.max(-margin, ky0);
  const ty1 = Math.min(height - 1 + margin, ky1 - 1);
  const c0 = Math.min(width + margin, Math.max(-margin, kx0));
  const c1 = Math.min(width + margin, Math.max(-margin, kx1));
  const tx1 = Math.min(c1, width - 1 + margin);
  if (ty0 > ty1 || c0 > tx1) return { count: 0, box: [0, 0, -1, -1] };
  const tw = c1 - c0 + 1;
  const toggles = scratch("toggles", Int32Array, tw * (ty1 - ty0 + 1)).fill(0);
  for (let t = 0; t < e; t += 2) {
    const a = edges[t];
    const b = edges[t + 1];
    const x0 = kx[a] - 0.5;
    const y0 = ky[a] - 0.5;
    const x1 = kx[b] - 0.5;
    const y1 = ky[b] - 0.5;
    const first = Math.max(ty0, Math.min(ky[a], ky[b]));
    const last = Math.min(ty1, Math.max(ky[a], ky[b]) - 1);
    for (let r = first; r <= last; r++) {
      const crossing = x0 + ((r - y0) * (x1 - x0)) / (y1 - y0);
      const column = Math.min(width + margin, Math.max(-margin, Math.floor(crossing) + 1));
      toggles[(r - ty0) * tw + column - c0]++;
    }
  }
  // the target (padded by one cell for the boundary test) and its pixels, the queries, in raster order
  const fw = tx1 - c0 + 3;
  const target = scratch("target", Uint8Array, fw * (ty1 - ty0 + 3)).fill(0);
  const qx = scratch("qx", Int32Array, (tx1 - c0 + 1) * (ty1 - ty0 + 1));
  const qy = scratch("qy", Int32Array, (tx1 - c0 + 1) * (ty1 - ty0 + 1));
  let queries = 0;
  let qx0 = width;
  let qx1 = -1;
  let qy0 = height;
  let qy1 = -1;
  for (let y = ty0; y <= ty1; y++) {
    let parity = 0;
    const row = (y - ty0) * tw - c0;
    const frow = (y - ty0 + 1) * fw + 1 - c0;
    const inRows = y >= 0 && y < height;
    for (let x = c0; x <= tx1; x++) {
      parity = (parity + toggles[row + x]) & 1;
      if (!parity) continue;
      target[frow + x] = 1;
      if (!inRows || x < 0 || x >= width) continue;
      landed[y * width + x] = 1;
      qx[queries] = x;
      qy[queries] = y;
      queries++;
      if (x < qx0) qx0 = x;
      if (x > qx1) qx1 = x;
      if (y < qy0) qy0 = y;
      qy1 = y;
    }
  }
  if (!queries) return { count: 0, box: [0, 0, -1, -1] };
  if (band) {
    const spans = discSpans(radius);
    for (let y = ty0; y <= ty1; y++) {
      const frow = (y - ty0 + 1) * fw + 1 - c0;
      let previous = false; // the boundary pixel left of this one was stamped
      for (let x = c0; x <= tx1; x++) {
        const f = frow + x;
        const edge = target[f] && !(target[f - 1] && target[f + 1] && target[f - fw] && target[f + fw]);
        if (edge) stampDisc(band, width, height, x, y, spans, previous);
        previous = edge;
      }
    }
  }
  return { count: queries, box: [qx0, qy0, qx1, qy1], bandBox: [c0 - radius, ty0 - radius, tx1 + radius, ty1 + radius] };
}

/** Half-widths of the rows of the lattice disc dx^2 + dy^2 <= radius^2, for dy = 0..radius. */
function discSpans(radius) {
  return Int32Array.from({ length: radius + 1 }, (_, dy) => Math.floor(Math.sqrt(radius * radius - dy * dy)));
}

/**
 * Set the disc of `spans` (discSpans) around pixel (x, y), which may lie outside the image, in `band`.
 * With `after` (the same disc was stamped around (x - 1, y)) only the right end of each row is new.
 */
function stampDisc(band, width, height, x, y, spans, after) {
  const radius = spans.length - 1;
  for (let dy = -radius; dy <= radius; dy++) {
    const yy = y + dy;
    if (yy < 0 || yy >= height) continue;
    const reach = spans[dy < 0 ? -dy : dy];
    const from = Math.max(0, after ? x + reach : x - reach);
    const to = Math.min(width - 1, x + reach);
    for (let i = yy * width + from; i <= yy * width + to; i++) band[i] = 1;
  }
}

/**
 * Backward map of one region after forwardMap and movedTarget: every target pixel q takes the
 * colour (from `rgba`, into `out`) of round(q + b(q)), b the IDW over the NEAREST nearest moved
 * pixels (exact, ties by (|o|^2, dy, dx)) of the vectors back to their sources, one per moved pixel
 * (the source nearest a handle; ties: raster order). A source outside the image leaves q as it is
 * (an earlier region's paste, or its own colour) and sets q in `noSource`; a source inside clears it
 * (a later region overrides an earlier one).
 */
function backwardMap(forward, target, width, height, rgba, out, noSource) {
  const m = forward.count;
  const queries = target.count;
  const px = scratch("px", Int32Array, m);
  const py = scratch("py", Int32Array, m);
  const mx = scratch("mx", Int32Array, m);
  const my = scratch("my", Int32Array, m);
  const near = scratch("near", Float64Array, m);
  const qx = scratch("qx", Int32Array, queries);
  const qy = scratch("qy", Int32Array, queries);
  // one grid over the moved pixels and the target: a reference per moved cell, its back vector
  const [mx0, my0, mx1, my1] = forward.box;
  const [c0, ty0, tx1, ty1] = target.box;
  const gx0 = Math.min(mx0, c0);
  const gy0 = Math.min(my0, ty0);
  const gw = Math.max(mx1, tx1) - gx0 + 1;
  const gh = Math.max(my1, ty1) - gy0 + 1;
  // per cell c: grid[3c] = the reference (-1: none), grid[3c + 1..2] = its vector back to its source
  const grid = scratch("grid", Int32Array, 3 * gw * gh).fill(-1);
  let refs = 0;
  for (let j = 0; j < m; j++) {
    const c = 3 * ((my[j] - gy0) * gw + (mx[j] - gx0));
    const k = grid[c];
    if (k === -1) refs++;
    if (k === -1 || near[j] < near[k]) {
      grid[c] = j;
      grid[c + 1] = px[j] - mx[j];
      grid[c + 2] = py[j] - my[j];
    }
  }
  // every query: IDW over its `nearest` nearest references, walking the disc's offsets in order
  const nearest = Math.min(NEAREST, refs);
  let { dx: ddx, dy: ddy, weight } = DISC;
  for (let q = 0; q < queries; q++) {
    const x = qx[q];
    const y = qy[q];
    const ox = x - gx0;
    const oy = y - gy0;
    let found = 0;
    let sw = 0;
    let vx = 0;
    let vy = 0;
    for (let o = 0; found < nearest; o++) {
      if (o === ddx.length) {
        DISC = disc(DISC.radius * 2); // the grid bounds the search
        ({ dx: ddx, dy: ddy, weight } = DISC);
      }
      const cx = ox + ddx[o];
      const cy = oy + ddy[o];
      if (cx < 0 || cy < 0 || cx >= gw || cy >= gh) continue;
      const c = 3 * (cy * gw + cx);
      if (grid[c] < 0) continue;
      const w = weight[o];
      sw += w;
      vx += w * grid[c + 1];
      vy += w * grid[c + 2];
      found++;
    }
    const sx = roundEven(x + vx / sw);
    const sy = roundEven(y + vy / sw);
    const at = y * width + x;
    const valid = sx >= 0 && sx < width && sy >= 0 && sy < height;
    noSource[at] = valid ? 0 : 1;
    if (!valid) continue;
    const from = (sy * width + sx) * 4;
    out[at * 4] = rgba[from];
    out[at * 4 + 1] = rgba[from + 1];
    out[at * 4 + 2] = rgba[from + 2];
    out[at * 4 + 3] = rgba[from + 3];
  }
}

/**
 * Warp the masked regions of an RGBA image along the drag vectors.
 *
 * @param {object} input
 * @param {number} input.width
 * @param {number} input.height
 * @param {Uint8ClampedArray|Uint8Array} input.rgba  width*height*4 bytes
 * @param {Uint8Array|null} input.mask  width*height, 1 = editable; null or empty: the whole image
 * @param {number[][]} input.handles  [[x, y]] pixels, inside the image
 * @param {number[][]} input.targets  [[x, y]] pixels
 * @param {number} [input.band]  k of the inpaint mask (>= 0; even becomes the next odd)
 * @returns {{rgba: Uint8ClampedArray, inpaint: Uint8Array, source: Uint8Array, target: Uint8Array,
 *            movedPairs: number[], ignoredPairs: number[], stillRegions: number}}  fresh arrays
 * @throws {WarpInputError} no pair, a handle outside the image, or no handle inside the mask
 */
export function pixelWarp({ width, height, rgba, mask, handles, targets, band = DEFAULT_BAND }) {
  if (!handles.length || handles.length !== targets.length) {
    throw new WarpInputError("place at least one handle/target pair");
  }
  handles.forEach(([x, y], i) => {
    if (x < -0.5 || y < -0.5 || x >= width - 0.5 || y >= height - 0.5) {
      throw new WarpInputError(`handle ${i + 1} is outside the ${width}x${height} image`);
    }
  });
  const n = width * height;
  const pw = width + 2;
  const labels = scratch("labels", Int32Array, pw * (height + 2));
  let regions = mask ? labelPadded(mask, width, height, labels) : null;
  if (!regions || (!regions.count && !mask.some((v) => v))) {
    regions = labelPadded(new Uint8Array(n).fill(1), width, height, labels); // no mask: the whole image
  }
  const { count, boxes } = regions;
  const handleLabels = handles.map(([x, y]) => labels[(roundEven(y) + 1) * pw + roundEven(x) + 1]);
  const movedPairs = [];
  const ignoredPairs = [];
  handleLabels.forEach((label, i) => (label >= 0 ? movedPairs : ignoredPairs).push(i));
  if (!movedPairs.length) {
    throw new WarpInputError("no handle lies inside the mask, so nothing moves; paint the mask over the parts to move");
  }
  // OpenCV's contour order (the release's): bottom-up, so the upper region is pasted last and wins
  const regionIds = [...new Set(movedPairs.map((i) => handleLabels[i]))].sort((a, b) => b - a);
  const out = new Uint8ClampedArray(n * 4);
  out.set(rgba.length > n * 4 ? rgba.subarray(0, n * 4) : rgba);
  const source = new Uint8Array(n);
  const landed = new Uint8Array(n);
  const kernel = releasedBand(band);
  const radius = bandRadius(kernel);
  const bandMask = kernel ? scratch("bandMask", Uint8Array, n).fill(0) : null;
  const noSource = scratch("noSource", Uint8Array, n).fill(0);
  // the box holding every region and target: the inpaint mask is computed there
  let x0 = width;
  let y0 = height;
  let x1 = -1;
  let y1 = -1;
  const reached = [width, height, -1, -1]; // the box every band stamp lies in
  for (const id of regionIds) {
    const chosen = movedPairs.filter((i) => handleLabels[i] === id);
    const h = {
      n: chosen.length,
      x: Float64Array.from(chosen, (i) => handles[i][0]),
      y: Float64Array.from(chosen, (i) => handles[i][1]),
      dx: Float64Array.from(chosen, (i) => targets[i][0] - handles[i][0]),
      dy: Float64Array.from(chosen, (i) => targets[i][1] - handles[i][1]),
    };
    const box = boxes.slice(4 * id, 4 * id + 4);
    const forward = forwardMap(id, box, labels, width, h, source);
    const target = movedTarget(id, box, labels, width, height, h, landed, kernel ? radius + 1 : 0, radius, bandMask);
    if (target.count) {
      backwardMap(forward, target, width, height, rgba, out, noSource);
      for (let j = 0; j < 4; j++) reached[j] = (j < 2 ? Math.min : Math.max)(reached[j], target.bandBox[j]);
    }
    for (const [bx0, by0, bx1, by1] of [box, target.box]) {
      if (bx0 > bx1) continue;
      x0 = Math.min(x0, bx0);
      y0 = Math.min(y0, by0);
      x1 = Math.max(x1, bx1);
      y1 = Math.max(y1, by1);
    }
  }
  const inpaint = new Uint8Array(n);
  if (kernel) {
    const grow = scratch("grow", Uint8Array, n);
    for (let y = y0; y <= y1; y++) {
      for (let i = y * width + x0; i <= y * width + x1; i++) grow[i] = source[i] & (landed[i] ^ 1);
    }
    dilateBox(grow, inpaint, width, height, x0, y0, x1, y1, kernel >> 1);
    for (let y = Math.max(0, reached[1]); y <= Math.min(height - 1, reached[3]); y++) {
      const row = y * width;
      for (let x = Math.max(0, reached[0]); x <= Math.min(width - 1, reached[2]); x++) inpaint[row + x] |= bandMask[row + x];
    }
  } else {
    for (let y = y0; y <= y1; y++) {
      for (let i = y * width + x0; i <= y * width + x1; i++) inpaint[i] = source[i] & (landed[i] ^ 1);
    }
  }
  for (let y = y0; y <= y1; y++) {
    for (let i = y * width + x0; i <= y * width + x1; i++) inpaint[i] |= noSource[i];
  }
  return {
    rgba: out,
    inpaint,
    source,
    target: landed,
    movedPairs,
    ignoredPairs,
    stillRegions: count - regionIds.length,
  };
}
