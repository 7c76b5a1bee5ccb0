/**
 * Folding the maps of fit.ts into a reader layer's weights, so that the condensed model is an
 * ordinary `layer_types` model that runs on every kernel unchanged. Weights here are in the
 * [out, in] layout (Llama's; fold of GPT-2's Conv1D [in, out] weights transposes around these).
 *
 * Keys, rope style, per K/V head g and frequency pair f (channels f and f + half of a head, read
 * as the complex number Q = q_f + i q_{f+half}): a query's score against layer i's key mapped by
 * a_f is Re(conj(Q) a K_i) = Re(conj(conj(a) Q) K_i), so every query head of group g multiplies
 * its pair by conj(a_f): q'_f = ar q_f + ai q_{f+half}, q'_{f+half} = -ai q_f + ar q_{f+half}.
 * The rows of W_q (and its bias) combine likewise; RoPE, a rotation of the same pair, commutes.
 *
 * Keys, matrix style: q·(k A + c) = (q Aᵀ)·k + q·c. The second term is the same for every key of
 * a query, so the softmax drops it; the query becomes q Aᵀ: row r of a head's W_q becomes
 * Σ_c A[r][c] W_q[c].
 *
 * Values: a head's output over V_i B + e is (its output over V_i) B + e (the attention weights
 * sum to 1), and W_o takes the heads' outputs as its input columns, so
 * W_o'[:, r] = Σ_c W_o[:, c] B[r][c] within each head's block, and W_o's bias gains W_o e.
 */
import type { PairFit } from "./fit";

export interface AttentionShape {
  hidden: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
}

/** W_q [numHeads * headDim, cols] (row-major), or its bias (cols = 1), folded with each K/V head's key map. */
export function foldQuery(wq: Float32Array, s: AttentionShape, fits: PairFit[], cols = s.hidden): Float32Array {
  const out = new Float32Array(wq.length);
  const d = s.headDim, half = d / 2, group = s.numHeads / s.numKvHeads;
  for (let h = 0; h < s.numHeads; h++) {
    const k = fits[Math.floor(h / group)].keys;
    const base = h * d * cols;
    if (k.kind === "rope") {
      for (let f = 0; f < half; f++) {
        const ar = k.re[f], ai = k.im[f];
        const lo = base + f * cols, hi = base + (f + half) * cols;
        for (let c = 0; c < cols; c++) {
          const x = wq[lo + c], y = wq[hi + c];
          out[lo + c] = ar * x + ai * y;
          out[hi + c] = -ai * x + ar * y;
        }
      }
    } else {
      for (let r = 0; r < d; r++)
        for (let c = 0; c < cols; c++) {
          let acc = 0;
          for (let q = 0; q < d; q++) acc += k.m[r * d + q] * wq[base + q * cols + c];
          out[base + r * cols + c] = acc;
        }
    }
  }
  return out;
}

/** W_o [hidden, numHeads * headDim] (row-major) folded with each K/V head's value matrix. */
export function foldOutput(wo: Float32Array, s: AttentionShape, fits: PairFit[]): Float32Array {
  const out = new Float32Array(wo.length);
  const d = s.headDim, group = s.numHeads / s.numKvHeads, width = s.numHeads * d;
  for (let row = 0; row < s.hidden; row++) {
    for (let h = 0; h < s.numHeads; h++) {
      const b = fits[Math.floor(h / group)].values.m;
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

/** W_o's bias [hidden] plus W_o times each head's value offset (the bias as is when no offsets were fitted). */
export function foldOutputBias(bo: Float32Array, wo: Float32Array, s: AttentionShape, fits: PairFit[]): Float32Array {
  const d = s.headDim, group = s.numHeads / s.numKvHeads, width = s.numHeads * d;
  const out = Float32Array.from(bo);
  for (let row = 0; row < s.hidden; row++) {
    let acc = bo[row];
    for (let h = 0; h < s.numHeads; h++) {
      const e = fits[Math.floor(h / group)].values.offset;
      if (e) for (let c = 0; c < d; c++) acc += wo[row * width + h * d + c] * e[c];
    }
    out[row] = acc;
  }
  return out;
}
