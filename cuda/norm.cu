// RMSNorm and LayerNorm (optionally with the residual add fused in): one block per row, f32
// statistics.
//
// Decode normalises a single row, so the kernel's latency is the cost: each thread loads its
// slice of the row once into registers (float4 loads where the row allows), adds the residual,
// reduces the statistics with one block reduction per statistic (one for RMSNorm; mean then
// variance for LayerNorm, two passes over the registers, which is more exact than
// sum/sum-of-squares) and writes the output once. Rows too long to fit in registers take the
// multi-pass loop over global memory instead.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common.cuh"
#include "kernels.h"

namespace lckv::cuda {

namespace {

// Most threads a row's block uses on the register path (the kernels' launch bound). A decode
// row is one block alone on the GPU, so more threads each holding less beat fewer holding more.
constexpr int kMaxRowThreads = 512;
// Most vectors (float4 or single floats) a thread holds on the register path.
constexpr int kMaxVectorsPerThread = 8;
// Above this many floats per thread the weight and bias are loaded after the statistics instead
// of being prefetched beside the row, to keep the kernel clear of register spills.
constexpr int kMaxPrefetchFloats = 16;
// Threads of the multi-pass loop kernel.
constexpr int kLoopThreads = 256;

// kWidth consecutive floats (kWidth is 4 or 1), as one load or store.
template <int kWidth>
__device__ __forceinline__ void loadFloats(const float* p, float (&v)[kWidth]) {
  if constexpr (kWidth == 4) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
    v[0] = *p;
  }
}
template <int kWidth>
__device__ __forceinline__ void storeFloats(float* p, const float (&v)[kWidth]) {
  if constexpr (kWidth == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    *p = v[0];
  }
}

// kWidth consecutive outputs: f32 as storeFloats, bf16 rounded to nearest (what the cuBLASLt
// path's own conversion of an f32 row gives, so a norm that writes bf16 for a matrix product
// changes no result).
template <int kWidth>
__device__ __forceinline__ void storeOut(float* p, const float (&v)[kWidth]) {
  storeFloats<kWidth>(p, v);
}
template <int kWidth>
__device__ __forceinline__ void storeOut(__nv_bfloat16* p, const float (&v)[kWidth]) {
  if constexpr (kWidth == 4) {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(v[0], v[1]), hi = __floats2bfloat162_rn(v[2], v[3]);
    uint2 q;
    memcpy(&q.x, &lo, sizeof lo);
    memcpy(&q.y, &hi, sizeof hi);
    *reinterpret_cast<uint2*>(p) = q;
  } else {
    *p = __float2bfloat16(v[0]);
  }
}

// kWidth consecutive weights as floats, through the read-only cache: one 16-byte load for f32,
// one 8-byte load for bf16 and f16.
template <int kWidth>
__device__ __forceinline__ void loadWeights(const float* p, float (&v)[kWidth]) {
  if constexpr (kWidth == 4) {
    const float4 q = __ldg(reinterpret_cast<const float4*>(p));
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
    v[0] = __ldg(p);
  }
}
template <int kWidth, typename W>  // bf16 or f16
__device__ __forceinline__ void loadWeights(const W* p, float (&v)[kWidth]) {
  if constexpr (kWidth == 4) {
    const uint2 q = __ldg(reinterpret_cast<const uint2*>(p));
    typename Pair<W>::type lo, hi;
    memcpy(&lo, &q.x, sizeof lo);
    memcpy(&hi, &q.y, sizeof hi);
    const float2 a = toFloat2(lo), b = toFloat2(hi);
    v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
  } else {
    v[0] = toFloat(p[0]);
  }
}

// The block's total of v, in every thread. Each reduction gets its own `partials` array, so two
// in a row need only the one barrier each.
__device__ __forceinline__ float blockSumToAll(float v, float* partials) {
  v = warpSum(v);
  if ((threadIdx.x & 31) == 0) partials[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.0f;
  const int warps = blockDim.x >> 5;
  for (int w = 0; w < warps; ++w) total += partials[w];
  return total;
}

// One row per block, held in registers: vector k of a thread is vector threadIdx.x + k * blockDim.x
// of the row (a vector is kWidth consecutive floats; kWidth is 4 when E % 4 == 0 and every
// pointer is aligned for it). With delta != nullptr, first x += delta (the residual add).
// blockDim.x is a multiple of 32 and blockDim.x * kVectors * kWidth >= E.
template <typename W, typename O, bool kRms, int kWidth, int kVectors>
__global__ void __launch_bounds__(kMaxRowThreads)
    normRowInRegisters(float* x, const float* delta, int E, const W* weight, const W* bias, float eps, O* out) {
  waitForPrecedingKernels();
  constexpr bool kPrefetch = kVectors * kWidth <= kMaxPrefetchFloats;
  __shared__ float meanPartials[kMaxRowThreads / 32];
  __shared__ float sqPartials[kMaxRowThreads / 32];
  const int64_t rowStart = (int64_t)blockIdx.x * E;
  float* xr = x + rowStart;
  O* o = out + rowStart;
  const int vectors = E / kWidth;
  auto owns = [&](int k) { return (int)threadIdx.x + k * (int)blockDim.x < vectors; };
  auto at = [&](int k) { return ((int)threadIdx.x + k * (int)blockDim.x) * kWidth; };

  float v[kVectors][kWidth];
#pragma unroll
  for (int k = 0; k < kVectors; ++k) {
    if (owns(k)) {
      loadFloats<kWidth>(xr + at(k), v[k]);
    } else {
#pragma unroll
      for (int i = 0; i < kWidth; ++i) v[k][i] = 0.0f;
    }
  }
  // The weights do not depend on the statistics: loading them now overlaps their latency with
  // the row's and the reductions'.
  float w[kPrefetch ? kVectors : 1][kWidth], b[kPrefetch ? kVectors : 1][kWidth];
  if constexpr (kPrefetch) {
#pragma unroll
    for (int k = 0; k < kVectors; ++k) {
      if (owns(k)) {
        loadWeights<kWidth>(weight + at(k), w[k]);
        if (bias) {
          loadWeights<kWidth>(bias + at(k), b[k]);
        } else {
#pragma unroll
          for (int i = 0; i < kWidth; ++i) b[k][i] = 0.0f;
        }
      }
    }
  }
  if (delta) {
    const float* dr = delta + rowStart;
#pragma unroll
    for (int k = 0; k < kVectors; ++k) {
      if (owns(k)) {
        float d[kWidth];
        loadFloats<kWidth>(dr + at(k), d);
#pragma unroll
        for (int i = 0; i < kWidth; ++i) v[k][i] += d[i];
      }
    }
#pragma unroll
    for (int k = 0; k < kVectors; ++k) {
      if (owns(k)) storeFloats<kWidth>(xr + at(k), v[k]);
    }
  }

  // Elements past the row end are 0, so they add nothing to the sums below except the centred
  // squares of LayerNorm, which skip them.
  float mean = 0.0f;
  if constexpr (!kRms) {
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < kVectors; ++k) {
#pragma unroll
      for (int i = 0; i < kWidth; ++i) s += v[k][i];
    }
    mean = blockSumToAll(s, meanPartials) / (float)E;
  }
  float sq = 0.0f;
#pragma unroll
  for (int k = 0; k < kVectors; ++k) {
    if (kRms || owns(k)) {
#pragma unroll
      for (int i = 0; i < kWidth; ++i) {
        const float c = v[k][i] - mean;
        sq += c * c;
      }
    }
  }
  const float inv = rsqrtf(blockSumToAll(sq, sqPartials) / (float)E + eps);

#pragma unroll
  for (int k = 0; k < kVectors; ++k) {
    if (!owns(k)) continue;
    float wk[kWidth], bk[kWidth];
    if constexpr (kPrefetch) {
#pragma unroll
      for (int i = 0; i < kWidth; ++i) wk[i] = w[k][i], bk[i] = b[k][i];
    } else {
      loadWeights<kWidth>(weight + at(k), wk);
      if (bias) loadWeights<kWidth>(bias + at(k), bk);
    }
    float r[kWidth];
#pragma unroll
    for (int i = 0; i < kWidth; ++i) {
      r[i] = (v[k][i] - mean) * inv * wk[i];
      if (bias) r[i] += bk[i];
    }
    storeOut<kWidth>(o + at(k), r);
  }
}

__device__ float blockSum(float v, float* shared) {
  v = warpSum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? shared[threadIdx.x] : 0.0f;
  if (warp == 0) v = warpSum(v);
  if (threadIdx.x == 0) shared[0] = v;
  __syncthreads();
  v = shared[0];
  __syncthreads();
  return v;
}

// Rows too long for registers: the same arithmetic, walking the row in global memory.
template <typename W, typename O>
__global__ void normRowLoop(bool rms, float* x, const float* delta, int E, const W* weight, const W* bias, float eps,
                            O* out) {
  waitForPrecedingKernels();
  __shared__ float shared[32];
  float* xr = x + (int64_t)blockIdx.x * E;
  O* o = out + (int64_t)blockIdx.x * E;
  if (delta) {
    const float* dr = delta + (int64_t)blockIdx.x * E;
    for (int j = threadIdx.x; j < E; j += blockDim.x) xr[j] += dr[j];
    __syncthreads();
  }
  float mean = 0.0f;
  if (!rms) {
    float s = 0.0f;
    for (int j = threadIdx.x; j < E; j += blockDim.x) s += xr[j];
    mean = blockSum(s, shared) / (float)E;
  }
  float ss = 0.0f;
  for (int j = threadIdx.x; j < E; j += blockDim.x) {
    const float d = xr[j] - mean;
    ss += d * d;
  }
  const float inv = rsqrtf(blockSum(ss, shared) / (float)E + eps);
  for (int j = threadIdx.x; j < E; j += blockDim.x) {
    float v = (xr[j] - mean) * inv * toFloat(weight[j]);
    if (bias) v += toFloat(bias[j]);
    if constexpr (std::is_same_v<O, float>) o[j] = v;
    else o[j] = __float2bfloat16(v);
  }
}

bool alignedTo(const void* p, size_t bytes) { return p == nullptr || (uintptr_t)p % bytes == 0; }

// How the register path splits a row of `vectors` vectors: vectors per thread and threads.
struct RowSplit {
  int vectorsPerThread;
  int threads;
};
// The fewest vectors per thread that keep the block within kMaxRowThreads; {0, 0} when the row
// does not fit in registers.
RowSplit splitRow(int vectors) {
  for (int perThread = 1; perThread <= kMaxVectorsPerThread; perThread *= 2) {
    const int threads = (vectors + perThread - 1) / perThread;
    if (threads <= kMaxRowThreads) return {perThread, (threads + 31) / 32 * 32};
  }
  return {0, 0};
}

template <typename W, typename O, bool kRms, int kWidth>
void launchRowsInRegisters(RowSplit split, int n, float* x, const float* delta, int E, const W* weight, const W* bias,
                           float eps, O* out, cudaStream_t stream) {
  switch (split.vectorsPerThread) {
    case 1: launchKernel(normRowInRegisters<W, O, kRms, kWidth, 1>, n, split.threads, 0, stream, x, delta, E, weight, bias, eps, out); break;
    case 2: launchKernel(normRowInRegisters<W, O, kRms, kWidth, 2>, n, split.threads, 0, stream, x, delta, E, weight, bias, eps, out); break;
    case 4: launchKernel(normRowInRegisters<W, O, kRms, kWidth, 4>, n, split.threads, 0, stream, x, delta, E, weight, bias, eps, out); break;
    case 8: launchKernel(normRowInRegisters<W, O, kRms, kWidth, 8>, n, split.threads, 0, stream, x, delta, E, weight, bias, eps, out); break;
    default: throw std::logic_error("norm: no kernel for this row split");
  }
}

template <typename W, typename O>
void launchTyped(bool rms, float* x, const float* delta, int n, int E, const W* weight, const W* bias, float eps,
                 O* out, cudaStream_t stream) {
  const bool vec4 = E % 4 == 0 && alignedTo(x, 16) && alignedTo(delta, 16) && alignedTo(out, 4 * sizeof(O)) &&
                    alignedTo(weight, 4 * sizeof(W)) && alignedTo(bias, 4 * sizeof(W));
  const RowSplit split = splitRow(vec4 ? E / 4 : E);
  if (split.vectorsPerThread == 0) {
    launchKernel(normRowLoop<W, O>, n, kLoopThreads, 0, stream, rms, x, delta, E, weight, bias, eps, out);
  } else if (vec4) {
    if (rms) launchRowsInRegisters<W, O, true, 4>(split, n, x, delta, E, weight, bias, eps, out, stream);
    else launchRowsInRegisters<W, O, false, 4>(split, n, x, delta, E, weight, bias, eps, out, stream);
  } else {
    if (rms) launchRowsInRegisters<W, O, true, 1>(split, n, x, delta, E, weight, bias, eps, out, stream);
    else launchRowsInRegisters<W, O, false, 1>(split, n, x, delta, E, weight, bias, eps, out, stream);
  }
}

template <typename O>
void launchWithWeights(bool rms, float* x, const float* delta, int n, int E, const void* weight, const void* bias,
                       int wtype, float eps, O* out, cudaStream_t stream) {
  switch ((WeightType)wtype) {
    case WeightType::F32:
      launchTyped(rms, x, delta, n, E, (const float*)weight, (const float*)bias, eps, out, stream);
      break;
    case WeightType::BF16:
      launchTyped(rms, x, delta, n, E, (const __nv_bfloat16*)weight, (const __nv_bfloat16*)bias, eps, out, stream);
      break;
    case WeightType::F16:
      launchTyped(rms, x, delta, n, E, (const __half*)weight, (const __half*)bias, eps, out, stream);
      break;
    default: throw std::invalid_argument("norm: unknown weight type");
  }
}

void launchNormImpl(bool rms, float* x, const float* delta, int n, int E, const void* weight, const void* bias,
                    int wtype, float eps, void* out, bool outBf16, cudaStream_t stream) {
  if (n <= 0 || E <= 0) throw std::invalid_argument("norm: empty shape");
  if (outBf16) launchWithWeights(rms, x, delta, n, E, weight, bias, wtype, eps, (__nv_bfloat16*)out, stream);
  else launchWithWeights(rms, x, delta, n, E, weight, bias, wtype, eps, (float*)out, stream);
  LCKV_LAUNCH_CHECK("norm");
}

}  // namespace

void launchNorm(bool rms, const float* x, int n, int E, const void* weight, const void* bias, int wtype, float eps,
                void* out, bool outBf16, cudaStream_t stream) {
  NvtxRange r(rms ? "rms_norm" : "layer_norm");
  launchNormImpl(rms, const_cast<float*>(x), nullptr, n, E, weight, bias, wtype, eps, out, outBf16, stream);
}

void launchAddNorm(bool rms, float* x, const float* delta, int n, int E, const void* weight, const void* bias, int wtype,
                   float eps, void* out, bool outBf16, cudaStream_t stream) {
  NvtxRange r(rms ? "add_rms_norm" : "add_layer_norm");
  launchNormImpl(rms, x, delta, n, E, weight, bias, wtype, eps, out, outBf16, stream);
}

}  // namespace lckv::cuda
