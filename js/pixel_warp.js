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
// 4. inpaint mask = dilate(S and not T, k x k) or dilate(boundary(T), k x k) or (no source).
// Python computes the geometry in float32, this port in float64: a point within ~1e-6 of a rounding
// boundary may land one pixel apart (tests/test_editor_js.py states the tolerance).

export const NEAREST = 4;
export const DEFAULT_BAND = 5;
const IDW_EPS = 1e-6;

/** round half to even, as torch.round. */
function roundEven(v) {
  const r = Math.round(v);
  return Math.abs(v % 1) === 0.5 ? 2 * Math.round(v / 2) : r;
}

/** An error of the warp's input: the message is for the user (the editor shows it). */
export class WarpInputError extends Error {}

/** The kernel the released code uses for `band`: an even value becomes the next odd one, 0 stays 0. */
export function releasedBand(band) {
  return band > 0 && band % 2 === 0 ? band + 1 : band;
}

// -- regions -----------------------------------------------------------------------------------

const CROSS = [[-1, 0], [1, 0], [0, -1], [0, 1]];
const RING = [...CROSS, [-1, -1], [-1, 1], [1, -1], [1, 1]];

/** Label connected components of the set cells of `inside` (w*h bytes); labels in raster order of first cells, -1 elsewhere. */
function components(w, h, inside, neighbours) {
  const labels = new Int32Array(w * h).fill(-1);
  const stack = new Int32Array(w * h);
  const dxs = neighbours.map((d) => d[0]);
  const dys = neighbours.map((d) => d[1]);
  const m = neighbours.length;
  let count = 0;
  for (let start = 0; start < w * h; start++) {
    if (labels[start] !== -1 || !inside[start]) continue;
    let top = 0;
    stack[top++] = start;
    labels[start] = count;
    while (top) {
      const i = stack[--top];
      const x = i % w;
      const y = (i - x) / w;
      for (let t = 0; t < m; t++) {
        const nx = x + dxs[t];
        const ny = y + dys[t];
        if (nx < 0 || ny < 0 || nx >= w || ny >= h) continue;
        const j = ny * w + nx;
        if (labels[j] === -1 && inside[j]) {
          labels[j] = count;
          stack[top++] = j;
        }
      }
    }
    count++;
  }
  return { labels, count };
}

/** Regions of an editable mask: {labels (Int32Array, -1 outside), count}. */
export function regionLabels(editable, width, height) {
  // holes: background the image border cannot reach, 4-connected (a one-pixel frame around the image)
  const fw = width + 2;
  const fh = height + 2;
  const background = new Uint8Array(fw * fh).fill(1);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) background[(y + 1) * fw + x + 1] = editable[y * width + x] ? 0 : 1;
  }
  const outside = components(fw, fh, background, CROSS).labels;
  const filled = new Uint8Array(width * height);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) filled[y * width + x] = outside[(y + 1) * fw + x + 1] === 0 ? 0 : 1;
  }
  return components(width, height, filled, RING);
}

// -- inverse-distance interpolation ----------------------------------------------------------

const SMALL = new Float64Array(4);
const ALL = [0, 1, 2, 3, 4].map((n) => [...Array(n).keys()]);

/** IDW over the `k` nearest of `refs` ([x, y]) of `vecs` ([dx, dy]) at (px, py); returns [vx, vy, nearest distance]. */
function idwPoint(px, py, refs, vecs, k) {
  const n = refs.length;
  const dist = n <= 4 ? SMALL : new Float64Array(n);
  let closest = Infinity;
  for (let j = 0; j < n; j++) {
    dist[j] = Math.hypot(px - refs[j][0], py - refs[j][1]);
    closest = Math.min(closest, dist[j]);
  }
  const chosen = n <= k ? ALL[n] : [...Array(n).keys()].sort((a, b) => dist[a] - dist[b] || a - b).slice(0, k);
  let sw = 0;
  let vx = 0;
  let vy = 0;
  for (const j of chosen) {
    const w = 1 / (dist[j] + IDW_EPS);
    sw += w;
    vx += w * vecs[j][0];
    vy += w * vecs[j][1];
  }
  return [vx / sw, vy / sw, closest];
}

/** Lattice offsets with |o| <= radius, ordered by (|o|^2, dy, dx): {dx, dy (Int32Array), weight (1/(|o| + eps))}. */
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
    dx: Int32Array.from(all, (o) => o[0]),
    dy: Int32Array.from(all, (o) => o[1]),
    weight: Float64Array.from(all, (o) => 1 / (Math.sqrt(o[2]) + IDW_EPS)),
  };
}

/**
 * IDW at integer `queries` over their exact `k` nearest integer references (one per cell), walking
 * lattice offsets in (|o|^2, dy, dx) order. Returns Float64Array(2 * Q).
 */
function gridIdw(queries, refs, vecs, k) {
  const nearest = Math.min(k, refs.length);
  let x0 = Infinity;
  let y0 = Infinity;
  let x1 = -Infinity;
  let y1 = -Infinity;
  for (const [x, y] of [...refs, ...queries]) {
    x0 = Math.min(x0, x);
    y0 = Math.min(y0, y);
    x1 = Math.max(x1, x);
    y1 = Math.max(y1, y);
  }
  const gw = x1 - x0 + 1;
  const gh = y1 - y0 + 1;
  const cell = new Int32Array(gw * gh).fill(-1);
  refs.forEach(([x, y], j) => {
    cell[(y - y0) * gw + (x - x0)] = j;
  });
  const vx0 = Float64Array.from(vecs, (v) => v[0]);
  const vy0 = Float64Array.from(vecs, (v) => v[1]);
  const out = new Float64Array(queries.length * 2);
  let radius = 2;
  let offsets = disc(radius);
  queries.forEach(([qx, qy], q) => {
    for (;;) {
      let found = 0;
      let sw = 0;
      let vx = 0;
      let vy = 0;
      const { dx, dy, weight } = offsets;
      for (let o = 0; o < dx.length; o++) {
        const x = qx + dx[o] - x0;
        const y = qy + dy[o] - y0;
        if (x < 0 || y < 0 || x >= gw || y >= gh) continue;
        const j = cell[y * gw + x];
        if (j < 0) continue;
        const w = weight[o];
        sw += w;
        vx += w * vx0[j];
        vy += w * vy0[j];
        if (++found === nearest) break;
      }
      if (found === nearest) {
        out[2 * q] = vx / sw;
        out[2 * q + 1] = vy / sw;
        return;
      }
      radius *= 2; // the disc did not hold k references: a larger one (the grid bounds the search)
      offsets = disc(radius);
    }
  });
  return out;
}

// -- contours, fill, masks -----------------------------------------------------------------------

/** Edges [[x0, y0], [x1, y1]] (half-integer corners) between `region` (w*h bytes) and the rest. */
function contourEdges(region, width, height) {
  const at = (x, y) => x >= 0 && y >= 0 && x < width && y < height && region[y * width + x] === 1;
  const edges = [];
  for (let y = 0; y < height; y++) {
    for (let x = 0; x <= width; x++) {
      if (at(x, y) !== at(x - 1, y)) edges.push([[x - 0.5, y - 0.5], [x - 0.5, y + 0.5]]);
    }
  }
  for (let y = 0; y <= height; y++) {
    for (let x = 0; x < width; x++) {
      if (at(x, y) !== at(x, y - 1)) edges.push([[x - 0.5, y - 0.5], [x + 0.5, y - 0.5]]);
    }
  }
  return edges;
}

/** Even-odd fill of closed polygons given as edges, at pixel centres, clipped to the image. */
function fillPolygons(edges, width, height) {
  const toggles = new Int32Array(height * (width + 1));
  for (const [[x0, y0], [x1, y1]] of edges) {
    const first = Math.max(0, Math.ceil(Math.min(y0, y1)));
    const last = Math.min(height - 1, Math.ceil(Math.max(y0, y1)) - 1);
    for (let r = first; r <= last; r++) {
      const crossing = x0 + ((r - y0) * (x1 - x0)) / (y1 - y0);
      const column = Math.min(width, Math.max(0, Math.floor(crossing) + 1));
      toggles[r * (width + 1) + column]++;
    }
  }
  const out = new Uint8Array(width * height);
  for (let y = 0; y < height; y++) {
    let parity = 0;
    for (let x = 0; x < width; x++) {
      parity += toggles[y * (width + 1) + x];
      out[y * width + x] = parity % 2;
    }
  }
  return out;
}

/** Pixels of `region` with a 4-neighbour inside the image that is not in it. */
function boundary(region, width, height) {
  const out = new Uint8Array(width * height);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (!region[y * width + x]) continue;
      for (const [dx, dy] of CROSS) {
        const nx = x + dx;
        const ny = y + dy;
        if (nx >= 0 && ny >= 0 && nx < width && ny < height && !region[ny * width + nx]) {
          out[y * width + x] = 1;
          break;
        }
      }
    }
  }
  return out;
}

/** A w*h byte mask dilated by a kernel x kernel square (odd kernel), clipped to the image. */
export function dilate(mask, width, height, kernel) {
  const reach = kernel >> 1;
  const rows = new Uint8Array(width * height);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (!mask[y * width + x]) continue;
      for (let d = Math.max(0, x - reach); d <= Math.min(width - 1, x + reach); d++) rows[y * width + d] = 1;
    }
  }
  const out = new Uint8Array(width * height);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (!rows[y * width + x]) continue;
      for (let d = Math.max(0, y - reach); d <= Math.min(height - 1, y + reach); d++) out[d * width + x] = 1;
    }
  }
  return out;
}

// -- the warp ------------------------------------------------------------------------------------

/** One region's forward and backward map: {target (w*h bytes), queries [[x, y]], sources [[x, y]]}. */
function moveRegion(region, width, height, handles, drags) {
  const pixels = [];
  for (let i = 0; i < width * height; i++) if (region[i]) pixels.push([i % width, Math.floor(i / width)]);
  const moved = [];
  const handleDistance = [];
  for (const [x, y] of pixels) {
    const [dx, dy, closest] = idwPoint(x, y, handles, drags, NEAREST);
    moved.push([roundEven(x + dx), roundEven(y + dy)]);
    handleDistance.push(closest);
  }
  const cornerMoves = new Map(); // corner index on the (width+1) x (height+1) lattice -> moved corner
  const moveCorner = ([cx, cy]) => {
    const key = (cy + 0.5) * (width + 1) + (cx + 0.5);
    let m = cornerMoves.get(key);
    if (!m) {
      const [dx, dy] = idwPoint(cx, cy, handles, drags, NEAREST);
      m = [roundEven(cx + dx + 0.5) - 0.5, roundEven(cy + dy + 0.5) - 0.5];
      cornerMoves.set(key, m);
    }
    return m;
  };
  const edges = contourEdges(region, width, height).map(([a, b]) => [moveCorner(a), moveCorner(b)]);
  const target = fillPolygons(edges, width, height);
  const queries = [];
  for (let i = 0; i < width * height; i++) if (target[i]) queries.push([i % width, Math.floor(i / width)]);
  // one reference per moved pixel: the source pixel nearest a handle (ties: earlier in raster order)
  let mx0 = Infinity;
  let my0 = Infinity;
  let mx1 = -Infinity;
  let my1 = -Infinity;
  for (const [x, y] of moved) {
    mx0 = Math.min(mx0, x);
    my0 = Math.min(my0, y);
    mx1 = Math.max(mx1, x);
    my1 = Math.max(my1, y);
  }
  const mw = mx1 - mx0 + 1;
  const best = new Int32Array(mw * (my1 - my0 + 1)).fill(-1);
  moved.forEach(([x, y], j) => {
    const c = (y - my0) * mw + (x - mx0);
    const k = best[c];
    if (k === -1 || handleDistance[j] < handleDistance[k]) best[c] = j;
  });
  const kept = Array.from(best).filter((j) => j >= 0).sort((a, b) => a - b);
  const refs = kept.map((j) => moved[j]);
  const back = kept.map((j) => [pixels[j][0] - moved[j][0], pixels[j][1] - moved[j][1]]);
  const step = queries.length ? gridIdw(queries, refs, back, NEAREST) : new Float64Array(0);
  const sources = queries.map(([x, y], q) => [roundEven(x + step[2 * q]), roundEven(y + step[2 * q + 1])]);
  return { target, queries, sources };
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
 *            movedPairs: number[], ignoredPairs: number[], stillRegions: number}}
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
  let editable = mask && mask.some((v) => v) ? mask : null;
  if (!editable) editable = new Uint8Array(width * height).fill(1);
  const { labels, count } = regionLabels(editable, width, height);
  const handleLabels = handles.map(([x, y]) => labels[roundEven(y) * width + roundEven(x)]);
  const movedPairs = [];
  const ignoredPairs = [];
  handleLabels.forEach((label, i) => (label >= 0 ? movedPairs : ignoredPairs).push(i));
  if (!movedPairs.length) {
    throw new WarpInputError("no handle lies inside the mask, so nothing moves; paint the mask over the parts to move");
  }
  const regionIds = [...new Set(movedPairs.map((i) => handleLabels[i]))].sort((a, b) => a - b);
  const n = width * height;
  const index = new Int32Array(n);
  for (let i = 0; i < n; i++) index[i] = i;
  const noSource = new Uint8Array(n);
  const source = new Uint8Array(n);
  const landed = new Uint8Array(n);
  const edges = new Uint8Array(n);
  for (const id of regionIds) {
    const region = new Uint8Array(n);
    for (let i = 0; i < n; i++) region[i] = labels[i] === id ? 1 : 0;
    const chosen = movedPairs.filter((i) => handleLabels[i] === id);
    const hs = chosen.map((i) => handles[i]);
    const ds = chosen.map((i) => [targets[i][0] - handles[i][0], targets[i][1] - handles[i][1]]);
    const { target, queries, sources } = moveRegion(region, width, height, hs, ds);
    const edge = boundary(target, width, height);
    for (let i = 0; i < n; i++) {
      source[i] |= region[i];
      landed[i] |= target[i];
      edges[i] |= edge[i];
    }
    queries.forEach(([x, y], q) => {
      const [sx, sy] = sources[q];
      const valid = sx >= 0 && sx < width && sy >= 0 && sy < height;
      const at = y * width + x;
      index[at] = valid ? sy * width + sx : at;
      noSource[at] = valid ? 0 : 1;
    });
  }
  const out = new Uint8ClampedArray(n * 4);
  for (let i = 0; i < n; i++) {
    const from = index[i] * 4;
    out[i * 4] = rgba[from];
    out[i * 4 + 1] = rgba[from + 1];
    out[i * 4 + 2] = rgba[from + 2];
    out[i * 4 + 3] = rgba[from + 3];
  }
  let uncovered = new Uint8Array(n);
  for (let i = 0; i < n; i++) uncovered[i] = source[i] && !landed[i] ? 1 : 0;
  const kernel = releasedBand(band);
  if (kernel) {
    const grown = dilate(uncovered, width, height, kernel);
    const band_ = dilate(edges, width, height, kernel);
    for (let i = 0; i < n; i++) grown[i] |= band_[i];
    uncovered = grown;
  }
  for (let i = 0; i < n; i++) uncovered[i] |= noSource[i];
  return {
    rgba: out,
    inpaint: uncovered,
    source,
    target: landed,
    movedPairs,
    ignoredPairs,
    stillRegions: count - regionIds.length,
  };
}
