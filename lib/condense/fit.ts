/**
 * The maps of `lckv condense`, fitted from calibration statistics, and the choice of which layers
 * read which.
 *
 * Layer j stops computing K/V and reads layer i's (i < j) through a map per K/V head:
 * - keys: K_j ≈ K_i A, with A one complex scalar a_f per RoPE frequency pair f (the pair of
 *   channels (f, f + headDim/2) read as the complex number k_f + i k_{f+half}). A scaled rotation
 *   commutes with RoPE's rotations, so A can be fitted on the cached (rotated) keys and folded into
 *   W_q (fold.ts). Least squares in closed form: a_f = Σ conj(z_i) z_j / Σ |z_i|².
 * - values: V_j ≈ V_i B, B a full headDim x headDim matrix: least squares, B = (V_iᵀV_i)⁻¹ V_iᵀV_j
 *   (with a tiny ridge), folded into W_o.
 * `share` is the baseline: A = B = I (layer j reads layer i's K/V as they are, KVSharer-like).
 */

/** Statistics of one (reader j, source i) pair of layers for one K/V head, summed over tokens. */
export interface PairStats {
  /** Σ conj(z_i) z_j per frequency pair: real and imaginary parts. */
  kCrossRe: Float64Array;
  kCrossIm: Float64Array;
  /** Σ |z_i|² and Σ |z_j|² per frequency pair. */
  kNormI: Float64Array;
  kNormJ: Float64Array;
  /** V_iᵀ V_i and V_iᵀ V_j, row-major headDim x headDim; Σ |v_j|². */
  vGramI: Float64Array;
  vCross: Float64Array;
  vNormJ: number;
}

export function emptyPairStats(headDim: number): PairStats {
  const half = headDim / 2;
  return {
    kCrossRe: new Float64Array(half),
    kCrossIm: new Float64Array(half),
    kNormI: new Float64Array(half),
    kNormJ: new Float64Array(half),
    vGramI: new Float64Array(headDim * headDim),
    vCross: new Float64Array(headDim * headDim),
    vNormJ: 0,
  };
}

/**
 * Adds tokens to a pair's statistics: ki, kj, vi, vj hold `tokens` rows of one K/V head each
 * (row t at t * stride + offset, headDim values).
 */
export function accumulatePair(s: PairStats, headDim: number, tokens: number, stride: number, offset: number, ki: Float32Array, kj: Float32Array, vi: Float32Array, vj: Float32Array): void {
  const half = headDim / 2;
  for (let t = 0; t < tokens; t++) {
    const b = t * stride + offset;
    for (let f = 0; f < half; f++) {
      const ar = ki[b + f], ai = ki[b + f + half], br = kj[b + f], bi = kj[b + f + half];
      s.kCrossRe[f] += ar * br + ai * bi;
      s.kCrossIm[f] += ar * bi - ai * br;
      s.kNormI[f] += ar * ar + ai * ai;
      s.kNormJ[f] += br * br + bi * bi;
    }
    for (let r = 0; r < headDim; r++) {
      const x = vi[b + r];
      if (x === 0) continue;
      const row = r * headDim;
      for (let c = 0; c < headDim; c++) {
        s.vGramI[row + c] += x * vi[b + c];
        s.vCross[row + c] += x * vj[b + c];
      }
    }
    for (let c = 0; c < headDim; c++) s.vNormJ += vj[b + c] * vj[b + c];
  }
}

/** The fitted map of one pair and K/V head, and its relative residuals on the calibration tokens. */
export interface PairFit {
  /** a_f (real, imaginary) per frequency pair. */
  aRe: Float64Array;
  aIm: Float64Array;
  /** B, row-major headDim x headDim (row r: input channel r of V_i). */
  b: Float64Array;
  /** Residual over Σ|K_j|² and over Σ|V_j|²: 0 when the map is exact, 1 when it explains nothing. */
  kError: number;
  vError: number;
}

export type CondenseMethod = "linear" | "share";

export function fitPair(s: PairStats, headDim: number, method: CondenseMethod): PairFit {
  const half = headDim / 2;
  const aRe = new Float64Array(half), aIm = new Float64Array(half);
  let kRes = 0, kTot = 0;
  for (let f = 0; f < half; f++) {
    kTot += s.kNormJ[f];
    if (method === "share") {
      aRe[f] = 1;
      kRes += s.kNormJ[f] + s.kNormI[f] - 2 * s.kCrossRe[f];
    } else if (s.kNormI[f] > 0) {
      aRe[f] = s.kCrossRe[f] / s.kNormI[f];
      aIm[f] = s.kCrossIm[f] / s.kNormI[f];
      kRes += s.kNormJ[f] - (s.kCrossRe[f] ** 2 + s.kCrossIm[f] ** 2) / s.kNormI[f];
    } else {
      kRes += s.kNormJ[f];
    }
  }
  let b: Float64Array;
  let vRes: number;
  if (method === "share") {
    b = identity(headDim);
    let gramTrace = 0, crossTrace = 0;
    for (let r = 0; r < headDim; r++) {
      gramTrace += s.vGramI[r * headDim + r];
      crossTrace += s.vCross[r * headDim + r];
    }
    vRes = s.vNormJ + gramTrace - 2 * crossTrace;
  } else {
    b = solveRidge(s.vGramI, s.vCross, headDim);
    // Residual Σ|V_j - V_i B|² = Σ|V_j|² - 2 tr(Bᵀ C) + tr(Bᵀ G B), with G = V_iᵀV_i, C = V_iᵀV_j.
    let cross = 0, quad = 0;
    for (let r = 0; r < headDim; r++)
      for (let c = 0; c < headDim; c++) {
        cross += b[r * headDim + c] * s.vCross[r * headDim + c];
        let gb = 0;
        for (let k = 0; k < headDim; k++) gb += s.vGramI[r * headDim + k] * b[k * headDim + c];
        quad += b[r * headDim + c] * gb;
      }
    vRes = s.vNormJ - 2 * cross + quad;
  }
  return {
    aRe,
    aIm,
    b,
    kError: kTot > 0 ? Math.max(0, kRes) / kTot : 0,
    vError: s.vNormJ > 0 ? Math.max(0, vRes) / s.vNormJ : 0,
  };
}

function identity(n: number): Float64Array {
  const m = new Float64Array(n * n);
  for (let i = 0; i < n; i++) m[i * n + i] = 1;
  return m;
}

/** X = (G + λI)⁻¹ C for symmetric positive semi-definite G (Cholesky), λ a 1e-6 share of G's mean diagonal. */
export function solveRidge(g: Float64Array, c: Float64Array, n: number): Float64Array {
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
  const x = new Float64Array(n * n);
  const y = new Float64Array(n);
  for (let col = 0; col < n; col++) {
    for (let i = 0; i < n; i++) {  // L y = c[:, col]
      let sum = c[i * n + col];
      for (let k = 0; k < i; k++) sum -= l[i * n + k] * y[k];
      y[i] = sum / l[i * n + i];
    }
    for (let i = n - 1; i >= 0; i--) {  // Lᵀ x = y
      let sum = y[i];
      for (let k = i + 1; k < n; k++) sum -= l[k * n + i] * x[k * n + col];
      x[i * n + col] = sum / l[i * n + i];
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
