// Condensed-KV attention: the queries of one layer attend to the K/V slot of the layer's
// target, with the plan's diagonal rule (strict: keys < p; no visible key -> zero output) and
// sliding window. GQA maps query head h to K/V head h / (numHeads / numKvHeads).
//
// Split-K (flash-decoding): the visible keys of each (query, head) are cut into chunks, one
// block per chunk, so that a single decoding sequence still fills the GPU. Each block keeps an
// online softmax per warp, merges its warps, and writes (max, sum, unnormalised output) for its
// chunk; a second kernel merges the chunks. When one chunk covers the keys, the first kernel
// writes the final output directly.
#include <algorithm>
#include <climits>

#include "common.cuh"
#include "kernels.h"

namespace lckv::cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kMaxDimsPerLane = 4;  // headDim <= 128
constexpr int kUnroll = 4;          // keys in flight per warp

struct Range {
  int first, last;  // visible keys [first, last]; empty when last < first
};

__device__ __forceinline__ Range visible(int p, bool strict, int window) {
  return {window > 0 ? max(0, p - window + 1) : 0, strict ? p - 1 : p};
}

__global__ void attentionChunkKernel(const float* __restrict__ q, const int32_t* __restrict__ positions, PagedKv kv,
                                     int numHeads, int numKvHeads, int headDim, bool strict, int window, float scale,
                                     int chunk, float* __restrict__ out, float* __restrict__ partial) {
  const int r = blockIdx.x, h = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kvDim = kv.kvDim;
  const int kvh = h / (numHeads / numKvHeads);
  const int32_t* table = kv.tables + (int64_t)kv.rowSeq[r] * kv.stride;
  // The pages hold [K | V][pageTokens][kvDim] per slot: within a page, keys are contiguous.
  const float* kBase = kv.pool + ((int64_t)(kv.slot * 2) << kv.pageShift) * kvDim + kvh * headDim;
  const float* vBase = kv.pool + ((int64_t)(kv.slot * 2 + 1) << kv.pageShift) * kvDim + kvh * headDim;
  const int pageMask = (1 << kv.pageShift) - 1;
  const Range all = visible(positions[r], strict, window);
  const int first = all.first + split * chunk;
  const int last = min(all.last, first + chunk - 1);
  const float* qv = q + ((int64_t)r * numHeads + h) * headDim;

  float qreg[kMaxDimsPerLane], acc[kMaxDimsPerLane];
#pragma unroll
  for (int t = 0; t < kMaxDimsPerLane; ++t) {
    const int d = lane + 32 * t;
    qreg[t] = d < headDim ? qv[d] * scale : 0.0f;
    acc[t] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  // Each warp takes kUnroll consecutive keys at a time, so their loads are in flight together.
  for (int j0 = first + warp * kUnroll; j0 <= last; j0 += kWarps * kUnroll) {
    float s[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u;
      float d = 0.0f;
      if (j <= last) {
        const float* kr = kBase + (int64_t)table[j >> kv.pageShift] * kv.pageFloats + (int64_t)(j & pageMask) * kvDim;
#pragma unroll
        for (int t = 0; t < kMaxDimsPerLane; ++t) {
          const int dd = lane + 32 * t;
          if (dd < headDim) d += qreg[t] * kr[dd];
        }
      }
      s[u] = d;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) s[u] = j0 + u <= last ? warpSum(s[u]) : -INFINITY;
    float mNew = m;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) mNew = fmaxf(mNew, s[u]);
    const float corr = __expf(m - mNew);
    l *= corr;
#pragma unroll
    for (int t = 0; t < kMaxDimsPerLane; ++t) acc[t] *= corr;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u;
      if (j > last) break;
      const float w = __expf(s[u] - mNew);
      l += w;
      const float* vr = vBase + (int64_t)table[j >> kv.pageShift] * kv.pageFloats + (int64_t)(j & pageMask) * kvDim;
#pragma unroll
      for (int t = 0; t < kMaxDimsPerLane; ++t) {
        const int dd = lane + 32 * t;
        if (dd < headDim) acc[t] += w * vr[dd];
      }
    }
    m = mNew;
  }

  // Merge the warps of this block.
  __shared__ float sm[kWarps], sl[kWarps];
  __shared__ float sacc[kWarps][32 * kMaxDimsPerLane];
  if (lane == 0) {
    sm[warp] = m;
    sl[warp] = l;
  }
#pragma unroll
  for (int t = 0; t < kMaxDimsPerLane; ++t) sacc[warp][lane + 32 * t] = acc[t];
  __syncthreads();
  float M = -INFINITY;
  for (int w = 0; w < kWarps; ++w) M = fmaxf(M, sm[w]);
  float L = 0.0f;
  for (int w = 0; w < kWarps; ++w)
    if (sm[w] != -INFINITY) L += sl[w] * __expf(sm[w] - M);
  const int64_t slot = ((int64_t)r * numHeads + h) * splits + split;
  for (int d = threadIdx.x; d < headDim; d += blockDim.x) {
    float v = 0.0f;
    for (int w = 0; w < kWarps; ++w)
      if (sm[w] != -INFINITY) v += sacc[w][d] * __expf(sm[w] - M);
    if (splits == 1) {
      out[((int64_t)r * numHeads + h) * headDim + d] = L > 0.0f ? v / L : 0.0f;
    } else {
      partial[slot * (headDim + 2) + 2 + d] = v;
    }
  }
  if (splits > 1 && threadIdx.x == 0) {
    partial[slot * (headDim + 2)] = M;
    partial[slot * (headDim + 2) + 1] = L;
  }
}

// Merges the chunks of each (query, head): out = sum_c exp(M_c - M) acc_c / sum_c exp(M_c - M) L_c.
__global__ void attentionMergeKernel(const float* __restrict__ partial, int numHeads, int headDim, int splits,
                                     float* __restrict__ out) {
  const int r = blockIdx.x, h = blockIdx.y;
  const float* base = partial + ((int64_t)r * numHeads + h) * splits * (headDim + 2);
  float M = -INFINITY;
  for (int c = 0; c < splits; ++c) M = fmaxf(M, base[c * (headDim + 2)]);
  float L = 0.0f;
  for (int c = 0; c < splits; ++c) {
    const float mc = base[c * (headDim + 2)];
    if (mc != -INFINITY) L += base[c * (headDim + 2) + 1] * __expf(mc - M);
  }
  for (int d = threadIdx.x; d < headDim; d += blockDim.x) {
    float v = 0.0f;
    for (int c = 0; c < splits; ++c) {
      const float mc = base[c * (headDim + 2)];
      if (mc != -INFINITY) v += base[c * (headDim + 2) + 2 + d] * __expf(mc - M);
    }
    out[((int64_t)r * numHeads + h) * headDim + d] = L > 0.0f ? v / L : 0.0f;
  }
}

// Prefill: many queries of one sequence. A block takes kPrefillQueries consecutive queries of
// one head and streams the keys they can see in tiles of 32 through shared memory, so each key
// is read once per tile of queries instead of once per query (the split-K kernel above reads
// it once per query, which made long prompts memory-bound). Lane j scores key j of the tile
// for one query at a time (dot product over the head from shared memory, no shuffles), the
// warp keeps an online softmax per query, and each lane accumulates its dims of the output.
constexpr int kPrefillWarps = 4;
constexpr int kPrefillQueriesPerWarp = 8;
constexpr int kPrefillQueries = kPrefillWarps * kPrefillQueriesPerWarp;
constexpr int kKeyTile = 32;
// Below this many queries of one sequence the split-K kernel is used (it fills the GPU better).
constexpr int kPrefillMinQueries = 16;

__global__ void __launch_bounds__(kPrefillWarps * 32) attentionPrefillKernel(
    const float* __restrict__ q, const int32_t* __restrict__ positions, PagedKv kv, int n, int numHeads, int numKvHeads,
    int headDim, bool strict, int window, float scale, float* __restrict__ out) {
  extern __shared__ float smem[];
  const int hdPad = headDim + 1;  // row stride: lane j reading row j column d is conflict-free
  float* ks = smem;                       // [kKeyTile][hdPad]
  float* vs = ks + kKeyTile * hdPad;      // [kKeyTile][hdPad]
  float* qs = vs + kKeyTile * hdPad;      // [kPrefillQueries][headDim], pre-scaled
  float* ps = qs + kPrefillQueries * headDim;  // [kPrefillWarps][32] probabilities of one query
  const int h = blockIdx.y, kvh = h / (numHeads / numKvHeads);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int r0 = blockIdx.x * kPrefillQueries;
  const int kvDim = kv.kvDim;
  const int32_t* table = kv.tables + (int64_t)kv.rowSeq[r0] * kv.stride;  // one sequence for all rows
  const float* kBase = kv.pool + ((int64_t)(kv.slot * 2) << kv.pageShift) * kvDim + kvh * headDim;
  const float* vBase = kv.pool + ((int64_t)(kv.slot * 2 + 1) << kv.pageShift) * kvDim + kvh * headDim;
  const int pageMask = (1 << kv.pageShift) - 1;

  // The block's queries (scaled) and the keys any of them can see.
  int lo = INT_MAX, hi = -1;
  for (int i = 0; i < kPrefillQueries; ++i) {
    const int r = r0 + i;
    if (r >= n) break;
    const Range v = visible(positions[r], strict, window);
    if (v.last >= v.first) {
      lo = min(lo, v.first);
      hi = max(hi, v.last);
    }
  }
  for (int e = threadIdx.x; e < kPrefillQueries * headDim; e += blockDim.x) {
    const int i = e / headDim, d = e % headDim;
    qs[e] = r0 + i < n ? q[((int64_t)(r0 + i) * numHeads + h) * headDim + d] * scale : 0.0f;
  }

  // Per query of this warp: running max, sum and this lane's output dims.
  float m[kPrefillQueriesPerWarp], l[kPrefillQueriesPerWarp], acc[kPrefillQueriesPerWarp][kMaxDimsPerLane];
  Range rng[kPrefillQueriesPerWarp];
#pragma unroll
  for (int i = 0; i < kPrefillQueriesPerWarp; ++i) {
    const int r = r0 + warp * kPrefillQueriesPerWarp + i;
    rng[i] = r < n ? visible(positions[r], strict, window) : Range{1, 0};
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int t = 0; t < kMaxDimsPerLane; ++t) acc[i][t] = 0.0f;
  }

  for (int j0 = (hi >= 0 ? lo : 0); j0 <= hi; j0 += kKeyTile) {
    __syncthreads();  // the previous tile is no longer read (and qs is written, first time)
    for (int e = threadIdx.x; e < kKeyTile * headDim; e += blockDim.x) {
      const int jj = e / headDim, d = e % headDim, j = j0 + jj;
      float kx = 0.0f, vx = 0.0f;
      if (j <= hi) {
        const int64_t off = (int64_t)table[j >> kv.pageShift] * kv.pageFloats + (int64_t)(j & pageMask) * kvDim + d;
        kx = kBase[off];
        vx = vBase[off];
      }
      ks[jj * hdPad + d] = kx;
      vs[jj * hdPad + d] = vx;
    }
    __syncthreads();
    const int j = j0 + lane;
#pragma unroll
    for (int i = 0; i < kPrefillQueriesPerWarp; ++i) {
      if (rng[i].last < j0 || rng[i].first > j0 + kKeyTile - 1 || rng[i].last < rng[i].first) continue;  // warp-uniform
      const float* qi = qs + (warp * kPrefillQueriesPerWarp + i) * headDim;
      float s = -INFINITY;
      if (j >= rng[i].first && j <= rng[i].last) {
        s = 0.0f;
        for (int d = 0; d < headDim; ++d) s += qi[d] * ks[lane * hdPad + d];
      }
      const float mNew = fmaxf(m[i], warpMax(s));
      const float p = s == -INFINITY ? 0.0f : __expf(s - mNew);
      const float corr = __expf(m[i] - mNew);
      l[i] = l[i] * corr + warpSum(p);
      m[i] = mNew;
      ps[warp * 32 + lane] = p;
      __syncwarp();
#pragma unroll
      for (int t = 0; t < kMaxDimsPerLane; ++t) {
        const int d = lane + 32 * t;
        if (d < headDim) {
          float a = acc[i][t] * corr;
          for (int jj = 0; jj < kKeyTile; ++jj) a += ps[warp * 32 + jj] * vs[jj * hdPad + d];
          acc[i][t] = a;
        }
      }
      __syncwarp();
    }
  }
#pragma unroll
  for (int i = 0; i < kPrefillQueriesPerWarp; ++i) {
    const int r = r0 + warp * kPrefillQueriesPerWarp + i;
    if (r >= n) continue;
#pragma unroll
    for (int t = 0; t < kMaxDimsPerLane; ++t) {
      const int d = lane + 32 * t;
      if (d < headDim) out[((int64_t)r * numHeads + h) * headDim + d] = l[i] > 0.0f ? acc[i][t] / l[i] : 0.0f;
    }
  }
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

}  // namespace

void launchAttention(const float* q, int n, const int32_t* positions, int maxVisible, const PagedKv& kv, int numHeads,
                     int numKvHeads, int headDim, bool strict, int window, float scale, bool oneSequence, float* out,
                     float* workspace, int64_t workspaceFloats, cudaStream_t stream) {
  NvtxRange r("attention");
  if (n <= 0) return;
  if (headDim > 32 * kMaxDimsPerLane) throw std::invalid_argument("attention: headDim above 128");
  if (numKvHeads <= 0 || numHeads % numKvHeads) throw std::invalid_argument("attention: numHeads % numKvHeads != 0");
  if (kv.kvDim != numKvHeads * headDim) throw std::invalid_argument("attention: kvDim != numKvHeads * headDim");
  if (oneSequence && n >= kPrefillMinQueries) {
    const size_t smem = sizeof(float) * (2 * kKeyTile * (headDim + 1) + kPrefillQueries * headDim + kPrefillWarps * 32);
    // Head size 128 needs ~49 KB, above the 48 KB a launch gets without asking.
    static const cudaError_t raised = cudaFuncSetAttribute(attentionPrefillKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                           (int)(sizeof(float) * (2 * kKeyTile * 129 + kPrefillQueries * 128 + kPrefillWarps * 32)));
    LCKV_CUDA_CHECK(raised);
    attentionPrefillKernel<<<dim3((n + kPrefillQueries - 1) / kPrefillQueries, numHeads), kPrefillWarps * 32, smem, stream>>>(
        q, positions, kv, n, numHeads, numKvHeads, headDim, strict, window, scale, out);
    LCKV_LAUNCH_CHECK("attention_prefill");
    return;
  }
  // Enough chunks that the grid covers the GPU about twice, each at least 64 keys long.
  const int64_t base = (int64_t)n * numHeads;
  int splits = (int)std::max<int64_t>(1, std::min<int64_t>((2 * smCount() + base - 1) / base, (maxVisible + 63) / 64));
  const int64_t need = base * splits * (headDim + 2);
  if (splits > 1 && need > workspaceFloats) splits = 1;
  const int chunk = (maxVisible + splits - 1) / splits;
  attentionChunkKernel<<<dim3(n, numHeads, splits), kWarps * 32, 0, stream>>>(
      q, positions, kv, numHeads, numKvHeads, headDim, strict, window, scale, std::max(chunk, 1), out, workspace);
  LCKV_LAUNCH_CHECK("attention");
  if (splits > 1) {
    attentionMergeKernel<<<dim3(n, numHeads), 128, 0, stream>>>(workspace, numHeads, headDim, splits, out);
    LCKV_LAUNCH_CHECK("attention_merge");
  }
}

int64_t attentionWorkspaceFloats(int n, int numHeads, int headDim, int maxVisible) {
  const int64_t base = (int64_t)n * numHeads;
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>((2 * smCount() + base - 1) / base, (maxVisible + 63) / 64));
  return splits > 1 ? base * splits * (headDim + 2) : 0;
}

}  // namespace lckv::cuda
