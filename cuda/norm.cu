// RMSNorm and LayerNorm: one block per row, f32 statistics.
#include "common.cuh"
#include "kernels.h"

namespace lckv::cuda {

namespace {

constexpr int kThreads = 256;

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

// With delta != nullptr, first x += delta (the residual add), in the same pass over the row.
template <typename W>
__global__ void normKernel(bool rms, float* x, const float* delta, int E, const W* weight, const W* bias, float eps,
                           float* out) {
  __shared__ float shared[32];
  float* xr = x + (int64_t)blockIdx.x * E;
  float* o = out + (int64_t)blockIdx.x * E;
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
    o[j] = v;
  }
}

}  // namespace

namespace {
void launchNormImpl(bool rms, float* x, const float* delta, int n, int E, const void* weight, const void* bias,
                    int wtype, float eps, float* out, cudaStream_t stream) {
  if (n <= 0 || E <= 0) throw std::invalid_argument("norm: empty shape");
  switch ((WeightType)wtype) {
    case WeightType::F32: normKernel<<<n, kThreads, 0, stream>>>(rms, x, delta, E, (const float*)weight, (const float*)bias, eps, out); break;
    case WeightType::BF16: normKernel<<<n, kThreads, 0, stream>>>(rms, x, delta, E, (const __nv_bfloat16*)weight, (const __nv_bfloat16*)bias, eps, out); break;
    case WeightType::F16: normKernel<<<n, kThreads, 0, stream>>>(rms, x, delta, E, (const __half*)weight, (const __half*)bias, eps, out); break;
  }
  LCKV_LAUNCH_CHECK("norm");
}
}  // namespace

void launchNorm(bool rms, const float* x, int n, int E, const void* weight, const void* bias, int wtype, float eps,
                float* out, cudaStream_t stream) {
  NvtxRange r(rms ? "rms_norm" : "layer_norm");
  launchNormImpl(rms, const_cast<float*>(x), nullptr, n, E, weight, bias, wtype, eps, out, stream);
}

void launchAddNorm(bool rms, float* x, const float* delta, int n, int E, const void* weight, const void* bias, int wtype,
                   float eps, float* out, cudaStream_t stream) {
  NvtxRange r(rms ? "add_rms_norm" : "add_layer_norm");
  launchNormImpl(rms, x, delta, n, E, weight, bias, wtype, eps, out, stream);
}

}  // namespace lckv::cuda
