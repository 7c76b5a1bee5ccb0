// Prefill over an f32 cache: many queries of one sequence, on the tensor cores. A block takes
// kPrefillQueries consecutive queries of one head (16 per warp, the rows of an mma tile) and
// streams the keys they can see through shared memory in tiles of kKeyTile, so each key is read
// once per tile of queries. Per tile a warp forms its 16 x 64 scores with mma.sync m16n8k8
// (tf32), masks them, updates an online softmax per query row, and adds probabilities x values
// with mma again; scores, probabilities and the output stay in registers (flash attention 2).
// Compact caches take the bf16 kernel (attention_prefill_bf16.cuh).
//
// f32 models with an f32 cache are checked to 1e-5, which tf32 (10-bit mantissa) cannot reach
// alone. Each operand is split into a tf32 part and the tf32 of its remainder and
// three products are summed (hi.hi + hi.lo + lo.hi, the "3xTF32" of cuBLAS): about 21 bits of
// each operand survive, f32 accuracy for a softmax-weighted sum.
//
// Fragments (PTX ISA, m16n8k8 .tf32, g = lane / 4, t = lane % 4): A (16 x 8, row) holds
// (g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4); B (8 x 8, col) holds (k = t, n = g) and
// (k = t + 4, n = g); C (16 x 8) holds (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1). For
// probabilities x values the scores' C fragment is reused as the A fragment by numbering the
// tile's keys so that A's column t is key 2t and column t + 4 is key 2t + 1 (a sum over keys
// does not care about their order): no shuffles, and B reads value rows 2t and 2t + 1.
//
// The kernel template; attention_prefill.cu holds its launcher and instances.
#pragma once
#include <cstdint>

#include "attention_prefill_common.cuh"

namespace lckv::cuda {

namespace {

constexpr int kPrefillWarps = 4;
constexpr int kPrefillQueries = kPrefillWarps * 16;
constexpr int kKeyTile = 64;

// Row stride of the shared-memory tiles, in floats: head size (a multiple of 16) + 4, which is
// 4 or 20 mod 32, so the 32 lanes reading A/B fragments (rows g, columns t) hit 32 banks.
__host__ __device__ constexpr int prefillStride(int paddedDim) { return paddedDim + 4; }
constexpr size_t prefillSmemBytes(int paddedDim) {
  return sizeof(float) * (size_t)(kPrefillQueries + 2 * kKeyTile) * prefillStride(paddedDim);
}

struct Tf32Pair {
  uint32_t hi, lo;
};
__device__ __forceinline__ uint32_t toTf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ Tf32Pair splitTf32(float x) {
  const uint32_t hi = toTf32(x);
  return {hi, toTf32(x - __uint_as_float(hi))};
}
__device__ __forceinline__ void mmaTf32(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                        uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// d += a . b to f32 accuracy from split operands (a: A fragment, b: B fragment).
__device__ __forceinline__ void mma3xTf32(float (&d)[4], const Tf32Pair (&a)[4], const Tf32Pair (&b)[2]) {
  mmaTf32(d, a[0].hi, a[1].hi, a[2].hi, a[3].hi, b[0].lo, b[1].lo);
  mmaTf32(d, a[0].lo, a[1].lo, a[2].lo, a[3].lo, b[0].hi, b[1].hi);
  mmaTf32(d, a[0].hi, a[1].hi, a[2].hi, a[3].hi, b[0].hi, b[1].hi);
}

// d += a . b for a K or V fragment read from the tile (two elements per lane).
__device__ __forceinline__ void mmaTile(float (&d)[4], const Tf32Pair (&a)[4], float b0, float b1) {
  const Tf32Pair b[2] = {splitTf32(b0), splitTf32(b1)};
  mma3xTf32(d, a, b);
}

// kDim: the head size rounded up to 16, 32, 64 or 128 (zero-padded).
template <int kDim>
__global__ void __launch_bounds__(kPrefillWarps * 32) attentionPrefillKernel(
    const float* __restrict__ q, const int32_t* __restrict__ positions, PagedKv kv, int n, int numHeads, int numKvHeads,
    int headDim, bool strict, int window, float scale, bool vec16, AttentionOut out) {
  waitForPrecedingKernels();
  constexpr int S = prefillStride(kDim), kDimTiles = kDim / 8, kKeyTiles = kKeyTile / 8;
  extern __shared__ float smem[];
  float* qs = smem;                        // [kPrefillQueries][S], scaled
  float* ks = qs + kPrefillQueries * S;    // [kKeyTile][S]
  float* vs = ks + kKeyTile * S;           // [kKeyTile][S]
  const int h = blockIdx.y, kvh = h / (numHeads / numKvHeads);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  // The last queries see the most keys: their blocks start first, so the short ones fill the tail.
  const int r0 = (gridDim.x - 1 - blockIdx.x) * kPrefillQueries;
  const int32_t* table = kvPageTable(kv, r0);  // one sequence for all rows
  const int headBytes = kvHeadBytes(KvType::F32, headDim);
  const uint8_t* kBase = kvHeadBase(kv, 0, kvh, headBytes);
  const uint8_t* vBase = kvHeadBase(kv, 1, kvh, headBytes);
  const int pageMask = kvPageMask(kv);

  const PrefillRows rows = prefillRows<kPrefillQueries>(positions, n, r0, warp, g, strict, window);

  // The queries times the softmax scale in log2 units (prefillQueryScale).
  const float qScale = prefillQueryScale(scale);
  for (int e = threadIdx.x; e < kPrefillQueries * kDim; e += blockDim.x) {
    const int i = e / kDim, d = e % kDim;
    qs[i * S + d] = r0 + i < n && d < headDim ? q[((int64_t)(r0 + i) * numHeads + h) * headDim + d] * qScale : 0.0f;
  }
  // The online softmax of rows A and B, and the output tile in C fragments, 8 head dims each.
  PrefillSoftmax sm;
  float o[kDimTiles][4];
#pragma unroll
  for (int i = 0; i < kDimTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  const float* qw = qs + warp * 16 * S;

  for (int j0 = (rows.hi >= 0 ? rows.lo : 0); j0 <= rows.hi; j0 += kKeyTile) {
    __syncthreads();  // the previous tile is no longer read (and qs is written, the first time)
    if (vec16) {
      for (int e = threadIdx.x; e < kKeyTile * (kDim / 4); e += blockDim.x) {
        const int jj = e / (kDim / 4), d = (e % (kDim / 4)) * 4, j = j0 + jj;
        float4 kx = make_float4(0.f, 0.f, 0.f, 0.f), vx = kx;
        if (j <= rows.hi && d < headDim) {
          const int64_t off = kvRowOffset(table, kv, pageMask, j) + 4 * d;
          kx = *reinterpret_cast<const float4*>(kBase + off);
          vx = *reinterpret_cast<const float4*>(vBase + off);
        }
        *reinterpret_cast<float4*>(ks + jj * S + d) = kx;
        *reinterpret_cast<float4*>(vs + jj * S + d) = vx;
      }
    } else {
      for (int e = threadIdx.x; e < kKeyTile * kDim; e += blockDim.x) {
        const int jj = e / kDim, d = e % kDim, j = j0 + jj;
        float kx = 0.0f, vx = 0.0f;
        if (j <= rows.hi && d < headDim) {
          const int64_t off = kvRowOffset(table, kv, pageMask, j) + 4 * d;
          kx = *reinterpret_cast<const float*>(kBase + off);
          vx = *reinterpret_cast<const float*>(vBase + off);
        }
        ks[jj * S + d] = kx;
        vs[jj * S + d] = vx;
      }
    }
    __syncthreads();
    if (rows.warpHi < j0 || rows.warpLo > j0 + kKeyTile - 1) continue;  // warp-uniform: no key of this tile is visible

    // Scores of the warp's 16 queries against the tile's keys: key tile kt covers keys kt*8..+7.
    float s[kKeyTiles][4];
#pragma unroll
    for (int kt = 0; kt < kKeyTiles; ++kt) s[kt][0] = s[kt][1] = s[kt][2] = s[kt][3] = 0.0f;
#pragma unroll
    for (int dt = 0; dt < kDimTiles; ++dt) {
      const int c = dt * 8 + t;
      const Tf32Pair a[4] = {splitTf32(qw[g * S + c]), splitTf32(qw[(g + 8) * S + c]), splitTf32(qw[g * S + c + 4]),
                             splitTf32(qw[(g + 8) * S + c + 4])};
#pragma unroll
      for (int kt = 0; kt < kKeyTiles; ++kt) {
        const float* kr = ks + (kt * 8 + g) * S + c;
        mmaTile(s[kt], a, kr[0], kr[4]);
      }
    }
    sm.tile(s, j0, t, rows);
    // Probabilities x values, 8 keys (one score tile) per step, summed for this tile alone
    // (prefillAddTile).
    float po[kDimTiles][4];
#pragma unroll
    for (int i = 0; i < kDimTiles; ++i) po[i][0] = po[i][1] = po[i][2] = po[i][3] = 0.0f;
#pragma unroll
    for (int kt = 0; kt < kKeyTiles; ++kt) {
      const float p0 = prefillWeight(s[kt][0], sm.baseA), p1 = prefillWeight(s[kt][1], sm.baseA);
      const float p2 = prefillWeight(s[kt][2], sm.baseB), p3 = prefillWeight(s[kt][3], sm.baseB);
      sm.lA += p0 + p1;
      sm.lB += p2 + p3;
      // A fragment: (g, col t) = key 2t, (g + 8, t), (g, t + 4) = key 2t + 1, (g + 8, t + 4).
      const Tf32Pair a[4] = {splitTf32(p0), splitTf32(p2), splitTf32(p1), splitTf32(p3)};
      const float* v0 = vs + (kt * 8 + 2 * t) * S + g;
#pragma unroll
      for (int dt = 0; dt < kDimTiles; ++dt) mmaTile(po[dt], a, v0[dt * 8], v0[S + dt * 8]);
    }
    prefillAddTile(o, po, sm);
  }
  prefillStore(o, sm, rows, n, t, h, numHeads, headDim, out);
}

}  // namespace

}  // namespace lckv::cuda
