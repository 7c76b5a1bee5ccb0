// Matrix-vector products for small batches (decode): out[n, O] = x[n, I] @ W[O, I]^T + bias.
// Memory-bound on W: one warp per output feature streams its row of W once with 16-byte loads
// and applies it to all n (<= kMaxRows) input rows, so W is read once per step whatever n is.
#include "common.cuh"
#include "kernels.h"

namespace lckv::cuda {

namespace {

constexpr int kMaxRows = 16;  // the CUDA backend sends up to 16 rows (kGemvMaxRows): W is read once
constexpr int kWarps = 8;

// Eight consecutive weights as floats from one 16-byte load (bf16/f16) or two (f32).
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* w) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    w[2 * i] = f.x;
    w[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void load8(const __half* p, float* w) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    w[2 * i] = f.x;
    w[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void load8(const float* p, float* w) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *reinterpret_cast<const float4*>(p + 4);
  w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
  w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
}

// ROWS: the input rows this instance handles (a power of two >= n): batch 1 does not pay for
// the accumulators and predicates of 16 rows. Each row's sum is formed the same way whatever
// ROWS is, so results do not depend on the batch.
template <typename W, bool kVec, int ROWS>
__global__ void gemvKernel(const float* __restrict__ x, int n, int I, const W* __restrict__ Wt, const W* __restrict__ bias,
                           int O, float* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int j = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (j >= O) return;
  const W* wj = Wt + (int64_t)j * I;
  float acc[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;
  if (kVec) {
#pragma unroll 4
    for (int k = lane * 8; k < I; k += 32 * 8) {
      float w[8];
      load8(wj + k, w);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (r < n) {
          const float4 a = *reinterpret_cast<const float4*>(x + (int64_t)r * I + k);
          const float4 b = *reinterpret_cast<const float4*>(x + (int64_t)r * I + k + 4);
          acc[r] += w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * b.x + w[5] * b.y + w[6] * b.z + w[7] * b.w;
        }
      }
    }
  } else {
    for (int k = lane; k < I; k += 32) {
      const float w = toFloat(wj[k]);
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
        if (r < n) acc[r] += w * x[(int64_t)r * I + k];
    }
  }
  const float b = bias ? toFloat(bias[j]) : 0.0f;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (r < n) {
      const float s = warpSum(acc[r]);
      if (lane == 0) out[(int64_t)r * O + j] = s + b;
    }
  }
}

template <typename W>
void launchTyped(const float* x, int n, int I, const void* Wt, const void* bias, int O, float* out, cudaStream_t stream) {
  const bool vec = I % 8 == 0 && (reinterpret_cast<uintptr_t>(Wt) % 16) == 0 && (reinterpret_cast<uintptr_t>(x) % 16) == 0;
  const dim3 grid((O + kWarps - 1) / kWarps);
  for (int r0 = 0; r0 < n; r0 += kMaxRows) {
    const int rows = std::min(kMaxRows, n - r0);
    const float* xr = x + (int64_t)r0 * I;
    float* o = out + (int64_t)r0 * O;
#define LCKV_GEMV(R)                                                                                              \
  (vec ? gemvKernel<W, true, R><<<grid, kWarps * 32, 0, stream>>>(xr, rows, I, (const W*)Wt, (const W*)bias, O, o) \
       : gemvKernel<W, false, R><<<grid, kWarps * 32, 0, stream>>>(xr, rows, I, (const W*)Wt, (const W*)bias, O, o))
    if (rows == 1) LCKV_GEMV(1);
    else if (rows <= 2) LCKV_GEMV(2);
    else if (rows <= 4) LCKV_GEMV(4);
    else if (rows <= 8) LCKV_GEMV(8);
    else LCKV_GEMV(16);
#undef LCKV_GEMV
  }
}

}  // namespace

void launchGemv(const float* x, int n, int I, const void* W, const void* bias, int wtype, int O, float* out,
                cudaStream_t stream) {
  NvtxRange r("gemv");
  if (n <= 0 || I <= 0 || O <= 0) throw std::invalid_argument("gemv: empty shape");
  switch ((WeightType)wtype) {
    case WeightType::F32: launchTyped<float>(x, n, I, W, bias, O, out, stream); break;
    case WeightType::BF16: launchTyped<__nv_bfloat16>(x, n, I, W, bias, O, out, stream); break;
    case WeightType::F16: launchTyped<__half>(x, n, I, W, bias, O, out, stream); break;
  }
  LCKV_LAUNCH_CHECK("gemv");
}

}  // namespace lckv::cuda
