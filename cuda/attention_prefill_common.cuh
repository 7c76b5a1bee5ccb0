// What the two prefill kernels (attention_prefill.cuh over an f32 cache, attention_prefill_bf16.cuh
// over a compact one) share around their products: a thread's two query rows and the keys they,
// the warp and the block see; the online softmax of a tile's scores; and the output's last steps.
// Both lay a warp's 16 query rows out as mma C fragments: thread (g, t) holds rows g (A) and
// g + 8 (B), and of score tile kt the keys kt * 8 + 2t and + 1 (c = 0, 1 for A; 2, 3 for B).
#pragma once
#include <climits>
#include <cstdint>

#include "attention_common.cuh"

namespace lckv::cuda {

namespace {

// Scores are kept in log2 units: the queries carry log2(e) with the softmax scale
// (prefillQueryScale), so each probability and rescale is one exp2 (prefillWeight) instead of
// __expf's multiply and exp2.
__device__ __forceinline__ float prefillQueryScale(float scale) { return scale * kLog2e; }
__device__ __forceinline__ float prefillWeight(float score, float base) { return exp2Ftz(score - base); }

struct PrefillRows {
  int rowA, rowB;      // this thread's rows: g and g + 8 of its warp's 16
  Range seeA, seeB;    // the keys each sees (none past n)
  int lo, hi;          // the keys any query of the block sees (hi < 0: none)
  int warpLo, warpHi;  // ... and any query of this warp (tiles outside are skipped by the warp)
  int fullLo, fullHi;  // ... and every query of this warp below n (tiles inside need no mask)
};

template <int kQueries>
__device__ __forceinline__ PrefillRows prefillRows(const int32_t* __restrict__ positions, int n, int r0, int warp, int g,
                                                   bool strict, int window) {
  PrefillRows p;
  p.rowA = r0 + warp * 16 + g;
  p.rowB = p.rowA + 8;
  p.seeA = p.rowA < n ? visible(positions[p.rowA], strict, window) : Range{1, 0};
  p.seeB = p.rowB < n ? visible(positions[p.rowB], strict, window) : Range{1, 0};
  // Every thread computes the same block range.
  p.lo = INT_MAX;
  p.hi = -1;
  for (int i = 0; i < kQueries && r0 + i < n; ++i) {
    const Range v = visible(positions[r0 + i], strict, window);
    if (v.last >= v.first) {
      p.lo = min(p.lo, v.first);
      p.hi = max(p.hi, v.last);
    }
  }
  p.warpLo = INT_MAX;
  p.warpHi = -1;
  if (p.seeA.last >= p.seeA.first) p.warpLo = p.seeA.first, p.warpHi = p.seeA.last;
  if (p.seeB.last >= p.seeB.first) p.warpLo = min(p.warpLo, p.seeB.first), p.warpHi = max(p.warpHi, p.seeB.last);
  p.fullLo = 0;
  p.fullHi = INT_MAX;
  if (p.rowA < n) p.fullLo = max(p.fullLo, p.seeA.first), p.fullHi = min(p.fullHi, p.seeA.last);
  if (p.rowB < n) p.fullLo = max(p.fullLo, p.seeB.first), p.fullHi = min(p.fullHi, p.seeB.last);
  for (int o = 16; o > 0; o >>= 1) {
    p.warpLo = min(p.warpLo, __shfl_xor_sync(0xffffffffu, p.warpLo, o));
    p.warpHi = max(p.warpHi, __shfl_xor_sync(0xffffffffu, p.warpHi, o));
    p.fullLo = max(p.fullLo, __shfl_xor_sync(0xffffffffu, p.fullLo, o));
    p.fullHi = min(p.fullHi, __shfl_xor_sync(0xffffffffu, p.fullHi, o));
  }
  return p;
}

// The online softmax of rows A and B: running maxima, this thread's share of each row's sum
// (the quad's four are added by prefillStore), and, after tile(), what the tile's
// probabilities subtract (base) and what rescales the output so far (corr).
struct PrefillSoftmax {
  float mA = -INFINITY, mB = -INFINITY, lA = 0.0f, lB = 0.0f;
  float baseA = 0.0f, baseB = 0.0f, corrA = 1.0f, corrB = 1.0f;

  // Masks the scores of keys j0 .. j0 + 8 kKeyTiles - 1 outside each row's range (the diagonal
  // rule, the window, keys past the block's range) unless every row of the warp below n sees the
  // whole tile, folds the tile's row maxima in and rescales the sums.
  template <int kKeyTiles>
  __device__ __forceinline__ void tile(float (&s)[kKeyTiles][4], int j0, int t, const PrefillRows& rows) {
    float tileA = -INFINITY, tileB = -INFINITY;
    const bool whole = j0 >= rows.fullLo && j0 + 8 * kKeyTiles - 1 <= rows.fullHi;  // warp-uniform
#pragma unroll
    for (int kt = 0; kt < kKeyTiles; ++kt) {
      if (!whole) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int j = j0 + kt * 8 + 2 * t + (c & 1);
          const Range& see = c < 2 ? rows.seeA : rows.seeB;
          if (j < see.first || j > see.last) s[kt][c] = -INFINITY;
        }
      }
      tileA = fmaxf(tileA, fmaxf(s[kt][0], s[kt][1]));
      tileB = fmaxf(tileB, fmaxf(s[kt][2], s[kt][3]));
    }
    // The four threads of a quad hold one row's scores between them.
    tileA = fmaxf(tileA, __shfl_xor_sync(0xffffffffu, tileA, 1));
    tileA = fmaxf(tileA, __shfl_xor_sync(0xffffffffu, tileA, 2));
    tileB = fmaxf(tileB, __shfl_xor_sync(0xffffffffu, tileB, 1));
    tileB = fmaxf(tileB, __shfl_xor_sync(0xffffffffu, tileB, 2));
    const float newA = fmaxf(mA, tileA), newB = fmaxf(mB, tileB);
    // A row that has seen no key yet keeps max -inf: subtract 0 then (every exp2 is of -inf: 0).
    baseA = newA == -INFINITY ? 0.0f : newA;
    baseB = newB == -INFINITY ? 0.0f : newB;
    corrA = prefillWeight(mA, baseA);
    corrB = prefillWeight(mB, baseB);
    mA = newA;
    mB = newB;
    lA *= corrA;
    lB *= corrB;
  }
};

// Adds a tile's probabilities x values, summed for the tile alone, to the output with f32
// arithmetic: the tensor cores' f32 accumulation rounds toward zero, a bias that summing every
// tile of a long context in them grew past 1e-5.
template <int kDimTiles>
__device__ __forceinline__ void prefillAddTile(float (&o)[kDimTiles][4], const float (&po)[kDimTiles][4],
                                               const PrefillSoftmax& sm) {
#pragma unroll
  for (int dt = 0; dt < kDimTiles; ++dt) {
    o[dt][0] = fmaf(o[dt][0], sm.corrA, po[dt][0]);
    o[dt][1] = fmaf(o[dt][1], sm.corrA, po[dt][1]);
    o[dt][2] = fmaf(o[dt][2], sm.corrB, po[dt][2]);
    o[dt][3] = fmaf(o[dt][3], sm.corrB, po[dt][3]);
  }
}

// Divides the output rows by their sums (a row with none writes zeros) and stores them.
template <int kDimTiles>
__device__ __forceinline__ void prefillStore(const float (&o)[kDimTiles][4], PrefillSoftmax sm, const PrefillRows& rows,
                                             int n, int t, int h, int numHeads, int headDim, const AttentionOut& out) {
  sm.lA += __shfl_xor_sync(0xffffffffu, sm.lA, 1);
  sm.lA += __shfl_xor_sync(0xffffffffu, sm.lA, 2);
  sm.lB += __shfl_xor_sync(0xffffffffu, sm.lB, 1);
  sm.lB += __shfl_xor_sync(0xffffffffu, sm.lB, 2);
#pragma unroll
  for (int dt = 0; dt < kDimTiles; ++dt) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int r = c < 2 ? rows.rowA : rows.rowB, d = dt * 8 + 2 * t + (c & 1);
      const float l = c < 2 ? sm.lA : sm.lB;
      if (r < n && d < headDim) out.store(((int64_t)r * numHeads + h) * headDim + d, l > 0.0f ? o[dt][c] / l : 0.0f);
    }
  }
}

}  // namespace

}  // namespace lckv::cuda
