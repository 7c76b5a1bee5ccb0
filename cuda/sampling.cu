// Token selection on the device, so that only the chosen id (and, when asked, its
// log-probabilities) crosses to the host. Greedy (temperature 0) with the repetition penalty,
// the presence and frequency penalties and the logit bias, and the log-probabilities: the CPU
// reference is native/engine/sampling.cpp, whose rules this follows exactly (ties go to the
// lowest id).
#include <climits>

#include "common.cuh"
#include "kernels.h"

namespace lckv::cuda {

namespace {

constexpr int kThreads = 1024;
constexpr int kArgmaxLoads = 16;

// x[t] of each (distinct) history token: divided by the penalty when positive, else multiplied.
__global__ void penaltyKernel(float* x, const int32_t* tokens, int count, int V, float penalty) {
  waitForPrecedingKernels();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const int t = tokens[i];
  if (t < 0 || t >= V) return;
  const float v = x[t];
  x[t] = v > 0.0f ? v / penalty : v * penalty;
}

__device__ __forceinline__ bool better(float v, int i, float bv, int bi) { return v > bv || (v == bv && i < bi); }

// The best (value, id) of the warp's lanes, by `better`, in every lane.
__device__ __forceinline__ void warpBest(float& bv, int& bi) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (better(ov, oi, bv, bi)) {
      bv = ov;
      bi = oi;
    }
  }
}

// Block b: the argmax of row b of x (rows ld floats apart), into out[b].
__global__ void argmaxKernel(const float* __restrict__ x, int V, int64_t ld, int32_t* __restrict__ out) {
  waitForPrecedingKernels();
  x += blockIdx.x * ld;
  out += blockIdx.x;
  __shared__ float sv[kThreads / 32];
  __shared__ int si[kThreads / 32];
  float bv = -INFINITY;
  int bi = V;
  // kArgmaxLoads loads per thread in flight before any is compared: a loop that compared each
  // logit as it arrived waited out one memory latency per 1024 logits (12.7 us for 32000 on an
  // H100, against a decode step of about 1.25 ms).
  for (int i0 = threadIdx.x; i0 < V; i0 += blockDim.x * kArgmaxLoads) {
    float v[kArgmaxLoads];
#pragma unroll
    for (int u = 0; u < kArgmaxLoads; ++u) {
      const int i = i0 + u * blockDim.x;
      v[u] = i < V ? x[i] : -INFINITY;
    }
#pragma unroll
    for (int u = 0; u < kArgmaxLoads; ++u) {
      const int i = i0 + u * blockDim.x;
      if (i < V && better(v[u], i, bv, bi)) {
        bv = v[u];
        bi = i;
      }
    }
  }
  warpBest(bv, bi);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sv[warp] = bv;
    si[warp] = bi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float v = sv[0];
    int b = si[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w)
      if (better(sv[w], si[w], v, b)) {
        v = sv[w];
        b = si[w];
      }
    *out = b < V ? b : 0;  // all -inf (or NaN): token 0, as the reference's loop gives
  }
}

// x[t] = (x[t] - subtract[i]) + add[i] for each distinct token t = tokens[i] (RowExtras): one
// thread per token, so each logit is read and written once.
__global__ void adjustKernel(float* x, const int32_t* tokens, const float* subtract, const float* add, int count, int V) {
  waitForPrecedingKernels();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const int t = tokens[i];
  if (t < 0 || t >= V) return;
  x[t] = (x[t] - subtract[i]) + add[i];
}

// ---- log-probabilities ----------------------------------------------------------------------
// One block per row. Each thread keeps the kMaxTopLogprobs best (logit, id) of its strided
// logits, sorted, in registers (the loops over the list are unrolled, so it is never indexed at
// run time); the warps then merge their threads' lists, and warp 0 the warps' lists, one
// winner per round. The first of the merged list is the row's maximum, from which the
// log-sum-exp follows in double, as on the CPU. A NaN logit counts as -inf, as the reference
// makes it.

constexpr int kLogprobThreads = 256;  // 40 registers of list per thread: 1024 threads would spill
constexpr int kTop = kMaxTopLogprobs;

__device__ __forceinline__ float finiteOrNegInf(float v) { return isnan(v) ? -INFINITY : v; }

// Takes the warp's best head of the lanes' sorted lists (all lanes get it) and pops it from
// the lane that held it. Ids are distinct, so one lane holds it (or every lane an empty slot).
__device__ __forceinline__ void popWarpBest(float (&tv)[kTop], int (&ti)[kTop], float& bv, int& bi) {
  bv = tv[0];
  bi = ti[0];
  warpBest(bv, bi);
  if (ti[0] == bi) {
#pragma unroll
    for (int j = 0; j + 1 < kTop; ++j) {
      tv[j] = tv[j + 1];
      ti[j] = ti[j + 1];
    }
    tv[kTop - 1] = -INFINITY;
    ti[kTop - 1] = INT_MAX;
  }
}

__global__ void __launch_bounds__(kLogprobThreads) logprobsKernel(const float* __restrict__ x, int V, const int32_t* __restrict__ chosen,
                                                                  int k, RowLogprobs* __restrict__ out) {
  waitForPrecedingKernels();
  constexpr int kWarps = kLogprobThreads / 32;
  __shared__ float warpV[kWarps][kTop];
  __shared__ int warpI[kWarps][kTop];
  __shared__ float topV[kTop];
  __shared__ int topI[kTop];
  __shared__ double warpSum[kWarps];
  float tv[kTop];
  int ti[kTop];
#pragma unroll
  for (int j = 0; j < kTop; ++j) {
    tv[j] = -INFINITY;
    ti[j] = INT_MAX;  // an empty slot: any logit, -inf included, is better
  }
  for (int i = threadIdx.x; i < V; i += blockDim.x) {
    const float v = finiteOrNegInf(x[i]);
    if (better(v, i, tv[kTop - 1], ti[kTop - 1])) {
      tv[kTop - 1] = v;
      ti[kTop - 1] = i;
#pragma unroll
      for (int j = kTop - 1; j > 0; --j)
        if (better(tv[j], ti[j], tv[j - 1], ti[j - 1])) {
          const float sv = tv[j];
          const int si = ti[j];
          tv[j] = tv[j - 1];
          ti[j] = ti[j - 1];
          tv[j - 1] = sv;
          ti[j - 1] = si;
        }
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int r = 0; r < kTop; ++r) {
    float bv;
    int bi;
    popWarpBest(tv, ti, bv, bi);
    if (lane == 0) {
      warpV[warp][r] = bv;
      warpI[warp][r] = bi;
    }
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int j = 0; j < kTop; ++j) {
      tv[j] = lane < kWarps ? warpV[lane][j] : -INFINITY;
      ti[j] = lane < kWarps ? warpI[lane][j] : INT_MAX;
    }
#pragma unroll
    for (int r = 0; r < kTop; ++r) {
      float bv;
      int bi;
      popWarpBest(tv, ti, bv, bi);
      if (lane == 0) {
        topV[r] = bv;
        topI[r] = bi;
      }
    }
  }
  __syncthreads();
  const double top = (double)topV[0];
  double sum = 0;
  if (top > -INFINITY)
    for (int i = threadIdx.x; i < V; i += blockDim.x) sum += exp((double)finiteOrNegInf(x[i]) - top);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) warpSum[warp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    sum = 0;
    for (int w = 0; w < kWarps; ++w) sum += warpSum[w];
    const double lse = top + log(sum);  // as the reference: logprob = x - lse, -inf when all are -inf
    const bool any = top > -INFINITY;
    out->chosen = any ? (double)finiteOrNegInf(x[*chosen]) - lse : -INFINITY;
    const int n = min(k, V);
    for (int j = 0; j < n; ++j) {
      out->top[j] = any ? (double)topV[j] - lse : -INFINITY;
      out->topTokens[j] = topI[j];
    }
  }
}

// The extras' logit changes on x (the row's own copy).
void adjustLogits(float* x, int V, const RowExtras& e, cudaStream_t stream) {
  if (e.count <= 0) return;
  launchKernel(adjustKernel, (e.count + 255) / 256, 256, 0, stream, x, e.tokens, e.subtract, e.add, e.count, V);
  LCKV_LAUNCH_CHECK("logit_adjust");
}

// The extras' log-probabilities of the processed row x, once *chosen holds the choice.
void writeLogprobs(const float* x, int V, const int32_t* chosen, const RowExtras& e, cudaStream_t stream) {
  if (e.logprobs < 0) return;
  if (e.logprobs > kMaxTopLogprobs || !e.logprobsOut) throw std::invalid_argument("logprobs: k above kMaxTopLogprobs, or nowhere to write");
  launchKernel(logprobsKernel, 1, kLogprobThreads, 0, stream, x, V, chosen, e.logprobs, e.logprobsOut);
  LCKV_LAUNCH_CHECK("logprobs");
}

}  // namespace

void launchGreedy(const float* logits, int V, float* scratch, const int32_t* penalized, int penalizedCount, float penalty,
                  const RowExtras& extras, int32_t* outToken, cudaStream_t stream) {
  NvtxRange r("sample_greedy");
  if (V <= 0) throw std::invalid_argument("greedy: empty vocabulary");
  const float* x = logits;
  const bool repetition = penalty != 1.0f && penalizedCount > 0;
  if (repetition || extras.count > 0) {
    LCKV_CUDA_CHECK(cudaMemcpyAsync(scratch, logits, sizeof(float) * (size_t)V, cudaMemcpyDeviceToDevice, stream));
    if (repetition) {
      launchKernel(penaltyKernel, (penalizedCount + 255) / 256, 256, 0, stream, scratch, penalized, penalizedCount, V, penalty);
      LCKV_LAUNCH_CHECK("repetition_penalty");
    }
    adjustLogits(scratch, V, extras, stream);
    x = scratch;
  }
  launchKernel(argmaxKernel, 1, kThreads, 0, stream, x, V, V, outToken);
  LCKV_LAUNCH_CHECK("argmax");
  writeLogprobs(x, V, outToken, extras, stream);
}

void launchGreedyRows(const float* logits, int rows, int V, int64_t ld, int32_t* outTokens, cudaStream_t stream) {
  NvtxRange r("sample_greedy_rows");
  if (V <= 0 || rows <= 0 || ld < V) throw std::invalid_argument("greedy rows: empty shape or rows shorter than V");
  launchKernel(argmaxKernel, rows, kThreads, 0, stream, logits, V, ld, outTokens);
  LCKV_LAUNCH_CHECK("argmax_rows");
}

}  // namespace lckv::cuda

// ---- Sampling with temperature, top-k, top-p and min-p -------------------------------------
// The reference (native/engine/sampling.cpp) sorts candidates by logit (descending, ties by id),
// keeps the top k, takes the softmax of the scaled logits in double, cuts to the smallest prefix
// whose mass reaches top-p, drops tokens under min-p times the most likely, and walks the
// cumulative mass to the uniform draw. Here the sort is CUB's stable radix sort and the walks are
// block-wide scans over the sorted candidates; only the chosen id leaves the device.
#include <cub/cub.cuh>

#include "../native/engine/rng.h"

namespace lckv::cuda {

namespace {

constexpr int kSelectThreads = 256;  // double math: 1024 threads would exceed the register file

struct MinOp {
  __device__ int operator()(int a, int b) const { return a < b ? a : b; }
};

__global__ void iotaKernel(int32_t* ids, int V) {
  waitForPrecedingKernels();
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < V; i += gridDim.x * blockDim.x) ids[i] = i;
}

using BlockScanD = cub::BlockScan<double, kSelectThreads>;
using BlockReduceD = cub::BlockReduce<double, kSelectThreads>;
using BlockReduceI = cub::BlockReduce<int, kSelectThreads>;

struct SelectShared {
  union {
    typename BlockScanD::TempStorage scan;
    typename BlockReduceD::TempStorage reduceD;
    typename BlockReduceI::TempStorage reduceI;
  };
  double value;
  int index;
};

// Sum of prob over [0, n), with prob_i = exp(x_i/T - x_0/T) / z (z = 1 for the unnormalised pass).
__device__ double blockSum(const float* x, int n, double invT, double top, double z, SelectShared& sh) {
  double s = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += exp((double)x[i] * invT - top) / z;
  s = BlockReduceD(sh.reduceD).Sum(s);
  if (threadIdx.x == 0) sh.value = s;
  __syncthreads();
  s = sh.value;
  __syncthreads();
  return s;
}

// The first i in [0, n) whose inclusive cumulative prob exceeds (strict) or reaches `target`;
// n when there is none. Each thread scans one contiguous segment.
__device__ int firstCrossing(const float* x, int n, double invT, double top, double z, double target, bool strict,
                             SelectShared& sh) {
  const int seg = (n + blockDim.x - 1) / blockDim.x;
  const int b = min(n, (int)threadIdx.x * seg), e = min(n, b + seg);
  double local = 0;
  for (int i = b; i < e; ++i) local += exp((double)x[i] * invT - top) / z;
  double before;
  BlockScanD(sh.scan).ExclusiveSum(local, before);
  __syncthreads();
  int found = n;
  double cum = before;
  for (int i = b; i < e; ++i) {
    cum += exp((double)x[i] * invT - top) / z;
    if (strict ? target < cum : cum >= target) {
      found = i;
      break;
    }
  }
  found = BlockReduceI(sh.reduceI).Reduce(found, MinOp());
  if (threadIdx.x == 0) sh.index = found;
  __syncthreads();
  found = sh.index;
  __syncthreads();
  return found;
}

__global__ void __launch_bounds__(kSelectThreads) selectKernel(const float* __restrict__ x, const int32_t* __restrict__ ids, int V, float temperature,
                             int topK, float topP, float minP, uint64_t seed, uint64_t position, int32_t* out) {
  waitForPrecedingKernels();
  __shared__ SelectShared sh;
  int keep = topK > 0 && topK < V ? topK : V;
  // Tokens tied with the k-th stay, as on the CPU (x is sorted, so ties follow it).
  while (keep < V && x[keep] == x[keep - 1]) ++keep;
  const double invT = 1.0 / (double)temperature;
  const double top = (double)x[0] * invT;
  const double z = blockSum(x, keep, invT, top, 1.0, sh);
  if (topP < 1.0f) {  // smallest prefix whose mass reaches topP (at least one token)
    const int k = firstCrossing(x, keep, invT, top, z, (double)topP, false, sh);
    keep = max(min(k + 1, keep), 1);
  }
  if (minP > 0.0f) {  // drop tokens below minP times the most likely one (probs are sorted)
    const double floorP = (double)minP * (1.0 / z);  // prob_0 = exp(0) / z
    int first = keep;
    for (int i = 1 + threadIdx.x; i < keep; i += blockDim.x)
      if (exp((double)x[i] * invT - top) / z < floorP) first = min(first, i);
    first = BlockReduceI(sh.reduceI).Reduce(first, MinOp());
    if (threadIdx.x == 0) sh.index = first;
    __syncthreads();
    keep = sh.index;
    __syncthreads();
  }
  const double mass = blockSum(x, keep, invT, top, z, sh);
  const double u = lckv::uniformDraw(seed, position) * mass;
  const int pick = firstCrossing(x, keep, invT, top, z, u, true, sh);
  if (threadIdx.x == 0) *out = ids[pick < keep ? pick : keep - 1];
}

struct SampleBuffers {
  float *keysIn, *keysOut;
  int32_t *idsIn, *idsOut;
  void* temp;
  size_t tempBytes;
};

size_t align256(size_t b) { return (b + 255) & ~size_t(255); }

size_t cubTempBytes(int V) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairsDescending(nullptr, bytes, (const float*)nullptr, (float*)nullptr, (const int32_t*)nullptr,
                                            (int32_t*)nullptr, V);
  return bytes;
}

SampleBuffers carve(void* ws, int V) {
  char* p = static_cast<char*>(ws);
  SampleBuffers b;
  const size_t f = align256(sizeof(float) * (size_t)V), i = align256(sizeof(int32_t) * (size_t)V);
  b.keysIn = (float*)p;
  b.keysOut = (float*)(p + f);
  b.idsIn = (int32_t*)(p + 2 * f);
  b.idsOut = (int32_t*)(p + 2 * f + i);
  b.temp = p + 2 * f + 2 * i;
  b.tempBytes = cubTempBytes(V);
  return b;
}

}  // namespace

size_t sampleWorkspaceBytes(int V) {
  return 2 * align256(sizeof(float) * (size_t)V) + 2 * align256(sizeof(int32_t) * (size_t)V) + align256(cubTempBytes(V));
}

void launchSample(const float* logits, int V, const int32_t* penalized, int penalizedCount, float penalty,
                  float temperature, int topK, float topP, float minP, uint64_t seed, uint64_t position,
                  const RowExtras& extras, void* workspace, int32_t* outToken, cudaStream_t stream) {
  NvtxRange r("sample");
  if (V <= 0 || !(temperature > 0.0f)) throw std::invalid_argument("sample: needs V > 0 and temperature > 0");
  SampleBuffers b = carve(workspace, V);
  LCKV_CUDA_CHECK(cudaMemcpyAsync(b.keysIn, logits, sizeof(float) * (size_t)V, cudaMemcpyDeviceToDevice, stream));
  if (penalty != 1.0f && penalizedCount > 0) {
    launchKernel(penaltyKernel, (penalizedCount + 255) / 256, 256, 0, stream, b.keysIn, penalized, penalizedCount, V, penalty);
    LCKV_LAUNCH_CHECK("repetition_penalty");
  }
  adjustLogits(b.keysIn, V, extras, stream);
  launchKernel(iotaKernel, (V + 255) / 256, 256, 0, stream, b.idsIn, V);
  LCKV_LAUNCH_CHECK("iota");
  size_t temp = b.tempBytes;
  LCKV_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(b.temp, temp, b.keysIn, b.keysOut, b.idsIn, b.idsOut, V, 0,
                                                            (int)(sizeof(float) * 8), stream));
  launchKernel(selectKernel, 1, kSelectThreads, 0, stream, b.keysOut, b.idsOut, V, temperature, topK, topP, minP, seed, position,
                                                 outToken);
  LCKV_LAUNCH_CHECK("sample_select");
  // The sort leaves its input as it was: keysIn is still the processed row, in id order.
  writeLogprobs(b.keysIn, V, outToken, extras, stream);
}

}  // namespace lckv::cuda
