// Token selection on the device, so that only the chosen id crosses to the host.
// Greedy (temperature 0) with the repetition penalty: the CPU reference is
// native/engine/sampling.cpp, whose rules this follows exactly (ties go to the lowest id).
#include "common.cuh"
#include "kernels.h"

namespace lckv::cuda {

namespace {

constexpr int kThreads = 1024;

// x[t] of each (distinct) history token: divided by the penalty when positive, else multiplied.
__global__ void penaltyKernel(float* x, const int32_t* tokens, int count, int V, float penalty) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const int t = tokens[i];
  if (t < 0 || t >= V) return;
  const float v = x[t];
  x[t] = v > 0.0f ? v / penalty : v * penalty;
}

__device__ __forceinline__ bool better(float v, int i, float bv, int bi) { return v > bv || (v == bv && i < bi); }

__global__ void argmaxKernel(const float* __restrict__ x, int V, int32_t* __restrict__ out) {
  __shared__ float sv[kThreads / 32];
  __shared__ int si[kThreads / 32];
  float bv = -INFINITY;
  int bi = V;
  for (int i = threadIdx.x; i < V; i += blockDim.x)
    if (better(x[i], i, bv, bi)) {
      bv = x[i];
      bi = i;
    }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (better(ov, oi, bv, bi)) {
      bv = ov;
      bi = oi;
    }
  }
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

}  // namespace

void launchGreedy(const float* logits, int V, float* scratch, const int32_t* penalized, int penalizedCount, float penalty,
                  int32_t* outToken, cudaStream_t stream) {
  NvtxRange r("sample_greedy");
  if (V <= 0) throw std::invalid_argument("greedy: empty vocabulary");
  const float* x = logits;
  if (penalty != 1.0f && penalizedCount > 0) {
    LCKV_CUDA_CHECK(cudaMemcpyAsync(scratch, logits, sizeof(float) * (size_t)V, cudaMemcpyDeviceToDevice, stream));
    penaltyKernel<<<(penalizedCount + 255) / 256, 256, 0, stream>>>(scratch, penalized, penalizedCount, V, penalty);
    LCKV_LAUNCH_CHECK("repetition_penalty");
    x = scratch;
  }
  argmaxKernel<<<1, kThreads, 0, stream>>>(x, V, outToken);
  LCKV_LAUNCH_CHECK("argmax");
}

}  // namespace lckv::cuda
