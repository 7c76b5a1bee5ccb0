/**
 * The maps of `lckv condense`, fitted from calibration statistics, and the choice of which layers
 * read which.
 *
 * Layer j stops computing K/V and reads layer i's (i < j) through a map per K/V head. Two styles:
 * - "rope" (Llama, Mistral): keys K_j ≈ K_i A, with A one complex scalar a_f per RoPE frequency
 *   pair f (the pair of channels (f, f + headDim/2) read as the complex number
 *   k_f + i k_{f+half}). A scaled rotation commutes with RoPE's rotations, so A can be fitted on
 *   the cached (rotated) keys and folded into W_q (fold.ts). Least squares in closed form:
 *   a_f = Σ conj(z_i) z_j / Σ |z_i|². Values V_j ≈ V_i B, B a full headDim x headDim matrix.
 * - "affine" (GPT-2: learned absolute positions, biased projections): keys and values both
 *   K_j ≈ K_i A + c, V_j ≈ V_i B + e, with full matrices and offsets, fitted on [K_i, 1] and
 *   [V_i, 1]. The key offset adds q·c to every score of a query, the same for every key, so it
 *   cancels in the softmax; the value offset passes through the attention unchanged (its weights
 *   sum to 1) and folds into the output projection's bias.
 * Full matrices: least squares with a tiny ridge, X = (XᵢᵀXᵢ + λI)⁻¹ XᵢᵀX_j.
 * `share` is the baseline: A = B = I, no offsets (layer j reads layer i's K/V as they are,
 * KVSharer-like).
 */

export type MapStyle = "rope" | "affine";

/** Σ over tokens for a full-matrix fit Y ≈ [X, 1?] M: Gram of the inputs, inputs × outputs, Σ|Y|². */
export interface MatrixStats {
  kind: "matrix";
  /** headDim, plus one for the constant column when an offset is fitted. */
  width: number;
  gram: Float64Array;
  cross: Float64Array;
  normJ: number;
}

/** Σ over tokens for the complex scalar per frequency pair: Σ conj(z_i) z_j, Σ|z_i|², Σ|z_j|². */
export interface RopeStats {
  kind: "rope";
  crossRe: Float64Array;
  crossIm: Float64Array;
  normI: Float64Array;
  normJ: Float64Array;
}

/** Statistics of one (reader j, source i) pair of layers for one K/V head. */
export interface PairStats {
  keys: RopeStats | MatrixStats;
  values: MatrixStats;
}

function emptyMatrixStats(headDim: number, offset: boolean): MatrixStats {
  const width = headDim + (offset ? 1 : 0);
  return { kind: "matrix", width, gram: new Float64Array(width * width), cross: new Float64Array(width * headDim), normJ: 0 };
}

export function emptyPairStats(headDim: number, style: MapStyle = "rope"): PairStats {
  const half = headDim / 2;
  const keys: RopeStats | MatrixStats =
    style === "rope"
      ? { kind: "rope", crossRe: new Float64Array(half), crossIm: new Float64Array(half), normI: new Float64Array(half), normJ: new Float64Array(half) }
      : emptyMatrixStats(headDim, true);
  return { keys, values: emptyMatrixStats(headDim, style === "affine") };
}

/**
 * Adds tokens to a pair's statistics: ki, kj, vi, vj hold `tokens` rows of one K/V head each
 * (row t at t * stride + offset, headDim values).
 */
export function accumulatePair(s: PairStats, headDim: number, tokens: number, stride: number, offset: number, ki: Float32Array, kj: Float32Array, vi: Float32Array, vj: Float32Array): void {
  const half = headDim / 2;
  for (let t = 0; t < tokens; t++) {
    const b = t * stride + offset;
    const k = s.keys;
    if (k.kind === "rope") {
      for (let f = 0; f < half; f++) {
        const ar = ki[b + f], ai = ki[b + f + half], br = kj[b + f], bi = kj[b + f + half];
        k.crossRe[f] += ar * br + ai * bi;
        k.crossIm[f] += ar * bi - ai * br;
        k.normI[f] += ar * ar + ai * ai;
        k.normJ[f] += br * br + bi * bi;
      }
    } else {
      accumulateMatrix(k, headDim, b, ki, kj);
    }
    accumulateMatrix(s.values, headDim, b, vi, vj);
  }
}

function accumulateMatrix(s: MatrixStats, d: number, b: number, xi: Float32Array, xj: Float32Array): void {
  const w = s.width;
  for (let r = 0; r < w; r++) {
    const x = r < d ? xi[b + r] : 1;  // row d: the constant input of the offset
    if (x === 0) continue;
    const g = r * w, c = r * d;
    for (let q = 0; q < d; q++) {
      s.gram[g + q] += x * xi[b + q];
      s.cross[c + q] += x * xj[b + q];
    }
    if (w > d) s.gram[g + d] += x;
  }
  for (let q = 0; q < d; q++) s.normJ += xj[b + q] * xj[b + q];
}

/** Keys of the rope style: a_f = re[f] + i im[f] per frequency pair. */
export interface RopeMap {
  kind: "rope";
  re: Float64Array;
  im: Float64Array;
}

/** Y ≈ X m + offset: m row-major headDim x headDim (row r: input channel r), offset null when not fitted. */
export interface MatrixMap {
  kind: "matrix";
  m: Float64Array;
  offset: Float64Array | null;
}

/** The fitted maps of one pair and K/V head, and their relative residuals on the calibration tokens. */
export interface PairFit {
  keys: RopeMap | MatrixMap;
  values: MatrixMap;
  /** Residual over Σ|K_j|² and over Σ|V_j|²: 0 when the map is exact, 1 when it explains nothing. */
  kError: number;
  vError: number;
}

export type CondenseMethod = "linear" | "share";

export function fitPair(s: PairStats, headDim: number, method: CondenseMethod): PairFit {
  const k = s.keys.kind === "rope" ? fitRope(s.keys, headDim, method) : fitMatrix(s.keys, headDim, method);
  const v = fitMatrix(s.values, headDim, method);
  return { keys: k.map, values: v.map, kError: k.error, vError: v.error };
}

function fitRope(s: RopeStats, headDim: number, method: CondenseMethod): { map: RopeMap; error: number } {
  const half = headDim / 2;
  const re = new Float64Array(half), im = new Float64Array(half);
  let res = 0, tot = 0;
  for (let f = 0; f < half; f++) {
    tot += s.normJ[f];
    if (method === "share") {
      re[f] = 1;
      res += s.normJ[f] + s.normI[f] - 2 * s.crossRe[f];
    } else if (s.normI[f] > 0) {
      re[f] = s.crossRe[f] / s.normI[f];
      im[f] = s.crossIm[f] / s.normI[f];
      res += s.normJ[f] - (s.crossRe[f] ** 2 + s.crossIm[f] ** 2) / s.normI[f];
    } else {
      res += s.normJ[f];
    }
  }
  return { map: { kind: "rope", re, im }, error: tot > 0 ? Math.max(0, res) / tot : 0 };
}

function fitMatrix(s: MatrixStats, d: number, method: CondenseMethod): { map: MatrixMap; error: number } {
  const w = s.width;
  // X: w x d, rows 0..d-1 the matrix, row d (when fitted) the offset.
  const x = method === "share" ? identityRows(w, d) : solveRidge(s.gram, s.cross, w, d);
  // Residual Σ|Y - [X_i, 1] X|² = Σ|Y|² - 2 tr(Xᵀ C) + tr(Xᵀ G X), with G the Gram and C the cross sums.
  let cross = 0, quad = 0;
  for (let r = 0; r < w; r++)
    for (let c = 0; c < d; c++) {
      cross += x[r * d + c] * s.cross[r * d + c];
      let gx = 0;
      for (let q = 0; q < w; q++) gx += s.gram[r * w + q] * x[q * d + c];
      quad += x[r * d + c] * gx;
    }
  const res = s.normJ - 2 * cross + quad;
  const map: MatrixMap = { kind: "matrix", m: x.slice(0, d * d), offset: w > d ? x.slice(d * d, (d + 1) * d) : null };
  return { map, error: s.normJ > 0 ? Math.max(0, res) / s.normJ : 0 };
}

/** The w x d matrix whose first d rows are the identity (a constant row, if any, zero). */
function identityRows(w: number, d: number): Float64Array {
  const m = new Float64Array(w * d);
  for (let i = 0; i < d; i++) m[i * d + i] = 1;
  return m;
}

/** X = (G + λI)⁻¹ C for symmetric positive semi-definite G (n x n, Cholesky) and C (n x cols), λ a 1e-6 share of G's mean diagonal. */
export function solveRidge(g: Float64Array, c: Float64Array, n: number, cols = n): Float64Array {
  let trace = 0;
  for (let i = 0; i < n; i++) trace += g[i * n + i];
  const lambda = Math.max(1e-12, (1e-6 * trace) / n);
  const l = new Float64Array(n * n);
  for (let i = 0; i < n; i++) {
    for (let j = 0; j <= i; j++) {
      let sum = g[i * n + j] + (i === j ? lambda : 0);
      for (let k = 0; k < j; k++) sum -= l[i * n + k] * l[j * n + k];
      l[i * n + j] = i === j ? Math.sqrt(Math.max(sum, lambda)) : sum / l[j * n + j];
    }
  }
  const x = new Float64Array(n * cols);
  const y = new Float64Array(n);
  for (let col = 0; col < cols; col++) {
    for (let i = 0; i < n; i++) {  // L y = c[:, col]
      let sum = c[i * cols + col];
      for (let k = 0; k < i; k++) sum -= l[i * n + k] * y[k];
      y[i] = sum / l[i * n + i];
    }
    for (let i = n - 1; i >= 0; i--) {  // Lᵀ x = y
      let sum = y[i];
      for (let k = i + 1; k < n; k++) sum -= l[k * n + i] * x[k * cols + col];
      x[i * cols + col] = sum / l[i * n + i];
    }
  }
  return x;
}
/** A reader layer, the layer it reads, and the pair's error (the mean of K's and V's over K/V heads). */
export interface Choice {
  reader: number;
  source: number;
  error: number;
}

/**
 * Which layers read which: starting from every layer caching its own K/V, repeatedly turns the
 * caching layer j whose K/V a lower caching layer i reproduces at the least cost into a reader of
 * i, until `keep` layers cache. When other layers read j, they are moved to read i too, and the
 * cost counts how much their errors grow. Layer 0 always keeps its K/V. `error(j, i)` is
 * undefined for a pair that was not measured (a move that needs one is not made). Returns each
 * reader with the layer it finally reads and that pair's error, in layer order.
 */
export function chooseReaders(numLayers: number, keep: number, error: (reader: number, source: number) => number | undefined): Choice[] {
  const target = Array.from({ length: numLayers }, (_, i) => i);
  let caching = numLayers;
  while (caching > keep) {
    let best: { j: number; i: number; cost: number } | null = null;
    for (let j = 1; j < numLayers; j++) {
      if (target[j] !== j) continue;
      const readers = target.flatMap((t, r) => (t === j && r !== j ? [r] : []));
      for (let i = 0; i < j; i++) {
        if (target[i] !== i) continue;
        let cost = error(j, i);
        for (const r of readers) {
          const now = error(r, i), before = error(r, j);
          cost = cost === undefined || now === undefined || before === undefined ? undefined : cost + now - before;
        }
        if (cost !== undefined && (best === null || cost < best.cost)) best = { j, i, cost };
      }
    }
    if (best === null) break;
    for (let r = 0; r < numLayers; r++) if (target[r] === best.j) target[r] = best.i;
    caching--;
  }
  return target.flatMap((t, j) => (t === j ? [] : [{ reader: j, source: t, error: error(j, t)! }]));
}
