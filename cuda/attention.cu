// Condensed-KV attention: the queries of one layer attend to the K/V slot of the layer's
// target, with the plan's diagonal rule (strict: keys < p; no visible key -> zero output) and
// sliding window. GQA maps query head h to K/V head h / (numHeads / numKvHeads).
//
// Decode (rows of different sequences, one query each): split-K flash-decoding, one block per
// (row, K/V head, split) that serves every query head of that K/V head's group (up to
// kGroupHeads; a larger group is cut into several blocks). The block streams the keys and values
// of its chunk through shared memory once, in tiles copied asynchronously while the previous
// tile is scored, and scores each tile against all its query heads: with GQA (8 query heads per
// K/V head in TinyLlama) a key is read once instead of once per query head. It writes
// (max, sum, unnormalised output) per head for its chunk and a second kernel merges the chunks;
// when one chunk covers the keys, the first kernel writes the final output directly.
//
// Prefill (16 or more queries of one sequence): flash attention on the tensor cores, further
// down (attentionPrefillKernel).
#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>

#include "common.cuh"
#include "kernels.h"

namespace lckv::cuda {

namespace {

constexpr int kMaxDimsPerLane = 4;  // headDim <= 128

struct Range {
  int first, last;  // visible keys [first, last]; empty when last < first
};

__device__ __forceinline__ Range visible(int p, bool strict, int window) {
  return {window > 0 ? max(0, p - window + 1) : 0, strict ? p - 1 : p};
}

// ---- decode ------------------------------------------------------------------------------------

constexpr int kDecodeWarps = 4;
constexpr int kDecodeKeys = 32;    // keys per tile: one per lane in the softmax step
// Tiles in shared memory: one scored while the next arrives. A third stage measured slower on an
// H100: the shared memory it takes costs resident blocks, which hide latency better.
constexpr int kDecodeStages = 2;
// Query heads one block serves (TinyLlama's group); it bounds the accumulators each lane keeps
// (kGroupHeads x 4 dims at head size 128).
constexpr int kGroupHeads = 8;
constexpr int kHeadsPerWarp = kGroupHeads / kDecodeWarps;
static_assert(kGroupHeads % kDecodeWarps == 0 && kGroupHeads % 4 == 0, "heads are read as float4 per key");
// Splits are at least one tile of keys, and at most kMaxSplits of them. One sequence of 4096
// tokens has 4 K/V heads to spread over 132 SMs: at 64 splits its attention took 11.9 us on an
// H100 against 15.6 at 32 (a block then streams two tiles instead of four); 128 splits measured
// no faster than 64, and batches of 16 and more are not cut that far anyway (one wave).
constexpr int kMinSplitKeys = kDecodeKeys;
constexpr int kMaxSplits = 64;

// Floats per key row in shared memory: a whole number of float4 (the dot products read float4)
// and an odd number of them, so lane j reading row j is free of bank conflicts.
__host__ __device__ inline int decodeRowStride(int headDim) {
  const int vecs = (headDim + 3) / 4;
  return 4 * (vecs | 1);
}
__host__ __device__ inline size_t decodeSmemFloats(int headDim) {
  const int stride = decodeRowStride(headDim);
  return (size_t)2 * kDecodeStages * kDecodeKeys * stride  // K and V tiles
         + (size_t)kGroupHeads * stride                   // the queries
         + (size_t)kDecodeKeys * kGroupHeads               // scores, then probabilities
         + 3 * kGroupHeads;                                // per head: rescale factor, final max and sum
}

// Asynchronous global -> shared copies (sm_80 and later; a plain copy before).
__device__ __forceinline__ void copyAsync16(float* dst, const float* src) {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src)
               : "memory");
#else
  *reinterpret_cast<float4*>(dst) = *reinterpret_cast<const float4*>(src);
#endif
}
__device__ __forceinline__ void copyAsync4(float* dst, const float* src) {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src)
               : "memory");
#else
  *dst = *src;
#endif
}
__device__ __forceinline__ void copyAsyncCommit() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Waits until at most `pending` committed groups are still in flight.
template <int pending>
__device__ __forceinline__ void copyAsyncWait() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
#endif
}

// Starts copying keys j0 + lo .. j0 + hi - 1 of the block's K/V head into rows lo .. hi - 1 of
// one stage's K and V tiles. Lane j looks up key j0 + j's page once (all lanes at once, so the
// table reads overlap), and the warp's copies take each key row's offset from its lane.
// Consecutive threads copy consecutive pieces of a key row (coalesced); vec4 (16-byte pieces)
// needs every row 16-byte aligned (headDim, kvDim and pageFloats multiples of 4, the pool aligned).
__device__ __forceinline__ void loadDecodeTile(float* kDst, float* vDst, const float* kBase, const float* vBase,
                                               const int32_t* table, const PagedKv& kv, int j0, int lo, int hi,
                                               int headDim, int stride, bool vec4) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int j = j0 + lane;
  const int64_t rowOffset =
      lane >= lo && lane < hi
          ? (int64_t)table[j >> kv.pageShift] * kv.pageFloats + (int64_t)(j & ((1 << kv.pageShift) - 1)) * kv.kvDim
          : 0;
  const int width = vec4 ? 4 : 1, perRow = headDim / width, total = (hi - lo) * perRow;
  for (int e0 = warp * 32; e0 < total; e0 += kDecodeWarps * 32) {  // warp-uniform: the shuffle needs every lane
    const int e = e0 + lane;
    const int jj = min(lo + e / perRow, kDecodeKeys - 1), c = (e - (jj - lo) * perRow) * width;
    const int64_t off = __shfl_sync(0xffffffffu, rowOffset, jj) + c;
    if (e < total) {
      if (vec4) {
        copyAsync16(kDst + jj * stride + c, kBase + off);
        copyAsync16(vDst + jj * stride + c, vBase + off);
      } else {
        copyAsync4(kDst + jj * stride + c, kBase + off);
        copyAsync4(vDst + jj * stride + c, vBase + off);
      }
    }
  }
}

// One block: row blockIdx.x, K/V head blockIdx.y / headChunks (its query heads cut into
// headChunks blocks of at most headsPerBlock), split blockIdx.z of gridDim.z.
//   Scores: lane = key of the tile, warp w = heads w and w + 4 (dot products from shared memory:
//     the key row is read once for both heads, the query as a broadcast).
//   Softmax: the warp that scored head g keeps its running max and sum, and turns the tile's
//     scores into probabilities against the new max (and a factor for the old accumulators).
//   P.V: warp w takes keys w, w + 4, ...; lane holds dims lane + 32 t of every head, so a value
//     row is read once for all heads. The warps' accumulators are summed at the end.
template <int kDimsPerLane>
__global__ void __launch_bounds__(kDecodeWarps * 32) attentionDecodeKernel(
    const float* __restrict__ q, const int32_t* __restrict__ positions, PagedKv kv, int numHeads, int numKvHeads,
    int headDim, bool strict, int window, float scale, int headChunks, int headsPerBlock, bool vec4,
    float* __restrict__ out, float* __restrict__ partial) {
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  const int stride = decodeRowStride(headDim);
  const int tileFloats = kDecodeKeys * stride;
  float* kS = smem;                                // [stages][keys][stride]
  float* vS = kS + kDecodeStages * tileFloats;     // [stages][keys][stride]
  float* qS = vS + kDecodeStages * tileFloats;     // [kGroupHeads][stride]
  float* pS = qS + kGroupHeads * stride;           // [keys][kGroupHeads]
  float* corrS = pS + kDecodeKeys * kGroupHeads;   // [kGroupHeads]
  float* maxS = corrS + kGroupHeads;               // [kGroupHeads]
  float* sumS = maxS + kGroupHeads;                // [kGroupHeads]

  const int r = blockIdx.x, split = blockIdx.z, splits = gridDim.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = numHeads / numKvHeads;
  const int kvh = blockIdx.y / headChunks, part = blockIdx.y % headChunks;
  const int h0 = kvh * group + part * headsPerBlock;
  const int heads = min(headsPerBlock, group - part * headsPerBlock);
  const int32_t* table = kv.tables + (int64_t)kv.rowSeq[r] * kv.stride;
  // The pages hold [K | V][pageTokens][kvDim] per slot: within a page, keys are contiguous.
  const float* kBase = kv.pool + ((int64_t)(kv.slot * 2) << kv.pageShift) * kv.kvDim + kvh * headDim;
  const float* vBase = kv.pool + ((int64_t)(kv.slot * 2 + 1) << kv.pageShift) * kv.kvDim + kvh * headDim;

  // This block's chunk of the row's visible keys, cut here from the row's position rather than
  // by the host: a launch replayed from a CUDA graph at later positions still covers every key
  // (the number of splits is fixed; a split past the end writes an empty partial).
  const int p = positions[r];
  const Range all = visible(p, strict, window);
  const int count = max(0, all.last - all.first + 1);
  const int chunk = (count + splits - 1) / splits;
  const int first = all.first + split * chunk;
  const int keys = max(0, min(count - split * chunk, chunk));
  const int numTiles = (keys + kDecodeKeys - 1) / kDecodeKeys;

  // Everything above, and the keys of the first tile that no kernel of this step writes, come
  // before the wait for the preceding kernel (under programmatic launch they load while it
  // runs): positions and page tables are the step's inputs, and this op's rows write K/V only
  // at their own positions, which for this row's sequence are p - (n - 1) or later. A short
  // context's block streams a single tile, so at batch 1 the wait is followed by the queries
  // and the arithmetic alone.
  static_assert(kDecodeStages == 2, "the prologue loads one tile");
  const int firstTileKeys = min(kDecodeKeys, keys);
  const int earlyKeys = min(firstTileKeys, max(0, p - (int)gridDim.x + 1 - first));
  if (earlyKeys > 0) loadDecodeTile(kS, vS, kBase, vBase, table, kv, first, 0, earlyKeys, headDim, stride, vec4);
  // While the first tile arrives: zero the K rows' padding (the float4 dot products read it; the
  // copies never write it).
  const int pad = stride - headDim;
  for (int e = threadIdx.x; e < kDecodeStages * kDecodeKeys * pad; e += blockDim.x)
    kS[(e / pad) * stride + headDim + e % pad] = 0.0f;
  waitForPrecedingKernels();
  if (earlyKeys < firstTileKeys)
    loadDecodeTile(kS, vS, kBase, vBase, table, kv, first, earlyKeys, firstTileKeys, headDim, stride, vec4);
  copyAsyncCommit();
  // The queries (written by the preceding kernel), zero-padded.
  for (int e = threadIdx.x; e < kGroupHeads * stride; e += blockDim.x) {
    const int g = e / stride, d = e - g * stride;
    qS[e] = g < heads && d < headDim ? q[((int64_t)r * numHeads + h0 + g) * headDim + d] : 0.0f;
  }

  float acc[kGroupHeads][kDimsPerLane];
#pragma unroll
  for (int g = 0; g < kGroupHeads; ++g)
#pragma unroll
    for (int t = 0; t < kDimsPerLane; ++t) acc[g][t] = 0.0f;
  float m[kHeadsPerWarp], l[kHeadsPerWarp];
#pragma unroll
  for (int i = 0; i < kHeadsPerWarp; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
  }
  const int vecs = (headDim + 3) / 4;

  for (int tile = 0; tile < numTiles; ++tile) {
    const int ahead = tile + kDecodeStages - 1;
    if (ahead < numTiles)
      loadDecodeTile(kS + (ahead % kDecodeStages) * tileFloats, vS + (ahead % kDecodeStages) * tileFloats, kBase, vBase,
                     table, kv, first + ahead * kDecodeKeys, 0, min(kDecodeKeys, keys - ahead * kDecodeKeys), headDim,
                     stride, vec4);
    copyAsyncCommit();
    copyAsyncWait<kDecodeStages - 1>();
    __syncthreads();  // this tile (and, the first time, the queries and padding) is in place
    const float* kt = kS + (tile % kDecodeStages) * tileFloats;
    const float* vt = vS + (tile % kDecodeStages) * tileFloats;
    const int valid = min(kDecodeKeys, keys - tile * kDecodeKeys);

    // Scores of key `lane` against this warp's heads.
    {
      const float4* k4 = reinterpret_cast<const float4*>(kt + lane * stride);
      float s[kHeadsPerWarp];
#pragma unroll
      for (int i = 0; i < kHeadsPerWarp; ++i) s[i] = 0.0f;
      for (int c = 0; c < vecs; ++c) {
        const float4 kk = k4[c];
#pragma unroll
        for (int i = 0; i < kHeadsPerWarp; ++i) {
          const float4 qq = reinterpret_cast<const float4*>(qS + (warp + kDecodeWarps * i) * stride)[c];
          s[i] = fmaf(qq.x, kk.x, s[i]);
          s[i] = fmaf(qq.y, kk.y, s[i]);
          s[i] = fmaf(qq.z, kk.z, s[i]);
          s[i] = fmaf(qq.w, kk.w, s[i]);
        }
      }
#pragma unroll
      for (int i = 0; i < kHeadsPerWarp; ++i)
        pS[lane * kGroupHeads + warp + kDecodeWarps * i] = lane < valid ? s[i] * scale : -INFINITY;
    }
    __syncthreads();

    // Online softmax of each head over the tile.
#pragma unroll
    for (int i = 0; i < kHeadsPerWarp; ++i) {
      const int g = warp + kDecodeWarps * i;
      if (g >= heads) break;  // warp-uniform
      const float s = pS[lane * kGroupHeads + g];
      const float mNew = fmaxf(m[i], warpMax(s));  // finite: the tile has a valid key
      const float p = lane < valid ? expf(s - mNew) : 0.0f;
      const float corr = expf(m[i] - mNew);  // 0 on the first tile (m = -inf)
      l[i] = l[i] * corr + warpSum(p);
      m[i] = mNew;
      pS[lane * kGroupHeads + g] = p;
      if (lane == 0) corrS[g] = corr;
    }
    __syncthreads();

    // Accumulate P.V for every head.
#pragma unroll
    for (int g = 0; g < kGroupHeads; ++g) {
      if (g < heads) {
        const float corr = corrS[g];
#pragma unroll
        for (int t = 0; t < kDimsPerLane; ++t) acc[g][t] *= corr;
      }
    }
    for (int jj = warp; jj < valid; jj += kDecodeWarps) {
      float vv[kDimsPerLane];
#pragma unroll
      for (int t = 0; t < kDimsPerLane; ++t) {
        const int d = lane + 32 * t;
        vv[t] = d < headDim ? vt[jj * stride + d] : 0.0f;
      }
      float p[kGroupHeads];
#pragma unroll
      for (int g4 = 0; g4 < kGroupHeads / 4; ++g4) {
        const float4 pp = reinterpret_cast<const float4*>(pS + jj * kGroupHeads)[g4];
        p[4 * g4] = pp.x;
        p[4 * g4 + 1] = pp.y;
        p[4 * g4 + 2] = pp.z;
        p[4 * g4 + 3] = pp.w;
      }
#pragma unroll
      for (int g = 0; g < kGroupHeads; ++g) {
        if (g < heads) {
#pragma unroll
          for (int t = 0; t < kDimsPerLane; ++t) acc[g][t] = fmaf(p[g], vv[t], acc[g][t]);
        }
      }
    }
    __syncthreads();  // the tile's buffers and the probabilities are free again
  }

  // Sum the warps' accumulators through the (now idle) tile buffers and write the result.
  copyAsyncWait<0>();
  __syncthreads();
  float* red = smem;  // [warps][kGroupHeads][headDim]: 32 * headDim floats fit in the K tiles
#pragma unroll
  for (int g = 0; g < kGroupHeads; ++g) {
    if (g < heads) {
#pragma unroll
      for (int t = 0; t < kDimsPerLane; ++t) {
        const int d = lane + 32 * t;
        if (d < headDim) red[(warp * kGroupHeads + g) * headDim + d] = acc[g][t];
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kHeadsPerWarp; ++i) {
    const int g = warp + kDecodeWarps * i;
    if (g < heads && lane == 0) {
      maxS[g] = m[i];
      sumS[g] = l[i];
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < heads * headDim; e += blockDim.x) {
    const int g = e / headDim, d = e - g * headDim;
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) v += red[(w * kGroupHeads + g) * headDim + d];
    const int64_t rh = (int64_t)r * numHeads + h0 + g;
    if (splits == 1) {
      out[rh * headDim + d] = sumS[g] > 0.0f ? v / sumS[g] : 0.0f;
    } else {
      partial[(rh * splits + split) * (headDim + 2) + 2 + d] = v;
    }
  }
  if (splits > 1 && threadIdx.x < heads) {
    const int g = threadIdx.x;
    const int64_t slot = ((int64_t)r * numHeads + h0 + g) * splits + split;
    partial[slot * (headDim + 2)] = maxS[g];  // -inf for an empty chunk: the merge skips it
    partial[slot * (headDim + 2) + 1] = sumS[g];
  }
}

// Merges the chunks of each (query, head): out = sum_c exp(M_c - M) acc_c / sum_c exp(M_c - M) L_c.
// The first warp reads every chunk's max and sum (lane c takes chunks c, c + 32, ...), so the
// weights come from one or two rounds of loads; then the block's threads take the head's dims
// times kMergeThreads / headDim interleaved subsets of the chunks (4 at head size 64, 2 at 128),
// each reading its chunks' accumulators at once, and the parts are added in order. (Loops over
// the chunks, each load waiting for the last, made this kernel take as long as the attention
// itself at 16 sequences.)
constexpr int kMergeThreads = 256;
__global__ void __launch_bounds__(kMergeThreads) attentionMergeKernel(const float* __restrict__ partial, int numHeads,
                                                                      int headDim, int splits, float* __restrict__ out) {
  __shared__ float weight[kMaxSplits];
  __shared__ float sums[kMergeThreads];
  __shared__ float total;
  waitForPrecedingKernels();
  const int r = blockIdx.x, h = blockIdx.y;
  const float* base = partial + ((int64_t)r * numHeads + h) * splits * (headDim + 2);
  if (threadIdx.x < 32) {
    constexpr int kPerLane = (kMaxSplits + 31) / 32;
    float mc[kPerLane], lc[kPerLane], M = -INFINITY;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int c = threadIdx.x + 32 * i;
      mc[i] = c < splits ? base[c * (headDim + 2)] : -INFINITY;  // -inf: an empty chunk, skipped
      lc[i] = c < splits ? base[c * (headDim + 2) + 1] : 0.0f;
      M = fmaxf(M, mc[i]);
    }
    M = warpMax(M);
    float L = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const float wc = mc[i] == -INFINITY ? 0.0f : expf(mc[i] - M);
      L += lc[i] * wc;
      if (threadIdx.x + 32 * i < kMaxSplits) weight[threadIdx.x + 32 * i] = wc;
    }
    L = warpSum(L);
    if (threadIdx.x == 0) total = L;
  }
  __syncthreads();
  const int parts = max(1, (int)blockDim.x / headDim);
  const int d = threadIdx.x % headDim, part = threadIdx.x / headDim;
  float v = 0.0f;
  if (part < parts) {
#pragma unroll 8
    for (int c = part; c < splits; c += parts) v += base[c * (headDim + 2) + 2 + d] * weight[c];
  }
  sums[threadIdx.x] = v;
  __syncthreads();
  if (threadIdx.x < headDim) {
    float acc = 0.0f;
    for (int p = 0; p < parts; ++p) acc += sums[p * headDim + threadIdx.x];
    const float L = total;
    out[((int64_t)r * numHeads + h) * headDim + threadIdx.x] = L > 0.0f ? acc / L : 0.0f;
  }
}

// Prefill: many queries of one sequence, on the tensor cores. A block takes kPrefillQueries
// consecutive queries of one head (16 per warp, the rows of an mma tile) and streams the keys
// they can see through shared memory in tiles of kKeyTile, so each key is read once per tile of
// queries. Per tile a warp forms its 16 x 64 scores with mma.sync m16n8k8 (tf32), masks them,
// updates an online softmax per query row, and adds probabilities x values with mma again;
// scores, probabilities and the output stay in registers (flash attention 2).
//
// The cache holds f32 K/V and f32 models are checked to 1e-5, which tf32 (10-bit mantissa)
// cannot reach alone. Each operand is split into a tf32 part and the tf32 of its remainder and
// three products are summed (hi.hi + hi.lo + lo.hi, the "3xTF32" of cuBLAS): about 21 bits of
// each operand survive, f32 accuracy for a softmax-weighted sum.
//
// Fragments (PTX ISA, m16n8k8 .tf32, g = lane / 4, t = lane % 4): A (16 x 8, row) holds
// (g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4); B (8 x 8, col) holds (k = t, n = g) and
// (k = t + 4, n = g); C (16 x 8) holds (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1). For
// probabilities x values the scores' C fragment is reused as the A fragment by numbering the
// tile's keys so that A's column t is key 2t and column t + 4 is key 2t + 1 (a sum over keys
// does not care about their order): no shuffles, and B reads value rows 2t and 2t + 1.
constexpr int kPrefillWarps = 4;
constexpr int kPrefillQueries = kPrefillWarps * 16;
constexpr int kKeyTile = 64;
// Below this many queries of one sequence the split-K kernel is used (it fills the GPU better).
constexpr int kPrefillMinQueries = 16;

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

template <int kDim>  // head size rounded up to 16, 32, 64 or 128 (zero-padded)
__global__ void __launch_bounds__(kPrefillWarps * 32) attentionPrefillKernel(
    const float* __restrict__ q, const int32_t* __restrict__ positions, PagedKv kv, int n, int numHeads, int numKvHeads,
    int headDim, bool strict, int window, float scale, bool vec4, float* __restrict__ out) {
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
  const int kvDim = kv.kvDim;
  const int32_t* table = kv.tables + (int64_t)kv.rowSeq[r0] * kv.stride;  // one sequence for all rows
  const float* kBase = kv.pool + ((int64_t)(kv.slot * 2) << kv.pageShift) * kvDim + kvh * headDim;
  const float* vBase = kv.pool + ((int64_t)(kv.slot * 2 + 1) << kv.pageShift) * kvDim + kvh * headDim;
  const int pageMask = (1 << kv.pageShift) - 1;

  // This thread's two query rows (g and g + 8 of its warp's 16) and the keys each can see.
  const int rowA = r0 + warp * 16 + g, rowB = rowA + 8;
  const Range seeA = rowA < n ? visible(positions[rowA], strict, window) : Range{1, 0};
  const Range seeB = rowB < n ? visible(positions[rowB], strict, window) : Range{1, 0};
  // The keys any query of the block can see (every thread computes the same).
  int lo = INT_MAX, hi = -1;
  for (int i = 0; i < kPrefillQueries && r0 + i < n; ++i) {
    const Range v = visible(positions[r0 + i], strict, window);
    if (v.last >= v.first) {
      lo = min(lo, v.first);
      hi = max(hi, v.last);
    }
  }
  // ... and those any query of this warp can see (tiles outside are skipped by the warp).
  int warpLo = INT_MAX, warpHi = -1;
  if (seeA.last >= seeA.first) warpLo = seeA.first, warpHi = seeA.last;
  if (seeB.last >= seeB.first) warpLo = min(warpLo, seeB.first), warpHi = max(warpHi, seeB.last);
  for (int o = 16; o > 0; o >>= 1) {
    warpLo = min(warpLo, __shfl_xor_sync(0xffffffffu, warpLo, o));
    warpHi = max(warpHi, __shfl_xor_sync(0xffffffffu, warpHi, o));
  }

  for (int e = threadIdx.x; e < kPrefillQueries * kDim; e += blockDim.x) {
    const int i = e / kDim, d = e % kDim;
    qs[i * S + d] = r0 + i < n && d < headDim ? q[((int64_t)(r0 + i) * numHeads + h) * headDim + d] * scale : 0.0f;
  }

  // Per row (A, B): running max and sum of this thread's probabilities (the quad's four are
  // added at the end); the output tile in C fragments, 8 head dims each.
  float mA = -INFINITY, mB = -INFINITY, lA = 0.0f, lB = 0.0f;
  float o[kDimTiles][4];
#pragma unroll
  for (int i = 0; i < kDimTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  const float* qw = qs + warp * 16 * S;

  for (int j0 = (hi >= 0 ? lo : 0); j0 <= hi; j0 += kKeyTile) {
    __syncthreads();  // the previous tile is no longer read (and qs is written, the first time)
    if (vec4) {
      for (int e = threadIdx.x; e < kKeyTile * (kDim / 4); e += blockDim.x) {
        const int jj = e / (kDim / 4), d = (e % (kDim / 4)) * 4, j = j0 + jj;
        float4 kx = make_float4(0.f, 0.f, 0.f, 0.f), vx = kx;
        if (j <= hi && d < headDim) {
          const int64_t off = (int64_t)table[j >> kv.pageShift] * kv.pageFloats + (int64_t)(j & pageMask) * kvDim + d;
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
        if (j <= hi && d < headDim) {
          const int64_t off = (int64_t)table[j >> kv.pageShift] * kv.pageFloats + (int64_t)(j & pageMask) * kvDim + d;
          kx = kBase[off];
          vx = vBase[off];
        }
        ks[jj * S + d] = kx;
        vs[jj * S + d] = vx;
      }
    }
    __syncthreads();
    if (warpHi < j0 || warpLo > j0 + kKeyTile - 1) continue;  // warp-uniform: no key of this tile is visible

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
        const Tf32Pair b[2] = {splitTf32(kr[0]), splitTf32(kr[4])};
        mma3xTf32(s[kt], a, b);
      }
    }
    // Mask (diagonal rule, window, keys past the block's range) and the tile's row maxima.
    float tileA = -INFINITY, tileB = -INFINITY;
#pragma unroll
    for (int kt = 0; kt < kKeyTiles; ++kt) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int j = j0 + kt * 8 + 2 * t + (c & 1);
        const Range& see = c < 2 ? seeA : seeB;
        if (j < see.first || j > see.last) s[kt][c] = -INFINITY;
      }
      tileA = fmaxf(tileA, fmaxf(s[kt][0], s[kt][1]));
      tileB = fmaxf(tileB, fmaxf(s[kt][2], s[kt][3]));
    }
    // The four threads of a quad hold one row's 64 scores between them.
    tileA = fmaxf(tileA, __shfl_xor_sync(0xffffffffu, tileA, 1));
    tileA = fmaxf(tileA, __shfl_xor_sync(0xffffffffu, tileA, 2));
    tileB = fmaxf(tileB, __shfl_xor_sync(0xffffffffu, tileB, 1));
    tileB = fmaxf(tileB, __shfl_xor_sync(0xffffffffu, tileB, 2));
    const float newA = fmaxf(mA, tileA), newB = fmaxf(mB, tileB);
    // A row that has seen no key yet keeps max -inf: subtract 0 then (every exp is of -inf: 0).
    const float baseA = newA == -INFINITY ? 0.0f : newA, baseB = newB == -INFINITY ? 0.0f : newB;
    const float corrA = __expf(mA - baseA), corrB = __expf(mB - baseB);
    mA = newA;
    mB = newB;
    lA *= corrA;
    lB *= corrB;
    // Probabilities x values, 8 keys (one score tile) per step, summed for this tile alone and
    // then added to the output with f32 arithmetic: the tensor cores' f32 accumulation rounds
    // toward zero, a bias that summing every tile of a long context in them grew past 1e-5.
    float po[kDimTiles][4];
#pragma unroll
    for (int i = 0; i < kDimTiles; ++i) po[i][0] = po[i][1] = po[i][2] = po[i][3] = 0.0f;
#pragma unroll
    for (int kt = 0; kt < kKeyTiles; ++kt) {
      const float p0 = __expf(s[kt][0] - baseA), p1 = __expf(s[kt][1] - baseA);
      const float p2 = __expf(s[kt][2] - baseB), p3 = __expf(s[kt][3] - baseB);
      lA += p0 + p1;
      lB += p2 + p3;
      // A fragment: (g, col t) = key 2t, (g + 8, t), (g, t + 4) = key 2t + 1, (g + 8, t + 4).
      const Tf32Pair a[4] = {splitTf32(p0), splitTf32(p2), splitTf32(p1), splitTf32(p3)};
      const float* v0 = vs + (kt * 8 + 2 * t) * S + g;
#pragma unroll
      for (int dt = 0; dt < kDimTiles; ++dt) {
        const Tf32Pair b[2] = {splitTf32(v0[dt * 8]), splitTf32(v0[S + dt * 8])};
        mma3xTf32(po[dt], a, b);
      }
    }
#pragma unroll
    for (int dt = 0; dt < kDimTiles; ++dt) {
      o[dt][0] = fmaf(o[dt][0], corrA, po[dt][0]);
      o[dt][1] = fmaf(o[dt][1], corrA, po[dt][1]);
      o[dt][2] = fmaf(o[dt][2], corrB, po[dt][2]);
      o[dt][3] = fmaf(o[dt][3], corrB, po[dt][3]);
    }
  }
  lA += __shfl_xor_sync(0xffffffffu, lA, 1);
  lA += __shfl_xor_sync(0xffffffffu, lA, 2);
  lB += __shfl_xor_sync(0xffffffffu, lB, 1);
  lB += __shfl_xor_sync(0xffffffffu, lB, 2);
#pragma unroll
  for (int dt = 0; dt < kDimTiles; ++dt) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int r = c < 2 ? rowA : rowB, d = dt * 8 + 2 * t + (c & 1);
      const float l = c < 2 ? lA : lB;
      if (r < n && d < headDim) out[((int64_t)r * numHeads + h) * headDim + d] = l > 0.0f ? o[dt][c] / l : 0.0f;
    }
  }
}

// Whether a head's K/V rows in the paged pool can be read as float4 (16-byte aligned rows).
bool kvRowsLoadAsFloat4(const PagedKv& kv, int headDim) {
  return headDim % 4 == 0 && kv.kvDim % 4 == 0 && kv.pageFloats % 4 == 0 && reinterpret_cast<uintptr_t>(kv.pool) % 16 == 0;
}

template <int kDim>
void launchPrefill(const float* q, int n, const int32_t* positions, const PagedKv& kv, int numHeads, int numKvHeads,
                   int headDim, bool strict, int window, float scale, float* out, cudaStream_t stream) {
  // Head size 64 needs 52 KB and 128 needs 101 KB, above the 48 KB a launch gets without asking.
  static const cudaError_t raised = cudaFuncSetAttribute(attentionPrefillKernel<kDim>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                         (int)prefillSmemBytes(kDim));
  LCKV_CUDA_CHECK(raised);
  const bool vec4 = kvRowsLoadAsFloat4(kv, headDim);
  launchKernel(attentionPrefillKernel<kDim>, dim3((n + kPrefillQueries - 1) / kPrefillQueries, numHeads), kPrefillWarps * 32,
               prefillSmemBytes(kDim), stream, q, positions, kv, n, numHeads, numKvHeads, headDim, strict, window, scale, vec4, out);
  LCKV_LAUNCH_CHECK("attention_prefill");
}

int smCount() {
  static int count = [] {
    int dev = 0, c = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, dev);
    return c > 0 ? c : 100;
  }();
  return count;
}

template <int kDimsPerLane>
const void* preparedDecodeKernel() {
  // Head size 128 needs ~71 KB, above the 48 KB a launch gets without asking.
  static const cudaError_t raised =
      cudaFuncSetAttribute(attentionDecodeKernel<kDimsPerLane>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           (int)(sizeof(float) * decodeSmemFloats(32 * kDimsPerLane)));
  LCKV_CUDA_CHECK(raised);
  return reinterpret_cast<const void*>(attentionDecodeKernel<kDimsPerLane>);
}

// Decode blocks the GPU runs at once for this head size (shared memory sets it).
int decodeResidentBlocks(int headDim) {
  static std::atomic<int> known[32 * kMaxDimsPerLane + 1];
  int blocks = known[headDim].load(std::memory_order_relaxed);
  if (blocks == 0) {
    const void* kernel = nullptr;
    switch ((headDim + 31) / 32) {
      case 1: kernel = preparedDecodeKernel<1>(); break;
      case 2: kernel = preparedDecodeKernel<2>(); break;
      case 3: kernel = preparedDecodeKernel<3>(); break;
      default: kernel = preparedDecodeKernel<4>(); break;
    }
    int perSm = 0;
    LCKV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&perSm, kernel, kDecodeWarps * 32,
                                                                  sizeof(float) * decodeSmemFloats(headDim)));
    blocks = std::max(1, perSm) * smCount();
    known[headDim].store(blocks, std::memory_order_relaxed);
  }
  return blocks;
}

// Splits of the decode kernel for `blocks` blocks per split and the longest visible range: as
// many as fill the GPU in one wave (a second, partial wave would leave most of the GPU idle
// while it runs), within kMinSplitKeys and kMaxSplits.
int decodeSplits(int64_t blocks, int headDim, int maxVisible) {
  const int64_t wave = decodeResidentBlocks(headDim) / blocks;
  const int64_t most = ((int64_t)maxVisible + kMinSplitKeys - 1) / kMinSplitKeys;
  return (int)std::max<int64_t>(1, std::min<int64_t>({wave, most, kMaxSplits}));
}

// Query heads of one K/V head's group per block, and blocks per group: the group cut into
// equal parts of at most kGroupHeads.
void decodeHeadBlocks(int group, int& headsPerBlock, int& headChunks) {
  const int parts = (group + kGroupHeads - 1) / kGroupHeads;
  headsPerBlock = (group + parts - 1) / parts;
  headChunks = (group + headsPerBlock - 1) / headsPerBlock;
}

template <int kDimsPerLane>
void launchDecode(const float* q, int n, const int32_t* positions, const PagedKv& kv, int numHeads, int numKvHeads,
                  int headDim, bool strict, int window, float scale, int headChunks, int headsPerBlock, int splits,
                  float* out, float* partial, cudaStream_t stream) {
  preparedDecodeKernel<kDimsPerLane>();
  const bool vec4 = kvRowsLoadAsFloat4(kv, headDim);
  launchKernel(attentionDecodeKernel<kDimsPerLane>, dim3(n, numKvHeads * headChunks, splits), kDecodeWarps * 32,
               sizeof(float) * decodeSmemFloats(headDim), stream, q, positions, kv, numHeads, numKvHeads, headDim, strict, window, scale, headChunks, headsPerBlock, vec4, out,
          partial);
}

}  // namespace

void launchAttention(const float* q, int n, const int32_t* positions, int maxVisible, const PagedKv& kv, int numHeads,
                     int numKvHeads, int headDim, bool strict, int window, float scale, bool oneSequence, float* out,
                     float* workspace, int64_t workspaceFloats, cudaStream_t stream) {
  NvtxRange r("attention");
  if (n <= 0) return;
  if (headDim <= 0 || headDim > 32 * kMaxDimsPerLane) throw std::invalid_argument("attention: headDim outside 1..128");
  if (numKvHeads <= 0 || numHeads % numKvHeads) throw std::invalid_argument("attention: numHeads % numKvHeads != 0");
  if (kv.kvDim != numKvHeads * headDim) throw std::invalid_argument("attention: kvDim != numKvHeads * headDim");
  if (oneSequence && n >= kPrefillMinQueries) {
    if (headDim <= 16)
      launchPrefill<16>(q, n, positions, kv, numHeads, numKvHeads, headDim, strict, window, scale, out, stream);
    else if (headDim <= 32)
      launchPrefill<32>(q, n, positions, kv, numHeads, numKvHeads, headDim, strict, window, scale, out, stream);
    else if (headDim <= 64)
      launchPrefill<64>(q, n, positions, kv, numHeads, numKvHeads, headDim, strict, window, scale, out, stream);
    else
      launchPrefill<128>(q, n, positions, kv, numHeads, numKvHeads, headDim, strict, window, scale, out, stream);
    return;
  }
  int headsPerBlock = 0, headChunks = 0;
  decodeHeadBlocks(numHeads / numKvHeads, headsPerBlock, headChunks);
  // maxVisible only sets the number of splits: each block finds its own keys on the device.
  int splits = decodeSplits((int64_t)n * numKvHeads * headChunks, headDim, maxVisible);
  if (splits > 1 && (int64_t)n * numHeads * splits * (headDim + 2) > workspaceFloats) splits = 1;
  switch ((headDim + 31) / 32) {
    case 1:
      launchDecode<1>(q, n, positions, kv, numHeads, numKvHeads, headDim, strict, window, scale, headChunks,
                      headsPerBlock, splits, out, workspace, stream);
      break;
    case 2:
      launchDecode<2>(q, n, positions, kv, numHeads, numKvHeads, headDim, strict, window, scale, headChunks,
                      headsPerBlock, splits, out, workspace, stream);
      break;
    case 3:
      launchDecode<3>(q, n, positions, kv, numHeads, numKvHeads, headDim, strict, window, scale, headChunks,
                      headsPerBlock, splits, out, workspace, stream);
      break;
    default:
      launchDecode<4>(q, n, positions, kv, numHeads, numKvHeads, headDim, strict, window, scale, headChunks,
                      headsPerBlock, splits, out, workspace, stream);
      break;
  }
  LCKV_LAUNCH_CHECK("attention");
  if (splits > 1) {
    launchKernel(attentionMergeKernel, dim3(n, numHeads), kMergeThreads, 0, stream, workspace, numHeads, headDim, splits, out);
    LCKV_LAUNCH_CHECK("attention_merge");
  }
}

// The same number of splits as the launcher chooses for these arguments.
int64_t attentionWorkspaceFloats(int n, int numHeads, int numKvHeads, int headDim, int maxVisible) {
  if (n <= 0 || numHeads <= 0 || numKvHeads <= 0 || numHeads % numKvHeads || headDim <= 0 || headDim > 32 * kMaxDimsPerLane)
    return 0;  // the launcher refuses these
  int headsPerBlock = 0, headChunks = 0;
  decodeHeadBlocks(numHeads / numKvHeads, headsPerBlock, headChunks);
  const int64_t splits = decodeSplits((int64_t)n * numKvHeads * headChunks, headDim, maxVisible);
  return splits > 1 ? (int64_t)n * numHeads * splits * (headDim + 2) : 0;
}

}  // namespace lckv::cuda
