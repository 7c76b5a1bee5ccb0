// Condensed-KV attention: queries of one layer attend to the K/V slot of the layer's target,
// with the plan's diagonal rule (strict: keys < p; no key -> zero output) and sliding window.
// This first version is one block per (query, head): each warp streams a strided share of the
// keys with an online softmax, then the warps' partial results are merged. GQA maps query head
// h to K/V head h / (numHeads / numKvHeads). Split-K across blocks comes with the decode work.
#include "common.cuh"
#include "kernels.h"

namespace lckv::cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kMaxDimsPerLane = 8;  // headDim <= 256

__global__ void attentionKernel(const float* __restrict__ q, const int32_t* __restrict__ positions,
                                const float* __restrict__ kCache, const float* __restrict__ vCache, int numHeads,
                                int numKvHeads, int headDim, bool strict, int window, float scale, float* __restrict__ out) {
  const int r = blockIdx.x, h = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kvDim = numKvHeads * headDim;
  const int kvh = h / (numHeads / numKvHeads);
  const int p = positions[r];
  const int last = strict ? p - 1 : p;
  const int first = window > 0 ? max(0, p - window + 1) : 0;
  const float* qv = q + ((int64_t)r * numHeads + h) * headDim;
  float* o = out + ((int64_t)r * numHeads + h) * headDim;
  if (last < first) {
    for (int d = threadIdx.x; d < headDim; d += blockDim.x) o[d] = 0.0f;
    return;
  }
  float qreg[kMaxDimsPerLane], acc[kMaxDimsPerLane];
#pragma unroll
  for (int t = 0; t < kMaxDimsPerLane; ++t) {
    const int d = lane + 32 * t;
    qreg[t] = d < headDim ? qv[d] * scale : 0.0f;
    acc[t] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (int j = first + warp; j <= last; j += kWarps) {
    const float* kr = kCache + (int64_t)j * kvDim + kvh * headDim;
    float s = 0.0f;
#pragma unroll
    for (int t = 0; t < kMaxDimsPerLane; ++t) {
      const int d = lane + 32 * t;
      if (d < headDim) s += qreg[t] * kr[d];
    }
    s = warpSum(s);
    const float mNew = fmaxf(m, s);
    const float corr = __expf(m - mNew);  // 0 when m = -inf
    const float w = __expf(s - mNew);
    l = l * corr + w;
    const float* vr = vCache + (int64_t)j * kvDim + kvh * headDim;
#pragma unroll
    for (int t = 0; t < kMaxDimsPerLane; ++t) {
      const int d = lane + 32 * t;
      if (d < headDim) acc[t] = acc[t] * corr + w * vr[d];
    }
    m = mNew;
  }
  // Merge the warps: rescale each to the block maximum.
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
  for (int w = 0; w < kWarps; ++w) L += sm[w] == -INFINITY ? 0.0f : sl[w] * __expf(sm[w] - M);
  for (int d = threadIdx.x; d < headDim; d += blockDim.x) {
    float v = 0.0f;
    for (int w = 0; w < kWarps; ++w)
      if (sm[w] != -INFINITY) v += sacc[w][d] * __expf(sm[w] - M);
    o[d] = v / L;
  }
}

}  // namespace

void launchAttention(const float* q, int n, const int32_t* positions, const float* kCache, const float* vCache,
                     int numHeads, int numKvHeads, int headDim, bool strict, int window, float scale, float* out,
                     cudaStream_t stream) {
  NvtxRange r("attention");
  if (n <= 0) return;
  if (headDim > 32 * kMaxDimsPerLane) throw std::invalid_argument("attention: headDim above 256");
  if (numKvHeads <= 0 || numHeads % numKvHeads) throw std::invalid_argument("attention: numHeads % numKvHeads != 0");
  attentionKernel<<<dim3(n, numHeads), kWarps * 32, 0, stream>>>(q, positions, kCache, vCache, numHeads, numKvHeads,
                                                                  headDim, strict, window, scale, out);
  LCKV_LAUNCH_CHECK("attention");
}

}  // namespace lckv::cuda
