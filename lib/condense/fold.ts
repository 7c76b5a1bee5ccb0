/**
 * Folding the maps of fit.ts into a reader layer's weights, so that the condensed model is an
 * ordinary `layer_types` model that runs on every kernel unchanged.
 *
 * Keys, per K/V head g and frequency pair f (channels f and f + half of a head, read as the
 * complex number Q = q_f + i q_{f+half}): a query's score against layer i's key mapped by a_f is
 * Re(conj(Q) a K_i) = Re(conj(conj(a) Q) K_i), so every query head of group g multiplies its
 * pair by conj(a_f): q'_f = ar q_f + ai q_{f+half}, q'_{f+half} = -ai q_f + ar q_{f+half}. The
 * rows of W_q (and its bias) combine likewise; RoPE, a rotation of the same pair, commutes.
 *
 * Values: a head's output over V_i B is (its output over V_i) B, and W_o takes the heads'
 * outputs as its input columns, so W_o'[:, r] = Σ_c W_o[:, c] B[r][c] within each head's block.
 */
import type { PairFit } from "./fit";

export interface AttentionShape {
  hidden: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
}

/** W_q [numHeads * headDim, hidden] (row-major), or its bias (hidden = 1), folded with each K/V head's a. */
export function foldQuery(wq: Float32Array, s: AttentionShape, fits: PairFit[], cols = s.hidden): Float32Array {
  const out = new Float32Array(wq.length);
  const half = s.headDim / 2, group = s.numHeads / s.numKvHeads;
  for (let h = 0; h < s.numHeads; h++) {
    const fit = fits[Math.floor(h / group)];
    for (let f = 0; f < half; f++) {
      const ar = fit.aRe[f], ai = fit.aIm[f];
      const lo = (h * s.headDim + f) * cols, hi = (h * s.headDim + f + half) * cols;
      for (let c = 0; c < cols; c++) {
        const x = wq[lo + c], y = wq[hi + c];
        out[lo + c] = ar * x + ai * y;
        out[hi + c] = -ai * x + ar * y;
      }
    }
  }
  return out;
}

/** W_o [hidden, numHeads * headDim] (row-major) folded with each K/V head's B. */
export function foldOutput(wo: Float32Array, s: AttentionShape, fits: PairFit[]): Float32Array {
  const out = new Float32Array(wo.length);
  const d = s.headDim, group = s.numHeads / s.numKvHeads, width = s.numHeads * d;
  for (let row = 0; row < s.hidden; row++) {
    for (let h = 0; h < s.numHeads; h++) {
      const b = fits[Math.floor(h / group)].b;
      const base = row * width + h * d;
      for (let r = 0; r < d; r++) {
        let acc = 0;
        for (let c = 0; c < d; c++) acc += wo[base + c] * b[r * d + c];
        out[base + r] = acc;
      }
    }
  }
  return out;
}
